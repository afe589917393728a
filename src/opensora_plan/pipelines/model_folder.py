"""What a model folder says about how to sample it, and where the shipped model lives.

A model folder (the release layout, a ``save_pretrained`` folder, a ``train-t2v`` run or checkpoint, a demo
model, a distilled student) may carry its sampling defaults in ``sampling_config.json`` beside its weights:
what ``model_index.json`` is to diffusers' components, this file is to sampling, like transformers'
``generation_config.json``. Every field is optional; docs/sampling.md documents them::

    {
      "version": "17x64x64",                  the transformer folder to sample with
      "text_encoder": "text_encoder",         T5 folder, relative to the model folder (or absolute)
      "vae": "vae",                           CausalVAE folder, relative to the model folder (default: vae/)
      "sample_method": "EulerAncestralDiscrete",
      "num_sampling_steps": 50,
      "guidance_scale": 3.0,
      "fps": 8,
      "cache_fast": {"method": "teacache", "threshold": 0.8},   what --cache fast means for this model
      "example_prompts": ["a red circle moving left"],          prompts it knows (serve shows them)
      "vocabulary": [["red", "blue"], ["circle", "square"]],    a prompt it knows names a word of each group
      "stages": {"interpolate": {"model_path": "amt", "factor": 2},   post-processing models it ships with
                 "upscale": {"model_path": "rgt", "scale": 2}}
    }

A demo model folder (``demo train``'s ``model/``, the shipped ``assets/demo``) writes the same fields into
``demo.json``, which also records how it was trained; a folder without ``sampling_config.json`` but with a
``demo.json`` is read from that file (old demo folders keep loading). :func:`load_sampling_config` is the
one reader; a setting the file does not give falls back to :data:`RELEASE_SAMPLE_DEFAULTS`, and a flag or
argument given by the caller wins over both (flag > folder file > release defaults).

What kind of folder a path is, and where each kind is resolved:

- release layout (``<version>/`` LatteT2V folders + ``vae/``, the T5 elsewhere): :func:`version_folders`;
  ``sample`` checks it in ``sample_t2v._check_model_folders``;
- ``save_pretrained`` / diffusers folder (``model_index.json``): ``models.loading.component_folder``;
- ``train-t2v`` run or ``checkpoint-<step>`` folder, LoRA runs included: ``pipelines.training_run``
  (``is_training_output``, ``resolve_training_output``, ``resolve_lora_adapter``);
- demo model: the release layout + ``demo.json`` (and ``model_index.json``); the shipped one is
  :func:`default_model_path`.

A post-processing stage's model (``stages``: frame interpolation, super-resolution) is resolved in one place,
:func:`stage_model` (a flag or argument > the folder's ``stages`` entry), for ``sample``, ``interpolate``,
``serve``, ``demo eval`` and ``OpenSoraPlanPipeline.load_stages``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

SAMPLING_CONFIG = "sampling_config.json"
DEMO_INFO = "demo.json"  # a demo model's sampling file, which also records its training

DEFAULT_TEXT_ENCODER = "DeepFloyd/t5-v1_1-xxl"
# The release's sampling settings (the reference's sample_t2v.sh), for a folder whose file does not give them.
RELEASE_SAMPLE_DEFAULTS = {"version": "65x512x512", "text_encoder_name": DEFAULT_TEXT_ENCODER,
                           "sample_method": "PNDM", "num_sampling_steps": 50, "guidance_scale": 7.5, "fps": 24.0}

# Post-processing stages a folder may ship with, and the one whole-number factor each takes (besides model_path).
STAGES = {"interpolate": "factor", "upscale": "scale"}
# demo.json was written before example_prompts existed: these are the prompts of the demo's vocabulary that
# `serve` showed for it (demo/shapes.caption; tests/test_model_folder.py keeps the two equal).
DEMO_EXAMPLE_PROMPTS = ("a red circle moving left", "a blue square moving up", "a yellow triangle moving right",
                        "a green circle moving down", "a white square moving left")
# The words a demo model knows (demo/shapes: COLOURS, SHAPES, DIRECTIONS; tests/test_user_hints.py keeps them
# equal): a prompt that names no word of a group is outside what it was trained on.
DEMO_VOCABULARY = (("red", "green", "blue", "yellow", "white"), ("circle", "square", "triangle"),
                   ("left", "right", "up", "down"))
# Keys demo.json carries besides the sampling fields: its training record, read by nothing here.
_DEMO_RECORD_KEYS = ("trained_with", "training_seconds", "stage_seconds", "machine", "note", "cache_fast_note",
                     "interpolation_trained_with", "upscaler_trained_with", "stages_note")


def version_folders(folder: str | os.PathLike) -> list[str]:
    """Sub-folders holding a LatteT2V ``config.json`` (the release's version folders), sorted."""
    import json

    found = []
    for sub in sorted(p for p in Path(folder).iterdir() if p.is_dir()):
        config = sub / "config.json"
        if config.is_file() and json.loads(config.read_text()).get("_class_name") == "LatteT2V":
            found.append(sub.name)
    return found


def default_model_path() -> Path:
    """The demo model shipped inside the package (``opensora_plan/assets/demo``): the default ``--model_path``."""
    return Path(__file__).resolve().parents[1] / "assets" / "demo"


@dataclass(frozen=True)
class SamplingConfig:
    """The sampling defaults of one model folder; ``None`` where the file does not give a setting.

    ``text_encoder`` and every stage's ``model_path`` are resolved against the folder. ``path`` is the file read.
    """

    path: Path
    version: str | None = None
    text_encoder: str | None = None
    vae: str | None = None  # CausalVAE folder (None: the folder's vae/); a distilled student shares its teacher's
    sample_method: str | None = None
    num_sampling_steps: int | None = None
    guidance_scale: float | None = None
    fps: float | None = None
    cache_fast: dict | None = None
    example_prompts: tuple[str, ...] | None = None
    vocabulary: tuple[tuple[str, ...], ...] | None = None
    stages: dict = field(default_factory=dict)

    def prompt_hint(self, prompt: str) -> str | None:
        """One sentence when ``prompt`` names no word of one of the ``vocabulary`` groups (the model never saw
        such a prompt, so its video will not follow it), else None (also when the file gives no vocabulary)."""
        import re

        words = set(re.findall(r"[a-z]+", prompt.lower()))
        missing = [group for group in self.vocabulary or () if not words & set(group)]
        if not missing:
            return None
        example = f", e.g. {self.example_prompts[0]!r}" if self.example_prompts else ""
        return (f"the prompt {prompt!r} is outside what this model knows: it names none of "
                + "; none of ".join("/".join(group) for group in missing)
                + f" ({self.path}{example}); the video will not follow it"
                + (" (the demo draws coloured blobs)" if self.is_demo else "") + ".")

    @property
    def is_demo(self) -> bool:
        """A demo model (its file is ``demo.json``): shapes on black, latents that reach +-8."""
        return self.path.name == DEMO_INFO

    def sample_defaults(self) -> dict:
        """The settings of ``sample`` this file gives, under ``SampleOptions`` names (unset ones left out)."""
        values = {"version": self.version, "text_encoder_name": self.text_encoder, "sample_method": self.sample_method,
                  "num_sampling_steps": self.num_sampling_steps, "guidance_scale": self.guidance_scale,
                  "fps": self.fps}
        return {key: value for key, value in values.items() if value is not None}


# Fields of a sampling file that name files inside its folder: rewritten for a save_pretrained folder.
_FOLDER_FIELDS = ("version", "text_encoder", "vae", "stages")
# The pipeline component each post-processing stage's model is saved as (OpenSoraPlanPipeline.load_stages).
_STAGE_COMPONENTS = {"interpolate": "frame_interpolator", "upscale": "upscaler"}


def save_sampling_defaults(source: str | os.PathLike | None, save_directory: str | os.PathLike,
                           saved_stages: tuple[str, ...] = ()) -> Path | None:
    """Write a sampling file into the ``save_pretrained`` folder ``save_directory`` (what ``save_pretrained`` of a
    pipeline adds to diffusers' files), so that it samples as the loaded folder ``source`` did, through the
    Python API and ``sample --model_path``.

    Kept from ``source``'s file (its ``sampling_config.json``, or a demo's ``demo.json``, whose kind the copy
    keeps): every field but those naming files in ``source`` (version, text_encoder, vae, stages), comments
    (``_distillation`` of a student) included. Written for
    ``save_directory``'s own files: ``version``, its LatteT2V folder (``transformer``), ``text_encoder``
    when one was saved, and ``stages`` for the stage models saved as components (``frame_interpolator/``,
    ``upscaler/``: loaded with ``load_stages`` before saving; ``saved_stages`` names the stages this save wrote,
    so a stage folder left over in ``save_directory`` is not listed), with ``source``'s factor / scale. ``_saved_from`` records ``source``. Returns the file written. Raises ValueError for a
    malformed file in ``source`` (:func:`load_sampling_config`'s message).
    """
    import json

    save_directory = Path(save_directory)
    path = sampling_config_file(source) if source is not None and os.path.isdir(source) else None
    data, stages = {}, {}
    if path is not None:
        stages = dict(load_sampling_config(source).stages)  # validated before anything is written
        data = {k: v for k, v in json.loads(path.read_text()).items() if k not in _FOLDER_FIELDS}
        data["_saved_from"] = str(Path(source).resolve())
    transformers = version_folders(save_directory)
    if len(transformers) == 1:
        data["version"] = transformers[0]
    if (save_directory / "text_encoder" / "config.json").is_file():
        data["text_encoder"] = "text_encoder"
    saved = {}
    for stage, component in _STAGE_COMPONENTS.items():  # the stage models save_pretrained wrote as components
        config = save_directory / component / "config.json"
        if stage in saved_stages and config.is_file():
            factor = STAGES[stage]
            default = json.loads(config.read_text()).get("upscale", 2) if stage == "upscale" else 2
            saved[stage] = {factor: stages.get(stage, {}).get(factor, default), "model_path": component}
    if saved:
        data["stages"] = saved
    target = save_directory / (path.name if path is not None else SAMPLING_CONFIG)
    target.write_text(json.dumps(data, indent=2) + "\n")
    return target


def sampling_config_file(folder: str | os.PathLike) -> Path | None:
    """The folder's ``sampling_config.json``, else its ``demo.json``, else None."""
    for name in (SAMPLING_CONFIG, DEMO_INFO):
        if (Path(folder) / name).is_file():
            return Path(folder) / name
    return None


def base_model_sampling_config(pretrained: str | os.PathLike | None) -> SamplingConfig | None:
    """The sampling file of a base model given as its transformer (``train-t2v --pretrained``): the folder's own,
    else its parent's (the shipped demo's ``17x64x64/`` sits beside ``demo.json``); None for a weights file
    (Latte's ``t2v.pt``), None, or a folder without one."""
    if not pretrained or not Path(pretrained).is_dir():
        return None
    for folder in (Path(pretrained), Path(pretrained).parent):
        config = load_sampling_config(folder)
        if config is not None:
            return config
    return None


def load_sampling_config(folder: str | os.PathLike | None) -> SamplingConfig | None:
    """The sampling defaults ``folder`` carries (None for the shipped demo), or None when it has no file.

    A field of the wrong type or range is a ValueError naming the file and the field; so is an unknown
    field of ``sampling_config.json`` (keys starting with ``_`` are comments).
    """
    folder = Path(folder) if folder is not None else default_model_path()
    path = sampling_config_file(folder)
    if path is None:
        return None
    # here, not at the top: utils imports torch, and sample --help reads this module
    from opensora_plan.utils import read_json_file

    data = read_json_file(path, "Sampling config")
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds {type(data).__name__}, not an object; write the fields as in "  # noqa: TRY004
                         "docs/sampling.md.")
    known = {f for f in SamplingConfig.__dataclass_fields__ if f != "path"}
    ignored = _DEMO_RECORD_KEYS if path.name == DEMO_INFO else ()
    unknown = sorted(k for k in data if k not in known and k not in ignored and not k.startswith("_"))
    if unknown and path.name == SAMPLING_CONFIG:
        raise ValueError(f"{path} has unknown fields {unknown}; expected some of {sorted(known)} (docs/sampling.md).")

    def check(name, ok, expected):
        if name in data and not ok(data[name]):
            raise ValueError(f"{path}: {name} must be {expected}, got {data[name]!r}.")

    def number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    for name in ("version", "text_encoder", "vae", "sample_method"):
        check(name, lambda v: isinstance(v, str) and v != "", "a non-empty string")
    check("num_sampling_steps", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
          "a whole number >= 1")
    check("guidance_scale", lambda v: number(v) and v >= 0, "a finite number >= 0")
    check("fps", lambda v: number(v) and v > 0, "a positive number")
    check("cache_fast", lambda v: isinstance(v, dict) and isinstance(v.get("method"), str),
          'an object with a "method" (e.g. {"method": "teacache", "threshold": 0.1})')
    check("example_prompts", lambda v: isinstance(v, list) and v and all(isinstance(p, str) and p.strip() for p in v),
          "a non-empty list of prompts")
    check("vocabulary", lambda v: isinstance(v, list) and v and all(
        isinstance(g, list) and g and all(isinstance(w, str) and w.strip() for w in g) for g in v),
        'a non-empty list of word lists (e.g. [["red", "blue"], ["circle", "square"]])')
    check("stages", lambda v: isinstance(v, dict), f"an object with some of {sorted(STAGES)}")
    stages = {name: _stage(path, name, spec) for name, spec in data.get("stages", {}).items()}
    example_prompts = data.get("example_prompts")
    vocabulary = data.get("vocabulary")
    if example_prompts is None and path.name == DEMO_INFO:
        example_prompts = DEMO_EXAMPLE_PROMPTS
    if vocabulary is None and path.name == DEMO_INFO:
        vocabulary = DEMO_VOCABULARY
    return SamplingConfig(
        path=path,
        version=data.get("version"),
        text_encoder=str(folder / data["text_encoder"]) if "text_encoder" in data else None,
        vae=str(folder / data["vae"]) if "vae" in data else None,
        sample_method=data.get("sample_method"),
        num_sampling_steps=data.get("num_sampling_steps"),
        guidance_scale=data.get("guidance_scale"),
        fps=data.get("fps"),
        cache_fast=dict(data["cache_fast"]) if "cache_fast" in data else None,
        example_prompts=tuple(example_prompts) if example_prompts is not None else None,
        vocabulary=tuple(tuple(w.lower() for w in group) for group in vocabulary) if vocabulary is not None else None,
        stages=stages,
    )


def _stage(path: Path, name: str, spec) -> dict:
    """One post-processing stage, its ``model_path`` resolved against the folder of ``path``."""
    if name not in STAGES:
        raise ValueError(f"{path}: unknown stage {name!r} in stages; expected some of {sorted(STAGES)}.")
    factor = STAGES[name]
    if not isinstance(spec, dict) or not isinstance(spec.get("model_path"), str) or not spec["model_path"]:
        raise ValueError(f'{path}: stages.{name} must be an object with a "model_path" (a folder, relative to the '
                         f'model folder), got {spec!r}.')
    unknown = sorted(set(spec) - {"model_path", factor})
    if unknown:
        raise ValueError(f"{path}: stages.{name} has unknown fields {unknown}; expected model_path and {factor}.")
    value = spec.get(factor, 2)
    if not isinstance(value, int) or isinstance(value, bool) or value < 2:
        raise ValueError(f"{path}: stages.{name}.{factor} must be a whole number >= 2, got {value!r}.")
    return {"model_path": str(path.parent / spec["model_path"]), factor: value}


def vae_folder(model_path: str | os.PathLike) -> Path:
    """The CausalVAE folder of a model folder: its sampling file's ``vae`` (e.g. ``../vae`` for a distilled student
    shipped inside its teacher's folder), else ``<model_path>/vae``."""
    config = load_sampling_config(model_path)
    return Path(config.vae) if config is not None and config.vae else Path(model_path) / "vae"


def adapter_sampling_config(lora: str | os.PathLike | None) -> SamplingConfig | None:
    """The ``sampling_config.json`` a LoRA adapter carries (a ``distill --lora_rank`` student): in the adapter
    folder, its checkpoint folder or its run folder (the nearest wins); None when there is none."""
    if lora is None:
        return None
    path = Path(lora)
    for folder in (path, path.parent, path.parent.parent):
        if (folder / SAMPLING_CONFIG).is_file():
            return load_sampling_config(folder)
    return None


def fast_cache_options(model_path: str | os.PathLike | None) -> dict:
    """What ``--cache fast`` means for a model folder (None: the shipped demo): its file's ``cache_fast``
    (calibrated on that model, docs/demo.md) or, for other folders, ``models.step_cache.FAST_CACHE``."""
    from opensora_plan.models.step_cache import FAST_CACHE

    config = load_sampling_config(model_path)
    return dict(config.cache_fast if config is not None and config.cache_fast is not None else FAST_CACHE)


def stage_model(name: str, model_path: str | os.PathLike | None = None, folder: str | os.PathLike | None = None,
                flag: str = "--model_path", needed_for: str | None = None) -> Path:
    """Where the model of post-processing stage ``name`` ("interpolate" or "upscale") is: the one place every
    command (``sample``, ``interpolate``, ``upscale``, ``serve``, ``demo eval``) and the pipeline resolve it.

    ``model_path`` given (a flag or argument) wins; else the ``stages[name]`` entry of ``folder``'s sampling file
    (``folder`` None: the shipped demo's ``demo.json``). Neither: one ValueError naming ``flag`` (``needed_for``
    says what asked for the stage). A path that does not exist: FileNotFoundError. Nothing is loaded.
    """
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; expected one of {sorted(STAGES)}.")
    what = {"interpolate": "AMT frame-interpolation weights: the official amt-g.pth or a save_pretrained folder",
            "upscale": "RGT super-resolution weights: the official RGT_x2.pth / RGT_x4.pth or a save_pretrained "
                       "folder"}[name]
    source = flag
    if model_path is None:
        config = load_sampling_config(folder)
        if config is None or name not in config.stages:
            where = "here: the shipped demo" if folder is None else f"here: {folder}"
            raise ValueError(f"{needed_for or 'This'} needs {flag} {where} lists no {name} model in the stages of "
                             f"its sampling file; give {flag} ({what}).")
        model_path, source = config.stages[name]["model_path"], f"stages.{name} of {config.path}"
    path = Path(model_path)
    if not path.exists():
        raise FileNotFoundError(f"{source}: {path} does not exist; give {flag} ({what}).")
    check_stage_model_kind(name, path, flag if source == flag else source)
    return path


# What each stage needs: the model class a save_pretrained folder's config.json names, and words for errors.
STAGE_MODELS = {"interpolate": ("AMTModel", "frame interpolation", "an AMT model (amt-g.pth or an AMTModel folder)"),
                "upscale": ("RGTModel", "super-resolution",
                            "an RGT model (RGT_x2.pth / RGT_x4.pth or an RGTModel folder)")}
_KIND_WORDS = {cls: words for cls, words, _ in STAGE_MODELS.values()}


def check_stage_model_kind(name: str, path: str | os.PathLike, flag: str = "--model_path") -> None:
    """A folder's ``config.json`` ``_class_name`` must be the stage's model class: one ValueError saying what the
    folder holds and what ``name`` needs, before anything loads (files and folders without one: the loader's
    checks)."""
    import json

    config = Path(path) / "config.json"
    if not config.is_file():
        return
    try:
        found = json.loads(config.read_text()).get("_class_name")
    except (ValueError, OSError, AttributeError):
        return  # the loader reports an unreadable config
    wanted, _, needs = STAGE_MODELS[name]
    if isinstance(found, str) and found != wanted:
        from opensora_plan.utils import with_article

        what = f" ({_KIND_WORDS[found]})" if found in _KIND_WORDS else ""
        raise ValueError(f"{flag} {path} is {with_article(found)} folder{what}; {name} needs {needs}.")


def folder_stages(folder: str | os.PathLike | None) -> dict:
    """``stages`` of a model folder's sampling file (None: the shipped demo); ``{}`` when it has none."""
    config = load_sampling_config(folder)
    return dict(config.stages) if config is not None else {}
