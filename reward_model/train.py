"""Training the reward model on rankings: one readable loop (CleanRL style), a config dataclass.

Each step takes `batch_rankings` rankings, scores ALL their completions in one padded forward pass
(K passes' worth per ranking, not 2 per pair) and forms every pair loss from those scores
(InstructGPT, Ouyang et al. 2022, sec. 3.5). After training, the reward is shifted so that the
training completions (samples of the SFT model) have mean reward 0, and the model is evaluated on
the held-out rankings when the data has them.

Written against `accelerate`: on CPU (or one GPU) it runs as a single process; under
`accelerate launch --num_processes N -m pipeline.cli train-rm ...` every process takes its share of
each step's rankings, DDP averages the gradients, and only the main process writes files. Nothing
else changes. Python:

    from reward_model.train import RewardTrainingConfig, train_reward_model
    summary = train_reward_model(RewardTrainingConfig(data="labels/", out="runs/rm"))
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import shutil
import statistics
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from reward_model import data as rmdata
from reward_model.config import RewardTrainingConfig
from reward_model.evaluate import evaluate_reward_model
from reward_model.loss import ranking_loss
from reward_model.model import (
    RewardModel,
    create_reward_model,
    load_head,
    save_reward_model,
    score_rows,
)
from rlhf.errors import UserError

log = logging.getLogger(__name__)

LOG_FIELDS = ["step", "epoch", "loss", "accuracy", "margin", "grad_norm", "lr", "rankings", "pairs", "seconds"]
KEEP_CHECKPOINTS = 2


def lr_factor(step: int, total_steps: int, final_fraction: float) -> float:
    """Cosine decay from 1 to `final_fraction` over the run."""
    progress = min(step / max(total_steps, 1), 1.0)
    return final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * progress))


def _check_config(config: RewardTrainingConfig) -> None:
    positive = {"lora_r": config.lora_r, "epochs": config.epochs, "batch_rankings": config.batch_rankings,
                "max_length": config.max_length, "eval_batch_size": config.eval_batch_size}
    for name, value in positive.items():
        if value < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if config.max_length < 8:
        raise UserError(f"--max-length {config.max_length} is too short to hold a completion")
    if not config.lr > 0:
        raise UserError(f"--lr must be > 0, got {config.lr}")
    if config.margin < 0:
        raise UserError(f"--margin must be >= 0, got {config.margin}")
    if config.checkpoint_every < 0:
        raise UserError("--checkpoint-every must be >= 0")
    if config.readout_pool not in ("last", "mean"):
        raise UserError(f"--readout-pool must be last or mean, got {config.readout_pool!r}")
    if config.pair_weighting not in ("ranking", "pair"):
        raise UserError(f"--pair-weighting must be ranking or pair, got {config.pair_weighting!r}")
    if not config.head_lr_multiplier > 0:
        raise UserError(f"--head-lr-multiplier must be > 0, got {config.head_lr_multiplier}")
    if config.dtype not in ("float32", "bfloat16"):
        raise UserError(f"--dtype must be float32 or bfloat16, got {config.dtype!r}")


# ---- checkpoints: adapter + score head + optimizer + scheduler + step, written atomically ----

def _checkpoint_dirs(out: Path) -> list[tuple[int, Path]]:
    root = out / "checkpoints"
    found = []
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith("step-") and (p / "trainer_state.json").is_file():
                try:
                    found.append((int(p.name[5:]), p))
                except ValueError:
                    continue
    return sorted(found)


# Settings a checkpoint must share with the run that resumes it. The learning rates are among them: the
# optimizer and scheduler state restored from the checkpoint carry the old ones.
_RESUME_KEYS = ("model", "lora_r", "lora_alpha", "batch_rankings", "epochs", "seed", "max_length",
                "readout_layer", "readout_pool", "lr", "head_lr_multiplier", "pair_weighting", "dtype")


def save_checkpoint(out: Path, step: int, rm: RewardModel, optimizer, scheduler, config, num_train: int) -> Path:
    root = out / "checkpoints"
    final = root / f"step-{step}"
    tmp = root / f".step-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_reward_model(rm, tmp, {"base_model": config.model, "max_length": config.max_length,
                                "lora_r": config.lora_r, "checkpoint_step": step})
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "torch_rng": torch.get_rng_state()}, tmp / "optimizer.pt")
    state = {"step": step, "num_train_rankings": num_train, **{k: getattr(config, k) for k in _RESUME_KEYS}}
    (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)  # a kill before this line leaves only a .tmp folder, never a half checkpoint
    for _, old in _checkpoint_dirs(out)[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def find_resume_point(out: Path, config, num_train: int) -> Path | None:
    """The checkpoint a --resume run continues from (checked against this run's settings), or None.

    Without --resume, an output folder holding an unfinished run's checkpoints is refused rather
    than silently overwritten."""
    found = _checkpoint_dirs(out)
    if not config.resume:
        if found:
            raise UserError(f"{out} already holds checkpoints of an unfinished run: pass --resume to continue "
                            f"it, or choose another --out")
        return None
    if not found:
        log.warning("--resume: no checkpoint in %s, starting from step 0", out / "checkpoints")
        return None
    path = found[-1][1]
    state = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
    expected = {"num_train_rankings": num_train, **{k: getattr(config, k) for k in _RESUME_KEYS}}
    for key, value in expected.items():
        if state.get(key) != value:
            raise UserError(f"cannot resume from {path}: it was made with {key}={state.get(key)!r}, "
                            f"this run has {key}={value!r}")
    return path


def load_checkpoint(path: Path, rm: RewardModel, optimizer, scheduler) -> int:
    """Restore a checkpoint into rm/optimizer/scheduler; returns its step."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(rm.backbone, load_file(str(path / "adapter_model.safetensors")))
    load_head(rm.score_head, path)
    saved = torch.load(path / "optimizer.pt", weights_only=False)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    torch.set_rng_state(saved["torch_rng"])
    return json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))["step"]


# ---- logging ----

class TrainLog:
    """train_log.csv, one row per step. On resume, rows past the checkpoint are dropped: those steps
    are redone, so the log never holds a step twice."""

    def __init__(self, path: Path, start_step: int):
        self.path = path
        kept = []
        if start_step and path.is_file():
            with path.open(newline="", encoding="utf-8") as handle:
                kept = [row for row in csv.DictReader(handle) if int(row["step"]) <= start_step]
        self.handle = path.open("w", newline="", encoding="utf-8")
        self.writer = csv.DictWriter(self.handle, fieldnames=LOG_FIELDS)
        self.writer.writeheader()
        self.writer.writerows(kept)
        self.handle.flush()

    def write(self, row: dict[str, Any]) -> None:
        self.writer.writerow(row)
        self.handle.flush()

    def close(self) -> None:
        self.handle.close()


def plot_curves(log_path: Path, png_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with log_path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        return
    steps = [int(r["step"]) for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    for ax, key in zip(axes, ("loss", "accuracy", "margin")):
        ax.plot(steps, [float(r[key]) for r in rows], lw=0.8, alpha=0.5)
        window = max(1, len(rows) // 20)
        if window > 1:
            values = [float(r[key]) for r in rows]
            smooth = [sum(values[max(0, i - window + 1):i + 1]) / len(values[max(0, i - window + 1):i + 1])
                      for i in range(len(values))]
            ax.plot(steps, smooth, lw=1.5)
        ax.set_title(f"train/{key}")
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


# ---- reward normalisation ----

def reward_normalisation(rm: RewardModel, tokenizer, examples, batch_size: int) -> dict[str, float]:
    """Mean reward of the training completions (the SFT model's samples): the bias that gives them
    mean 0 (InstructGPT sec. 3.5). Global, not per prompt: a per-prompt shift would erase the
    differences between prompts that the policy never controls anyway but that the reward still
    reports; the per-prompt spread (std of per-prompt means) is reported so one can see how large
    those differences are."""
    seen: dict[tuple[str, str], list[int]] = {}
    for ex in examples:
        for text, row in zip(ex.texts, ex.rows):
            seen.setdefault((ex.prompt, text), row)
    keys = list(seen)
    rewards = score_rows(rm, [seen[k] for k in keys], tokenizer.pad_token_id, batch_size)
    by_prompt: dict[str, list[float]] = {}
    for (prompt, _), r in zip(keys, rewards):
        by_prompt.setdefault(prompt, []).append(r)
    prompt_means = [statistics.fmean(v) for v in by_prompt.values()]
    return {
        "reward_bias": statistics.fmean(rewards),
        "reward_std": statistics.pstdev(rewards),
        "per_prompt_mean_std": statistics.pstdev(prompt_means) if len(prompt_means) > 1 else 0.0,
        "normalisation_samples": len(rewards),
        "normalisation_prompts": len(prompt_means),
    }


# ---- the loop ----

def train_reward_model(config: RewardTrainingConfig, progress: bool = True) -> dict[str, Any]:
    """Train, normalise, save and evaluate a reward model; returns the training summary (also stored in
    OUT/reward_model.json under "training")."""
    from accelerate import Accelerator
    from tqdm import tqdm

    _check_config(config)
    started = time.time()
    out = Path(config.out)
    accelerator = Accelerator()
    files = rmdata.find_data(config.data)
    stats = rmdata.DataStats()
    train_examples = rmdata.build_examples(files.train, stats)
    if not train_examples:
        raise UserError(f"{files.train_source}: no usable ranking (every pair was a tie or identical texts)")
    stats.warn(files.train_source)
    out.mkdir(parents=True, exist_ok=True)
    resume_from = find_resume_point(out, config, len(train_examples))

    torch.manual_seed(config.seed)
    rm, tokenizer = create_reward_model(config.model, config.lora_r, config.lora_alpha, config.lora_dropout,
                                        dtype=getattr(torch, config.dtype), readout_layer=config.readout_layer,
                                        readout_pool=config.readout_pool)
    rmdata.tokenize_examples(train_examples, tokenizer, config.max_length, stats)

    # Derived sizes, computed once.
    world = accelerator.num_processes
    rankings_per_step = config.batch_rankings * world
    steps_per_epoch = rmdata.steps_per_epoch(len(train_examples), rankings_per_step)
    total_steps = config.epochs * steps_per_epoch

    params = [p for p in rm.parameters() if p.requires_grad]
    head = list(rm.score_head.parameters())
    body = [p for p in params if all(p is not h for h in head)]
    optimizer = torch.optim.AdamW([{"params": body, "lr": config.lr},
                                   {"params": head, "lr": config.lr * config.head_lr_multiplier}], weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, config.lr_final_fraction))
    start_step = load_checkpoint(resume_from, rm, optimizer, scheduler) if resume_from else 0
    model, optimizer = accelerator.prepare(rm, optimizer)
    rm = accelerator.unwrap_model(model)
    device = accelerator.device

    train_log = TrainLog(out / "train_log.csv", start_step) if accelerator.is_main_process else None
    bar = tqdm(total=total_steps, initial=start_step, desc="train-rm", unit="step",
               disable=not (progress and accelerator.is_main_process) or None)
    last_good = resume_from
    model.train()
    order, order_epoch = None, -1
    try:
        for step in range(start_step, total_steps):
            epoch, step_in_epoch = divmod(step, steps_per_epoch)
            if epoch != order_epoch:
                order, order_epoch = rmdata.epoch_order(len(train_examples), config.seed, epoch), epoch
            step_ids = order[step_in_epoch * rankings_per_step:(step_in_epoch + 1) * rankings_per_step]
            mine = step_ids[accelerator.process_index::world] or step_ids[:1]
            tensors, index = rmdata.collate([train_examples[i] for i in mine], tokenizer.pad_token_id,
                                            config.pair_weighting)
            rewards = model(*(t.to(device) for t in tensors))
            loss, metrics = ranking_loss(rewards, index, config.margin)
            if not torch.isfinite(loss):
                where = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was saved yet"
                raise UserError(f"loss is {loss.item()} at step {step + 1}; stopped ({where}); "
                                f"try a lower --lr or --dtype float32")
            accelerator.backward(loss)
            grad_norm = accelerator.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            logged = accelerator.reduce(torch.stack([loss.detach(), metrics["accuracy"], metrics["margin"]]),
                                        reduction="mean")
            if train_log:
                train_log.write({
                    "step": step + 1, "epoch": epoch + (step_in_epoch + 1) / steps_per_epoch,
                    "loss": f"{logged[0].item():.6f}", "accuracy": f"{logged[1].item():.4f}",
                    "margin": f"{logged[2].item():.5f}", "grad_norm": f"{float(grad_norm):.4f}",
                    "lr": f"{scheduler.get_last_lr()[0]:.3e}", "rankings": len(step_ids),
                    "pairs": index.num_pairs, "seconds": f"{time.time() - started:.1f}"})
            bar.update(1)
            bar.set_postfix(loss=f"{logged[0].item():.3f}", acc=f"{logged[1].item():.2f}")
            if config.checkpoint_every and (step + 1) % config.checkpoint_every == 0 and step + 1 < total_steps:
                if accelerator.is_main_process:
                    last_good = save_checkpoint(out, step + 1, rm, optimizer, scheduler, config,
                                                len(train_examples))
                accelerator.wait_for_everyone()
    finally:
        bar.close()
        if train_log:
            train_log.close()

    summary: dict[str, Any] = {}
    if accelerator.is_main_process:
        rm.eval()
        norm = reward_normalisation(rm, tokenizer, train_examples, config.eval_batch_size)
        rm.reward_bias.fill_(norm["reward_bias"])
        plot_curves(out / "train_log.csv", out / "train_curves.png")
        with (out / "train_log.csv").open(newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
        tail = rows[-max(1, min(len(rows), steps_per_epoch)):]  # the last epoch's steps
        summary = {
            "steps": total_steps,
            "epochs": config.epochs,
            "data": files.train_source,
            "train_rankings": stats.rankings,
            "train_pairs": stats.pairs,
            "train_completions": stats.completions,
            "identical_pairs_skipped": stats.identical_pairs_skipped,
            "rankings_without_pairs": stats.rankings_without_pairs,
            "empty_completions_kept": stats.empty_completions,
            "truncated_samples": stats.truncated_samples,
            "final_epoch_loss": statistics.fmean(float(r["loss"]) for r in tail) if tail else None,
            "final_epoch_accuracy": statistics.fmean(float(r["accuracy"]) for r in tail) if tail else None,
            **norm,
            "seconds": round(time.time() - started, 1),
        }
        if files.test:
            result = evaluate_reward_model(rm, tokenizer, files.test, config.max_length, config.eval_batch_size)
            summary["test"] = {"source": files.test_source, **result}
            summary["test_accuracy"] = result.get("accuracy")
        meta = {"base_model": config.model, "max_length": config.max_length, "lora_r": config.lora_r,
                "lora_alpha": config.lora_alpha, "dtype": config.dtype, "config": asdict(config),
                "training": summary}
        save_reward_model(rm, out, meta)
        summary.update(rm_dir=str(out), log=str(out / "train_log.csv"), curves=str(out / "train_curves.png"))
        shutil.rmtree(out / "checkpoints", ignore_errors=True)  # finished: the model itself is the result
    accelerator.wait_for_everyone()
    return summary
