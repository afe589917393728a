"""``opensora-plan demo train``: build the embedded demo model with the project's own training code.

One command runs the whole recipe, each stage through the same library function as its command:

1. ``data``      -- :func:`~opensora_plan.demo.shapes.make_dataset` (``demo make-data``): mp4 + data.json;
2. ``t5``        -- :func:`~opensora_plan.demo.tiny_t5.build_tiny_t5`: a sentencepiece vocabulary
                    trained on the captions + a small random T5 encoder (frozen, as T5 is in the real recipe);
3. ``vae``       -- :func:`~opensora_plan.train.vae.train_vae` (``train-vae``) on the videos, then the
                    latent scale is measured on a few clips and written as ``scaling_factor``;
4. ``extract``   -- :func:`~opensora_plan.data.features.extract_features` (``extract``): VAE posteriors and
                    T5 embeddings cached once (the cache never flips clips, which matters here: a flip
                    would turn "moving left" into a video moving right);
5. ``t2v``       -- :func:`~opensora_plan.train.t2v.train_t2v` (``train-t2v``) on the cache;
6. ``assemble``  -- ``<out>/model/``: ``17x64x64/`` (LatteT2V version folder), ``vae/``, ``text_encoder/``
                    and ``demo.json`` (sampling defaults), the layout :func:`default_model_path` ships;
                    the shipped demo's post-processing stage models (frame interpolation, upscaler) are
                    copied in with their ``stages`` entries and training records
                    (:func:`copy_shipped_stages`): this recipe does not train them (``train-vfi`` /
                    ``train-sr`` do, docs/demo.md), and they know the same world of shapes.

``<out>/demo_train_report.json`` records the recipe, the wall time of every stage and the machine.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import ClassVar

import torch

from opensora_plan.demo.model import DEMO_INFO, default_model_path
from opensora_plan.options import Options, option
from opensora_plan.utils import valid_num_frames

logger = logging.getLogger(__name__)

REPORT_NAME = "demo_train_report.json"
STAGES = ("data", "t5", "vae", "extract", "t2v", "assemble")


# --------------------------------------------------------------------------------------------
# The recipe
# --------------------------------------------------------------------------------------------


@dataclass
class DemoRecipe:
    """Every knob of the demo training; the defaults are the recipe of the shipped model."""

    # data: 17 frames at 64x64 -> latents 5 x 8 x 8 with the 4x8x8 VAE
    num_videos: int = 360
    num_frames: int = 17
    size: int = 64
    data_seed: int = 0
    # text encoder (random, frozen) and its vocabulary
    t5_d_model: int = 64
    t5_layers: int = 2
    t5_heads: int = 2
    t5_d_ff: int = 128
    t5_vocab_size: int = 256
    model_max_length: int = 32  # tokens; the longest caption is about 10
    # CausalVAE: the release architecture with small channels (GroupNorm(32) sets the 32 minimum) and no
    # extra resnet blocks in the encoder levels (the decoder keeps one per level): about 2.5x cheaper to train.
    vae_overrides: dict = field(default_factory=lambda: {
        "hidden_size": 32, "hidden_size_mult": [1, 1, 2, 2], "num_res_blocks": 0, "resolution": 64,
    })
    vae_steps: int = 3000
    vae_num_frames: int = 9  # a causal VAE trained on 1 + 4k frames encodes any 1 + 4k: shorter clips train faster
    vae_resolution: int = 64  # whole frames (GroupNorm statistics depend on the frame size)
    vae_batch_size: int = 2
    vae_learning_rate: float = 1e-3
    vae_posterior_logvar_init: float = -8.0
    vae_rec_loss: str = "l2"  # L1's median keeps an uncertain object black on black frames; L2 lets it appear
    # then on whole clips (num_frames x size x size) from those weights: a VAE trained on 9 frames draws
    # frames 9-16 of a 17-frame clip visibly worse (GroupNorm statistics span all frames)
    vae_full_clip_steps: int = 1500
    vae_check_clips: int = 24  # clips encoded to measure the latent scale and judge reconstructions
    # LatteT2V
    latte_heads: int = 4
    latte_head_dim: int = 32
    latte_layers: int = 4
    t2v_steps: int = 14000
    t2v_batch_size: int = 16
    t2v_learning_rate: float = 5e-4
    # Constant LR + EMA (not a schedule tied to the step count): checkpoint-N of a longer run is exactly
    # the result of an N-step run, so the shipped step count can be picked from the checkpoints.
    t2v_lr_scheduler: str = "constant_with_warmup"
    t2v_lr_warmup_steps: int = 100
    t2v_ema_decay: float = 0.995  # the shipped weights are the EMA (horizon ~200 steps)
    cfg_dropout: float = 0.1
    mixed_precision: str = "bf16"
    seed: int = 0
    # sampling defaults written to demo.json (chosen by `demo eval` measurements, see docs/demo.md)
    # (not DDIM/DDPM: as in the reference they clip the predicted x0 to [-1, 1], and these latents reach +-8)
    sample_method: str = "EulerAncestralDiscrete"
    num_sampling_steps: int = 50
    guidance_scale: float = 3.0

    @property
    def version(self) -> str:
        """The version folder name, as the release's ``17x256x256``."""
        return f"{self.num_frames}x{self.size}x{self.size}"

    @classmethod
    def micro(cls) -> "DemoRecipe":
        """A few steps on a few 5-frame 32x32 videos: checks the wiring in seconds (tests), learns nothing."""
        return cls(num_videos=4, num_frames=5, size=32, vae_steps=1, vae_num_frames=1, vae_resolution=32,
                   vae_full_clip_steps=1,
                   vae_check_clips=2, t2v_steps=2, t2v_batch_size=2, latte_layers=1, latte_heads=2,
                   latte_head_dim=16, t5_d_model=32, t5_d_ff=64, num_sampling_steps=2)

    def check(self) -> None:
        if not valid_num_frames(self.num_frames):
            raise ValueError(f"num_frames {self.num_frames} must be 1 + 4k for the 4x8x8 VAE (e.g. 17).")
        if self.size % 16:
            raise ValueError(f"size {self.size} must be a multiple of 16 (8x VAE compression, patch 2).")
        if self.num_videos < 1 or self.vae_steps < 1 or self.t2v_steps < 1:
            raise ValueError("num_videos, vae_steps and t2v_steps must be at least 1.")


def _stage_list(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


_OVERRIDE = "override the recipe's value ({}; see docs/demo.md)"


@dataclass
class DemoTrainOptions(Options):
    """Every option of ``opensora-plan demo train``: where, which stages, and overrides of :class:`DemoRecipe`
    (None keeps the recipe's value; the help shows it)."""

    COMMAND: ClassVar[str] = "demo train"
    RECIPE_FIELDS: ClassVar[tuple[str, ...]] = ("num_videos", "vae_steps", "t2v_steps", "t2v_batch_size",
                                                "t2v_learning_rate", "latte_layers", "seed")

    out: str = option(help="output folder")
    stages: list[str] = option(default_factory=lambda: list(STAGES), type=_stage_list,
                               help="comma-separated subset of the stages (later stages reuse what earlier runs "
                               "wrote into --out)")
    micro: bool = option(False, help="a few steps on a few videos: checks the wiring, learns nothing")
    num_videos: int | None = option(None, help=_OVERRIDE.format(DemoRecipe.num_videos))
    vae_steps: int | None = option(None, help=_OVERRIDE.format(DemoRecipe.vae_steps))
    t2v_steps: int | None = option(None, help=_OVERRIDE.format(DemoRecipe.t2v_steps))
    t2v_batch_size: int | None = option(None, help=_OVERRIDE.format(DemoRecipe.t2v_batch_size))
    t2v_learning_rate: float | None = option(None, help=_OVERRIDE.format(DemoRecipe.t2v_learning_rate))
    latte_layers: int | None = option(None, help=_OVERRIDE.format(DemoRecipe.latte_layers))
    seed: int | None = option(None, help=_OVERRIDE.format(DemoRecipe.seed))

    def recipe(self) -> DemoRecipe:
        """The recipe (the micro one with --micro) with the overrides given."""
        base = DemoRecipe.micro() if self.micro else DemoRecipe()
        return replace(base, **{k: getattr(self, k) for k in self.RECIPE_FIELDS if getattr(self, k) is not None})


# --------------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------------


def machine_info() -> dict:
    """What the wall times were measured on."""
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _captions(data_json: Path) -> list[str]:
    entries = json.loads(data_json.read_text())
    return sorted({c for e in entries for c in ([e["cap"]] if isinstance(e["cap"], str) else e["cap"])})


def _final_model_folder(output_dir: Path, steps: int) -> Path | None:
    """``checkpoint-<steps>/model`` of a training output folder, or None when that run did not get there."""
    from opensora_plan.train.checkpoint import list_checkpoints

    for checkpoint in list_checkpoints(output_dir):
        if checkpoint.name == f"checkpoint-{steps}":
            return checkpoint / "model"
    return None


def _train_once(output_dir: Path, steps: int, train_fn) -> tuple[Path, float]:
    """Run ``train_fn`` (a training into ``output_dir`` that resumes from its latest checkpoint) unless
    ``output_dir`` already holds ``checkpoint-<steps>``. A rerun of ``demo train`` therefore keeps finished
    trainings and continues unfinished or shorter ones (the learning rates are constant, so N steps in two
    runs equal N in one); use a new ``--out`` for a changed recipe.

    Returns the final model folder and the wall time of the training; for a kept one, the time from its
    ``options.json`` (written at its start) to that checkpoint.
    """
    final = _final_model_folder(output_dir, steps)
    if final is not None:
        logger.info("demo train: reusing %s", final.parent)
        return final, final.parent.stat().st_mtime - (output_dir / "options.json").stat().st_mtime
    start = time.perf_counter()
    train_fn()
    final = _final_model_folder(output_dir, steps)
    if final is None:
        raise FileNotFoundError(f"{output_dir} holds no checkpoint-{steps} after training; see its log.jsonl.")
    return final, time.perf_counter() - start


@torch.no_grad()
def check_vae(vae_folder: Path, data_json: Path, num_clips: int, num_frames: int, size: int) -> dict:
    """Encode ``num_clips`` training clips: the latent scale and how well the reconstructions are judged.

    ``scaling_factor`` = 1 / std of the posterior means (Stable Diffusion's recipe: the diffusion model
    then sees latents of unit variance). ``reconstruction_accuracy``: share of reconstructed clips whose
    colour, shape, direction and background :func:`~opensora_plan.demo.judge.judge_video` gets right,
    an upper bound for what the text-to-video model can reach through this VAE.
    """
    from opensora_plan.data.datasets import load_video_entries
    from opensora_plan.data.features import cached_clip
    from opensora_plan.demo.judge import judge_video
    from opensora_plan.demo.shapes import parse_caption
    from opensora_plan.models.causalvae import CausalVAEModel

    vae = CausalVAEModel.from_pretrained(vae_folder).eval()
    means, right = [], {"colour": 0, "shape": 0, "direction": 0, "background": 0}
    entries = load_video_entries(data_json)[:num_clips]
    for entry in entries:
        video = cached_clip(entry.path, num_frames, 1, size, 0)  # (3, T, S, S) in [-1, 1]
        posterior = vae.encode(video[None]).latent_dist
        means.append(posterior.mean)  # (1, C, t, h, w)
        rec = vae.decode(posterior.mean).sample[0]  # (3, T, S, S)
        frames = ((rec / 2 + 0.5).clamp(0, 1) * 255).to(torch.uint8).permute(1, 2, 3, 0).numpy()  # (T, S, S, 3)
        for name, ok in judge_video(frames).matches(*parse_caption(entry.captions[0])).items():
            right[name] += ok
    return {"scaling_factor": float(1.0 / torch.cat(means).std()),
            "reconstruction_accuracy": {k: v / len(entries) for k, v in right.items()}}


def _set_scaling_factor(vae_folder: Path, value: float) -> None:
    path = vae_folder / "config.json"
    config = json.loads(path.read_text())
    config["scaling_factor"] = value
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _vae_config(recipe: DemoRecipe) -> dict:
    """The release CausalVAE config (the constructor defaults) with the demo's small channels."""
    import inspect

    from opensora_plan.models.causalvae import CausalVAEModel

    config = {name: list(p.default) if isinstance(p.default, tuple) else p.default
              for name, p in inspect.signature(CausalVAEModel.__init__).parameters.items() if name != "self"}
    config.update(recipe.vae_overrides)
    return config


# demo.json keys that say how a stage model was trained, copied with the stage (pipelines/model_folder.py).
STAGE_RECORDS = {"interpolate": "interpolation_trained_with", "upscale": "upscaler_trained_with"}


def copy_shipped_stages(model_dir: str | os.PathLike) -> dict:
    """Copy the shipped demo's (:func:`default_model_path`) post-processing stage models into ``model_dir``,
    replacing any there.

    Returns the ``demo.json`` fields for ``model_dir``: ``stages`` (the same relative ``model_path`` and factor
    per stage), each stage's training record and a ``stages_note`` saying the models were copied, not trained
    by ``demo train``; ``{}`` when the shipped demo lists no stages.
    """
    shipped = default_model_path()
    source_info = json.loads((shipped / DEMO_INFO).read_text())
    stages = source_info.get("stages") or {}
    for entry in stages.values():
        target = Path(model_dir) / entry["model_path"]
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(shipped / entry["model_path"], target, copy_function=shutil.copyfile)
    if not stages:
        return {}
    fields = {"stages": stages}
    fields.update({STAGE_RECORDS[name]: source_info[STAGE_RECORDS[name]] for name in stages
                   if source_info.get(STAGE_RECORDS.get(name))})
    fields["stages_note"] = (f"{', '.join(e['model_path'] + '/' for e in stages.values())} copied from the shipped "
                             "demo (opensora_plan/assets/demo) by demo train, not trained by it")
    return fields


def train_demo(out: str | os.PathLike, recipe: DemoRecipe | None = None, stages: tuple[str, ...] = STAGES) -> dict:
    """Run the demo recipe into ``out``; returns the report (also written to ``out/demo_train_report.json``).

    ``stages`` runs a subset (each stage reads what the earlier ones wrote into ``out``), e.g. to redo
    the T2V training with other settings on the same VAE.
    """
    from opensora_plan.demo.shapes import make_dataset

    recipe = recipe or DemoRecipe()
    recipe.check()
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ValueError(f"Unknown demo stage(s) {unknown}; choose from {', '.join(STAGES)}.")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data_json = out / "data" / "data.json"
    t5_dir, vae_run, cache_dir, t2v_run = out / "text_encoder", out / "vae_train", out / "features", out / "t2v_train"
    model_dir = out / "model"
    report_path = out / REPORT_NAME
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    report.setdefault("seconds", {})  # wall time of each stage as run by this command
    report.setdefault("training_seconds", {})  # wall time of the two trainings themselves
    report.update(recipe=asdict(recipe), machine=machine_info())
    mp = recipe.mixed_precision

    def timed(name, fn):
        if name not in stages:
            return
        logger.info("demo train: stage %s", name)
        start = time.perf_counter()
        fn()
        report["seconds"][name] = round(time.perf_counter() - start, 1)
        report["seconds"]["total"] = round(sum(v for k, v in report["seconds"].items() if k != "total"), 1)
        report_path.write_text(json.dumps(report, indent=2) + "\n")
        logger.info("demo train: stage %s took %.1f s", name, report["seconds"][name])

    def stage_data():
        make_dataset(out / "data", recipe.num_videos, num_frames=recipe.num_frames, size=recipe.size,
                     seed=recipe.data_seed, overwrite=True)  # the recipe's own folder, remade identically on a rerun

    def stage_t5():
        from opensora_plan.demo.tiny_t5 import build_tiny_t5

        build_tiny_t5(t5_dir, _captions(data_json), d_model=recipe.t5_d_model, num_layers=recipe.t5_layers,
                      num_heads=recipe.t5_heads, d_ff=recipe.t5_d_ff, vocab_size=recipe.t5_vocab_size,
                      seed=recipe.seed)

    def stage_vae():
        from opensora_plan.models.causalvae import CausalVAEModel
        from opensora_plan.train.trainer import TrainConfig
        from opensora_plan.train.vae import train_vae

        # Random initialisation, except the posterior log-variance starts small: with std ~1 noise on the
        # latents a random decoder learns to ignore them and stays blind for thousands of steps. (The real
        # recipe starts from an inflated 2-D image VAE, whose posterior is already narrow.)
        config = _vae_config(recipe)
        torch.manual_seed(recipe.seed)
        init = CausalVAEModel.from_config(config)
        with torch.no_grad():
            init.quant_conv.conv.bias[config["embed_dim"]:] = recipe.vae_posterior_logvar_init  # (mean, logvar)
        init.save_pretrained(out / "vae_init")

        def run(output_dir: Path, steps: int, init: Path, num_frames: int, resolution: int) -> tuple[Path, float]:
            options = dict(pretrained_model_path=str(init), data_path=str(data_json),
                           num_frames=num_frames, resolution=resolution,
                           learning_rate=recipe.vae_learning_rate, rec_loss=recipe.vae_rec_loss,
                           perceptual_weight=0.0,  # no LPIPS weights can be fetched here; L1 + KL
                           disc_start=10 * steps)  # no GAN term: too few steps for it to help
            train_config = TrainConfig(output_dir=str(output_dir), max_train_steps=steps,
                                       train_batch_size=recipe.vae_batch_size, mixed_precision=mp, seed=recipe.seed,
                                       checkpointing_steps=max(steps // 6, 1), report_to="none", extra=options,
                                       resume_from_checkpoint="latest")  # latest: a fresh run when none
            return _train_once(output_dir, steps, lambda: train_vae(train_config, **options))

        # Stage 1 on short clips (and optionally centre crops), stage 2 on whole clips: GroupNorm statistics
        # span all frames and pixels, so a VAE trained on less draws whole clips worse until tuned on them.
        trained, seconds = run(vae_run, recipe.vae_steps, out / "vae_init", recipe.vae_num_frames,
                               recipe.vae_resolution)
        report["training_seconds"]["vae"] = round(seconds, 1)
        if recipe.vae_full_clip_steps:
            trained, seconds = run(out / "vae_train_full", recipe.vae_full_clip_steps, trained, recipe.num_frames,
                                   recipe.size)
            report["training_seconds"]["vae_full_clip"] = round(seconds, 1)
        vae_dir = model_dir / "vae"
        shutil.rmtree(vae_dir, ignore_errors=True)
        shutil.copytree(trained, vae_dir, copy_function=shutil.copyfile)
        check = check_vae(vae_dir, data_json, recipe.vae_check_clips, recipe.num_frames, recipe.size)
        _set_scaling_factor(vae_dir, check["scaling_factor"])
        report["vae_check"] = check

    def stage_extract():
        from opensora_plan.data.features import extract_features

        shutil.rmtree(cache_dir, ignore_errors=True)  # a new VAE invalidates the cache ...
        shutil.rmtree(t2v_run, ignore_errors=True)  # ... and the T2V training on it
        extract_features(data_json, cache_dir, text_encoder_name=t5_dir, ae_path=model_dir / "vae",
                         num_frames=recipe.num_frames, max_image_size=recipe.size,
                         model_max_length=recipe.model_max_length, text_dtype="fp32", device="cpu")

    def stage_t2v():
        from opensora_plan.train.t2v import train_t2v

        latte = {"num_layers": recipe.latte_layers, "num_attention_heads": recipe.latte_heads,
                 "attention_head_dim": recipe.latte_head_dim,
                 "cross_attention_dim": recipe.latte_heads * recipe.latte_head_dim,
                 "caption_channels": recipe.t5_d_model, "norm_num_groups": 32}
        latte_path = out / "latte_config.json"
        latte_path.write_text(json.dumps(latte, indent=2) + "\n")
        _, seconds = _train_once(t2v_run, recipe.t2v_steps, lambda: train_t2v({
            "model": str(latte_path), "cached_features": str(cache_dir), "text_encoder_name": str(t5_dir),
            "ae_path": str(model_dir / "vae"), "num_frames": recipe.num_frames, "max_image_size": recipe.size,
            "model_max_length": recipe.model_max_length, "cfg_dropout": recipe.cfg_dropout,
            "train_batch_size": recipe.t2v_batch_size, "max_train_steps": recipe.t2v_steps,
            "learning_rate": recipe.t2v_learning_rate, "lr_scheduler": recipe.t2v_lr_scheduler,
            "lr_warmup_steps": min(recipe.t2v_lr_warmup_steps, recipe.t2v_steps - 1), "mixed_precision": mp,
            "use_ema": True, "ema_decay": recipe.t2v_ema_decay,
            "resume_from_checkpoint": "latest",  # a fresh run when there is no checkpoint yet
            "seed": recipe.seed, "checkpointing_steps": max(recipe.t2v_steps // 8, 1), "report_to": "none",
            "output_dir": str(t2v_run),
        }))
        report["training_seconds"]["t2v"] = round(seconds, 1)

    def stage_assemble():
        version_dir = model_dir / recipe.version
        shutil.rmtree(version_dir, ignore_errors=True)
        ema = _final_model_folder(t2v_run, recipe.t2v_steps).parent / "ema"  # EMA weights, same layout
        shutil.copytree(ema, version_dir, copy_function=shutil.copyfile)
        shutil.rmtree(model_dir / "text_encoder", ignore_errors=True)
        shutil.copytree(t5_dir, model_dir / "text_encoder", copy_function=shutil.copyfile)
        info = {"version": recipe.version, "text_encoder": "text_encoder",
                "sample_method": recipe.sample_method, "num_sampling_steps": recipe.num_sampling_steps,
                "guidance_scale": recipe.guidance_scale, "fps": 8,
                "trained_with": "opensora-plan demo train", "stage_seconds": report["seconds"],
                "training_seconds": report["training_seconds"],
                "machine": report["machine"]}
        info.update(copy_shipped_stages(model_dir))
        (model_dir / DEMO_INFO).write_text(json.dumps(info, indent=2) + "\n")
        report["model_dir"] = str(model_dir)
        report["model_bytes"] = sum(p.stat().st_size for p in model_dir.rglob("*") if p.is_file())

    for name, fn in (("data", stage_data), ("t5", stage_t5), ("vae", stage_vae), ("extract", stage_extract),
                     ("t2v", stage_t2v), ("assemble", stage_assemble)):
        timed(name, fn)
    report_path.write_text(json.dumps(report, indent=2) + "\n")
    return report
