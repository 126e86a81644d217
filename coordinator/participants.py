"""The operator's book of registered participants: name, Flower node id, key fingerprint, revocation.

`fedlora coordinator register` adds a participant's public key to the SuperLink (`flwr supernode
register`, which returns its node id) and records the name here; SuperNode authentication then
ties every message to that key, so the coordinator names participants by node id from this
book, never by what a reply claims. A node missing from the book is refused, and `revoke`
marks a participant so its replies are refused from the next round on, even while it is
connected. The book is one JSON file, replaced atomically.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any
from pathlib import Path

from fedlora.atomic import read_json, write_json_atomic
from fedlora.secagg.identity import Roster

BOOK = "participants.json"


@dataclass(frozen=True)
class Registered:
    name: str
    node_id: int
    fingerprint: str
    registered: str
    revoked: str = ""  # why, when revoked
    withdrawal: dict[str, Any] = field(default_factory=dict)  # reason, when, who asked: coordinator/withdrawal.py


class ParticipantBook:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        raw = read_json(self.path, {"participants": []})
        self.entries = [Registered(**entry) for entry in raw["participants"]]

    def save(self) -> None:
        write_json_atomic(self.path, {"participants": [asdict(entry) for entry in self.entries]})

    def find(self, name: str) -> Registered:
        for entry in self.entries:
            if entry.name == name:
                return entry
        known = ", ".join(entry.name for entry in self.entries) or "none yet"
        raise KeyError(f"no participant named {name!r} is registered (registered: {known})")

    def check_new(self, name: str, fingerprint: str) -> None:
        """Refuse a second registration of a name or of a key (ValueError naming the holder)."""
        if not name or any(c.isspace() for c in name):
            raise ValueError(f"participant name {name!r} must be non-empty without spaces")
        for entry in self.entries:
            if entry.name == name:
                raise ValueError(f"the name {name!r} is already registered (node {entry.node_id})")
            if entry.fingerprint == fingerprint:
                raise ValueError(f"this key is already registered as {entry.name!r}")

    def add(self, name: str, node_id: int, fingerprint: str) -> Registered:
        self.check_new(name, fingerprint)
        entry = Registered(name, int(node_id), fingerprint, time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        self.entries.append(entry)
        self.save()
        return entry

    def revoke(self, name: str, reason: str) -> Registered:
        return self._update(replace(self.find(name), revoked=f"{reason} ({time.strftime('%Y-%m-%dT%H:%M:%S%z')})"))

    def withdraw(self, name: str, reason: str, requested_by: dict[str, Any]) -> Registered:
        """Record that `name` left the consortium (revoke it as well: `coordinator.deploy.withdraw`)."""
        withdrawal = {"reason": reason, "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "requested_by": requested_by}
        return self._update(replace(self.find(name), withdrawal=withdrawal))

    def _update(self, entry: Registered) -> Registered:
        self.entries = [entry if e.name == entry.name else e for e in self.entries]
        self.save()
        return entry

    def name_of(self, node_id: int) -> str | None:
        return next((entry.name for entry in self.entries if entry.node_id == node_id), None)

    def roster(self) -> Roster:
        """The consortium roster: every participant not revoked, by name -> key fingerprint."""
        return Roster({entry.name: entry.fingerprint for entry in self.entries if not entry.revoked})

    def revoked(self) -> dict[str, str]:
        return {entry.name: entry.revoked for entry in self.entries if entry.revoked}
