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
        x, weight = x.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
        attr, algorithm = ("gelu", "tanh") if activation == "gelu_tanh" else ("none", "")
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, attr, [], algorithm)
    out = F.linear(x, weight, bias)
    return F.gelu(out, approximate="tanh") if activation == "gelu_tanh" else out
