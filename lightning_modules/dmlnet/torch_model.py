"""DMLNet's metric head: fixed class prototypes and the squared distances of pixel embeddings to them.

The embedding itself comes from the shared DeepLabV3+ (``lightning_modules.segmenter``), whose
1x1 classifier outputs ``D = K`` channels, upsampled to the input size: the reference DeepLabV3+
model does the same (its classifier's ``K`` outputs, upsampled, are the embedding).
"""

from __future__ import annotations

from torch import Tensor, nn

from lightning_modules.dmlnet.functional import fixed_prototypes, squared_distances

__all__ = ["PrototypeHead"]


class PrototypeHead(nn.Module):
    """Squared distances ``[B, K, H, W]`` of an embedding ``[B, K, H, W]`` to ``K`` fixed prototypes.

    The prototypes ``magnitude * I_K`` are a buffer, not a parameter: the reference code does not
    learn them. They are saved in checkpoints, so a checkpoint records the geometry it was trained
    with.
    """

    def __init__(self, num_classes: int, magnitude: float = 3.0) -> None:
        super().__init__()
        self.register_buffer("prototypes", fixed_prototypes(num_classes, magnitude))

    def forward(self, embedding: Tensor) -> Tensor:
        return squared_distances(embedding, self.prototypes)
