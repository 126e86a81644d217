"""Pure aggregation functions over flat update vectors: LoRA-aware modes and server optimisers."""

from fedlora.aggregate.mean import weighted_mean
from fedlora.aggregate.registry import MODES, Aggregator, aggregator_for, make_aggregator
from fedlora.aggregate.server import SERVER_OPTIMIZERS, ServerOptimizer, make_server_optimizer
from fedlora.aggregate.step import Contribution, StepResult, aggregate_round, apply_mean
from fedlora.aggregate.units import Combined, Unit, combine_units, single_units, update_diagnostics

__all__ = [
    "MODES",
    "SERVER_OPTIMIZERS",
    "Aggregator",
    "Combined",
    "Contribution",
    "ServerOptimizer",
    "StepResult",
    "Unit",
    "aggregate_round",
    "aggregator_for",
    "apply_mean",
    "combine_units",
    "make_aggregator",
    "make_server_optimizer",
    "single_units",
    "update_diagnostics",
    "weighted_mean",
]
