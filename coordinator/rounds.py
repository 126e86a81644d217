"""The coordinator's round loop, as named stages over Flower messages.

sample -> send global -> gather units (plaintext: simulated attacks, screen; secure: SecAgg+
per bucket) -> combine units -> server step -> evaluate -> write -> checkpoint. Plaintext and
secure rounds differ only in the gatherer; everything after it is one path (DESIGN.md, "The
round pipeline"). The math of each stage is a function in `fedlora/`; this file only sequences it.

Deployed (`deployment` = the coordinator directory), participants are named by their
registration (coordinator/participants.py) and the run resumes from its last checkpoint
(coordinator/checkpoint.py): Flower cannot resume a run, so `--resume` starts a new run that
continues from the last completed round, with ε, reputation and optimiser state as they were.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from coordinator.checkpoint import CHECKPOINT, VERSION_CHECKPOINTS, load_checkpoint, save_checkpoint
from coordinator.gather import Gathered, Member, Rejection, as_sent, error_reason, gather_plaintext, read_train_replies
from coordinator.isolation import MESSAGE_TYPE as ISOLATION_MESSAGE, isolate_set_aside
from coordinator.outcome import BUDGET, REFUSALS, read_outcome, refusal_stop
from coordinator.outputs import GENERATION_LABELS, Lineage, RunDirectory, generation_note, majority_note
from coordinator.participants import BOOK, ParticipantBook
from coordinator.secure import gather_secure, run_tag, seen_noise
from coordinator.withdrawal import honour_request, withdraw_from_run
from fedlora.adapter import AdapterLayout, adapter_vector
from fedlora.aggregate import StepResult, aggregator_for, apply_mean, combine_units, make_server_optimizer
from fedlora.aggregate.robust import make_rule, rule_after_screening
from fedlora.aggregate.screen import screen_units
from fedlora.aggregate.weights import score_average, unit_weights
from fedlora.attacks import Knowledge, attack_updates, choose_adversaries, resolve_attack
from fedlora.audit import read_records
from fedlora.config import Config, ModelSection
from fedlora.distill import PredictionBlock, split_upload
from fedlora.model import load_model, model_fingerprint
from fedlora.prompts import PromptFormat
from fedlora.privacy.ledger import combined_noise_multiplier
from fedlora.privacy.user_level import UserLevelDP
from fedlora.reputation import Reputation
from fedlora.secagg.plan import RunBinding
from fedlora.wire import adapter_sha256, instruction_content, read_reply, targets_sha256
from fedlora.withdrawal_request import MARK, request_in
from participant.runtime import label_names_for

log = logging.getLogger("fedlora.coordinator")

GENERATION_SCORES = tuple(GENERATION_LABELS.values())  # sent by participant/app.py for free-form answers only
# What a site's evaluation reply may show of itself (`site_claims`): the scores `averaged` reads, global and personalised.
SITE_SCORES = frozenset(
    key.replace("eval_", prefix, 1) for prefix in ("eval_", "eval_personal_") for key in ("eval_loss", "eval_accuracy", "eval_generated", *GENERATION_SCORES)
)
# ... and, after a fine-tune under DP-SGD, the sample-level epsilon it has spent (that fine-tune included).
SITE_CLAIMS = SITE_SCORES | {"local_epsilon"}


@dataclass
class GlobalAdapter:
    vector: np.ndarray
    layout: AdapterLayout
    peft_config: Any
    prompt_format: PromptFormat  # what every version's manifest says the adapter was trained in


def initial_adapter(cfg: Config) -> GlobalAdapter:
    """The round-0 adapter, drawn from the run seed exactly as every participant would."""
    loaded = load_model(cfg.model, cfg.lora, label_names_for(cfg), cfg.federation.seed)
    vector, layout = adapter_vector(loaded.model)
    return GlobalAdapter(vector, layout, loaded.model.peft_config["default"], loaded.prompt_format)


def checked_base_fingerprint(model: ModelSection) -> str:
    """This coordinator's own base model fingerprint, refused when it is not the one `model.sha256` states.

    The coordinator builds round 0 from its base and signs manifests certifying the hash: a
    different base would certify what no participant trains on.
    """
    actual = model_fingerprint(model.name)
    if model.sha256 and model.sha256 != actual:
        raise ValueError(
            f"model.sha256 states {model.sha256}, but this coordinator's base model {model.name!r} has fingerprint {actual}; "
            "install the base the run is for, or state this one (`fedlora model hash`) if every participant holds it"
        )
    return actual


def wait_for_nodes(grid: Grid, needed: int, timeout_s: float) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= needed or time.monotonic() > deadline:
            return nodes
        time.sleep(1.0)


def sample_nodes(nodes: list[int], cfg: Config, server_round: int) -> list[int]:
    fed = cfg.federation
    count = min(len(nodes), max(fed.min_participants, math.ceil(fed.fraction * len(nodes))))
    rng = np.random.default_rng([fed.seed, server_round])
    return [nodes[i] for i in sorted(rng.choice(len(nodes), size=count, replace=False))]


def evaluation_nodes(nodes: list[int], kept: list[int], count: int, seed: int) -> list[int]:
    """The nodes the global adapter is evaluated on: all of them, or `count` of them.

    The previous evaluation's nodes (`kept`) that are still here stay, and a seeded draw tops
    them up, so the same participants are evaluated every round and the curve compares like
    with like.
    """
    if count == 0 or len(nodes) <= count:
        return sorted(nodes)
    stay = [node for node in kept if node in nodes][:count]
    pool = sorted(set(nodes) - set(stay))
    # Indices, not the ids themselves: node ids are unsigned 64-bit, beyond numpy's int64.
    picked = np.random.default_rng([seed, 0xE7A1, len(stay)]).choice(len(pool), size=count - len(stay), replace=False)
    return sorted(stay + [pool[int(index)] for index in picked])


def exchange(grid: Grid, nodes: list[int], content: RecordDict, message_type: str, server_round: int, timeout_s: float) -> dict[int, Message | None]:
    """Send one message per node and collect replies; a node that did not answer maps to None.

    Every message carries the same `content` object: n copies of the global adapter would
    outweigh the round's uploads in the coordinator's memory (benchmarks/coordinator.py).

    A reply is taken only from the node the request went to and only in answer to it; anything
    else (a reply to another round's message, a second reply) is refused and logged.
    """
    messages = [Message(content, dst_node_id=node, message_type=message_type, group_id=str(server_round)) for node in nodes]
    received = list(grid.send_and_receive(messages, timeout=timeout_s))
    sent = {message.metadata.message_id: message.metadata.dst_node_id for message in messages}  # ids are set on sending
    replies: dict[int, Message] = {}
    for reply in received:
        node = reply.metadata.src_node_id
        if sent.get(reply.metadata.reply_to_message_id) != node or node in replies:
            log.warning("round %d: refused a %s reply from node %d that answers no open request of this round", server_round, message_type, node)
            continue
        replies[node] = reply
    return {node: replies.get(node) for node in nodes}


def site_claims(participant: str, metrics: dict[str, Any]) -> dict[str, Any]:
    """One site's evaluation as it reported it: its own split's scores, global and personalised, and its
    count. Shown per site (who gains from its personalised adapter), never averaged or acted on unchecked."""
    scores = {key: value for key, value in metrics.items() if key in SITE_CLAIMS and isinstance(value, (int, float))}
    return {"participant": participant, "examples": metrics.get("num-examples"), **scores}


def majority_accuracy(label_counts: list[Any], classes: int) -> dict[str, float]:
    """The held-out accuracy of always answering the commonest class, from the sites' label counts.

    The reference a learning curve must rise above; {} when any evaluated site sent no counts
    (free-form answers) or counts of the wrong shape (a site controls what it reports).
    """
    if not label_counts or any(not isinstance(c, list) or len(c) != len(label_counts[0]) for c in label_counts):
        return {}
    counts = np.asarray(label_counts, dtype=np.float64)  # sites x classes
    if (classes and counts.shape[1] != classes) or not np.all(np.isfinite(counts) & (counts >= 0)) or counts.sum() <= 0:
        return {}
    totals = counts.sum(axis=0)
    return {"majority_accuracy": float(totals.max() / totals.sum())}


class Coordinator:
    """Runs the configured rounds on a Grid and writes everything to a run directory."""

    def __init__(self, cfg: Config, run_dir: Path, deployment: Path | None = None, resume: bool = False) -> None:
        self.cfg = cfg
        self.config_toml = cfg.to_toml()
        self.deployment = Path(deployment) if deployment else None
        self.book = ParticipantBook(self.deployment / BOOK) if self.deployment else None
        self.base_sha256 = checked_base_fingerprint(cfg.model)
        self.out = RunDirectory(run_dir, cfg, self.deployment / "coordinator.key" if self.deployment else None, resume)
        self.adapter = initial_adapter(cfg)
        self.label_names = label_names_for(cfg)
        log.info("prompt format: %s%s", self.adapter.prompt_format.name, " with a system prompt" if cfg.model.system_prompt else "")
        # What an evaluation scores: accuracy over classes or few answers, generation quality over free-form ones.
        self.free_form = cfg.model.task == "generation" and not self.label_names
        self.names: dict[int, str] = {}
        self.completed = -1  # the last round whose adapter and checkpoint are written
        self.evaluated: list[int] = []  # the nodes of the last evaluation (federation.eval_participants)
        self.rows: list[dict[str, Any]] = []  # the rounds this process ran (a resumption starts afresh)
        sim = cfg.simulation
        self.adversaries = choose_adversaries(cfg.federation.participants, sim.adversaries, cfg.federation.seed) if sim.adversaries > 0 else []
        self.attack = resolve_attack(sim.attack) if self.adversaries else None
        fed = cfg.federation
        self.aggregator = aggregator_for(cfg)
        # The optimiser's state (plain arrays, `state_dict`) is what a checkpoint must keep.
        self.server_optimizer = make_server_optimizer(fed.server_optimizer, fed.server_lr, fed.server_beta1, fed.server_beta2, fed.server_tau)
        self.rule = make_rule(cfg.robust.rule)
        if warning := cfg.robustness_warning():
            log.warning("%s", warning)
        # [distillation]: every upload ends with a prediction block, summed with the adapter part (fedlora/distill.py).
        self.block = PredictionBlock.of(cfg, len(self.label_names)) if cfg.distillation.enabled else None
        self.soft_targets: np.ndarray | None = None  # the last applied round's mean predictions, sent with the next instruction
        # Length of an update in server coordinates (B·A products in exact mode): fixed by the layout, plus the block.
        self.server_length = self.adapter_length(self.aggregator.server_point(self.adapter.vector, self.adapter.layout).size) + self.block_size
        self.reputation = Reputation(cfg.robust.quarantine_after, cfg.robust.quarantine_window)
        self.dp = UserLevelDP(cfg) if cfg.privacy.noise_multiplier > 0 else None
        self.stage_seconds: dict[str, float] = {}  # the current round's, by stage (`timed`)
        if self.dp and self.dp.planned < fed.rounds:
            log.warning("privacy.epsilon_budget=%g allows %d of the %d planned rounds", cfg.privacy.epsilon_budget, self.dp.planned, fed.rounds)
        self.out.write_json("adversaries.json", {"attack": sim.attack if self.adversaries else None, "partition_ids": self.adversaries})
        if resume:
            self.restore(load_checkpoint(self.out.path / CHECKPOINT))

    def checkpoint(self, server_round: int) -> None:
        """Everything the next round depends on, written atomically once the round's adapter is out.

        Kept per version too (`checkpoints/<version>.npz`): a withdrawal rolls the head back to one.
        """
        state = {
            "round": server_round,
            "config_sha256": self.out.config_sha256,
            "adapter": self.adapter.vector,
            "server_optimizer": self.server_optimizer.state_dict(),
            "reputation": self.reputation.state_dict(),
            "privacy": self.dp.state_dict() if self.dp else None,
            "audit_last": self.out.audit.last,
            "soft_targets": self.soft_targets,
        }
        save_checkpoint(self.out.path / VERSION_CHECKPOINTS / f"{self.out.lineage.version(server_round)}.npz", state)
        save_checkpoint(self.out.path / CHECKPOINT, state)
        self.completed = server_round

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint of the same run configuration (ValueError otherwise)."""
        if state["config_sha256"] != self.out.config_sha256:
            raise ValueError(
                f"the checkpoint in {self.out.path} is of another configuration (sha256 {state['config_sha256'][:12]}…, "
                f"this one {self.out.config_sha256[:12]}…); resume with the run's own config.toml or start a new run"
            )
        check = np.asarray(state["adapter"], dtype=np.float32)
        if check.shape != self.adapter.vector.shape:
            raise ValueError(f"the checkpoint's adapter has {check.size} values, this configuration's {self.adapter.vector.size}")
        self.adapter.vector = check
        self.server_optimizer.load_state_dict(state["server_optimizer"])
        self.reputation.load_state_dict(state["reputation"])
        self.completed = int(state["round"])
        targets = state.get("soft_targets")
        self.soft_targets = None if targets is None else np.asarray(targets, dtype=np.float32)
        records = read_records(self.out.path / "audit.jsonl")
        hashes = [record["hash"] for record in records]
        if state["audit_last"] not in hashes:
            raise ValueError(f"{self.out.path / 'audit.jsonl'} lacks the records up to the checkpoint's round {self.completed} (truncated)")
        # A round cut short after its update was computed (its audit record is written after the
        # checkpoint's) released a result that its re-run releases again: both count. One cut short
        # before that released nothing. (A withdrawal's rollback checkpoints after its own record.)
        since = records[hashes.index(state["audit_last"]) + 1 :]
        cut = {r["round"]: r for r in since if r.get("event") == "round" and r["round"] > self.completed and r.get("applied")}
        released = sorted(cut)
        if self.dp:
            self.dp.load_state_dict(state["privacy"])
            for server_round in released:
                self.dp.spend(server_round, cut[server_round].get("seen_noise", {}))
        dropped = self.out.resume_at(self.completed, released if self.dp else [])
        log.info("resuming after round %d%s", self.completed, f" (round {dropped} was cut short and runs again)" if dropped else "")

    def name(self, node: int, metrics: dict[str, float] | None = None) -> str:
        if self.book:  # deployed: the name the operator registered for this authenticated node
            return self.book.name_of(node) or f"unregistered-node-{node}"
        if metrics and "partition_id" in metrics and metrics["partition_id"] >= 0:
            self.names[node] = f"participant-{int(metrics['partition_id'])}"
        return self.names.get(node, f"node-{node}")

    def _content(self, server_round: int) -> RecordDict:
        return instruction_content(self.adapter.vector, server_round, self.config_toml, self.soft_targets)

    @property
    def block_size(self) -> int:
        """Values of the prediction block at the end of every upload (0 without distillation)."""
        return self.block.size if self.block else 0

    def adapter_length(self, length: int) -> int:
        """The adapter part of an upload of the mode's `length`: none in prediction-only distillation."""
        return 0 if self.block and self.block.prediction_only else length

    def rank_of(self, member: Member) -> int:
        """The LoRA rank this participant trains (lora.participant_ranks by partition id, else lora.r)."""
        return self.cfg.lora.rank_for(int(member.metrics.get("partition_id", -1)))

    def upload_size(self, member: Member) -> int:
        """Expected length of a participant's upload; rejects one that trained the wrong rank."""
        rank = self.rank_of(member)
        reported = member.metrics.get("lora_r")
        if reported is not None and int(reported) != rank:
            raise ValueError(f"trained LoRA rank {int(reported)}, but the configuration gives it rank {rank}")
        return self.adapter_length(self.aggregator.upload_layout(self.adapter.layout, rank).size) + self.block_size

    def server_deltas(self, members: list[Member]) -> list[np.ndarray]:
        """Screened uploads in the aggregation mode's server coordinates (B·A products in exact mode), each
        followed by its prediction block as it came (distillation)."""
        parts = [split_upload(m.vector, self.block_size) for m in members]
        if self.block and self.block.prediction_only:
            return [np.asarray(block, dtype=np.float32) for _, block in parts]
        deltas = self.aggregator.server_deltas(self.adapter.vector, self.adapter.layout, [a for a, _ in parts], [self.rank_of(m) for m in members])
        return [np.concatenate([delta, block]).astype(np.float32) if self.block else delta for delta, (_, block) in zip(deltas, parts)]

    def weights(self, claims: list[int]) -> list[float]:
        """Aggregation weights from claimed example counts, bounded per robust.weighting."""
        return unit_weights(claims, self.cfg.robust.weighting, self.cfg.robust.weight_cap)

    def simulate_attacks(self, members: list[Member], server_round: int) -> list[Member]:
        """Replace malicious participants' updates and claims (simulation only); they see the honest
        updates and know the defence as configured."""
        if not self.attack:
            return members
        malicious = {f"participant-{pid}" for pid in self.adversaries}
        rng = np.random.default_rng([self.cfg.federation.seed, server_round, 0xBAD])
        return as_sent(members, attack_updates({m.name: m.vector for m in members}, malicious, self.attack, rng, Knowledge.of(self.cfg)))

    def evaluate(self, nodes: list[int], server_round: int) -> dict[str, Any]:
        eligible = [node for node in nodes if not self.excluded(self.name(node))]
        nodes = self.evaluated = evaluation_nodes(eligible, self.evaluated, self.cfg.federation.eval_participants, self.cfg.federation.seed)
        replies = exchange(grid=self.grid, nodes=nodes, content=self._content(server_round), message_type="evaluate", server_round=server_round, timeout_s=self.cfg.federation.timeout_s)
        reports = []  # (participant, metrics)
        for node, reply in replies.items():
            if reply is None or reply.has_error():
                log.warning("evaluation by %s: %s", self.name(node), "no reply (timeout)" if reply is None else error_reason(reply.error.reason))
                continue
            _, metrics = read_reply(reply.content)
            count = metrics.get("num-examples", 0)
            # A revoked participant's scores are refused too; one that evaluated nothing adds nothing.
            if not self.excluded(self.name(node, metrics)) and math.isfinite(count) and count > 0:
                reports.append((self.name(node), metrics))
        reports.sort(key=lambda report: report[1]["partition_id"])
        rows = [metrics for _, metrics in reports]
        if not rows:
            return {"eval_loss": float("nan"), "eval_accuracy": float("nan")}
        result: dict[str, Any] = self.averaged(reports, "eval_", server_round)
        if self.cfg.federation.personalization != "none":  # each site's personalisation of the same global adapter
            result |= self.averaged(reports, "eval_personal_", server_round)
        result["participant_evaluations"] = [site_claims(name, metrics) for name, metrics in reports]
        return result | majority_accuracy([m.get("eval_label_counts") for m in rows], len(self.cfg.data.label_names or []))

    def averaged(self, reports: list[tuple[str, dict[str, Any]]], prefix: str, server_round: int) -> dict[str, float]:
        """The reports' `<prefix>loss`, `<prefix>accuracy` and, for free-form answers, generation scores, averaged."""
        result = {  # weighed by claimed counts, as updates are, and each claim checked for range
            f"{prefix}loss": self.average_scores(reports, f"{prefix}loss", "num-examples", server_round, upper=math.inf),
            f"{prefix}accuracy": math.nan if self.free_form else self.average_scores(reports, f"{prefix}accuracy", "num-examples", server_round),
        }
        for key in GENERATION_SCORES if self.free_form else ():  # present when some site decoded any answers
            score = self.average_scores(reports, key.replace("eval_", prefix, 1), f"{prefix}generated", server_round)
            if math.isfinite(score):
                result[key.replace("eval_", prefix, 1)] = score
        return result

    def average_scores(
        self, reports: list[tuple[str, dict[str, Any]]], key: str, count_key: str, server_round: int, upper: float = 1.0
    ) -> float:
        """The (participant, metrics) reports' `key` values in [0, upper] weighted by their `count_key` counts
        (`score_average`: NaN when none is kept); a refused claim is logged."""
        scores, counts = [m.get(key, math.nan) for _, m in reports], [m.get(count_key, 0) for _, m in reports]
        average, refused = score_average(scores, counts, self.cfg.robust.weighting, self.cfg.robust.weight_cap, upper)
        for index in refused:
            log.warning(
                "round %d: refused %s=%r over %s=%r from %s: not a number in [0, %g] over a positive count",
                server_round, key, scores[index], count_key, counts[index], reports[index][0], upper,
            )
        return average

    @contextmanager
    def timed(self, stage: str) -> Iterator[None]:
        """Add the block's wall time to this round's `stage_seconds` (where a round's time goes)."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.stage_seconds[stage] = self.stage_seconds.get(stage, 0.0) + time.perf_counter() - started

    def run_round(self, server_round: int) -> dict[str, Any]:
        started = time.monotonic()
        self.stage_seconds = {}
        fed, sec = self.cfg.federation, self.cfg.secagg
        if self.book:  # registrations and revocations made since the last round take effect now
            self.book = ParticipantBook(self.book.path)
        nodes = wait_for_nodes(self.grid, fed.min_participants, fed.timeout_s)
        # Order by participant name, not by node id (random per run), so a seed fixes who is sampled.
        sampled = self.dp.sample(self.eligible(nodes)) if self.dp else sample_nodes(self.eligible(nodes), self.cfg, server_round)
        with self.timed("collect"):  # participants train; their replies arrive
            replies = exchange(self.grid, sampled, self._content(server_round), "train", server_round, fed.timeout_s)
        with self.timed("gather"):
            members, rejected = read_train_replies(replies, self.name, fed.timeout_s, with_vector=not sec.enabled)
            del replies  # the messages' copies of the updates: each update is now held once, by its member
        rejected = self.honour_withdrawal_requests(rejected)
        rejected += [Rejection(m.name, f"reply refused: {self.excluded(m.name)}") for m in members if self.excluded(m.name)]
        members = [m for m in members if not self.excluded(m.name)]  # a name may be learnt only from its reply
        if sec.enabled:  # updates stay with the participants until masked: summed per bucket
            length = self.adapter_length(self.aggregator.upload_layout(self.adapter.layout, self.cfg.lora.r).size) + self.block_size
            with self.timed("secure_sum"):  # the SecAgg+ stages: keys, shares, masked inputs, unmasking
                gathered = gather_secure(
                    self.grid, members, sec, server_round, length, run_tag(self.grid), self.cfg.robust.clip_norm, privacy=self.cfg.privacy,
                    binding=RunBinding(self.out.config_sha256, adapter_sha256(self.adapter.vector), targets_sha256(self.soft_targets)),  # what the train instructions carried
                    roster=self.book.roster() if self.book else None, weighting=(self.cfg.robust.weighting, self.cfg.robust.weight_cap),
                )
        else:
            with self.timed("gather"):
                gathered = gather_plaintext(self.simulate_attacks(members, server_round), self.upload_size, self.server_deltas, self.weights)
        gathered.skipped = rejected + gathered.skipped
        self.drop_excluded(gathered)
        released = self.isolate(gathered, server_round) if sec.enabled else {}
        # Accounted once gathered, applied or not; against the coordinator, at the noise it saw each update in.
        seen = (seen_noise(gathered.row["secagg"]["buckets"]) if sec.enabled else {m.name: 0.0 for m in members}) if self.dp else {}
        for name, alone in released.items():  # seen in its bucket's sum and alone
            seen[name] = combined_noise_multiplier(*(z for z in (seen.get(name), alone) if z is not None))
        spent = self.dp.spend(server_round, seen) if self.dp else {}
        row = self.apply(server_round, len(sampled), gathered) | spent
        faulty = {r.participant for r in gathered.skipped if r.fault} | set(gathered.blamed)
        quarantined = self.reputation.record(server_round, [self.name(n) for n in sampled], faulty)
        if quarantined:
            row["quarantined"] = {name: self.reputation.quarantined[name] for name in quarantined}
            log.warning("round %d: quarantined %s", server_round, ", ".join(quarantined))
        if server_round % fed.eval_every == 0 or server_round == fed.rounds:
            with self.timed("evaluate"):
                row.update(self.evaluate(nodes, server_round))
        row["stage_seconds"] = {stage: round(seconds, 4) for stage, seconds in self.stage_seconds.items()}
        row["seconds"] = round(time.monotonic() - started, 3)
        secagg = row.get("secagg", {})
        self.round_record = self.out.audit.append({
            "event": "round",
            "round": server_round,
            "sampled": [self.name(n) for n in sampled],
            "answered": [m.name for m in gathered.included],
            "buckets": [b["members"] for b in secagg.get("buckets", [])],
            # The secret that drew them (fedlora.secagg.buckets): `fedlora audit verify` recomputes them from it.
            **({"bucket_secret": secagg["bucket_secret"], "bucket_size": sec.bucket_size} if "bucket_secret" in secagg else {}),
            "skipped": row["skipped"],
            "applied": row.get("applied", False),
            "epsilon": row.get("epsilon"),
            "epsilon_coordinator": row.get("epsilon_coordinator"),
            "seen_noise": seen,  # who the coordinator saw in which sum: a resumption re-charges it
            # [distillation]: the soft targets this round produced, sent (and, under secure aggregation, bound) with the next
            **({"soft_targets_sha256": row["distillation"]["soft_targets_sha256"]} if "distillation" in row else {}),
            "adapter_sha256": hashlib.sha256(self.adapter.vector.tobytes()).hexdigest(),
            "version": self.out.lineage.version(server_round),  # whose lineage the answered contributed to
        })
        return row

    def eligible(self, nodes: list[int]) -> list[int]:
        """Nodes that may be sampled, in participant-name order: not revoked, not quarantined."""
        return [node for node in sorted(nodes, key=self.name) if not self.excluded(self.name(node))]

    def excluded(self, name: str) -> str:
        """Why `name` may not take part ('' if it may): withdrawn or revoked by the operator, or quarantined."""
        if name in self.out.lineage.withdrawn:
            return f"withdrawn: {self.out.lineage.withdrawn[name]}"
        if name in self.cfg.robust.revoked:
            return "revoked (robust.revoked)"
        revoked = self.book.revoked() if self.book else {}
        if name in revoked:
            return f"revoked by the operator: {revoked[name]}"
        if self.book and name.startswith("unregistered-node-"):
            return "not registered with this coordinator"
        return f"quarantined: {self.reputation.quarantined[name]}" if name in self.reputation.quarantined else ""

    def honour_withdrawal_requests(self, rejected: list[Rejection]) -> list[Rejection]:
        """Sites that refused because they withdrew: revoked at once if their signed request checks out.

        The rejections come back with the request itself cut from the reason (the audit log keeps it).
        """
        out = []
        for rejection in rejected:
            request = request_in(rejection.reason)
            if request is None:
                out.append(rejection)
                continue
            if self.book:
                done = honour_request(self.book, rejection.participant, request, self.out.audit)
                if done:
                    log.warning("%s", done)
            out.append(Rejection(rejection.participant, rejection.reason.split(MARK)[0] + "(signed withdrawal request attached)"))
        return out

    def withdraw_pending(self) -> None:
        """Withdrawals made while this run's round loop was going, applied now it has ended."""
        if not self.book:
            return
        for entry in ParticipantBook(self.book.path).entries:
            if entry.withdrawal and entry.name not in Lineage.load(self.out.path).withdrawn:
                try:
                    certificate = withdraw_from_run(self.out.path, entry.name, entry.withdrawal["reason"], self.out.signing_key, entry.withdrawal["requested_by"])
                except KeyError:  # never took part in this run
                    continue
                log.warning(
                    "%s withdrawn: versions %s marked, head rolled back to %s; re-train without it with --resume",
                    entry.name, ", ".join(certificate["withdrawn_versions"]) or "none", certificate["rolled_back_to"],
                )

    def drop_excluded(self, gathered: Gathered) -> None:
        """Units with a member revoked or withdrawn while the round ran are not combined.

        A withdrawal takes effect at once, the round in progress included; under secure
        aggregation the member's bucket goes with it (its sum cannot be split).
        """
        if self.book:
            self.book = ParticipantBook(self.book.path)
        why = {name: reason for unit in gathered.units for name in unit.members if (reason := self.excluded(name))}
        if not why:
            return
        dropped = {name for unit in gathered.units if set(unit.members) & set(why) for name in unit.members}
        gathered.units = [unit for unit in gathered.units if not set(unit.members) & set(why)]
        gathered.included = [m for m in gathered.included if m.name not in dropped]
        gathered.skipped += [
            Rejection(name, f"left out during the round: {why[name]}" if name in why else f"left out with its bucket: {', '.join(sorted(why))} left during the round")
            for name in sorted(dropped)
        ]

    def isolate(self, gathered: Gathered, server_round: int) -> dict[str, float]:
        """Under distributed DP with rounds of isolation left: a set-aside bucket's members released alone
        (coordinator/isolation.py); who was, at what noise multiplier."""
        clip_norm = self.cfg.norm_screens[1]
        if not (self.dp and self.dp.may_isolate() and clip_norm):
            return {}
        def send(nodes: list[int], content: RecordDict) -> dict[int, Message | None]:
            return exchange(self.grid, nodes, content, ISOLATION_MESSAGE, server_round, self.cfg.secagg.timeout_s)

        with self.timed("isolation"):
            released = isolate_set_aside(gathered, self.server_length, clip_norm, self.dp.noise_multiplier * clip_norm, send, server_round)
        if released:
            self.dp.isolations_used += 1
            gathered.row["secagg"]["isolation_rounds_used"] = self.dp.isolations_used
        return released

    def screen(self, gathered: Gathered) -> int:
        """Set aside units that cannot be combined (their members skipped with the reason); how many."""
        gathered.units, rejected = screen_units(gathered.units, self.server_length, *self.cfg.norm_screens)
        out = {name: f"screened out: {r.reason}" + (f" (bucket {', '.join(r.members)})" if len(r.members) > 1 else "") for r in rejected for name in r.members}
        gathered.included = [m for m in gathered.included if m.name not in out]
        gathered.skipped += [Rejection(name, reason, fault=True) for name, reason in out.items()]
        return len(rejected)

    def apply(self, server_round: int, sampled: int, gathered: Gathered) -> dict[str, Any]:
        """Combine the round's units, move the global adapter, and build the metrics row."""
        fed = self.cfg.federation
        with self.timed("screen"):
            screened = self.screen(gathered)
        rule, fallback = rule_after_screening(self.rule, len(gathered.units), screened)
        for rejection in gathered.skipped:
            log.warning("round %d: skipped %s: %s", server_round, rejection.participant, rejection.reason)
        row: dict[str, Any] = {
            "round": server_round,
            "sampled": sampled,
            "participants": len(gathered.included),
            "skipped": [{"participant": r.participant, "reason": r.reason} for r in gathered.skipped],
            "bytes_down": int(self.adapter.vector.nbytes * sampled) + gathered.bytes_down,
            "bytes_up": gathered.bytes_up,
            **gathered.row,
        }
        if fallback:
            row["robust_fallback"] = fallback
        if gathered.units and len(gathered.units) < rule.min_units():  # dropouts or screening left too few units
            gathered.aborted.append(f"{len(gathered.units)} units left, robust.rule {rule.name!r} needs {rule.min_units()}")
        if gathered.aborted:
            row["aborted"] = "; ".join(gathered.aborted)
        if len(gathered.included) < fed.min_participants or len(gathered.units) < rule.min_units():
            row["applied"] = False
            log.warning(
                "round %d: %d valid updates (< min_participants=%d); global adapter unchanged%s",
                server_round, len(gathered.included), fed.min_participants, f" ({row['aborted']})" if gathered.aborted else "",
            )
            return row
        if self.cfg.audit.keep_units:  # opt-in: individual updates on disk (docs/decisions.md, "Contribution audit")
            with self.timed("keep_units"):
                self.out.save_units(server_round, gathered.units, self.adapter.vector)
        with self.timed("noise" if self.dp else "rule"):  # DP's noisy mean, or the robust rule over the units
            combined = combine_units(gathered.units, rule, *((self.dp.noisy, self.dp.rng) if self.dp else ()))
        adapter_delta, block = split_upload(combined.delta, self.block_size)
        if self.block:  # the prediction part of the one aggregate: next round's soft targets
            trained_towards = self.soft_targets is not None  # this round's instruction carried targets (not round 1)
            self.soft_targets = self.block.targets_from(block)
            row["distillation"] = {
                "variant": self.cfg.distillation.variant, "soft_targets_sent": trained_towards, "prompts": self.block.prompts, "classes": self.block.classes,
                "block_size": self.block.size, "adapter_size": int(adapter_delta.size),
                "soft_targets_sha256": targets_sha256(self.soft_targets),
            }
        if self.block and self.block.prediction_only:  # no parameters were sent: the global adapter stays as it is
            step = StepResult(self.adapter.vector)
        else:
            with self.timed("server_step"):
                step = apply_mean(self.aggregator, self.server_optimizer, self.adapter.vector, self.adapter.layout, adapter_delta)
        row["update_norm"] = float(np.linalg.norm(step.vector - self.adapter.vector))
        self.adapter.vector = step.vector
        claims = {m.name: m.num_examples for m in gathered.included}
        for unit in combined.metrics.get("participant_updates", []):  # the claim beside the weight it was given
            unit["claimed_examples"] = claims.get(unit["participant"])
        row.update(combined.metrics)  # participant_updates / bucket_updates (norm, cosine), mean_error_bound
        row.update(step.metrics)  # svd_truncation_error in exact mode
        row["applied"] = True
        kept = gathered.included
        losses = [m for m in kept if "train_loss" in m.metrics]  # under DP the sites keep their losses to themselves
        if losses:  # claims, weighed as the updates are and refused when no loss could be that number
            reports = [(m.name, {"train_loss": m.metrics["train_loss"], "num-examples": m.num_examples}) for m in losses]
            row["train_loss"] = self.average_scores(reports, "train_loss", "num-examples", server_round, upper=math.inf)
        distilled = [m for m in kept if "distill_loss" in m.metrics]
        if distilled:  # the distillation term each site reported (none in round 1, none under DP)
            reports = [(m.name, {"distill_loss": m.metrics["distill_loss"], "num-examples": m.num_examples}) for m in distilled]
            row["distill_loss"] = self.average_scores(reports, "distill_loss", "num-examples", server_round, upper=math.inf)
        local = {m.name: m.metrics["local_epsilon"] for m in kept if "local_epsilon" in m.metrics}
        if local:  # each participant's own sample-level epsilon (DP-SGD), as it reported it
            row["local_epsilon"] = local
        return row

    def version_facts(self, row: dict[str, Any]) -> dict[str, Any]:
        """What an adapter version's signed manifest states besides its round and config (the consortium's
        terms in full: a consumer holding one version must not need the run's configuration to learn them)."""
        facts = {
            "base_model": self.cfg.model.name,
            "base_model_sha256": self.base_sha256,
            "terms": asdict(self.cfg.terms),
            "prompt_format": asdict(self.adapter.prompt_format),  # how `fedlora generate` must ask
            "label_names": self.label_names,  # the classes (or answer choices) it picks among
        }
        if "distillation" in row:  # the public prompts every party checked, and the soft targets this round made
            facts["distillation"] = {
                "variant": self.cfg.distillation.variant,
                "public_sha256": self.cfg.distillation.public_sha256,
                "soft_targets_sha256": row["distillation"]["soft_targets_sha256"],
            }
        if self.dp:  # who took part, how many, and un-noised losses are not released (docs/decisions.md)
            return facts | {"epsilon": row.get("epsilon"), "delta": row.get("delta"), "adjacency": "add/remove one participant"}
        return facts | {
            "participants": self.round_record["answered"] if row["round"] > 0 else [],
            "metrics": {key: row[key] for key in ("eval_loss", "eval_accuracy", *GENERATION_SCORES, "train_loss") if key in row},
        }

    def stop_reason(self) -> tuple[str, str]:
        """Why the next round must not run, and which kind of stop (outcome.BUDGET/REFUSALS); ('', '') if it may."""
        budget = self.dp.stop_reason() if self.dp else ""
        if budget:
            return budget, BUDGET
        refused = refusal_stop(self.rows)
        return (refused, REFUSALS) if refused else ("", "")

    def run(self, grid: Grid) -> list[dict[str, Any]]:
        self.grid = grid
        fed = self.cfg.federation
        if self.deployment:  # which process holds the round loop, for the operator (and a kill -9 test)
            (self.out.path / "coordinator.pid").write_text(f"{os.getpid()}\n")
        nodes = wait_for_nodes(grid, fed.min_participants, fed.timeout_s)
        if len(nodes) < fed.min_participants:
            raise RuntimeError(f"only {len(nodes)} participants connected within {fed.timeout_s:g} s; need federation.min_participants={fed.min_participants}")
        if self.completed >= 0 and not self.book:
            # Simulated sites are named by their evaluation replies; a resumed run has not heard them
            # yet, and must exclude the same names when sampling as the run it continues.
            self.evaluate(nodes, self.completed)
        if self.completed < 0:
            started = time.monotonic()
            baseline = {"round": 0, "participants": 0, "bytes_up": 0, "bytes_down": 0, **self.evaluate(nodes, 0)}
            baseline["seconds"] = round(time.monotonic() - started, 3)  # evaluating the untrained adapter
            self.out.append_metrics(baseline)
            log.info("round 0/%d: eval_loss %.4f eval_accuracy %.3f%s%s", fed.rounds, baseline["eval_loss"], baseline["eval_accuracy"], majority_note(baseline), generation_note(baseline))
            self.out.save_adapter(0, self.adapter.vector, self.adapter.layout, self.adapter.peft_config, self.version_facts(baseline))
            self.checkpoint(0)
        latest = self.out.version_dir(self.completed)
        applied = read_outcome(self.out.read_metrics(), fed.rounds).rounds_applied  # before a resumption
        for server_round in range(self.completed + 1, fed.rounds + 1):
            stop, stopped_by = self.stop_reason()
            if stop:
                log.error("stopping before round %d: %s", server_round, stop)
                self.out.append_metrics({"round": server_round, "stopped": stop, "stopped_by": stopped_by})
                self.out.audit.append({"event": "stopped", "round": server_round, "reason": stop, "stopped_by": stopped_by})
                break
            row = self.run_round(server_round)
            applied += bool(row.get("applied"))
            row["rounds_applied"] = applied
            self.out.append_metrics(row)
            self.rows.append(row)
            latest = self.out.save_adapter(server_round, self.adapter.vector, self.adapter.layout, self.adapter.peft_config, self.version_facts(row))
            self.checkpoint(server_round)
            log.info(
                "round %d/%d: %s, %d/%d participants, train_loss %s, eval_loss %s, eval_accuracy %s%s, %.1f s",
                server_round, fed.rounds, "applied" if row.get("applied") else "NOT applied", row["participants"], row["sampled"], *(
                    f"{row[key]:.4f}" if key in row else "-" for key in ("train_loss", "eval_loss", "eval_accuracy")
                ), generation_note(row), row["seconds"],
            )
        outcome = read_outcome(self.out.read_metrics(), fed.rounds)
        final = self.out.publish_final(latest) if outcome.rounds_applied else None
        self.out.audit.append({
            "event": "ended",
            "rounds_run": outcome.rounds_run,
            "rounds_applied": outcome.rounds_applied,
            "final": final.name if final else None,
            "adapter_sha256": hashlib.sha256(self.adapter.vector.tobytes()).hexdigest(),
        })
        (log.info if outcome.succeeded else log.error)("run ended: %s", outcome.summary())
        self.out.plot()
        self.withdraw_pending()
        return self.out.read_metrics()
