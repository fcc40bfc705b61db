"""The parameter-free similarity prior: cosine between every scene location and every prototype, per pyramid level.

DE-ViT (Zhang et al., "Detect Everything with Few Examples", 2023) and OWLv2's image-guided detection (Minderer et al.,
"Scaling Open-Vocabulary Object Detection", NeurIPS 2023) both start their class scores from the similarity of
frozen-backbone features to prototypes pooled from the same backbone. Computed on the trunk's own maps, the prior needs
no training: an untrained detector already scores like dense cosine matching, and training only adds to it.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def cosine_prior(feat: Tensor, protos: Tensor, eps: float = 1e-6) -> Tensor:
    """Cosine similarity of each location of ``feat`` to each class prototype.

    Args:
        feat: Scene map ``[B, D, H, W]``.
        protos: Prototypes of the same level and width, ``[B|1, N, M, D]`` (M tokens are averaged first).
        eps: Norm floor: an all-zero prototype (an empty episode slot) or location scores 0.

    Returns:
        ``[B, N, H*W]`` cosines in [-1, 1].
    """
    q = F.normalize(protos.mean(2), dim=-1, eps=eps)  # [B|1, N, D]
    f = F.normalize(feat.flatten(2), dim=1, eps=eps)  # [B, D, HW]
    return q.expand(f.shape[0], -1, -1) @ f  # [B, N, HW]
