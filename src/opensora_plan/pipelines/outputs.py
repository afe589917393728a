"""Output paths and skipped inputs of the file-to-file commands (``interpolate``, ``upscale``): the one place
for their rules, all checked before any model loads.

* :func:`single_output` -- where one input goes: ``--output`` ending in an allowed suffix is the file, a
  name without a suffix (or an existing folder) is a folder, anything else is refused;
* :func:`check_targets` -- the planned outputs: never an input (even with ``--overwrite``), never twice,
  an existing file only with ``--overwrite``, and every output folder creatable and writable;
* :class:`RunResults` / :func:`skipped_lines` -- a folder run's written results and its skipped inputs
  (path and reason), listed once at the end, each path once.
"""

from __future__ import annotations

from pathlib import Path

from ..utils import check_writable_folder


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
    from ..utils import plural

    lines = [f"skipped {plural(len(skipped), 'file')}:"]
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


def check_targets(sources: list[Path], targets: list[Path], overwrite: bool) -> None:
    """One-line refusals, before anything loads: an output that is an input (even with ``--overwrite``), two
    outputs with one name, an existing output without ``--overwrite``, an output folder that cannot be created
    or written."""
    inputs = {s.resolve() for s in sources}
    seen: set[str] = set()
    for target in targets:
        resolved = target.resolve()
        if resolved in inputs:
            raise ValueError(f"Output {target} would overwrite an input; choose another --output (--overwrite "
                             "never replaces an input).")
        if str(resolved).lower() in seen:
            raise ValueError(f"Output {target} would be written twice (two inputs with one name); rename one or "
                             "run them separately.")
        seen.add(str(resolved).lower())
    existing = [t for t in targets if t.exists()]
    if existing and not overwrite:
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        raise ValueError(f"Output {existing[0]}{more} already exists; pass --overwrite to replace it or choose "
                         "another --output.")
    for folder in dict.fromkeys(t.parent for t in targets):
        check_writable_folder(folder, "--output")
    for target in existing:
        if target.is_dir():
            raise ValueError(f"Output {target} is a folder; choose another --output.")


__all__ = ["RunResults", "check_targets", "folder_output", "single_output", "skipped_lines"]
