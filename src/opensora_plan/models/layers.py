"""Small layers shared by the models: an explicit switch for the SDPA attention kernel.

Every attention in this package calls ``torch.nn.functional.scaled_dot_product_attention``; PyTorch
picks the fastest kernel that supports the inputs (flash / memory-efficient / cuDNN on CUDA, flash or
math on CPU). All kernels compute the same function, softmax(QK^T/sqrt(d) + bias) V, so the choice
only matters for speed and memory. ``sdpa_backend`` pins one kernel, e.g. for benchmarks.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

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
