"""Select: pick one level of a multi-level layer's output (so YAML rows can feed a fusion neck's levels to Detect)."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn


class Select(nn.Module):
    """``x[index]``; its output width is read from the producing layer, so it scales with the model like any row.

    Args:
        index: Level to pick (0 = finest).
    """

    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index

    @classmethod
    def yaml_build(cls, c_in: list[Any], args: list[Any], ctx: dict[str, Any]) -> tuple[list[Any], int]:
        """YAML ``[from, 1, Select, [index]]``; ``from`` must be a multi-output layer."""
        (src,) = c_in
        if not isinstance(src, list):
            raise ValueError(f"Select reads a multi-level layer (e.g. PSALM), but its input has a single width {src}")
        return [int(args[0])], src[int(args[0])]

    def forward(self, x: list[Tensor]) -> Tensor:
        """Level ``index`` of ``x``."""
        return x[self.index]

    def extra_repr(self) -> str:
        return f"index={self.index}"
