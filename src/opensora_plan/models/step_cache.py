"""Step caching for LatteT2V sampling: skip the transformer blocks on steps where their output barely changes.

Between neighbouring denoising steps the residual that the block stack adds to its input changes
slowly, so it can be reused. A cache decides, once per forward, whether to run the blocks or to add
the residual they produced last time; everything outside the blocks (patch and timestep embedding,
caption projection, the final adaLN layer, the learned-sigma channels) always runs, so a reused step
still follows the new input and timestep.

Methods (``make_step_cache(name, **options)``):

- ``"teacache"`` (TeaCache, Liu et al. 2024, arXiv 2411.19108): the probe is the timestep-modulated
  input of the first spatial block (the cheapest signal that tracks the output). Its relative L1
  change since the previous step is accumulated; while the sum stays below ``threshold`` the blocks
  are skipped, otherwise they run and the sum restarts. TeaCache's per-model polynomial rescaling
  of the distance is not used (no calibrated coefficients exist for these checkpoints); the
  threshold is calibrated per model instead (docs/sampling.md).
- ``"first_block"`` (First Block Cache, ParaAttention / diffusers ``FirstBlockCacheConfig``): the
  first spatial block always runs and its residual is the probe; when its relative L1 change since
  the last computed step is below ``threshold`` the remaining blocks are skipped.

Written here rather than taken from ``diffusers.hooks``: those hooks assume one list of blocks that
keep the token layout, while LatteT2V alternates spatial (B, F, N, D) and temporal (B, N, F, D)
blocks with a layout switch and the temporal position embedding between them.

The first ``warmup_steps`` and the last ``final_steps`` steps of a sampling run always compute (the
pipeline calls :meth:`StepCache.reset` with the step count). Only used without gradients; a change
of batch or latent shape forces a full step. ``stats`` counts computed and skipped forwards.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class CacheStats:
    computed: int = 0
    skipped: int = 0

    @property
    def skipped_fraction(self) -> float:
        """Share of forwards whose block stack was skipped (0..1)."""
        total = self.computed + self.skipped
        return self.skipped / total if total else 0.0


def relative_l1(current: torch.Tensor, previous: torch.Tensor) -> float:
    """mean|current - previous| / mean|previous| in float32."""
    previous = previous.float()
    return ((current.float() - previous).abs().mean() / previous.abs().mean().clamp_min(1e-12)).item()


class StepCache:
    """Base class: the per-step decision and the cached residual. Subclasses set ``name`` and probe."""

    name = "base"
    default_threshold = 0.0
    probe_runs_first_block = False  # first_block: spatial block 0 always runs and is the probe

    def __init__(self, threshold: float | None = None, warmup_steps: int = 1, final_steps: int = 1):
        threshold = self.default_threshold if threshold is None else threshold
        if not threshold >= 0:  # also NaN
            raise ValueError(f"{self.name} threshold must be a number >= 0 (0 never skips), got {threshold}.")
        if warmup_steps < 1 or final_steps < 0:
            raise ValueError(f"warmup_steps must be >= 1 and final_steps >= 0, got {warmup_steps} and {final_steps}.")
        self.threshold = threshold
        self.warmup_steps = warmup_steps
        self.final_steps = final_steps
        self.reset()

    def options(self) -> dict:
        return {"method": self.name, "threshold": self.threshold, "warmup_steps": self.warmup_steps,
                "final_steps": self.final_steps}

    def reset(self, num_steps: int | None = None) -> None:
        """Forget everything before a new sampling run of ``num_steps`` forwards (None: unknown)."""
        self.num_steps = num_steps
        self.step = 0
        self.residual: torch.Tensor | None = None
        self.previous_probe: torch.Tensor | None = None
        self.accumulated = 0.0
        self.stats = CacheStats()

    def decide(self, probe: torch.Tensor, reference_shape: torch.Size) -> bool:
        """True = run the blocks this step. Advances the step counter; call once per forward."""
        step, self.step = self.step, self.step + 1
        forced = (step < self.warmup_steps or self.residual is None or self.residual.shape != reference_shape
                  or self.previous_probe is None or self.previous_probe.shape != probe.shape
                  or (self.num_steps is not None and step >= self.num_steps - self.final_steps))
        compute = forced or self._changed_enough(probe)
        if compute:
            self.stats.computed += 1
        else:
            self.stats.skipped += 1
        return compute

    def _changed_enough(self, probe: torch.Tensor) -> bool:
        raise NotImplementedError


class TeaCache(StepCache):
    """Accumulated relative L1 change of the modulated first-block input (see module docstring)."""

    name = "teacache"
    default_threshold = 0.1

    def decide(self, probe: torch.Tensor, reference_shape: torch.Size) -> bool:
        compute = super().decide(probe, reference_shape)
        if compute:
            self.accumulated = 0.0
        self.previous_probe = probe
        return compute

    def _changed_enough(self, probe: torch.Tensor) -> bool:
        self.accumulated += relative_l1(probe, self.previous_probe)
        return self.accumulated >= self.threshold


class FirstBlockCache(StepCache):
    """Relative L1 change of the first spatial block's residual since the last computed step."""

    name = "first_block"
    default_threshold = 0.05
    probe_runs_first_block = True

    def decide(self, probe: torch.Tensor, reference_shape: torch.Size) -> bool:
        compute = super().decide(probe, reference_shape)
        if compute:
            self.previous_probe = probe
        return compute

    def _changed_enough(self, probe: torch.Tensor) -> bool:
        return relative_l1(probe, self.previous_probe) >= self.threshold


CACHE_METHODS: dict[str, type[StepCache]] = {"teacache": TeaCache, "first_block": FirstBlockCache}

# The "fast" preset for models without a calibrated one of their own (the released checkpoints): a
# model folder may carry its own (the demo's demo.json "cache_fast"). See docs/sampling.md.
FAST_CACHE = {"method": "teacache", "threshold": 0.1}
CACHE_PRESETS = ("none", "fast")


def parse_cache_spec(spec: str) -> tuple[str, dict]:
    """``"teacache:0.5"`` -> ``("teacache", {"threshold": 0.5})``; a name alone -> ``(name, {})``.

    Raises ValueError for an unknown name or a threshold that is not a number >= 0.
    """
    method, _, threshold = spec.partition(":")
    if method not in (*CACHE_PRESETS, *CACHE_METHODS):
        raise ValueError(f"Unknown cache {spec!r}; choose one of {', '.join((*CACHE_PRESETS, *CACHE_METHODS))}, "
                         "optionally with :THRESHOLD for a method (e.g. teacache:0.5).")
    if not threshold:
        return method, {}
    if method == "none":
        raise ValueError(f"Cache {spec!r}: 'none' takes no threshold.")
    try:
        value = float(threshold)
    except ValueError:
        raise ValueError(f"Cache {spec!r}: the threshold {threshold!r} is not a number.") from None
    if not value >= 0:
        raise ValueError(f"Cache {spec!r}: the threshold must be a number >= 0.")
    return method, {"threshold": value}


def make_step_cache(method: str, **options) -> StepCache:
    """A fresh cache of ``method`` ("teacache" or "first_block") with its options (threshold, ...).

    Raises ValueError for an unknown method or option.
    """
    if method not in CACHE_METHODS:
        raise ValueError(f"Unknown cache method {method!r}; choose one of {', '.join(CACHE_METHODS)}.")
    try:
        return CACHE_METHODS[method](**options)
    except TypeError as error:
        raise ValueError(f"Bad options for cache method {method!r}: {error}.") from None
