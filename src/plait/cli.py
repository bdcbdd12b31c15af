"""The `plait` command.

Exit codes: 0 done; 1 the run failed; 2 bad input. A failure plait can
explain (any `PlaitError`) is one line on stderr, with no traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from plait.config import SECTIONS, field_type, flag_of, load_config, read_toml
from plait.errors import ConfigError, PlaitError


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors raised as one-line ConfigErrors instead of usage dumps."""

    def error(self, message: str):  # type: ignore[override]
        raise ConfigError(f"{message}; see '{self.prog} --help'")


def _add_config_options(parser: argparse.ArgumentParser) -> None:
    """One option per config field, generated from the dataclasses' metadata.

    Defaults are suppressed so that only the options a user typed override the
    config file (or, on resume, the run's saved config).
    """
    for section, cls in SECTIONS.items():
        group = parser.add_argument_group(f"{section} options ([{section}] in --config)")
        for f in dataclasses.fields(cls):
            meta = f.metadata
            default = f.default
            help_text = meta["help"] + ("" if default is None else f" (default: {default})")
            dest = f"{section}.{f.name}"
            if isinstance(default, bool):
                group.add_argument(flag_of(f), dest=dest, action=argparse.BooleanOptionalAction,
                                   default=argparse.SUPPRESS, help=help_text)
            else:
                kind = field_type(cls, f.name)[0]
                metavar = ("{" + ",".join(meta["choices"]) + "}" if meta.get("choices")
                           else {int: "N", float: "X"}.get(kind, f.name.upper()))
                group.add_argument(flag_of(f), dest=dest, default=argparse.SUPPRESS, metavar=metavar,
                                   help=help_text)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="plait", description="Train GPT-style language models with data and "
                                               "pipeline parallelism.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    train = sub.add_parser("train", help="train a model",
                           description="Train a GPT. With no options: the tiny model on CPython's "
                                       "documentation, about a minute on 2 CPU cores.")
    train.add_argument("--config", metavar="FILE.toml", help="a TOML file of options, by section; "
                                                             "command-line options override it")
    train.add_argument("--resume", metavar="RUN_DIR", help="continue this run from its newest checkpoint "
                                                           "(its saved config, overridden by any options given)")
    _add_config_options(train)
    return parser


def _train(args: argparse.Namespace) -> int:
    overrides = {k: v for k, v in vars(args).items() if "." in k}
    base = None
    if args.resume:
        saved = Path(args.resume) / "config.toml"
        if not saved.is_file():
            raise ConfigError(f"--resume {args.resume}: no config.toml there; give the directory of a plait run")
        base = read_toml(saved)
        overrides["output.out"] = args.resume
    cfg = load_config(args.config, overrides, base=base)
    import torch.distributed as dist

    from plait.train import train  # the trainer's imports are paid only once the input is good

    try:
        train(cfg, resume=args.resume)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command == "train":
            return _train(args)
        raise AssertionError(args.command)
    except PlaitError as e:
        print(f"plait: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("plait: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
