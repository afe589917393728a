"""``opensora-plan demo eval``: sample the demo model over the "shapes" vocabulary and judge every video.

For each prompt (default: all 60 combinations) and each seed, one video is sampled with the same
pipeline as ``opensora-plan sample`` (single-prompt text embeddings, classifier-free guidance against
the empty prompt), written to mp4 and read back (the path a user's video takes), and scored by
:func:`~opensora_plan.demo.judge.judge_video`: colour, shape, direction and a clean black background.
The result is the accuracy of each attribute, plus "all" (every attribute right in one video).

Seeds: the video of prompt ``i`` (in :func:`~opensora_plan.demo.shapes.all_prompts` order) with seed
``s`` starts from noise seeded with ``1000 * s + i``, so every video has its own noise and a run is
reproducible.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

from opensora_plan.demo.judge import judge_video
from opensora_plan.demo.shapes import COLOURS, JUDGED_AS, SHAPES, all_prompts, parse_caption
from opensora_plan.utils import plural
from opensora_plan.options import Options, option
from opensora_plan.pipelines.outputs import OVERWRITE_HELP, check_output_file, check_targets

logger = logging.getLogger(__name__)

ATTRIBUTES = ("colour", "shape", "direction", "background")
TARGETS = {"colour": 0.95, "direction": 0.90, "shape": 0.80}  # issue 6


@dataclass
class DemoEvalReport:
    settings: dict
    videos: list[dict] = field(default_factory=list)  # one record per (prompt, seed)
    seconds: float = 0.0
    denoise_seconds: float = 0.0  # the denoising loops alone (no text encoding, decoding or judging)
    denoise_cpu_seconds: float = 0.0  # the same in process CPU time (steadier on shared cores)

    def accuracy(self) -> dict[str, float]:
        """Share of videos with each attribute right, and with all of them right ("all")."""
        n = max(len(self.videos), 1)
        acc = {a: sum(v["correct"][a] for v in self.videos) / n for a in ATTRIBUTES}
        acc["all"] = sum(all(v["correct"].values()) for v in self.videos) / n
        return acc

    def meets_targets(self) -> bool:
        acc = self.accuracy()
        return all(acc[a] >= t for a, t in TARGETS.items())

    def table(self) -> str:
        acc = self.accuracy()
        lines = [f"{plural(len(self.videos), 'video')} ({plural(len({v['prompt'] for v in self.videos}), 'prompt')} "
                 f"x {plural(len(self.settings['seeds']), 'seed')}), {self.settings['sample_method']} "
                 f"{plural(self.settings['num_sampling_steps'], 'step')}, guidance {self.settings['guidance_scale']}, "
                 f"{self.seconds:.0f} s ({self.denoise_seconds:.1f} s denoising)"]
        post = [f"{name} x{self.settings.get(name, 1)}" for name in ("interpolate", "upscale")
                if self.settings.get(name, 1) != 1]
        if post:
            lines.append(f"  judged after {', then '.join(post)}")
        cache = self.settings.get("cache", "none")
        if cache != "none":
            lines.append(f"  cache {cache}: blocks skipped on {self.settings.get('skipped_fraction', 0):.0%} of forwards")
        for name in (*ATTRIBUTES, "all"):
            target = f"  (target >= {TARGETS[name]:.0%})" if name in TARGETS else ""
            lines.append(f"  {name:<10} {acc[name]:7.1%}{target}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"settings": self.settings, "accuracy": self.accuracy(), "meets_targets": self.meets_targets(),
                "seconds": self.seconds, "denoise_seconds": self.denoise_seconds,
                "denoise_cpu_seconds": self.denoise_cpu_seconds, "videos": self.videos}


def select_prompts(num_prompts: int | None = None, colours: list[str] | None = None,
                   shapes: list[str] | None = None) -> list[str]:
    """``num_prompts`` of the 60 canonical prompts, evenly spaced so every colour, shape and direction
    appears when ``num_prompts >= 12``; all 60 when None. ``colours`` / ``shapes``: the prompts of those
    colours / shapes instead (e.g. ``shapes=["diamond"]``, a word the shipped demo never saw)."""
    prompts = all_prompts(colours, shapes)
    if num_prompts is None or num_prompts >= len(prompts):
        return prompts
    if num_prompts < 1:
        raise ValueError(f"num_prompts must be at least 1, got {num_prompts}.")
    # Stride 7 is coprime with 60 and with the 4 directions / 12 prompts per colour: a spread sample.
    return [prompts[(7 * k) % len(prompts)] for k in range(num_prompts)]  # 7: coprime with 60 and 12


def load_demo_pipeline(model_path: str | os.PathLike | None = None, sample_method: str | None = None,
                       device: str | None = None):
    """``(pipeline, demo_info)`` for a demo model folder (default: the shipped one), or a ``train-t2v`` /
    ``distill`` run or checkpoint of a demo model (sampled with the settings ``sample`` gives it), in float32."""
    from opensora_plan.demo.model import default_model_path, fast_cache_options, load_demo_info
    from opensora_plan.pipelines.model_folder import vae_folder
    from opensora_plan.pipelines.training_run import is_training_output
    from opensora_plan.diffusion.schedulers import create_scheduler
    from opensora_plan.models.causalvae import CausalVAEModel
    from opensora_plan.models.latte import LatteT2V
    from opensora_plan.models.text_encoder import load_t5
    from opensora_plan.pipelines.pipeline_opensora_plan import OpenSoraPlanPipeline
    from opensora_plan.utils import resolve_device

    model_path = Path(model_path) if model_path else default_model_path()
    device = resolve_device(device)
    if is_training_output(model_path):
        from opensora_plan.pipelines.sample_t2v import resolve_sample_defaults
        from opensora_plan.pipelines.training_run import load_run_transformer, resolve_training_output

        run = resolve_training_output(model_path)
        if not run.text_encoder:
            raise ValueError(f"{model_path}: the run recorded no T5 folder (--text_encoder_name); judge a model "
                             "folder instead.")
        info = {**resolve_sample_defaults(model_path), "version": run.checkpoint.name}
        tokenizer, text_encoder = load_t5(run.text_encoder, device=device)
        transformer = load_run_transformer(run, torch.float32, device)
        vae_path = run.vae
    else:
        info = load_demo_info(model_path)
        tokenizer, text_encoder = load_t5(model_path / info["text_encoder"], device=device)
        transformer = LatteT2V.from_pretrained(model_path / info["version"], device=device).eval()
        vae_path = vae_folder(model_path)
    vae = CausalVAEModel.from_pretrained(vae_path, device=device).eval()
    scheduler = create_scheduler(sample_method or info["sample_method"])
    pipe = OpenSoraPlanPipeline(vae=vae, transformer=transformer, scheduler=scheduler, text_encoder=text_encoder,
                                tokenizer=tokenizer)
    pipe.fast_cache_options = fast_cache_options(model_path)
    return pipe, info


DEFAULT_SEEDS = (0, 1, 2)


@dataclass
class DemoEvalOptions(Options):
    """Every option of ``opensora-plan demo eval``; sampling settings left unset come from the model's demo.json."""

    COMMAND: ClassVar[str] = "demo eval"

    model_path: str | None = option(None, help="demo model folder, or a train-t2v / distill run or checkpoint of one (unset: the shipped demo)")
    num_prompts: int | None = option(None, help="evaluate a spread subset of the 60 prompts (unset: all)")
    seeds: list[int] = option(default_factory=lambda: list(DEFAULT_SEEDS), help="seeds per prompt")
    num_sampling_steps: int | None = option(None, help="unset: the model's own (its demo.json or sampling_config.json)")
    guidance_scale: float | None = option(None, help="unset: the model's own (its demo.json or sampling_config.json)")
    sample_method: str | None = option(None, help="scheduler name; unset: the model's own (its demo.json or sampling_config.json)")
    save_dir: str | None = option(None, help="keep the sampled mp4 files here")
    json_out: str | None = option(None, help="write the per-video verdicts and accuracies here")
    overwrite: bool = option(False, help=OVERWRITE_HELP)
    device: str | None = option(None, help="cpu | cuda | cuda:N (unset: cuda when available)")
    cache: str = option("none", help="step caching as in `sample --cache`")
    colours: list[str] | None = option(None, help="evaluate the prompts of these colours instead (e.g. magenta, a "
                                       "word the shipped demo never saw; docs/training.md)", show_default=False)
    shapes: list[str] | None = option(None, help="evaluate the prompts of these shapes instead (e.g. diamond, a "
                                      "word the shipped demo never saw)", show_default=False)
    lora: str | None = option(None, help="LoRA adapter (folder, or a train-t2v / distill --lora_rank run or checkpoint) "
                              "applied to the model; a distilled adapter's own sampler, steps and guidance are used")
    lora_scale: float = option(1.0, help="strength of the LoRA")
    interpolate: int = option(1, choices=[1, 2, 4, 8], help="judge the videos after frame interpolation x N, as "
                              "sample --interpolate writes them (1: off)")
    upscale: int = option(1, choices=[1, 2, 4], help="judge the videos after super-resolution x S, as sample "
                          "--upscale writes them (1: off)")
    interpolate_model: str | None = option(None, show_default=False, help="AMT weights for --interpolate (unset: "
                                           "the demo folder's stages.interpolate)")
    upscale_model: str | None = option(None, show_default=False, help="RGT weights for --upscale (unset: the demo "
                                       "folder's stages.upscale)")

    def __post_init__(self):
        from opensora_plan.models.step_cache import parse_cache_spec

        if self.num_sampling_steps is not None and self.num_sampling_steps < 1:
            raise ValueError(f"--num_sampling_steps must be at least 1, got {self.num_sampling_steps}.")
        if self.guidance_scale is not None and self.guidance_scale < 0:
            raise ValueError(f"--guidance_scale must be >= 0 (1 disables guidance), got {self.guidance_scale}.")
        if self.num_prompts is not None:
            available = len(all_prompts(self.colours, self.shapes))
            if not 1 <= self.num_prompts <= available:
                raise ValueError(f"--num_prompts must be from 1 to {available} (the prompts there are), got "
                                 f"{self.num_prompts}; leave it out to evaluate all {available}.")
        parse_cache_spec(self.cache)  # a bad --cache fails before any weights load
        if self.lora is None and self.lora_scale != 1.0:
            raise ValueError("--lora_scale has no effect without --lora; add --lora or drop --lora_scale.")
        if self.json_out:
            check_output_file(self.json_out, "--json_out", self.overwrite)  # before any sampling
        if self.overwrite and not (self.json_out or self.save_dir):
            raise ValueError("--overwrite has no effect without --json_out or --save_dir; drop it.")
        if self.lora is not None:
            from opensora_plan.models.lora import require_peft

            require_peft()  # a missing [lora] extra is one line before the model loads
        for name in ("interpolate", "upscale"):
            if getattr(self, f"{name}_model") is not None and getattr(self, name) == 1:
                raise ValueError(f"--{name}_model has no effect without --{name}; add --{name} or drop "
                                 f"--{name}_model.")


def evaluate_demo(
    model_path: str | os.PathLike | None = None,
    prompts: list[str] | None = None,
    seeds: tuple[int, ...] = DEFAULT_SEEDS,
    num_sampling_steps: int | None = None,
    guidance_scale: float | None = None,
    sample_method: str | None = None,
    device: str | None = None,
    save_dir: str | os.PathLike | None = None,
    progress: bool = True,
    cache: str = "none",
    cache_options: dict | None = None,
    lora: str | os.PathLike | None = None,
    lora_scale: float = 1.0,
    interpolate: int = 1,
    upscale: int = 1,
    interpolate_model: str | os.PathLike | None = None,
    upscale_model: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> DemoEvalReport:
    """Sample every prompt with every seed, judge the videos, return the report.

    Sampling settings default to the model's ``demo.json``. ``save_dir`` keeps the mp4 files
    (``<prompt index>-<seed>-<prompt>.mp4``; an existing one is a ValueError before the model loads unless
    ``overwrite``); otherwise they go to a temporary folder. ``cache`` and
    ``cache_options`` go to :meth:`OpenSoraPlanPipeline.enable_cache` ("none": exact sampling).
    ``lora``: a ``train-t2v --lora_rank`` adapter folder applied at ``lora_scale``. Colours are judged among
    the demo's five plus any new colour the prompts name, shapes likewise. ``interpolate`` / ``upscale`` (1: off)
    judge the videos after those post-processing stages (as ``sample --interpolate N --upscale S`` writes them);
    their models come from ``interpolate_model`` / ``upscale_model``, else the demo folder's ``stages``.
    """
    from opensora_plan.data.video_io import read_video, write_video
    from opensora_plan.utils import progress_bar

    prompts = list(prompts) if prompts is not None else all_prompts()
    if not prompts or not seeds:
        raise ValueError("demo eval needs at least one prompt and one seed.")
    if len(set(seeds)) != len(seeds) or len(set(prompts)) != len(prompts):
        # Each (prompt, seed) names one file in save_dir; a repeat would overwrite an output of this run.
        raise ValueError(f"demo eval got repeated seeds or prompts ({list(seeds)}); give each once.")
    order = {p: i for i, p in enumerate(all_prompts())}
    if save_dir:  # the files it will hold, checked before the model loads: none replaced without overwrite
        check_targets([], [Path(save_dir) / _video_name(order.get(p, k), seed, p) for k, p in enumerate(prompts)
                           for seed in seeds], overwrite, flag="--save_dir")
    labels = [parse_caption(p) for p in prompts]  # fails early on a prompt outside the vocabulary
    labels = [(JUDGED_AS.get(c, c), s, d) for c, s, d in labels]  # e.g. crimson is drawn (and judged) as red
    from opensora_plan.pipelines.model_folder import stage_model

    stages = {name: stage_model(name, given, model_path, f"--{name}_model", f"--{name} {factor}")
              for name, given, factor in (("interpolate", interpolate_model, interpolate),
                                          ("upscale", upscale_model, upscale)) if factor != 1}
    if "upscale" in stages:
        from opensora_plan.pipelines.upscale import check_scale, model_scale

        check_scale(upscale, model_scale(stages["upscale"]), stages["upscale"], "--upscale_model", "--upscale")
    adapter_defaults = {}
    if lora:  # resolved as `sample --lora` resolves it; a distill --lora_rank student brings its own sampler
        from opensora_plan.pipelines.model_folder import adapter_sampling_config
        from opensora_plan.pipelines.training_run import resolve_lora_adapter

        resolved = resolve_lora_adapter(lora)
        if resolved is None:
            raise FileNotFoundError(f"--lora {lora} holds no pytorch_lora_weights.safetensors; give a train-t2v / "
                                    "distill --lora_rank run or checkpoint folder, or an adapter folder.")
        adapter = adapter_sampling_config(lora)
        adapter_defaults = {k: v for k, v in (adapter.sample_defaults() if adapter else {}).items()
                            if k in ("sample_method", "num_sampling_steps", "guidance_scale")}
        lora = resolved[0]
    pipe, info = load_demo_pipeline(model_path, sample_method or adapter_defaults.get("sample_method"), device)
    info = {**info, **adapter_defaults}
    if stages:
        pipe.load_stages(stages.get("interpolate"), stages.get("upscale"))
        pipe.check_stages(interpolate, upscale, None)  # an official .pth of another factor
    if lora:
        pipe.load_lora_weights(lora, lora_scale=lora_scale)
    colours = tuple(dict.fromkeys([*COLOURS, *(label[0] for label in labels)]))  # demo's five + new ones named
    shapes = tuple(dict.fromkeys([*SHAPES, *(label[1] for label in labels)]))
    pipe.set_progress_bar_config(disable=True)
    pipe.enable_cache(cache, **(cache_options or {}))
    steps = info["num_sampling_steps"] if num_sampling_steps is None else num_sampling_steps
    if steps < 1:
        raise ValueError(f"num_sampling_steps must be at least 1, got {steps}.")
    scale = info["guidance_scale"] if guidance_scale is None else guidance_scale
    settings = {"model_path": str(model_path or "shipped demo"), "version": info["version"],
                "sample_method": sample_method or info["sample_method"], "num_sampling_steps": steps,
                "guidance_scale": scale, "seeds": list(seeds), "num_prompts": len(prompts),
                "lora": str(lora) if lora else None, "lora_scale": lora_scale if lora else None,
                "cache": pipe.transformer.step_cache.options() if pipe.transformer.step_cache else "none",
                "interpolate": interpolate, "upscale": upscale}
    report = DemoEvalReport(settings)
    start = time.perf_counter()
    skipped = forwards = 0
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = Path(save_dir) if save_dir else Path(tmp)
        out_dir.mkdir(parents=True, exist_ok=True)
        for k, (prompt, (colour, shape, direction)) in enumerate(
                progress_bar(list(zip(prompts, labels)), desc="demo eval", unit="prompt", disable=not progress)):
            index = order.get(prompt, k)
            embeds, negative = pipe.encode_prompt(prompt, do_classifier_free_guidance=scale > 1.0)  # (1, L, C)
            n = len(seeds)
            generators = [torch.Generator("cpu").manual_seed(1000 * s + index) for s in seeds]
            denoise_start, denoise_cpu_start = time.perf_counter(), time.process_time()
            latents = pipe(
                prompt_embeds=embeds.expand(n, -1, -1),
                negative_prompt_embeds=negative.expand(n, -1, -1) if negative is not None else None,
                num_inference_steps=steps, guidance_scale=scale, generator=generators, output_type="latent",
            ).frames  # (n, C, F, h, w)
            report.denoise_seconds += time.perf_counter() - denoise_start
            report.denoise_cpu_seconds += time.process_time() - denoise_cpu_start
            if pipe.cache_stats is not None:
                skipped += pipe.cache_stats.skipped
                forwards += pipe.cache_stats.computed + pipe.cache_stats.skipped
            videos = pipe.decode_latents(latents, interpolate, upscale)  # (n, T', H', W', 3) uint8
            for seed, frames in zip(seeds, videos):
                path = write_video(out_dir / _video_name(index, seed, prompt), frames, fps=info.get("fps", 8) * interpolate)
                verdict = judge_video(read_video(path)[0].numpy(), colours=colours, shapes=shapes)
                report.videos.append({
                    "prompt": prompt, "seed": seed, "file": str(path) if save_dir else None,
                    "judged": {"colour": verdict.colour, "shape": verdict.shape, "direction": verdict.direction,
                               "fill_ratio": round(verdict.fill_ratio, 3),
                               "displacement": [round(d, 1) for d in verdict.displacement]},
                    "correct": verdict.matches(colour, shape, direction),
                })
    report.seconds = time.perf_counter() - start
    if forwards:
        report.settings["skipped_fraction"] = skipped / forwards
    return report


def _video_name(index: int, seed: int, prompt: str) -> str:
    """``<prompt index>-<seed>-<prompt>.mp4``, the name of a kept video in ``save_dir``."""
    return f"{index:02d}-{seed}-{prompt.replace(' ', '_')}.mp4"


def write_report(report: DemoEvalReport, path: str | os.PathLike) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(report.to_dict(), indent=1) + "\n")
