"""Reward-model quality, side by side: does `rlhf train-rm` learn preferences, and as well as it could?

    .venv/bin/python bench/rm_quality.py [--preferences sentiment descriptive ...] [--sets qa-feedback pandalm]
        [--methods ours trl probe bow]

For each preference (an oracle from rlhf/oracles.py standing in for noiseless annotators):
1. K completions per prompt of data/prompts.jsonl from the SFT model (generated once, cached in
   $RLHF_BENCH_CACHE or /tmp/rlhf-bench-cache).
2. Ranked by the oracle; equal scores tie (no pair), as `rlhf simulate --noise 0` ranks them. Held out
   by prompt with the export's own rule (`rlhf.prompts.split_by_prompt`, 20% of prompts).
3. Four learners on exactly the same train pairs, evaluated on exactly the same held-out pairs:
   - ours: `train_reward_model` with its defaults (only --epochs, --lr and --lora-r set here);
   - trl: TRL's RewardTrainer (optional: pip install -e ".[bench]") as TRL users run it: LoRA on the same
     modules and rank, the same token ids (our `encode_sample_ids`), the same LoRA lr, epochs and pairs
     per step and backbone dtype, its own defaults otherwise (a score head at the last layer's last
     token, same lr as the LoRA weights, as many epochs as ours trained before its validation stop; its head
     finds the last token by the pad id, which is EOS here, so it reads the token before the final EOS);
   - probe: logistic regression on the difference of the FROZEN base model's hidden states, at several
     layers, at the last token or as the mean over the completion; the read-out is chosen on a
     validation split of the training prompts, then refit on all of them (how much the base model
     already knows);
   - fixed: ours with the read-out fixed at a third of the depth's completion mean, a random head and 8 epochs
     without validation (`FIXED_READOUT`); random-head: ours with its read-out search but a random head (no
     LP-FT); odin: ours with --length-decorrelation;
   - hindsight: the frozen probe whose read-out and L2 score best on the held-out pairs themselves (picked on the
     test set: a ceiling for a frozen read-out, not a method);
   - bow: logistic regression on the difference of bag-of-words counts, L2 chosen the same way (how much
     signal the labels carry for a model-free learner).
Beside the oracles, each `--sets` row is a set of real human labels (bench/prepare_human_preferences.py:
each human comparison a ranking of two, split by prompt with the same rule; `--limit` keeps its first N
prompts), run through the same four learners; the probe's features and the bag of words' vocabulary come
from the set's own texts.
Accuracy counts a reward tie as half right. The +- column is 1.96 standard errors of the held-out
accuracy treating pairs as independent (pairs from one ranking are not, so the real interval is wider: ours
is also given with its interval over the held-out prompts, `reward_model.evaluate.prompt_bootstrap_interval`).
`--learning-curve` adds ours' held-out accuracy against the number of training rankings.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
CACHE = Path(os.environ.get("RLHF_BENCH_CACHE", "/tmp/rlhf-bench-cache"))
from prepare_human_preferences import SETS as HUMAN_SETS  # noqa: E402 (bench/ is on sys.path)
from prepare_human_preferences import human_rankings  # noqa: E402

PROBE_LAYERS = (2, 4, 8, 10, 12, 15, 22, 30)


def cached_tasks(model: str, k: int, max_new_tokens: int, seed: int = 0, limit: int | None = None) -> list[dict]:
    """Generated tasks (K completions per prompt of data/prompts.jsonl), generated once and cached."""
    name = f"tasks-{Path(model).name}-k{k}-t{max_new_tokens}-s{seed}-n{limit or 'all'}.jsonl"
    path = CACHE / name
    if not path.is_file():
        import torch

        from labeling.generate import generate_tasks
        from rlhf.generation import SamplingParams
        from rlhf.jsonl import write_jsonl
        from rlhf.models import load_causal_lm, load_tokenizer
        from rlhf.prompts import read_prompts

        prompts = read_prompts(ROOT / "data" / "prompts.jsonl", limit)
        tokenizer = load_tokenizer(model)
        lm = load_causal_lm(model, dtype=torch.float32).eval()
        started = time.time()
        tasks = generate_tasks(lm, tokenizer, prompts, k, SamplingParams(max_new_tokens=max_new_tokens),
                               model_name=model, seed=seed, batch_size=64)
        count = write_jsonl(path, (t.to_dict() for t in tasks))
        print(f"generated {count} tasks x {k} in {time.time() - started:.0f} s -> {path}", file=sys.stderr)
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def oracle_rankings(tasks: list[dict], oracle, test_fraction: float, seed: int, tie_margin: float = 0.0) -> list[dict]:
    """rankings.jsonl rows ranked by `oracle` (dense ranks, ties equal), split by prompt as the export
    splits; tasks whose completions all tie are left out (no comparison to learn from)."""
    from labeling.simulate import sample_ranks
    from rlhf.prompts import split_by_prompt

    test = split_by_prompt([t["prompt"] for t in tasks], test_fraction, seed)
    rows = []
    for task in tasks:
        scores = [float(oracle(task["prompt"], c["text"])) for c in task["completions"]]
        ranks = sample_ranks(scores, 0.0, tie_margin, random.Random(0))
        if len(set(ranks)) < 2:
            continue
        rows.append({"task_id": task["id"], "annotator": "oracle", "prompt": task["prompt"],
                     "completions": [{"id": c["id"], "text": c["text"], "rank": r}
                                     for c, r in zip(task["completions"], ranks)],
                     "split": "test" if task["prompt"] in test else "train"})
    return rows


def comparisons(rows: list[dict]) -> list[tuple[str, str, str]]:
    """(prompt, better text, worse text) of every non-tied pair of the rows."""
    from rlhf.pairs import pair_indices

    out = []
    for row in rows:
        texts = [c["text"] for c in row["completions"]]
        for b, w in pair_indices([c["rank"] for c in row["completions"]]):
            if texts[b] != texts[w]:
                out.append((row["prompt"], texts[b], texts[w]))
    return out


def accuracy(diffs) -> float:
    """Held-out accuracy of score differences (better minus worse), a tie counting half, as the product counts it."""
    from rlhf.pairs import pairwise_accuracy

    return pairwise_accuracy(diffs)


# ---- ours ----

def run_ours(rows: list[dict], args, out: Path, **overrides) -> dict:
    from reward_model.config import RewardTrainingConfig
    from reward_model.evaluate import evaluate_reward_model
    from reward_model.model import load_reward_model
    from reward_model.train import train_reward_model
    from rlhf.jsonl import write_jsonl

    data = out / "data"
    write_jsonl(data / "rankings.jsonl", rows)
    shutil.rmtree(out / "rm", ignore_errors=True)
    rank = {"lora_r": args.lora_r, "lora_alpha": 2 * args.lora_r} if args.lora_r else {}
    settings = {"epochs": args.epochs, "lr": args.lr, "seed": args.seed, **rank, **overrides}
    config = RewardTrainingConfig(data=str(data), out=str(out / "rm"), model=args.model, checkpoint_every=0,
                                  **{k: v for k, v in settings.items() if v is not None})
    summary = train_reward_model(config, progress=False)
    rm, tokenizer = load_reward_model(out / "rm")  # in its training dtype, as `rlhf eval-rm` loads it
    train = evaluate_reward_model(rm, tokenizer, [r for r in rows if r["split"] == "train"])
    from rlhf.runlog import read_log

    train_seconds = float(read_log(out / "rm" / "train_log.csv")["seconds"].iloc[-1])  # load + steps, as TRL's
    readout = summary["readout"]
    return {"train": train["accuracy"], "test": summary["test_accuracy"], "seconds": train_seconds,
            "test_result": summary["test"], "readout": f"{readout['pool']}@{readout['layer'] or 'last'}",
            "epochs": summary["epochs"], "length_correlation": summary["length_correlation"],
            "by_length": summary["test"].get("by_length")}


# ---- TRL ----

# The read-out and schedule `train-rm` used before it chose them from the data: a third of the depth, the mean over
# the completion, a random head, 8 epochs without a validation split.
FIXED_READOUT = {"readout_layer": "0.33", "readout_pool": "mean", "probe_init": False, "validation_fraction": 0.0,
                 "epochs": 8}


def run_trl(rows: list[dict], args, out: Path, epochs: int) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    from reward_model.config import RewardTrainingConfig
    from reward_model.model import encode_sample_ids
    from rlhf.causal_lm import lora_target_modules, pad_rows
    from rlhf.hardware import resolve_dtype
    from rlhf.models import load_tokenizer, resolve_model

    defaults = RewardTrainingConfig(data="", out="")
    dtype, _ = resolve_dtype(defaults.dtype)
    tok = load_tokenizer(args.model)
    ids = lambda p, t: encode_sample_ids(tok, p, t, defaults.max_length).ids  # noqa: E731
    train = comparisons([r for r in rows if r["split"] == "train"])
    dataset = Dataset.from_dict({"chosen_ids": [ids(p, b) for p, b, _ in train],
                                 "rejected_ids": [ids(p, w) for p, _, w in train]})
    torch.manual_seed(args.seed)
    # The backbone in the same dtype as ours (resolved for this machine); peft keeps the LoRA weights in float32.
    model = AutoModelForSequenceClassification.from_pretrained(resolve_model(args.model), num_labels=1,
                                                               dtype=getattr(torch, dtype))
    model.config.pad_token_id = tok.pad_token_id
    # Pairs per step: ours takes `batch_rankings` rankings, about C(K,2) pairs each, per step.
    per_step = max(1, round(len(train) / max(1, sum(r["split"] == "train" for r in rows)) * defaults.batch_rankings))
    config = RewardConfig(output_dir=str(out / "trl"), per_device_train_batch_size=per_step,
                          learning_rate=args.lr or defaults.lr, num_train_epochs=epochs,
                          logging_steps=10_000, save_strategy="no", report_to="none",
                          max_length=defaults.max_length, dataloader_num_workers=0, bf16=False, disable_tqdm=True,
                          use_cpu=not torch.cuda.is_available(),
                          lr_scheduler_type="cosine", warmup_steps=0, max_grad_norm=1.0, seed=args.seed)
    tok.padding_side = "right"
    r = args.lora_r or defaults.lora_r
    trainer = RewardTrainer(model=model, args=config, train_dataset=dataset, processing_class=tok,
                            peft_config=LoraConfig(r=r, lora_alpha=2 * r, target_modules=lora_target_modules(model),
                                                   task_type="SEQ_CLS", modules_to_save=["score"]))
    started = time.time()
    trainer.train()
    seconds = time.time() - started
    model = trainer.model.eval()

    @torch.no_grad()
    def acc(pairs):
        diffs = []
        for start in range(0, len(pairs), 16):
            chunk = pairs[start:start + 16]
            seqs = [ids(p, b) for p, b, _ in chunk] + [ids(p, w) for p, _, w in chunk]
            input_ids, mask = pad_rows(seqs, tok.pad_token_id, "right")
            scores = model(input_ids=input_ids, attention_mask=mask).logits.squeeze(-1)
            diffs += (scores[:len(chunk)] - scores[len(chunk):]).tolist()
        return accuracy(diffs)

    return {"train": acc(train), "test": acc(comparisons([r for r in rows if r["split"] == "test"])),
            "seconds": seconds}


# ---- frozen-feature probes and bag of words ----

def fit_pairwise_logistic(x, l2: float):
    """w minimising mean(-log sigmoid(x @ w)) + l2 |w|^2 on pair-difference rows x (each row: preferred minus
    other): the Bradley-Terry probe train-rm's read-out search fits (`reward_model.readout_search`)."""
    from reward_model.readout_search import fit_bradley_terry

    return fit_bradley_terry(x, l2)


def logistic_accuracy(x_train, x_eval_sets, l2: float, standardise: bool = True):
    """Fit w on pair-difference features (label: first preferred) and return accuracies on each eval set.
    Hidden states are standardised per dimension; word counts are not (a rare word would be blown up)."""
    import torch

    scale = x_train.abs().mean(0, keepdim=True) + 1e-6 if standardise else torch.ones(1, x_train.shape[1])
    w = fit_pairwise_logistic(x_train / scale, l2)
    return [accuracy(((s / scale) @ w).tolist()) for s in x_eval_sets]


def select_and_fit(features: dict[str, callable], train_rows, test_rows, l2s=(1e-4, 1e-3, 1e-2, 1e-1, 1.0),
                   standardise: bool = True):
    """Choose the feature set and L2 on a validation split of the training prompts (every 5th prompt),
    refit on all training pairs, report (name, train accuracy, held-out accuracy)."""
    import torch

    prompts = sorted({r["prompt"] for r in train_rows})
    val_prompts = set(prompts[::5])
    fit_rows = [r for r in train_rows if r["prompt"] not in val_prompts]
    val_rows = [r for r in train_rows if r["prompt"] in val_prompts]

    def diff(feature, rows):
        pairs = comparisons(rows)
        return torch.stack([feature(p, b) - feature(p, w) for p, b, w in pairs])

    best = None
    for name, feature in features.items():
        for l2 in l2s:
            (val,) = logistic_accuracy(diff(feature, fit_rows), [diff(feature, val_rows)], l2, standardise)
            if best is None or val > best[0]:
                best = (val, name, l2)
    _, name, l2 = best
    train_acc, test_acc = logistic_accuracy(diff(features[name], train_rows),
                                            [diff(features[name], train_rows), diff(features[name], test_rows)], l2,
                                            standardise)
    return name, train_acc, test_acc


def best_in_hindsight(features: dict[str, callable], train_rows, test_rows, l2s=(1e-4, 1e-3, 1e-2, 1e-1, 1.0)):
    """The frozen read-out and L2 whose probe, fitted on all training pairs, scores best on the HELD-OUT pairs:
    what a perfect choice of read-out would reach (name, train accuracy, held-out accuracy)."""
    import torch

    def diff(feature, rows):
        return torch.stack([feature(p, b) - feature(p, w) for p, b, w in comparisons(rows)])

    best = None
    for name, feature in features.items():
        x_train, x_test = diff(feature, train_rows), diff(feature, test_rows)
        for l2 in l2s:
            train_acc, test_acc = logistic_accuracy(x_train, [x_train, x_test], l2)
            if best is None or test_acc > best[2]:
                best = (name, train_acc, test_acc)
    return best


class FrozenFeatures:
    """Hidden states of the frozen base model at PROBE_LAYERS: last token and completion mean, computed
    once per (prompt, completion) and cached on disk."""

    def __init__(self, model: str, tasks: list[dict]):
        import hashlib

        import torch

        digest = hashlib.sha256(json.dumps(tasks, sort_keys=True).encode()).hexdigest()[:12]
        path = CACHE / f"probe-features-{Path(model).name}-{digest}-{'-'.join(map(str, PROBE_LAYERS))}.pt"
        if path.is_file():
            self.table = torch.load(path)
            return
        from reward_model.model import encode_sample_ids, pad_samples
        from rlhf.causal_lm import position_ids_from_mask
        from rlhf.models import load_causal_lm, load_tokenizer

        tok = load_tokenizer(model)
        lm = load_causal_lm(model, dtype=torch.float32).eval()
        keys = [(t["prompt"], c["text"]) for t in tasks for c in t["completions"]]
        keys = list(dict.fromkeys(keys))
        self.table = {}
        with torch.no_grad():
            for start in range(0, len(keys), 32):
                chunk = keys[start:start + 32]
                samples = [encode_sample_ids(tok, p, c, 512) for p, c in chunk]
                ids, mask, comp = pad_samples(samples, tok.pad_token_id)
                out = lm.model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                               output_hidden_states=True)
                weights = comp.float().unsqueeze(-1)
                for layer in PROBE_LAYERS:
                    h = out.hidden_states[layer]
                    mean = (h * weights).sum(1) / weights.sum(1)
                    for j, key in enumerate(chunk):
                        self.table[(key, "last", layer)] = h[j, -1].clone()
                        self.table[(key, "mean", layer)] = mean[j].clone()
        torch.save(self.table, path)

    def features(self) -> dict:
        return {f"{pool}@{layer}": (lambda p, c, pool=pool, layer=layer: self.table[((p, c), pool, layer)])
                for pool in ("last", "mean") for layer in PROBE_LAYERS}


def bag_of_words(tasks: list[dict]):
    import torch

    counts = Counter(w for t in tasks for c in t["completions"] for w in set(re.findall(r"[a-z']+", c["text"].lower())))
    vocab = {w: i for i, (w, n) in enumerate(counts.most_common()) if n >= 2}

    def feature(prompt, text):
        v = torch.zeros(len(vocab))
        for w in re.findall(r"[a-z']+", text.lower()):
            if w in vocab:
                v[vocab[w]] += 1
        return v

    return {"bow": feature}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default", help="SFT model (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--preferences", nargs="*",
                        default=["sentiment", "descriptive", "on_topic", "formality", "length", "alliteration"])
    parser.add_argument("--sets", nargs="*", choices=sorted(HUMAN_SETS), default=list(HUMAN_SETS),
                        help="real human preference sets (bench/prepare_human_preferences.py)")
    parser.add_argument("--methods", nargs="+", default=["ours", "trl", "probe", "bow"])
    parser.add_argument("--k", type=int, default=4, help="completions per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="completion length cap")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N prompts")
    parser.add_argument("--epochs", type=int, default=None, help="default: RewardTrainingConfig's")
    parser.add_argument("--lr", type=float, default=None, help="default: RewardTrainingConfig's")
    parser.add_argument("--lora-r", type=int, default=None, help="LoRA rank of ours and TRL's, alpha 2r "
                        "(default: RewardTrainingConfig's)")
    parser.add_argument("--test-fraction", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--learning-curve", type=int, nargs="*", default=None,
                        help="also train ours on the first N training rankings for each N (first row only)")
    parser.add_argument("--out", default=str(CACHE / "rm_quality"))
    args = parser.parse_args()
    if not args.preferences and not args.sets:
        parser.error("nothing to measure: give --preferences or --sets (or neither, for all)")

    from rlhf.oracles import load_oracle

    print(f"uptime: {os.popen('uptime').read().strip()}")
    methods = list(args.methods)
    if "trl" in methods:
        try:
            import trl  # noqa: F401
        except ImportError:
            methods.remove("trl")
            print("trl is not installed (pip install -e '.[bench]'): TRL column skipped")
    # (row name, rankings rows, the texts its probe features and bag-of-words vocabulary come from)
    benchmarks = []
    if args.preferences:
        tasks = cached_tasks(args.model, args.k, args.max_new_tokens, limit=args.limit)
        benchmarks += [(name, oracle_rankings(tasks, load_oracle(name), args.test_fraction, args.seed), tasks)
                       for name in args.preferences]
    for name in args.sets:
        rows = human_rankings(name, args.test_fraction, args.seed, limit=args.limit)
        benchmarks.append((name, rows, rows))
    frozen_by_source = {}
    table = []
    for name, rows, source in benchmarks:
        train_rows = [r for r in rows if r["split"] == "train"]
        test_rows = [r for r in rows if r["split"] == "test"]
        n_train, n_test = len(comparisons(train_rows)), len(comparisons(test_rows))
        result = {"preference": name, "train_pairs": n_train, "test_pairs": n_test}
        out = Path(args.out) / name
        if "ours" in methods:
            result["ours"] = run_ours(rows, args, out)
            print(f"  ours: read-out {result['ours']['readout']}, {result['ours']['epochs']} epochs, "
                  f"length correlation {result['ours']['length_correlation']:+.2f}", flush=True)
        if "random-head" in methods:
            result["random-head"] = run_ours(rows, args, out / "random-head", probe_init=False)
        if "fixed" in methods:
            result["fixed"] = run_ours(rows, args, out / "fixed", **FIXED_READOUT)
        if "odin" in methods:
            result["odin"] = run_ours(rows, args, out / "odin", length_decorrelation=True)
        if "trl" in methods:
            # As many passes as ours made before its validation stop (TRL has no such stop; its own default is 3).
            epochs = args.epochs or (math.ceil(result["ours"]["epochs"]) if "ours" in result else 3)
            result["trl"] = run_trl(rows, args, out, epochs)
            result["trl"]["epochs"] = epochs
        if "probe" in methods:
            if id(source) not in frozen_by_source:  # one untimed forward pass per source, shared by its rows
                frozen_by_source[id(source)] = FrozenFeatures(args.model, source)
            started = time.time()
            chosen, train_acc, test_acc = select_and_fit(frozen_by_source[id(source)].features(), train_rows,
                                                         test_rows)
            result["probe"] = {"train": train_acc, "test": test_acc, "seconds": time.time() - started,
                               "readout": chosen}
        if "hindsight" in methods:  # picked on the TEST pairs: a ceiling for frozen read-outs, not a method
            if id(source) not in frozen_by_source:
                frozen_by_source[id(source)] = FrozenFeatures(args.model, source)
            started = time.time()
            chosen, train_acc, test_acc = best_in_hindsight(frozen_by_source[id(source)].features(), train_rows,
                                                            test_rows)
            result["hindsight"] = {"train": train_acc, "test": test_acc, "seconds": time.time() - started,
                                   "readout": chosen}
        if "bow" in methods:
            started = time.time()
            _, train_acc, test_acc = select_and_fit(bag_of_words(source), train_rows, test_rows, standardise=False)
            result["bow"] = {"train": train_acc, "test": test_acc, "seconds": time.time() - started}
        ci = 1.96 * math.sqrt(0.25 / max(n_test, 1))
        cells = "  ".join(f"{m} {result[m]['train']:.2f}/{result[m]['test']:.2f} ({result[m]['seconds']:.0f}s)"
                          for m in methods if m in result)
        probe = f"  [probe read-out {result['probe']['readout']}]" if "probe" in result else ""
        interval = result.get("ours", {}).get("test_result", {}).get("accuracy_interval")
        over_prompts = f"  [ours 95% over prompts {interval[0]:.2f}-{interval[1]:.2f}]" if interval else ""
        print(f"{name:12s} {n_train:4d}/{n_test:3d} pairs  +-{ci:.2f}  {cells}{probe}{over_prompts}", flush=True)
        table.append(result)

    print("\n| preference | train / held-out pairs | " + " | ".join(f"{m} train / held-out" for m in methods) + " |")
    print("|---|---|" + "---|" * len(methods))
    for r in table:
        cells = " | ".join(f"{r[m]['train']:.2f} / **{r[m]['test']:.2f}** ({r[m]['seconds']:.0f} s)" if m in r else "-"
                           for m in methods)
        print(f"| {r['preference']} | {r['train_pairs']} / {r['test_pairs']} | {cells} |")
    if "ours" in methods and "trl" in methods:  # the same pairs and epochs: the ratio of training times
        print("ours pairs/s vs TRL's: " + ", ".join(
            f"{r['preference']} {r['trl']['seconds'] / r['ours']['seconds']:.2f}x" for r in table))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "table.json").write_text(json.dumps(table, indent=2, default=str) + "\n", encoding="utf-8")

    if args.learning_curve:
        name, rows, _ = benchmarks[0]
        train_rows = [r for r in rows if r["split"] == "train"]
        test_rows = [r for r in rows if r["split"] == "test"]
        print(f"\nlearning curve ({name}, ours): training rankings -> held-out accuracy")
        for n in args.learning_curve:
            result = run_ours(train_rows[:n] + test_rows, args, Path(args.out) / f"curve-{name}-{n}")
            print(f"  {n:4d} rankings: {result['test']:.3f} ({result['seconds']:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
