"""Reward-model training throughput: K-wise (InstructGPT) vs pairwise (2 forward passes per pair, like
TRL's RewardTrainer) vs TRL's RewardTrainer itself, same data, model (SmolLM2-135M) and LoRA.

    .venv/bin/python bench/rm_throughput.py [--steps 3] [--seqs 32] [--ks 4 8] [--dtype float32]

Data: the cached completions of bench/rm_quality.py ranked by the `sentiment` oracle (K completions
per prompt, equal oracle scores tie). Our reward model reads a fixed read-out (a third of the depth, the
completion mean: READOUT_LAYER); TRL's reads the last layer's last token, as it always does. Every configuration
trains on the SAME rankings, in a fresh subprocess
(so peak RSS, from getrusage, does not mix), with the same number of sequences per forward pass
(--seqs): K-wise packs seqs/K whole rankings per step and gets all their pairs from one pass;
pairwise packs seqs/2 (chosen, rejected) pairs of those rankings. One warm-up step, then --steps
timed steps. Reported: pairs/s (comparisons learned from per second) and peak RSS.
Targets: K-wise >= 2.5x TRL at K=4 and >= 5x at K=8.

--accuracy adds a held-out check: each method trains one epoch on the same training prompts and is
evaluated on the same held-out prompts (slow: minutes per configuration on a 2-core CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rm_quality import cached_tasks, oracle_rankings  # noqa: E402

LORA_R = 8


READOUT_LAYER = 0.33


def synthetic_tasks(limit: int | None, k: int = 8, words: int = 36) -> list[dict]:
    """Real prompts with random-word completions (~48 tokens): for timing only, when generating real
    completions is too slow on the machine at hand. Speed depends on lengths, not on the words."""
    from rm_quality import ROOT

    from rlhf.prompts import read_prompts

    rng = random.Random(0)
    vocab = ("sun sea sky silver small soft tree tall tale fox found key snow bird blue bright boat "
             "the a of and in on with moon morning river rain wind walk light long").split()
    tasks = []
    for pid, prompt in read_prompts(ROOT / "data" / "prompts.jsonl", limit):
        tasks.append({"id": pid, "prompt": prompt, "completions": [
            {"id": f"{pid}-{j}", "text": " ".join(rng.choices(vocab, k=words))} for j in range(k)]})
    return tasks


def load_rankings(k: int, model: str, limit: int | None, synthetic: bool = False):
    from rm_quality import CACHE

    from reward_model.data import DataStats, build_examples, find_data
    from rlhf.jsonl import write_jsonl
    from rlhf.oracles import sentiment

    tasks = synthetic_tasks(limit) if synthetic else cached_tasks(model, 8, 48, limit=limit)
    tasks = [{**t, "completions": t["completions"][:k]} for t in tasks]
    rows = oracle_rankings(tasks, sentiment if not synthetic else (lambda p, c: float(len(c))), 0.2, 0)
    path = CACHE / f"throughput_k{k}{'_synthetic' if synthetic else ''}.jsonl"
    write_jsonl(path, rows)
    files = find_data(path)
    return build_examples(files.train, DataStats()), files.test


def pair_batches(examples, pairs_per_step):
    """Every pair of the rankings as its own (chosen row, rejected row) example, batched."""
    pairs = [(ex.rows[b], ex.rows[w]) for ex in examples for b, w, _ in ex.pairs]
    return [pairs[i:i + pairs_per_step] for i in range(0, len(pairs), pairs_per_step)]


def run_ours(mode: str, k: int, args) -> dict:
    import torch

    from reward_model.data import DataStats, collate, tokenize_examples
    from reward_model.loss import ranking_loss
    from reward_model.model import create_reward_model, pad_samples

    torch.manual_seed(0)
    # a fixed read-out (train-rm chooses one from the data): a third of the depth, whose cost is a third of a full pass
    rm, tok = create_reward_model(args.model, lora_r=LORA_R, lora_alpha=2 * LORA_R, dtype=getattr(torch, args.dtype),
                                  readout_layer=READOUT_LAYER, readout_pool="mean")
    examples, test = load_rankings(k, args.model, args.limit, args.synthetic)
    tokenize_examples(examples, tok, 512, DataStats())
    if args.grad_ckpt:  # recompute each decoder layer in backward instead of keeping its activations
        rm.backbone.get_base_model().gradient_checkpointing_enable({"use_reentrant": False})
    params = [p for p in rm.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=3e-4)
    rm.train()

    if mode == "kwise":
        per_step = max(1, args.seqs // k)
        batches = [examples[i:i + per_step] for i in range(0, len(examples), per_step)]

        def step(batch):
            tensors, index = collate(batch, tok.pad_token_id)
            loss, _ = ranking_loss(rm(*tensors), index)
            return loss, index.num_pairs
    else:
        batches = pair_batches(examples, args.seqs // 2)

        def step(batch):
            rewards = rm(*pad_samples([c for c, _ in batch] + [r for _, r in batch], tok.pad_token_id))
            n = len(batch)
            loss = -torch.nn.functional.logsigmoid(rewards[:n] - rewards[n:]).mean()
            return loss, n

    def train_step(batch):
        loss, pairs = step(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return pairs

    result = {"method": mode + ("+ckpt" if args.grad_ckpt else ""), "k": k}
    if args.accuracy:
        from reward_model.evaluate import evaluate_reward_model

        started = time.perf_counter()
        pairs = sum(train_step(b) for b in batches)
        result.update(seconds=time.perf_counter() - started, pairs=pairs, steps=len(batches),
                      accuracy=evaluate_reward_model(rm, tok, test, 512)["accuracy"])
    else:
        train_step(batches[0])  # warm-up
        started = time.perf_counter()
        pairs = sum(train_step(b) for b in batches[1:1 + args.steps])
        result.update(seconds=time.perf_counter() - started, pairs=pairs, steps=args.steps)
    return result


def run_trl(k: int, args) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForSequenceClassification, TrainerCallback
    from trl import RewardConfig, RewardTrainer

    from reward_model.data import DataStats, tokenize_examples
    from rlhf.causal_lm import lora_target_modules
    from rlhf.models import load_tokenizer, resolve_model

    tok = load_tokenizer(args.model)
    examples, test = load_rankings(k, args.model, args.limit, args.synthetic)
    tokenize_examples(examples, tok, 512, DataStats())
    pairs = [(ex.rows[b].ids, ex.rows[w].ids) for ex in examples for b, w, _ in ex.pairs]
    per_step = args.seqs // 2
    if not args.accuracy:
        pairs = pairs[:per_step * (1 + args.steps)]
    dataset = Dataset.from_dict({"chosen_ids": [c for c, _ in pairs], "rejected_ids": [r for _, r in pairs]})
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(
        resolve_model(args.model), num_labels=1, dtype=getattr(torch, args.dtype))
    model.config.pad_token_id = tok.pad_token_id
    targets = lora_target_modules(model)  # the same projections our reward model adapts
    stamps = []

    class Stamp(TrainerCallback):
        def on_step_end(self, *_, **__):
            stamps.append(time.perf_counter())

    config = RewardConfig(output_dir=str(Path(args.tmp) / f"trl-k{k}"), per_device_train_batch_size=per_step,
                          learning_rate=3e-4, num_train_epochs=1, max_steps=-1 if args.accuracy else 1 + args.steps,
                          logging_steps=1000, save_strategy="no", report_to="none", use_cpu=True,
                          max_length=512, dataloader_num_workers=0, bf16=False,
                          gradient_checkpointing=False, disable_tqdm=True, lr_scheduler_type="constant",
                          warmup_steps=0, max_grad_norm=1.0, seed=0)
    tok.padding_side = "right"
    trainer = RewardTrainer(model=model, args=config, train_dataset=dataset, processing_class=tok,
                            peft_config=LoraConfig(r=LORA_R, lora_alpha=2 * LORA_R, target_modules=targets,
                                                   task_type="SEQ_CLS"),
                            callbacks=[Stamp()])
    started = time.perf_counter()
    trainer.train()
    result = {"method": "trl", "k": k}
    if args.accuracy:
        result.update(seconds=time.perf_counter() - started, pairs=len(pairs), steps=len(stamps),
                      accuracy=_trl_accuracy(trainer.model, tok, test))
    else:
        result.update(seconds=stamps[-1] - stamps[0], pairs=per_step * args.steps, steps=args.steps)
    return result


def _trl_accuracy(model, tok, test) -> float:
    import torch

    from reward_model.evaluate import _comparisons
    from reward_model.model import encode_sample_ids
    from rlhf.causal_lm import pad_rows

    model.eval()
    right = total = 0
    with torch.no_grad():
        for prompt, better, worse, *_ in _comparisons(test):
            rows = [encode_sample_ids(tok, prompt, t, 512).ids for t in (better, worse)]
            ids, mask = pad_rows(rows, tok.pad_token_id, "right")
            scores = model(input_ids=ids, attention_mask=mask).logits.squeeze(-1)
            right += float(scores[0] > scores[1])
            total += 1
    return right / total


def worker(args) -> None:
    import torch

    torch.set_num_threads(args.threads or torch.get_num_threads())
    k = args.k[0]
    result = run_trl(k, args) if args.method == "trl" else run_ours(args.method, k, args)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["pairs_per_s"] = result["pairs"] / result["seconds"]
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--ks", "--k", dest="k", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--steps", type=int, default=3, help="timed steps per configuration (after 1 warm-up)")
    parser.add_argument("--seqs", type=int, default=32, help="sequences per forward pass, every method")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--limit", type=int, default=None, help="prompts to use (default all)")
    parser.add_argument("--methods", nargs="+", default=["kwise", "pairwise", "trl"])
    parser.add_argument("--accuracy", action="store_true", help="train one epoch each, report held-out accuracy")
    parser.add_argument("--synthetic", action="store_true",
                        help="random-word completions instead of generated ones (timing only; no generation)")
    parser.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing (our methods only)")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--tmp", default="/tmp/rlhf-bench-cache/throughput")
    parser.add_argument("--method", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.method:
        worker(args)
        return

    methods = list(args.methods)
    try:
        import trl  # noqa: F401
    except ImportError:
        methods = [m for m in methods if m != "trl"]
        print("trl is not installed: TRL column skipped")
    if not args.synthetic:
        cached_tasks(args.model, 8, 48, limit=args.limit)  # generate once, before the timed subprocesses
    results = {}
    for k in args.k:
        for method in methods:
            cmd = [sys.executable, __file__, "--method", method, "--k", str(k), "--steps", str(args.steps),
                   "--seqs", str(args.seqs), "--dtype", args.dtype, "--model", args.model, "--tmp", args.tmp,
                   "--threads", str(args.threads)]
            cmd += ["--accuracy"] if args.accuracy else []
            cmd += ["--limit", str(args.limit)] if args.limit else []
            cmd += ["--synthetic"] if args.synthetic else []
            cmd += ["--grad-ckpt"] if args.grad_ckpt else []
            proc = subprocess.run(cmd, capture_output=True, text=True,
                                  env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"})
            line = next((out for out in proc.stdout.splitlines() if out.startswith("RESULT ")), None)
            if line is None:
                print(f"k={k} {method}: FAILED\n{proc.stderr[-3000:]}")
                continue
            results[(k, method)] = r = json.loads(line[7:])
            acc = f"  held-out acc {r['accuracy']:.3f}" if "accuracy" in r else ""
            print(f"k={k} {r['method']:13s} {r['pairs']:5d} pairs in {r['seconds']:7.1f} s = "
                  f"{r['pairs_per_s']:6.2f} pairs/s"
                  f"  peak RSS {r['peak_rss_mb']:6.0f} MB{acc}", flush=True)
    print(f"\nsummary ({args.dtype}, {args.seqs} sequences per forward pass, {args.steps} timed steps, "
          f"{'synthetic' if args.synthetic else 'generated'} completions):")
    for k in args.k:
        kw = results.get((k, "kwise"))
        for base in ("pairwise", "trl"):
            other = results.get((k, base))
            if kw and other:
                line = f"K={k}: K-wise / {base} = {kw['pairs_per_s'] / other['pairs_per_s']:.2f}x pairs/s"
                if "accuracy" in kw:
                    line += f"; held-out accuracy {kw['accuracy']:.3f} vs {other['accuracy']:.3f}"
                print(line)


if __name__ == "__main__":
    main()
