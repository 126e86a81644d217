"""A deployed site's own privacy ledger: what it contributed, across runs and restarts (DESIGN decision 9).

DIR/ledger.json (`fedlora.privacy.ledger.Ledger`, replaced atomically) holds one entry per
contribution, keyed so that a retried message charges nothing twice:

- plaintext round: `run-<run id>/config-<configuration sha256>/round-<r>`, charged once trained, before the update is sent;
  against the coordinator the update is seen in the clear (noise multiplier 0);
- secure round: `config-<configuration sha256>/round-<r>`, the run round the site masks at most one
  input for, ever (participant/masked.py), charged at mask_input before the masked input leaves.
  Never the instance id: the coordinator names it, and could reuse one id in every run. Against
  the coordinator the site assumes the fewest masked inputs the protocol can unmask, the threshold
  t: z sqrt(t / (k (1 - m))); at unmask, told which neighbours' inputs arrived, it raises that to
  what they imply (never lowers it).

Against consumers every contribution is charged at the run's (q, z): amplification and the
discarding of under-noised sums are the coordinator's to keep, as its sampling is. A site cannot
check either; `policy.max_epsilon_coordinator` bounds the view that needs no trust.
Before each round the site refuses (events.jsonl) what would pass its `policy.max_epsilon`
(consumers) or `policy.max_epsilon_coordinator`. Each contribution is also recorded in events.jsonl
when it is charged (`record_contribution`): the ledger keeps what it cost, the event where it went.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedlora.atomic import read_json, write_json_atomic
from fedlora.privacy.ledger import Charge, Ledger
from participant.local_config import PolicySection, load_local_config
from participant.site import CONTRIBUTED_EVENT, record_activity, refuse

LEDGER = "ledger.json"


def load_ledger(site: Path, delta: float) -> Ledger:
    """The site's ledger (empty if none yet); a ledger at another delta is refused, not mixed."""
    ledger = Ledger(delta)
    path = Path(site) / LEDGER
    if path.is_file():
        ledger.load_state_dict(read_json(path))
        if ledger.delta != delta:
            raise ValueError(f"{path} states epsilon at delta {ledger.delta:g}, but policy.delta is {delta:g}; restore policy.delta")
    return ledger


def policy_of(site: Path) -> PolicySection:
    return load_local_config(site).policy


def check_charge(site: Path, charge: Charge, what: str, **details: Any) -> None:
    """Raise a logged Refusal when `charge` would take the ledger past the site's limits."""
    policy = policy_of(site)
    consumers, coordinator = load_ledger(site, policy.delta).epsilons(charge)
    passed = {
        rule: f"{rule}={limit:g}: epsilon against {view} would reach {value:.4g}"
        for rule, view, limit, value in (
            ("policy.max_epsilon", "adapter consumers", policy.max_epsilon, consumers),
            ("policy.max_epsilon_coordinator", "the coordinator", policy.max_epsilon_coordinator, coordinator),
        )
        if 0 < limit < value
    }
    if passed:
        raise refuse(site, f"refused {what}: this site's privacy ledger ({LEDGER}) is at its limit: " + "; ".join(passed.values()), list(passed), **details)


def record_charge(site: Path, key: str, charge: Charge, raise_only: bool = False, costlier: bool = False) -> None:
    """Charge one contribution (nothing if `key` is charged already; see `Ledger.charge` for the two
    ways to replace a charge), written before the contribution leaves."""
    policy = policy_of(site)
    ledger = load_ledger(site, policy.delta)
    if ledger.charge(key, charge, raise_only=raise_only, costlier=costlier):
        write_json_atomic(Path(site) / LEDGER, ledger.state_dict())


def charged(site: Path, key: str) -> Charge | None:
    """What the ledger holds for contribution `key` (None if nothing yet)."""
    return load_ledger(site, policy_of(site).delta).entries.get(key)


def record_contribution(
    site: Path, key: str, charge: Charge, run_id: int, config_sha256: str, server_round: int, trained_from: str, sent_bytes: int,
    **details: Any,
) -> None:
    """Charge a contribution and record it in events.jsonl (CONTRIBUTED_EVENT), both before it leaves: which run
    and round it went to, the global adapter it was trained from, and how many payload bytes it sends."""
    record_charge(site, key, charge)
    record_activity(site, CONTRIBUTED_EVENT, run_id, config_sha256, server_round, contribution=key, trained_from=trained_from, bytes=sent_bytes, **details)


def site_status(site: Path) -> dict[str, Any]:
    """The ledger as `fedlora participant status` reports it."""
    policy = policy_of(site)
    ledger = load_ledger(site, policy.delta)
    consumers, coordinator = ledger.epsilons()
    return {
        "contributions": len(ledger.entries),
        "delta": ledger.delta,
        "epsilon": consumers,
        "epsilon_coordinator": coordinator,
        "max_epsilon": policy.max_epsilon,
        "max_epsilon_coordinator": policy.max_epsilon_coordinator,
    }

