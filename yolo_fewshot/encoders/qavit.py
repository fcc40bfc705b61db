"""QAViT: a quad-attention vision transformer, trainable from scratch as a support encoder (seed 004).

Each block splits the normalised tokens into four branches of width d' = d/4, each with its own view of the image:

1. SWA — spatial window attention (7x7 windows; the zoo's windowed kernel, Liu et al. "Swin", ICCV 2021);
2. MSDA — multi-scale dilated attention: the same windows on the 1-, 2- and 3-dilated sub-grids, averaged
   (Hassani & Shi, "DiNAT", 2022);
3. CGA — channel-group attention: attention between channels within 8 groups, over all tokens (El-Nouby et al.,
   "XCiT", NeurIPS 2021);
4. cross-attention to a global token bank: S learned tokens carried from block to block, updated by each block's
   gateway, which attends — in the compressed width d' (latent attention) — from the bank to a Linformer-compressed
   (N -> k=64) copy of the tokens (Wang et al., "Linformer", 2020);

fused by input-dependent softmax weights over the branches, concatenated (4d' = d) and passed through a bottleneck MLP
(4d' -> r = d/2 -> d); then a CCF-FFN (Linear -> 3x3 depthwise conv on the token grid -> GELU -> Linear, hidden = d/2).
The seed's constraints hold: d' = d/4, r = d/2, FFN ratio 0.5, Linformer k = 64.

As a support encoder (``qavit-tiny``, ``qavit-small``) it has no pretrained weights: it is meant to be trained jointly
with the detector (unfrozen; the embedding cache does not apply). Levels: blocks at 1/4, 2/4, 3/4 and 4/4 depth; tokens:
the masked mean of the patch tokens and the mean of the global bank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn.attention.local_global import LocalGlobalAttention
from .base import EncoderSpec, SupportEncoder, resize_mask

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class QAViTConfig:
    """Architecture hyper-parameters (defaults: QAViT-Tiny)."""

    img_size: int = 224
    patch_size: int = 16
    embed_dim: int = 256
    depth: int = 12
    num_heads: int = 4
    compress_ratio: int = 4  # d' = d / 4
    bottleneck_ratio: int = 2  # r = d / 2
    mlp_ratio: float = 0.5
    global_bank_size: int = 16
    window_size: int = 7
    dilations: tuple[int, ...] = (1, 2, 3)
    channel_groups: int = 8
    linformer_k: int = 64


CONFIGS = {
    "qavit-tiny": QAViTConfig(),
    "qavit-small": QAViTConfig(embed_dim=384, depth=16, num_heads=6),
}


def _dilate(x: Tensor, hw: tuple[int, int], r: int) -> tuple[Tensor, tuple[int, int]]:
    """Tokens ``[B, H*W, C]`` -> the r*r interleaved sub-grids as a batch ``[B*r*r, (H/r)*(W/r), C]`` (padded)."""
    b, _, c = x.shape
    h, w = hw
    ph, pw = -h % r, -w % r
    g = F.pad(x.view(b, h, w, c), (0, 0, 0, pw, 0, ph))
    hh, ww = (h + ph) // r, (w + pw) // r
    g = g.view(b, hh, r, ww, r, c).permute(0, 2, 4, 1, 3, 5).reshape(b * r * r, hh * ww, c)
    return g, (hh, ww)


def _undilate(g: Tensor, b: int, hw: tuple[int, int], sub: tuple[int, int], r: int) -> Tensor:
    c = g.shape[-1]
    hh, ww = sub
    x = g.view(b, r, r, hh, ww, c).permute(0, 3, 1, 4, 2, 5).reshape(b, hh * r, ww * r, c)
    return x[:, : hw[0], : hw[1]].reshape(b, hw[0] * hw[1], c)


class ChannelGroupAttention(nn.Module):
    """XCiT-style attention between the channels of each group (cost O(N c_g^2) per group)."""

    def __init__(self, dim: int, groups: int) -> None:
        super().__init__()
        if dim % groups:
            raise ValueError(f"channel groups {groups} must divide the branch width {dim}")
        self.groups = groups
        self.qkv = nn.Linear(dim, 3 * dim)
        self.temperature = nn.Parameter(torch.ones(groups, 1, 1))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.groups, c // self.groups).permute(2, 0, 3, 4, 1)  # [B, G, cg, N]
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        attn = ((q @ k.transpose(-2, -1)) * self.temperature).softmax(-1)  # [B, G, cg, cg]
        return self.proj((attn @ v).permute(0, 3, 1, 2).reshape(b, n, c))


class QuadAttentionBlock(nn.Module):
    """One QAViT block (see module docstring); carries the global token bank ``[B, S, d]`` through."""

    def __init__(self, cfg: QAViTConfig) -> None:
        super().__init__()
        d, dc = cfg.embed_dim, cfg.embed_dim // cfg.compress_ratio
        heads = max(h for h in range(1, cfg.num_heads + 1) if dc % h == 0)
        n_tokens = (cfg.img_size // cfg.patch_size) ** 2
        self.cfg, self.dc = cfg, dc
        self.norm1, self.norm2, self.norm_bank = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.branch_in = nn.Linear(d, 4 * dc)  # the four d' = d/4 branch inputs
        self.swa = LocalGlobalAttention(dc, heads, window=cfg.window_size, num_global=0)
        self.msda = LocalGlobalAttention(dc, heads, window=cfg.window_size, num_global=0)
        self.cga = ChannelGroupAttention(dc, cfg.channel_groups)
        self.cross_q, self.cross_kv, self.cross_proj = nn.Linear(dc, dc), nn.Linear(d, 2 * dc), nn.Linear(dc, dc)
        self.cross_heads = heads
        # gateway: bank <- attention over the Linformer-compressed tokens
        self.compress = nn.Linear(n_tokens, cfg.linformer_k, bias=False)
        # latent (MLA-style) gateway: attention computed in the compressed width d', written back to d
        self.gate_q, self.gate_kv, self.gate_out = nn.Linear(d, dc), nn.Linear(d, 2 * dc), nn.Linear(dc, d)
        self.fusion = nn.Linear(d, 4)  # input-dependent softmax weights of the four branches
        r = d // cfg.bottleneck_ratio
        self.bottleneck = nn.Sequential(nn.Linear(4 * dc, r), nn.GELU(), nn.Linear(r, d))
        hidden = int(d * cfg.mlp_ratio)
        self.ffn_in, self.ffn_dw, self.ffn_out = (
            nn.Linear(d, hidden),
            nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden),
            nn.Linear(hidden, d),
        )

    def _heads(self, t: Tensor) -> Tensor:
        return t.unflatten(-1, (self.cross_heads, -1)).transpose(1, 2)

    def forward(self, x: Tensor, bank: Tensor, hw: tuple[int, int]) -> tuple[Tensor, Tensor]:
        b, n, _ = x.shape
        if n != self.compress.in_features:
            raise ValueError(
                f"QAViT was built for {self.cfg.img_size}px inputs ({self.compress.in_features} tokens), "
                f"got {n} tokens; resize the crops to {self.cfg.img_size}"
            )
        h = self.norm1(x)
        compressed = self.compress(h.transpose(1, 2)).transpose(1, 2)  # [B, k, d]
        gk, gv = self.gate_kv(compressed).chunk(2, -1)
        g = F.scaled_dot_product_attention(
            self._heads(self.gate_q(self.norm_bank(bank))), self._heads(gk), self._heads(gv)
        )
        bank = bank + self.gate_out(g.transpose(1, 2).flatten(2))
        s1, s2, s3, s4 = self.branch_in(h).split(self.dc, -1)
        swa = self.swa(s1, None, hw)
        msda = 0
        for r in self.cfg.dilations:
            g, sub = _dilate(s2, hw, r)
            msda = msda + _undilate(self.msda(g, None, sub), b, hw, sub, r)
        msda = msda / len(self.cfg.dilations)
        cga = self.cga(s3)
        k, v = self.cross_kv(bank).chunk(2, -1)
        cross = F.scaled_dot_product_attention(self._heads(self.cross_q(s4)), self._heads(k), self._heads(v))
        cross = self.cross_proj(cross.transpose(1, 2).flatten(2))
        w = self.fusion(h.mean(1)).softmax(-1)  # [B, 4]
        fused = torch.cat([w[:, i, None, None] * t for i, t in enumerate((swa, msda, cga, cross))], -1)
        x = x + self.bottleneck(fused)
        f = self.ffn_in(self.norm2(x))
        f = f + self.ffn_dw(f.transpose(1, 2).reshape(b, -1, *hw)).flatten(2).transpose(1, 2)
        return x + self.ffn_out(F.gelu(f)), bank


class QAViT(nn.Module):
    """Patch embedding + QAViT blocks (+ an optional classifier for stand-alone pre-training).

    Args:
        cfg: Architecture.
        num_classes: Classifier outputs (0: none).
    """

    def __init__(self, cfg: QAViTConfig = QAViTConfig(), num_classes: int = 0) -> None:
        super().__init__()
        self.cfg = cfg
        d, g = cfg.embed_dim, cfg.img_size // cfg.patch_size
        self.patch = nn.Conv2d(3, d, cfg.patch_size, cfg.patch_size)
        self.pos = nn.Parameter(torch.zeros(1, g * g, d))
        self.bank = nn.Parameter(torch.randn(1, cfg.global_bank_size, d) * 0.02)
        self.blocks = nn.ModuleList(QuadAttentionBlock(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, num_classes) if num_classes else None
        nn.init.trunc_normal_(self.pos, std=0.02)

    def features(self, x: Tensor, keep: set[int] | None = None) -> list[tuple[Tensor, Tensor, tuple[int, int]]]:
        """``[B, 3, S, S]`` -> (tokens ``[B, N, d]``, bank ``[B, S_b, d]``, grid) after each block in ``keep``."""
        if x.shape[-2:] != (self.cfg.img_size, self.cfg.img_size):
            raise ValueError(
                f"QAViT was built for {self.cfg.img_size}px inputs, got {tuple(x.shape[-2:])}; resize the "
                f"crops to {self.cfg.img_size}"
            )
        x = self.patch(x)
        hw = (x.shape[2], x.shape[3])
        x = x.flatten(2).transpose(1, 2) + self.pos
        bank = self.bank.expand(x.shape[0], -1, -1)
        outs = []
        for i, blk in enumerate(self.blocks):
            x, bank = blk(x, bank, hw)
            if keep is None or i in keep:
                outs.append((self.norm(x) if i == len(self.blocks) - 1 else x, bank, hw))
        return outs

    def forward(self, x: Tensor) -> Tensor:
        tokens, _, _ = self.features(x, {len(self.blocks) - 1})[-1]
        return self.head(tokens.mean(1)) if self.head is not None else tokens.mean(1)


class QAViTEncoder(SupportEncoder):
    """QAViT as a (trainable, randomly initialised) support encoder.

    Args:
        name: ``qavit-tiny`` or ``qavit-small``.
        cfg: A custom architecture instead of the named one (tests use tiny ones).
    """

    trainable = True

    def __init__(self, name: str = "qavit-tiny", cfg: QAViTConfig | None = None) -> None:
        super().__init__()
        if cfg is None and name not in CONFIGS:
            raise ValueError(f"unknown QAViT '{name}'; choose one of {', '.join(CONFIGS)}")
        cfg = cfg or CONFIGS[name]
        self.net = QAViT(cfg)
        self.levels = sorted({max(0, round(cfg.depth * (i + 1) / 4) - 1) for i in range(4)})
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.spec = EncoderSpec(name, (cfg.embed_dim,) * len(self.levels), 2, cfg.img_size)

    def forward(self, crops: Tensor, masks: Tensor | None = None) -> list[Tensor]:
        out = []
        for tokens, bank, hw in self.net.features((crops - self.mean) / self.std, set(self.levels)):
            if masks is None:
                pooled = tokens.mean(1)
            else:
                m = resize_mask(masks, hw).flatten(1)
                pooled = (tokens * m[..., None]).sum(1) / m.sum(1, keepdim=True).clamp_min(1e-6)
            out.append(torch.stack([pooled, bank.mean(1)], 1))
        return out
