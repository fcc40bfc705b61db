"""Episodes: for each query image, which classes it is asked about and the prototypes it is given for them.

An episode for image i takes the base classes present in i, plus sampled absent base classes (negatives: "it is not
here"), up to ``n_way`` classes. Each (image, class) pair gets a prototype aggregated — exactly as at inference — from
K ~ U[1, k_max] cached embeddings of *other* instances of that class (never from image i itself), each from a random
augmented view. Labels are remapped from dataset class ids to the episode's class slots.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..references.aggregate import aggregate


@dataclass
class InstanceTable:
    """All instances of a split: their image, class, and cached per-level embeddings ``[views, M, D_l]``."""

    image: list[str]
    cls: list[int]
    embeddings: list[list[Tensor]]

    def __post_init__(self) -> None:
        self.by_class: dict[int, list[int]] = defaultdict(list)
        for j, c in enumerate(self.cls):
            self.by_class[c].append(j)

    @property
    def levels(self) -> int:
        return len(self.embeddings[0]) if self.embeddings else 0

    def candidates(self, c: int, exclude_image: str | None) -> list[int]:
        """Instances of class ``c`` outside ``exclude_image``."""
        return [j for j in self.by_class.get(c, []) if self.image[j] != exclude_image]

    def prototype(self, idx: Sequence[int], rng: np.random.Generator | None, method: str = "mean") -> list[Tensor]:
        """Aggregate the given instances (a random view each when ``rng`` is given, else view 0) -> per level [M, D]."""
        out = []
        views = [int(rng.integers(self.embeddings[j][0].shape[0])) if rng is not None else 0 for j in idx]
        for lv in range(self.levels):
            emb = torch.stack([self.embeddings[j][lv][v] for j, v in zip(idx, views)])  # [K, M, D]
            out.append(aggregate(emb, method))
        return out


class EpisodeSampler:
    """Builds training episodes from an :class:`InstanceTable` of base-class instances.

    Args:
        table: Base-class instances with cached embeddings.
        classes: Base class ids episodes may ask about.
        n_way: Classes per image (present + negatives).
        k_max: Maximum references per prototype (K is drawn from 1..k_max).
        hard_negatives: Fraction of negative slots filled with the absent class most similar (cosine of the class
            embedding centroids) to a class present in the image — look-alikes — instead of a random absent class.
        seed: Seed of the sampler's generator.
    """

    def __init__(
        self,
        table: InstanceTable,
        classes: Sequence[int],
        n_way: int = 4,
        k_max: int = 5,
        hard_negatives: float = 0.5,
        seed: int = 0,
    ):
        if n_way < 1 or k_max < 1 or not 0 <= hard_negatives <= 1:
            raise ValueError(
                f"need n_way >= 1, k_max >= 1 and 0 <= hard_negatives <= 1; got {n_way}, {k_max}, {hard_negatives}"
            )
        self.table, self.classes, self.n_way, self.k_max = table, list(classes), n_way, k_max
        self.hard = hard_negatives
        self.rng = np.random.default_rng(seed)
        self.similar = self._similarity()

    def _similarity(self) -> dict[int, list[int]]:
        """For each class, the other classes ordered from most to least similar (cosine of embedding centroids)."""
        cls = [c for c in self.classes if self.table.by_class.get(c)]
        if len(cls) < 2:
            return {c: [] for c in cls}
        cent = torch.stack(
            [
                torch.stack(
                    [
                        torch.cat([e.flatten() for e in (lv[0] for lv in self.table.embeddings[j])])
                        for j in self.table.by_class[c]
                    ]
                ).mean(0)
                for c in cls
            ]
        )
        cent = torch.nn.functional.normalize(cent, dim=1)
        sim = cent @ cent.T
        return {c: [cls[j] for j in sim[i].argsort(descending=True).tolist() if j != i] for i, c in enumerate(cls)}

    def sample(self, images: Sequence[str], present: Sequence[Sequence[int]]) -> tuple[list[Tensor], list[list[int]]]:
        """One episode per image.

        Args:
            images: The batch's image files.
            present: The class ids labelled in each image.

        Returns:
            Per-level prototypes ``[B, n_way, M, D_l]`` (slots without a class are zero and unlabelled) and, per
            image, the class id of each slot (-1: empty).
        """
        protos = [[] for _ in range(self.table.levels)]
        slots_all = []
        for im, pres in zip(images, present):
            usable = [c for c in dict.fromkeys(int(c) for c in pres) if self.table.candidates(c, im)]
            self.rng.shuffle(usable)
            slots = usable[: self.n_way]
            absent = [c for c in self.classes if c not in set(pres) and self.table.candidates(c, im)]
            while absent and len(slots) < self.n_way:
                hard = [c for p in slots for c in self.similar.get(p, [])[:1] if c in absent]
                pick = (
                    hard[0] if hard and self.rng.random() < self.hard else absent[int(self.rng.integers(len(absent)))]
                )
                slots.append(pick)
                absent.remove(pick)
            slots = [int(c) for c in slots] + [-1] * (self.n_way - len(slots))
            for c in slots:
                if c < 0:
                    p = [torch.zeros_like(lv_emb[0]) for lv_emb in self.table.embeddings[0]]
                else:
                    cand = self.table.candidates(c, im)
                    k = int(self.rng.integers(1, min(self.k_max, len(cand)) + 1))
                    p = self.table.prototype(self.rng.choice(cand, k, replace=False), self.rng)
                for lv in range(self.table.levels):
                    protos[lv].append(p[lv])
            slots_all.append(slots)
        b = len(images)
        return [torch.stack(p).view(b, self.n_way, *p[0].shape) for p in protos], slots_all


def remap_labels(batch_idx: Tensor, cls: Tensor, slots: list[list[int]]) -> tuple[Tensor, Tensor]:
    """Map dataset class ids to episode slots; boxes of classes outside their image's episode are dropped.

    Returns:
        ``keep`` mask over the boxes and the new class column (slot index) for the kept ones.
    """
    lookup = [{c: s for s, c in enumerate(sl) if c >= 0} for sl in slots]
    new = torch.full_like(cls.view(-1), -1)
    for j, (b, c) in enumerate(zip(batch_idx.view(-1).tolist(), cls.view(-1).tolist())):
        new[j] = lookup[int(b)].get(int(c), -1)
    keep = new >= 0
    return keep, new[keep].view(-1, 1).to(cls.dtype)
