"""The attention zoo: one kernel per file, one interface (:class:`SupportAttention`), chosen by name.

``build_attention("linear", dim=64, num_heads=4)``; CHEAF and PSALM take ``attn=<name>``.
"""

from __future__ import annotations

from .base import SupportAttention
from .cross_memory import CrossMemoryAttention
from .linear import EfficientLinearAttention
from .local_global import LocalGlobalAttention
from .performer import PerformerAttention
from .softmax import SoftmaxAttention
from .ssm import SelectiveSSM
from .strided import StridedAttention

ATTENTIONS: dict[str, type[SupportAttention]] = {
    cls.name: cls
    for cls in (
        EfficientLinearAttention,
        SoftmaxAttention,
        PerformerAttention,
        StridedAttention,
        LocalGlobalAttention,
        CrossMemoryAttention,
        SelectiveSSM,
    )
}


def build_attention(name: str, dim: int, num_heads: int = 4, **kwargs) -> SupportAttention:
    """Build the kernel registered as ``name``.

    Args:
        name: One of :data:`ATTENTIONS`.
        dim: Token width.
        num_heads: Requested heads; lowered to the largest divisor of ``dim`` not above it.
        **kwargs: Kernel-specific options (e.g. ``stride`` for strided, ``window`` for local_global).
    """
    if name not in ATTENTIONS:
        raise ValueError(f"unknown attention '{name}'; choose one of {', '.join(sorted(ATTENTIONS))}")
    heads = max(h for h in range(1, max(1, num_heads) + 1) if dim % h == 0)
    return ATTENTIONS[name](dim, heads, **kwargs)


__all__ = [
    "ATTENTIONS",
    "CrossMemoryAttention",
    "EfficientLinearAttention",
    "LocalGlobalAttention",
    "PerformerAttention",
    "SelectiveSSM",
    "SoftmaxAttention",
    "StridedAttention",
    "SupportAttention",
    "build_attention",
]
