"""The `rlhf` command: one console script, a subcommand per stage.

Each stage's package adds its own subcommands (`labeling.commands`, `reward_model.commands`,
`policy.commands`); this module owns the parser, `generate`, `demo`, and error reporting: a
UserError becomes one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from rlhf.errors import UserError


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_generate_command(sub) -> None:
    p = sub.add_parser("generate", help="sample K completions per prompt from the SFT model into labeling tasks",
                       description="Sample K completions per prompt (batched, KV cache) and write one labeling "
                                   "task per prompt to a JSONL file that `rlhf import` reads.")
    p.add_argument("--prompts", required=True, help="JSONL file, one {\"prompt\": ..., \"id\"?: ...} per line")
    p.add_argument("--k", type=int, default=4, help="completions per prompt (>= 2; default 4)")
    p.add_argument("--out", required=True, help="output tasks JSONL (written atomically)")
    p.add_argument("--model", default="default",
                   help="SFT model: 'default' (SmolLM2-135M-Instruct, bundled), a local folder or a HF id")
    p.add_argument("--limit", type=_positive_int, default=None, help="use only the first N prompts")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (default 0.7)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0, off)")
    p.add_argument("--max-new-tokens", type=_positive_int, default=64, help="completion length cap (default 64)")
    p.add_argument("--seed", type=int, default=0, help="random seed; the same seed reproduces a run")
    p.add_argument("--batch-size", type=_positive_int, default=64,
                   help="sequences per generate call (prompts x K; default 64)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="model weights' dtype (default float32)")
    p.set_defaults(func=run_generate)


def run_generate(args) -> None:
    import torch
    from tqdm import tqdm

    from rlhf.generation import SamplingParams, generate_tasks
    from rlhf.jsonl import write_jsonl
    from rlhf.models import DEFAULT_MODEL, is_default_model, load_causal_lm, load_tokenizer
    from rlhf.prompts import read_prompts

    if args.k < 2:
        raise UserError(f"--k must be at least 2 (a ranking needs two completions), got {args.k}")
    if args.temperature <= 0:
        raise UserError("--temperature must be > 0")
    if not 0 < args.top_p <= 1:
        raise UserError("--top-p must be in (0, 1]")
    prompts = read_prompts(args.prompts, args.limit)
    tokenizer = load_tokenizer(args.model)
    model = load_causal_lm(args.model, dtype=getattr(torch, args.dtype)).eval()
    params = SamplingParams(args.temperature, args.top_p, args.max_new_tokens)
    with tqdm(total=len(prompts), desc="generate", unit="prompt", disable=None) as bar:
        tasks = generate_tasks(model, tokenizer, prompts, args.k, params, model_name=DEFAULT_MODEL if is_default_model(args.model) else args.model,
                               seed=args.seed, batch_size=args.batch_size, on_progress=bar.update)
        count = write_jsonl(args.out, (t.to_dict() for t in tasks))
    print(f"wrote {count} tasks x {args.k} completions to {args.out}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rlhf", description="RLHF toolkit: generate -> label -> pairs -> reward model -> PPO/RLOO.")
    parser.add_argument("-v", "--verbose", action="store_true", help="show library logs and full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_generate_command(sub)
    for module_name in ("labeling.commands", "reward_model.commands", "policy.commands", "rlhf.demo"):
        try:
            module = __import__(module_name, fromlist=["add_commands"])
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue  # a stage not built yet
        module.add_commands(sub)
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
