"""One place for every option of a command: a dataclass whose fields carry default, help and CLI spelling.

Each command has one options class (``SampleOptions`` beside ``sample_t2v``, ``T2VTrainOptions`` beside
``train_t2v``, ...). A field is declared with :func:`option`::

    @dataclass
    class ReconstructOptions(Options):
        COMMAND: ClassVar[str] = "reconstruct"
        num_frames: int = option(65, help="frames to reconstruct, 1 + 4k")
        enable_tiling: bool = option(False, help="spatial tiling")

    def __post_init__(self):           # validation: ValueError with one sentence
        ...

:func:`add_options` turns the fields into argparse arguments (the default is appended to the help text
from the field itself, so help cannot drift), and :func:`options_from_args` builds the object from the
parsed flags. Only flags given on the command line are taken from argparse (every argument defaults to
``argparse.SUPPRESS``); the rest come from the ``--config`` file when the class allows one
(``CONFIG = True``), then from the field defaults: *default < config file < command line*.

Config files are JSON (``.json``) or YAML (``.yaml`` / ``.yml``) mappings of field names to values;
keys starting with ``_`` are comments. A run's ``options.json`` (written by the trainer) is accepted
as a config too: its run record (task, world size, ...) is dropped and its ``extra`` section merged.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import types
import math
import numbers
import typing
from pathlib import Path
from typing import Any, ClassVar

# Seeds: 0 <= seed < SEED_LIMIT for every command and the web UI's seed box. A browser holds numbers as doubles,
# exact up to 2**53 (JavaScript's MAX_SAFE_INTEGER + 1), so a seed shown on the page is the seed used; sample adds
# the prompt index, so the limit leaves 2**32 of room below that.
SEED_LIMIT = 2**53 - 2**32

# Keys the trainer adds to a run's options.json beside the options themselves (train/trainer.py).
RUN_RECORD_KEYS = ("task", "task_options", "world_size", "distributed_type", "torch_version", "extra", "resumes")
# The command that writes a run's options.json, by its "task" record.
RUN_TASK_COMMANDS = {"T2VTask": "train-t2v", "VAETrainTask": "train-vae", "VFITrainTask": "train-vfi",
                     "SRTrainTask": "train-sr", "DistillTask": "distill"}
CONFIG_SUFFIXES = (".json", ".yaml", ".yml")


def option(default: Any = dataclasses.MISSING, *, help: str, flag: str | None = None, choices=None,
           metavar: str | None = None, type=None, positional: bool = False, nargs=None,
           group: str | None = None, show_default: bool = True, default_factory=dataclasses.MISSING):
    """A dataclass field that is a command-line option.

    ``default``: the one default of the option (omit it for a required option). ``help``: one phrase,
    without the default (it is appended). ``flag``: the CLI spelling when it differs from ``--<field>``
    (e.g. ``--no_clean_caption`` for ``clean_caption: bool = True``). ``type``: a converter for flag
    text when the annotation is not a plain int/float/str (e.g. "auto" or a number). ``positional``: an
    optional positional argument. ``group``: the ``--help`` section. ``show_default``: False when the
    help text explains what an unset value means.
    """
    metadata = {"help": help, "flag": flag, "choices": choices, "metavar": metavar, "type": type,
                "positional": positional, "nargs": nargs, "group": group, "show_default": show_default}
    return dataclasses.field(default=default, default_factory=default_factory, metadata={"option": metadata})


class Options:
    """Base class of the options dataclasses.

    Class attributes: ``COMMAND`` (the command name, for messages), ``CONFIG`` (True: ``--config FILE``
    is accepted), ``CONFIG_DIR`` (a folder of shipped config files, selectable by name), ``NOT_OPTIONS``
    (inherited fields this command does not offer), ``GROUPS`` (the order of the --help sections). The
    object also reads like a mapping (``opts["num_frames"]``, ``dict(opts)``), so code written for the
    old option dicts keeps working.
    """

    COMMAND: ClassVar[str] = ""
    CONFIG: ClassVar[bool] = False
    CONFIG_DIR: ClassVar[Path | None] = None
    NOT_OPTIONS: ClassVar[tuple[str, ...]] = ()
    GROUPS: ClassVar[tuple[str, ...]] = ()  # --help sections in this order (others follow in field order)
    # Float options whose own check (``__post_init__``) refuses nan / inf with the option's whole rule, so that every
    # bad value gets the same message (--memory_gb nan and -1: "must be a positive number of GiB").
    NONFINITE_OK: ClassVar[tuple[str, ...]] = ()
    # Renamed options, old field -> new field: the old flag or config key is an error naming the new one (not a
    # "did you mean" guess from the spelling, which points elsewhere).
    RENAMED: ClassVar[dict[str, str]] = {}

    def __init_subclass__(cls, **kwargs):
        """Every options class checks and converts its values to the field types before its own
        ``__post_init__`` runs (the same rules as a --config file: one ValueError line per bad value)."""
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("__post_init__")
        if own is not None and not getattr(own, "_checks_types", False):
            def __post_init__(self, _own=own):
                check_types(self)
                _own(self)

            __post_init__._checks_types = True
            __post_init__.__doc__ = own.__doc__
            cls.__post_init__ = __post_init__
        elif own is None and "__post_init__" not in {k for c in cls.__mro__[1:] for k in c.__dict__}:
            cls.__post_init__ = check_types

    def require_at_least(self, low: int, *names: str) -> None:
        """ValueError (one line) for the first field of ``names`` below ``low``; unset (None) fields pass."""
        for name in names:
            value = getattr(self, name)
            if value is not None and value < low:
                raise ValueError(f"{_flag_of(type(self), name)} must be at least {low}, got {value}.")

    # ---- mapping view
    def keys(self) -> list[str]:
        return [f.name for f in option_fields(type(self))]

    def __getitem__(self, name: str):
        if name not in self.keys():
            raise KeyError(name)
        return getattr(self, name)

    def to_dict(self) -> dict:
        """``{field: value}`` of every option (JSON-friendly when the values are)."""
        return {name: getattr(self, name) for name in self.keys()}

    @classmethod
    def defaults(cls) -> dict:
        """``{field: default}`` of every option that has one (required options are left out)."""
        out = {}
        for f in option_fields(cls):
            if f.default is not dataclasses.MISSING:
                out[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:
                out[f.name] = f.default_factory()
        return out

    @classmethod
    def of(cls, *args, **kwargs):
        """``args[0]`` when it already is a ``cls`` (or a mapping of its fields: :meth:`from_mapping`), else
        ``cls(*args, **kwargs)``: lets a library entry point take the options object, a dict, or its fields
        (leading ones positionally, in field order)."""
        if args and (isinstance(args[0], cls) or isinstance(args[0], typing.Mapping)):
            if len(args) > 1 or kwargs:
                raise TypeError(f"Pass a {cls.__name__} (or a dict of its fields) or its fields as arguments, "
                                "not both.")
            return args[0] if isinstance(args[0], cls) else cls.from_mapping(args[0], source=None)
        return cls(*args, **kwargs)

    @classmethod
    def from_mapping(cls, values: typing.Mapping, source: str | None = None):
        """Build from ``{field: value}`` (keys starting with ``_`` ignored); unknown keys ("unknown option
        'bogus' for train-t2v", ``source`` names where they came from), missing required options and bad
        values are one-line ValueErrors."""
        values = {k: v for k, v in values.items() if not str(k).startswith("_")}
        check_known(cls, values, source)
        missing = [f.name for f in option_fields(cls) if f.name not in values
                   and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        if missing:
            where = " or in the --config file" if cls.CONFIG else ""
            raise ValueError(f"{cls.COMMAND or cls.__name__} needs {_flag_of(cls, missing[0])}; pass it on the "
                             f"command line{where}.")
        return cls(**values)


def option_fields(cls) -> list[dataclasses.Field]:
    """The fields of ``cls`` that are command-line options, in declaration order."""
    hidden = set(getattr(cls, "NOT_OPTIONS", ()))
    return [f for f in dataclasses.fields(cls) if "option" in f.metadata and f.name not in hidden]


def _flag_of(cls, name: str) -> str:
    for f in option_fields(cls):
        if f.name == name:
            meta = f.metadata["option"]
            return name if meta["positional"] else (meta["flag"] or f"--{name}")
    return f"--{name}"


def _label_of(cls, name: str) -> str:
    """How a message names an option: its flag (``--guidance_scale``, as every other message does), or
    ``'name'`` when the flag reads otherwise (``--no_clean_caption`` sets ``clean_caption``)."""
    flag = _flag_of(cls, name)
    return flag if flag in (name, f"--{name}") else f"'{name}'"


def check_known(cls, values: typing.Mapping, source: str | None) -> None:
    """ValueError naming the first unknown key and the closest valid option."""
    names = [f.name for f in option_fields(cls)]
    for key in values:
        if key in getattr(cls, "NOT_OPTIONS", ()):
            where = f"{source}: " if source else ""
            raise ValueError(f"{where}{cls.COMMAND or cls.__name__} does not offer --{key} (it keeps a fixed value); "
                             f"remove '{key}'.")
        if key in cls.RENAMED:
            where = f"{source} has the option" if source else "the option"
            raise ValueError(f"{where} '{key}', which {cls.COMMAND or cls.__name__} now calls "
                             f"'{cls.RENAMED[key]}'; rename it.")
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"see `opensora-plan {cls.COMMAND} --help`."
            where = f"{source} has an unknown option" if source else "unknown option"
            raise ValueError(f"{where} '{key}' for {cls.COMMAND or cls.__name__}; {hint}")


def _type_hints(cls) -> dict[str, Any]:
    cached = cls.__dict__.get("_TYPE_HINTS")
    if cached is None:
        cached = typing.get_type_hints(cls)
        cls._TYPE_HINTS = cached
    return cached


def check_types(options: "Options") -> None:
    """Convert every option of ``options`` to its field type in place (int -> float, path -> str, tuple ->
    list), or raise a one-line ValueError: wrong type (``"5"`` for a whole number, ``"no"`` for a flag,
    ``True`` for a number, ``5.5`` steps), ``None`` for an option that has a value, or nan / inf for a
    float option (unless the class lists it in ``NONFINITE_OK``)."""
    cls = type(options)
    hints = _type_hints(cls)
    for f in option_fields(cls):
        value = getattr(options, f.name)
        converted = _coerce(hints[f.name], value, _label_of(cls, f.name), f"{cls.COMMAND or cls.__name__}",
                            allow_none=f.default is None, allow_nonfinite=f.name in cls.NONFINITE_OK)
        if converted is not value:
            object.__setattr__(options, f.name, converted)
        if f.name in ("seed", "seeds") and converted is not None:
            for seed in converted if isinstance(converted, list) else [converted]:
                check_seed(seed, _flag_of(cls, f.name))


def check_seed(seed: int, flag: str = "--seed") -> None:
    """The one seed rule of every command: a whole number from 0 to ``SEED_LIMIT - 1`` (ValueError)."""
    if not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"{flag} must be a whole number from 0 to {SEED_LIMIT - 1}, got {seed}.")


# --------------------------------------------------------------------------------------------
# argparse
# --------------------------------------------------------------------------------------------


def _resolved_types(cls) -> dict[str, Any]:
    return _type_hints(cls)


def _base_type(annotation):
    """(scalar type, is_list) of ``int``, ``float | None``, ``list[str] | None``, ..."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return _base_type(args[0])
        return None, False
    if origin in (list, tuple):
        inner = typing.get_args(annotation)
        return (inner[0] if inner else str), True
    return annotation, False


def _format_default(value) -> str:
    if isinstance(value, (list, tuple)):
        return " ".join(str(v) for v in value)
    return str(value)


def add_options(parser: argparse.ArgumentParser, cls) -> None:
    """Add every option field of ``cls`` to ``parser``; values not given stay absent from the namespace.

    bool fields become flags (``store_true``; ``store_false`` for a default-True field with a ``--no_``
    flag; ``--x/--no-x`` when the class accepts a config file, so a flag can undo the file), list fields
    take ``nargs="+"``, ``choices`` are checked by argparse, and the help text ends with the default.
    """
    hints = _resolved_types(cls)
    groups: dict[str, Any] = {name: parser.add_argument_group(name) for name in cls.GROUPS}
    if cls.CONFIG:
        shipped = ""
        if cls.CONFIG_DIR is not None:
            names = sorted(p.stem for p in Path(cls.CONFIG_DIR).glob("*.json"))
            shipped = f", or the name of a shipped one ({', '.join(names)})" if names else ""
        parser.add_argument("--config", default=argparse.SUPPRESS, metavar="FILE", action=_OnceAction,
                            help=f"options file: .json, .yaml or .yml{shipped}"
                                 + (", or a run's options.json" if cls.COMMAND in RUN_TASK_COMMANDS.values() else "")
                                 + "; its values "
                                 "replace the defaults and flags given on the command line replace its values")
    for f in option_fields(cls):
        meta = f.metadata["option"]
        target = parser
        if meta["group"]:
            if meta["group"] not in groups:
                groups[meta["group"]] = parser.add_argument_group(meta["group"])
            target = groups[meta["group"]]
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING)
        required = default is dataclasses.MISSING
        help_text = meta["help"]
        scalar, is_list = _base_type(hints[f.name])
        kwargs: dict[str, Any] = {"default": argparse.SUPPRESS, "dest": f.name}
        if scalar is bool and not is_list:
            flag = meta["flag"] or f"--{f.name}"
            if default is True:
                kwargs["action"] = "store_false"
                if not (meta["flag"] or "").startswith("--no"):
                    raise TypeError(f"{cls.__name__}.{f.name}: a default-True flag needs flag='--no_...'.")
            elif cls.CONFIG:
                kwargs["action"] = argparse.BooleanOptionalAction
            else:
                kwargs["action"] = "store_true"
            if meta["show_default"]:  # the flag is off unless given (a --no_ flag turns a default-on field off)
                help_text += " (default: off)" if default is not True else f" (default: off, i.e. {f.name} on)"
            target.add_argument(flag, help=help_text, **kwargs)
            continue
        converter = meta["type"] or (scalar if scalar in (int, float, str) else None)
        if converter is not None:
            kwargs["type"] = converter
        if meta["choices"] is not None:
            kwargs["choices"] = meta["choices"]
        if meta["metavar"] is not None:
            kwargs["metavar"] = meta["metavar"]
        if is_list and meta["type"] is None:  # a converter of its own parses the whole text (e.g. commas)
            kwargs["nargs"] = meta["nargs"] or "+"
        elif meta["nargs"] is not None:
            kwargs["nargs"] = meta["nargs"]
        if required:
            help_text += "" if meta["positional"] else " (required)"
        elif meta["show_default"] and default is not None:
            shown = ",".join(map(str, default)) if is_list and meta["type"] else _format_default(default)
            help_text += f" (default: {shown})"
        if meta["positional"]:
            kwargs.pop("dest")
            if required:
                kwargs.pop("default")
            else:
                kwargs.setdefault("nargs", "?")
            target.add_argument(f.name, help=help_text, **kwargs)
        else:
            if required and not cls.CONFIG:
                kwargs["required"] = True
                kwargs.pop("default")
            target.add_argument(meta["flag"] or f"--{f.name}", help=help_text, **kwargs)
    for old, new in cls.RENAMED.items():  # hidden: only there to name the new flag
        parser.add_argument(f"--{old}", nargs="?", dest=f"_renamed_{old}", default=argparse.SUPPRESS,
                            help=argparse.SUPPRESS, action=_RenamedAction, renamed_to=_flag_of(cls, new))


class _RenamedAction(argparse.Action):
    """A renamed option's old flag: a usage error naming the new flag."""

    def __init__(self, option_strings, dest, renamed_to: str, **kwargs):
        super().__init__(option_strings, dest, **kwargs)
        self.renamed_to = renamed_to

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string} is now {self.renamed_to}; use {self.renamed_to}.")


class _OnceAction(argparse.Action):
    """``store``, but giving the option twice is an error (two --config files would silently drop one)."""

    def __call__(self, parser, namespace, values, option_string=None):
        if getattr(namespace, self.dest, None) is not None:
            parser.error(f"{option_string} given twice ({getattr(namespace, self.dest)} and {values}); give one "
                         "file (merge them, or put the other values on the command line).")
        setattr(namespace, self.dest, values)


def given_options(cls, args: argparse.Namespace) -> dict:
    """The options given on the command line (absent ones were suppressed by :func:`add_options`)."""
    return {f.name: getattr(args, f.name) for f in option_fields(cls) if hasattr(args, f.name)}


def options_from_args(cls, args: argparse.Namespace):
    """``cls`` from field defaults < ``--config`` file (when given) < flags given on the command line."""
    values = {}
    config = getattr(args, "config", None) if cls.CONFIG else None
    if config:
        values.update(read_options_file(cls, config))
    values.update(given_options(cls, args))
    return cls.from_mapping(values, source="the command line")


# --------------------------------------------------------------------------------------------
# config files
# --------------------------------------------------------------------------------------------


def _config_path(cls, spec: str | os.PathLike) -> Path:
    path = Path(spec)
    if path.is_file():
        if path.suffix.lower() not in CONFIG_SUFFIXES:
            raise ValueError(f"--config {spec} has the suffix '{path.suffix}', which is not a config format here; use "
                             ".json, .yaml or .yml.")
        return path
    if cls.CONFIG_DIR is not None:
        shipped = Path(cls.CONFIG_DIR) / f"{str(spec).removesuffix('.json')}.json"
        if shipped.is_file():
            return shipped
    if path.is_dir():
        raise ValueError(f"--config {spec} is a folder; give a .json / .yaml file.")
    names = sorted(p.stem for p in Path(cls.CONFIG_DIR).glob("*.json")) if cls.CONFIG_DIR else []
    problem = f"is neither a file nor a shipped config ({', '.join(names)})" if names else "does not exist"
    raise FileNotFoundError(f"--config {spec} {problem}; give a .json, .yaml or .yml file.")


def read_options_file(cls, spec: str | os.PathLike) -> dict:
    """``{field: value}`` from a JSON / YAML config file, a shipped config name, or a run's options.json.

    Values are checked against the field types (a YAML ``2e-5`` string becomes the float it means);
    an unknown key is a ValueError naming it and the closest option.
    """
    from opensora_plan.utils import read_json_file, read_text_file

    path = _config_path(cls, spec)
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(read_text_file(path, "--config file"))
        except yaml.YAMLError as err:
            problem = str(err).replace("\n", " ")
            raise ValueError(f"--config file {path} is not valid YAML ({problem}); fix or replace the file.") from err
    else:
        data = read_json_file(path, "--config file")
    if data is None:
        raise ValueError(f"--config file {path} holds nothing; expected a mapping of option names to values.")
    if not isinstance(data, dict):
        kind = {list: "a list", str: "a single text", int: "a single number", float: "a single number",
                bool: "a single true/false"}.get(type(data), f"a {type(data).__name__}")
        raise ValueError(f"--config file {path} holds {kind}; expected a mapping of option names to values.")
    data = {k: v for k, v in data.items() if not str(k).startswith("_")}
    if "task_options" in data:  # a run's options.json: its record is not options
        writer = RUN_TASK_COMMANDS.get(str(data.get("task")))
        if writer is not None and writer != cls.COMMAND:
            raise ValueError(f"--config file {path} is a run's options.json written by {writer}; use it with "
                             f"`opensora-plan {writer} --config`, or give a {cls.COMMAND} options file.")
        extra = data.get("extra") or {}
        fixed = {f.name: f.default for f in dataclasses.fields(cls) if f.name in cls.NOT_OPTIONS}
        changed = [k for k in fixed if k in data and data[k] != fixed[k]]
        if changed:  # recorded by the loop, but this command does not offer them: only their fixed value passes
            key = changed[0]
            raise ValueError(f"--config file {path}: {cls.COMMAND} does not offer --{key}; its value must stay "
                             f"{fixed[key]!r} (the run recorded it), got {data[key]!r}.")
        data = {k: v for k, v in data.items() if k not in RUN_RECORD_KEYS and k not in cls.NOT_OPTIONS}
        # The task's record holds what the command derived for the options it does not offer (distill: --model
        # from --teacher): derived again from the options, not read back.
        data.update({k: v for k, v in extra.items() if not str(k).startswith("_") and k not in cls.NOT_OPTIONS})
    check_known(cls, data, f"--config file {path}")
    hints = _resolved_types(cls)
    defaults = {f.name: f.default for f in option_fields(cls)}
    return {k: _coerce(hints[k], v, _label_of(cls, k), path, allow_none=defaults.get(k) is None,
                       allow_nonfinite=k in cls.NONFINITE_OK) for k, v in data.items()}


_EXPECTED = {bool: "true or false", int: "a whole number", float: "a finite number", str: "text"}


def _coerce(annotation, value, name: str, where, allow_none: bool = False, allow_nonfinite: bool = False):
    """``value`` as the field's type, or a one-line ValueError naming ``where`` (a config file path or the
    command) and the option (``name`` as messages show it, :func:`_label_of`). ``None`` passes only for an Optional field (or ``allow_none``)."""
    scalar, is_list = _base_type(annotation)
    if scalar is None:
        return value
    optional = typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in typing.get_args(
        annotation)
    prefix = f"--config file {where}: " if isinstance(where, Path) else f"{where}: "
    if value is None:
        if optional or allow_none:
            return value
        expected = f"a list of {_EXPECTED.get(scalar, scalar.__name__)}" if is_list else _EXPECTED.get(
            scalar, scalar.__name__)
        raise ValueError(f"{prefix}{name}: null is not allowed; expected {expected}.")
    if is_list:
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            items = [value]
        else:
            items = list(value)
        return [_coerce(scalar, v, name, where, allow_nonfinite=allow_nonfinite) for v in items]
    problem = None
    if scalar is bool:
        if not isinstance(value, bool):
            problem = "true or false"
    elif scalar is int:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            problem = "a whole number"
        elif type(value) is not int:
            return int(value)
    elif scalar is float:
        number = None
        if isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                problem = "a number"
        elif isinstance(value, bool) or not isinstance(value, numbers.Real):
            problem = "a number"
        else:
            number = value if type(value) is float else float(value)
        if number is not None:
            if not allow_nonfinite and not math.isfinite(number):
                problem = "a finite number"
            else:
                return number
    elif scalar is str:
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        if not isinstance(value, str):
            problem = "text"
    if problem:
        raise ValueError(f"{prefix}{name} must be {problem}, got {value!r}.")
    return value
