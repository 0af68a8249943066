"""How well does train-rm's read-out search choose? Its cross-validated choice against the best read-out in hindsight.

    .venv/bin/python bench/readout_choice.py [--preferences sentiment descriptive ...] [--sets pandalm]
        [--limit 120] [--splits 5]

For each preference (the word-list oracles and the human sets of bench/rm_quality.py) and each of `--splits`
train/test splits by prompt (seeds 0..splits-1 of the export's rule, 20% held out), the frozen base model's
features are read once (`reward_model.readout_search.layer_features`, exactly what the search reads), then:
- chosen: `choose_readout` on the TRAINING pairs alone (what `train-rm --readout-layer auto` does), its probe
  refit on every training pair, scored on the held-out pairs;
- hindsight: every candidate read-out's probe (its L2 from the same cross-validation), fitted on all training
  pairs and scored on the held-out pairs; the best of them is the ceiling a perfect choice would reach;
- fixed: the former default read-out, the completion mean a third of the way up.
It prints per preference the mean held-out accuracy of each, how often the choice is the hindsight best, and the
mean gap. Only frozen probes are trained here (no LoRA), so a preference costs one forward pass.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from prepare_human_preferences import SETS as HUMAN_SETS  # noqa: E402
from prepare_human_preferences import human_rankings  # noqa: E402
from rm_quality import cached_tasks, oracle_rankings  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--preferences", nargs="*",
                        default=["sentiment", "descriptive", "on_topic", "formality", "length", "alliteration"])
    parser.add_argument("--sets", nargs="*", choices=sorted(HUMAN_SETS), default=["pandalm"])
    parser.add_argument("--limit", type=int, default=None, help="first N prompts of each source")
    parser.add_argument("--splits", type=int, default=5, help="train/test splits by prompt (seeds 0..N-1)")
    parser.add_argument("--k", type=int, default=4)
    args = parser.parse_args()

    import torch

    from reward_model.model import encode_sample_ids
    from reward_model.readout_search import candidate_layers, choose_readout, fit_bradley_terry, layer_features
    from rlhf.models import load_causal_lm, load_tokenizer
    from rlhf.oracles import load_oracle
    from rlhf.pairs import pair_indices, pairwise_accuracy

    print(f"uptime: {os.popen('uptime').read().strip()}")
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if "model name" in line), "?")
    print(f"cpu: {cpu}")
    tokenizer = load_tokenizer(args.model)
    lm = load_causal_lm(args.model, dtype=torch.float32).eval()
    depth = lm.config.num_hidden_layers
    layers = candidate_layers(depth)
    fixed = (round(0.33 * depth), "mean")

    def rows_for(name, seed):
        if name in HUMAN_SETS:
            return human_rankings(name, 0.2, seed, limit=args.limit)
        return oracle_rankings(cached_tasks(args.model, args.k, 32, limit=args.limit), load_oracle(name), 0.2, seed)

    print(f"| preference | pairs (train/test, split 0) | chosen | fixed (mean@{fixed[0]}) | best in hindsight | "
          f"chosen = hindsight best | chosen read-outs |")
    print("|---|---|---|---|---|---|---|")
    read: dict[tuple, tuple] = {}  # the oracles share their texts: one forward pass for all of them
    for name in args.preferences + args.sets:
        all_rows = rows_for(name, 0)
        source = all_rows if name in HUMAN_SETS else cached_tasks(args.model, args.k, 32, limit=args.limit)
        texts = tuple(sorted({(r["prompt"], c["text"]) for r in source for c in r["completions"]}))
        if name in HUMAN_SETS or "oracles" not in read:
            samples = [encode_sample_ids(tokenizer, p, c, 512) for p, c in texts]
            features = layer_features(lm, samples, layers, tokenizer.pad_token_id, batch_size=16)
            read[name if name in HUMAN_SETS else "oracles"] = ({key: i for i, key in enumerate(texts)}, features)
        index, features = read[name if name in HUMAN_SETS else "oracles"]
        chosen_acc, fixed_acc, best_acc, matches, picks = [], [], [], 0, []
        sizes = None
        for seed in range(args.splits):
            rows = rows_for(name, seed)
            pairs = {"train": [], "test": []}
            for r in rows:
                ids = [index[(r["prompt"], c["text"])] for c in r["completions"]]
                for b, w in pair_indices([c["rank"] for c in r["completions"]]):
                    if ids[b] != ids[w]:
                        pairs[r["split"]].append((ids[b], ids[w], r["prompt"]))
            sizes = sizes or (len(pairs["train"]), len(pairs["test"]))
            choice = choose_readout(features, [(b, w) for b, w, _ in pairs["train"]],
                                    [p for _, _, p in pairs["train"]], layers, depth)
            test_b = torch.tensor([b for b, _, _ in pairs["test"]])
            test_w = torch.tensor([w for _, w, _ in pairs["test"]])
            train_b = torch.tensor([b for b, _, _ in pairs["train"]])
            train_w = torch.tensor([w for _, w, _ in pairs["train"]])
            held_out = {}
            for c in choice.candidates:
                layer = c.layer or depth
                column = 2 * layers.index(layer) + (0 if c.pool == "mean" else 1)
                x = features[:, column]
                scale = x.std(0).clamp(min=1e-6)
                w = fit_bradley_terry((x[train_b] - x[train_w]) / scale, c.l2)
                held_out[(layer, c.pool)] = pairwise_accuracy((((x[test_b] - x[test_w]) / scale) @ w).tolist())
            pick = (choice.readout.layer or depth, choice.readout.pool)
            picks.append(f"{pick[1]}@{pick[0]}")
            chosen_acc.append(held_out[pick])
            fixed_acc.append(held_out.get(fixed, float("nan")))
            best = max(held_out.values())
            best_acc.append(best)
            matches += held_out[pick] == best
        chosen_mean, best_mean = statistics.fmean(chosen_acc), statistics.fmean(best_acc)
        print(f"| {name} | {sizes[0]}/{sizes[1]} | {chosen_mean:.3f} | {statistics.fmean(fixed_acc):.3f} | "
              f"{best_mean:.3f} | {matches}/{args.splits} (gap {best_mean - chosen_mean:.3f}) | {', '.join(picks)} |",
              flush=True)
    print(f"uptime: {os.popen('uptime').read().strip()}")


if __name__ == "__main__":
    main()
