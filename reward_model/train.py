"""Training the reward model on rankings: one readable loop (CleanRL style), a config dataclass.

Each step takes `batch_rankings` rankings, scores ALL their completions in one padded forward pass
(K passes' worth per ranking, not 2 per pair) and forms every pair loss from those scores
(InstructGPT, Ouyang et al. 2022, sec. 3.5). After training, the reward is shifted so that the
training completions (samples of the SFT model) have mean reward 0, and the model is evaluated on
the held-out rankings when the data has them.

Written against `accelerate`: on CPU (or one GPU) it runs as a single process; under
`accelerate launch --multi_gpu --num_processes N -m pipeline.cli train-rm ...` every process takes its share
of each step's rankings (`batch_rankings` each), weights its loss by that share (`step_share`), DDP averages
the gradients, so the step is the one-process step on all N * batch_rankings rankings; only the main process
writes files. Nothing else changes. Python:

    from reward_model.train import RewardTrainingConfig, train_reward_model
    summary = train_reward_model(RewardTrainingConfig(data="labels/", out="runs/rm"))
"""

from __future__ import annotations

import logging
import shutil
import statistics
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from reward_model import data as rmdata
from reward_model.config import RewardTrainingConfig
from reward_model.evaluate import evaluate_reward_model
from reward_model.loss import ranking_loss
from reward_model.model import RewardModel, create_reward_model, save_reward_model, score_rows
from rlhf.checkpoint import check_resumable, latest_checkpoint, load_checkpoint, save_checkpoint
from rlhf.errors import UserError
from rlhf.hardware import setup_compute
from rlhf.runlog import Panel, RunLog, end_tracking, plot, start_tracking, tracker_options

log = logging.getLogger(__name__)

KEEP_CHECKPOINTS = 2


def lr_schedule(optimizer, total_steps: int, final_fraction: float):
    """Cosine decay from each group's peak learning rate to `final_fraction` of it over the run, no
    warm-up (InstructGPT appendix C.2: down to 10%)."""
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    return get_cosine_with_min_lr_schedule_with_warmup(optimizer, num_warmup_steps=0, num_training_steps=total_steps,
                                                       min_lr_rate=final_fraction)


# ---- checkpoints (rlhf.checkpoint): OUT/checkpoints/step-N, the last 2 kept ----

# Settings a checkpoint must share with the run that resumes it. The learning rates are among them: the
# optimizer and scheduler state restored from the checkpoint carry the old ones.
_RESUME_KEYS = ("model", "lora_r", "lora_alpha", "batch_rankings", "epochs", "seed", "max_length",
                "readout_layer", "readout_pool", "lr", "head_lr_multiplier", "pair_weighting", "dtype")


def find_resume_point(out: Path, config, num_train: int) -> Path | None:
    """The checkpoint a --resume run continues from (checked against this run's settings), or None.

    Without --resume, an output folder holding an unfinished run's checkpoints is refused rather
    than silently overwritten."""
    path = latest_checkpoint(out / "checkpoints")
    if not config.resume:
        if path:
            raise UserError(f"{out} already holds checkpoints of an unfinished run: pass --resume to continue "
                            f"it, or choose another --out")
        return None
    if path is None:
        log.warning("--resume: no checkpoint in %s, starting from step 0", out / "checkpoints")
        return None
    check_resumable(path, {"num_train_rankings": num_train, **{k: getattr(config, k) for k in _RESUME_KEYS}})
    return path


# ---- several processes ----

def step_share(examples, step_ids: list[int], mine: list[int], weighting: str) -> float:
    """This process's share of a step's loss: its rankings' part of the step's weight (their pairs, or with
    `--pair-weighting ranking` the rankings themselves). Each process scales its loss, a weighted mean over its
    own pairs, by share * processes, since DDP averages the processes' gradients: the result is the gradient
    of the whole step's loss, however unevenly the rankings fall on the processes. One process: 1."""
    if weighting == "ranking":
        return len(mine) / len(step_ids)
    return sum(len(examples[i].pairs) for i in mine) / sum(len(examples[i].pairs) for i in step_ids)


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
    from accelerate.utils import broadcast_object_list
    from tqdm import tqdm

    config.check()
    config = replace(config, dtype=setup_compute(config.dtype))  # "auto" -> the dtype this device runs fast
    started = time.time()
    out = Path(config.out)
    # cpu= when there is no GPU: accelerate then runs several launched processes as MULTI_CPU (gloo)
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), **tracker_options(config.report_to, out))
    files = rmdata.find_data(config.data, config.data_split)
    stats = rmdata.DataStats()
    train_examples = rmdata.build_examples(files.train, stats)
    if not train_examples:
        raise UserError(f"{files.train_source}: no usable ranking (every pair was a tie or identical texts)")
    stats.warn(files.train_source)
    if accelerator.is_main_process:  # the one process that writes
        out.mkdir(parents=True, exist_ok=True)
    resume_from = find_resume_point(out, config, len(train_examples))

    torch.manual_seed(config.seed)
    rm, tokenizer = create_reward_model(config.model, config.lora_r, config.lora_alpha, config.lora_dropout,
                                        dtype=getattr(torch, config.dtype), readout_layer=config.readout_layer,
                                        readout_pool=config.readout_pool)
    rmdata.tokenize_examples(train_examples, tokenizer, config.max_length, stats, config.dataset_num_proc)

    # Derived sizes, computed once.
    world = accelerator.num_processes
    rankings_per_step = config.batch_rankings * world
    steps_per_epoch = rmdata.steps_per_epoch(len(train_examples), rankings_per_step)
    total_steps = config.epochs * steps_per_epoch

    trainable = {name: p for name, p in rm.named_parameters() if p.requires_grad}  # LoRA weights, score head
    params, head = list(trainable.values()), list(rm.score_head.parameters())
    body = [p for p in params if all(p is not h for h in head)]
    optimizer = torch.optim.AdamW([{"params": body, "lr": config.lr},
                                   {"params": head, "lr": config.lr * config.head_lr_multiplier}], weight_decay=0.0)
    scheduler = lr_schedule(optimizer, total_steps, config.lr_final_fraction)
    start_step = load_checkpoint(resume_from, trainable, optimizer, scheduler)["step"] if resume_from else 0
    model, optimizer = accelerator.prepare(rm, optimizer)
    rm = accelerator.unwrap_model(model)
    device = accelerator.device

    start_tracking(accelerator, "rlhf-reward-model", asdict(config))
    train_log = RunLog(out / "train_log.csv", resume_step=start_step if resume_from else None, tracker=accelerator,
                       tracker_prefix="train/")
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
            mine = step_ids[accelerator.process_index::world]
            # a process left without a ranking (the last step of an epoch) scores one at weight 0, so that it
            # still joins DDP's all-reduce
            tensors, index = rmdata.collate([train_examples[i] for i in mine or step_ids[:1]], tokenizer.pad_token_id,
                                            config.pair_weighting)
            share = step_share(train_examples, step_ids, mine, config.pair_weighting)
            rewards = model(*(t.to(device) for t in tensors))  # through DDP's forward: the gradients are all-reduced
            loss, metrics = ranking_loss(rewards, index, config.margin)
            if accelerator.reduce((~torch.isfinite(loss)).float(), reduction="sum"):  # every process stops
                where = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was saved yet"
                raise UserError(f"loss is {loss.item()} at step {step + 1}; stopped ({where}); "
                                f"try a lower --lr or --dtype float32")
            accelerator.backward(loss * (share * world))
            grad_norm = accelerator.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            pairs = index.num_pairs if mine else 0  # the step's loss, accuracy and margin over all processes
            total = accelerator.reduce(torch.stack([
                loss.detach() * share, metrics["accuracy"] * pairs, metrics["margin"] * pairs,
                torch.tensor(float(pairs), device=device)]), reduction="sum")
            logged = [total[0].item(), (total[1] / total[3]).item(), (total[2] / total[3]).item(),
                      round(total[3].item())]
            if accelerator.is_main_process:
                train_log.append({
                    "step": step + 1, "epoch": epoch + (step_in_epoch + 1) / steps_per_epoch,
                    "loss": logged[0], "accuracy": logged[1], "margin": logged[2],
                    "grad_norm": float(grad_norm), "lr": scheduler.get_last_lr()[0], "rankings": len(step_ids),
                    "pairs": logged[3], "seconds": round(time.time() - started, 1)})
            bar.update(1)
            bar.set_postfix(loss=f"{logged[0]:.3f}", acc=f"{logged[1]:.2f}")
            if config.checkpoint_every and (step + 1) % config.checkpoint_every == 0 and step + 1 < total_steps:
                if accelerator.is_main_process:
                    last_good = save_checkpoint(out / "checkpoints", step + 1, trainable, optimizer, scheduler,
                                                asdict(config), keep=KEEP_CHECKPOINTS,
                                                num_train_rankings=len(train_examples))
                accelerator.wait_for_everyone()
    finally:
        bar.close()

    summary: dict[str, Any] = {}
    if accelerator.is_main_process:
        rm.eval()
        norm = reward_normalisation(rm, tokenizer, train_examples, config.eval_batch_size)
        rm.reward_bias.fill_(norm["reward_bias"])
        curves = plot(out / "train_curves.png", [
            Panel([(train_log.frame, "step", key, None, "-")], title=f"train/{key}", smooth=len(train_log.rows) // 20)
            for key in ("loss", "accuracy", "margin")], panel_size=(4, 3.2))
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
            **{f"final_epoch_{key}": float(train_log.rolling_mean(key, steps_per_epoch).iloc[-1])  # the last epoch
               for key in ("loss", "accuracy")},
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
        summary.update(rm_dir=str(out), log=str(train_log.path), curves=str(curves))
        shutil.rmtree(out / "checkpoints", ignore_errors=True)  # finished: the model itself is the result
    end_tracking(accelerator)
    return broadcast_object_list([summary])[0]  # the others wait here for the main process's summary
