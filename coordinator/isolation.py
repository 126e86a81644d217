"""Isolation: a set-aside bucket's members, each released alone with noise, so the cheater is named.

Under secure aggregation the screen sees bucket sums only: a member whose masked input is far
outside the clip bound makes its bucket's sum fail the screen, and the coordinator cannot tell
which member it was, so the honest members would go with it. Under distributed DP every member's
contribution is already protected by noise of std z C in the sum; with `secagg.isolation_rounds`
the coordinator asks each member of such a bucket for the input it masked, again, alone, with noise
of std z C of its own (participant/isolation.py), and screens each release as a unit of one (the
same noise-aware clip-bound screen, `fedlora.aggregate.screen`). A release that fails is blamed on
its sender by name; the others replace the bucket's sum as units of one, so the honest members are
still summed. A malformed release is blamed the same way; a member that refuses (its policy) or does not
answer is left out, not blamed.

What this costs and what it cannot do (docs/decisions.md, "Isolating a set-aside bucket"):
- the isolated members' updates are seen twice in the round (z / sqrt(2) in all): the accountant
  charges the first `isolation_rounds` rounds at that (fedlora/privacy/user_level.py) and this
  happens in at most that many rounds;
- a cheater that sends an honest-looking release is not blamed, but its bucket's sum, the only
  place its bad input was, is not combined either: it gained nothing that round;
- an input within the noise's reach passes both screens, as it passes the bucket's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict

from coordinator.gather import Gathered, Rejection, error_reason
from fedlora.aggregate import Unit
from fedlora.aggregate.screen import screen_units
from fedlora.wire import read_reply

MESSAGE_TYPE = "query.secagg_isolate"  # participant/isolation.py ACTION

Send = Callable[[list[int], RecordDict], dict[int, Message | None]]


def isolation_request(server_round: int) -> RecordDict:
    return RecordDict({"round": ConfigRecord({"server_round": server_round})})


def read_release(reply: Message | None, length: int) -> np.ndarray | str:
    """A member's isolated release, or why there is none (no reply, a refusal); a malformed release
    raises ValueError: an honest member never sends one, so it is its sender's fault, not a refusal."""
    if reply is None:
        return "no reply"
    if reply.has_error():
        return error_reason(reply.error.reason)
    try:
        vector, _ = read_reply(reply.content)
    except (KeyError, TypeError) as err:
        raise ValueError(f"malformed release (missing {err})") from None
    if vector is None or vector.shape != (length,):
        raise ValueError(f"a release of shape {None if vector is None else vector.shape}, expected ({length},)")
    return vector


def isolate_set_aside(
    gathered: Gathered, length: int, clip_norm: float, noise_std: float, send: Send, server_round: int,
) -> dict[str, float]:
    """Replace every bucket the clip-bound screen sets aside by its members' isolated releases (module docstring).

    `length`: the unit length; `noise_std`: z C, the noise of one release. Returns each member whose
    release arrived with the noise multiplier it came with (z), for the round's privacy charges; `gathered`
    is updated in place (units, included, skipped, blamed, and `secagg.isolated` in its row).
    """
    _, rejected = screen_units(gathered.units, length, 0.0, clip_norm)
    set_aside = {r.members: r.reason for r in rejected if len(r.members) > 1}
    if not set_aside:
        return {}
    node_of = {m.name: m.node for m in gathered.included}
    names = [name for members in set_aside for name in members if name in node_of]
    replies = send([node_of[name] for name in names], isolation_request(server_round))
    released: dict[str, np.ndarray] = {}
    left_out: dict[str, str] = {}
    malformed: dict[str, str] = {}
    for name in names:
        try:
            release = read_release(replies.get(node_of[name]), length)
        except ValueError as err:
            malformed[name] = str(err)
            continue
        if isinstance(release, str):
            left_out[name] = release
        else:
            released[name] = release
    singles = [Unit((name,), vector, 1.0, noise_std=noise_std) for name, vector in released.items()]
    summed, failed = screen_units(singles, length, 0.0, clip_norm)
    blamed = malformed | {r.members[0]: r.reason for r in failed}
    report: list[dict[str, Any]] = []
    for members, reason in set_aside.items():
        report.append({
            "members": list(members), "set_aside": reason,
            "summed": [u.members[0] for u in summed if u.members[0] in members],
            **({"blamed": {n: blamed[n] for n in members if n in blamed}} if set(members) & set(blamed) else {}),
            **({"not_released": {n: left_out[n] for n in members if n in left_out}} if set(members) & set(left_out) else {}),
        })
    out_of_sums = set(blamed) | set(left_out)
    gathered.units = [u for u in gathered.units if u.members not in set_aside] + summed
    gathered.included = [m for m in gathered.included if m.name not in out_of_sums]
    gathered.skipped += [Rejection(n, f"isolated release refused, blamed by name: {why}", fault=True) for n, why in sorted(blamed.items())]
    gathered.skipped += [Rejection(n, f"bucket set aside, and no isolated release: {why}") for n, why in sorted(left_out.items())]
    gathered.blamed += sorted(blamed)
    gathered.row.setdefault("secagg", {})["isolated"] = report
    return dict.fromkeys(released, noise_std / clip_norm)
