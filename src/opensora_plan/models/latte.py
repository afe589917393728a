"""LatteT2V: the text-to-video latent diffusion transformer of Open-Sora-Plan v1.0.0 (spec section 2).

Read top to bottom: helpers and the config contract, embedders (patches, timestep/adaLN-single,
captions), attention and feed-forward, the spatial and temporal blocks, the model (whose final layer
lives on the model itself because its tensors are top-level checkpoint keys), position-embedding
functions, and at the end a registry of named sizes (``LatteT2V-XL/122`` = the released models).

Token layouts used throughout (B = batch, F = latent frames, N = patches per frame, D = width):
- spatial blocks see ``(B, F, N, D)`` and attend over N within each frame;
- temporal blocks see ``(B, N, F, D)`` and attend over F at each patch position;
- per-sample conditioning (timestep modulation, captions) is kept at batch size B and broadcast,
  never repeated per frame or per patch.

State-dict keys are the official ones, so the released ``diffusion_pytorch_model.safetensors`` files
load with strict keys (``LatteT2V.from_pretrained``).
"""

from __future__ import annotations

import contextlib
import math
import os
from functools import lru_cache

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from .layers import attention, base_linear, cached_weight, linear, lora_delta, project
from .loading import load_pretrained
from .step_cache import StepCache

# Config keys the official configs carry that select nothing in the code path the checkpoints use
# (accepted so that the shipped config.json files load unchanged; their values are ignored).
IGNORED_CONFIG_KEYS = {
    "norm_num_groups": "GroupNorm of the continuous-input path; patch inputs never use it",
    "num_embeds_ada_norm": "class-embedding table size of ada_norm; ada_norm_single embeds timesteps sinusoidally",
    "use_linear_projection": "proj_in choice of the continuous-input path; patch inputs never use it",
    "upcast_attention": "SDPA accumulates the softmax in float32 anyway; the reference's SDPA processor ignores it too",
    "attention_mode": "xformers/flash/math all compute the same attention; SDPA picks the kernel "
    "(pin one with opensora_plan.models.layers.sdpa_backend)",
}

# Config keys that must keep the value of the released models: other values select code paths of the
# reference that no checkpoint uses and that are not implemented here.
REQUIRED_CONFIG_VALUES = {
    "norm_type": "ada_norm_single",
    "activation_fn": "gelu-approximate",
    "attention_type": "default",
    "num_vector_embeds": None,
    "only_cross_attention": False,
    "double_self_attention": False,
    "patch_size_t": 1,
}

ATTENTION_MODES = ("xformers", "flash", "math")


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation x * (1 + scale) + shift (one fused multiply-add pass)."""
    return torch.addcmul(shift, x, 1 + scale)


def gated_residual(x: torch.Tensor, gate: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
    """x + gate * update (one fused multiply-add pass)."""
    return torch.addcmul(x, gate, update)


def temporal_interpolation_scale(video_length: int) -> int:
    """Temporal position-embedding scale as the training script derives it: 5 frames -> 1, 17 -> 3."""
    return max(video_length // 5, 1)


def spatial_interpolation_scale(sample_size: tuple[int, int]) -> int:
    """2-D position-embedding scale as the training script derives it (64 latent rows = 512 px -> 1)."""
    return max(sample_size[0] // 64, 1)


#################################################################################
#                 Embedders: patches, timesteps (adaLN-single), captions        #
#################################################################################


class PatchEmbed(nn.Module):
    """Conv2d patchify (kernel = stride = patch) plus the fixed 2-D sin-cos position embedding."""

    def __init__(self, sample_size: tuple[int, int], patch_size: int, in_channels: int, embed_dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, embed_dim, kernel_size=patch_size, stride=patch_size, bias=True)
        self.set_sample_size(sample_size)

    def set_sample_size(self, sample_size: tuple[int, int]) -> None:
        """(Re)compute the position-embedding buffer for a training latent size (h, w)."""
        self.grid_size = (sample_size[0] // self.patch_size, sample_size[1] // self.patch_size)
        # The training grid height sets the coordinate scale for every resolution (PixArt convention).
        self.base_size = self.grid_size[0]
        self.interpolation_scale = spatial_interpolation_scale(sample_size)
        pos_embed = get_2d_sincos_pos_embed(self.proj.out_channels, self.grid_size, self.base_size,
                                            self.interpolation_scale)
        # Not in the checkpoints (persistent=False): recomputed from the config.
        # clone(): the function's result is cached and shared, the buffer must own its storage.
        self.register_buffer("pos_embed", pos_embed.unsqueeze(0).to(self.proj.weight.dtype, copy=True),
                             persistent=False)  # (1, N, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grid = (x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size)
        x = self.proj(x).flatten(2).transpose(1, 2)  # (B*F, N, D)
        if grid == self.grid_size:
            pos_embed = self.pos_embed
        else:
            # Off-size latent: new grid, same training base_size, so other resolutions work (spec 2.4).
            pos_embed = get_2d_sincos_pos_embed(x.shape[-1], grid, self.base_size, self.interpolation_scale)
            pos_embed = pos_embed.unsqueeze(0).to(x.device)
        # The reference adds in the embedding's dtype (float32) and casts back: same here.
        return (x + pos_embed).to(x.dtype)


class TimestepEmbedder(nn.Module):
    """Sinusoidal projection (256 channels, cos half first) -> Linear -> SiLU -> Linear."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.linear_1 = nn.Linear(frequency_embedding_size, hidden_size)
        self.linear_2 = nn.Linear(hidden_size, hidden_size)

    @staticmethod
    def timestep_frequencies(t: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
        """(B,) steps -> (B, dim) [cos | sin] features, always computed in float32 (dtype-safe:
        step 999 times the highest frequency is not representable in half precision)."""
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]  # (B, half)
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, dim)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t_freq = self.timestep_frequencies(t, self.frequency_embedding_size).to(self.linear_1.weight.dtype)
        return self.linear_2(F.silu(self.linear_1(t_freq)))  # (B, D)


class _TimestepConditioning(nn.Module):
    """Holder that reproduces the official key prefix ``adaln_single.emb.timestep_embedder``."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.timestep_embedder = TimestepEmbedder(hidden_size)


class AdaLayerNormSingle(nn.Module):
    """adaLN-single (PixArt-alpha): one timestep MLP shared by all blocks; no size conditioning."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.emb = _TimestepConditioning(hidden_size)
        self.linear = nn.Linear(hidden_size, 6 * hidden_size)

    def forward(self, timestep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,) -> block modulation (B, 6*D) and the embedded timestep (B, D) for the final layer."""
        embedded_timestep = self.emb.timestep_embedder(timestep)  # (B, D)
        return self.linear(F.silu(embedded_timestep)), embedded_timestep


class CaptionProjection(nn.Module):
    """T5 states (.., caption_channels) -> (.., D): Linear -> GELU(tanh) -> Linear."""

    def __init__(self, in_features: int, hidden_size: int, num_tokens: int = 120):
        super().__init__()
        # Reference quirk kept on purpose (spec 8.10): a persistent, never-used PixArt leftover that
        # every released checkpoint stores, so strict loading needs it.
        self.register_buffer("y_embedding", torch.randn(num_tokens, in_features) / in_features**0.5)
        self.linear_1 = nn.Linear(in_features, hidden_size)
        self.linear_2 = nn.Linear(hidden_size, hidden_size)

    def forward(self, caption: torch.Tensor) -> torch.Tensor:
        hidden = linear(caption, self.linear_1.weight, self.linear_1.bias, "gelu_tanh")
        return linear(hidden, self.linear_2.weight, self.linear_2.bias)


#################################################################################
#                          Attention and feed-forward                           #
#################################################################################


class Attention(nn.Module):
    """Multi-head attention through :func:`layers.attention` (SDPA; keys ``to_q/to_k/to_v/to_out.0``).

    ``bias`` is an additive float mask broadcastable to (G, heads, S, L), e.g. (G, 1, 1, L).
    """

    def __init__(self, query_dim: int, heads: int, dim_head: int, context_dim: int | None = None,
                 bias: bool = True, dropout: float = 0.0):
        super().__init__()
        inner_dim = heads * dim_head
        context_dim = query_dim if context_dim is None else context_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner_dim, bias=bias)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=bias)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(inner_dim, query_dim, bias=True), nn.Dropout(dropout)])

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                bias: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        groups, length, _ = x.shape

        def split_heads(t: torch.Tensor) -> torch.Tensor:  # (G, S, h*d) -> (G, h, S, d)
            return t.view(t.shape[0], t.shape[1], self.heads, -1).transpose(1, 2)

        if context is x and not torch.is_grad_enabled():
            # Inference: one GEMM for the three self-attention projections instead of three.
            q, k, v = linear(x, *self._stacked_qkv()).chunk(3, dim=-1)
            q, k, v = (t if d is None else t + d for t, d in  # LoRA updates, if any (layers.project)
                       zip((q, k, v), (lora_delta(m, x) for m in (self.to_q, self.to_k, self.to_v))))
        else:
            q, k, v = project(self.to_q, x), project(self.to_k, context), project(self.to_v, context)
        out = attention(split_heads(q), split_heads(k), split_heads(v), bias)  # (G, h, S, d)
        out = out.transpose(1, 2).reshape(groups, length, -1)  # (G, S, h*d)
        return self.to_out[1](project(self.to_out[0], out))

    def _stacked_qkv(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(3*h*d, D) weight and (3*h*d,) bias of to_q, to_k, to_v: rebuilt per call (cheap next to the
        GEMM), or kept for a sampling loop by ``layers.inference_weight_cache`` (never stale: keyed on
        the source weights' versions)."""
        q, k, v = (base_linear(m) for m in (self.to_q, self.to_k, self.to_v))  # a LoRA wrapper's base layer
        weight = cached_weight("qkv", (q.weight, k.weight, v.weight), lambda: torch.cat([q.weight, k.weight, v.weight]))
        if q.bias is None:
            return weight, None
        return weight, cached_weight("qkv", (q.bias, k.bias, v.bias), lambda: torch.cat([q.bias, k.bias, v.bias]))


class GELUProjection(nn.Module):
    """Linear followed by tanh-approximated GELU (key ``proj``, as diffusers' GELU activation)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return project(self.proj, x, "gelu_tanh")


class FeedForward(nn.Module):
    """D -> 4D -> D MLP (keys ``net.0.proj`` and ``net.2``)."""

    def __init__(self, dim: int, dropout: float = 0.0, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(GELUProjection(dim, dim * mult), nn.Dropout(dropout), nn.Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gelu_proj, dropout, out = self.net
        return project(out, dropout(gelu_proj(x)))


#################################################################################
#                        Spatial and temporal blocks                            #
#################################################################################


def _block_modulation(table: torch.Tensor, t6: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """scale_shift_table (6, D) + per-sample t6 (B, 6, D) -> six (B, 1, 1, D) tensors:
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp (broadcast over the token grid)."""
    return (table[None] + t6).unsqueeze(2).chunk(6, dim=1)


class SpatialBlock(nn.Module):
    """Self-attention within each frame, cross-attention to the captions, FFN (keys ``transformer_blocks.i``)."""

    def __init__(self, dim: int, heads: int, dim_head: int, dropout: float, attention_bias: bool,
                 norm_elementwise_affine: bool, norm_eps: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps, elementwise_affine=norm_elementwise_affine)
        self.attn1 = Attention(dim, heads, dim_head, bias=attention_bias, dropout=dropout)
        self.attn2 = Attention(dim, heads, dim_head, context_dim=dim, bias=attention_bias, dropout=dropout)
        # Named norm2 as in the reference, where it normalises the FFN input (spec 8.9).
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps, elementwise_affine=norm_elementwise_affine)
        self.ff = FeedForward(dim, dropout=dropout)
        self.scale_shift_table = nn.Parameter(torch.randn(6, dim) / dim**0.5)

    def modulated_input(self, x: torch.Tensor, t6: torch.Tensor) -> torch.Tensor:
        """The self-attention input norm1(x) * (1 + scale_msa) + shift_msa, (B, F, N, D): TeaCache's probe."""
        shift_msa, scale_msa = _block_modulation(self.scale_shift_table, t6)[:2]
        return modulate(self.norm1(x), shift_msa, scale_msa)

    def forward(self, x: torch.Tensor, t6: torch.Tensor, context: torch.Tensor,
                context_bias: torch.Tensor | None) -> torch.Tensor:
        """x (B, F, N, D); t6 (B, 6, D); context (G, L, D) with G = B (one caption per video) or
        G = B*F (one caption per frame, joint image-video training); context_bias (G, 1, 1, L) or None."""
        batch, frames, tokens, dim = x.shape
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = _block_modulation(self.scale_shift_table, t6)

        h = modulate(self.norm1(x), shift_msa, scale_msa)  # (B, F, N, D)
        x = gated_residual(x, gate_msa, self.attn1(h.reshape(batch * frames, tokens, dim)).view(x.shape))

        # Reference quirk reproduced on purpose (spec 8.9): with adaLN-single the cross-attention reads
        # the un-normalised stream and is not gated. Attention is per query, so all frames that share a
        # caption are one query sequence: no per-frame copies of the captions or of their projections.
        queries = x.reshape(context.shape[0], -1, dim)  # (G, F*N/(G/B), D)
        x = x + self.attn2(queries, context, context_bias).view(x.shape)

        h = modulate(self.norm2(x), shift_mlp, scale_mlp)
        return gated_residual(x, gate_mlp, self.ff(h))  # (B, F, N, D)


class TemporalBlock(nn.Module):
    """Self-attention over the frames at each patch position, FFN (keys ``temporal_transformer_blocks.i``)."""

    def __init__(self, dim: int, heads: int, dim_head: int, dropout: float, attention_bias: bool,
                 norm_elementwise_affine: bool, norm_eps: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps, elementwise_affine=norm_elementwise_affine)
        self.attn1 = Attention(dim, heads, dim_head, bias=attention_bias, dropout=dropout)
        # Named norm3 as in the reference (the temporal block has no cross-attention and no norm2).
        self.norm3 = nn.LayerNorm(dim, eps=norm_eps, elementwise_affine=norm_elementwise_affine)
        self.ff = FeedForward(dim, dropout=dropout)
        self.scale_shift_table = nn.Parameter(torch.randn(6, dim) / dim**0.5)

    def forward(self, x: torch.Tensor, t6: torch.Tensor) -> torch.Tensor:
        """x (B, N, F, D); t6 (B, 6, D), the same timestep modulation the spatial blocks get."""
        batch, tokens, frames, dim = x.shape
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = _block_modulation(self.scale_shift_table, t6)
        h = modulate(self.norm1(x), shift_msa, scale_msa)  # (B, N, F, D)
        x = gated_residual(x, gate_msa, self.attn1(h.reshape(batch * tokens, frames, dim)).view(x.shape))
        h = modulate(self.norm3(x), shift_mlp, scale_mlp)
        return gated_residual(x, gate_mlp, self.ff(h))  # (B, N, F, D)


#################################################################################
#                                  LatteT2V                                     #
#################################################################################


class LatteT2V(ModelMixin, ConfigMixin):
    """Latte text-to-video denoiser: (B, in_channels, F, h, w) noisy latents -> (B, out_channels, F, h, w).

    Output channels [0, in_channels) are the noise prediction, the rest the learned-variance value.
    The constructor accepts every key of the released ``config.json`` files; see ``IGNORED_CONFIG_KEYS``
    and ``REQUIRED_CONFIG_VALUES`` for keys without effect and values that are rejected.
    Defaults are the released LatteT2V-XL/122, 65x256x256 version.
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["SpatialBlock", "TemporalBlock"]

    @register_to_config
    def __init__(
        self,
        num_attention_heads: int = 16,
        attention_head_dim: int = 72,
        in_channels: int = 4,
        out_channels: int | None = 8,
        num_layers: int = 28,
        dropout: float = 0.0,
        norm_num_groups: int = 32,
        cross_attention_dim: int | None = 1152,
        attention_bias: bool = True,
        sample_size: int | tuple[int, int] | list[int] = (32, 32),
        num_vector_embeds: int | None = None,
        patch_size: int = 2,
        activation_fn: str = "gelu-approximate",
        num_embeds_ada_norm: int | None = 1000,
        use_linear_projection: bool = False,
        only_cross_attention: bool = False,
        double_self_attention: bool = False,
        upcast_attention: bool = False,
        norm_type: str = "ada_norm_single",
        norm_elementwise_affine: bool = False,
        norm_eps: float = 1e-6,
        attention_type: str = "default",
        caption_channels: int = 4096,
        video_length: int = 17,
        attention_mode: str = "xformers",
        patch_size_t: int = 1,
    ):
        super().__init__()
        requested = {"norm_type": norm_type, "activation_fn": activation_fn, "attention_type": attention_type,
                     "num_vector_embeds": num_vector_embeds, "only_cross_attention": only_cross_attention,
                     "double_self_attention": double_self_attention, "patch_size_t": patch_size_t}
        for key, value in requested.items():
            if value != REQUIRED_CONFIG_VALUES[key]:
                raise ValueError(f"LatteT2V config {key}={value!r} is not supported; the released models use "
                                 f"{REQUIRED_CONFIG_VALUES[key]!r}, set it to that value.")
        if attention_mode not in ATTENTION_MODES:
            raise ValueError(f"Unknown attention_mode {attention_mode!r}; expected one of {', '.join(ATTENTION_MODES)} "
                             "(all map onto SDPA).")
        inner_dim = num_attention_heads * attention_head_dim
        if cross_attention_dim not in (None, inner_dim):
            raise ValueError(f"cross_attention_dim={cross_attention_dim} must equal the model width "
                             f"num_attention_heads*attention_head_dim={inner_dim}, because captions are projected "
                             "to the model width; set it to that value (or null).")
        if inner_dim % 4:
            raise ValueError(f"Model width {inner_dim} must be divisible by 4 for the 2-D sin-cos position "
                             "embedding; change num_attention_heads or attention_head_dim.")
        sample_size = (sample_size, sample_size) if isinstance(sample_size, int) else tuple(sample_size)
        if sample_size[0] % patch_size or sample_size[1] % patch_size:
            raise ValueError(f"sample_size {list(sample_size)} must be divisible by patch_size {patch_size}.")

        self.inner_dim = inner_dim
        self.out_channels = in_channels if out_channels is None else out_channels
        self.gradient_checkpointing = False
        # Sampling-time step cache (models/step_cache.py), set through enable_step_cache; not a module.
        self.step_cache: StepCache | None = None
        # Sequence parallelism (models/parallel.py), set through enable_sequence_parallel; not a module.
        self.sequence_parallel = None
        block_args = (inner_dim, num_attention_heads, attention_head_dim, dropout, attention_bias,
                      norm_elementwise_affine, norm_eps)

        # Registration order = the official state-dict order.
        self.pos_embed = PatchEmbed(sample_size, patch_size, in_channels, inner_dim)
        self.transformer_blocks = nn.ModuleList([SpatialBlock(*block_args) for _ in range(num_layers)])
        self.temporal_transformer_blocks = nn.ModuleList([TemporalBlock(*block_args) for _ in range(num_layers)])
        # Final layer. Its tensors are top-level checkpoint keys (scale_shift_table, proj_out.*), so it
        # lives here rather than in a submodule. eps is fixed at 1e-6 in the reference (not norm_eps).
        self.norm_out = nn.LayerNorm(inner_dim, elementwise_affine=False, eps=1e-6)
        self.scale_shift_table = nn.Parameter(torch.randn(2, inner_dim) / inner_dim**0.5)
        self.proj_out = nn.Linear(inner_dim, patch_size * patch_size * self.out_channels)
        self.adaln_single = AdaLayerNormSingle(inner_dim)
        self.caption_projection = CaptionProjection(caption_channels, inner_dim)
        self._set_temporal_pos_embed(video_length)

    # ----------------------------------------------------------------------- loading and sizes

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, subfolder: str | None = None,
                        torch_dtype: torch.dtype | None = None, device: str | torch.device | None = None,
                        **config_overrides) -> "LatteT2V":
        """Load a version folder (``config.json`` + ``diffusion_pytorch_model.safetensors``) with strict keys."""
        return load_pretrained(cls, path, subfolder=subfolder, torch_dtype=torch_dtype, device=device,
                               **config_overrides)

    def _set_temporal_pos_embed(self, video_length: int) -> None:
        temp_pos_embed = get_1d_sincos_pos_embed(self.inner_dim, video_length,
                                                 temporal_interpolation_scale(video_length))
        # Not in the checkpoints (persistent=False): recomputed from the config.
        self.register_buffer("temp_pos_embed", temp_pos_embed.unsqueeze(0).to(self.scale_shift_table.dtype),
                             persistent=False)  # (1, video_length, D)

    def set_latent_size(self, sample_size: int | tuple[int, int] | None = None,
                        video_length: int | None = None) -> None:
        """Retarget the model to another training latent size and/or frame count, in place.

        Recomputes the two position-embedding buffers (with the interpolation scales the training script
        derives for the new sizes) and updates the config, so ``save_pretrained`` records the new size.
        The weights do not depend on these sizes: loading a checkpoint into a model built with another
        ``sample_size``/``video_length`` works as well.
        """
        device = self.scale_shift_table.device
        if sample_size is not None:
            sample_size = (sample_size, sample_size) if isinstance(sample_size, int) else tuple(sample_size)
            self.pos_embed.set_sample_size(sample_size)
            self.register_to_config(sample_size=list(sample_size))
        if video_length is not None:
            self._set_temporal_pos_embed(video_length)
            self.register_to_config(video_length=video_length)
        self.to(device)

    def enable_step_cache(self, cache: StepCache) -> None:
        """Let ``cache`` (e.g. ``make_step_cache("teacache", threshold=0.1)``) skip the blocks on
        sampling steps where they would change little; forwards with gradients never use it."""
        self.step_cache = cache

    def disable_step_cache(self) -> None:
        """Back to running every block on every forward (the exact model)."""
        self.step_cache = None

    def compile_blocks(self, **compile_kwargs) -> None:
        """``torch.compile`` every spatial and temporal block in place (``nn.Module.compile``).

        Blocks rather than the whole model: the step cache's per-step decision stays in Python
        without breaking the graph, and all blocks of one kind share one compiled graph (their
        weights are graph inputs). The first forward pays the compilation (docs/sampling.md).
        """
        for block in (*self.transformer_blocks, *self.temporal_transformer_blocks):
            block.compile(**compile_kwargs)

    # ----------------------------------------------------------------------- forward

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor | int | float,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor | None = None,
        use_image_num: int = 0,
        enable_temporal_attentions: bool = True,
        return_dict: bool = True,
    ):
        """Predict noise and variance for noisy latents.

        hidden_states (B, C, F, h, w); timestep: scalar or (B,) diffusion step; encoder_hidden_states
        (B, L, caption_channels), or (B, 1+n, L, caption_channels) when ``use_image_num`` = n > 0
        (joint image-video training: F = video_length + n, the last n frames are independent images,
        caption slot 0 is the video's, slot i the i-th image's); encoder_attention_mask (B, L) or
        (B, 1+n, L) with 1 = keep, 0 = drop. ``enable_temporal_attentions=False`` runs every frame as an
        independent image (image mode, any F). Returns ``.sample`` (B, out_channels, F, h, w).
        """
        batch, channels, frames, height, width = hidden_states.shape
        video_frames = frames - use_image_num
        self._check_inputs(hidden_states, timestep, encoder_hidden_states, encoder_attention_mask, use_image_num,
                           enable_temporal_attentions)
        dtype = self.scale_shift_table.dtype
        p = self.config.patch_size
        grid_h, grid_w = height // p, width // p

        # 1. Patch tokens with the 2-D position embedding, frames folded into the batch.
        x = hidden_states.to(dtype).transpose(1, 2).reshape(batch * frames, channels, height, width)
        x = self.pos_embed(x).view(batch, frames, grid_h * grid_w, self.inner_dim)  # (B, F, N, D)

        # 2. Timestep conditioning, once per sample (broadcast over frames and patches in the blocks).
        timestep = torch.as_tensor(timestep, device=x.device).reshape(-1).expand(batch)
        t6, embedded_timestep = self.adaln_single(timestep)  # (B, 6D), (B, D)
        t6 = t6.view(batch, 6, self.inner_dim)  # (B, 6, D)

        # 3. Captions and their attention bias.
        context, context_bias = self._prepare_captions(encoder_hidden_states, encoder_attention_mask,
                                                       use_image_num, video_frames, dtype)

        # Sequence parallel: this rank keeps a shard of the frames (models/parallel.py).
        sp = self.sequence_parallel
        if sp is not None:
            x, context, context_bias = sp.shard_frames(x, context, context_bias)  # (B, F_r, N, D)

        # 4. Alternating spatial / temporal blocks: S0 T0 S1 T1 ... (or the step cache's shortcut).
        layer_args = (t6, context, context_bias, video_frames, use_image_num, enable_temporal_attentions)
        x = self._run_layers(x, layer_args)  # (B, F, N, D)

        # 5. Final layer: adaLN with the embedded timestep, then the linear patch decoder.
        shift, scale = (self.scale_shift_table[None] + embedded_timestep[:, None]).unsqueeze(2).chunk(2, dim=1)
        x = self.proj_out(modulate(self.norm_out(x), shift, scale))  # (B, F, N, p*p*C_out)
        if sp is not None:
            x = sp.gather_frames(x)  # (B, F_r, ...) -> (B, F, N, p*p*C_out) on every rank of the group

        # 6. Unpatchify; patch row index before column index ("h p" then "w q").
        x = x.view(batch, frames, grid_h, grid_w, p, p, self.out_channels)
        output = torch.einsum("bfhwpqc->bcfhpwq", x).reshape(batch, self.out_channels, frames, height, width)
        if not return_dict:
            return (output,)
        return Transformer2DModelOutput(sample=output)

    def _run_layers(self, x: torch.Tensor, layer_args: tuple) -> torch.Tensor:
        """All layers on x (B, F, N, D), or, with a step cache during sampling, the cache's choice
        between running them and reusing the residual they added on the last computed step."""
        cache = self.step_cache
        layers = range(len(self.transformer_blocks))
        if cache is None or torch.is_grad_enabled():
            for i in layers:
                x = self._layer(i, x, *layer_args)
            return x
        if self.sequence_parallel is not None:
            raise ValueError("A step cache cannot run with sequence parallelism (the ranks would decide apart); "
                             "call disable_step_cache() or use sp_size 1.")
        t6, context, context_bias = layer_args[:3]
        run_spatial_0 = True
        if cache.probe_runs_first_block:  # First Block Cache: spatial block 0 always runs, its residual is the probe
            x_first = self._run_block(self.transformer_blocks[0], x, t6, context, context_bias)
            probe, x, run_spatial_0 = x_first - x, x_first, False
        else:  # TeaCache: the modulated input of spatial block 0
            probe = self.transformer_blocks[0].modulated_input(x, t6)
        if not cache.decide(probe, x.shape):
            return x + cache.residual
        x_in = x
        for i in layers:
            x = self._layer(i, x, *layer_args, run_spatial=run_spatial_0 or i > 0)
        cache.residual = x - x_in
        return x

    def _layer(self, i: int, x: torch.Tensor, t6: torch.Tensor, context: torch.Tensor,
               context_bias: torch.Tensor | None, video_frames: int, use_image_num: int,
               enable_temporal_attentions: bool, run_spatial: bool = True) -> torch.Tensor:
        """Spatial block i (unless ``run_spatial`` is False), then temporal block i: (B, F, N, D) -> (B, F, N, D)."""
        if run_spatial:
            x = self._run_block(self.transformer_blocks[i], x, t6, context, context_bias)  # (B, F, N, D)
        if not enable_temporal_attentions:
            return x
        # Materialise each regrouping once (as the reference does) rather than letting every
        # norm/reshape inside the block copy a strided view again.
        sp = self.sequence_parallel  # with it: (B, F_r, N, D) -> (B, N_r, F, D), one all-to-all
        x = x.transpose(1, 2).contiguous() if sp is None else sp.frames_to_positions(x)  # (B, N, F, D)
        video, images = x[:, :, :video_frames], x[:, :, video_frames:]
        if i == 0:
            # Added once, before temporal block 0, and it stays in the residual stream (spec 2.2.7).
            # Always added, also in joint image-video training: the reference skips it there without
            # gradient checkpointing (bug 7, fixed); the released models were trained with it.
            video = video + self.temp_pos_embed[:, None].to(video.dtype)  # (1, 1, F, D)
        video = self._run_block(self.temporal_transformer_blocks[i], video, t6)  # (B, N, F_video, D)
        x = torch.cat([video, images], dim=2) if use_image_num else video
        return x.transpose(1, 2).contiguous() if sp is None else sp.positions_to_frames(x)  # (B, F, N, D)

    def _run_block(self, block: nn.Module, *args: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and self.gradient_checkpointing:
            return self._gradient_checkpointing_func(block, *args)
        return block(*args)

    def _prepare_captions(self, captions: torch.Tensor, mask: torch.Tensor | None, use_image_num: int,
                          video_frames: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Project captions once per sample; with images in the batch, one caption per frame.

        Returns context (G, L, D) and an additive bias (G, 1, 1, L) or None, where G = B for videos
        (every frame of a sample shares its caption) and G = B*(F+n) for joint image-video input.
        """
        context = self.caption_projection(captions.to(dtype))  # (B, L, D) or (B, 1+n, L, D)
        # Dropped tokens get -10000 (not -inf) as in the reference: a fully masked caption stays finite.
        bias = None if mask is None else (1 - mask.to(dtype)) * -10000.0  # (B, L) or (B, 1+n, L)
        if use_image_num:
            def per_frame(t: torch.Tensor) -> torch.Tensor:  # (B, 1+n, ...) -> (B*(F+n), ...)
                video = t[:, :1].expand(-1, video_frames, *t.shape[2:])
                return torch.cat([video, t[:, 1:]], dim=1).flatten(0, 1)

            context = per_frame(context)  # (B*(F+n), L, D)
            bias = None if bias is None else per_frame(bias)  # (B*(F+n), L)
        return context, None if bias is None else bias[:, None, None, :]

    def _check_inputs(self, hidden_states, timestep, captions, mask, use_image_num,
                      enable_temporal_attentions) -> None:
        """One clear error for each input that the model would otherwise misread silently."""
        cfg = self.config
        if hidden_states.ndim != 5 or hidden_states.shape[1] != cfg.in_channels:
            raise ValueError(f"hidden_states has shape {tuple(hidden_states.shape)}; expected (B, {cfg.in_channels}, "
                             "F, h, w) latents.")
        batch, _, frames, height, width = hidden_states.shape
        if height % cfg.patch_size or width % cfg.patch_size:
            raise ValueError(f"Latent size {height}x{width} is not divisible by patch_size {cfg.patch_size}; "
                             f"use a latent height and width that are multiples of {cfg.patch_size}.")
        if not 0 <= use_image_num < frames:
            raise ValueError(f"use_image_num={use_image_num} must be >= 0 and leave at least one video frame "
                             f"of the {frames} input frames.")
        steps = torch.as_tensor(timestep).numel()
        if steps not in (1, batch):
            raise ValueError(f"timestep has {steps} values for a batch of {batch}; pass one step per sample "
                             "or a single step for all.")
        video_frames = frames - use_image_num
        if enable_temporal_attentions and video_frames != cfg.video_length:
            # Reference quirk 6 not reproduced: there one frame silently broadcast to video_length frames.
            raise ValueError(f"Got {video_frames} video latent frames but this model's temporal position "
                             f"embedding covers video_length={cfg.video_length}; pass {cfg.video_length} latent "
                             "frames, or enable_temporal_attentions=False for images (frames run independently).")
        slots = (1 + use_image_num,) if use_image_num else ()
        expected = (batch, *slots, "L", cfg.caption_channels)
        if (captions.ndim != len(expected) or captions.shape[0] != batch or captions.shape[-1] != cfg.caption_channels
                or captions.shape[1:-2] != slots):
            raise ValueError(f"encoder_hidden_states has shape {tuple(captions.shape)}; expected "
                             f"{expected}" + (" (slot 0 = video caption, then one per image)" if slots else "") + ".")
        if mask is not None and tuple(mask.shape) != tuple(captions.shape[:-1]):
            raise ValueError(f"encoder_attention_mask has shape {tuple(mask.shape)}; expected "
                             f"{tuple(captions.shape[:-1])} (1 = keep, 0 = drop), matching encoder_hidden_states.")


#################################################################################
#                       Sine/cosine position embeddings                         #
#################################################################################
# Computed like the reference's numpy code: positions in float32, products and sin/cos in float64,
# the result cast to float32.


def _sincos_1d(embed_dim: int, positions: torch.Tensor) -> torch.Tensor:
    """(M,) positions -> (M, embed_dim) float64 [sin(pos*w) | cos(pos*w)], w_i = 10000^(-i/(D/2))."""
    omega = torch.arange(embed_dim // 2, dtype=torch.float64, device=positions.device) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega  # (D/2,)
    out = positions.double()[:, None] * omega[None]  # (M, D/2)
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


@lru_cache(maxsize=16)  # off-size sampling recomputes the same grid every step
def get_2d_sincos_pos_embed(embed_dim: int, grid_size: tuple[int, int], base_size: int,
                            interpolation_scale: float = 1.0) -> torch.Tensor:
    """(gh*gw, embed_dim) float32 CPU tensor, rows in row-major grid order.

    Coordinates are index / (grid_len / base_size) / interpolation_scale; the first half embeds the
    column (x) coordinate, the second half the row (y) coordinate (MAE/PixArt convention).
    """
    grid_h, grid_w = grid_size
    pos_h = torch.arange(grid_h, dtype=torch.float32, device="cpu") / (grid_h / base_size) / interpolation_scale
    pos_w = torch.arange(grid_w, dtype=torch.float32, device="cpu") / (grid_w / base_size) / interpolation_scale
    rows, cols = torch.meshgrid(pos_h, pos_w, indexing="ij")  # (gh, gw) each
    emb = torch.cat([_sincos_1d(embed_dim // 2, cols.reshape(-1)), _sincos_1d(embed_dim // 2, rows.reshape(-1))], 1)
    return emb.float()


def get_1d_sincos_pos_embed(embed_dim: int, length: int, interpolation_scale: float = 1.0) -> torch.Tensor:
    """(length, embed_dim) float32 CPU tensor for positions arange(length) / interpolation_scale."""
    positions = torch.arange(length, dtype=torch.float32, device="cpu") / interpolation_scale
    return _sincos_1d(embed_dim, positions).float()


@contextlib.contextmanager
def temporal_length(model, video_frames: int | None):
    """Run the transformer on ``video_frames`` latent frames when they differ from its configured
    ``video_length`` (training buckets of other durations; the pipeline's ``any_size``): the temporal
    position embedding for that length is swapped in for this forward only (it is a constant buffer, so
    backward is unaffected) and the configured length, which checkpoints record, is restored afterwards."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):  # DDP / DeepSpeed / torch.compile wrappers
        model = getattr(model, "module", None) or model._orig_mod
    home = model.config.video_length
    if video_frames is None or video_frames == home:
        yield
        return
    device = model.temp_pos_embed.device
    model._set_temporal_pos_embed(video_frames)
    model.temp_pos_embed = model.temp_pos_embed.to(device)
    model.register_to_config(video_length=video_frames)
    try:
        yield
    finally:
        model._set_temporal_pos_embed(home)
        model.temp_pos_embed = model.temp_pos_embed.to(device)
        model.register_to_config(video_length=home)


#################################################################################
#                              Named model sizes                                #
#################################################################################
# Width = heads x head_dim; patch 1x2x2 ("/122"). Every other constructor argument defaults to the
# released configs (caption_channels 4096 for T5-XXL, sample_size 32x32, video_length 17).

LATTE_CONFIGS: dict[str, dict] = {
    "LatteT2V-XL/122": dict(num_layers=28, num_attention_heads=16, attention_head_dim=72),  # released, 1.06B
    "LatteT2V-L/122": dict(num_layers=24, num_attention_heads=16, attention_head_dim=64),
    "LatteT2V-B/122": dict(num_layers=12, num_attention_heads=12, attention_head_dim=64),
    "LatteT2V-S/122": dict(num_layers=12, num_attention_heads=6, attention_head_dim=64),
    # For tests and demos: 2 layers, width 32, small captions and latents (the fixture's shape).
    "LatteT2V-Tiny/122": dict(num_layers=2, num_attention_heads=2, attention_head_dim=16, caption_channels=48,
                              sample_size=(8, 8), video_length=5),
}


def latte_config(name: str, **overrides) -> dict:
    """Full constructor arguments of a named size, with overrides (e.g. sample_size, video_length)."""
    if name not in LATTE_CONFIGS:
        raise ValueError(f"Unknown LatteT2V size {name!r}; choose one of {', '.join(LATTE_CONFIGS)}.")
    config = dict(LATTE_CONFIGS[name], **overrides)
    config.setdefault("cross_attention_dim", config["num_attention_heads"] * config["attention_head_dim"])
    return config


def build_latte(name: str, **overrides) -> LatteT2V:
    """A randomly initialised LatteT2V of a named size, e.g. ``build_latte("LatteT2V-S/122", video_length=5)``."""
    return LatteT2V(**latte_config(name, **overrides))
