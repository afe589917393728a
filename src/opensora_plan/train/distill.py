"""``opensora-plan distill``: turn a LatteT2V checkpoint into a few-step student with its guidance built in.

Three methods (``--method``; docs/distill.md compares them): ``lcd`` (below, the default), ``pcd`` (phased
consistency distillation, Wang et al. 2024, arXiv 2405.18407: the same step, but the student's consistency function
is the DDIM jump to the lower edge of its phase, one phase per sampling step; sampled with TCD, eta 0) and ``dmd``
(distribution matching, DMD2, Yin et al. 2024, arXiv 2405.14867: the student's own few-step samples are pushed
along the difference of a trained fake score and the guided teacher; best started from an ``lcd`` student with
``--student``; :meth:`DistillTask.distribution_matching_loss`).

``lcd``: latent consistency distillation (LCD; Luo et al. 2023, "Latent Consistency Models", arXiv 2310.04378,
Algorithm 1), with the guidance scale baked in (one fixed scale ``w``, the teacher's own, instead of LCM's
``w``-embedding) and the target network replaced by the online student under stop-gradient (as diffusers'
LCM-LoRA script and Song & Dhariwal's improved consistency training, arXiv 2310.14189, do; ``--use_ema``
keeps the usual average of the student for sampling). Per training sample:

1. a solver index ``n`` ~ U{0, .., N-1} on LCM's skipping grid ``t_n = (n + 1) k - 1``, ``k = 1000 / N``
   (``--num_ddim_timesteps N``, 50 as in LCM: 999, 979, .., 19), and ``t_prev = max(t_n - k, 0)``;
2. ``x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps`` from a training latent ``x_0`` (the data train-t2v takes);
3. the frozen teacher, with classifier-free guidance ``eps_w = eps(x_t, "") + w (eps(x_t, c) - eps(x_t, ""))``,
   takes one DDIM step (eta 0) from ``t_n`` to ``t_prev``: ``x_prev``;
4. the student's consistency function ``f(x, t) = c_skip(t) x + c_out(t) x0_hat(x, t)`` (LCM's boundary
   condition: ``c_skip = s^2 / ((10 t)^2 + s^2)``, ``c_out = 10 t / sqrt((10 t)^2 + s^2)``, ``s = 0.5``, exactly
   diffusers' ``LCMScheduler``) must map ``x_t`` and ``x_prev`` to the same point:
   ``loss = d(f_student(x_t, t_n), stopgrad f_student(x_prev, t_prev))``, ``d`` = L2 or pseudo-Huber.

The student samples with diffusers' ``LCMScheduler`` (``--sample_method LCM``) on the same grid, one
transformer evaluation per step at batch 1 (no unconditional batch: guidance is in the weights). Why LCD and
not progressive distillation (Salimans & Ho 2022; log2(50 / 4) rounds of training, each a full run) or DMD2
(Yin et al. 2024; a second "fake score" network trained alongside, twice the memory, a GAN head): one run,
one extra frozen network, the student initialised from the teacher, and it converged within a few hundred
steps on the demo model (docs/distill.md has the measurements).

The loop is the shared trainer's (checkpoints, exact resume, EMA, ``options.json``, ``log.jsonl``, DDP / FSDP2 /
DeepSpeed, ``--dry_run``); the data, LoRA and optimisation options are train-t2v's. Each run folder and
checkpoint carries a ``sampling_config.json`` (``pipelines/model_folder.py``) with the student's scheduler,
steps and guidance 1, so ``sample --model_path RUN`` (or ``--lora RUN`` for an adapter student) samples it
with its own defaults.
"""

from __future__ import annotations

import copy
import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from opensora_plan.options import option
from opensora_plan.train.t2v import T2VTask, T2VTrainOptions, dry_run_report, validate_t2v_options
from opensora_plan.train.trainer import TrainConfig, train

logger = logging.getLogger(__name__)

SIGMA_DATA = 0.5  # LCM's boundary condition (diffusers LCMScheduler.get_scalings_for_boundary_condition_discrete)
TIMESTEP_SCALING = 10.0  # LCMScheduler's default timestep_scaling
#: ``--method`` -> (the student's ``--sample_method``, the record's description).
METHODS = {
    "lcd": ("LCM", "latent consistency distillation (arXiv 2310.04378), guidance baked in"),
    "pcd": ("TCD", "phased consistency distillation (arXiv 2405.18407), guidance baked in"),
    "dmd": ("LCM", "distribution matching distillation (DMD2, arXiv 2405.14867), guidance baked in"),
}
#: dmd: the diffusion timesteps at which the real and fake scores are compared (DMD2's 0.02-0.98 of the range)
DMD_TIMESTEPS = (20, 980)
DISTILL_GROUP = "distillation (docs/distill.md)"
_LORA_GROUP = "LoRA fine-tuning (needs peft; docs/training.md)"


@dataclass
class DistillOptions(T2VTrainOptions):
    """Every option of ``opensora-plan distill``: train-t2v's data, LoRA, optimisation and run options plus the
    distillation ones. The student is the teacher's architecture, so ``--model`` / ``--pretrained`` are not
    offered (``--teacher`` gives both); captions are never dropped (the teacher's guidance is distilled instead);
    previews sample the student with its own settings."""

    COMMAND: ClassVar[str] = "distill"
    CONFIG_DIR: ClassVar[Path | None] = None
    NOT_OPTIONS: ClassVar[tuple[str, ...]] = ("model", "pretrained", "attention_mode", "cfg_dropout", "buckets",
                                              "validation_sampling_steps", "validation_sample_method",
                                              "validation_guidance_scale")
    GROUPS: ClassVar[tuple[str, ...]] = (DISTILL_GROUP, "models", _LORA_GROUP, "data", "optimisation", "run")

    teacher: str | None = option(None, show_default=False, group=DISTILL_GROUP,
                                 help="the LatteT2V to distil (required): a model folder (release layout, demo, "
                                 "save_pretrained), a LatteT2V version folder, or a train-t2v run / checkpoint")
    guidance_scale: float | None = option(None, show_default=False, group=DISTILL_GROUP,
                                          help="classifier-free guidance scale baked into the student (unset: the "
                                          "teacher folder's sampling default, else 7.5)")
    num_sampling_steps: int = option(4, group=DISTILL_GROUP, help="the student's default steps, recorded in its "
                                     "sampling_config.json (1-8 are useful)")
    num_ddim_timesteps: int = option(50, group=DISTILL_GROUP, help="N of LCM's skipping grid: the teacher's DDIM "
                                     "solver steps 1000/N timesteps at a time")
    method: str = option("lcd", choices=list(METHODS), group=DISTILL_GROUP,
                         help="lcd: latent consistency distillation (one student for 1-8 steps, LCM sampler); pcd: "
                         "phased consistency distillation (one phase per --num_sampling_steps, deterministic TCD "
                         "sampler); dmd: distribution matching (DMD2) with a fake-score network, best started from "
                         "an lcd student (--student); docs/distill.md")
    student: str | None = option(None, show_default=False, group=DISTILL_GROUP,
                                 help="the student's starting weights: a distill run / checkpoint or a LatteT2V "
                                 "(version) folder of the teacher's architecture (unset: the teacher's)")
    fake_score_learning_rate: float = option(1e-4, group=DISTILL_GROUP,
                                             help="--method dmd: learning rate of the fake-score network (a copy "
                                             "of the teacher trained on the student's samples)")
    loss_type: str = option("l2", choices=["l2", "huber"], group=DISTILL_GROUP,
                            help="distance of the consistency loss (huber: pseudo-Huber, as LCM-LoRA)")
    huber_c: float = option(0.001, group=DISTILL_GROUP, help="the pseudo-Huber constant c (with --loss_type huber)")

    def __post_init__(self):
        if not self.teacher:
            raise ValueError("distill needs --teacher (the LatteT2V model folder, version folder or train-t2v run to "
                             "distil).")
        self.cfg_dropout = 0.0  # the student learns the guided teacher on every caption
        self.pretrained = self.teacher  # the LoRA checks of train-t2v: the adapters sit on the teacher
        if self.method == "dmd":
            defaults = type(self).defaults()
            for flag, given, why in (
                    ("--lora_rank", self.lora_rank, "its fake score is a full copy of the teacher: the student trains "
                     "full weights"),
                    ("--validation_data_path", self.validation_data_path, "its losses are no quality measure: judge "
                     "--validation_prompts previews or `demo eval`"),
                    ("--sharding deepspeed", self.sharding == "deepspeed", "it steps two optimizers (student and fake "
                     "score) and DeepSpeed takes one: use --sharding ddp or fsdp2"),
                    (f"--loss_type {self.loss_type}", self.loss_type != defaults["loss_type"], "it has no consistency "
                     "loss (lcd and pcd only)"),
                    (f"--num_ddim_timesteps {self.num_ddim_timesteps}",
                     self.num_ddim_timesteps != defaults["num_ddim_timesteps"], "it trains on its sampler's own "
                     "timesteps, not a skipping grid (lcd and pcd only)")):
                if given:
                    raise ValueError(f"{flag} is not supported with --method dmd ({why}); drop it.")
        super().__post_init__()
        if self.guidance_scale is not None and not (self.guidance_scale >= 1.0 and math.isfinite(self.guidance_scale)):
            raise ValueError(f"--guidance_scale must be a finite number >= 1 (1: no guidance), got "
                             f"{self.guidance_scale}.")
        self.require_at_least(1, "num_sampling_steps")
        if not 2 <= self.num_ddim_timesteps <= 1000 or 1000 % self.num_ddim_timesteps:
            raise ValueError(f"--num_ddim_timesteps must divide the 1000 training timesteps (e.g. 50, LCM's), got "
                             f"{self.num_ddim_timesteps}.")
        if self.num_sampling_steps > self.num_ddim_timesteps:
            raise ValueError(f"--num_sampling_steps {self.num_sampling_steps} is more than the "
                             f"{self.num_ddim_timesteps} timesteps of the skipping grid (--num_ddim_timesteps).")
        if self.method != "dmd" and self.num_sampling_steps <= 50:  # sampled only where it was trained
            grid = set(solver_timesteps(torch.arange(self.num_ddim_timesteps), self.num_ddim_timesteps)[0].tolist())
            off = [t for t in sampler_timesteps(METHODS[self.method][0], self.num_sampling_steps) if t not in grid]
            if off:
                raise ValueError(f"--num_ddim_timesteps {self.num_ddim_timesteps}: the student's "
                                 f"{METHODS[self.method][0]} sampler visits timesteps {off} at "
                                 f"{self.num_sampling_steps} steps, which are not on that grid (they are on the "
                                 "50-point one): use 50 or a multiple of it that divides 1000.")
        if not self.huber_c > 0:
            raise ValueError(f"--huber_c must be positive, got {self.huber_c}.")
        if not self.fake_score_learning_rate > 0:
            raise ValueError(f"--fake_score_learning_rate must be a positive number, got "
                             f"{self.fake_score_learning_rate}.")
        if self.method != "dmd" and self.fake_score_learning_rate != type(self).defaults()["fake_score_learning_rate"]:
            raise ValueError("--fake_score_learning_rate has no effect without --method dmd; add it or drop "
                             "--fake_score_learning_rate.")
        if self.method == "dmd" and self.huber_c != type(self).defaults()["huber_c"]:
            raise ValueError("--huber_c has no effect with --method dmd (it has no consistency loss); drop it.")
        if self.loss_type != "huber" and self.huber_c != type(self).defaults()["huber_c"]:
            raise ValueError(f"--huber_c {self.huber_c} has no effect without --loss_type huber; add it or drop "
                             "--huber_c.")


# --------------------------------------------------------------------------------------------
# The teacher
# --------------------------------------------------------------------------------------------


@dataclass
class Teacher:
    """What ``--teacher`` resolves to (:func:`resolve_teacher`)."""

    transformer_folder: Path | None  # a full-weights LatteT2V folder (None: a LoRA run, loaded by its run)
    run: object | None  # pipelines.training_run.TrainingRunModels for a train-t2v run / checkpoint
    vae: str | None  # CausalVAE folder
    text_encoder: str | None  # T5 folder
    guidance_scale: float | None  # the folder's sampling default
    fps: float | None
    describe: str
    baked_guidance: float | None = None  # set when the folder is itself a distilled student

    def config(self) -> dict:
        """The teacher's LatteT2V config (read, nothing loaded)."""
        if self.run is not None:
            return dict(self.run.transformer_config)
        return json.loads((self.transformer_folder / "config.json").read_text())

    def load(self):
        """The frozen teacher LatteT2V (float32, eval mode, no gradients)."""
        from opensora_plan.models.latte import LatteT2V

        if self.run is not None:
            from opensora_plan.pipelines.training_run import load_run_transformer

            model = load_run_transformer(self.run, torch.float32, "cpu")
            if self.run.lora is not None:  # fold the adapter in: the student copies plain weights
                from opensora_plan.models.lora import fuse_lora

                fuse_lora(model)
                model = _strip_lora(model)
        else:
            model = LatteT2V.from_pretrained(self.transformer_folder)
        return model.eval().requires_grad_(False)


def _strip_lora(model):
    """A plain LatteT2V with the (fused) LoRA layers replaced by their base layers (peft's merge_and_unload)."""
    from opensora_plan.models.latte import LatteT2V

    plain = LatteT2V.from_config(dict(model.config))
    state = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if "lora_" not in k}
    plain.load_state_dict(state)
    return plain


def resolve_teacher(path: str, flag: str = "--teacher") -> Teacher:
    """``--teacher``: a train-t2v run or checkpoint, a LatteT2V folder (``config.json`` of class LatteT2V), or a
    model folder whose sampling file names its version or that holds exactly one version folder. Its VAE and T5
    (the defaults of ``--ae_path`` / ``--text_encoder_name``) and guidance come from the same place ``sample``
    takes them. FileNotFoundError / ValueError (one line, naming ``flag``) otherwise; nothing is loaded."""
    from opensora_plan.pipelines.model_folder import (base_model_sampling_config, load_sampling_config, vae_folder,
                                                      version_folders)
    from opensora_plan.pipelines.sample_t2v import distilled_guidance
    from opensora_plan.pipelines.training_run import is_training_output, resolve_training_output

    folder = Path(path)
    if not folder.exists():
        raise FileNotFoundError(f"{flag} {path} does not exist.")
    if is_training_output(folder):
        run = resolve_training_output(folder)
        # A distill run records its own sampling file; a train-t2v run samples as its base model does (sample).
        config = load_sampling_config(run.checkpoint.parent) if (run.checkpoint.parent / "sampling_config.json"
                                                                  ).is_file() else base_model_sampling_config(run.pretrained)
        return Teacher(None if run.lora else run.weights, run, str(run.vae), run.text_encoder,
                       config.guidance_scale if config else None, config.fps if config else None, run.describe(),
                       distilled_guidance(run.checkpoint.parent))
    config_file = folder / "config.json"
    if config_file.is_file() and json.loads(config_file.read_text()).get("_class_name") == "LatteT2V":
        transformer, root = folder, folder.parent  # a version folder: the model folder is its parent
    else:
        root, config = folder, load_sampling_config(folder) if folder.is_dir() else None
        versions = version_folders(folder) if folder.is_dir() else []
        version = config.version if config is not None and config.version else (
            versions[0] if len(versions) == 1 else None)
        if version is None:
            if not versions:
                raise ValueError(f"{flag} {path} is not a LatteT2V model: no config.json of class LatteT2V in it or "
                                 "in a version folder, no sampling file naming one, and not a training run.")
            raise ValueError(f"{flag} {path} holds version folders {versions}; give the LatteT2V version folder "
                             f"itself (e.g. {folder / versions[0]}).")
        transformer = folder / version
        if not (transformer / "config.json").is_file():
            raise FileNotFoundError(f"{flag} {path}: its version folder {transformer} has no config.json.")
    config = load_sampling_config(root) if root.is_dir() else None
    vae = vae_folder(root)
    vae = str(vae) if (vae / "config.json").is_file() else None
    return Teacher(transformer, None, vae, config.text_encoder if config else None,
                   config.guidance_scale if config else None, config.fps if config else None, str(transformer),
                   distilled_guidance(root))


# --------------------------------------------------------------------------------------------
# The consistency loss
# --------------------------------------------------------------------------------------------


def boundary_scalings(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """LCM's ``(c_skip, c_out)`` at integer timesteps ``t`` (B,), float32: ``c_skip(0) = 1, c_out(0) = 0``."""
    scaled = t.double() * TIMESTEP_SCALING
    c_skip = SIGMA_DATA**2 / (scaled**2 + SIGMA_DATA**2)
    c_out = scaled / (scaled**2 + SIGMA_DATA**2).sqrt()
    return c_skip.float(), c_out.float()


def solver_timesteps(index: torch.Tensor, num_ddim_timesteps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(t_n, t_prev)`` of skipping-grid indices (B,): ``t_n = (n + 1) k - 1``, ``t_prev = max(t_n - k, 0)``."""
    k = 1000 // num_ddim_timesteps
    start = (index + 1) * k - 1
    return start, (start - k).clamp(min=0)


def sampler_timesteps(sampler: str, num_sampling_steps: int) -> list[int]:
    """The timesteps the ``--sample_method`` ``sampler`` (built as ``sample`` builds it) visits at
    ``num_sampling_steps`` (LCM / TCD at 4: 999, 759, 499, 259)."""
    from opensora_plan.diffusion.schedulers import create_scheduler

    scheduler = create_scheduler(sampler)
    scheduler.set_timesteps(num_sampling_steps)
    return scheduler.timesteps.tolist()


def phase_edges(num_sampling_steps: int) -> torch.Tensor:
    """Phased consistency distillation's phases for an ``num_sampling_steps``-step student: the lower edges
    ``[0, s_1, .., s_{M-1}]`` (int64, ascending) of the M phases ``(s_m, s_{m+1}]``, i.e. the timesteps that
    diffusers' ``TCDScheduler`` (our ``--sample_method TCD``, built as ``sample`` builds it) steps to at M
    steps; at 4: ``[0, 259, 499, 759]`` (it visits 999, 759, 499, 259 and lands at 0)."""
    return torch.tensor(sorted(sampler_timesteps(METHODS["pcd"][0], num_sampling_steps)[1:] + [0]))


def phase_edge(t: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """The lower edge of each timestep's phase (B,): the largest edge below ``t`` (``t`` in ``(s_m, s_{m+1}]``
    -> ``s_m``)."""
    edges = edges.to(t.device)
    return edges[torch.bucketize(t, edges, right=False) - 1]


class DistillTask(T2VTask):
    """Distillation of a frozen teacher into ``models["model"]`` (the student; ``lcd``, ``pcd`` or ``dmd``, the
    latter with a second trained model, ``models["fake_score"]``), on the batches train-t2v takes (videos + captions
    or an ``extract`` cache); everything else is :class:`T2VTask`'s."""

    def __init__(self, student, teacher, dataset, *, guidance_scale: float, method: str = "lcd",
                 num_ddim_timesteps: int = 50, loss_type: str = "l2", huber_c: float = 1e-3,
                 num_sampling_steps: int = 4, fake_score_learning_rate: float = 1e-4,
                 sampling_record: dict | None = None, output_dir: str | None = None, **kwargs):
        super().__init__(student, dataset, **kwargs)
        self.teacher = teacher
        self.guidance_scale = guidance_scale
        self.method = method
        self.sampler = METHODS[method][0]
        # pcd: the phases' lower edges, ascending, from 0 (int64): where the student's sampler lands
        self.edges = phase_edges(num_sampling_steps) if method == "pcd" else None
        self.fake_score_learning_rate = fake_score_learning_rate
        if method == "dmd":  # the fake score starts as the teacher and learns the student's samples
            self.models["fake_score"] = copy.deepcopy(teacher).train().requires_grad_(True)
        # dmd: the timesteps its sampler visits (backward simulation runs through them)
        self.timesteps = sampler_timesteps(self.sampler, num_sampling_steps) if method == "dmd" else None
        self._generated: dict[int, tuple] = {}  # dmd: micro-batch -> (student's x0, text, mask) for the fake phase
        self.num_ddim_timesteps = num_ddim_timesteps
        self.loss_type = loss_type
        self.huber_c = huber_c
        self.num_sampling_steps = num_sampling_steps
        self.sampling_record = dict(sampling_record or {})
        self.output_dir = output_dir
        self._null: tuple[torch.Tensor, torch.Tensor] | None = None

    # ---------------------------------------------------------------- set-up and records

    def setup(self, accelerator) -> None:
        super().setup(accelerator)
        self.teacher.to(self.device).eval().requires_grad_(False)  # float32; autocast runs it in bf16 / fp16
        if accelerator.is_main_process and self.output_dir:
            self.write_sampling_config(Path(self.output_dir))  # `sample --model_path RUN` reads it

    def sampling_config(self) -> dict:
        """The student's ``sampling_config.json``: its sampler (LCM or TCD), steps, guidance 1 (no unconditional
        batch)."""
        config = {"sample_method": self.sampler, "num_sampling_steps": self.num_sampling_steps,
                  "guidance_scale": 1.0, **{k: v for k, v in self.sampling_record.items() if not k.startswith("_")}}
        config["_distillation"] = {k[1:]: v for k, v in self.sampling_record.items() if k.startswith("_")} | {
            "method": METHODS[self.method][1], "guidance_scale": self.guidance_scale,
            **({"fake_score_learning_rate": self.fake_score_learning_rate} if self.method == "dmd" else
               {"num_ddim_timesteps": self.num_ddim_timesteps, "loss_type": self.loss_type})}
        return config

    def write_sampling_config(self, folder: Path) -> None:
        from opensora_plan.pipelines.model_folder import SAMPLING_CONFIG
        from opensora_plan.utils import atomic_write_bytes

        atomic_write_bytes(folder / SAMPLING_CONFIG, (json.dumps(self.sampling_config(), indent=2) + "\n").encode())

    def save_model(self, name: str, model, state_dict: dict, folder: Path) -> None:
        super().save_model(name, model, state_dict, folder)
        self.write_sampling_config(folder.parent)  # the checkpoint folder: `sample --model_path CHECKPOINT`

    def options(self) -> dict:
        return {**super().options(), "distillation": self.sampling_config()["_distillation"]}

    # ---------------------------------------------------------------- loss

    def null_condition(self, batch_size: int, like: torch.Tensor, like_mask: torch.Tensor):
        """The empty caption's embedding (B, L, D) and mask (B, L): the cache's ``null_text`` or T5 of ""."""
        if self._null is None:
            null_text = getattr(self.dataset, "null_text", None)
            if null_text is not None:
                emb, mask = self.dataset._padded_text(null_text)  # (L, D), (L,)
            else:
                emb, mask = self.encode_captions([[""]])
                emb, mask = emb[0, 0], mask[0, 0]
            self._null = emb.to(self.device), mask.to(self.device)
        emb, mask = self._null
        return emb.to(like.dtype).expand(batch_size, -1, -1), mask.to(like_mask.dtype).expand(batch_size, -1)

    def consistency_loss(self, student, latents, text, mask, index, noise) -> tuple[torch.Tensor, dict]:
        """Per-sample consistency loss (B,) of ``student`` for clean ``latents`` (B, C, F, h, w), captions ``text``
        (B, L, D) / ``mask`` (B, L), skipping-grid indices ``index`` (B,) and ``noise`` like ``latents``.

        lcd: ``f(x, t) = c_skip(t) x + c_out(t) x0_hat`` (LCM's). pcd (Wang et al. 2024, arXiv 2405.18407):
        ``f(x, t)`` is the DDIM jump (eta 0) from ``t`` to the lower edge ``s`` of its phase,
        ``sqrt(a_s) x0_hat + sqrt(1 - a_s) eps_hat``, and the teacher's step stops at the edge
        (``t_prev = max(t_n - k, s)``), where the target is the teacher's point itself (``f(x, s) = x``)."""
        diffusion, batch = self.diffusion, latents.shape[0]
        t, t_prev = solver_timesteps(index, self.num_ddim_timesteps)
        if self.edges is not None:
            edge = phase_edge(t, self.edges)
            t_prev = torch.maximum(t_prev, edge)
        x_t = diffusion.q_sample(latents, t, noise)
        eps = self.eps

        def consistency(x, timesteps, e):
            x0 = diffusion.predict_xstart_from_eps(x, timesteps, e)
            if self.edges is not None:  # pcd: DDIM to the phase's edge
                a_edge = diffusion._extract(diffusion.alphas_cumprod, edge, x)
                return a_edge.sqrt() * x0 + (1 - a_edge).sqrt() * e
            c_skip, c_out = (c.reshape(-1, *[1] * (x.ndim - 1)) for c in boundary_scalings(timesteps))
            return c_skip * x + c_out * x0

        prediction = consistency(x_t, t, eps(student, x_t, t, text, mask))
        with torch.no_grad():
            null, null_mask = self.null_condition(batch, text, mask)
            both = eps(self.teacher, torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([null, text]),
                       torch.cat([null_mask, mask]))
            uncond, cond = both.chunk(2)
            guided = uncond + self.guidance_scale * (cond - uncond)
            x0 = diffusion.predict_xstart_from_eps(x_t, t, guided)
            a_prev = diffusion._extract(diffusion.alphas_cumprod, t_prev, x_t)
            x_prev = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * guided  # DDIM, eta 0
            target = consistency(x_prev, t_prev, eps(student, x_prev, t_prev, text, mask))
            if self.edges is not None:  # the boundary condition f(x, s) = x at a phase's edge
                at_edge = (t_prev == edge).reshape(-1, *[1] * (x_t.ndim - 1))
                target = torch.where(at_edge, x_prev, target)
        diff = (prediction - target).flatten(1)
        if self.loss_type == "huber":
            per_sample = ((diff**2 + self.huber_c**2).sqrt() - self.huber_c).mean(1)
        else:
            per_sample = (diff**2).mean(1)
        return per_sample, {}

    def phases(self):
        """lcd / pcd: the student's AdamW. dmd: then the fake score's (DMD2's two optimizers, one step each)."""
        phases = super().phases()
        if self.method == "dmd":
            from opensora_plan.train.trainer import Phase

            params = list(self.models["fake_score"].parameters())
            optimizer = torch.optim.AdamW(params, lr=self.fake_score_learning_rate, betas=self.adam_betas,
                                          weight_decay=self.adam_weight_decay, eps=self.adam_epsilon)
            phases.append(Phase("fake_score", optimizer, params, self.max_grad_norm, models=("fake_score",)))
        return phases

    def student_sample(self, student, shape, text, mask) -> torch.Tensor:
        """dmd: the student's x0 (B, C, F, h, w), float32, with gradients, from one step of its own sampler.

        DMD2's backward simulation: a step index ``i`` is drawn; the input at ``t_i`` comes from running the student's
        LCM steps ``0 .. i-1`` from pure noise without gradients (so the student trains on its own inputs, as it
        samples), then the student's consistency output at ``t_i`` is its sample."""
        diffusion, timesteps, batch = self.diffusion, self.timesteps, shape[0]
        alphas = diffusion.alphas_cumprod.to(self.device)
        i = int(torch.randint(0, len(timesteps), ()))
        x = torch.randn(shape, device=self.device)
        with torch.no_grad():
            for k in range(i):
                t = torch.full((batch,), timesteps[k], device=self.device)
                x0 = self.consistency_output(student, x, t, text, mask)
                a = alphas[timesteps[k + 1]]
                x = a.sqrt() * x0 + (1 - a).sqrt() * torch.randn_like(x0)  # LCM: re-noised to the next timestep
        t = torch.full((batch,), timesteps[i], device=self.device)
        return self.consistency_output(student, x, t, text, mask)

    def consistency_output(self, model, x, t, text, mask) -> torch.Tensor:
        """LCM's ``c_skip(t) x + c_out(t) x0_hat`` of ``model`` at ``x`` (what LCMScheduler returns as its sample)."""
        c_skip, c_out = (c.to(x.device).reshape(-1, *[1] * (x.ndim - 1)) for c in boundary_scalings(t))
        return c_skip * x + c_out * self.diffusion.predict_xstart_from_eps(x, t, self.eps(model, x, t, text, mask))

    def eps(self, model, x, t, text, mask) -> torch.Tensor:
        """``model``'s epsilon prediction (float32; a learned variance is not distilled)."""
        out = model(x, t, encoder_hidden_states=text, encoder_attention_mask=mask, return_dict=False)[0]
        return out[:, : x.shape[1]].float()

    def distribution_matching_loss(self, student, fake_score, shape, text, mask) -> tuple[torch.Tensor, torch.Tensor]:
        """dmd's generator loss (scalar) and the student's sample (detached, for the fake score's phase).

        DMD (Yin et al. 2024, arXiv 2311.18828; DMD2, arXiv 2405.14867): the student's sample ``x0`` is noised to
        ``t ~ U[20, 980]``; the guided teacher (the *real* score, ``eps_u + w (eps_c - eps_u)``) and the fake score
        (trained on the student's samples) each predict x0 there; the student is moved along
        ``(x0_fake - x0_real) / mean|x0 - x0_real|`` (DMD's normalisation), i.e. towards the teacher's guided
        distribution, by the loss ``0.5 |x0 - stopgrad(x0 - grad)|^2``."""
        diffusion, batch = self.diffusion, shape[0]
        x0 = self.student_sample(student, shape, text, mask)
        t = torch.randint(DMD_TIMESTEPS[0], DMD_TIMESTEPS[1] + 1, (batch,), device=self.device)
        with torch.no_grad():
            x_t = diffusion.q_sample(x0.detach(), t, torch.randn_like(x0))
            null, null_mask = self.null_condition(batch, text, mask)
            uncond, cond = self.eps(self.teacher, torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([null, text]),
                                    torch.cat([null_mask, mask])).chunk(2)
            real = diffusion.predict_xstart_from_eps(x_t, t, uncond + self.guidance_scale * (cond - uncond))
            fake = diffusion.predict_xstart_from_eps(x_t, t, self.eps(fake_score, x_t, t, text, mask))
            weight = (x0.detach() - real).abs().mean(dim=tuple(range(1, x0.ndim)), keepdim=True).clamp(min=1e-4)
            grad = (fake - real) / weight
        return 0.5 * ((x0 - (x0.detach() - grad)) ** 2).mean(), x0.detach()

    def fake_score_loss(self, fake_score, x0, text, mask) -> torch.Tensor:
        """dmd's fake-score loss: the usual epsilon-prediction diffusion loss on the student's samples."""
        t = torch.randint(0, self.diffusion.num_timesteps, (x0.shape[0],), device=self.device)
        noise = torch.randn_like(x0)
        return ((self.eps(fake_score, self.diffusion.q_sample(x0, t, noise), t, text, mask) - noise) ** 2).mean()

    def loss(self, phase: str, batch: dict, step: int, models: dict, micro: int = 0):
        if phase == "fake_score":
            x0, text, mask = self._generated.pop(micro)
            return self.fake_score_loss(models["fake_score"], x0, text, mask), {}
        self.skipped.update(batch.get("skipped", []))
        if self.method == "dmd":  # data-free: the captions only (the teacher's config gives the latents' shape)
            text, mask = self.batch_text(batch)
            config = self.teacher.config
            shape = (text.shape[0], config.in_channels, config.video_length, *config.sample_size)
            loss, x0 = self.distribution_matching_loss(models["model"], models["fake_score"], shape, text, mask)
            self._generated[micro] = (x0, text, mask)
            return loss, {}
        latents = (batch["latents"].to(self.device, torch.float32) if "latents" in batch
                   else self.encode_video(batch["video"]))
        text, mask = self.batch_text(batch)
        latents = latents[:, :, : latents.shape[2] - self.use_image_num]
        index = torch.randint(0, self.num_ddim_timesteps, (latents.shape[0],)).to(self.device)
        noise = torch.randn_like(latents)
        per_sample, stats = self.consistency_loss(models["model"], latents, text, mask, index, noise)
        return per_sample.mean(), stats

    def batch_text(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's caption embeddings (B, L, D) and mask (B, L): cached, or T5 of its captions."""
        if "text_emb" in batch:
            text, mask = batch["text_emb"].to(self.device), batch["text_mask"].to(self.device)
        else:
            text, mask = self.encode_captions(batch["captions"])
        return text[:, 0], mask[:, 0]  # one caption per clip (no joint images)

    # ---------------------------------------------------------------- validation

    def validation_timesteps(self) -> torch.Tensor:
        """Skipping-grid indices of the held-out loss: K evenly spread over the N grid points, int64 (K,)."""
        k, n = self.validation_num_timesteps, self.num_ddim_timesteps
        return ((torch.arange(k, dtype=torch.float64) + 0.5) * n / k).long().clamp(max=n - 1).unique()

    @torch.no_grad()
    def held_out_loss(self, transformer) -> dict[str, float]:
        """Mean consistency loss over the held-out clips at fixed grid indices and fixed noise (seeded by clip and
        index only, as train-t2v's held-out loss): ``val_loss``, ``val_loss_t<t_n>`` and ``val_clips``."""
        from opensora_plan.train.sampler import derive_seed
        from opensora_plan.train.t2v_validation import VALIDATION_SEED

        indices = self.validation_timesteps()
        totals = torch.zeros(len(indices))
        features = self.held_out_features()
        for clip, (latents, text, mask) in enumerate(features):
            for j, n in enumerate(indices.tolist()):
                noise = torch.randn(latents.shape[1:], generator=torch.Generator().manual_seed(
                    derive_seed(VALIDATION_SEED, 7, clip, n)))[None].to(self.device)
                loss, _ = self.consistency_loss(transformer, latents, text, mask,
                                                torch.tensor([n], device=self.device), noise)
                totals[j] += float(loss[0])
        means = totals / max(len(features), 1)
        starts = solver_timesteps(indices, self.num_ddim_timesteps)[0].tolist()
        metrics = {"val_loss": float(means.mean()), "val_clips": len(features)}
        metrics.update({f"val_loss_t{t:03d}": float(v) for t, v in zip(starts, means)})
        return metrics


# --------------------------------------------------------------------------------------------
# Wiring
# --------------------------------------------------------------------------------------------


def build_distill(options: DistillOptions | Mapping) -> tuple[DistillTask, TrainConfig]:
    """Task and loop configuration from ``distill`` options; every cheap check runs before a model loads."""
    from opensora_plan.train.t2v_build import _dataset, _load_vae, _validation_dataset

    if not isinstance(options, DistillOptions):
        options = DistillOptions.from_mapping(options)
    teacher_spec = resolve_teacher(options.teacher)
    student_record = str(Path(options.student).resolve()) if options.student else None
    if not options.student and options.resume_from_checkpoint:  # unset on resume: the run's own, as recorded
        from opensora_plan.train.checkpoint import resolve_resume
        from opensora_plan.train.trainer import run_options

        checkpoint = resolve_resume(options.resume_from_checkpoint, options.output_dir)
        record = checkpoint.parent / "options.json" if checkpoint is not None else None
        if record is not None and record.is_file():
            student_record = run_options(json.loads(record.read_text())).get("student")
    if teacher_spec.baked_guidance is not None:
        logger.warning("--teacher %s is itself a distilled student (guidance %g baked in): its outputs are not a "
                       "diffusion model's noise predictions, so distilling it again is unlikely to work; give the model "
                       "it was distilled from (its sampling_config.json names it).", options.teacher,
                       teacher_spec.baked_guidance)
    student_spec = resolve_teacher(options.student, "--student") if options.student else None  # loaded later
    if student_spec is not None:
        if options.lora_rank:
            raise ValueError("--student with --lora_rank: a LoRA student's adapters sit on the teacher itself; drop "
                             "one.")
        config_s, config_t = student_spec.config(), teacher_spec.config()
        differ = sorted(k for k in set(config_s) | set(config_t) if not k.startswith("_")
                        and config_s.get(k) != config_t.get(k))
        if differ:
            raise ValueError(f"--student {options.student} is not the teacher's architecture ({', '.join(differ)} "
                             f"{'differs' if len(differ) == 1 else 'differ'}); give a student distilled from this "
                             "teacher.")
    opts = options.to_dict()
    architecture = teacher_spec.transformer_folder or teacher_spec.run.base  # a LoRA run: its base's config
    opts.update(model=str(architecture), pretrained=None, attention_mode=None,
                cfg_dropout=0.0, buckets=None, validation_sampling_steps=options.num_sampling_steps,
                validation_sample_method=METHODS[options.method][0], validation_guidance_scale=1.0)
    for key, value in (("ae_path", teacher_spec.vae), ("text_encoder_name", teacher_spec.text_encoder)):
        if not opts[key] and value:
            opts[key] = value  # the teacher's own VAE / T5
    if opts["use_image_num"]:
        raise ValueError("--use_image_num: distill trains on video clips only; drop it.")
    if opts["sp_size"] > 1:
        raise ValueError("--sp_size > 1 is not supported by distill (the teacher is not split); use --sp_size 1.")
    guidance = options.guidance_scale if options.guidance_scale is not None else (teacher_spec.guidance_scale or 7.5)
    if guidance < 1.0:
        raise ValueError(f"The teacher folder's guidance_scale {guidance} is below 1; give --guidance_scale.")
    loop_keys = {f for f in TrainConfig.__dataclass_fields__ if f != "extra"}
    config = options.loop_config()
    validate_t2v_options(opts)  # output folder, resume, data / VAE / T5 paths, previews
    dataset = _dataset(opts)
    if not getattr(dataset, "has_latents", False):
        dataset.load_clip_or_substitute(0)  # NoUsableVideoError now when no video of the list is readable
    held_out = _validation_dataset(opts)
    needs_vae = not getattr(dataset, "has_latents", False) or bool(opts["validation_prompts"]) or (
        held_out is not None and not getattr(held_out, "has_latents", False))
    vae = _load_vae(opts) if needs_vae else None
    tokenizer = text_encoder = None
    if (not getattr(dataset, "has_text", False) or opts["validation_prompts"]
            or (held_out is not None and not getattr(held_out, "has_text", False))):
        from opensora_plan.models.text_encoder import load_t5

        if not opts["text_encoder_name"]:
            raise ValueError("--text_encoder_name (a local T5 folder) is required unless the captions are cached "
                             "(the teacher folder names none).")
        tokenizer, text_encoder = load_t5(opts["text_encoder_name"], meta=opts["dry_run"])  # dry run: no weights read

    config_t = teacher_spec.config()
    if getattr(dataset, "has_latents", False):  # checked before the teacher's weights load
        latent = dataset[0]["latents"]  # (C, t, h, w)
        shape, expected = tuple(latent.shape[-3:]), (config_t["video_length"], *config_t["sample_size"])
        if latent.shape[0] != config_t["in_channels"] or shape != expected:
            raise ValueError(f"--cached_features holds latents of shape {tuple(latent.shape)} but the teacher was "
                             f"built for ({config_t['in_channels']}, {', '.join(map(str, expected))}); extract at "
                             "the teacher's frames and size.")
    caption_channels = text_encoder.config.d_model if text_encoder is not None else dataset.null_text.shape[-1]
    if config_t["caption_channels"] != caption_channels:
        raise ValueError(f"The teacher takes {config_t['caption_channels']}-wide caption embeddings, the text "
                         f"encoder / cache gives {caption_channels}; use the teacher's T5.")
    logger.info("Distilling %s (guidance %g baked in, --method %s) into a %s student, starting from %s.",
                teacher_spec.describe, guidance, options.method,
                f"rank-{opts['lora_rank']} LoRA" if opts["lora_rank"] else "full-weights",
                student_spec.describe if student_spec is not None else "the teacher's weights")
    if opts["lora_rank"] and teacher_spec.transformer_folder is None:
        raise ValueError("--lora_rank needs a teacher with full weights (a LoRA run's adapter cannot carry "
                         "another adapter); merge it first or distil without --lora_rank.")
    teacher = teacher_spec.load()
    torch.manual_seed(opts["seed"])
    if opts["lora_rank"]:
        from opensora_plan.models.lora import add_lora, lora_config

        # The adapters' frozen base is the frozen teacher: under DDP it shares the teacher's weights instead of
        # copying them (the release's 1.06B, 4.2 GB in float32, less per process). fsdp2 / deepspeed shard the
        # student's parameters (ZeRO-3 in place), so there it is a copy.
        shared = {id(p): p for p in teacher.parameters()} if opts["sharding"] == "ddp" else {}
        student = copy.deepcopy(teacher, shared).requires_grad_(False)
        add_lora(student, lora_config(opts["lora_rank"], opts["lora_alpha"], opts["lora_target_modules"]))
    elif options.student:
        student = student_spec.load().requires_grad_(True)  # a run, version or model folder, as --teacher takes
    else:
        student = copy.deepcopy(teacher).requires_grad_(True)
    if opts["gradient_checkpointing"]:
        student.enable_gradient_checkpointing()
    student.train()
    fps = teacher_spec.fps
    task = DistillTask(
        student, teacher, dataset, guidance_scale=guidance, method=options.method,
        num_ddim_timesteps=options.num_ddim_timesteps, fake_score_learning_rate=options.fake_score_learning_rate,
        loss_type=options.loss_type, huber_c=options.huber_c, num_sampling_steps=options.num_sampling_steps,
        sampling_record={**({"fps": fps} if fps else {}), "_teacher": str(Path(options.teacher).resolve()),
                         **({"_student": student_record} if student_record else {}),
                         "_steps": options.max_train_steps},
        output_dir=None if options.dry_run else opts["output_dir"],
        vae=vae, tokenizer=tokenizer, text_encoder=text_encoder, model_max_length=opts["model_max_length"],
        learning_rate=opts["learning_rate"], adam_betas=(opts["adam_beta1"], opts["adam_beta2"]),
        adam_weight_decay=opts["adam_weight_decay"], adam_epsilon=opts["adam_epsilon"],
        max_grad_norm=opts["max_grad_norm"], validation_prompts=opts["validation_prompts"],
        validation_sampling_steps=options.num_sampling_steps, validation_data=held_out,
        validation_num_timesteps=opts["validation_num_timesteps"], validation_batch_size=1,
        validation_sample_method=METHODS[options.method][0], validation_guidance_scale=1.0, seed=opts["seed"],
        train_batch_size=opts["train_batch_size"])
    settings = getattr(dataset, "settings", {})
    base = teacher_spec.transformer_folder  # a LoRA student's frozen base (sample resolves the run through it)
    recorded = {"ae_path": opts["ae_path"] or settings.get("ae"),
                "text_encoder_name": opts["text_encoder_name"] or settings.get("text_encoder"),
                "pretrained": str(base) if base is not None else None, "cached_features": opts["cached_features"],
                "teacher": options.teacher}
    task.paths = {k: str(Path(v).resolve()) if v and Path(v).exists() else v for k, v in recorded.items()}
    config.extra = {k: v for k, v in opts.items() if k not in loop_keys and not k.startswith("_")}
    config.extra["guidance_scale"] = guidance
    config.extra["student"] = student_record
    return task, config


def distill(options: DistillOptions | Mapping) -> dict:
    """Run a distillation; returns the trainer's summary (with ``dry_run``: the report, nothing written)."""
    task, config = build_distill(options)
    if config.extra["dry_run"]:
        import re

        from opensora_plan.train.t2v import _size

        report = dry_run_report(task, config)
        student = {id(p) for p in task.models["model"].parameters()}  # a DDP LoRA student's base is the teacher's
        teacher_bytes = sum(p.numel() * p.element_size() for p in task.teacher.parameters() if id(p) not in student)
        report["memory"]["teacher"] = teacher_bytes
        report["memory"]["total"] += teacher_bytes
        shared = "  (the LoRA student's frozen base: counted above)" if not teacher_bytes else ""
        fake = task.models.get("fake_score")  # dmd: weights, gradients and the two AdamW moments, float32
        fake_bytes = 4 * sum(p.numel() * 4 for p in fake.parameters()) if fake is not None else 0
        report["memory"]["fake_score"] = fake_bytes
        report["memory"]["total"] += fake_bytes
        rows = f"\n  frozen teacher    {_size(teacher_bytes)}{shared}"
        if fake is not None:
            rows += f"\n  fake score        {_size(fake_bytes)}  (weights, gradients, AdamW states)"
        text = report["report"].replace("train-t2v --dry_run", "distill --dry_run")
        text = re.sub(r"\n  total +\S+ \S+", f"{rows}\n  total             {_size(report['memory']['total'])}", text,
                      count=1)
        per_step = ("up to steps - 1 student forwards without gradients + 1 with, 1 teacher forward at twice the "
                    "batch, 2 fake-score forwards (one with gradients)" if fake is not None else
                    "2 student forwards (one with gradients) + 1 teacher forward at twice the batch")
        report["report"] = text + (f"\n\ndistillation ({task.method}): guidance {task.guidance_scale} baked in; the "
                                   f"student samples with {task.sampler} in {task.num_sampling_steps} steps. Per step: "
                                   f"{per_step}.")
        return report
    return train(task, config)


def save_student_folder(run: str | Path, out: str | Path, version: str) -> Path:
    """A model folder of a full-weights student from a ``distill`` run or checkpoint, for shipping: ``out/<version>/``
    (the EMA weights when the run kept them) and ``out/sampling_config.json`` (the run's, plus ``version`` and the
    teacher's ``vae`` and ``text_encoder`` as paths relative to ``out``, so a student saved inside its teacher's
    folder shares them: ``../vae``). ``sample --model_path out`` and ``demo eval --model_path out`` then sample it
    with its own defaults. ValueError for a LoRA student (ship its adapter with ``--lora`` instead) or an ``out``
    that exists; FileNotFoundError for a run without ``sampling_config.json`` (not a distill run)."""
    import os
    import shutil

    from opensora_plan.pipelines.model_folder import SAMPLING_CONFIG
    from opensora_plan.pipelines.training_run import resolve_training_output

    models = resolve_training_output(run)
    record = models.checkpoint / SAMPLING_CONFIG
    if not record.is_file():
        raise FileNotFoundError(f"{models.checkpoint} has no {SAMPLING_CONFIG}; give a `distill` run or checkpoint.")
    if models.lora is not None:
        raise ValueError(f"{run} is a LoRA student; sample it with --lora {models.weights} on its teacher instead.")
    out = Path(out)
    if out.exists():
        raise ValueError(f"{out} exists; choose a new folder (nothing is overwritten).")
    out.mkdir(parents=True)
    shutil.copytree(models.weights, out / version, copy_function=shutil.copyfile)
    config = {"version": version, **json.loads(record.read_text())}
    for key, path in (("vae", models.vae), ("text_encoder", models.text_encoder)):
        if path:
            config[key] = os.path.relpath(Path(path).resolve(), out.resolve())
    (out / SAMPLING_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return out
