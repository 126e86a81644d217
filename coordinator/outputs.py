"""The run directory: resolved config, one metrics line per round, PEFT adapters, a plot.

Adapter versions form lineages. The run as first trained is lineage 0 (`adapters/round-0003`);
a withdrawal (coordinator/withdrawal.py) rolls the head back to the last version without the
participant's contributions and the rounds after it are re-trained as lineage k
(`adapters/round-0003-r1`), each manifest naming its parent and the version it replaces.
`lineage.json` holds the current lineage; `checkpoints/<version>.npz` the state after each
version, so a head can be rolled back to any of them.

Each round's line is appended and flushed before the next round starts, so a crash loses
at most the round in flight. A resumed run (`resume=True`) keeps everything up to the
checkpoint's round: later metrics rows (the round that was cut short) are dropped, a torn
last audit line is cut off, and the audit chain goes on with a `resumed` record saying so.
"""

from __future__ import annotations

import io
import json
import math
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedlora.atomic import read_json, write_bytes_atomic, write_json_atomic
from fedlora.audit import AuditLog
from fedlora.registry import load_or_create_key, sign_adapter
from fedlora.config import Config, config_sha256

if TYPE_CHECKING:  # torch and peft load only to write an adapter: `coordinator status` reads metrics without them
    from peft import PeftConfig

    from fedlora.adapter import AdapterLayout
    from fedlora.aggregate import Unit


LINEAGE = "lineage.json"


@dataclass
class Lineage:
    """Which versions the head is built from, and who is excluded from its rounds."""

    number: int = 0  # 0: the run as first trained; k: the k-th re-training after a withdrawal
    base_round: int = -1  # rounds up to this one keep the versions in `chain`
    chain: dict[int, str] = field(default_factory=dict)  # round -> version, up to base_round
    replaced: dict[int, str] = field(default_factory=dict)  # round -> the withdrawn version this lineage re-trains
    withdrawn: dict[str, str] = field(default_factory=dict)  # participant -> why; excluded from every round

    def version(self, server_round: int) -> str:
        """The head's version of a round: kept from before the rollback, or this lineage's own."""
        if server_round <= self.base_round:
            return self.chain[server_round]
        return f"round-{server_round:04d}" + (f"-r{self.number}" if self.number else "")

    @classmethod
    def load(cls, run_dir: Path) -> Lineage:
        raw = read_json(Path(run_dir) / LINEAGE, {})
        for key in ("chain", "replaced"):
            raw[key] = {int(r): v for r, v in raw.get(key, {}).items()}
        return cls(**raw)

    def save(self, run_dir: Path) -> None:
        write_json_atomic(Path(run_dir) / LINEAGE, asdict(self))


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The rows of a run's metrics.jsonl, one per round (round 0 = before training).

    A last line without its newline is one the coordinator is writing now (or a crash tore):
    readers watching a live run skip it; a resumption cuts it off (`cut_torn_tail`)."""
    text = (Path(run_dir) / "metrics.jsonl").read_text()
    lines = text.splitlines(keepends=True)
    return [json.loads(line) for line in lines if line.strip() and line.endswith("\n")]


# The generation-quality keys of a metrics row (free-form answers only), by the name a reader knows them by.
GENERATION_LABELS = {"exact match": "eval_exact_match", "token F1": "eval_token_f1", "ROUGE-L": "eval_rouge_l"}


def generation_note(row: dict[str, Any]) -> str:
    """', exact match 0.412, token F1 0.700, ROUGE-L 0.731' for a row with free-form scores, else '';
    then the personalised adapters' accuracy or ROUGE-L where sites fine-tuned it (federation.personalization)."""
    note = "".join(f", {label} {row[key]:.3f}" for label, key in GENERATION_LABELS.items() if key in row)
    for label, key in (("personalised accuracy", "eval_personal_accuracy"), ("personalised ROUGE-L", "eval_personal_rouge_l")):
        if isinstance(row.get(key), float) and math.isfinite(row[key]):
            note += f", {label} {row[key]:.3f}"
    return note


def majority_note(row: dict[str, Any]) -> str:
    """' (majority class 0.641: +8.2 points)' for a row that has both numbers, else ''."""
    accuracy, majority = row.get("eval_accuracy"), row.get("majority_accuracy")
    if accuracy is None or majority is None or not math.isfinite(accuracy):
        return ""
    return f" (majority class {majority:.3f}: {100 * (accuracy - majority):+.1f} points)"


def cut_torn_tail(path: Path) -> int:
    """Drop an unterminated last line (a write cut by a crash); returns the bytes dropped."""
    content = path.read_bytes() if path.is_file() else b""
    if not content or content.endswith(b"\n"):
        return 0
    kept = content[: content.rfind(b"\n") + 1]
    write_bytes_atomic(path, kept)
    return len(content) - len(kept)


class RunDirectory:
    def __init__(self, path: Path, config: Config, signing_key: Path | None = None, resume: bool = False) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.path / "metrics.jsonl"
        self.config_sha256 = config_sha256(config.to_toml())  # what every instruction's configuration hashes to
        if not resume:
            (self.path / "config.toml").write_text(config.to_toml())
            self.metrics_path.write_text("")
            (self.path / "audit.jsonl").unlink(missing_ok=True)  # a new run starts a new chain
            shutil.rmtree(self.path / "adapters" / "final", ignore_errors=True)  # never another run's result
            (self.path / LINEAGE).unlink(missing_ok=True)
            shutil.rmtree(self.path / "units", ignore_errors=True)
        self.lineage = Lineage.load(self.path)
        self.torn_audit_bytes = cut_torn_tail(self.path / "audit.jsonl")
        self.audit = AuditLog(self.path / "audit.jsonl")
        if not resume:
            self.audit.append({"event": "run", "config_sha256": self.config_sha256})
        # Simulation: a key per run directory; a deployment passes the coordinator's own key.
        self.signing_key = load_or_create_key(signing_key or self.path / "coordinator.key")

    def resume_at(self, server_round: int, counted: list[int]) -> list[int]:
        """Keep the metrics of rounds up to `server_round`, record the resumption; the rounds dropped.

        `counted`: cut-short rounds whose privacy cost stays in the accountant (they released a result).
        """
        cut_torn_tail(self.metrics_path)
        rows = read_metrics(self.path)
        kept = [row for row in rows if row["round"] <= server_round and "stopped" not in row]
        dropped = sorted({row["round"] for row in rows} - {row["round"] for row in kept})
        write_bytes_atomic(self.metrics_path, "".join(json.dumps(row, allow_nan=True) + "\n" for row in kept).encode())
        self.audit.append({
            "event": "resumed",
            "from_round": server_round,
            "config_sha256": self.config_sha256,
            "dropped_rounds": dropped,
            "privacy_counted_rounds": counted,
            "torn_audit_bytes": self.torn_audit_bytes,
        })
        return dropped

    def write_json(self, name: str, payload: Any) -> None:
        (self.path / name).write_text(json.dumps(payload, indent=2) + "\n")

    def append_metrics(self, row: dict[str, Any]) -> None:
        with self.metrics_path.open("a") as handle:
            handle.write(json.dumps(row, allow_nan=True) + "\n")

    def save_adapter(
        self, server_round: int, vector: np.ndarray, layout: AdapterLayout, peft_config: PeftConfig, facts: dict[str, Any]
    ) -> Path:
        """The round's adapter as a PEFT directory with a manifest signed by the run's key."""
        from fedlora.adapter import save_peft_dir

        directory = self.version_dir(server_round)
        if directory.exists():  # left half-written by a round a crash cut short
            shutil.rmtree(directory)
        directory = save_peft_dir(directory, vector, layout, peft_config)
        parent = self.lineage.version(server_round - 1) if server_round > 0 else None
        lineage = self.lineage
        if lineage.number:  # a re-trained version says what it replaces and whom it leaves out
            facts = facts | {"lineage": lineage.number, "replaces": lineage.replaced.get(server_round), "withdrawn": sorted(lineage.withdrawn)}
        sign_adapter(directory, self.signing_key, {"round": server_round, "parent": parent, "config_sha256": self.config_sha256, **facts})
        return directory

    def version_dir(self, server_round: int) -> Path:
        return self.path / "adapters" / self.lineage.version(server_round)

    def save_units(self, server_round: int, units: Sequence[Unit], global_before: np.ndarray) -> Path:
        """units/<version>.npz: the round's screened units (members, weight, mean update in server
        coordinates, DP noise std) and the global adapter they were applied to (`audit.keep_units`)."""
        out = self.path / "units" / f"{self.lineage.version(server_round)}.npz"  # per version: a withdrawal re-trains rounds
        out.parent.mkdir(exist_ok=True)
        buffer = io.BytesIO()
        np.savez(
            buffer,
            members=np.array(json.dumps([list(unit.members) for unit in units])),
            weights=np.array([unit.weight for unit in units], dtype=np.float64),
            noise_std=np.array([unit.noise_std for unit in units], dtype=np.float64),
            means=np.stack([np.asarray(unit.mean, dtype=np.float32) for unit in units]),
            global_before=np.asarray(global_before, dtype=np.float32),
        )
        write_bytes_atomic(out, buffer.getvalue())
        return out

    def publish_final(self, source: Path) -> Path:
        final = self.path / "adapters" / "final"
        if final.exists():
            shutil.rmtree(final)
        shutil.copytree(source, final)
        return final

    def read_metrics(self) -> list[dict[str, Any]]:
        return read_metrics(self.path)

    def plot(self) -> Path:
        """metrics.png: losses and held-out accuracy (or, for free-form answers, generation quality) per round,
        against the majority class and round 0."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator

        rows = [row for row in self.read_metrics() if "stopped" not in row]
        figure, (loss_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(10, 4))
        for key in ("train_loss", "eval_loss"):
            points = finite_points(rows, key)
            if points:
                loss_axis.plot(*zip(*points), marker="o", label=key)
        loss_axis.set(xlabel="round", ylabel="loss", title="loss per round")
        if loss_axis.lines:
            loss_axis.legend()
        points = finite_points(rows, "eval_accuracy")
        if points:
            accuracy_axis.plot(*zip(*points), marker="o", color="tab:green", label="global adapter")
            accuracy_axis.axhline(points[0][1], color="tab:gray", linestyle=":", label=f"round 0 ({points[0][1]:.3f})")
        majority = finite_points(rows, "majority_accuracy")
        if majority:
            accuracy_axis.axhline(majority[-1][1], color="tab:red", linestyle="--", label=f"majority class ({majority[-1][1]:.3f})")
        generated = [(label, finite_points(rows, key)) for label, key in GENERATION_LABELS.items()]
        for label, scored in generated:  # free-form answers: generation quality where accuracy would be
            if scored:
                accuracy_axis.plot(*zip(*scored), marker="o", label=label)
        if any(scored for _, scored in generated):
            accuracy_axis.set(ylabel="held-out score of greedy answers", title="generation quality per round")
        else:
            accuracy_axis.set(ylabel="held-out accuracy", title="accuracy per round")
        accuracy_axis.set(xlabel="round", ylim=(0, 1))
        if accuracy_axis.lines:
            accuracy_axis.legend(loc="lower right")
        for axis in (loss_axis, accuracy_axis):
            axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        figure.tight_layout()
        out = self.path / "metrics.png"
        figure.savefig(out, dpi=100)
        plt.close(figure)
        return out


def finite_points(rows: list[dict[str, Any]], key: str) -> list[tuple[int, float]]:
    """(round, value) for the rows where `key` holds a finite number."""
    return [(row["round"], row[key]) for row in rows if isinstance(row.get(key), (int, float)) and math.isfinite(row[key])]
