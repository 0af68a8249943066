"""When should reward-model training stop? Stopping rules replayed on one long run per data set.

    .venv/bin/python bench/rm_stopping.py DATA [DATA ...] [--epochs 6] [--no-probe-init] [--model default] [--out DIR]

Each DATA is what `rlhf train-rm --data` reads (rankings with a held-out test split, e.g. a demo's OUT/pairs or
bench/rm_quality.py's OUT/<preference>/data). `train_reward_model` runs with its defaults (read-out search, probe
start, validation checks twice per epoch) to `--epochs` without stopping, and at every validation check this
script also scores the TEST split, which training never reads. Then each rule is replayed on the logged checks:
the check it would have stopped at (its best check, as training keeps), and that check's test accuracy:

- `val_loss`, patience 3: the plain validation loss;
- `val_scale_free_loss`, patience 3: the validation loss at the rewards' best scale
  (`reward_model.loss.scale_free_loss`);
- `val_accuracy`, patience 3: the validation accuracy (ties between checks keep the earlier);
- `probe`: the start, the chosen read-out's probe before fine-tuning;
- `last`: all `--epochs`, the last weights (no validation).

Printed: the checks (validation metrics and test accuracy) and a row per rule; `uptime` and the CPU before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from reward_model import train as rmtrain  # noqa: E402
from reward_model.config import RewardTrainingConfig  # noqa: E402
from reward_model.data import DataStats, build_examples, find_data, tokenize_examples  # noqa: E402
from rlhf.hardware import cpu_description  # noqa: E402
from rlhf.models import load_tokenizer  # noqa: E402

PATIENCE = 3
RULES = ("val_loss", "val_scale_free_loss", "val_accuracy")


def replay(checks: list[dict], metric: str, patience: int = PATIENCE) -> dict:
    """The check a rule keeps: the best `metric` (lowest loss, highest accuracy) seen until `patience` checks in a
    row bring no improvement."""
    sign = -1 if metric == "val_accuracy" else 1
    best, since = checks[0], 0
    for check in checks[1:]:
        if since >= patience:
            break
        if sign * check[metric] < sign * best[metric]:
            best, since = check, 0
        else:
            since += 1
    return best


def run(data: str, args) -> list[dict]:
    name = Path(data).parent.name + ("" if args.probe_init else "-random-head")
    config = RewardTrainingConfig(data=data, out=str(Path(args.out) / name / "rm"), model=args.model,
                                  epochs=args.epochs, patience=10_000, checkpoint_every=0, probe_init=args.probe_init)
    tokenizer = load_tokenizer(args.model)
    test = build_examples(find_data(data).test, DataStats())
    tokenize_examples(test, tokenizer, config.max_length, DataStats())
    checks: list[dict] = []
    validation_metrics = rmtrain.validation_metrics

    def with_test(rm, examples, pad_id, weighting, margin, batch_rankings):
        metrics = validation_metrics(rm, examples, pad_id, weighting, margin, batch_rankings)
        held_out = validation_metrics(rm, test, pad_id, weighting, margin, batch_rankings)
        checks.append({**metrics, "test_accuracy": held_out["val_accuracy"]})
        print(f"  check {len(checks) - 1}: " + ", ".join(f"{k} {v:.4f}" for k, v in checks[-1].items()), flush=True)
        return metrics

    rmtrain.validation_metrics = with_test
    try:
        summary = rmtrain.train_reward_model(config, progress=False)
    finally:
        rmtrain.validation_metrics = validation_metrics
    for i, check in enumerate(checks):
        check["epoch"] = i / rmtrain.CHECKS_PER_EPOCH
    print(f"  trained {summary['epochs']} epochs; test accuracy of the last weights {summary['test_accuracy']:.3f}")
    return checks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", nargs="+")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--model", default="default")
    parser.add_argument("--out", default="/tmp/rlhf-bench-cache/rm_stopping")
    parser.add_argument("--no-probe-init", dest="probe_init", action="store_false",
                        help="start the score head at random instead of at the chosen read-out's probe")
    args = parser.parse_args()
    print(f"CPU: {cpu_description()}\nuptime before: {os.popen('uptime').read().strip()}", flush=True)
    table = []
    for data in args.data:
        print(f"{data}:", flush=True)
        checks = run(data, args)
        rows = {rule: replay(checks, rule) for rule in RULES}
        rows["probe"], rows["last"] = checks[0], checks[-1]
        table.append({"data": data, "checks": checks, "rules": rows})
        for rule, check in rows.items():
            print(f"  {rule:22s} epoch {check['epoch']:5.2f}  test accuracy {check['test_accuracy']:.3f}", flush=True)
    print(f"\nuptime after: {os.popen('uptime').read().strip()}\n")
    print("| data | " + " | ".join(table[0]["rules"]) + " |")
    print("|---|" + "---:|" * len(table[0]["rules"]))
    for row in table:
        print(f"| {row['data']} | " + " | ".join(f"{c['test_accuracy']:.3f} (ep. {c['epoch']:g})"
                                                  for c in row["rules"].values()) + " |")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "results.json").write_text(json.dumps(table, indent=2))


if __name__ == "__main__":
    main()
