"""The ``pet-hooks`` command line (also ``python -m pet_hooks``).

    pet-hooks run --config pet.yaml [--save-dir adapter/] [--quiet] [--plot loss.png] train.py [ARGS...]
    pet-hooks run --config pet.yaml --save-dir run/ --save-steps 50 [--keep 2] --resume train.py   # resumable
    pet-hooks run run_mindformer.py --config run_llama_lora.yaml    # the run YAML's own pet_config
    pet-hooks inspect --config pet.yaml (--model MODULE:FACTORY | train.py [ARGS...]) [--json]
    pet-hooks check-config samples/configs/lora.yaml    # validate a config, print it normalised
    pet-hooks check-config --explain samples/configs/lora.yaml   # each field: value and meaning
    pet-hooks version                                   # or pet-hooks --version

``check-config`` and ``version`` do not import MindSpore.

Errors are one line on stderr naming the cause, with exit code 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional

from .._version import __version__
from ..config.pet_config import check_adapter_name, explain, load_config

__all__ = ["main"]


def _check_config(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    if args.explain:
        print(explain(cfg))
        return 0
    print(json.dumps({"pet_config": cfg.to_dict(), "model_hints": cfg.model_hints}, indent=2, sort_keys=True))
    return 0


def _run(args: argparse.Namespace) -> int:
    from ..doors.launcher import run_script  # imports MindSpore: only when running

    # Without --config the config is the pet_config of the run YAML MindFormers builds from (hooks.mindformers).
    cfg = None if args.config is None else load_config(args.config)
    if not args.script:
        raise ValueError("run needs a SCRIPT to run")
    script, script_args = args.script[0], args.script[1:]
    if script == "--":
        script, script_args = (script_args[0], script_args[1:]) if script_args else (None, [])
        if script is None:
            raise ValueError("run needs a SCRIPT to run after '--'")
    from .progress import TrainingMonitor, write_loss_plot

    if args.plot and not args.plot.lower().endswith(".png"):
        raise ValueError(f"--plot writes a PNG; give a file name ending in .png, not {args.plot!r}")
    monitor = TrainingMonitor(show=not args.quiet and sys.stdout.isatty())
    if args.adapter_name is not None:
        check_adapter_name(args.adapter_name)
    code = run_script(script, script_args, cfg, args.save_dir, monitor=monitor, adapter_name=args.adapter_name,
                      save_steps=args.save_steps, keep=args.keep, resume=args.resume,
                      compile_cache=args.compile_cache)
    if args.plot:
        if monitor.losses:
            write_loss_plot(monitor.losses, args.plot, title=f"pet-hooks run {os.path.basename(script)}")
            print(f"pet-hooks: loss curve of {len(monitor.losses)} steps written to {args.plot}", file=sys.stderr)
        else:
            print("pet-hooks: no loss was recorded (no Model.train in this process), so no plot", file=sys.stderr)
            code = code or 1
    return code


def _inspect(args: argparse.Namespace) -> int:
    from .inspection import build_from_factory, capture_script_model, format_report, inspect_net

    cfg = load_config(args.config)
    if bool(args.model) == bool(args.script):
        raise ValueError("inspect needs exactly one of --model MODULE:FACTORY and SCRIPT [ARGS...]")
    if args.model:
        net = build_from_factory(args.model)
    else:
        script = args.script[1:] if args.script[0] == "--" else args.script
        if not script:
            raise ValueError("inspect needs a SCRIPT after '--'")
        net = capture_script_model(script[0], script[1:], cfg)
    report = inspect_net(net, cfg)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    if report["error"]:
        print(f"pet-hooks: error: {report['error']}", file=sys.stderr)
        return 2
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pet-hooks", description="Parameter-efficient tuning for MindSpore.")
    parser.add_argument("--version", action="version", version=__version__, help="print the pet_hooks version")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run an unmodified training script with PET")
    run.add_argument("--config", default=None, help="the PET config (any form load_config takes); default: the "
                     "pet_config of the MindFormers run YAML the script builds its model from")
    run.add_argument("--save-dir", default=None, help="save the trained model's adapter here at the end")
    run.add_argument("--quiet", action="store_true", help="no progress line (it is off anyway when stdout "
                     "is not a terminal)")
    run.add_argument("--adapter-name", default=None, help="train and save the adapter of this name "
                     "(pet_hooks.add_adapter / set_adapter); default: the one adapter, 'default'")
    run.add_argument("--save-steps", type=int, default=None, metavar="N", help="every N steps write a run "
                     "checkpoint (adapter, optimizer state, position) to SAVE_DIR/checkpoints/step-<n>/")
    run.add_argument("--keep", type=int, default=2, metavar="K", help="keep the newest K run checkpoints (default 2)")
    run.add_argument("--resume", action="store_true", help="continue after the newest complete run checkpoint in "
                     "SAVE_DIR/checkpoints (none there: start from step 0, saying so)")
    run.add_argument("--compile-cache", default=None, metavar="DIR", help="keep MindSpore's compiled graphs in DIR: "
                     "the next run of the same script and config skips the compile")
    run.add_argument("--plot", default=None, metavar="FILE.png", help="write the loss curve of the run here")
    run.add_argument("script", nargs=argparse.REMAINDER, help="SCRIPT.py [ARGS...] or a command such as msrun")
    run.set_defaults(func=_run)
    insp = sub.add_parser("inspect", help="show what a config will tune in a model, without training")
    insp.add_argument("--config", required=True, help="the PET config (any form load_config takes)")
    insp.add_argument("--model", default=None, help="MODULE:FACTORY, a function returning the model")
    insp.add_argument("--json", action="store_true", help="print the report as JSON")
    insp.add_argument("script", nargs=argparse.REMAINDER, help="or SCRIPT.py [ARGS...], stopped at its first model")
    insp.set_defaults(func=_inspect)
    check = sub.add_parser("check-config", help="validate a PET config and print it normalised")
    check.add_argument("config", help="MindFormers run YAML, a YAML/JSON with pet_config, or a bare block")
    check.add_argument("--explain", action="store_true", help="print each field with its value and meaning")
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
