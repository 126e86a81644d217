"""A deployed participant's directory: its own configuration, policy checks and local log.

`fedlora participant start DIR` passes DIR to the ClientApp as the node config key
`participant-dir`. Every instruction is then checked against DIR/participant.toml before
anything is trained or uploaded; a refusal (policy, malformed message, replay) is appended
to DIR/events.jsonl with its reason, so the site can see what it was asked and declined
(and logged as one line, participant/report.py).
Without the key (simulation) one configuration plays both parts, as before.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from fedlora.config import Config
from participant.local_config import effective_config, load_local_config, policy_violations

SITE_KEY = "participant-dir"
EVENTS = "events.jsonl"
ACCOUNTANT = "accountant.json"


class Refusal(RuntimeError):
    """An instruction this participant declines; the message names the rule and is the error reply."""


def site_of(node_config: dict[str, Any]) -> Path | None:
    value = node_config.get(SITE_KEY)
    return Path(str(value)) if value else None


def record_event(site: Path | None, event: str, **details: Any) -> None:
    """Append one line to the site's events.jsonl (the handler logs the refusal: participant/report.py)."""
    if site is not None:
        with (site / EVENTS).open("a") as handle:
            handle.write(json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "event": event, **details}) + "\n")


def refuse(site: Path | None, reason: str, **details: Any) -> Refusal:
    record_event(site, "refused", reason=reason, **details)
    return Refusal(reason)


def min_bucket_size(site: Path | None) -> int:
    """The site's policy.min_bucket_size (1 without a site: in simulation the run's bucket size decides)."""
    return 1 if site is None else load_local_config(site).policy.min_bucket_size


def site_config(site: Path | None, run: Config, server_round: int, what: str, evaluating: bool = False) -> Config:
    """The configuration this round runs with here; raises Refusal when the policy forbids it."""
    if site is None:
        return run
    local = load_local_config(site)
    violations = policy_violations(run, local, evaluating)
    if violations:
        raise refuse(site, f"{local.site.name or 'this participant'} refuses {what} for round {server_round}: " + "; ".join(violations), round=server_round)
    return effective_config(run, local)
