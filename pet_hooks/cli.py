"""The ``pet-hooks`` command line (also ``python -m pet_hooks``).

    pet-hooks check-config samples/configs/lora.yaml    # validate a config, print it normalised
    pet-hooks version

Errors are one line on stderr naming the cause, with exit code 2.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional

from ._version import __version__
from .config import load_config

__all__ = ["main"]


def _check_config(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    print(json.dumps({"pet_config": cfg.to_dict(), "model_hints": cfg.model_hints}, indent=2, sort_keys=True))
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pet-hooks", description="Parameter-efficient tuning for MindSpore.")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check-config", help="validate a PET config and print it normalised")
    check.add_argument("config", help="MindFormers run YAML, a YAML/JSON with pet_config, or a bare block")
    check.set_defaults(func=_check_config)
    version = sub.add_parser("version", help="print the pet_hooks version")
    version.set_defaults(func=lambda args: print(__version__) or 0)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"pet-hooks: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
