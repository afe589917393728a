"""RGT: Recursive Generalization Transformer for image super-resolution (Chen et al., ICLR 2024).

The super-resolution model Open-Sora-Plan v1.0.0 ships (``opensora/models/super_resolution``, Apache-2.0),
re-written in plain PyTorch + einops, read top to bottom like SwinIR's one-file network: window helpers,
position bias, L-SA (local rectangle-window attention), RG-SA (recursive-generalisation attention), gated
MLP, block, residual group, upsampler, model, and a registry of named sizes at the end.

Input (B, 3, H, W) RGB in [0, 1] -> output (B, 3, sH, sW), **not clamped** (spec 2.2). State-dict keys are
the official ones. Reproduced on purpose (they shape the trained weights or the official outputs, spec 5):
the fixed RGB mean, L-SA's zero padding of q/k/v *after* the projection with padded keys left unmasked,
the shift schedule by group parity, the shift masks (recomputed per padded size, cached), and RG-SA's
test-time recursion depth. Fixed: sides below 16 px are refused with one clear error (the official code
fails inside ``math.log``); the model is only put in train mode by the caller.

Deterministic buffers: ``relative_position_index`` and the shift masks ``attn_mask_0/1`` are computed here
and not saved (``save_pretrained`` files hold the parameters and ``rpe_biases``, like the fixture weights).
The official ``RGT_x2.pth``/``RGT_x4.pth`` hold them; :meth:`RGTModel.from_official_checkpoint` checks that
they equal what this model computes and drops them (one log line), and is otherwise strict.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from einops import rearrange
from einops.layers.torch import Rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from .loading import check_state_dict, load_pretrained

logger = logging.getLogger(__name__)

#: RGB mean subtracted from the input and added back to the output (DIV2K's; part of the trained weights).
RGB_MEAN = (0.4488, 0.4371, 0.4040)
#: Channels of the reconstruction head (fixed in the official class).
NUM_FEAT = 64
#: RG-SA reduces the image by 4 per recursion, at least twice at test time: sides below this are refused.
MIN_SIDE = 16
#: Config keys accepted for compatibility with the official ``network_g`` but without effect here.
IGNORED_CONFIG_KEYS = ("type", "img_size")  # img_size only sizes the official files' stored shift masks
#: Official constructor values that only training variants use; anything else is refused.
REQUIRED_CONFIG_VALUES = {"upsampler": "pixelshuffle", "drop_rate": 0.0, "attn_drop_rate": 0.0, "type": "RGT"}
#: The two residual convolutions of the official class (``resi_connection``); the released models use 1conv.
RESIDUAL_CONVS = ("1conv", "3conv")


#################################################################################
#                               Window helpers                                  #
#################################################################################


def windows_partition(x: torch.Tensor, window_h: int, window_w: int) -> torch.Tensor:
    """(B, H, W, heads, d) -> (B, nW, heads, window_h*window_w, d), windows in row-major order."""
    return rearrange(x, "b (nh wh) (nw ww) heads d -> b (nh nw) heads (wh ww) d", wh=window_h, ww=window_w)


def windows_merge(x: torch.Tensor, window_h: int, window_w: int, height: int, width: int) -> torch.Tensor:
    """(B, nW, heads, window_h*window_w, d) -> (B, H, W, heads*d), the inverse of :func:`windows_partition`."""
    return rearrange(x, "b (nh nw) heads (wh ww) d -> b (nh wh) (nw ww) (heads d)",
                     nh=height // window_h, wh=window_h)


@functools.lru_cache(maxsize=4)  # (nW, N, N) is 1 KB per padded pixel: keep the two layouts of two sizes
def shift_mask(window_h: int, window_w: int, height: int, width: int,
               device: torch.device | None = None) -> torch.Tensor:
    """Swin-style mask of a window layout rolled by half a window: (nW, N, N), 0 within a region, -100 across.

    The image (height x width, multiples of the window) is cut into 3 x 3 regions at ``-window`` and
    ``-window // 2`` from the bottom/right edge; tokens of different regions that share a rolled window
    must not attend to each other. Cached per size: the official code recomputes it on every call.
    """
    def bands(size: int, window: int) -> torch.Tensor:
        labels = torch.zeros(size, dtype=torch.long, device="cpu")  # never a meta tensor in the cache
        labels[size - window:] = 1
        labels[size - window // 2:] = 2
        return labels

    region = bands(height, window_h)[:, None] * 3 + bands(width, window_w)[None, :]  # (H, W)
    region = rearrange(region, "(nh wh) (nw ww) -> (nh nw) (wh ww)", wh=window_h, ww=window_w)  # (nW, N)
    different = region[:, None, :] != region[:, :, None]  # (nW, N, N)
    return torch.zeros(different.shape, device="cpu").masked_fill(different, -100.0).to(device)


def relative_position_offsets(window_h: int, window_w: int) -> torch.Tensor:
    """Every (dy, dx) offset inside a window, dy-major: ((2wh-1)*(2ww-1), 2) float32 (the ``rpe_biases``)."""
    dy = torch.arange(1 - window_h, window_h)
    dx = torch.arange(1 - window_w, window_w)
    return torch.stack(torch.meshgrid(dy, dx, indexing="ij"), dim=-1).reshape(-1, 2).float()


def relative_position_index(window_h: int, window_w: int) -> torch.Tensor:
    """(N, N) int64: row of :func:`relative_position_offsets` holding the offset from token j to token i."""
    ys, xs = torch.meshgrid(torch.arange(window_h), torch.arange(window_w), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()  # (N,)
    dy = ys[:, None] - ys[None, :] + window_h - 1
    dx = xs[:, None] - xs[None, :] + window_w - 1
    return dy * (2 * window_w - 1) + dx


def recursion_depth(height: int, width: int, training: bool) -> int:
    """RG-SA's number of stride-4 reductions (spec 2.3; the official ``int(math.log(n, 4))``, exactly).

    Test time: max(log4(H//16), log4(W//16)), at least 2 (the training value); training: max over H//4, W//4.
    """
    def log4(n: int) -> int:
        return (n.bit_length() - 1) // 2

    if training:
        return max(log4(height // 4), log4(width // 4))
    return max(log4(height // 16), log4(width // 16), 2)


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth: drop whole samples of a residual branch with probability p (training only)."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - p)
    return x * keep / (1 - p)


#################################################################################
#                         Dynamic relative position bias                        #
#################################################################################


class DynamicPosBias(nn.Module):
    """MLP from a relative (dy, dx) offset to one bias per head (CrossFormer's dynamic position bias)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        hidden = dim // 4  # ((embed_dim/2)/4)/4 for the released model: 5
        self.pos_proj = nn.Linear(2, hidden)
        self.pos1 = nn.Sequential(nn.LayerNorm(hidden), nn.ReLU(), nn.Linear(hidden, hidden))
        self.pos2 = nn.Sequential(nn.LayerNorm(hidden), nn.ReLU(), nn.Linear(hidden, hidden))
        self.pos3 = nn.Sequential(nn.LayerNorm(hidden), nn.ReLU(), nn.Linear(hidden, num_heads))

    def forward(self, offsets: torch.Tensor) -> torch.Tensor:
        return self.pos3(self.pos2(self.pos1(self.pos_proj(offsets))))  # (num_offsets, heads)


class WindowAttention(nn.Module):
    """Attention inside window_h x window_w windows, with a dynamic position bias (one half of L-SA)."""

    def __init__(self, dim: int, num_heads: int, window_h: int, window_w: int, qk_scale: float | None):
        super().__init__()
        self.num_heads, self.window_h, self.window_w = num_heads, window_h, window_w
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.pos = DynamicPosBias(dim // 4, num_heads)
        # Stored in the official files (and ours); deterministic.
        self.register_buffer("rpe_biases", relative_position_offsets(window_h, window_w))
        # Recomputed, never saved (the official files hold it; checked on loading).
        self.register_buffer("relative_position_index", relative_position_index(window_h, window_w), persistent=False)

    def position_bias(self) -> torch.Tensor:
        n = self.window_h * self.window_w
        table = self.pos(self.rpe_biases)  # (num_offsets, heads)
        return table[self.relative_position_index.view(-1)].view(n, n, -1).permute(2, 0, 1)  # (heads, N, N)

    def forward(self, qkv: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """qkv (3, B, H, W, heads, d) with H, W multiples of the window; mask (nW, N, N) or None -> (B, H, W, C)."""
        _, batch, height, width = qkv.shape[:4]
        q, k, v = (windows_partition(t, self.window_h, self.window_w) for t in qkv)  # (B, nW, heads, N, d)
        num_windows, n, d = q.shape[1], q.shape[3], q.shape[4]
        bias = self.position_bias().to(q.dtype)  # (heads, N, N)
        # 4-D masks: PyTorch's fused CPU kernel takes them (a 3-D mask falls back to the slower math path).
        if mask is None:  # one bias for every window: windows fold into the batch
            q, k, v = (t.reshape(batch * num_windows, self.num_heads, n, d) for t in (q, k, v))
            attn_mask = bias[None]  # (1, heads, N, N)
        else:  # a mask per window: windows fold into the heads, the batch broadcasts
            q, k, v = (t.reshape(batch, num_windows * self.num_heads, n, d) for t in (q, k, v))
            attn_mask = (mask.to(q.dtype)[:, None] + bias[None]).reshape(1, num_windows * self.num_heads, n, n)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=self.scale)
        out = out.view(batch, num_windows, self.num_heads, n, d)
        return windows_merge(out, self.window_h, self.window_w, height, width)  # (B, H, W, C)


#################################################################################
#                      L-SA: local rectangle-window attention                   #
#################################################################################


class L_SA(nn.Module):
    """Half the channels attend in (split[0] x split[1]) windows, half in (split[1] x split[0]) windows.

    ``shifted`` rolls both layouts by half a window (with the region mask) so information crosses windows.
    """

    def __init__(self, dim: int, num_heads: int, split_size: tuple[int, int], shifted: bool, qkv_bias: bool,
                 qk_scale: float | None):
        super().__init__()
        self.split_size, self.shifted = tuple(split_size), shifted
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        first, second = self.split_size  # released: 8 x 32 windows for the first half, 32 x 8 for the second
        self.attns = nn.ModuleList([WindowAttention(dim // 2, num_heads // 2, first, second, qk_scale),
                                    WindowAttention(dim // 2, num_heads // 2, second, first, qk_scale)])
        self.get_v = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)  # locality complementary module on v

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        batch, _, dim = x.shape
        qkv = self.qkv(x).view(batch, height, width, 3 * dim)  # (B, H, W, 3C)
        lcm = self.get_v(rearrange(qkv[..., 2 * dim:], "b h w c -> b c h w"))  # (B, C, H, W)
        # Reproduced: q/k/v are zero-padded *after* the projection and padded keys are not masked.
        pad = max(self.split_size)
        padded_h, padded_w = -(-height // pad) * pad, -(-width // pad) * pad
        qkv = F.pad(qkv, (0, 0, 0, padded_w - width, 0, padded_h - height))  # (B, H', W', 3C)
        heads = self.attns[0].num_heads
        qkv = rearrange(qkv, "b h w (three half heads d) -> half three b h w heads d", three=3, half=2, heads=heads)
        halves = []
        for half, attn in zip(qkv, self.attns):  # (3, B, H', W', heads, d)
            shift, mask = (attn.window_h // 2, attn.window_w // 2), None
            if self.shifted:
                half = torch.roll(half, shifts=(-shift[0], -shift[1]), dims=(2, 3))
                mask = shift_mask(attn.window_h, attn.window_w, padded_h, padded_w, x.device)
            out = attn(half, mask)  # (B, H', W', C/2)
            if self.shifted:
                out = torch.roll(out, shifts=shift, dims=(1, 2))
            halves.append(out[:, :height, :width])
        out = torch.cat(halves, dim=-1) + rearrange(lcm, "b c h w -> b h w c")  # (B, H, W, C)
        return self.proj(out.reshape(batch, height * width, dim))  # (B, HW, C)


#################################################################################
#                   RG-SA: recursive-generalisation attention                   #
#################################################################################


class RG_SA(nn.Module):
    """Every token attends to a recursively reduced (1/16 or 1/64 per side) summary of the whole image."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool, qk_scale: float | None, c_ratio: float):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"RGT embed_dim {dim} must be divisible by num_heads {num_heads}; change one of them.")
        self.num_heads = num_heads
        self.cr = int(dim * c_ratio)  # reduced channels of q/k
        self.scale = qk_scale or (dim // num_heads * c_ratio) ** -0.5
        self.reduction1 = nn.Conv2d(dim, dim, 4, 4, groups=dim)  # applied T times (recursion)
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)
        self.conv = nn.Conv2d(dim, self.cr, 1)
        self.norm_act = nn.Sequential(nn.LayerNorm(self.cr), nn.GELU())
        self.q = nn.Linear(dim, self.cr, bias=qkv_bias)
        self.k = nn.Linear(self.cr, self.cr, bias=qkv_bias)
        self.v = nn.Linear(self.cr, dim, bias=qkv_bias)
        self.cpe = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)  # conditional position encoding on v
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        summary = rearrange(x, "b (h w) c -> b c h w", h=height)  # (B, C, H, W)
        for _ in range(recursion_depth(height, width, self.training)):
            summary = self.reduction1(summary)  # (B, C, H/4^t, W/4^t)
        summary = self.conv(self.dwconv(summary))  # (B, C', h, w)
        reduced_h = summary.shape[2]
        summary = self.norm_act(rearrange(summary, "b c h w -> b (h w) c"))  # (B, n, C')
        q = rearrange(self.q(x), "b n (heads d) -> b heads n d", heads=self.num_heads)  # (B, heads, N, C'/heads)
        k = rearrange(self.k(summary), "b n (heads d) -> b heads n d", heads=self.num_heads)
        v = self.v(summary)  # (B, n, C)
        v = v + rearrange(self.cpe(rearrange(v, "b (h w) c -> b c h w", h=reduced_h)), "b c h w -> b (h w) c")
        v = rearrange(v, "b n (heads d) -> b heads n d", heads=self.num_heads)  # (B, heads, n, C/heads)
        # The fused SDPA kernels need one head width for q, k and v (here q/k C'/heads, v C/heads): zero-padding
        # the narrower ones leaves every dot product unchanged, and the fused kernel never holds the
        # (N, n) score matrix, which grows with the square of the frame area (6.4 GB at 512x512 for x2).
        width = max(q.shape[-1], v.shape[-1])
        q, k, v_padded = (F.pad(t, (0, width - t.shape[-1])) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v_padded, scale=self.scale)[..., :v.shape[-1]]  # (B, heads, N, C/heads)
        return self.proj(rearrange(out, "b heads n d -> b n (heads d)"))  # (B, N, C)


#################################################################################
#                                  Gated MLP                                    #
#################################################################################


class Gate(nn.Module):
    """Spatial gate: the second half of the features, normalised and depth-wise convolved, gates the first."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.conv = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        value, gate = x.chunk(2, dim=-1)  # (B, N, C/2) each
        gate = self.conv(rearrange(self.norm(gate), "b (h w) c -> b c h w", h=height))
        return value * rearrange(gate, "b c h w -> b (h w) c")  # (B, N, C/2)


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.sg = Gate(hidden // 2)
        self.fc2 = nn.Linear(hidden // 2, dim)

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        return self.fc2(self.sg(self.act(self.fc1(x)), height, width))  # (B, N, C)


#################################################################################
#                             Block and residual group                          #
#################################################################################


def is_shifted(group: int, block: int) -> bool:
    """The official shift schedule (reproduced): even groups shift blocks 2, 6, ...; odd groups 0, 4, ..."""
    if group % 2 == 0:
        return block > 0 and (block - 2) % 4 == 0
    return block % 4 == 0


class Block(nn.Module):
    """x + Attn(LN x), + MLP(LN .), + gamma * x (HAI). L-SA at even indices, RG-SA at odd ones."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, qk_scale: float | None,
                 drop_path: float, group: int, index: int, split_size: tuple[int, int], c_ratio: float):
        super().__init__()
        self.drop_path = drop_path
        self.norm1 = nn.LayerNorm(dim)
        if index % 2 == 0:
            self.attn = L_SA(dim, num_heads, split_size, is_shifted(group, index), qkv_bias, qk_scale)
        else:
            self.attn = RG_SA(dim, num_heads, qkv_bias, qk_scale, c_ratio)
        self.mlp = MLP(dim, int(dim * mlp_ratio))
        self.norm2 = nn.LayerNorm(dim)
        self.gamma = nn.Parameter(torch.full((dim,), 1e-4))  # hybrid adaptive integration

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        out = x + drop_path(self.attn(self.norm1(x), height, width), self.drop_path, self.training)
        out = out + drop_path(self.mlp(self.norm2(out), height, width), self.drop_path, self.training)
        return out + x * self.gamma  # (B, N, C)


def residual_conv(dim: int, kind: str) -> nn.Module:
    """The convolution closing a residual group and the body: one 3x3 conv, or a 3x3-1x1-3x3 bottleneck (dim/4)."""
    if kind == "1conv":
        return nn.Conv2d(dim, dim, 3, 1, 1)
    return nn.Sequential(nn.Conv2d(dim, dim // 4, 3, 1, 1), nn.LeakyReLU(0.2), nn.Conv2d(dim // 4, dim // 4, 1),
                         nn.LeakyReLU(0.2), nn.Conv2d(dim // 4, dim, 3, 1, 1))


class ResidualGroup(nn.Module):
    def __init__(self, dim: int, depth: int, group: int, drop_paths: list[float], resi_connection: str,
                 **block_args):
        super().__init__()
        self.blocks = nn.ModuleList([Block(dim, drop_path=drop_paths[i], group=group, index=i, **block_args)
                                     for i in range(depth)])
        self.conv = residual_conv(dim, resi_connection)
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        out = x
        for block in self.blocks:
            if self.gradient_checkpointing and self.training:
                out = checkpoint(block, out, height, width, use_reentrant=False)
            else:
                out = block(out, height, width)  # (B, N, C)
        out = self.conv(rearrange(out, "b (h w) c -> b c h w", h=height))  # (B, C, H, W)
        return x + rearrange(out, "b c h w -> b (h w) c")  # (B, N, C)


#################################################################################
#                                  Upsampler                                    #
#################################################################################


class Upsample(nn.Sequential):
    """Pixel-shuffle upsampler: log2(s) x (conv to 4x channels, shuffle 2) for s = 2^n, or one x3 step."""

    def __init__(self, scale: int, num_feat: int):
        if scale >= 2 and scale & (scale - 1) == 0:
            layers = []
            for _ in range(scale.bit_length() - 1):
                layers += [nn.Conv2d(num_feat, 4 * num_feat, 3, 1, 1), nn.PixelShuffle(2)]
        elif scale == 3:
            layers = [nn.Conv2d(num_feat, 9 * num_feat, 3, 1, 1), nn.PixelShuffle(3)]
        else:
            raise ValueError(f"RGT upscale {scale} is not supported; use 2, 3, 4 (or another power of 2).")
        super().__init__(*layers)


def scale_from_state_dict(state: dict[str, torch.Tensor]) -> int:
    """The upscale factor a state dict was trained for, from its ``upsample.*`` convolutions (None if absent)."""
    convs = sorted(k for k in state if k.startswith("upsample.") and k.endswith(".weight"))
    if len(convs) == 1 and state[convs[0]].shape[0] == 9 * state[convs[0]].shape[1]:
        return 3
    if convs and all(state[k].shape[0] == 4 * state[k].shape[1] for k in convs):
        return 2 ** len(convs)
    return None


#################################################################################
#                                     RGT                                       #
#################################################################################


class RGTModel(ModelMixin, ConfigMixin):
    """RGT super-resolution network: (B, in_chans, H, W) in [0, 1] -> (B, in_chans, H*upscale, W*upscale).

    The constructor takes the fields of the official ``network_g`` (``RGTModel.from_config(yaml["network_g"])``);
    ``IGNORED_CONFIG_KEYS`` have no effect and ``REQUIRED_CONFIG_VALUES`` lists values that are refused
    otherwise. Defaults: the released RGT x2 (``options/test/test_RGT_x2.yml``).
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        upscale: int = 2,
        in_chans: int = 3,
        img_size: int = 64,
        img_range: float = 1.0,
        depth: list[int] = (6, 6, 6, 6, 6, 6, 6, 6),
        embed_dim: int = 180,
        num_heads: list[int] = (6, 6, 6, 6, 6, 6, 6, 6),
        mlp_ratio: float = 2.0,
        resi_connection: str = "1conv",
        split_size: list[int] = (8, 32),
        c_ratio: float = 0.5,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
        use_chk: bool = False,
        upsampler: str = "pixelshuffle",
        type: str = "RGT",  # the official network_g names the architecture here
    ):
        super().__init__()
        requested = {"upsampler": upsampler, "drop_rate": drop_rate, "attn_drop_rate": attn_drop_rate, "type": type}
        for key, value in requested.items():
            if value != REQUIRED_CONFIG_VALUES[key]:
                raise ValueError(f"RGT config {key}={value!r} is not supported; the released models use "
                                 f"{REQUIRED_CONFIG_VALUES[key]!r}, set it to that value.")
        if len(depth) != len(num_heads):
            raise ValueError(f"RGT depth {list(depth)} and num_heads {list(num_heads)} must have one entry per "
                             "residual group; give both the same length.")
        if resi_connection not in RESIDUAL_CONVS:
            raise ValueError(f"RGT resi_connection {resi_connection!r} is not one of {', '.join(RESIDUAL_CONVS)}.")
        if len(split_size) != 2 or min(split_size) < 2 or max(split_size) % min(split_size):
            raise ValueError(f"RGT split_size {list(split_size)} must be two window sides >= 2, the longer a multiple "
                             "of the shorter (released: [8, 32]).")
        if embed_dim % 2 or any(h < 2 or (embed_dim // 2) % (h // 2) for h in num_heads):
            raise ValueError(f"RGT embed_dim {embed_dim} must be even and its half divisible by half of every "
                             f"num_heads {list(num_heads)} (L-SA splits channels and heads in halves).")
        self.upscale, self.img_range = upscale, img_range
        mean = torch.tensor(RGB_MEAN) if in_chans == 3 else torch.zeros(in_chans)
        self.register_buffer("mean", mean.view(1, in_chans, 1, 1), persistent=False)  # not in the official files

        # Shallow features.
        self.conv_first = nn.Conv2d(in_chans, embed_dim, 3, 1, 1)
        # Deep features: residual groups on tokens.
        self.before_RG = nn.Sequential(Rearrange("b c h w -> b (h w) c"), nn.LayerNorm(embed_dim))
        total = sum(depth)  # stochastic depth grows linearly with the block index
        rates = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        starts = [sum(depth[:i]) for i in range(len(depth))]
        self.layers = nn.ModuleList([
            ResidualGroup(embed_dim, depth[i], group=i, drop_paths=rates[starts[i]:starts[i] + depth[i]],
                          num_heads=num_heads[i], mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, qk_scale=qk_scale,
                          split_size=tuple(split_size), c_ratio=c_ratio, resi_connection=resi_connection)
            for i in range(len(depth))])
        self.norm = nn.LayerNorm(embed_dim)
        self.conv_after_body = residual_conv(embed_dim, resi_connection)
        # Reconstruction.
        self.conv_before_upsample = nn.Sequential(nn.Conv2d(embed_dim, NUM_FEAT, 3, 1, 1), nn.LeakyReLU())
        self.upsample = Upsample(upscale, NUM_FEAT)
        self.conv_last = nn.Conv2d(NUM_FEAT, in_chans, 3, 1, 1)
        self.apply(self._init_weights)
        if use_chk:
            self.enable_gradient_checkpointing()

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # RGT's own init: Linear trunc-normal std 0.02 / bias 0, LayerNorm 1 / 0; convs keep PyTorch's default.
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def enable_gradient_checkpointing(self, *args, **kwargs) -> None:
        for layer in self.layers:
            layer.gradient_checkpointing = True

    def disable_gradient_checkpointing(self) -> None:
        for layer in self.layers:
            layer.gradient_checkpointing = False

    def check_size(self, height: int, width: int) -> None:
        """Refuse frames RG-SA cannot reduce (the official code fails inside math.log or a convolution)."""
        depth = recursion_depth(height, width, self.training) if min(height, width) >= MIN_SIDE else 0
        if min(height, width) < MIN_SIDE or min(height, width) < 4 ** depth:
            need = max(MIN_SIDE, 4 ** depth)
            raise ValueError(f"RGT needs input sides of at least {need} px for a {width}x{height} frame (RG-SA "
                             f"reduces the frame by 4^{max(depth, 2)}); pad or upscale the frame first.")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        tokens = self.before_RG(x)  # (B, HW, C)
        for layer in self.layers:
            tokens = layer(tokens, height, width)  # (B, HW, C)
        return rearrange(self.norm(tokens), "b (h w) c -> b c h w", h=height)  # (B, C, H, W)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, H, W) in [0, 1] -> (B, in_chans, sH, sW), not clamped."""
        self.check_size(*x.shape[-2:])
        mean = self.mean.to(x.dtype)
        x = (x - mean) * self.img_range
        x = self.conv_first(x)  # (B, C, H, W)
        x = self.conv_after_body(self.forward_features(x)) + x  # (B, C, H, W)
        x = self.conv_before_upsample(x)  # (B, 64, H, W)
        x = self.conv_last(self.upsample(x))  # (B, in_chans, sH, sW)
        return x / self.img_range + mean

    # ----------------------------------------------------------------------- loading

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, subfolder: str | None = None,
                        torch_dtype: torch.dtype | None = None, device: str | torch.device | None = None,
                        **config_overrides) -> RGTModel:
        """Load a ``save_pretrained`` folder (``config.json`` + ``diffusion_pytorch_model.safetensors``), strictly."""
        return load_pretrained(cls, path, subfolder=subfolder, torch_dtype=torch_dtype, device=device,
                               **config_overrides)

    def official_buffer_shapes(self) -> dict[str, tuple[int, ...]]:
        """Keys and shapes of the deterministic buffers the official files store and this model recomputes.

        Per L-SA half ``relative_position_index`` (N, N); per shifted L-SA ``attn_mask_0/1`` for an
        ``img_size`` x ``img_size`` padded frame (the only effect of ``img_size``)."""
        return {k: tuple(v.shape) for k, v in self.official_buffers().items()}

    def official_buffers(self) -> dict[str, torch.Tensor]:
        """The deterministic buffers of the official state dict, computed (see :meth:`official_buffer_shapes`)."""
        size = self.config.img_size
        buffers = {}
        for name, module in self.named_modules():
            if isinstance(module, WindowAttention):
                buffers[f"{name}.relative_position_index"] = relative_position_index(module.window_h, module.window_w)
            elif isinstance(module, L_SA) and module.shifted:
                for i, attn in enumerate(module.attns):
                    buffers[f"{name}.attn_mask_{i}"] = shift_mask(attn.window_h, attn.window_w, size, size)
        return buffers

    @classmethod
    def from_official_checkpoint(cls, path: str | os.PathLike, config: dict | str | None = None,
                                 torch_dtype: torch.dtype | None = None,
                                 device: str | torch.device | None = None) -> RGTModel:
        """Load an official basicsr file (``RGT_x2.pth``, ``RGT_x4.pth``: ``{"params": ...}`` / ``params_ema``).

        ``params_ema`` is preferred when present and a leading ``module.`` is stripped (basicsr's loader).
        The upscale factor comes from the file's upsampler, so an x4 file cannot meet an x2 network;
        ``config``: a registry name or ``network_g`` fields for the rest (default: the released RGT).
        The stored index/mask buffers must equal the recomputed ones; every other key is loaded strictly.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"RGT checkpoint {path} does not exist; expected an official RGT_x2.pth / "
                                    "RGT_x4.pth file.")
        expected = ("an official RGT checkpoint (a torch file holding {'params_ema' or 'params': RGT state dict}, "
                    "e.g. RGT_x2.pth / RGT_x4.pth)")
        try:
            payload = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - garbage, a video, a pickle with objects: all "not this file"
            raise ValueError(f"{path} is not {expected} ({type(err).__name__}).") from None
        state = None
        if isinstance(payload, dict):
            state = payload.get("params_ema", payload.get("params"))
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            found = sorted(payload)[:8] if isinstance(payload, dict) else type(payload).__name__
            raise ValueError(f"{path} is not {expected}; found {found}.")
        state = {k.removeprefix("module."): v for k, v in state.items()}
        scale = scale_from_state_dict(state)
        if scale is None or "conv_first.weight" not in state:
            raise ValueError(f"{path} is not {expected}: it has no conv_first/upsample.* weights.")
        layout = "of the config passed in (a .pth carries no config)"
        if config is None:
            config = rgt_config(f"RGT-x{scale}")
            layout = f"of the released RGT-x{scale} size (a .pth carries no config; save other sizes with save_pretrained)"
        elif isinstance(config, str):
            config = rgt_config(config)
        config = dict(config)
        if config.get("upscale", scale) != scale:
            raise ValueError(f"{path} holds x{scale} weights but the config asks for upscale {config['upscale']}; "
                             f"use the x{config['upscale']} file or drop upscale from the config.")
        config["upscale"] = scale
        model = cls.from_config(config)
        computed = model.official_buffers()
        for key, value in computed.items():
            if key in state and (state[key].shape != value.shape or not torch.equal(state[key].to(value.dtype), value)):
                raise ValueError(f"{path}: buffer {key} differs from the one RGT computes for its config; the file "
                                 "was made with another split_size or img_size (pass config=...).")
        dropped = [k for k in computed if k in state]
        state = {k: v for k, v in state.items() if k not in computed}
        check_state_dict(model, state, str(path), layout)
        logger.info("%s: x%d RGT; %d stored index/mask buffers checked against the recomputed ones and dropped",
                    path.name, scale, len(dropped))
        dtype = torch_dtype or torch.float32
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
        model.load_state_dict(state, strict=True)
        torch.nn.Module.to(model, device=device, dtype=dtype)
        return model.eval()


def load_rgt(path: str | os.PathLike, torch_dtype: torch.dtype | None = None,
             device: str | torch.device | None = None) -> RGTModel:
    """An official ``.pth`` file or a ``save_pretrained`` folder, in eval mode."""
    path = Path(path)
    if path.is_dir():
        return RGTModel.from_pretrained(path, torch_dtype=torch_dtype, device=device).eval()
    return RGTModel.from_official_checkpoint(path, torch_dtype=torch_dtype, device=device)


#################################################################################
#                              Named model sizes                                #
#################################################################################
# The paper's models (Chen et al., ICLR 2024, table 1 and the RGT repository's test YAMLs): RGT has 8 residual
# groups, RGT-S 6; both 6 blocks per group, width 180, 6 heads, split [8, 32], mlp_ratio 2, c_ratio 0.5.
# Open-Sora-Plan v1.0.0 uses RGT-x2 and RGT-x4.

_RGT = {"depth": [6] * 8, "num_heads": [6] * 8, "embed_dim": 180, "mlp_ratio": 2.0, "split_size": [8, 32], "c_ratio": 0.5}
_RGT_S = dict(_RGT, depth=[6] * 6, num_heads=[6] * 6)

RGT_CONFIGS: dict[str, dict] = {
    "RGT-x2": dict(_RGT, upscale=2),
    "RGT-x3": dict(_RGT, upscale=3),
    "RGT-x4": dict(_RGT, upscale=4),
    "RGT-S-x2": dict(_RGT_S, upscale=2),
    "RGT-S-x3": dict(_RGT_S, upscale=3),
    "RGT-S-x4": dict(_RGT_S, upscale=4),
}


def rgt_config(name: str, **overrides) -> dict:
    """Constructor arguments of a named size, with overrides."""
    if name not in RGT_CONFIGS:
        raise ValueError(f"Unknown RGT size {name!r}; choose one of {', '.join(RGT_CONFIGS)}.")
    return dict(RGT_CONFIGS[name], **overrides)


def build_rgt(name: str, **overrides) -> RGTModel:
    """A randomly initialised RGT of a named size, e.g. ``build_rgt("RGT-x2")``."""
    return RGTModel(**rgt_config(name, **overrides))
