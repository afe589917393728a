"""Small helpers shared across the package: dtypes, devices, seeding, atomic file writes, optional extras."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """'fp32' | 'bf16' | 'fp16' (or a torch.dtype) -> torch.dtype."""
    if isinstance(name, torch.dtype):
        return name
    aliases = {"float32": "fp32", "float": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16"}
    key = aliases.get(name, name)
    if key not in DTYPES:
        raise ValueError(f"Unknown dtype {name!r}; choose one of {', '.join(DTYPES)}.")
    return DTYPES[key]


def require_cuda_for_autocast(dtype: str | torch.dtype, device: str | torch.device, what: str) -> None:
    """ValueError (one line) when half precision ``dtype`` is asked on a device other than CUDA: ``what`` (upscale,
    interpolate) offers half precision only as CUDA autocast, its weights staying float32. The one wording of these
    commands' ``--dtype`` refusal (``sample``, which casts the weights, warns with the same words)."""
    dtype, device = parse_dtype(dtype), torch.device(device)
    if dtype == torch.float32 or device.type == "cuda":
        return
    name = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))
    where = "CPU" if device.type == "cpu" else str(device)
    raise ValueError(f"--dtype {name} on {where}: {what} runs half precision only under CUDA autocast (the weights "
                     f"stay fp32); use --dtype fp32 on {where}, or --device cuda.")


def default_dtype(device: str | torch.device | None = None) -> torch.dtype:
    """The dtype a load uses when none is asked for (the one place of this rule; docs/sampling.md, ``--dtype auto``):
    float16 on a CUDA device (as the reference samples), float32 on the CPU (fp16 runs on slow fallback kernels
    there; pass bfloat16 for speed and half the memory). ``device`` None: CUDA when available."""
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.float16 if device.type == "cuda" else torch.float32


def resolve_dtype_arguments(dtype: str | torch.dtype | None = None, torch_dtype: str | torch.dtype | None = None,
                            device: str | torch.device | None = None) -> torch.dtype:
    """The one dtype of a load from ``dtype`` (diffusers' current name) or ``torch_dtype`` (the older name):
    either may be given (a ``torch.dtype`` or 'fp32' / 'bf16' / 'fp16'), both only if they agree; neither gives
    :func:`default_dtype` of ``device``. Raises ValueError for two different dtypes or an unknown name."""
    chosen = [parse_dtype(value) for value in (dtype, torch_dtype) if value is not None]
    if len(chosen) == 2 and chosen[0] != chosen[1]:
        raise ValueError(f"dtype={chosen[0]} and torch_dtype={chosen[1]} disagree; pass one of them (dtype is "
                         "diffusers' current name, torch_dtype the older one).")
    return chosen[0] if chosen else default_dtype(device)


def module_dtype(module: torch.nn.Module) -> torch.dtype | None:
    """The dtype holding most of ``module``'s floating-point parameter elements (T5 in float16 keeps its ``wo``
    layers in float32, a fifth of its weights: it still counts as float16), or None without any."""
    counts: dict[torch.dtype, int] = {}
    for param in module.parameters():
        if param.is_floating_point():
            counts[param.dtype] = counts.get(param.dtype, 0) + param.numel()
    return max(counts, key=counts.get) if counts else None


def resolve_device(name: str | None = None) -> torch.device:
    """'cuda' | 'cpu' | 'cuda:1' | None (auto: cuda when available) -> torch.device, with a clear error."""
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name} is not supported; use cpu, cuda or cuda:N.")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name} was asked for but no CUDA device is available; use --device cpu.")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name} does not exist: this machine has {torch.cuda.device_count()} CUDA "
                         f"device(s) (cuda:0 .. cuda:{torch.cuda.device_count() - 1}).")
    return device


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike):
    """Yield a temporary sibling folder; on success it is renamed to ``final`` in one step.

    A crash inside the block leaves ``final`` (and any previous content there) untouched.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; the result should look like any new folder
    try:
        yield tmp
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside ``path`` (same suffix) to write to; it becomes ``path`` in one
    ``os.replace`` on success and is removed on failure, so ``path`` is never half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.tmp-", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; the result should look like any new file
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_path`), flushed to disk."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


class MissingExtraError(ImportError):
    """An optional package is not installed; the message is one line naming the extra that brings it
    (``pip install "opensora-plan[<extra>]"``). The CLI prints it as ``error: ...`` without a traceback."""


def _install_line(extra: str) -> str:
    return f'pip install "opensora-plan[{extra}]" (with your torch pinned in the same command, e.g. torch==2.13.0 on CPU)'


def extra_installed(module: str) -> bool:
    """Whether the optional ``module`` can be imported (looked up without importing it)."""
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing, or a module set to None in sys.modules
        return False


def require_extra(module: str, extra: str, feature: str):
    """The imported optional ``module``, or :class:`MissingExtraError`: "``feature`` needs ``module``, which is
    not installed; pip install "opensora-plan[``extra``]" ...". The one place every optional import goes
    through (peft: lora, deepspeed, wandb, gradio: ui, decord: video), so a missing extra is one line."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        package = module.split(".")[0]
        missing = err.name is None or err.name.split(".")[0] == package  # else the package is there, a dependency not
        problem = "which is not installed" if missing else f"which failed to import ({err})"
        raise MissingExtraError(f"{feature} needs {package}, {problem}; {_install_line(extra)}.") from err


class OutOfMemory(RuntimeError):
    """A stage ran out of memory; the message is one line naming the stage, the memory plan and the flag to change
    (``pipelines.memory_plan.out_of_memory_guard``). The original error is its ``__cause__``."""


class NonFiniteError(RuntimeError):
    """A model produced NaN or infinite values; stopping beats writing a black or garbage video."""


def check_finite(tensor: torch.Tensor, where: str, dtype: torch.dtype | None = None) -> None:
    """Raise :class:`NonFiniteError` naming ``where`` when ``tensor`` holds any NaN or infinity.

    ``dtype`` is the model dtype; for float16 the message suggests bf16 / fp32, whose range is larger.
    """
    finite = torch.isfinite(tensor)
    if bool(finite.all()):
        return
    bad = int((~finite).sum())
    hint = ("; float16 overflows easily here: use --dtype bf16 or fp32 (torch.bfloat16 / torch.float32)"
            if dtype == torch.float16 else "; check the inputs and the model weights")
    raise NonFiniteError(f"{where}: {bad} of {tensor.numel()} values are NaN or infinite, so the output would be "
                         f"meaningless (e.g. an all-black video){hint}.")


def plural(count: int, noun: str, nouns: str | None = None) -> str:
    """``"1 video"``, ``"2 videos"`` (``nouns``: the plural when it is not ``noun + "s"``), for summary lines."""
    return f"{count} {noun if count == 1 else nouns or noun + 's'}"


def with_article(class_name: str) -> str:
    """``"an RGTModel"``, ``"a CausalVAEModel"``: a class name with its article, as the name is read aloud (its
    first letter spelled out: A, E, F, H, I, L, M, N, O, R, S, X take "an"), for messages."""
    return f"{'an' if class_name[:1].upper() in 'AEFHILMNORSX' else 'a'} {class_name}"


def read_text_file(path: str | os.PathLike, what: str) -> str:
    """The UTF-8 text of ``path``; any read problem is a one-line ValueError/FileNotFoundError naming the file
    (``what`` says which input it is, e.g. "Prompt file" or "Dataset file")."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} {path} does not exist.")
    if path.is_dir():
        raise ValueError(f"{what} {path} is a folder; expected a text file.")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{what} {path} is not UTF-8 text (byte {err.start} is {err.object[err.start:err.start + 1]!r}; "
                         f"is it a video or another binary file?); pass a text file.") from err
    except OSError as err:
        raise ValueError(f"{what} {path} cannot be read: {err.strerror or err}.") from err


def check_output_folder(path: str | os.PathLike, flag: str) -> Path:
    """``path`` as a Path after checking it can be (or already is) a folder: it is not an existing file, no
    parent is a file, and the folder (or, while missing, its nearest existing parent, where it would be created)
    accepts a new file: probed with a temporary file that is removed at once. Call before any heavy work so a
    bad output path fails in the first second, with one line (never a raw errno)."""
    path = Path(path)
    for candidate in (path, *path.parents):
        if candidate.is_symlink() and not candidate.exists():
            raise ValueError(f"{flag} {path}: {candidate} is a broken symbolic link; remove it or give another folder.")
        if candidate.exists() and not candidate.is_dir():
            where = "is an existing file" if candidate == path else f"is inside {candidate}, which is a file"
            raise ValueError(f"{flag} {path} {where}; give a folder (it is created if missing).")
    existing = next(p for p in (path, *path.parents) if p.exists()) if not path.exists() else path
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        where = "" if existing == path else f" (its parent {existing}, where it would be created)"
        raise ValueError(f"{flag} {path}: cannot write there{where}: {err.strerror or err}; choose a writable "
                         "folder.") from None
    return path


check_writable_folder = check_output_folder  # the older name (pipelines/outputs.py)


def check_output_file(path: str | os.PathLike, flag: str) -> Path:
    """``path`` as a Path after checking a file can be written there: it is not a folder and no parent is a
    file (the parents are created when missing). Call before any heavy work."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{flag} {path} is a folder; give a file name, e.g. {path / 'report.json'}.")
    check_output_folder(path.parent, f"{flag} {path}: its folder")
    return path


def read_config_file(spec: str, shipped_dir: Path, flag: str) -> dict:
    """The JSON options in file ``spec``, or in the shipped ``shipped_dir/<spec>.json`` when ``spec`` names
    one; keys starting with ``_`` are comments and dropped. FileNotFoundError lists the shipped names."""
    path = Path(spec)
    if not path.is_file():
        path = shipped_dir / f"{spec.removesuffix('.json')}.json"
        if not path.is_file():
            names = ", ".join(sorted(p.stem for p in shipped_dir.glob("*.json")))
            raise FileNotFoundError(f"{flag} {spec} is neither a JSON file nor a shipped config ({names}).")
    return {k: v for k, v in read_json_file(path, f"{flag} file").items() if not k.startswith("_")}


def read_json_file(path: str | os.PathLike, what: str):
    """The parsed JSON in ``path``; a missing, unreadable or invalid file is one line naming it."""
    import json

    try:
        return json.loads(read_text_file(path, what))
    except json.JSONDecodeError as err:
        raise ValueError(f"{what} {path} is not valid JSON ({err}); fix or replace the file.") from err


def valid_num_frames(num_frames: int, temporal_compression: int = 4) -> bool:
    """The CausalVAE's frame rule: 1 frame (an image) or 1 + k * ``temporal_compression`` frames (17, 65, ...)."""
    return num_frames >= 1 and (num_frames - 1) % temporal_compression == 0


# Progress bars: `-q` turns every bar of this project off through tqdm's own switch, the environment
# variable TQDM_DISABLE (tqdm >= 4.66 reads it as the default of `disable`, so bars of diffusers /
# transformers go too, and processes started from this one inherit it). Bars of this project pass
# `disable=` explicitly, which would override the variable, hence progress_bar() below.
PROGRESS_ENV = "TQDM_DISABLE"


def progress_disabled() -> bool:
    """True when progress bars are switched off (``-q``: ``TQDM_DISABLE=1`` in the environment)."""
    return os.environ.get(PROGRESS_ENV, "").strip().lower() not in ("", "0", "false", "no")


def progress_bar(iterable=None, *, disable: bool = False, **kwargs):
    """``tqdm.auto.tqdm(iterable, **kwargs)``, also disabled when :func:`progress_disabled` (``-q``)."""
    from tqdm.auto import tqdm

    return tqdm(iterable, disable=bool(disable) or progress_disabled(), **kwargs)
