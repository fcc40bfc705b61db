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
    """All instances of a split: their image, class, and either cached per-level embeddings ``[views, M, D_l]`` (frozen
    encoder) or the crops themselves (``crops [N, views, 3, S, S]`` uint8, ``masks`` likewise; trainable encoder)."""

    image: list[str]
    cls: list[int]
    embeddings: list[list[Tensor]] | None = None
    crops: Tensor | None = None
    masks: Tensor | None = None

    def __post_init__(self) -> None:
        self.by_class: dict[int, list[int]] = defaultdict(list)
        for j, c in enumerate(self.cls):
            self.by_class[c].append(j)

    @property
    def levels(self) -> int:
        return len(self.embeddings[0]) if self.embeddings else 0

    @property
    def n_views(self) -> int:
        return int(self.crops.shape[1]) if self.crops is not None else int(self.embeddings[0][0].shape[0])

    def subset(self, idx: Sequence[int]) -> InstanceTable:
        """The instances at ``idx``."""
        return InstanceTable(
            [self.image[i] for i in idx],
            [self.cls[i] for i in idx],
            None if self.embeddings is None else [self.embeddings[i] for i in idx],
            None if self.crops is None else self.crops[list(idx)],
            None if self.masks is None else self.masks[list(idx)],
        )

    def crop_batch(self, pairs: Sequence[tuple[int, int]]) -> tuple[Tensor, Tensor]:
        """Float crops ``[U, 3, S, S]`` and masks ``[U, 1, S, S]`` of (instance, view) pairs."""
        i = torch.tensor([p[0] for p in pairs])
        v = torch.tensor([p[1] for p in pairs])
        return self.crops[i, v].float() / 255, self.masks[i, v].float() / 255

    @torch.no_grad()
    def encoded(self, encoder, views: int = 1) -> InstanceTable:
        """This table with embeddings of its crops' first ``views`` views by ``encoder`` (e.g. the current weights of
        a trainable encoder, for validation)."""
        pairs = [(j, v) for j in range(len(self.cls)) for v in range(views)]
        crops, masks = self.crop_batch(pairs)
        was = encoder.training
        encoder.eval()
        levels = encoder.encode(crops, masks)
        encoder.train(was)
        emb = [[lv[j * views : (j + 1) * views] for lv in levels] for j in range(len(self.cls))]
        return InstanceTable(self.image, self.cls, emb, self.crops, self.masks)

    def candidates(self, c: int, exclude_image: str | None) -> list[int]:
        """Instances of class ``c`` outside ``exclude_image``."""
        return [j for j in self.by_class.get(c, []) if self.image[j] != exclude_image]

    def prototype(self, idx: Sequence[int], views: Sequence[int] | None = None, method: str = "mean") -> list[Tensor]:
        """Aggregate the cached embeddings of instances ``idx`` (``views``: one view each, default 0) -> per level
        ``[M, D]``."""
        out = []
        views = [0] * len(idx) if views is None else views
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
        if not any(table.by_class.get(c) for c in classes):  # every label file empty: nothing to draw references from
            raise ValueError(
                f"no labelled box of the trained classes {list(classes)} (ids in the data YAML) to draw references "
                "from: the training label files hold none (all empty?); label the images (one 'class x y w h' line "
                "per box in labels/<split>/<image>.txt)"
            )
        self.table, self.classes, self.n_way, self.k_max = table, list(classes), n_way, k_max
        self.hard = hard_negatives
        self.rng = np.random.default_rng(seed)
        self.similar = self._similarity()

    def _similarity(self) -> dict[int, list[int]]:
        """For each class, the other classes ordered from most to least similar (cosine of embedding centroids)."""
        cls = [c for c in self.classes if self.table.by_class.get(c)]
        if len(cls) < 2 or not self.table.embeddings:  # no cached embeddings (trainable encoder): random negatives
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

    def sample_refs(
        self, images: Sequence[str], present: Sequence[Sequence[int]]
    ) -> tuple[list[list[tuple[list[int], list[int]] | None]], list[list[int]]]:
        """Choose the episode of each image: its class slots and, per slot, the reference instances and their views.

        Returns:
            ``refs[b][s]`` = (instance indices, view indices) or None for an empty slot, and ``slots[b][s]`` = class id
            (-1: empty).
        """
        refs_all, slots_all = [], []
        for im, pres in zip(images, present):
            usable = [c for c in dict.fromkeys(int(c) for c in pres) if self.table.candidates(c, im)]
            self.rng.shuffle(usable)
            slots = usable[: self.n_way]
            absent = [c for c in self.classes if c not in set(pres) and self.table.candidates(c, im)]
            while absent and len(slots) < self.n_way:
                # the absent class nearest to a present one (look-alike), else a random absent class
                hard = [next((c for c in self.similar.get(p, []) if c in absent), None) for p in slots if p >= 0]
                hard = [c for c in hard if c is not None]
                if hard and self.rng.random() < self.hard:
                    pick = hard[int(self.rng.integers(len(hard)))]
                else:
                    pick = absent[int(self.rng.integers(len(absent)))]
                slots.append(pick)
                absent.remove(pick)
            slots = [int(c) for c in slots] + [-1] * (self.n_way - len(slots))
            refs = []
            for c in slots:
                if c < 0:
                    refs.append(None)
                    continue
                cand = self.table.candidates(c, im)
                k = int(self.rng.integers(1, min(self.k_max, len(cand)) + 1))
                idx = [int(j) for j in self.rng.choice(cand, k, replace=False)]
                refs.append((idx, [int(self.rng.integers(self.table.n_views)) for _ in idx]))
            refs_all.append(refs)
            slots_all.append(slots)
        return refs_all, slots_all

    def sample(self, images: Sequence[str], present: Sequence[Sequence[int]]) -> tuple[list[Tensor], list[list[int]]]:
        """One episode per image, with prototypes from the cached embeddings.

        Returns:
            Per-level prototypes ``[B, n_way, M, D_l]`` (empty slots are zero and unlabelled) and the slots' class ids.
        """
        refs, slots = self.sample_refs(images, present)
        zero = [torch.zeros_like(lv[0]) for lv in self.table.embeddings[0]]
        protos = [[self.table.prototype(*r) if r is not None else zero for r in img] for img in refs]
        return [
            torch.stack([torch.stack([p[lv] for p in img]) for img in protos]) for lv in range(self.table.levels)
        ], slots


def remap_labels(
    batch_idx: Tensor, cls: Tensor, slots: list[list[int]], keep_unasked: bool = False
) -> tuple[Tensor, Tensor]:
    """Map dataset class ids to episode slots.

    Args:
        batch_idx: Image index of each box ``[n]`` (or ``[n, 1]``).
        cls: Dataset class of each box.
        slots: Per image, the class id of each episode slot (-1: empty).
        keep_unasked: Keep the boxes of classes outside their image's episode, with slot -1 (a class-agnostic head
            learns objectness from them); by default they are dropped.

    Returns:
        ``keep`` mask over the boxes and the new class column (slot index, or -1) for the kept ones.
    """
    lookup = [{c: s for s, c in enumerate(sl) if c >= 0} for sl in slots]
    new = torch.full_like(cls.view(-1), -1)
    for j, (b, c) in enumerate(zip(batch_idx.view(-1).tolist(), cls.view(-1).tolist())):
        new[j] = lookup[int(b)].get(int(c), -1)
    keep = torch.ones_like(new, dtype=torch.bool) if keep_unasked else new >= 0
    return keep, new[keep].view(-1, 1).to(cls.dtype)
