"""The ``pet-hooks`` command line (also ``python -m pet_hooks``).

    pet-hooks run --config pet.yaml [--save-dir adapter/] train.py [ARGS...]
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


def _run(args: argparse.Namespace) -> int:
    from .launcher import run_script  # imports MindSpore: only when running

    cfg = load_config(args.config)
    if not args.script:
        raise ValueError("run needs a SCRIPT to run")
    script, script_args = args.script[0], args.script[1:]
    if script == "--":
        script, script_args = (script_args[0], script_args[1:]) if script_args else (None, [])
        if script is None:
            raise ValueError("run needs a SCRIPT to run after '--'")
    return run_script(script, script_args, cfg, args.save_dir)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pet-hooks", description="Parameter-efficient tuning for MindSpore.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run an unmodified training script with PET")
    run.add_argument("--config", required=True, help="the PET config (any form load_config takes)")
    run.add_argument("--save-dir", default=None, help="save the trained model's adapter here at the end")
    run.add_argument("script", nargs=argparse.REMAINDER, help="SCRIPT.py [ARGS...] or a command such as msrun")
    run.set_defaults(func=_run)
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
