"""``opensora-plan`` command line: argument parsing only, each command calls one library function.

Every sub-command has one ``_add_<name>(subparsers)`` function below that declares its flags and
sets ``func``; the heavy imports happen inside the command, so ``--help`` is instant.
User errors (missing files, bad shapes, bad flags) end with one ``error: ...`` line and exit code 1;
set ``OPENSORA_PLAN_DEBUG=1`` for the full traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys


class UserError(Exception):
    """An error caused by the user's input: printed as one line, no traceback."""


# --------------------------------------------------------------------------------------------
# reconstruct (CausalVAE video reconstruction)
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# sample (text-to-video)
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# data check / extract (datasets, cached features)
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# train-t2v / train-vae
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# eval-vae / convert
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# demo
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="opensora-plan",
        description="Open-Sora-Plan v1.0.0 text-to-video: sampling, reconstruction, training.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, add in sorted(globals().items()):
        if name.startswith("_add_") and callable(add):
            add(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (UserError, FileNotFoundError, ValueError) as err:
        if os.environ.get("OPENSORA_PLAN_DEBUG"):
            raise
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
