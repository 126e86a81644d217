"""The run directory: resolved config, one metrics line per round, PEFT adapters, a plot.

Each round's line is appended and flushed before the next round starts, so a crash loses
at most the round in flight. A resumed run (`resume=True`) keeps everything up to the
checkpoint's round: later metrics rows (the round that was cut short) are dropped, a torn
last audit line is cut off, and the audit chain goes on with a `resumed` record saying so.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedlora.atomic import write_bytes_atomic
from fedlora.audit import AuditLog
from fedlora.registry import load_or_create_key, sign_adapter
from fedlora.config import Config

if TYPE_CHECKING:  # torch and peft load only to write an adapter: `coordinator status` reads metrics without them
    from peft import PeftConfig

    from fedlora.adapter import AdapterLayout
    from fedlora.aggregate import Unit


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The rows of a run's metrics.jsonl, one per round (round 0 = before training)."""
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


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
        self.config_sha256 = hashlib.sha256(config.to_toml().encode()).hexdigest()
        if not resume:
            (self.path / "config.toml").write_text(config.to_toml())
            self.metrics_path.write_text("")
            (self.path / "audit.jsonl").unlink(missing_ok=True)  # a new run starts a new chain
            shutil.rmtree(self.path / "adapters" / "final", ignore_errors=True)  # never another run's result
            shutil.rmtree(self.path / "units", ignore_errors=True)
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

        directory = self.path / "adapters" / f"round-{server_round:04d}"
        if directory.exists():  # left half-written by a round a crash cut short
            shutil.rmtree(directory)
        directory = save_peft_dir(directory, vector, layout, peft_config)
        parent = f"round-{server_round - 1:04d}" if server_round > 0 else None
        sign_adapter(directory, self.signing_key, {"round": server_round, "parent": parent, "config_sha256": self.config_sha256, **facts})
        return directory

    def save_units(self, server_round: int, units: Sequence[Unit], global_before: np.ndarray) -> Path:
        """units/round-XXXX.npz: the round's screened units (members, weight, mean update in server
        coordinates, DP noise std) and the global adapter they were applied to (`audit.keep_units`)."""
        out = self.path / "units" / f"round-{server_round:04d}.npz"
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
        """metrics.png: losses and held-out accuracy per round, against the majority class and round 0."""
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
        accuracy_axis.set(xlabel="round", ylabel="held-out accuracy", title="accuracy per round", ylim=(0, 1))
        if points:
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
