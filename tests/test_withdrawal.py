"""Withdrawal by exact replay (coordinator/withdrawal.py) over LocalGrid with the real participant app.

A participant that first contributed in round 2 withdraws after the run: every version whose
lineage includes its updates is marked withdrawn (signed), the head goes back to round 1, and
the resumed run re-trains rounds 2-3 as lineage 1 without it. The new head must equal, bit for
bit, the head of a run with the same seeds in which it never took part.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from coordinator.checkpoint import CHECKPOINT, load_checkpoint
from coordinator.local_grid import LocalGrid
from coordinator.outputs import read_metrics
from coordinator.rounds import Coordinator
from coordinator.withdrawal import verify_certificate, withdraw_from_run
from fedlora.audit import read_records, verify
from fedlora.config import load_config
from fedlora.registry import WITHDRAWAL, export_adapter, load_or_create_key, verify_adapter
from participant.app import app
from tests.conftest import SMALL

PARTICIPANTS = 4
# Three of four sampled per round: the site left out of round 1 first contributes later.
RUN = [*SMALL, f"federation.participants={PARTICIPANTS}", "federation.fraction=0.75", "federation.rounds=3", "train.local_steps=2", "data.max_examples=120"]


def nodes() -> dict[int, dict]:
    return {p + 1: {"partition-id": p, "num-partitions": PARTICIPANTS} for p in range(PARTICIPANTS)}


@pytest.fixture(scope="module")
def withdrawn_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("withdrawal")
    cfg = load_config(None, RUN)
    Coordinator(cfg, root / "run").run(LocalGrid(app, nodes()))
    rounds = [r for r in read_records(root / "run" / "audit.jsonl") if r["event"] == "round"]
    late = sorted(set(rounds[1]["sampled"]) - set(rounds[0]["sampled"]))
    assert len(late) == 1 and all(r["applied"] for r in rounds), rounds  # the seed draws a late joiner
    name = late[0]
    key = load_or_create_key(root / "run" / "coordinator.key")
    certificate = withdraw_from_run(root / "run", name, "the hospital left the consortium", key, {"by": "operator"})
    return {"root": root, "cfg": cfg, "name": name, "certificate": certificate, "rounds": rounds}


def test_every_version_it_shaped_is_withdrawn_and_the_head_rolls_back(withdrawn_run: dict) -> None:
    run, name = withdrawn_run["root"] / "run", withdrawn_run["name"]
    certificate = withdrawn_run["certificate"]
    assert certificate["withdrawn_versions"] == ["round-0002", "round-0003"]
    assert certificate["rolled_back_to"] == "round-0001" and certificate["replay_from_round"] == 2
    trusted = (run / "coordinator.pub").read_bytes()
    for version in ("round-0002", "round-0003"):
        problems = verify_adapter(run / "adapters" / version, trusted)
        assert problems and problems[0].startswith("WITHDRAWN") and name in problems[0]
        with pytest.raises(ValueError, match="WITHDRAWN"):
            export_adapter(run / "adapters" / version, run.parent / f"export-{version}", trusted)
    assert export_adapter(run / "adapters" / "round-0003", run.parent / "forced", trusted, force=True).is_dir()
    for version in ("round-0000", "round-0001", "final"):
        assert verify_adapter(run / "adapters" / version, trusted) == [], version
    assert json.loads((run / "adapters" / "final" / "manifest.json").read_text())["facts"]["round"] == 1
    assert load_checkpoint(run / CHECKPOINT)["round"] == 1
    assert [row["round"] for row in read_metrics(run)] == [0, 1]
    assert (run / "lineages" / "lineage-0.metrics.jsonl").read_text().count("\n") == 4  # the withdrawn lineage's rows, kept
    assert verify(run / "audit.jsonl")[0] == []


def test_the_certificate_verifies_and_is_in_the_audit_chain(withdrawn_run: dict) -> None:
    run, certificate = withdrawn_run["root"] / "run", withdrawn_run["certificate"]
    trusted = (run / "coordinator.pub").read_bytes()
    assert json.loads((run / "withdrawals" / f"{withdrawn_run['name']}.json").read_text()) == certificate
    assert verify_certificate(certificate, trusted, run / "audit.jsonl") == []
    assert verify_certificate(certificate | {"rolled_back_to": "round-0002"}, trusted)  # an edit breaks the signature
    other = load_or_create_key(run.parent / "other.key")
    assert verify_certificate(certificate, (run.parent / "other.pub").read_bytes()) and other  # another key
    forged = certificate | {"audit_record": {"seq": certificate["audit_record"]["seq"], "hash": "0" * 64}}
    assert any("no record" in p for p in verify_certificate(forged, trusted, run / "audit.jsonl"))


def test_a_withdrawal_record_moved_to_another_version_or_edited_does_not_count(withdrawn_run: dict, tmp_path: Path) -> None:
    import shutil

    run = withdrawn_run["root"] / "run"
    trusted = (run / "coordinator.pub").read_bytes()
    moved = shutil.copytree(run / "adapters" / "round-0001", tmp_path / "round-0001")
    shutil.copyfile(run / "adapters" / "round-0002" / WITHDRAWAL, moved / WITHDRAWAL)
    problems = verify_adapter(moved, trusted)
    assert problems and not problems[0].startswith("WITHDRAWN") and "another version" in problems[0]
    edited = shutil.copytree(run / "adapters" / "round-0002", tmp_path / "round-0002")
    record = json.loads((edited / WITHDRAWAL).read_text()) | {"participants": ["someone-else"]}
    (edited / WITHDRAWAL).write_text(json.dumps(record))
    assert any("does not verify" in p for p in verify_adapter(edited, trusted))


def test_the_replayed_head_equals_a_run_in_which_it_never_took_part(withdrawn_run: dict) -> None:
    root, cfg, name = withdrawn_run["root"], withdrawn_run["cfg"], withdrawn_run["name"]
    rows = Coordinator(cfg, root / "run", resume=True).run(LocalGrid(app, nodes()))
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    replay = [r for r in read_records(root / "run" / "audit.jsonl") if r["event"] == "round"][3:]
    assert [r["version"] for r in replay] == ["round-0002-r1", "round-0003-r1"]
    assert all(name not in r["sampled"] for r in replay)  # never asked: the resumed run knows the names
    facts = json.loads((root / "run" / "adapters" / "round-0003-r1" / "manifest.json").read_text())["facts"]
    assert facts["replaces"] == "round-0003" and facts["parent"] == "round-0002-r1" and facts["withdrawn"] == [name]
    first = json.loads((root / "run" / "adapters" / "round-0002-r1" / "manifest.json").read_text())["facts"]
    assert first["parent"] == "round-0001"

    never = load_config(None, [*RUN, f'robust.revoked=["{name}"]'])
    Coordinator(never, root / "never").run(LocalGrid(app, nodes()))
    replayed, reference = (load_checkpoint(root / d / CHECKPOINT)["adapter"] for d in ("run", "never"))
    assert np.array_equal(replayed, reference)  # bit for bit
    assert not np.array_equal(replayed, withdrawn_run_head(root))  # and not the withdrawn head
    trusted = (root / "run" / "coordinator.pub").read_bytes()
    assert verify_adapter(root / "run" / "adapters" / "final", trusted) == []
    assert verify(root / "run" / "audit.jsonl")[0] == []


def withdrawn_run_head(root: Path) -> np.ndarray:
    return load_checkpoint(root / "run" / "checkpoints" / "round-0003.npz")["adapter"]


def test_unknown_and_repeated_withdrawals_are_refused(withdrawn_run: dict) -> None:
    run = withdrawn_run["root"] / "run"
    key = load_or_create_key(run / "coordinator.key")
    with pytest.raises(KeyError, match="never took part"):
        withdraw_from_run(run, "participant-99", "typo", key, {"by": "operator"})
    with pytest.raises(ValueError, match="already withdrawn"):
        withdraw_from_run(run, withdrawn_run["name"], "again", key, {"by": "operator"})


def test_under_secure_aggregation_the_replay_matches_within_the_fixed_point_error(tmp_path: Path) -> None:
    """Fresh buckets (and rounding) each run: the replayed head differs from the never-joined one by rounding only."""
    secure = [*RUN, "secagg.enabled=true", "secagg.bucket_size=2", "federation.rounds=2"]
    cfg = load_config(None, secure)
    Coordinator(cfg, tmp_path / "run").run(LocalGrid(app, nodes()))
    rounds = [r for r in read_records(tmp_path / "run" / "audit.jsonl") if r["event"] == "round"]
    name = sorted(set(rounds[1]["sampled"]) - set(rounds[0]["sampled"]))[0]
    key = load_or_create_key(tmp_path / "run" / "coordinator.key")
    certificate = withdraw_from_run(tmp_path / "run", name, "left", key, {"by": "operator"})
    assert certificate["withdrawn_versions"] == ["round-0002"] and certificate["rolled_back_to"] == "round-0001"
    (summed,) = certificate["secure_rounds"]  # what replay can and cannot remove, with the bucket it was summed in
    assert summed["round"] == 2 and name in summed["bucket"] and len(summed["bucket"]) >= 2
    assert "never saw it alone" in certificate["secure_scope"]
    Coordinator(cfg, tmp_path / "run", resume=True).run(LocalGrid(app, nodes()))
    Coordinator(load_config(None, [*secure, f'robust.revoked=["{name}"]']), tmp_path / "never").run(LocalGrid(app, nodes()))
    replayed, reference = (load_checkpoint(tmp_path / d / CHECKPOINT)["adapter"] for d in ("run", "never"))
    withdrawn = load_checkpoint(tmp_path / "run" / "checkpoints" / "round-0002.npz")["adapter"]
    before = load_checkpoint(tmp_path / "run" / "checkpoints" / "round-0001.npz")["adapter"]
    gap, step = np.abs(replayed - reference).max(), np.abs(withdrawn - before).max()
    assert gap <= 1e-3 * step, (gap, step)  # rounding of one secure sum, against a whole round's update
    assert np.abs(withdrawn - reference).max() > 100 * gap  # while the withdrawn head is far off


def test_privacy_spent_by_withdrawn_versions_stays_spent_and_the_replay_is_charged_on_top(tmp_path: Path) -> None:
    dp = [*SMALL, f"federation.participants={PARTICIPANTS}", "federation.rounds=2", "train.local_steps=1", "data.max_examples=80", "privacy.noise_multiplier=1.0"]
    cfg = load_config(None, dp)
    Coordinator(cfg, tmp_path).run(LocalGrid(app, nodes()))
    spent = load_checkpoint(tmp_path / CHECKPOINT)["privacy"]
    rounds = [r for r in read_records(tmp_path / "audit.jsonl") if r["event"] == "round"]
    name = next(n for n in rounds[0]["answered"])  # Poisson sampling: whoever round 1 applied
    withdraw_from_run(tmp_path, name, "left", load_or_create_key(tmp_path / "coordinator.key"), {"by": "operator"})
    assert load_checkpoint(tmp_path / CHECKPOINT)["privacy"] == spent  # not rolled back with the adapter
    rows = Coordinator(cfg, tmp_path, resume=True).run(LocalGrid(app, nodes()))
    history = load_checkpoint(tmp_path / CHECKPOINT)["privacy"]["accountant"]["history"]
    assert sum(count for *_, count in history) == 2 + 2  # two rounds released, two re-trained
    assert rows[-1]["epsilon"] > max(r["epsilon"] for r in rounds)
