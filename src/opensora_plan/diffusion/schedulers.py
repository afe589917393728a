"""Sampling schedulers by the names of the reference's ``--sample_method`` flag (spec 3.2).

The reference builds every scheduler with diffusers' *default* arguments, so PNDM runs its PRK
warm-up and DDIM clips the predicted x0 to [-1, 1] in latent space (spec 8.11). We do the same, with
one fix: diffusers' HeunDiscrete and KDPM2AncestralDiscrete default to Stable Diffusion's betas
(0.00085..0.012), not the schedule LatteT2V was trained with (1000 steps, linear 1e-4..0.02, spec 3.1),
so every scheduler gets the training schedule explicitly (a no-op for the other nine, whose defaults
are exactly that). UniPC and LCM (the sampler of a distilled student, train/distill.py) are additions of ours.
"""

from __future__ import annotations

from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DEISMultistepScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSinglestepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2AncestralDiscreteScheduler,
    LCMScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

DEFAULT_SCHEDULER = "PNDM"

#: The noise schedule of training (spec 3.1); diffusers' default for all but Heun and KDPM2Ancestral.
TRAINING_SCHEDULE = {"num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02, "beta_schedule": "linear"}

#: ``--sample_method`` name -> diffusers class (the reference's ten names, then UniPC).
SCHEDULERS: dict[str, type[SchedulerMixin]] = {
    "DDIM": DDIMScheduler,
    "EulerDiscrete": EulerDiscreteScheduler,
    "DDPM": DDPMScheduler,
    "DPMSolverMultistep": DPMSolverMultistepScheduler,
    "DPMSolverSinglestep": DPMSolverSinglestepScheduler,
    "PNDM": PNDMScheduler,
    "HeunDiscrete": HeunDiscreteScheduler,
    "EulerAncestralDiscrete": EulerAncestralDiscreteScheduler,
    "DEISMultistep": DEISMultistepScheduler,
    "KDPM2AncestralDiscrete": KDPM2AncestralDiscreteScheduler,
    "UniPCMultistep": UniPCMultistepScheduler,
    # Multistep consistency sampling (Luo et al. 2023, arXiv 2310.04378) for `opensora-plan distill` students;
    # its boundary condition (timestep_scaling 10) and skipping grid (original_inference_steps 50) are the ones
    # train/distill.py trains with.
    "LCM": LCMScheduler,
}


def scheduler_names() -> list[str]:
    """The accepted ``--sample_method`` names, in the reference's order (then UniPC and LCM)."""
    return list(SCHEDULERS)


def create_scheduler(name: str = DEFAULT_SCHEDULER, **overrides) -> SchedulerMixin:
    """Build the scheduler called ``name`` (case-insensitive): diffusers' defaults + the training schedule.

    ``overrides`` are passed to the constructor (e.g. ``clip_sample=False``); without them the
    scheduler is the one the reference sampler used (for Heun / KDPM2Ancestral with the betas fixed,
    see the module docstring). An unknown name raises ``ValueError`` listing the accepted names (the
    reference crashed with an undefined variable instead).
    """
    by_lower = {key.lower(): cls for key, cls in SCHEDULERS.items()}
    cls = by_lower.get(str(name).lower())
    if cls is None:
        raise ValueError(f"Unknown sample method {name!r}; choose one of {', '.join(SCHEDULERS)}.")
    return cls(**{**TRAINING_SCHEDULE, **overrides})


def clips_sample(name: str) -> bool:
    """Whether the scheduler called ``name``, built as :func:`create_scheduler` builds it, clips the predicted
    x0 to [-1, 1] (diffusers' ``clip_sample``: True by default for DDIM and DDPM)."""
    return bool(create_scheduler(name).config.get("clip_sample", False))
