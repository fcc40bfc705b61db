"""Prototypes as model state: the tensor format, its validation, and the mixin of the modules that read it.

Format: one tensor per pyramid level, ``[B|1, N, M, D_l]`` — N reference classes, M tokens per class (1 for a pooled
prototype; more for e.g. CLS + mean-pooled patch tokens), D_l the encoder's width at that level, and a leading 1 when
every image of the batch uses the same references (inference) or B when each image has its own episode (training).
The detector sets them once (:meth:`FewShotDetectionModel.set_prototypes`) and binds them to its
:class:`PrototypeConsumer` layers for the duration of each forward; no caller passes them by hand.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


class PrototypeConsumer:
    """Mixin for layers that read the detector's prototypes; ``prototypes`` is None when there are none (bypass)."""

    prototypes: list[Tensor] | None = None

    @property
    def num_classes(self) -> int | None:
        """N, the number of reference classes currently bound, or None in bypass mode."""
        # a size, not int(): an exported graph keeps the class count symbolic (dynamic-references export)
        return None if self.prototypes is None else self.prototypes[0].shape[1]


def as_prototypes(protos: Tensor | Sequence[Tensor], dims: Sequence[int]) -> list[Tensor]:
    """Validate prototypes and bring them to the canonical ``[B|1, N, M, D_l]`` per-level format.

    Args:
        protos: One tensor per level, each ``[N, D]``, ``[N, M, D]`` or ``[B, N, M, D]``; or a single tensor of
            those shapes used at every level (only when all levels have the same width).
        dims: Expected width D_l per level (from the model YAML's ``proto_dims``, i.e. the encoder).

    Returns:
        List of ``len(dims)`` float tensors ``[B|1, N, M, D_l]``.

    Raises:
        ValueError: On a wrong level count, rank, width, class count mismatch, no class, or a non-finite value.
    """
    if isinstance(protos, Tensor):
        if len(set(dims)) != 1:
            raise ValueError(
                f"one prototype tensor given but the levels have different widths {list(dims)}; "
                "pass one tensor per level"
            )
        protos = [protos] * len(dims)
    protos = list(protos)
    if len(protos) != len(dims):
        raise ValueError(f"got prototypes for {len(protos)} levels, the model has {len(dims)} (widths {list(dims)})")
    out = []
    for i, (p, d) in enumerate(zip(protos, dims)):
        p = torch.as_tensor(p)
        if p.ndim == 2:
            p = p[None, :, None]
        elif p.ndim == 3:
            p = p[None]
        elif p.ndim != 4:
            raise ValueError(
                f"prototypes of level {i} have shape {tuple(p.shape)}; expected [N, D], [N, M, D] or [B, N, M, D]"
            )
        if p.shape[-1] != d:
            raise ValueError(
                f"prototypes of level {i} have width {p.shape[-1]}, the model expects {d}: they were "
                "made with another encoder; rebuild them with the model's encoder"
            )
        if p.shape[1] == 0 or p.shape[2] == 0:
            raise ValueError(f"prototypes of level {i} hold no class or no token (shape {tuple(p.shape)})")
        if not torch.isfinite(p).all():
            raise ValueError(f"prototypes of level {i} contain NaN or Inf")
        out.append(p.float())
    if len({(p.shape[0], p.shape[1]) for p in out}) != 1:
        raise ValueError(f"levels disagree on batch/class count: {[tuple(p.shape[:2]) for p in out]}")
    return out
