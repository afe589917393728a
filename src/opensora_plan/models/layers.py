"""Small layers shared by the models: an explicit switch for the SDPA attention kernel, and the
inference-time linear projection that runs as one fused oneDNN kernel on CPU.

Every attention in this package calls ``torch.nn.functional.scaled_dot_product_attention``; PyTorch
picks the fastest kernel that supports the inputs (flash / memory-efficient / cuDNN on CUDA, flash or
math on CPU). All kernels compute the same function, softmax(QK^T/sqrt(d) + bias) V, so the choice
only matters for speed and memory. ``sdpa_backend`` pins one kernel, e.g. for benchmarks.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

# "xformers" is the reference's name for the memory-efficient kernel (its attention_mode setting).
SDPA_BACKENDS = {
    "math": SDPBackend.MATH,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "xformers": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
}


@contextlib.contextmanager
def sdpa_backend(name: str = "auto") -> Iterator[None]:
    """Restrict SDPA to one kernel inside the block ("auto" leaves PyTorch's choice).

    Unlike the reference (spec 8.16) this never leaves CPU without a backend by accident: asking for
    a kernel the device or inputs cannot use fails loudly inside SDPA ("No available kernel").
    """
    if name == "auto":
        yield
        return
    if name not in SDPA_BACKENDS:
        raise ValueError(f"Unknown SDPA backend {name!r}; choose one of auto, {', '.join(SDPA_BACKENDS)}.")
    with sdpa_kernel(SDPA_BACKENDS[name]):
        yield


# Short key sequences in low precision on CPU. The temporal blocks attend over the latent frames
# (5 or 17 keys) in thousands of tiny groups; there the CPU flash kernel's per-block setup dominates
# in bfloat16, and two batched GEMMs with a float32 softmax are 2-2.5x faster (1 thread: 5.4 vs 2.1 ms
# for 512 groups x 6 heads x 5 tokens). At long key lengths flash is faster, and in float32 it is level.
SHORT_ATTENTION_MAX_KEYS = 32


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + bias) v: q (G, h, S, d), k and v (G, h, L, d), bias broadcastable to
    (G, h, S, L) or None -> (G, h, S, d), in q's dtype.

    ``F.scaled_dot_product_attention``, except on CPU without gradients in bfloat16/float16 with at most
    :data:`SHORT_ATTENTION_MAX_KEYS` keys, where the scores are two GEMMs around a float32 softmax (same
    function; the softmax is as precise as the flash kernel's float32 accumulation).
    """
    if (q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16) and k.shape[-2] <= SHORT_ATTENTION_MAX_KEYS
            and not torch.is_grad_enabled() and not torch.compiler.is_compiling()):
        scores = torch.matmul(q, k.transpose(-1, -2)).float().mul_(q.shape[-1] ** -0.5)  # (G, h, S, L)
        if bias is not None:
            scores = scores + bias
        return torch.matmul(scores.softmax(-1).to(q.dtype), v)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)


# ---------------------------------------------------------------------------------------------
# Fused linear projections for CPU inference
# ---------------------------------------------------------------------------------------------
# PyTorch's eager CPU ``F.linear`` is an MKL ``addmm`` that first copies the broadcast bias into the
# output and then runs the GEMM; the GELU after it is another pass over a 4x-wide tensor. oneDNN's
# ``mkldnn::_linear_pointwise`` (the kernel torch.compile's CPU backend emits) does GEMM + bias +
# activation in one call. Measured on this project's CPU (1 thread, 2560 x 384 -> 1536, fp32):
# 41 ms for linear + tanh-GELU vs 13.6 ms fused; 40 ms vs 26 ms for 1536 -> 384. It has no autograd
# formula, so it is used only where no gradient is needed (sampling), never in training.

_ONEDNN_LINEAR = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
_FUSED_LINEAR_ENABLED = True


@contextlib.contextmanager
def fused_linear_kernels(enabled: bool) -> Iterator[None]:
    """Switch the fused CPU inference kernels of :func:`linear` on or off inside the block (default on).

    Off gives plain ``F.linear`` everywhere, e.g. to compare against it; results agree within float
    rounding (GEMM summation order: ~1e-6 relative in float32).
    """
    global _FUSED_LINEAR_ENABLED
    previous, _FUSED_LINEAR_ENABLED = _FUSED_LINEAR_ENABLED, enabled
    try:
        yield
    finally:
        _FUSED_LINEAR_ENABLED = previous


def _use_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    if not (_ONEDNN_LINEAR and _FUSED_LINEAR_ENABLED and x.device.type == "cpu"):
        return False
    if torch.compiler.is_compiling():  # let the compiler fuse the graph itself
        return False
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return False
    return weight.dtype in (torch.float32, torch.bfloat16)


# Under CPU autocast the reference's ``F.linear`` casts each weight to bfloat16 once per autocast region
# (autocast's cast cache); the fused kernel above is outside autocast, so it would cast every weight on
# every call. ``inference_weight_cache`` gives it the same reuse for the duration of a sampling loop,
# and also keeps the stacked Q/K/V weight of each self-attention. Entries are keyed on the source
# tensors' identity and version counters, so an in-place change (loading, ``fuse_lora``) is never stale.

_WEIGHT_CACHE: dict | None = None


@contextlib.contextmanager
def inference_weight_cache() -> Iterator[None]:
    """Reuse derived inference weights (dtype casts, stacked Q/K/V) inside the block, e.g. one denoising loop.

    Costs one extra copy of the affected weights (in the compute dtype) while the block runs; nothing
    is kept after it. Nested blocks share the outer cache.
    """
    global _WEIGHT_CACHE
    if _WEIGHT_CACHE is not None:
        yield
        return
    _WEIGHT_CACHE = {}
    try:
        yield
    finally:
        _WEIGHT_CACHE = None


def cached_weight(key: str, sources: tuple[torch.Tensor, ...], make) -> torch.Tensor:
    """``make()``, reused while :func:`inference_weight_cache` is active and no tensor of ``sources``
    changed (same object, same version counter)."""
    if _WEIGHT_CACHE is None:
        return make()
    ident = (key,) + tuple(id(t) for t in sources)
    versions = tuple(t._version for t in sources)
    hit = _WEIGHT_CACHE.get(ident)
    if hit is not None and hit[1] == versions and all(a is b for a, b in zip(hit[0], sources)):
        return hit[2]
    value = make()
    _WEIGHT_CACHE[ident] = (sources, versions, value)  # holding the sources keeps their ids unique
    return value


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if t.dtype == dtype:
        return t
    return cached_weight(f"cast-{dtype}", (t,), lambda: t.to(dtype))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           activation: str | None = None) -> torch.Tensor:
    """``activation(F.linear(x, weight, bias))`` with ``activation`` None or ``"gelu_tanh"``.

    x (..., in_features), weight (out_features, in_features), bias (out_features,) or None ->
    (..., out_features). On CPU without gradients (float32, bfloat16, or under CPU autocast, which
    casts to its dtype as ``F.linear`` would) this is one fused oneDNN kernel; everywhere else it is
    ``F.linear`` followed by ``F.gelu(approximate="tanh")``.
    """
    if _use_onednn(x, weight):
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else weight.dtype
        x, weight = x.to(dtype), _cast(weight, dtype)
        bias = None if bias is None else _cast(bias, dtype)
        attr, algorithm = ("gelu", "tanh") if activation == "gelu_tanh" else ("none", "")
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, attr, [], algorithm)
    out = F.linear(x, weight, bias)
    return F.gelu(out, approximate="tanh") if activation == "gelu_tanh" else out



# ---------------------------------------------------------------------------------------------
# Projections that may carry LoRA adapters (peft ``lora.Linear`` wrappers, models/lora.py)
# ---------------------------------------------------------------------------------------------
# The base GEMM of a wrapped layer still runs through ``linear`` (the same kernel as without an
# adapter) and the low-rank update is added to its output. An adapter at scale 0 (or disabled, or
# fused into the weight) adds nothing, so the output is then bit-identical to the plain model's.


def base_linear(module: torch.nn.Module) -> torch.nn.Linear:
    """The ``nn.Linear`` holding the (frozen) base weight: the module itself or a LoRA wrapper's ``base_layer``."""
    return module if type(module) is torch.nn.Linear else module.base_layer


def lora_delta(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """The active adapters' update ``sum scale * B(A(dropout(x)))`` of a LoRA-wrapped layer, or None when it
    adds nothing (plain Linear, adapters disabled, fused or at scale 0)."""
    if type(module) is torch.nn.Linear or module.disable_adapters or module.merged:
        return None
    delta = None
    for name in module.active_adapters:
        if name not in module.lora_A or module.scaling[name] == 0:
            continue
        lora_a, lora_b = module.lora_A[name], module.lora_B[name]
        update = lora_b(lora_a(module.lora_dropout[name](x.to(lora_a.weight.dtype)))) * module.scaling[name]
        delta = update if delta is None else delta + update
    return None if delta is None else delta.to(x.dtype)


def project(module: torch.nn.Module, x: torch.Tensor, activation: str | None = None) -> torch.Tensor:
    """``activation(module(x))`` for a projection layer: an ``nn.Linear`` or a LoRA-wrapped one.

    x (..., in_features) -> (..., out_features). The base GEMM goes through :func:`linear`; a LoRA
    wrapper's update is added before the activation (reading ``module.weight`` alone, as a plain fast
    path would, silently skips the adapter). Wrappers other than LoRA (e.g. DoRA) are called as modules.
    """
    if (type(module) is not torch.nn.Linear and not hasattr(module, "lora_A")) or any(
            getattr(module, "use_dora", {}).values()):
        out = module(x)
        return F.gelu(out, approximate="tanh") if activation == "gelu_tanh" else out
    base = base_linear(module)
    delta = lora_delta(module, x)
    if delta is None:
        return linear(x, base.weight, base.bias, activation)
    out = linear(x, base.weight, base.bias) + delta
    return F.gelu(out, approximate="tanh") if activation == "gelu_tanh" else out
