"""The `rlhf` command: one console script, a subcommand per stage.

Each stage's package adds its own subcommands (`labeling.commands`, `reward_model.commands`,
`policy.commands`, `pipeline.demo`); this module owns the parser and error reporting: a UserError
becomes one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from labeling import commands as labeling_commands
from pipeline import demo, doctor, loop
from pipeline import export_model as export_model_command
from policy import commands as policy_commands
from reward_model import commands as reward_model_commands
from rlhf.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rlhf", description="RLHF toolkit: generate -> label -> pairs -> reward model -> PPO/RLOO/GRPO.")
    parser.add_argument("-v", "--verbose", action="store_true", help="show library logs and full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for stage in (labeling_commands, reward_model_commands, export_model_command, policy_commands, demo, loop, doctor):
        stage.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s: %(message)s")
    if not args.verbose:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        try:
            from transformers.utils import logging as hf_logging
            hf_logging.set_verbosity_error()
            hf_logging.disable_progress_bar()
        except ImportError:
            pass
    try:
        args.func(args)
    except UserError as exc:
        if args.verbose:
            raise
        print(f"rlhf {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"rlhf {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `rlhf ... | head`: the reader left; not an error worth a traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
