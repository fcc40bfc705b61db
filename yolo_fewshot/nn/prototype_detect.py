"""PrototypeDetect: class-agnostic boxes and objectness once per image, one normalised dot product per reference class.

The pattern of every reference detector that works: YOLOE's visual prompts (Wang et al., "YOLOE: Real-Time Seeing
Anything", 2025; ``BNContrastiveHead``: the box branch never sees the prompt, each class costs one dot product), OWLv2's
image-guided detection (class-agnostic box and objectness heads; a class score that is a cosine plus a learned shift and
scale) and DE-ViT (prototypes of the same frozen backbone that embeds the scene).

Per anchor ``a`` on level ``l`` and reference class ``c`` (prototype ``p_c``, the masked mean of the trunk's level-l map
over the reference):

* boxes and objectness: Ultralytics' ``Detect`` box branch (``cv2``) and a one-class score branch (``cv3``) on the neck
  maps — once per image, whatever the number of classes;
* similarity logit ``s_c(a) = alpha_l * cos(trunk_l(a), p_c) + beta_l * cos(g_c * e(a), W p_c) + b_l``: the
  parameter-free prior on the trunk's own map (:func:`~yolo_fewshot.nn.similarity.cosine_prior`) plus a learned
  embedding ``e`` of the neck map compared with the projected prototype, gated per class by PSALM's support modulation
  ``g_c = sigmoid(G p_c)`` (seed 001). ``G`` starts at zero (a uniform gate) and ``beta`` small against ``alpha``, so
  an untrained head ranks like dense cosine matching and training adds to it;
* class probability ``sigmoid(obj(a)) ** obj_power * sigmoid(s_c(a))`` in Ultralytics' ``[B, 4 + N, A]`` output.

A class's score never depends on which other classes are searched (tested): adding a reference costs one matrix
product per level and changes nothing else. Training teaches objectness from every labelled box (class-agnostic) and the
similarity from the episode's classes at the anchors assigned to objects (see
:class:`~yolo_fewshot.nn.loss.PrototypeDetectionLoss`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from ultralytics.nn.modules.conv import Conv, DWConv
from ultralytics.nn.modules.head import Detect

from .prototypes import PrototypeConsumer
from .similarity import cosine_prior


class PrototypeDetect(Detect, PrototypeConsumer):
    """Class-agnostic Ultralytics ``Detect`` plus per-class prototype similarity (see module docstring).

    Args:
        reg_max: DFL channels (Ultralytics').
        ch: Channels of the neck levels, then of the trunk levels the prototypes come from (same count, same strides).
        embed: Width of the learned similarity embedding.
        obj_power: Exponent of the objectness in the class probability (0: similarity only).
    """

    def __init__(self, reg_max: int = 16, ch: tuple[int, ...] = (), embed: int = 128, obj_power: float = 1.0) -> None:
        if len(ch) % 2 or not ch:
            raise ValueError(f"PrototypeDetect takes neck levels then as many trunk levels; got channels {list(ch)}")
        nl = len(ch) // 2
        super().__init__(1, reg_max, False, tuple(ch[:nl]))
        self.proto_dims = [int(c) for c in ch[nl:]]
        self.embed_dim, self.obj_power = int(embed), float(obj_power)
        # depthwise-separable like Ultralytics' own score branch: the embedding must stay cheap at the finest level
        self.cv4 = nn.ModuleList(
            nn.Sequential(
                nn.Sequential(DWConv(x, x, 3), Conv(x, embed, 1)),
                nn.Sequential(DWConv(embed, embed, 3), Conv(embed, embed, 1)),
                nn.Conv2d(embed, embed, 1),
            )
            for x in ch[:nl]
        )
        self.proto_proj = nn.ModuleList(nn.Linear(d, embed) for d in self.proto_dims)
        self.modulation = nn.ModuleList(nn.Linear(d, embed) for d in self.proto_dims)
        for m in self.modulation:  # gate sigmoid(0) = 0.5 everywhere: a uniform scale the cosine ignores
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)
        self.prior_scale = nn.Parameter(torch.full((nl,), 10.0))
        # The learned term starts small, not at zero: a zero scale would leave the embedding without gradient and the
        # scale without a signal (the cosine of an untrained embedding is uncorrelated with the targets) — measured:
        # both stayed at 0 over a whole epoch. At 5 the untrained term adds ~+-0.5 of noise (random 128-d cosines are
        # ~+-0.1) to a prior spanning +-10, so step 0 still ranks like dense cosine matching.
        self.embed_scale = nn.Parameter(torch.full((nl,), 5.0))
        self.sim_bias = nn.Parameter(torch.full((nl,), -5.0))  # prior cos 0.5 -> logit 0 at step 0

    @classmethod
    def yaml_build(cls, c_in: list[int], args: list[Any], ctx: dict[str, Any]) -> tuple[list[Any], int]:
        """YAML ``[[neck P3, P4, P5, trunk P3, P4, P5], 1, PrototypeDetect, [embed, obj_power]]``."""
        cls.legacy = ctx["legacy"]
        return [ctx["reg_max"], list(c_in), *args], 0  # a head has no output width

    # -- heads -----------------------------------------------------------------------------------------------------
    def forward_head(self, x: list[Tensor], box_head=None, cls_head=None) -> dict[str, Tensor]:
        """Raw predictions: ``boxes [B, 4R, A]``, ``obj [B, 1, A]``, ``sim [B, N, A]`` (None without prototypes),
        ``scores`` (= ``obj``: Ultralytics' assignment runs class-agnostically on it) and the neck ``feats``."""
        nl = self.nl
        preds = super().forward_head(x[:nl], box_head, cls_head)
        if not preds:
            return preds
        preds["obj"] = preds["scores"]
        preds["sim"] = None if self.prototypes is None else self.similarity(x[:nl], x[nl:])
        return preds

    def similarity(self, feats: list[Tensor], trunk: list[Tensor]) -> Tensor:
        """Similarity logits ``[B, N, A]`` of every anchor to every bound prototype (levels concatenated like the
        anchors)."""
        out = []
        for i, (f, t, p) in enumerate(zip(feats, trunk, self.prototypes)):
            prior = cosine_prior(t, p)  # [B, N, HW]
            e = self.cv4[i](f).flatten(2)  # [B, E, HW]
            pm = p.mean(2)  # [B|1, N, D]
            q = self.proto_proj[i](pm)  # [B|1, N, E]
            g = torch.sigmoid(self.modulation[i](pm))  # PSALM's support modulation, per class
            # cos(g*e, q) for all classes at once: numerator and the gated norm are both matrix products
            num = (g * q) @ e
            den = ((g * g) @ (e * e)).clamp_min(1e-12).sqrt() * q.norm(dim=-1, keepdim=True).clamp_min(1e-6)
            out.append(self.prior_scale[i] * prior + self.embed_scale[i] * (num / den) + self.sim_bias[i])
        return torch.cat(out, -1)

    # -- inference -------------------------------------------------------------------------------------------------
    def _inference(self, x: dict[str, Tensor]) -> Tensor:
        """``[B, 4 + N, A]``: decoded boxes and per-class probabilities (objectness alone without prototypes)."""
        dbox = self._get_decode_boxes(x)
        return torch.cat((dbox, class_probabilities(x["obj"], x.get("sim"), self.obj_power)), 1)


def class_probabilities(obj: Tensor, sim: Tensor | None, obj_power: float = 1.0) -> Tensor:
    """``sigmoid(obj) ** obj_power * sigmoid(sim)`` -> ``[B, N, A]`` (``sigmoid(obj)`` alone when ``sim`` is None)."""
    if sim is None:
        return obj.sigmoid()
    return F.logsigmoid(obj).mul(obj_power).add(F.logsigmoid(sim)).exp()
