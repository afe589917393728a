"""One memory plan for the text-to-video pipeline: where each model lives and how the VAE decodes, chosen before
any weights load from the compute device's memory, the dtypes and the video size.

The plan is arithmetic on sizes (:class:`PipelineSizes`: weight bytes per model, activation estimates per stage,
the VAE's own decode planner), so it can be computed for a device that is not there (``--memory_gb``) and tested
without models. What it decides, in order of preference (the first that fits the usable memory wins):

==============  ===========================================================================================
``offload``     ``none``: every model on the compute device; ``model``: each model on the device only during
                its stage, then back on the CPU (diffusers' ``enable_model_cpu_offload``); ``sequential``: one
                submodule at a time (``enable_sequential_cpu_offload``, slow). Offload needs a CUDA device: on
                the CPU there is no other memory to move a model to.
``text_encoder`` ``device``: T5 stays on the compute device; ``released``: the prompts are encoded first and T5
                is freed before the other models load (``sample``: one run, all prompts encoded up front);
                ``cpu``: T5 runs on the CPU and only its embeddings go to the device (small cards).
VAE decode      ``full``; ``lossless`` chunks of ``vae_chunk`` latent frames (the same video, slower);
                ``tiles``: spatial tiles (the reference's tiling, a slightly different video), chunked too if
                needed. The chunk is the VAE's own choice (``CausalVAEModel.decode_plan``) for the room left.
==============  ===========================================================================================

Headroom: the usable memory is the device's memory less :data:`HEADROOM_FRACTION` (allocator fragmentation and
estimate error) less a fixed term: :data:`CUDA_WORKSPACE_BYTES` on CUDA (cuDNN / cuBLAS workspaces and kernel
scratch that the estimates leave out) or :data:`CPU_RUNTIME_BYTES` on the CPU (the interpreter, torch and the
libraries, which count in the process's memory). docs/sampling.md ("Memory plan") has the measured runs.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

GIB = 2**30
HEADROOM_FRACTION = 0.10
CUDA_WORKSPACE_BYTES = 1 * GIB
CPU_RUNTIME_BYTES = 3 * GIB // 4
OFFLOAD_MODES = ("none", "model", "sequential")
TEXT_ENCODER_MODES = ("device", "released", "cpu")
STAGES = ("encode", "denoise", "decode")


@dataclass(frozen=True)
class PipelineSizes:
    """What the plan needs to know, in bytes on the compute device.

    ``weights``: per model (``text_encoder``, ``transformer``, ``vae``) in its dtype; ``largest_block``: the
    largest submodule of each (what sequential offload keeps on the device); ``encode`` / ``denoise``: activation
    peaks of encoding the prompts and of one transformer forward; ``decode(budget, tiled)``: the VAE's
    ``DecodePlan`` for a budget in bytes (None: no limit) and tiling on or off.
    """

    weights: Mapping[str, int]
    largest_block: Mapping[str, int]
    encode: int
    denoise: int
    decode: Callable[[int | None, bool], object]


@dataclass(frozen=True)
class MemoryPlan:
    """The plan (see the module docstring); ``peaks``: estimated peak bytes on the compute device per stage."""

    device_type: str
    memory: int
    source: str
    usable: int
    offload: str
    text_encoder: str
    vae_decode: str
    vae_chunk: int | None
    vae_budget: int | None
    peaks: dict = field(default_factory=dict)
    fits: bool = True

    def describe(self) -> str:
        """The one log line of the plan."""
        frames = "frame" if self.vae_chunk == 1 else "frames"
        decode = self.vae_decode + (f" (chunks of {self.vae_chunk} latent {frames})" if self.vae_chunk else "")
        peak = max(self.peaks.values()) if self.peaks else 0
        return (f"Memory plan for {_gib(self.memory)} GiB ({self.source}; {_gib(self.usable)} GiB usable after "
                f"headroom): offload {self.offload}, text encoder {self.text_encoder}, VAE decode {decode}; "
                f"estimated peak {_gib(peak)} GiB" + ("" if self.fits else " - OVER the usable memory, it may "
                                                      "run out; lower the size or use a larger device"))

    def summary(self) -> str:
        """The plan's choices in a few words (for error messages)."""
        chunk = f" chunks of {self.vae_chunk}" if self.vae_chunk else ""
        return (f"{_gib(self.memory)} GiB from {self.source}, offload {self.offload}, text encoder "
                f"{self.text_encoder}, VAE {self.vae_decode}{chunk}")

    def table(self) -> str:
        """The plan and its per-stage peak estimates, for ``sample --dry_run``."""
        rows = [self.describe(), f"  {'stage':<8} estimated peak on the {self.device_type} device"]
        rows += [f"  {stage:<8} {self.peaks[stage] / GIB:6.2f} GiB" for stage in STAGES if stage in self.peaks]
        return "\n".join(rows)


def _gib(value: int) -> str:
    """Bytes as GiB: one decimal, two below 1 GiB (tiny models)."""
    return f"{value / GIB:.1f}" if value >= GIB else f"{value / GIB:.2f}"


def device_memory(device: torch.device, memory_gb: float | None = None) -> tuple[int, str]:
    """``(bytes, where the number came from)``: ``memory_gb`` when given, else the device's free memory
    (``torch.cuda.mem_get_info`` on CUDA, ``MemAvailable`` of /proc/meminfo on a Linux CPU, else 16 GiB)."""
    if memory_gb is not None:
        return int(memory_gb * GIB), f"--memory_gb {memory_gb:g}"
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0], "free CUDA memory"
    if os.path.exists("/proc/meminfo"):
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "available RAM"
    return 16 * GIB, "assumed (no way to ask this device)"


def usable_memory(memory: int, device_type: str) -> int:
    """``memory`` less the headroom: :data:`HEADROOM_FRACTION` of it and the CUDA workspace / CPU runtime term."""
    fixed = CUDA_WORKSPACE_BYTES if device_type == "cuda" else CPU_RUNTIME_BYTES
    return max(0, int(memory * (1 - HEADROOM_FRACTION)) - fixed)


def plan_memory(sizes: PipelineSizes, memory: int, device_type: str, source: str = "given", offload: str | None = None,
                text_encoder: str | None = None, vae_memory: int | None | str = "auto", tiling: bool = False,
                one_shot: bool = True) -> MemoryPlan:
    """Choose the plan for ``memory`` bytes of a ``device_type`` ("cuda" or "cpu") device.

    ``offload`` / ``text_encoder``: fixed by the caller (``--offload``), else chosen. ``vae_memory``: ``"auto"``
    (the room the plan leaves at the decode), None (never chunk) or a budget in bytes (``--vae_memory_gb``).
    ``tiling``: tiles asked for (``--enable_tiling``); else tiles are the last resort. ``one_shot``: the prompts
    are all encoded before sampling (``sample``), so T5 can be freed; False for ``serve`` and the Python API.
    Raises ValueError for an unknown mode, or an offload on a device that cannot offload (the CPU).
    """
    if offload is not None and offload not in OFFLOAD_MODES:
        raise ValueError(f"offload {offload!r} is not one of {', '.join(OFFLOAD_MODES)}.")
    if text_encoder is not None and text_encoder not in TEXT_ENCODER_MODES:
        raise ValueError(f"text_encoder {text_encoder!r} is not one of {', '.join(TEXT_ENCODER_MODES)}.")
    if device_type != "cuda" and offload not in (None, "none"):
        raise ValueError(f"--offload {offload} moves models between a CUDA device and the CPU; on the CPU there is "
                         "nowhere to move them: use --offload none (the plan frees T5 after encoding instead).")
    usable = usable_memory(memory, device_type)
    # Fastest first. A one-shot run frees T5 after encoding anyway, so it encodes before the other models load
    # (never worse). Moving models per stage costs transfers only; T5 on the CPU costs a slow encode;
    # sequential offload moves every layer on every step.
    t5 = "released" if one_shot else "device"
    pairs = ([("none", t5), ("model", t5), ("none", "cpu"), ("model", "cpu"), ("sequential", "cpu")]
             if device_type == "cuda" else [("none", t5)])
    pairs = [(o, t) for o, t in pairs if offload in (None, o) and text_encoder in (None, t)] or [
        (offload or "none", text_encoder or t5)]
    candidates = [(o, t, tiles) for tiles in ((True,) if tiling else (False, True)) for o, t in pairs]
    plans = [_evaluate(sizes, memory, usable, device_type, source, o, t, tiles, vae_memory) for o, t, tiles in
             candidates]
    return next((plan for plan in plans if plan.fits), min(plans, key=lambda plan: max(plan.peaks.values())))


def _evaluate(sizes: PipelineSizes, memory: int, usable: int, device_type: str, source: str, offload: str,
              text_encoder: str, tiles: bool, vae_memory) -> MemoryPlan:
    """The peaks of one candidate; the VAE gets the room left beside the models resident at the decode."""
    w = {name: sizes.weights.get(name, 0) for name in ("text_encoder", "transformer", "vae")}
    t5_on_device = text_encoder == "device"

    def resident(stage_model: str) -> int:
        """Weights on the compute device while ``stage_model`` runs."""
        if offload == "sequential":
            return sizes.largest_block.get(stage_model, w[stage_model])
        if offload == "model":
            return w[stage_model]
        others = w["transformer"] + w["vae"]
        return others + (w["text_encoder"] if t5_on_device or stage_model == "text_encoder" else 0)

    if text_encoder == "cpu":
        encode = 0  # T5 and its activations stay in RAM
    elif text_encoder == "released" and offload == "none":
        encode = w["text_encoder"] + w["vae"] + sizes.encode  # encoded before the transformer loads
    else:
        encode = resident("text_encoder") + sizes.encode
    denoise = resident("transformer") + sizes.denoise
    room = usable - resident("vae")
    budget = max(room, 1) if vae_memory == "auto" else vae_memory
    decode_plan = sizes.decode(budget, tiles)
    decode = resident("vae") + decode_plan.peak
    peaks = {"encode": encode, "denoise": denoise, "decode": decode}
    mode = "tiles" if tiles else "lossless" if decode_plan.chunk else "full"
    return MemoryPlan(device_type, memory, source, usable, offload, text_encoder, mode, decode_plan.chunk,
                      budget, peaks, max(peaks.values()) <= usable)


# --------------------------------------------------------------------------------------------
# Out of memory: one line
# --------------------------------------------------------------------------------------------


def is_out_of_memory(err: BaseException) -> bool:
    """torch's ``OutOfMemoryError`` (CUDA), a ``MemoryError``, or the CPU allocator's RuntimeError."""
    if isinstance(err, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and ("out of memory" in text.lower() or "can't allocate memory" in text
                                              or "not enough memory" in text.lower())


_WHAT_TO_CHANGE = {
    "encoding the prompts": "run T5 off the device with --offload model (CUDA), or give a device with more memory",
    "loading the transformer": "lower --memory_gb so the plan offloads (CUDA: --offload model or sequential)",
    "denoising": "lower --memory_gb, or on CUDA --offload sequential; a smaller --batch_size or size also helps",
    "decoding with the VAE": "lower --vae_memory_gb (smaller lossless chunks) or add --enable_tiling",
    "sampling": "lower --memory_gb so the plan keeps more headroom",
}


@contextlib.contextmanager
def out_of_memory_guard(stage: str, plan: "MemoryPlan | None" = None):
    """Turn an out-of-memory error inside the block into :class:`~opensora_plan.utils.OutOfMemory`, one line that
    names ``stage``, the plan (when there is one) and the flag to change; other errors pass unchanged."""
    from opensora_plan.utils import OutOfMemory

    try:
        yield
    except OutOfMemory:
        raise
    except (RuntimeError, MemoryError) as err:
        if not is_out_of_memory(err):
            raise
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        where = f" under the memory plan ({plan.summary()})" if plan is not None else " (no memory plan)"
        change = _WHAT_TO_CHANGE.get(stage, _WHAT_TO_CHANGE["sampling"])
        raise OutOfMemory(f"Out of memory while {stage}{where}; {change}.") from err


# --------------------------------------------------------------------------------------------
# Sizes of real (or meta-device) models
# --------------------------------------------------------------------------------------------


def weight_bytes(module: torch.nn.Module | None, dtype: torch.dtype | None = None) -> int:
    """Bytes of ``module``'s parameters and buffers in ``dtype`` (None: as they are); T5's ``wo`` layers count in
    float32 under float16, as transformers keeps them (``_keep_in_fp32_modules``)."""
    if module is None:
        return 0
    keep = set(getattr(module, "_keep_in_fp32_modules", None) or ()) if dtype == torch.float16 else set()
    total = 0
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        kept = any(f".{k}." in f".{name}" for k in keep)
        target = torch.float32 if kept else dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
        total += tensor.numel() * torch.empty((), dtype=target, device="meta").element_size()
    return total


def largest_block_bytes(module: torch.nn.Module | None, dtype: torch.dtype | None = None) -> int:
    """Bytes of the largest leaf-holding submodule (what sequential offload puts on the device at once)."""
    if module is None:
        return 0
    return max((weight_bytes(child, dtype) for child in module.modules()
                if any(True for _ in child.parameters(recurse=False))), default=0)


def denoise_activation_bytes(transformer_config, latent_shape: tuple[int, ...], dtype: torch.dtype,
                             guidance: bool = True, text_tokens: int | None = None) -> int:
    """Estimated activation peak of one LatteT2V forward on latents (B, C, F, h, w): 16 hidden-size tensors of
    every token alive at once (the block input, its norms and modulations, Q/K/V, the attention output and
    the feed-forward's 4x hidden layer with its GELU), the cross-attention's text keys and values, and the
    spatial attention's score matrix for one head group when the math kernel runs (SDPA on the CPU)."""
    from opensora_plan.models.text_encoder import MODEL_MAX_LENGTH

    text_tokens = MODEL_MAX_LENGTH if text_tokens is None else text_tokens
    batch, _, frames, height, width = latent_shape
    patch = transformer_config["patch_size"]
    hidden = transformer_config["num_attention_heads"] * transformer_config["attention_head_dim"]
    heads = transformer_config["num_attention_heads"]
    rows = batch * (2 if guidance else 1)
    spatial = (height // patch) * (width // patch)
    tokens = rows * frames * spatial
    item = torch.empty((), dtype=dtype, device="meta").element_size()
    cross = 2 * rows * frames * text_tokens * hidden
    scores = rows * frames * heads * spatial * spatial // 8  # SDPA's CPU kernel works on query blocks
    return (16 * tokens * hidden + cross + scores) * item


def encode_activation_bytes(text_config, prompts: int = 2, tokens: int | None = None) -> int:
    """Estimated activation peak of encoding ``prompts`` texts of ``tokens`` tokens with a T5 encoder
    (float32: the gated feed-forward's three d_ff-wide tensors, eight d_model-wide ones, the attention scores)."""
    from opensora_plan.models.text_encoder import MODEL_MAX_LENGTH

    tokens = MODEL_MAX_LENGTH if tokens is None else tokens
    d_model, d_ff, heads = text_config.d_model, text_config.d_ff, text_config.num_heads
    return 4 * prompts * tokens * (3 * d_ff + 8 * d_model + 2 * heads * tokens)


def pipeline_sizes(transformer, vae, text_encoder, dtype: torch.dtype, latent_shape: tuple[int, ...],
                   device: torch.device, guidance: bool = True, prompts: int = 1) -> PipelineSizes:
    """:class:`PipelineSizes` of models (loaded, or built on the meta device from their configs) in ``dtype``
    for latents ``latent_shape`` (B, C, F, h, w) on ``device``; ``text_encoder`` None: no T5 (embeddings given)."""
    def decode(budget, tiled):
        return vae.decode_plan(latent_shape, budget, tiled, device=device)

    models = {"text_encoder": text_encoder, "transformer": transformer, "vae": vae}
    return PipelineSizes(
        weights={name: weight_bytes(model, dtype) for name, model in models.items()},
        largest_block={name: largest_block_bytes(model, dtype) for name, model in models.items()},
        encode=encode_activation_bytes(text_encoder.config, 2 * prompts if guidance else prompts)
        if text_encoder is not None else 0,
        denoise=denoise_activation_bytes(transformer.config, latent_shape, dtype, guidance),
        decode=decode,
    )


def meta_models(transformer_config: Mapping, vae_folder, text_encoder_name, dtype: torch.dtype):
    """``(transformer, vae, text_encoder)`` in ``dtype``, built from configs on the meta device: no weights are read
    (for planning before loading, and ``--dry_run``). ``transformer_config``: a LatteT2V config (a version
    folder's config.json); ``vae_folder``: a CausalVAE folder; ``text_encoder_name``: a T5 folder, or None."""
    from accelerate import init_empty_weights

    from opensora_plan.models.causalvae import CausalVAEModel
    from opensora_plan.models.latte import LatteT2V

    with init_empty_weights(include_buffers=False):
        transformer = LatteT2V.from_config({k: v for k, v in transformer_config.items() if not k.startswith("_")})
        vae = CausalVAEModel.from_config(CausalVAEModel.load_config(str(vae_folder)))
    if text_encoder_name is not None:
        from opensora_plan.models.text_encoder import empty_text_encoder

        text_encoder = empty_text_encoder(text_encoder_name)
    else:
        text_encoder = None
    for model in (transformer, vae):
        torch.nn.Module.to(model, dtype=dtype)  # meta tensors: only the dtype changes
    return transformer, vae, text_encoder
