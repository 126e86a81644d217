"""Reputation: participants whose updates keep being rejected stop being asked.

A participant rejected for a fault (an invalid or screened-out update, a protocol violation)
in `after` of its last `window` rounds is quarantined for the rest of the run; a timeout or a
crash is not a fault. Under secure aggregation a screened-out bucket counts against every
member: the coordinator cannot tell which member's update made the sum an outlier, so an
honest member of a bad bucket collects a fault too; buckets are reshuffled every round, so
only a participant that keeps landing in rejected buckets reaches the quarantine threshold.
The state is plain data (`state_dict`), so a checkpoint can carry it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


class Reputation:
    def __init__(self, after: int, window: int) -> None:
        if after < 0 or window < max(after, 1):
            raise ValueError(f"need 0 <= after <= window and window >= 1, got after={after}, window={window}")
        self.after, self.window = after, window
        self.history: dict[str, list[bool]] = {}  # name -> fault per round it took part in, latest last
        self.quarantined: dict[str, str] = {}  # name -> why

    def record(self, server_round: int, took_part: Iterable[str], faulty: Iterable[str]) -> list[str]:
        """Book one round; returns the participants quarantined by it."""
        faults = set(faulty)
        newly = []
        for name in sorted(set(took_part) | faults):
            history = (self.history.get(name, []) + [name in faults])[-self.window :]
            self.history[name] = history
            if self.after and name not in self.quarantined and sum(history) >= self.after:
                self.quarantined[name] = f"rejected for a fault in {sum(history)} of its last {len(history)} rounds (round {server_round})"
                newly.append(name)
        return newly

    def state_dict(self) -> dict[str, Any]:
        return {"history": {k: list(v) for k, v in self.history.items()}, "quarantined": dict(self.quarantined)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = {k: list(v) for k, v in state["history"].items()}
        self.quarantined = dict(state["quarantined"])
