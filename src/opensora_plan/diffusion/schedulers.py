"""Sampling schedulers by the names of the reference's ``--sample_method`` flag (spec 3.2).

The reference builds every scheduler with diffusers' *default* arguments, so PNDM runs its PRK
warm-up and DDIM clips the predicted x0 to [-1, 1] in latent space (spec 8.11). We do the same, with
one fix: diffusers' HeunDiscrete and KDPM2AncestralDiscrete default to Stable Diffusion's betas
(0.00085..0.012), not the schedule LatteT2V was trained with (1000 steps, linear 1e-4..0.02, spec 3.1),
so every scheduler gets the training schedule explicitly (a no-op for the other nine, whose defaults
are exactly that). UniPC, LCM and TCD (the samplers of distilled students, train/distill.py) are additions of ours.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from diffusers.schedulers.scheduling_utils import SchedulerMixin

DEFAULT_SCHEDULER = "PNDM"

#: The noise schedule of training (spec 3.1); diffusers' default for all but Heun and KDPM2Ancestral.
TRAINING_SCHEDULE = {"num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02, "beta_schedule": "linear"}


class _LazySchedulers(Mapping):
    """``--sample_method`` name -> diffusers class, each imported from its own module on first use: a sampling
    run imports the one scheduler it uses (importing all of them through ``diffusers`` loads a dozen modules and
    scipy.stats, for DEIS)."""

    def __init__(self, where: dict[str, tuple[str, str]]):
        self._where = where

    def __getitem__(self, name: str) -> type[SchedulerMixin]:
        module, cls = self._where[name]
        return getattr(importlib.import_module(f"diffusers.schedulers.{module}"), cls)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


#: ``--sample_method`` name -> diffusers class (the reference's ten names, then UniPC, LCM and TCD).
SCHEDULERS: Mapping[str, type[SchedulerMixin]] = _LazySchedulers({
    "DDIM": ("scheduling_ddim", "DDIMScheduler"),
    "EulerDiscrete": ("scheduling_euler_discrete", "EulerDiscreteScheduler"),
    "DDPM": ("scheduling_ddpm", "DDPMScheduler"),
    "DPMSolverMultistep": ("scheduling_dpmsolver_multistep", "DPMSolverMultistepScheduler"),
    "DPMSolverSinglestep": ("scheduling_dpmsolver_singlestep", "DPMSolverSinglestepScheduler"),
    "PNDM": ("scheduling_pndm", "PNDMScheduler"),
    "HeunDiscrete": ("scheduling_heun_discrete", "HeunDiscreteScheduler"),
    "EulerAncestralDiscrete": ("scheduling_euler_ancestral_discrete", "EulerAncestralDiscreteScheduler"),
    "DEISMultistep": ("scheduling_deis_multistep", "DEISMultistepScheduler"),
    "KDPM2AncestralDiscrete": ("scheduling_k_dpm_2_ancestral_discrete", "KDPM2AncestralDiscreteScheduler"),
    "UniPCMultistep": ("scheduling_unipc_multistep", "UniPCMultistepScheduler"),
    # Multistep consistency sampling (Luo et al. 2023, arXiv 2310.04378) for `opensora-plan distill` students;
    # its boundary condition (timestep_scaling 10) and skipping grid (original_inference_steps 50) are the ones
    # train/distill.py trains with.
    "LCM": ("scheduling_lcm", "LCMScheduler"),
    # Trajectory consistency sampling (Zheng et al. 2024, arXiv 2402.19159) on the same grid; with eta 0 (what the
    # pipeline passes) each step is the DDIM jump to the next timestep that `distill --method pcd` trains.
    "TCD": ("scheduling_tcd", "TCDScheduler"),
})


def scheduler_names() -> list[str]:
    """The accepted ``--sample_method`` names, in the reference's order (then UniPC, LCM and TCD)."""
    return list(SCHEDULERS)


def create_scheduler(name: str = DEFAULT_SCHEDULER, **overrides) -> SchedulerMixin:
    """Build the scheduler called ``name`` (case-insensitive): diffusers' defaults + the training schedule.

    ``overrides`` are passed to the constructor (e.g. ``clip_sample=False``); without them the
    scheduler is the one the reference sampler used (for Heun / KDPM2Ancestral with the betas fixed,
    see the module docstring). An unknown name raises ``ValueError`` listing the accepted names (the
    reference crashed with an undefined variable instead).
    """
    by_lower = {key.lower(): key for key in SCHEDULERS}
    key = by_lower.get(str(name).lower())
    if key is None:
        raise ValueError(f"Unknown sample method {name!r}; choose one of {', '.join(SCHEDULERS)}.")
    return SCHEDULERS[key](**{**TRAINING_SCHEDULE, **overrides})


def clips_sample(name: str) -> bool:
    """Whether the scheduler called ``name``, built as :func:`create_scheduler` builds it, clips the predicted
    x0 to [-1, 1] (diffusers' ``clip_sample``: True by default for DDIM and DDPM)."""
    return bool(create_scheduler(name).config.get("clip_sample", False))
