"""Pure aggregation functions over flat update vectors: LoRA-aware modes and server optimisers."""

from fedlora.aggregate.mean import weighted_mean
from fedlora.aggregate.registry import MODES, Aggregator, make_aggregator
from fedlora.aggregate.server import SERVER_OPTIMIZERS, ServerOptimizer, make_server_optimizer
from fedlora.aggregate.step import Contribution, StepResult, aggregate_round, apply_mean, update_diagnostics

__all__ = [
    "MODES",
    "SERVER_OPTIMIZERS",
    "Aggregator",
    "Contribution",
    "ServerOptimizer",
    "StepResult",
    "aggregate_round",
    "apply_mean",
    "make_aggregator",
    "make_server_optimizer",
    "update_diagnostics",
    "weighted_mean",
]
