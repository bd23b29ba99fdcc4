"""The `fedkb` entry point: one argparse parser, one subcommand per module in fedkb.commands.

Usage:
    fedkb data prepare --dataset shakespeare --out runs/data
    fedkb baseline --data runs/data --out runs/baseline
    fedkb export --data runs/data --out runs/model
    fedkb suggest --model runs/model "to be or not to"
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

# TensorFlow's C++ start-up chatter (CUDA probes, cuDNN/cuFFT "factory" errors on a CPU-only
# machine) is noise on a command line; Python errors still surface as exceptions. Set before any
# command imports TensorFlow; an explicit setting in the environment wins.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from tqdm.contrib.logging import logging_redirect_tqdm  # noqa: E402

from fedkb import __version__  # noqa: E402
from fedkb_core.errors import FedkbError  # noqa: E402

# Registered in this order in `fedkb --help`.
_COMMAND_MODULES = (
    "fedkb.commands.data",
    "fedkb.commands.baseline",
    "fedkb.commands.export",
    "fedkb.commands.serve",
    "fedkb.commands.device",
    "fedkb.commands.simulate",
    "fedkb.commands.evaluate",
    "fedkb.commands.suggest",
)


def _command_modules():
    """Import each command module that is present (a module that does not exist is skipped;
    an import error inside one is not)."""
    for name in _COMMAND_MODULES:
        try:
            yield importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name != name:
                raise


def build_parser() -> argparse.ArgumentParser:
    """Build the full parser (exposed for tests and docs)."""
    parser = argparse.ArgumentParser(
        prog="fedkb",
        description="On-device federated next-word keyboard prediction.",
    )
    parser.add_argument("--version", action="version", version=f"fedkb {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for module in _command_modules():
        module.register(subparsers)
    return parser


def _configure_logging(verbose: bool, quiet: bool) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # TensorFlow and absl log every SavedModel write at INFO; that is noise to our users.
    for noisy in ("tensorflow", "absl", "h5py"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))


def main(argv: list[str] | None = None) -> int:
    """Run one command; return the process exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args.verbose, args.quiet)
    try:
        # Log lines go through tqdm.write: printed above a live progress bar, not glued to its end.
        with logging_redirect_tqdm():
            return int(args.func(args) or 0)
    except FedkbError as err:
        print(f"fedkb {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
