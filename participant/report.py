"""The participant's own log: one line per instruction it handles, for the site's IT to read.

    round 3: trained on 412 records, loss 0.532, 4.1 s, epsilon 1.20 so far
    round 3: evaluated on 103 records: loss 0.610, accuracy 0.740
    round 3: refused: hospital-a refuses a train request for round 3: policy.require_secagg: ...

A refusal is a decision, not a fault. `answered` turns the Refusal a handler raises into that one
line and into the error reply Flower itself sends for a raising ClientApp ("<class '...Refusal'>:
<'reason'>", which the coordinator reads as a refusal), without the traceback Flower would log.
participant/site.py has already appended it to the site's events.jsonl.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from flwr.app import Context, Error, Message
from flwr.common.constant import ErrorCode

from fedlora.logs import show_progress
from participant.site import Refusal

if TYPE_CHECKING:  # torch loads with the model stack, only in the handlers that evaluate
    from fedlora.evaluate import EvalResult

log = logging.getLogger("fedlora.participant")

Handler = Callable[[Message, Context], Message]


def answered(handler: Handler) -> Handler:
    """`handler` with its Refusal answered as one log line and an error reply."""

    @functools.wraps(handler)
    def handle(msg: Message, context: Context) -> Message:
        show_progress()  # a deployed ClientApp runs in a process Flower starts without logging
        try:
            return handler(msg, context)
        except Refusal as refusal:
            log.warning("%srefused: %s", round_prefix(msg), refusal)
            return Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, f"{type(refusal)}:<'{refusal}'>"), reply_to=msg)

    return handle


def round_prefix(msg: Message) -> str:
    """'round 3: ' for a message of round 3 (the coordinator's group id), '' when it names none."""
    return f"round {msg.metadata.group_id}: " if msg.metadata.group_id else ""


def trained(server_round: int, metrics: dict[str, Any], seconds: float) -> None:
    """The line of a train request this participant carried out (train_round's metrics)."""
    epsilon = metrics.get("local_epsilon")
    spent = f", epsilon {epsilon:.2f} so far" if epsilon is not None else ""  # sample-level, DP-SGD only
    loss = metrics["train_loss"]
    shown = f"{loss:.3f}" if math.isfinite(loss) else "n/a (DP-SGD's Poisson draws took no record)"
    log.info("round %d: trained on %d records, loss %s, %.1f s%s", server_round, metrics["num-examples"], shown, seconds, spent)


def evaluated(server_round: int, result: EvalResult) -> None:
    """The line of an evaluation of the global adapter on this participant's held-out records."""
    scored = "" if math.isnan(result.accuracy) else f", accuracy {result.accuracy:.3f}"  # NaN: free-form answers
    if result.generated:
        scored += f", {result.generated} answers generated: exact match {result.exact_match:.3f}, ROUGE-L {result.rouge_l:.3f}"
    log.info("round %d: evaluated on %d records: loss %.3f%s", server_round, result.examples, result.loss, scored)
