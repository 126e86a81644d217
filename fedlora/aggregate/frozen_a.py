"""`frozen-a` (FFA-LoRA; Sun et al., "Improving LoRA in Privacy-preserving Federated Learning", ICLR 2024).

Every lora_A is drawn from the run seed identically on every machine and frozen
(`fedlora.model.attach_lora`), so each layer's update is (alpha/r) B_i A with one shared A:
the mean of the B_i times A *is* the mean of the products. Aggregation is exact and linear,
so it composes with secure aggregation and noise, and only B (half the bytes) travels.
"""

from __future__ import annotations

from fedlora.aggregate.fedavg import FedAvgAggregator


class FrozenAAggregator(FedAvgAggregator):
    """FedAvg restricted to `layout.uploaded('frozen-a')`: lora_B and fully trained tensors."""

    mode = "frozen-a"
