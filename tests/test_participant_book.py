"""The operator's book of registered participants (coordinator/participants.py) and how a
deployed Coordinator names and excludes nodes by it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from coordinator.local_grid import LocalGrid
from coordinator.participants import BOOK, ParticipantBook, Registered
from coordinator.rounds import Coordinator
from fedlora.audit import read_records
from fedlora.config import load_config
from participant.app import app
from tests.conftest import SMALL


def book_with(directory: Path, *entries: tuple[str, int, str]) -> ParticipantBook:
    book = ParticipantBook(directory / BOOK)
    for name, node_id, fingerprint in entries:
        book.add(name, node_id, fingerprint)
    return book


def test_an_empty_book_has_no_file_until_something_is_registered(tmp_path: Path) -> None:
    book = ParticipantBook(tmp_path / BOOK)
    assert book.entries == [] and book.revoked() == {} and book.name_of(1) is None
    assert not (tmp_path / BOOK).exists()


def test_add_find_revoke_and_name_of_round_trip_through_the_file(tmp_path: Path) -> None:
    book = book_with(tmp_path, ("hospital-a", 11, "fp-a"), ("hospital-b", 12, "fp-b"))
    stored = json.loads((tmp_path / BOOK).read_text())
    assert [entry["name"] for entry in stored["participants"]] == ["hospital-a", "hospital-b"]

    reopened = ParticipantBook(tmp_path / BOOK)
    assert reopened.entries == book.entries
    found = reopened.find("hospital-b")
    assert isinstance(found, Registered) and (found.node_id, found.fingerprint, found.revoked) == (12, "fp-b", "")
    assert found.registered  # a timestamp
    assert reopened.name_of(11) == "hospital-a" and reopened.name_of(12) == "hospital-b" and reopened.name_of(13) is None

    revoked = reopened.revoke("hospital-b", "key leaked")
    assert revoked.revoked.startswith("key leaked (") and (revoked.node_id, revoked.fingerprint) == (12, "fp-b")
    again = ParticipantBook(tmp_path / BOOK)
    assert list(again.revoked()) == ["hospital-b"] and again.revoked()["hospital-b"] == revoked.revoked
    assert again.find("hospital-a").revoked == ""
    assert again.name_of(12) == "hospital-b"  # still named (so its replies can be refused by name)
    assert [e.name for e in again.entries] == ["hospital-a", "hospital-b"]  # order kept, nothing dropped


def test_node_ids_are_stored_as_integers(tmp_path: Path) -> None:
    book_with(tmp_path, ("hospital-a", "11", "fp-a"))  # type: ignore[arg-type] - as parsed from a CLI
    assert ParticipantBook(tmp_path / BOOK).name_of(11) == "hospital-a"


@pytest.mark.parametrize(
    ("name", "fingerprint", "words"),
    [
        ("hospital-a", "fp-new", "already registered (node 11)"),
        ("hospital-c", "fp-a", "already registered as 'hospital-a'"),
        ("", "fp-new", "non-empty"),
        ("hospital c", "fp-new", "without spaces"),
    ],
)
def test_a_second_registration_of_a_name_or_key_is_refused(tmp_path: Path, name: str, fingerprint: str, words: str) -> None:
    book = book_with(tmp_path, ("hospital-a", 11, "fp-a"), ("hospital-b", 12, "fp-b"))
    before = (tmp_path / BOOK).read_bytes()
    with pytest.raises(ValueError) as err:
        book.add(name, 99, fingerprint)
    assert words in str(err.value)
    assert (tmp_path / BOOK).read_bytes() == before and len(book.entries) == 2


def test_a_revoked_name_and_key_stay_taken(tmp_path: Path) -> None:
    book = book_with(tmp_path, ("hospital-a", 11, "fp-a"))
    book.revoke("hospital-a", "left the consortium")
    with pytest.raises(ValueError):
        book.add("hospital-a", 21, "fp-other")
    with pytest.raises(ValueError):
        book.add("hospital-z", 21, "fp-a")


def test_an_unknown_name_is_a_key_error_listing_the_registered_ones(tmp_path: Path) -> None:
    with pytest.raises(KeyError) as empty:
        ParticipantBook(tmp_path / BOOK).find("hospital-a")
    assert "none yet" in str(empty.value)
    book = book_with(tmp_path, ("hospital-a", 11, "fp-a"), ("hospital-b", 12, "fp-b"))
    with pytest.raises(KeyError) as err:
        book.find("hospital-x")
    assert "'hospital-x'" in str(err.value) and "hospital-a, hospital-b" in str(err.value)
    with pytest.raises(KeyError):
        book.revoke("hospital-x", "no such site")
    assert ParticipantBook(tmp_path / BOOK).revoked() == {}


# --- a deployed coordinator ------------------------------------------------------------------

# Nodes 11 and 12 registered (12 revoked at the start in the first test), 13 connected but unregistered.
NODES = {11: 0, 12: 1, 13: 2}


def deployed_config(*overrides: str):
    return load_config(None, [*SMALL, "federation.participants=3", "federation.rounds=1", "train.local_steps=1", "data.max_examples=60", *overrides])


def test_a_deployed_coordinator_names_and_excludes_nodes_by_the_book(tmp_path: Path) -> None:
    deployment = tmp_path / "coordinator"
    deployment.mkdir()
    book_with(deployment, ("hospital-a", 11, "fp-a"), ("hospital-b", 12, "fp-b")).revoke("hospital-b", "key leaked")
    coordinator = Coordinator(deployed_config("robust.revoked=hospital-z"), tmp_path / "run", deployment=deployment)
    assert coordinator.name(11) == "hospital-a" and coordinator.name(12) == "hospital-b"
    assert coordinator.name(13) == "unregistered-node-13"
    # A reply's own claim (its partition id) does not rename a registered node.
    assert coordinator.name(11, {"partition_id": 2}) == "hospital-a"
    assert coordinator.excluded("hospital-a") == ""
    assert coordinator.excluded("hospital-b").startswith("revoked by the operator: key leaked")
    assert coordinator.excluded("unregistered-node-13") == "not registered with this coordinator"
    assert coordinator.excluded("hospital-z") == "revoked (robust.revoked)"
    assert coordinator.eligible([13, 12, 11]) == [11]
    assert (deployment / "coordinator.key").is_file()  # a deployment signs with the coordinator's own key


def test_only_registered_unrevoked_nodes_take_part_and_revocations_apply_from_the_next_round(tmp_path: Path) -> None:
    deployment = tmp_path / "coordinator"
    deployment.mkdir()
    book_with(deployment, ("hospital-a", 11, "fp-a"), ("hospital-b", 12, "fp-b"))

    class RevokingGrid(LocalGrid):
        """Revokes hospital-b once round 1's evaluation is out (the operator acting between rounds)."""

        def send_and_receive(self, messages, *, timeout=None):
            messages = list(messages)
            replies = super().send_and_receive(messages, timeout=timeout)
            if any(m.metadata.message_type == "evaluate" and m.metadata.group_id == "1" for m in messages):
                ParticipantBook(deployment / BOOK).revoke("hospital-b", "key leaked")
            return replies

    grid = RevokingGrid(app, {node: {"partition-id": pid, "num-partitions": 3} for node, pid in NODES.items()})
    run_dir = tmp_path / "run"
    rows = Coordinator(deployed_config("federation.rounds=2"), run_dir, deployment=deployment).run(grid)
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert rows[1]["sampled"] == 2 and rows[1]["participants"] == 2 and rows[1]["applied"]
    assert rows[2]["sampled"] == 1 and rows[2]["participants"] == 1 and rows[2]["applied"]
    rounds = [e for e in read_records(run_dir / "audit.jsonl") if e["event"] == "round"]
    assert [e["sampled"] for e in rounds] == [["hospital-a", "hospital-b"], ["hospital-a"]]
    assert [e["answered"] for e in rounds] == [["hospital-a", "hospital-b"], ["hospital-a"]]
    assert (run_dir / "coordinator.pid").is_file()
    manifest = json.loads((run_dir / "adapters" / "round-0001" / "manifest.json").read_text())
    assert manifest["facts"]["participants"] == ["hospital-a", "hospital-b"]


def test_the_roster_from_the_book_names_each_site_by_its_registered_key_and_leaves_out_the_revoked(tmp_path: Path) -> None:
    from coordinator.deploy import write_roster
    from fedlora.pki import create_node_key, public_key_fingerprint
    from participant.daemon import install_roster
    from participant.site import site_identity

    book = ParticipantBook(tmp_path / BOOK)
    for node, name in enumerate(["hospital-a", "hospital-b", "hospital-c"]):
        _, pub = create_node_key(tmp_path / name)
        book.add(name, node, public_key_fingerprint(pub))
    book.revoke("hospital-c", "left the consortium")
    roster = write_roster(tmp_path, tmp_path / "roster.toml")
    for name in ("hospital-a", "hospital-b"):
        install_roster(tmp_path / name, roster)
        identity = site_identity(tmp_path / name)
        assert identity.name == name and sorted(identity.roster.members) == ["hospital-a", "hospital-b"]
    install_roster(tmp_path / "hospital-c", roster)
    with pytest.raises(ValueError, match="0 times, not once"):
        site_identity(tmp_path / "hospital-c")
