"""Output paths and skipped inputs of every command that writes files: the one place for their rules, all
checked before any model loads. No command replaces an existing file silently: it refuses, naming
``--overwrite`` (the file commands), or picks a free name (the web UI).

* :func:`single_output` -- where one input goes: ``--output`` ending in an allowed suffix is the file, a
  name without a suffix (or an existing folder) is a folder, anything else is refused;
* :func:`check_targets` -- the planned outputs: never an input (even with ``--overwrite``), never twice,
  never an existing folder, an existing file only with ``--overwrite``, and every output folder creatable
  and writable (``sample``, ``reconstruct``, ``interpolate``, ``upscale``, ``demo eval``);
* :func:`check_output_file` -- one planned file (``--json_out`` reports): the same rules for one path;
* :func:`free_path` -- the first free name ``stem-2.mp4``, ``stem-3.mp4``, ... (the web UI, which cannot ask);
* :class:`RunResults` / :func:`skipped_lines` -- a folder run's written results and its skipped inputs
  (path and reason), listed once at the end, each path once.
"""

from __future__ import annotations

from pathlib import Path

from ..utils import check_output_file as _check_file_path
from ..utils import check_writable_folder

# The help text of every command's --overwrite (one wording, one default: off).
OVERWRITE_HELP = "replace output files that already exist (default: refuse and name them; an input is never replaced)"


class RunResults(list):
    """The results of every written output (a list), and ``skipped``: ``(path, reason)`` of every input of a
    folder that could not be processed (unreadable, too short, too small, ...)."""

    def __init__(self, results=(), skipped=()):
        super().__init__(results)
        self.skipped: list[tuple[str, str]] = list(skipped)


def skipped_lines(skipped) -> list[str]:
    """The end-of-run list of skipped inputs: a header, then one line per file naming it once (a reason that
    already names the file is printed as it is)."""
    if not skipped:
        return []
    lines = [f"skipped {len(skipped)} file(s):"]
    for path, reason in skipped:
        lines.append(f"  {reason}" if str(path) in reason else f"  {path}: {reason}")
    return lines


def single_output(source: Path, output: Path, suffixes: tuple[str, ...], default_name: str, kind: str) -> Path:
    """The output file of one input ``source``: ``output`` itself when it ends in one of ``suffixes``,
    ``output / default_name`` when it is a folder (no suffix, or an existing folder); ValueError otherwise."""
    if output.suffix and not output.is_dir():
        if output.suffix.lower() not in suffixes:
            raise ValueError(f"--output {output} must end in {'/'.join(suffixes)} for the {kind} {source.name} "
                             "(or be a folder).")
        return output
    return output / default_name


def folder_output(source: Path, output: Path) -> Path:
    """``output`` for a folder input: refused when it names a file (a suffix) or is the input folder."""
    if output.suffix and not output.is_dir():
        raise ValueError(f"INPUT {source} is a folder, so --output must be a folder, not {output}.")
    if output.resolve() == source.resolve():
        raise ValueError(f"--output {output} is the input folder; choose another folder so no input is overwritten.")
    return output


def check_targets(sources: list[Path], targets: list[Path], overwrite: bool, flag: str = "--output") -> None:
    """One-line refusals, before anything loads: an output that is an input (even with ``--overwrite``), two
    outputs with one name, an output that is an existing folder, an existing output without ``--overwrite``,
    an output folder that cannot be created or written. ``flag`` is the option that chose the outputs."""
    inputs = {s.resolve() for s in sources}
    seen: set[str] = set()
    for target in targets:
        resolved = target.resolve()
        if resolved in inputs:
            raise ValueError(f"Output {target} would overwrite an input; choose another {flag} (--overwrite "
                             "never replaces an input).")
        if str(resolved).lower() in seen:
            raise ValueError(f"Output {target} would be written twice (two inputs with one name); rename one or "
                             "run them separately.")
        seen.add(str(resolved).lower())
    existing = [t for t in targets if t.exists() or t.is_symlink()]
    for target in existing:
        if target.is_dir():
            raise ValueError(f"Output {target} is an existing folder; remove it or choose another {flag}.")
    if existing and not overwrite:
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        raise ValueError(f"Output {existing[0]}{more} already exists; pass --overwrite to replace it or choose "
                         f"another {flag}.")
    for folder in dict.fromkeys(t.parent for t in targets):
        check_writable_folder(folder, flag)


def check_output_file(path: str | Path, flag: str, overwrite: bool) -> Path:
    """One planned output file (e.g. ``--json_out``): not a folder, its folder creatable and writable, and not
    an existing file unless ``overwrite``; one-line ValueError otherwise. Returns the path."""
    path = _check_file_path(path, flag)
    if path.exists() and not overwrite:
        raise ValueError(f"{flag} {path} already exists; pass --overwrite to replace it or choose another {flag}.")
    check_writable_folder(path.parent, f"{flag} {path}: its folder")
    return path


def free_path(path: Path, companions: tuple[str, ...] = ()) -> Path:
    """``path`` if nothing is there (nor at its ``companions`` suffixes, e.g. ``(".gif",)`` for the GIF written
    beside an mp4), else the first free ``<stem>-2<suffix>``, ``<stem>-3<suffix>``, ... beside it: for writers
    that cannot ask, like the web UI (its counter restarts with the server)."""
    def taken(p: Path) -> bool:
        return any(q.exists() or q.is_symlink() for q in (p, *(p.with_suffix(s) for s in companions)))

    candidate, number = path, 1
    while taken(candidate):
        number += 1
        candidate = path.with_name(f"{path.stem}-{number}{path.suffix}")
    return candidate


__all__ = ["OVERWRITE_HELP", "RunResults", "check_output_file", "check_targets", "folder_output", "free_path",
           "single_output", "skipped_lines"]
