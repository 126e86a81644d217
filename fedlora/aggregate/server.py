"""Server optimisers: how the coordinator moves the global adapter along the round's mean update.

Reddi et al., "Adaptive Federated Optimization" (ICLR 2021), Algorithm 2: the mean of the
participants' updates is a pseudo-gradient Delta; the server keeps moments

    m <- beta1 m + (1 - beta1) Delta
    v <- beta2 v + (1 - beta2) Delta^2                          (FedAdam)
    v <- v - (1 - beta2) Delta^2 sign(v - Delta^2)              (FedYogi)
    x <- x + lr m / (sqrt(v) + tau)

with m = 0 and v = tau^2 before the first round and no bias correction, as in the paper
(Flower's FedAdam adds Kingma & Ba's bias correction; we do not). `fedavg` is x <- x + lr Delta.
Every optimiser's state is plain numbers and arrays (`state_dict`) that a checkpoint can store.

The adaptive optimisers' server learning rate is set by a rule unless given: the rate at which the
first applied round's step is exactly as long (RMS) as FedAvg's, i.e. the RMS of that round's mean
update over the RMS of lr = 1's step. Where updates are far above tau that is about the RMS of the
update itself (each coordinate moves by about lr (1 - beta1) / sqrt(1 - beta2) = lr at the default
betas); where tau dominates, as for small LoRA updates, the rule makes up for it. Later steps
lengthen where the updates agree and shorten where they do not. A fixed default cannot do that:
Reddi et al. tune lr over a grid per task, and an update's per-coordinate scale moves with
train.lr, local steps and the LoRA mode by orders of magnitude (a fixed 0.01 trailed FedAvg in
every scenario of docs/benchmarks.md, "Quality"). Under DP the rule sees the noised update only:
post-processing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

# Server learning rate when federation.server_lr is 0; 0 for the adaptive ones: the first round's update sets it.
DEFAULT_LR = {"fedavg": 1.0, "fedadam": 0.0, "fedyogi": 0.0}


class ServerOptimizer(Protocol):
    name: str

    def step(self, point: np.ndarray, delta: np.ndarray) -> np.ndarray: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class FedAvgServer:
    """Plain FedAvg: move by the mean update, scaled by the server learning rate."""

    lr: float = 1.0
    name: str = "fedavg"

    def step(self, point: np.ndarray, delta: np.ndarray) -> np.ndarray:
        _check(point, delta)
        return (point.astype(np.float64) + self.lr * delta.astype(np.float64)).astype(np.float32)

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "lr": self.lr}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.lr = float(state["lr"])


@dataclass
class FedAdam:
    lr: float = 0.0  # 0: set by the first non-zero mean update (module docstring)
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3
    m: np.ndarray | None = None
    v: np.ndarray | None = None
    steps: int = 0
    name: str = field(default="fedadam")

    def second_moment(self, v: np.ndarray, delta_sq: np.ndarray) -> np.ndarray:
        return self.beta2 * v + (1 - self.beta2) * delta_sq

    def step(self, point: np.ndarray, delta: np.ndarray) -> np.ndarray:
        _check(point, delta)
        delta = delta.astype(np.float64)
        if self.m is None or self.v is None:
            self.m = np.zeros_like(delta)
            self.v = np.full_like(delta, self.tau**2)
        if self.m.shape != delta.shape:
            raise ValueError(f"{self.name}: update has {delta.size} entries but the optimiser state has {self.m.size}")
        m = self.beta1 * self.m + (1 - self.beta1) * delta
        v = self.second_moment(self.v, delta**2)
        if self.lr == 0.0:  # the rule: this first step exactly as long (RMS) as FedAvg's
            unit_step = rms(m / (np.sqrt(v) + self.tau))
            self.lr = rms(delta) / unit_step if unit_step > 0 else 0.0
        self.m, self.v = m, v
        self.steps += 1
        return (point.astype(np.float64) + self.lr * self.m / (np.sqrt(self.v) + self.tau)).astype(np.float32)

    def state_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "lr": self.lr, "beta1": self.beta1, "beta2": self.beta2, "tau": self.tau,
            "m": self.m, "v": self.v, "steps": self.steps,
        }  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("name") != self.name:
            raise ValueError(f"state of server optimiser {state.get('name')!r} cannot be loaded into {self.name!r}")
        self.lr, self.beta1, self.beta2, self.tau = (float(state[k]) for k in ("lr", "beta1", "beta2", "tau"))
        self.m = None if state["m"] is None else np.asarray(state["m"], dtype=np.float64)
        self.v = None if state["v"] is None else np.asarray(state["v"], dtype=np.float64)
        self.steps = int(state["steps"])


@dataclass
class FedYogi(FedAdam):
    """FedAdam with Yogi's additive second moment (Zaheer et al. 2018): v grows or shrinks slowly."""

    name: str = field(default="fedyogi")

    def second_moment(self, v: np.ndarray, delta_sq: np.ndarray) -> np.ndarray:
        return v - (1 - self.beta2) * delta_sq * np.sign(v - delta_sq)


SERVER_OPTIMIZERS = {"fedavg": FedAvgServer, "fedadam": FedAdam, "fedyogi": FedYogi}


def make_server_optimizer(
    spec: str, lr: float = 0.0, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3
) -> ServerOptimizer:
    """Turn a name ('fedavg', 'fedadam', 'fedyogi') and hyper-parameters into an optimiser; lr 0 = default (for
    the adaptive ones: set from the first round's update)."""
    if spec not in SERVER_OPTIMIZERS:
        raise ValueError(f"server optimiser {spec!r} is not one of {', '.join(SERVER_OPTIMIZERS)}")
    if lr < 0:
        raise ValueError(f"server learning rate must be >= 0 (0 = default), got {lr}")
    lr = lr or DEFAULT_LR[spec]
    if spec == "fedavg":
        return FedAvgServer(lr=lr)
    if not (0 <= beta1 < 1 and 0 <= beta2 < 1):
        raise ValueError(f"server betas must be in [0, 1), got {beta1}, {beta2}")
    if tau <= 0:
        raise ValueError(f"server tau must be > 0, got {tau}")
    return SERVER_OPTIMIZERS[spec](lr=lr, beta1=beta1, beta2=beta2, tau=tau)


def rms(values: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(values, dtype=np.float64)))) if values.size else 0.0


def _check(point: np.ndarray, delta: np.ndarray) -> None:
    if point.shape != delta.shape:
        raise ValueError(f"server point {point.shape} and update {delta.shape} differ in shape")
