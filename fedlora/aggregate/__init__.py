"""Pure aggregation functions over flat update vectors."""

from fedlora.aggregate.mean import weighted_mean

__all__ = ["weighted_mean"]
