"""DPO training throughput and held-out accuracy: `rlhf dpo` (K-wise, cached reference) against TRL's DPOTrainer,
same model (SmolLM2-135M), LoRA, data and sequences per forward pass, side by side in one run.

    .venv/bin/python bench/dpo_throughput.py [--ks 4 8] [--steps 3] [--seqs 32] [--methods kwise pairwise trl]
    .venv/bin/python bench/dpo_throughput.py --accuracy [--limit 60]

Throughput: real prompts with random-word completions (~48 tokens; speed depends on lengths, not words),
K per prompt, ranked by length (equal lengths tie). Each configuration runs in a fresh subprocess (peak RSS
from getrusage does not mix), with the same number of sequences per forward pass (--seqs):
- kwise: `train_dpo` itself (the trainer `rlhf dpo` runs) on seqs/K rankings per step: K sequences per
  ranking, all C(K,2) pairs from them; the reference log-probabilities are computed once before training;
- pairwise: the same trainer on the same rankings expanded into TRL-format pairs (2 sequences per pair,
  seqs/2 pairs per step): what the K-wise grouping alone buys;
- trl: TRL's DPOTrainer on the same expanded pairs, seqs/2 pairs per step, LoRA on the same projections with the
  same rank, alpha, learning rate and beta, float32, without gradient checkpointing (TRL turns it on by default:
  less memory, a recomputed forward pass); its defaults otherwise: the reference, the same model with the adapter
  disabled, runs in every step. `trl-precompute` is the same with precompute_ref_log_probs=True.
One warm-up step, then --steps timed steps. Reported: pairs/s of the training steps, and pairs/s with our
one-off reference pass for the same rankings added (`with ref`). Targets: >= 3x TRL at K=4, >= 6x at K=8.

--accuracy: one epoch each of ours and TRL on the same train pairs (SFT completions cached by
bench/rm_quality.py, ranked without noise by the demo's `descriptive` oracle, 20% of prompts held out by the
export's rule), then the held-out preference accuracy of each one's implicit reward, beta * (log pi - log
pi_ref), measured by the same function. Target: within 2 points of TRL.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from rm_quality import CACHE, cached_tasks, comparisons, oracle_rankings  # noqa: E402
from rm_throughput import synthetic_tasks  # noqa: E402

LORA_R, LORA_ALPHA, BETA, LR = 16, 32, 0.1, 1e-4


def throughput_rows(k: int, limit: int | None) -> list[dict]:
    """rankings.jsonl rows of K random-word completions per prompt, ranked by length (all train)."""
    tasks = [{**t, "completions": t["completions"][:k]} for t in synthetic_tasks(limit, k=max(k, 8))]
    rows = oracle_rankings(tasks, lambda p, c: float(len(c)), 0.0, 0)
    return [{**r, "split": "train"} for r in rows]


def accuracy_rows(model: str, limit: int | None) -> list[dict]:
    """The first `limit` prompts' cached completions (all 237 generated once), ranked by `descriptive`."""
    from rlhf.oracles import descriptive

    return oracle_rankings(cached_tasks(model, 4, 32)[:limit], descriptive, 0.2, 0)


def pair_rows(rows: list[dict]) -> list[dict]:
    """The rankings' pairs in TRL's format (prompt, chosen, rejected)."""
    return [{"prompt": p, "chosen": b, "rejected": w} for p, b, w in comparisons(rows)]


# ---- ours: the `rlhf dpo` trainer ----

def run_ours(method: str, rows: list[dict], args, per_step: int) -> dict:
    """`train_dpo` on `rows` (rankings; the pairwise method passes its pairs as rankings of 2)."""
    import shutil

    from policy.dpo import DPOConfig, train_dpo
    from rlhf.jsonl import write_jsonl
    from rlhf.runlog import read_log

    out = Path(args.tmp) / f"{method}-k{args.k[0]}{'-acc' if args.accuracy else ''}"
    data = out / "rankings.jsonl"
    write_jsonl(data, rows)
    shutil.rmtree(out / "run", ignore_errors=True)
    summary = train_dpo(DPOConfig(data=str(data), out=str(out / "run"), model=args.model, batch_rankings=per_step,
                                  epochs=1, lr=LR, beta=BETA, lora_r=LORA_R, lora_alpha=LORA_ALPHA, checkpoint_every=0,
                                  eval_batch_size=args.seqs, seed=0), progress=False)
    log = read_log(summary["train_log"])
    result = {"method": method, "k": args.k[0], "reference_seconds": summary["reference_seconds"]}
    if args.accuracy:
        result.update(seconds=summary["train_seconds"], pairs=summary["train_pairs"], steps=len(log),
                      reference_share=summary["reference_seconds"],
                      accuracy=summary["final"].get("rewards/accuracies"),
                      train_accuracy=float(log["rewards/accuracies"].tail(max(1, len(log) // 4)).mean()))
    else:
        timed = log.iloc[1:1 + args.steps]  # after the warm-up step
        result.update(seconds=float(timed["time/step_s"].sum()), pairs=int(timed["pairs"].sum()), steps=len(timed),
                      reference_share=summary["reference_seconds"] * len(timed) / len(log))
    return result


# ---- TRL ----

class _PeftRoles:
    """What policy.dpo's evaluation needs from a peft causal LM: logits at the last positions, adapter on/off."""

    def __init__(self, model):
        self.model = model

    def response_logits(self, adapter, input_ids, attention_mask, response_length):
        from contextlib import nullcontext

        from rlhf.causal_lm import position_ids_from_mask

        with self.model.disable_adapter() if adapter is None else nullcontext():
            out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                             position_ids=position_ids_from_mask(attention_mask),
                             logits_to_keep=response_length + 1, use_cache=False)
        return out.logits[:, :-1]


def held_out_accuracy(model, tok, rows: list[dict]) -> float:
    """Implicit-reward accuracy of a peft policy on the held-out rankings' pairs (policy.dpo.evaluate_pairs)."""
    from policy.dpo import DPOConfig, evaluate_pairs, reference_logps
    from reward_model import data as rmdata
    from rlhf.records import RankedTask

    examples = rmdata.build_examples([RankedTask.from_dict(r) for r in rows if r["split"] == "test"],
                                     rmdata.DataStats())
    config = DPOConfig(beta=BETA)
    rmdata.tokenize_examples(examples, tok, config.max_length, rmdata.DataStats())
    roles = _PeftRoles(model.eval())
    reference = reference_logps(roles, examples, tok.pad_token_id, "cpu", 32, None, {})
    return evaluate_pairs(roles, examples, reference, config, tok.pad_token_id, "cpu")["rewards/accuracies"]


def run_trl(method: str, rows: list[dict], args, pairs_per_step: int) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import DPOConfig as TRLConfig
    from trl import DPOTrainer

    from rlhf.causal_lm import lora_target_modules
    from rlhf.models import format_prompt, load_tokenizer, resolve_model

    tok = load_tokenizer(args.model)
    pairs = pair_rows([r for r in rows if r["split"] == "train"])
    if not args.accuracy:
        pairs = pairs[:pairs_per_step * (1 + args.steps)]
    # the chat-formatted prompt as text: TRL appends EOS to each completion and tokenizes prompt + completion
    dataset = Dataset.from_list([{"prompt": format_prompt(tok, p["prompt"]), "chosen": p["chosen"],
                                  "rejected": p["rejected"]} for p in pairs])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(resolve_model(args.model), dtype=torch.float32)
    stamps = []

    class Stamp(TrainerCallback):
        def on_step_end(self, *_, **__):
            stamps.append(time.perf_counter())

    config = TRLConfig(output_dir=str(Path(args.tmp) / f"{method}-k{args.k[0]}"),
                       per_device_train_batch_size=pairs_per_step,
                       learning_rate=LR, beta=BETA, loss_type=["sigmoid"], num_train_epochs=1,
                       max_steps=-1 if args.accuracy else 1 + args.steps, logging_steps=10_000, save_strategy="no",
                       report_to="none", use_cpu=True, max_length=512, dataloader_num_workers=0, bf16=False,
                       disable_tqdm=True, lr_scheduler_type="cosine", warmup_steps=0, max_grad_norm=1.0, seed=0,
                       precompute_ref_log_probs=method == "trl-precompute",
                       gradient_checkpointing=False)  # TRL's default is True: the same compute as ours instead
    started = time.perf_counter()
    trainer = DPOTrainer(model=model, args=config, train_dataset=dataset, processing_class=tok,
                         peft_config=LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0,
                                                target_modules=lora_target_modules(model), task_type="CAUSAL_LM"),
                         callbacks=[Stamp()])
    prepared = time.perf_counter()
    trainer.train()
    result = {"method": method, "k": args.k[0], "reference_seconds": prepared - started}
    if args.accuracy:
        result.update(seconds=stamps[-1] - prepared, pairs=len(pairs), steps=len(stamps),
                      accuracy=held_out_accuracy(trainer.model, tok, rows))
    else:
        result.update(seconds=stamps[-1] - stamps[0], pairs=pairs_per_step * args.steps, steps=args.steps,
                      reference_share=(prepared - started) * args.steps / (1 + args.steps)
                      if method == "trl-precompute" else 0.0)
    return result


def worker(args) -> None:
    import torch

    torch.set_num_threads(args.threads or torch.get_num_threads())
    k = args.k[0]
    if args.accuracy:
        rows = accuracy_rows(args.model, args.limit)
        train = [r for r in rows if r["split"] == "train"]
        per_step = 8  # rankings per step, the `rlhf dpo` default; TRL gets as many pairs per step on average
        pairs_per_step = max(1, round(len(comparisons(train)) / len(train) * per_step))
    else:
        rows = throughput_rows(k, args.limit)
        per_step, pairs_per_step = max(1, args.seqs // k), args.seqs // 2
        rows = rows[:per_step * (1 + args.steps)] if args.method == "kwise" else rows
        if args.method == "pairwise":  # the same rankings as kwise, their pairs in steps of seqs/2
            pairs = pair_rows(rows)[:pairs_per_step * (1 + args.steps)]
            rows = [{"task_id": f"pair-{i}", "annotator": "oracle", "prompt": p["prompt"], "split": "train",
                     "completions": [{"id": "c", "text": p["chosen"], "rank": 1},
                                     {"id": "r", "text": p["rejected"], "rank": 2}]} for i, p in enumerate(pairs)]
    if args.method.startswith("trl"):
        result = run_trl(args.method, rows, args, pairs_per_step)
    else:
        result = run_ours(args.method, rows, args, per_step if args.method == "kwise" else pairs_per_step)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["pairs_per_s"] = result["pairs"] / result["seconds"]
    result["pairs_per_s_with_ref"] = result["pairs"] / (result["seconds"] + result.get("reference_share", 0.0))
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--ks", "--k", dest="k", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--steps", type=int, default=3, help="timed steps per configuration (after 1 warm-up)")
    parser.add_argument("--seqs", type=int, default=32, help="sequences per forward pass, every method")
    parser.add_argument("--limit", type=int, default=None, help="prompts to use (default all)")
    parser.add_argument("--methods", nargs="+", default=["kwise", "pairwise", "trl"])
    parser.add_argument("--accuracy", action="store_true", help="train one epoch each, report held-out accuracy")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--tmp", default=str(CACHE / "dpo"))
    parser.add_argument("--method", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.method:
        worker(args)
        return

    methods = list(args.methods)
    try:
        import trl  # noqa: F401
    except ImportError:
        methods = [m for m in methods if not m.startswith("trl")]
        print("trl is not installed (pip install -e '.[bench]'): TRL columns skipped")
    if args.accuracy:
        cached_tasks(args.model, 4, 32)  # generate once, before the subprocesses
        args.k = [4]
        methods = [m for m in methods if m in ("kwise", "trl")]
    results = {}
    for k in args.k:
        for method in methods:
            cmd = [sys.executable, __file__, "--method", method, "--k", str(k), "--steps", str(args.steps),
                   "--seqs", str(args.seqs), "--model", args.model, "--tmp", args.tmp, "--threads", str(args.threads)]
            cmd += ["--accuracy"] if args.accuracy else []
            cmd += ["--limit", str(args.limit)] if args.limit else []
            started = time.time()
            proc = subprocess.run(cmd, capture_output=True, text=True,
                                  env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"})
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                print(f"k={k} {method}: FAILED\n{proc.stderr[-3000:]}", flush=True)
                continue
            results[(k, method)] = r = json.loads(line[7:])
            acc = f"  held-out acc {r['accuracy']:.3f}" if r.get("accuracy") is not None else ""
            print(f"k={k} {method:15s} {r['pairs']:5d} pairs in {r['seconds']:7.1f} s = {r['pairs_per_s']:6.2f} "
                  f"pairs/s ({r['pairs_per_s_with_ref']:6.2f} with ref; reference/setup {r['reference_seconds']:.1f} s)"
                  f"  peak RSS {r['peak_rss_mb']:6.0f} MB{acc}  [{time.time() - started:.0f} s wall]", flush=True)
    print(f"\nsummary ({args.seqs} sequences per forward pass, {args.steps} timed steps, float32):")
    for k in args.k:
        ours = results.get((k, "kwise"))
        for base in ("pairwise", "trl", "trl-precompute"):
            other = results.get((k, base))
            if ours and other:
                line = (f"K={k}: K-wise / {base} = {ours['pairs_per_s'] / other['pairs_per_s']:.2f}x pairs/s "
                        f"({ours['pairs_per_s_with_ref'] / other['pairs_per_s_with_ref']:.2f}x with our reference "
                        "pass counted)")
                if ours.get("accuracy") is not None and other.get("accuracy") is not None:
                    line += f"; held-out accuracy {ours['accuracy']:.3f} vs {other['accuracy']:.3f}"
                print(line)


if __name__ == "__main__":
    main()
