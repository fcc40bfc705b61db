"""CropVerifier: re-score the best candidate boxes by encoding their crops with the trunk and comparing with the
prototypes.

The second stage of two-stage matching detectors (DE-ViT re-classifies proposals from the same frozen backbone; the
one-shot trackers' verification re-encodes the candidate). A box pooled from the one-pass scene map mixes its
surroundings into it; re-encoding the crop alone, the way the reference itself was encoded, ranks a target's own
reference first among the objects of its scene 95 % of the time on the benchmark, against 83 % from the one-pass map
(probe in issue 11). The cost is one trunk pass over ``topk`` small crops per image, so it is optional and measured
(docs/benchmark.md).

Where the candidates come from (``proposals``, sources joined by ``+``):

* ``head``: the head's own best anchors (class-agnostic NMS on the best class score, which is objectness times the
  reference similarity: reference-driven proposals);
* ``centernet``: the class-agnostic boxes of the ported COCO CenterNet (:mod:`yolo_fewshot.nn.centernet`; objectness =
  max over its 80 class heatmaps), run on the model input resized to 512 — objectness learned on real photographs,
  where a head trained on pasted stamps proposes badly (DESIGN.md, "Real-photo objectness");
* ``keypoints``: each class's reference box projected into the scene through a SIFT + RANSAC homography
  (:mod:`yolo_fewshot.nn.keypoint_match`; objectness ``n / (n + keypoint_inliers)`` of its ``n`` inliers) —
  reference-driven, for the same instance seen again (a poster, a product, a building), whatever its class;
* ``both`` (category search's default; instance search's adds ``keypoints``) is ``head+centernet``: CenterNet's
  boxes and the head's few best, but not a head box that is a part of an object CenterNet is sure of
  (:attr:`CropVerifier.part`); e.g. ``centernet+keypoints`` unites COCO objectness with keypoint matches, every
  candidate scored by the same verification (objects outside COCO's classes still come from the head or keypoints).

Category search (``top1=False``) also compares each candidate in a second embedding, the COCO CenterNet's
(:mod:`~yolo_fewshot.nn.coco_embedding`, :attr:`CropVerifier.coco`), and weights CenterNet's boxes by the head's
objectness as far as the head recognises the image's objects (:attr:`CropVerifier.head_trust`).

CenterNet boxes are appended to Ultralytics' ``[B, 4 + N, A]`` output as ``centernet_topk`` extra anchor columns, then
the keypoint boxes as one column per class (``[B, 4 + N, A + E]``, :meth:`CropVerifier.extra_columns`), so
Ultralytics' NMS, validator and predictor take them unchanged. The CenterNet network is loaded once per device into a
module-level cache (:func:`centernet`), never into the detector: it is not part of any ``state_dict`` or checkpoint
pickle (it ships as its own safetensors), and an export (which never verifies) has none. Keypoints are the references'
(:class:`~yolo_fewshot.nn.keypoint_match.KeypointTemplate`, set with them), not the model's weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import batched_nms, box_iou, nms, roi_align

from ..encoders.base import masked_mean
from .coco_embedding import coco_embed
from .colour import UNRELATED as COLOUR_UNRELATED
from .colour import colour_histograms, colour_similarity
from .hubness import bank_similarity, hubness_offset, whiten_bank
from .keypoint_match import KeypointTemplate, keypoint_boxes
from .keypoint_votes import crop_descriptors, keypoint_votes
from .layout import layout_similarity
from .whitening import Whitening

# a frame whose pixels' channels differ by no more than this on average is grey (colour comparison skipped): an
# infrared or monochrome frame, even saved as a colour JPEG (a grey photo re-encoded so: 0.0; four of the real-photo
# set's scenes: 0.0); colour scenes average more (the demo's 40: 0.02-0.35, median 0.23; a photo fogged 75 %: 0.06)
GREY_TOLERANCE = 0.01
PROPOSALS = ("head", "centernet", "keypoints")  # the sources; a setting joins them with "+" ("both": head+centernet)
INSTANCE_PROPOSALS = "head+centernet+keypoints"  # instance search's default sources (CropVerifier.proposals)
# instance search in a model's whitening: crops at the side references are encoded at (CropVerifier.size), and the
# calibration power (CropVerifier.gamma) fitted on fold 0's instance protocol with it and keypoint candidates: its best
# threshold at <= 0.2 false positives per scene maps to 0.25
WHITENED_SIZE = 224
WHITENED_GAMMA = 0.47
CATEGORY_SIZE = 128  # the crop side otherwise (category search; a model without whitening), and the COCO embeddings'
_CENTERNET: dict[str, object] = {}  # device -> the CenterNet network, loaded on first use
_WORKER: list[ThreadPoolExecutor] = []  # one thread: CenterNet's pass runs beside the detector's own forward
_WHITENED: list[tuple] = []  # the last model's (whitening, bank, Whitening, whitened bank): made once, not per frame


def whitened_statistics(
    white: dict[str, Tensor], bank: dict[str, Tensor] | None
) -> tuple[Whitening, dict[str, Tensor] | None]:
    """The model's whitening (:class:`~yolo_fewshot.nn.whitening.Whitening`) and its hubness ``bank`` whitened
    (:func:`~yolo_fewshot.nn.hubness.whiten_bank`), cached for the last model's statistics (the same dict objects)
    so that a video's frames do not whiten 1 024 bank objects each."""
    if _WHITENED and _WHITENED[0][0] is white and _WHITENED[0][1] is bank:
        return _WHITENED[0][2], _WHITENED[0][3]
    wt = Whitening(white)
    wb = whiten_bank(bank, wt) if bank else None
    _WHITENED[:] = [(white, bank, wt, wb)]
    return wt, wb


def centernet(device: torch.device | str = "cpu"):
    """The shipped COCO CenterNet (:class:`~yolo_fewshot.nn.centernet.CenterNet`, sha256-checked, eval), loaded once
    per device and cached here, outside every model: never saved with a checkpoint."""
    key = str(torch.device(device))
    if key not in _CENTERNET:
        from .centernet import CenterNet

        _CENTERNET[key] = CenterNet.from_file().to(device).eval()
    return _CENTERNET[key]


def proposal_sources(value: str) -> frozenset[str]:
    """The candidate sources a ``proposals`` setting names (``"centernet+keypoints"``; ``"both"``: head and
    CenterNet); a one-line ValueError for anything else."""
    names = ["head", "centernet"] if value == "both" else str(value).split("+")
    if (
        not isinstance(value, str)
        or not names
        or any(n not in PROPOSALS for n in names)
        or len(set(names)) < len(names)
    ):
        raise ValueError(
            f"proposals={value!r} must be one of head, centernet, keypoints or several joined by '+' "
            "(e.g. centernet+keypoints; both = head+centernet)"
        )
    return frozenset(names)


# the verifier's weights a run may set (predict, track, val, CLI), with their defaults for the one-line error
RUN_WEIGHTS: dict[str, str] = {
    "hubness": "default 0.5 for instance search",
    "colour": "default 0.15 for instance search",
}


def check_weight(key: str, value: object) -> float:
    """A run setting's verifier weight (:data:`RUN_WEIGHTS`: :attr:`CropVerifier.hubness`, :attr:`CropVerifier.colour`)
    as a float in [0, 2]; one-line ``ValueError`` for anything else."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 2:
        raise ValueError(f"{key}={value!r} must be a number in [0, 2] (0: off; {RUN_WEIGHTS[key]})")
    return float(value)


def check_proposals(value: str) -> str:
    """``value`` if it names proposal sources (:func:`proposal_sources`), else a one-line ValueError."""
    proposal_sources(value)
    return value


@dataclass
class CropVerifier:
    """Settings and the re-scoring step of crop verification.

    What each default was measured against, and the values tried: docs/verifier.md. "Instance search" is ``top1=True``
    (the default), "category search" ``top1=False``; None means the default of the search.

    Attributes:
        topk: Head candidates per image (after a class-agnostic NMS on the head's best class score). None: 10 when the
            head is the only source, 3 beside CenterNet's boxes — its few best add what COCO's objectness misses
            without flooding the candidates.
        size: Crop side fed to the trunk (pixels). None: :data:`WHITENED_SIZE` (224, the references' side) when the
            descriptors are compared in the model's whitening (fitted on crops of that side), else
            :data:`CATEGORY_SIZE` (128).
        context: Context around each box, as a fraction of its longer side on each side (references use 0.1).
        iou: IoU of the candidate NMS (head candidates; CenterNet candidates among themselves).
        obj_power: Exponent of the objectness (the head's, or CenterNet's for its boxes) in the verified score. None:
            0.5 for instance search, 1 for category search, where a broad class's cosine says less and whether a box
            is an object says more.
        sim_power: Exponent of the crop cosine (clamped at 0) in the verified score.
        top1: Classes compete for a candidate (an object is one thing): each class's score is multiplied by
            ``sigmoid((cos_c - best other cos) / margin)``. Right when the references are instances (their look-alikes
            are references too); off for category search, where a broad class's averaged prototype is often nearer a
            new member than its own class's.
        margin: Softness of that competition (cosine units); 0 keeps only the best class (a hard top-1).
        gamma: Calibration: the verified score ``cos^sim_power * obj^obj_power * competition`` is raised to this power
            (monotone: rankings do not change) so that Ultralytics' default ``conf=0.25`` is a working point. None:
            :data:`WHITENED_GAMMA` (0.47) when the descriptors are compared whitened, else 0.5 (fitted so that the
            best threshold at <= 0.2 false positives per scene on fold 0's instance scenes maps to 0.25).
        levels: How many of the prototypes' levels (the last ones: P5, then P4, P3) the crop is compared on (the mean
            of their cosines). None: 3 for instance search (lower levels keep the colour and texture that tell an
            instance from its look-alikes), 1 for category search (a category's members differ in exactly those).
        layout: The share of layout in the similarity (0-1): the crop's 2x2 grid of masked means
            (:mod:`~yolo_fewshot.nn.layout`) against the references' and their mirror images', mixed with the
            masked-mean cosine, when the references have layouts. None: 0.5 for instance search (layout alone loses
            photographs seen from another viewpoint), 0 for category search.
        votes: Weight of the candidate's keypoint votes for a class in its similarity: ``+ votes * log(1 + n)`` for
            ``n`` of the crop's SIFT keypoints whose nearest reference keypoint is that class's and clearly nearer
            than any other class's (:mod:`~yolo_fewshot.nn.keypoint_votes`), with two classes or more. None: 0.1 for
            instance search (local features see markings pooled features cannot), 0 for category search (another
            member of a class shares no keypoints with the references).
        once: An instance is in a scene once: in each image, every candidate of a class but its best-scoring one has
            its (calibrated) score multiplied by this. None: 0.2 for instance search (what outscored true matches was
            mostly a second box on the same object), 1 (off) for category search (a scene may hold several members).
        proposals: Candidate sources: ``head``, ``centernet``, ``keypoints``, joined by ``+`` (module doc). None:
            :data:`INSTANCE_PROPOSALS` (``head+centernet+keypoints``) for instance search, ``both``
            (``head+centernet``) for category search. CenterNet's boxes are the ones that work on photographs, the
            head's few best add the pasted objects COCO's objectness misses, a reference's SIFT match proposes the
            same instance wherever neither network does (references without keypoints propose none).
        centernet_topk: CenterNet candidates per image (after their NMS); also the number of extra output columns.
            10: more lower the benchmark's AP.
        centernet_size: CenterNet input side (the model input is resized to it, aspect not kept, as it was trained).
        keypoint_inliers: Inliers at which a keypoint box's objectness is 0.5 (``n / (n + keypoint_inliers)``).
        part: With head and CenterNet candidates, a head box that is a part of one of CenterNet's boxes with at least
            this objectness (70 % of it inside a box at least twice its area, :func:`parts`) is no candidate:
            CenterNet's box is that object, whole (above 1: keep every head box). The head, trained on pasted stamps,
            proposes parts of real objects (a zebra's head), and a part can match the reference better than the whole.
        head_objectness: With CenterNet's candidates, multiply each one's objectness by the head's own objectness
            where it is (:func:`head_objectness_at`) to this power, as far as the head recognises the image's objects
            (:attr:`head_trust`): a box counts as an object where both networks see one. None: 1 for category search
            (the head learned that the training scenes' unlabelled objects are background; COCO's objectness did not),
            0 (off) for instance search (on photographs the head sees few objects).
        head_trust: :attr:`head_objectness` applies as far as the head recognises CenterNet's objects in the image:
            their agreement ``a`` (the head's objectness at CenterNet's boxes, averaged with CenterNet's objectness as
            weights) makes the power ``head_objectness * min(1, a / head_trust)`` (0: the full power everywhere), so an
            image where the head sees none of the objects (a photograph) keeps COCO's objectness alone. A ramp, not a
            switch: benchmark scenes and photographs overlap in agreement.
        coco: The share of the COCO embedding's cosine in the similarity (0-1): each crop's masked mean on the ported
            CenterNet's stride-16 map, centred on the model's ``coco_center``, against the mean of the class's
            references' (:mod:`~yolo_fewshot.nn.coco_embedding`). None: 0.25 for category search (COCO's detector was
            trained on the categories people search for; the two views rank categories better than either), 0 for
            instance search (which tells an instance from its look-alikes by colour and texture). Costs one CenterNet
            trunk pass over the crops (128 px).
        hubness: Weight of the hubness correction (:mod:`~yolo_fewshot.nn.hubness`, CSLS): each class's similarity
            lowered by this times how far its mean similarity to its :attr:`hubness_k` nearest objects of the model's
            ``hubness_bank`` lies above the classes' average, so a reference near everything stops taking other
            objects' candidates. None: 0.5 for instance search, 0 for category search (not measured there). Needs two
            classes or more and a model with a bank.
        hubness_k: Nearest bank objects whose mean similarity is a class's hubness.
        colour: Weight of the colour histograms' agreement (:mod:`~yolo_fewshot.nn.colour`): each candidate's
            similarity to a class gains this times (its box's Bhattacharyya coefficient with the class's references'
            mean histogram - :data:`COLOUR_UNRELATED`). None: 0.15 for instance search (the frozen ImageNet trunk pools
            colour away), 0 for category search (another member may be another colour). Off by itself in grey frames
            (channels within :data:`GREY_TOLERANCE` on average: infrared or monochrome footage).
        whiten: Compare the trunk's descriptors (candidates', references', their layouts' cells and the hubness
            bank's) in the model's learned whitening (:mod:`~yolo_fewshot.nn.whitening`: the photo-to-scene nuisance
            divided out), when the model has one. None: on for instance search, off for category search (fitted on
            pairs of one object, it is no category metric).
        chunk: Images per CenterNet pass and ``16 * chunk`` crops per trunk pass: Ultralytics hands ``predict`` a list
            of image paths as one batch; in chunks the memory stays bounded and the results are the same.
    """

    topk: int | None = None
    size: int | None = None
    context: float = 0.1
    iou: float = 0.6
    obj_power: float | None = None
    sim_power: float = 4.0
    top1: bool = True
    margin: float = 0.02
    gamma: float | None = None
    levels: int | None = None
    layout: float | None = None
    votes: float | None = None
    once: float | None = None
    proposals: str | None = None
    centernet_topk: int = 10
    centernet_size: int = 512
    keypoint_inliers: float = 10.0
    part: float = 0.5
    head_objectness: float | None = None
    head_trust: float = 0.1
    coco: float | None = None
    hubness: float | None = None
    hubness_k: int = 10
    colour: float | None = None
    whiten: bool | None = None
    chunk: int = 8

    def __post_init__(self) -> None:
        if self.proposals is not None:
            check_proposals(self.proposals)

    @property
    def sources(self) -> frozenset[str]:
        """The candidate sources of :attr:`proposals` (None: :data:`INSTANCE_PROPOSALS` for instance search,
        ``both`` for category search)."""
        return proposal_sources(self.proposals or (INSTANCE_PROPOSALS if self.top1 else "both"))

    def crop_size(self, whitened: bool) -> int:
        """The crop side fed to the trunk (:attr:`size`; None: :data:`WHITENED_SIZE` when the descriptors are compared
        whitened, :data:`CATEGORY_SIZE` otherwise)."""
        return int(self.size) if self.size is not None else (WHITENED_SIZE if whitened else CATEGORY_SIZE)

    def whitened(self, white: dict[str, Tensor] | None) -> bool:
        """Whether descriptors are compared in the model's whitening ``white`` (:attr:`whiten`; None: with
        :attr:`top1`, when the model has one)."""
        return bool((self.top1 if self.whiten is None else self.whiten) and white)

    def extra_columns(self, n: int = 0) -> int:
        """Anchor columns this verifier appends to the head's output for ``n`` classes (CenterNet's, then one keypoint
        box per class)."""
        return self.centernet_topk * ("centernet" in self.sources) + n * ("keypoints" in self.sources)

    def prefetch(self, img: Tensor) -> Future | None:
        """Start CenterNet's pass over the model input ``img`` on a worker thread, to run while the detector's own
        forward runs (both release the GIL; Ultralytics leaves torch one thread per spare core on CPU, so the pass
        takes a core the forward does not use), and hand the :class:`~concurrent.futures.Future` to :meth:`__call__`;
        None when this verifier takes no CenterNet candidates. The boxes are the same as computed in line."""
        if "centernet" not in self.sources:
            return None
        if not _WORKER:
            _WORKER.append(ThreadPoolExecutor(1, thread_name_prefix="yolo_fewshot-centernet"))

        def run() -> tuple[Tensor, Tensor]:
            with torch.inference_mode():  # (grad mode is per thread)
                return self.centernet_boxes(img)

        return _WORKER[0].submit(run)

    @torch.no_grad()
    def centernet_boxes(self, img: Tensor) -> tuple[Tensor, Tensor]:
        """CenterNet's candidates on the model input: boxes ``[B, K, 4]`` (xyxy, input pixels) and objectness
        ``[B, K]``; images with fewer than ``K`` boxes are padded with empty boxes of objectness 0."""
        from .centernet import CenterNetProposals

        k = self.centernet_topk
        cn = CenterNetProposals(centernet(img.device), self.centernet_size, max(100, k), device=img.device)
        n = max(1, self.chunk)  # plain resize to centernet_size inside; boxes back in input pixels
        props = [p for i in range(0, len(img), n) for p in cn(img[i : i + n].float() * 255)]
        boxes = img.new_zeros((len(props), k, 4), dtype=torch.float32)
        obj = img.new_zeros((len(props), k), dtype=torch.float32)
        for i, p in enumerate(props):
            p = p.to(img.device)
            p = p[nms(p[:, :4], p[:, 4], self.iou)][:k]  # distinct places first: peaks can still share a box
            boxes[i, : len(p)], obj[i, : len(p)] = p[:, :4], p[:, 4]
        return boxes, obj

    def keypoint_boxes(
        self, img: Tensor, keypoints: Sequence[Sequence[KeypointTemplate]], n: int
    ) -> tuple[Tensor, Tensor]:
        """Each class's keypoint match in each image: boxes ``[B, N, 4]`` (xyxy, input pixels) and objectness
        ``[B, N]`` (``inliers / (inliers + keypoint_inliers)``; 0 where nothing was found)."""
        boxes = img.new_zeros((img.shape[0], n, 4), dtype=torch.float32)
        obj = img.new_zeros((img.shape[0], n), dtype=torch.float32)
        templates = list(keypoints)[:n] + [[]] * max(0, n - len(keypoints))
        if not any(len(t) for ts in templates for t in ts):
            return boxes, obj
        scenes = (img.float().clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
        for i, scene in enumerate(scenes):
            bx, inl = keypoint_boxes(templates, scene)
            boxes[i] = torch.from_numpy(bx).to(boxes)
            inl = torch.from_numpy(inl).to(obj)
            obj[i] = inl / (inl + self.keypoint_inliers)
        return boxes, obj

    @torch.no_grad()
    def __call__(
        self,
        trunk,
        img: Tensor,
        y: Tensor,
        obj: Tensor,
        protos: list[Tensor],
        keypoints: Sequence[Sequence[KeypointTemplate]] | None = None,
        layouts: Sequence[Tensor] | None = None,
        descriptors: Sequence[Sequence[Tensor]] | None = None,
        coco: tuple[Tensor, Tensor | None] | None = None,
        hub: dict[str, Tensor] | None = None,
        colours: Tensor | None = None,
        white: dict[str, Tensor] | None = None,
        pending: Future | None = None,
    ) -> Tensor:
        """Re-score ``y``: candidates get the verified score, every other anchor 0.

        Args:
            trunk: The detector's trunk, ``[K, 3, S, S]`` in [0, 1] -> list of level maps (the last is compared).
            img: The model's input ``[B, 3, H, W]`` in [0, 1].
            y: Decoded predictions ``[B, 4 + N, A]`` (xywh in input pixels, class probabilities).
            obj: Objectness logits ``[B, 1, A]``.
            protos: Per-level prototypes ``[B|1, N, M, D_l]``, the trunk's last levels (P3-P5 or P5 alone).
            keypoints: Per class, its references' keypoints (``keypoints`` proposals; classes beyond the list, e.g.
                negatives, and classes without keypoints propose nothing).
            layouts: Per level (P3-P5) the classes' layout descriptors ``[B|1, N, 2, G * G * D_l]`` (direct, mirrored;
                :func:`~yolo_fewshot.nn.layout.class_layouts`), compared instead of the prototypes when
                :attr:`layout` allows; None: the prototypes.
            descriptors: Per image (one row for the batch, or one per image) per class, its references' SIFT
                descriptors ``[P_n, 128]`` (:func:`~yolo_fewshot.nn.keypoint_votes.reference_descriptors`), for
                keypoint votes when :attr:`votes` allows; None: no votes.
            coco: The classes' COCO embeddings ``[B|1, N, D]`` (the mean of each class's references',
                :mod:`~yolo_fewshot.nn.coco_embedding`) and the centre ``[D]`` (None: uncentred), mixed in when
                :attr:`coco` allows; None: not used.
            hub: The model's hubness bank (:func:`~yolo_fewshot.nn.hubness.bank_embeddings`), for the correction
                :attr:`hubness` weighs; None: no correction.
            colours: The classes' colour histograms ``[B|1, N, H]`` (the mean of each class's references',
                :mod:`~yolo_fewshot.nn.colour`), compared when :attr:`colour` allows; None: not used.
            white: The model's whitening (:mod:`~yolo_fewshot.nn.whitening`, ``mean.<l>`` / ``matrix.<l>``), applied
                when :attr:`whiten` allows; None: raw cosines.
            pending: CenterNet's candidates for ``img`` already under way (:meth:`prefetch`); None: computed here.

        Returns:
            ``[B, 4 + N, A + E]`` (``E`` = :meth:`extra_columns`): the head's boxes unchanged, then the CenterNet
            boxes, then one keypoint box per class (xywh; empty where none); scores of the candidates verified, of
            everything else 0.
        """
        out, idx, col, cbox, cobj = self.candidates(img, y, obj, keypoints, pending)
        if not len(idx):
            return out
        cos = self.compare(
            trunk, img, idx, cbox, protos, y.shape[1] - 4, layouts, descriptors, coco, hub, colours, white
        )
        out[idx, 4:, col] = self.score(cos, cobj, idx, y.shape[0], self.whitened(white)).to(y.dtype)
        return out

    def candidates(
        self,
        img: Tensor,
        y: Tensor,
        obj: Tensor,
        keypoints: Sequence[Sequence[KeypointTemplate]] | None = None,
        pending: Future | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """The candidate boxes of every source (:attr:`proposals`; CenterNet's from ``pending``, :meth:`prefetch`,
        when given).

        Returns:
            ``out`` (``y`` with the extra sources' columns appended and every score 0, ``[B, 4 + N, A + E]``), then per
            candidate its image ``[C]``, its column of ``out`` ``[C]``, its box ``[C, 4]`` (xyxy, input pixels) and
            its objectness ``[C]`` in [0, 1].
        """
        b, a = y.shape[0], y.shape[-1]
        boxes = xywh_to_xyxy(y[:, :4].transpose(1, 2))  # [B, A, 4]
        out = y.clone()
        out[:, 4:] = 0
        # candidates: (image, column of the output, box xyxy, objectness in [0, 1])
        idx, col, cbox, cobj = [], [], [], []
        sources = self.sources
        if "head" in sources:
            topk = self.topk if self.topk is not None else (3 if "centernet" in sources else 10)
            best = y[:, 4:].amax(1)  # [B, A]
            cand = []
            for i in range(b):
                k = min(a, max(topk * 10, 300))
                top = best[i].topk(k).indices
                keep = batched_nms(boxes[i, top].float(), best[i, top].float(), torch.zeros_like(top), self.iou)[:topk]
                cand.append(top[keep])
            hi = torch.cat([torch.full_like(c, i) for i, c in enumerate(cand)])
            ha = torch.cat(cand)
            idx.append(hi), col.append(ha), cbox.append(boxes[hi, ha].float())
            cobj.append(obj[hi, 0, ha].float().sigmoid())
        extra = []  # (boxes [B, K, 4] xyxy, objectness [B, K]) of each appended source
        if "centernet" in sources:
            extra.append(self.centernet_boxes(img) if pending is None else pending.result())
            if "head" in sources and self.part <= 1:
                keep = ~parts(cbox[0], extra[0][0][idx[0]], extra[0][1][idx[0]] >= max(self.part, 1e-6))
                idx[0], col[0], cbox[0], cobj[0] = idx[0][keep], col[0][keep], cbox[0][keep], cobj[0][keep]
        if "keypoints" in sources:
            extra.append(self.keypoint_boxes(img, keypoints or [], y.shape[1] - 4))
        head_power = float((0.0 if self.top1 else 1.0) if self.head_objectness is None else self.head_objectness)
        if head_power > 0 and "centernet" in sources:
            cn_box, cn_obj = extra[0]
            seen = head_objectness_at(cn_box, boxes, obj)
            agree = (seen * cn_obj).sum(1) / cn_obj.sum(1).clamp_min(1e-6)  # [B]
            # trust grows with the agreement instead of switching on at head_trust: a hard switch left the head's
            # objectness out of half of fold 2's scenes (agreement under 0.1), where it was what ranked base classes
            trust = (agree / self.head_trust).clamp(max=1) if self.head_trust > 0 else torch.ones_like(agree)
            factor = seen.pow(head_power * trust[:, None])  # 0 ** 0 = 1: where the head sees nothing, COCO's alone
            extra[0] = (cn_box, cn_obj * factor)
        for cb, co in extra:
            k, start = cb.shape[1], out.shape[-1]
            cols = y.new_zeros((b, y.shape[1], k))
            cols[:, :4] = xyxy_to_xywh(cb).transpose(1, 2).to(y.dtype)
            out = torch.cat([out, cols], -1)
            ci, ck = (co > 0).nonzero(as_tuple=True)  # padding (objectness 0) is never a candidate
            idx.append(ci), col.append(start + ck), cbox.append(cb[ci, ck]), cobj.append(co[ci, ck])
        return out, torch.cat(idx), torch.cat(col), torch.cat(cbox), torch.cat(cobj)

    def compare(
        self,
        trunk,
        img: Tensor,
        idx: Tensor,
        cbox: Tensor,
        protos: list[Tensor],
        n: int,
        layouts: Sequence[Tensor] | None = None,
        descriptors: Sequence[Sequence[Tensor]] | None = None,
        coco: tuple[Tensor, Tensor | None] | None = None,
        hub: dict[str, Tensor] | None = None,
        colours: Tensor | None = None,
        white: dict[str, Tensor] | None = None,
    ) -> Tensor:
        """Similarity ``[C, N]`` of each candidate crop (image ``idx``, box ``cbox``) with each of the ``n`` classes:
        the masked-mean cosine, mixed with the layouts' (:attr:`layout`) and the COCO embedding's (:attr:`coco`),
        plus keypoint votes (:attr:`votes`) and the colour histograms' agreement (:attr:`colour`, ``colours``), minus
        each class's hubness offset (:attr:`hubness`, bank ``hub``); the trunk's descriptors compared whitened
        (:attr:`whiten`, ``white``)."""
        b = img.shape[0]
        wt, white_hub = whitened_statistics(white, hub) if self.whitened(white) else (None, None)
        crops, masks = self.crops(img, idx, cbox.to(img.dtype), self.crop_size(wt is not None))
        n_crops = 16 * max(1, self.chunk)
        parts = [trunk(crops[i : i + n_crops]) for i in range(0, len(crops), n_crops)]
        feats = [torch.cat(level) for level in zip(*parts)]
        w = float((0.5 if self.top1 else 0.0) if self.layout is None else self.layout)  # the layouts' share
        cos = self.similarity(feats, masks, protos, b, idx, wt) if w < 1 else 0  # [C, N]
        with_layouts = w > 0 and bool(layouts) and layouts[0].shape[-3] == n  # (negative classes have none)
        if with_layouts:
            lay = layout_similarity(feats, masks, layouts[-self.n_levels(len(layouts)) :], idx, wt)
            cos = (1 - w) * cos + w * lay
        elif w >= 1:
            cos = self.similarity(feats, masks, protos, b, idx, wt)
        wh = float((0.5 if self.top1 else 0.0) if self.hubness is None else self.hubness)
        if wh > 0 and hub and n > 1:
            sim = bank_similarity(white_hub if wt is not None else hub, protos, layouts if with_layouts else None,
                                  w if with_layouts else 0.0, self.n_levels(len(protos)), wt)  # fmt: skip
            off = hubness_offset(sim, self.hubness_k, wh).to(cos)  # [B|1, N]
            cos = cos - (off[idx] if len(off) > 1 else off[0].expand(len(idx), -1))
        wc = self.coco_share
        if wc > 0 and coco is not None and coco[0].shape[-2] == n:  # (negative classes have none)
            cos = (1 - wc) * cos + wc * coco_similarity(crops, masks, coco[0], coco[1], b, idx)
        wv = float((0.1 if self.top1 else 0.0) if self.votes is None else self.votes)
        # (votes need two classes with descriptors: with one, no SIFT pass is spent, see keypoint_votes)
        if (
            wv > 0
            and descriptors
            and all(len(r) == n for r in descriptors)
            and any(sum(len(t) > 0 for t in r) > 1 for r in descriptors)
        ):
            cos = cos + wv * torch.log1p(self.count_votes(crops, masks, idx, descriptors)).to(cos)
        wcol = float((0.15 if self.top1 else 0.0) if self.colour is None else self.colour)
        if wcol > 0 and colours is not None and colours.shape[-2] == n:  # (negative classes have none)
            bc = colour_similarity(colour_histograms(crops, masks), colours, b, idx)
            # a grey frame (infrared, night, a monochrome camera) has no colour to compare: not a mismatch
            chromatic = (img.amax(1) - img.amin(1)).float().flatten(1).mean(1) > GREY_TOLERANCE  # [B]
            cos = cos + wcol * chromatic[idx, None].to(cos) * (bc - COLOUR_UNRELATED)
        return cos

    def score(self, cos: Tensor, cobj: Tensor, idx: Tensor, b: int, whitened: bool = False) -> Tensor:
        """The verified scores ``[C, N]`` of the candidates from their similarities ``cos`` ``[C, N]``, objectness
        ``cobj`` ``[C]`` and images ``idx`` ``[C]`` (of ``b``): similarity and objectness powers, the classes'
        competition (:attr:`top1`), the calibration power (:attr:`gamma`; ``whitened``: whether ``cos`` was compared
        in the model's whitening, which has its own) and one instance per scene (:attr:`once`).
        """
        obj_power = float((0.5 if self.top1 else 1.0) if self.obj_power is None else self.obj_power)
        # the similarity is a cosine plus bonuses (keypoint votes, colour) that can take it past 1: squashed into [0, 1]
        # above a knee, so a confidence stays a confidence (<= 1) and the order of the similarities is kept
        score = soft_unit(cos).clamp_min(0).pow(self.sim_power) * cobj.to(cos).pow(obj_power)[:, None]
        if self.top1:
            score = score * exclusive(cos, self.margin)
        gamma = self.gamma if self.gamma is not None else (WHITENED_GAMMA if whitened else 0.5)
        score = score.pow(gamma)
        once = float((0.2 if self.top1 else 1.0) if self.once is None else self.once)
        if once != 1:
            best = score.new_zeros((b, score.shape[1])).scatter_reduce(0, idx[:, None].expand_as(score), score, "amax")
            score = torch.where(score >= best[idx], score, score * once)
        return score

    def count_votes(self, crops: Tensor, masks: Tensor, idx: Tensor, descriptors: Sequence[Sequence[Tensor]]) -> Tensor:
        """Votes ``[C, N]`` of each candidate crop's keypoints for each class (:func:`keypoint_votes`), the classes'
        descriptors taken from the crop's image's row (``descriptors``: one row per image, or one for all)."""
        queries = crop_descriptors(crops, masks)
        votes = torch.zeros(len(queries), len(descriptors[0]))
        for i in idx.unique().tolist():
            rows = (idx == i).nonzero()[:, 0].cpu()
            votes[rows] = keypoint_votes([queries[r] for r in rows], descriptors[i if len(descriptors) > 1 else 0])
        return votes.to(crops.device)

    @property
    def coco_share(self) -> float:
        """The COCO embedding's share in the similarity (:attr:`coco`; None: 0.25 for category search, 0 for
        instance search)."""
        return float((0.0 if self.top1 else 0.25) if self.coco is None else self.coco)

    def n_levels(self, available: int) -> int:
        """How many of the last levels are compared (:attr:`levels`; at most ``available``)."""
        n = self.levels if self.levels is not None else (3 if self.top1 else 1)
        return max(1, min(n, available))

    def similarity(
        self,
        feats: list[Tensor],
        masks: Tensor,
        protos: list[Tensor],
        b: int,
        idx: Tensor,
        white: Whitening | None = None,
    ) -> Tensor:
        """Cosine ``[C, N]`` of each crop with each class, averaged over the last :attr:`levels` levels (in the
        whitened space when ``white`` is given, :mod:`~yolo_fewshot.nn.whitening`).

        Args:
            feats: The trunk's maps of the crops, ``[C, D_l, h, w]`` per level (P2..P5).
            masks: The boxes inside the crops ``[C, 1, S, S]``.
            protos: Per-level prototypes ``[B|1, N, M, D_l]`` (the trunk's last levels).
            b: Batch size of the scene images.
            idx: Image of each crop ``[C]``.
            white: The model's whitening, or None.
        """
        n = self.n_levels(len(protos))
        cos = 0
        for i, (f, p) in enumerate(zip(feats[-n:], protos[-n:])):
            # in float32 whatever the model's precision (a half model on a GPU: masked means come out in float32)
            q, e = p.float().mean(2), masked_mean(f.float(), masks.float())  # [B|1, N, D_l], [C, D_l]
            if white is not None:
                q, e = white(q, i, n), white(e, i, n)
            else:
                q, e = F.normalize(q, dim=-1, eps=1e-6), F.normalize(e, dim=-1, eps=1e-6)
            cos = cos + (q.expand(b, -1, -1)[idx] @ e[:, :, None]).squeeze(-1)
        return cos / n

    def crops(self, img: Tensor, idx: Tensor, boxes: Tensor, size: int) -> tuple[Tensor, Tensor]:
        """Square, aspect-preserving crops ``[C, 3, S, S]`` (``S`` = ``size``, :meth:`crop_size`) around ``boxes``
        (xyxy, image ``idx``) with ``context``, and masks ``[C, 1, S, S]`` of the box inside each crop — the reference
        crops' layout."""
        wh = boxes[:, 2:] - boxes[:, :2]
        side = wh.amax(1).clamp_min(2) * (1 + 2 * self.context)
        ctr = (boxes[:, :2] + boxes[:, 2:]) / 2
        win = torch.cat([ctr - side[:, None] / 2, ctr + side[:, None] / 2], 1)  # [C, 4]
        crops = roi_align(img, torch.cat([idx[:, None].to(win), win], 1), size, 1.0, 2, aligned=True)
        # the box inside its window, in crop pixels
        inner = (boxes - win[:, :2].repeat(1, 2)) / side[:, None] * size
        grid = torch.arange(size, device=img.device, dtype=img.dtype) + 0.5
        mx = (grid[None] >= inner[:, 0:1]) & (grid[None] <= inner[:, 2:3])  # [C, S]
        my = (grid[None] >= inner[:, 1:2]) & (grid[None] <= inner[:, 3:4])
        masks = (my[:, :, None] & mx[:, None, :]).to(img.dtype)[:, None]
        return crops, masks


def coco_similarity(crops: Tensor, masks: Tensor, protos: Tensor, center: Tensor | None, b: int, idx: Tensor) -> Tensor:
    """Cosine ``[C, N]`` of each crop (``[C, 3, S, S]``, masks ``[C, 1, S, S]``, image ``idx``) with each class in the
    COCO embedding (:mod:`~yolo_fewshot.nn.coco_embedding`): both centred on ``center`` ``[D]`` (None: not centred),
    the classes' ``protos`` ``[B|1, N, D]``."""
    e = coco_embed(crops, masks)  # [C, D]
    q = protos.to(e).expand(b, -1, -1)[idx]  # [C, N, D]
    if center is not None:
        e, q = e - center.to(e), q - center.to(e)
    return (F.normalize(q, dim=-1, eps=1e-6) @ F.normalize(e, dim=-1, eps=1e-6)[:, :, None]).squeeze(-1)


def head_objectness_at(cn_boxes: Tensor, head_boxes: Tensor, obj: Tensor, iou: float = 0.5) -> Tensor:
    """The head's objectness where each box is: the best objectness ``[B, K]`` (in [0, 1]) of the head's anchors whose
    box overlaps it (IoU >= ``iou``); 0 where none does.

    Args:
        cn_boxes: ``[B, K, 4]`` xyxy boxes (CenterNet's candidates).
        head_boxes: ``[B, A, 4]`` xyxy boxes of the head's anchors.
        obj: ``[B, 1, A]`` the head's objectness logits.
    """
    seen = obj[:, 0].float().sigmoid()  # [B, A]
    return torch.stack(
        [(box_iou(c, h.float()) >= iou).float().mul(o).amax(1) for c, h, o in zip(cn_boxes, head_boxes, seen)]
    )


def parts(boxes: Tensor, wholes: Tensor, valid: Tensor, share: float = 0.7) -> Tensor:
    """Which of ``boxes`` ``[C, 4]`` (xyxy) are parts of one of their own image's ``wholes`` ``[C, K, 4]`` (``valid``
    ``[C, K]``): at least ``share`` of the box inside a whole at least twice its area."""
    lt = torch.maximum(boxes[:, None, :2], wholes[..., :2])
    rb = torch.minimum(boxes[:, None, 2:], wholes[..., 2:])
    inter = (rb - lt).clamp_min(0).prod(-1)  # [C, K]
    area = (boxes[:, 2:] - boxes[:, :2]).clamp_min(0).prod(-1)[:, None]
    whole = (wholes[..., 2:] - wholes[..., :2]).clamp_min(0).prod(-1)
    return (valid & (inter >= share * area) & (whole >= 2 * area)).any(1)


def soft_unit(x: Tensor, knee: float = 0.9) -> Tensor:
    """``x`` below ``knee``; above it, squashed smoothly and strictly increasingly towards 1 (``knee + (1 - knee) *
    tanh((x - knee) / (1 - knee))``: continuous with slope 1 at the knee), so the result never exceeds 1."""
    return torch.where(x <= knee, x, knee + (1 - knee) * torch.tanh((x - knee) / (1 - knee)))


def exclusive(cos: Tensor, margin: float) -> Tensor:
    """How much each class owns a candidate, from the candidates' cosines ``[C, N]``: ``sigmoid((cos_c - best other)
    / margin)`` (1 when there is one class; ``margin`` 0: 1 for the best class, 0 for the others)."""
    if cos.shape[1] == 1:
        return torch.ones_like(cos)
    top2 = cos.topk(2, 1).values  # [C, 2]
    other = torch.where(cos >= top2[:, :1], top2[:, 1:2], top2[:, :1])  # the best class competes with the second
    if margin <= 0:
        return (cos >= top2[:, :1]).to(cos)
    return torch.sigmoid((cos - other) / margin)


def xywh_to_xyxy(b: Tensor) -> Tensor:
    """``[..., 4]`` centre-size boxes -> corner boxes."""
    xy, wh = b[..., :2], b[..., 2:]
    return torch.cat([xy - wh / 2, xy + wh / 2], -1)


def xyxy_to_xywh(b: Tensor) -> Tensor:
    """``[..., 4]`` corner boxes -> centre-size boxes."""
    return torch.cat([(b[..., :2] + b[..., 2:]) / 2, b[..., 2:] - b[..., :2]], -1)
