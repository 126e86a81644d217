"""What the modes that send a sub-vector of the trained adapter share (every mode but `sb`)."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from fedlora.adapter import AdapterLayout


class SubVectorUploads:
    """A participant trains the adapter's own tensors and sends the delta of those its mode uploads."""

    def upload_layout(self, layout: AdapterLayout, rank: int) -> AdapterLayout:
        raise NotImplementedError

    def encode_upload(self, delta: np.ndarray, own_layout: AdapterLayout, global_layout: AdapterLayout, rank: int) -> np.ndarray:
        """The upload: the trained delta's entries that `upload_layout` names."""
        return own_layout.take(delta, self.upload_layout(global_layout, rank))

    def training(self, model: Any) -> AbstractContextManager[None]:
        """Nothing to set up around local training: the model's trainable tensors are the mode's."""
        return nullcontext()
