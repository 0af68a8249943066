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
import math
import statistics
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from reward_model import data as rmdata
from reward_model.config import RESUME_KEYS, RewardTrainingConfig
from reward_model.evaluate import evaluate_reward_model
from reward_model.loss import length_disentangling_loss, ranking_loss, scale_free_loss
from reward_model.model import (
    Readout,
    RewardModel,
    attach_reward_head,
    num_decoder_layers,
    save_reward_model,
    score_rows,
)
from reward_model.readout_search import search_readout
from rlhf.errors import UserError
from rlhf.hardware import setup_compute
from rlhf.layer_request import resolve_layer
from rlhf.models import load_causal_lm, load_tokenizer
from rlhf.prompts import split_by_prompt
from rlhf.run import EpochBatches, finish, lr_schedule, open_run, progress_bar, resume_settings, run_accelerator
from rlhf.runlog import Panel, plot, start_tracking

log = logging.getLogger(__name__)

KEEP_CHECKPOINTS = 2


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
    correlation = length_correlation([p for p, _ in keys], rewards, [seen[k].completion_length for k in keys])
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
        "length_correlation": correlation,
    }


# ---- starting from an earlier reward model ----

def load_trained_weights(rm: RewardModel, rm_dir: str) -> None:
    """Copy the LoRA weights and the score head of the reward model in `rm_dir` into the fresh `rm`, which must
    have the same LoRA shape and read-out (its reward bias is recomputed after training, as for a fresh one)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    from reward_model.model import load_head, read_meta

    meta = read_meta(rm_dir)
    config = rm.backbone.peft_config["default"]
    if (meta.get("lora_r"), meta.get("lora_alpha", config.lora_alpha)) != (config.r, config.lora_alpha) \
            or Readout.from_meta(meta) != rm.readout:
        raise UserError(f"--init-rm {rm_dir}: its LoRA rank/alpha ({meta.get('lora_r')}/{meta.get('lora_alpha')}) or "
                        f"read-out ({Readout.from_meta(meta)}) differ from this run's ({config.r}/{config.lora_alpha}, "
                        f"{rm.readout})")
    result = set_peft_model_state_dict(rm.backbone, load_file(str(Path(rm_dir) / "adapter_model.safetensors")))
    if result.unexpected_keys:
        raise UserError(f"--init-rm {rm_dir}: its adapter does not fit this base model")
    load_head(rm.score_head, rm_dir)


# ---- choosing the read-out, and when to stop ----

MIN_VALIDATION_PROMPTS = 5
CHECKS_PER_EPOCH = 2  # validation checks: twice per epoch lets one pass over a large set stop half-way
STOP_METRIC = "val_scale_free_loss"  # what the checks minimise (a key of `validation_metrics`): see `scale_free_loss`


def validation_split(examples, fraction: float, seed: int):
    """(fit, validation) examples: `fraction` of the prompts held back by the one prompt-split rule
    (`rlhf.prompts.split_by_prompt`); no validation when that gives fewer than MIN_VALIDATION_PROMPTS prompts."""
    if fraction <= 0:
        return list(examples), []
    held = split_by_prompt({ex.prompt for ex in examples}, fraction, seed)
    if len(held) < MIN_VALIDATION_PROMPTS:
        return list(examples), []
    return [ex for ex in examples if ex.prompt not in held], [ex for ex in examples if ex.prompt in held]


@torch.no_grad()
def validation_metrics(rm: RewardModel, examples, pad_id: int, weighting: str, margin: float,
                       batch_rankings: int) -> dict[str, float]:
    """Over validation examples: `val_loss`, the training loss (each batch weighted by its pairs);
    `val_scale_free_loss`, the same at the rewards' best scale (`scale_free_loss`); `val_accuracy`."""
    was_training = rm.training
    rm.eval()
    device = next(rm.parameters()).device
    loss_sum = right = pairs = 0.0
    diffs, weights = [], []
    try:
        for start in range(0, len(examples), batch_rankings):
            tensors, index = rmdata.collate(examples[start:start + batch_rankings], pad_id, weighting)
            rewards = rm(*(t.to(device) for t in tensors))
            loss, metrics = ranking_loss(rewards, index, margin)
            loss_sum += loss.item() * index.num_pairs
            right += metrics["accuracy"].item() * index.num_pairs
            pairs += index.num_pairs
            diffs.append((rewards[index.better.to(device)] - rewards[index.worse.to(device)]).float().cpu())
            weights.append(index.weight * index.num_pairs)
    finally:
        rm.train(was_training)
    return {"val_loss": loss_sum / pairs, "val_scale_free_loss": scale_free_loss(torch.cat(diffs), torch.cat(weights)),
            "val_accuracy": right / pairs}


def length_correlation(prompts: list[str], rewards: list[float], lengths: list[int]) -> float:
    """Pearson correlation of reward and completion length (tokens) WITHIN prompts: both are centred on their
    prompt's mean first, so it asks whether the model prefers the longer completions of a prompt, not whether
    long-answer prompts score high. 0.0 when undefined (no prompt with two lengths)."""
    groups: dict[str, list[int]] = {}
    for i, prompt in enumerate(prompts):
        groups.setdefault(prompt, []).append(i)
    r_c, l_c = [], []
    for members in groups.values():
        r_mean = statistics.fmean(rewards[i] for i in members)
        l_mean = statistics.fmean(lengths[i] for i in members)
        r_c += [rewards[i] - r_mean for i in members]
        l_c += [lengths[i] - l_mean for i in members]
    denom = (sum(x * x for x in r_c) * sum(y * y for y in l_c)) ** 0.5
    return sum(x * y for x, y in zip(r_c, l_c)) / denom if denom else 0.0


def read_out(config: RewardTrainingConfig, causal_lm, examples, pad_id: int, run, progress: bool):
    """(Readout, ReadoutChoice or None, the search's summary or None): the read-out a resumed run chose before,
    else the one asked for, with the frozen probes' search where a part is "auto" or the head starts from a
    probe."""
    if config.init_rm:  # an earlier model's read-out, which its weights were trained for
        from reward_model.model import read_meta as read_rm_meta

        return Readout.from_meta(read_rm_meta(config.init_rm)), None, None
    if run.resume_from is not None:
        from rlhf.checkpoint import read_meta

        meta = read_meta(run.resume_from)
        if "readout" in meta:
            return Readout(**meta["readout"]), None, meta.get("readout_search")
    layer_request, pool = config.readout_request()
    layer = None if layer_request is None else resolve_layer(layer_request, num_decoder_layers(causal_lm))
    if layer is not None and pool is not None and not config.probe_init:
        return Readout(layer, pool), None, None
    search = search_readout(causal_lm, examples, pad_id, layer, pool, config.seed, config.eval_batch_size, progress)
    if progress:
        print(f"read-out: layer {search.readout.layer or 'last'}, {search.readout.pool} (frozen probes on "
              f"{search.pairs} pairs of {search.prompts} prompts, cross-validated by prompt)\n{search.table()}",
              file=sys.stderr)
    return search.readout, search, search.summary()


# ---- the loop ----

def train_reward_model(config: RewardTrainingConfig, progress: bool = True) -> dict[str, Any]:
    """Train, normalise, save and evaluate a reward model; returns the training summary (also stored in
    OUT/reward_model.json under "training")."""
    config.check()
    started = time.time()
    out = Path(config.out)
    accelerator = run_accelerator(config.report_to, out)
    files = rmdata.find_data(config.data, config.data_split)
    stats = rmdata.DataStats()
    train_examples = rmdata.build_examples(files.train, stats)
    if not train_examples:
        raise UserError(f"{files.train_source}: no usable ranking (every pair was a tie or identical texts)")
    stats.warn(files.train_source)
    files.warn_without_held_out()
    # after the data is read, so that a bad --data is the only line printed
    config = replace(config, dtype=setup_compute(config.dtype))  # "auto" -> the dtype this device runs fast
    run = open_run(out, config.resume, resume_settings(config, RESUME_KEYS, num_train_rankings=len(train_examples)))

    torch.manual_seed(config.seed)
    tokenizer = load_tokenizer(config.model)
    causal_lm = load_causal_lm(config.model, dtype=getattr(torch, config.dtype))
    rmdata.tokenize_examples(train_examples, tokenizer, config.max_length, stats, config.dataset_num_proc)
    fit_examples, val_examples = validation_split(train_examples, config.validation_fraction, config.seed)
    if config.validation_fraction > 0 and not val_examples:
        log.warning("too few prompts for a validation split (%d are needed): training all %d epochs",
                    MIN_VALIDATION_PROMPTS, config.epochs)
    readout, search, search_summary = read_out(config, causal_lm, fit_examples, tokenizer.pad_token_id, run, progress)
    rm = attach_reward_head(causal_lm, readout, config.lora_r, config.lora_alpha, config.lora_dropout)
    if config.init_rm:
        load_trained_weights(rm, config.init_rm)
    elif search is not None and config.probe_init:
        with torch.no_grad():  # linear probing, then fine-tuning (Kumar et al. 2022)
            rm.score_head.weight.copy_(search.head_weight.to(rm.score_head.weight)[None])
    if accelerator.is_main_process:  # the one process that writes; not before the model has loaded
        out.mkdir(parents=True, exist_ok=True)

    # Derived sizes, computed once.
    world = accelerator.num_processes
    rankings_per_step = config.batch_rankings * world
    batches = EpochBatches(len(fit_examples), rankings_per_step, config.seed)
    steps_per_epoch = batches.steps_per_epoch
    total_steps = config.epochs * steps_per_epoch
    check_every = max(1, math.ceil(steps_per_epoch / CHECKS_PER_EPOCH))

    if config.length_decorrelation:
        rm.add_length_head()
    trainable = {name: p for name, p in rm.named_parameters() if p.requires_grad}  # LoRA weights, score head
    heads = [rm.score_head] + ([rm.length_head] if rm.length_head is not None else [])
    params, head = list(trainable.values()), [p for h in heads for p in h.parameters()]
    body = [p for p in params if all(p is not h for h in head)]
    optimizer = torch.optim.AdamW([{"params": body, "lr": config.lr},
                                   {"params": head, "lr": config.lr * config.head_lr_multiplier}], weight_decay=0.0)
    scheduler = lr_schedule(optimizer, total_steps, config.lr_final_fraction)
    # Early stopping keeps the weights of the best validation check; they travel in the checkpoint beside the
    # current ones.
    best = {name: p.detach().cpu().clone() for name, p in trainable.items()}
    saved = {**trainable, **{f"best/{name}": t for name, t in best.items()}}
    state = run.restore(saved, optimizer, scheduler)
    start_step = state["step"]
    stopping = state.get("early_stopping") or {"best_step": 0, "best_loss": None, "checks_since_best": 0}
    model, optimizer = accelerator.prepare(rm, optimizer)
    rm = accelerator.unwrap_model(model)
    device = accelerator.device

    def check(step: int) -> dict[str, float]:
        """One validation check at `step` (steps done): updates the best weights; returns the logged values."""
        metrics = validation_metrics(rm, val_examples, tokenizer.pad_token_id, config.pair_weighting,
                                     config.margin, config.eval_batch_size)
        loss = metrics[STOP_METRIC]
        if stopping["best_loss"] is None or loss < stopping["best_loss"]:
            stopping.update(best_step=step, best_loss=loss, checks_since_best=0)
            for name, p in trainable.items():
                best[name].copy_(p.detach())
        else:
            stopping["checks_since_best"] += 1
        return metrics

    start_tracking(accelerator, "rlhf-reward-model", asdict(config))
    train_log = run.log("train_log.csv", start_step, tracker=accelerator, tracker_prefix="train/")
    if val_examples and start_step == 0:
        stopping["start"] = check(0)  # the probe's head before any update: fine-tuning must beat it
    bar = progress_bar(total_steps, start_step, "train-rm", progress and accelerator.is_main_process)
    last_good = run.resume_from
    steps_run = start_step
    model.train()
    try:
        for step in range(start_step, total_steps):
            if val_examples and stopping["checks_since_best"] >= config.patience:
                break
            epoch, step_in_epoch, step_ids = batches.at(step)
            mine = step_ids[accelerator.process_index::world]
            # a process left without a ranking (the last step of an epoch) scores one at weight 0, so that it
            # still joins DDP's all-reduce
            tensors, index = rmdata.collate([fit_examples[i] for i in mine or step_ids[:1]], tokenizer.pad_token_id,
                                            config.pair_weighting)
            share = step_share(fit_examples, step_ids, mine, config.pair_weighting)
            # through DDP's forward: the gradients are all-reduced
            rewards = model(*(t.to(device) for t in tensors), with_length=config.length_decorrelation)
            if config.length_decorrelation:  # ODIN: rank on r_Q + r_L, decorrelate r_Q from length
                lengths = tensors[2].sum(1)
                extra = length_disentangling_loss(rewards[:, 0], rewards[:, 1], lengths, rm.score_head.weight,
                                                  rm.length_head.weight)
                loss, metrics = ranking_loss(rewards.sum(1), index, config.margin)
                loss = loss + extra
            else:
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
            steps_run = step + 1

            pairs = index.num_pairs if mine else 0  # the step's loss, accuracy and margin over all processes
            total = accelerator.reduce(torch.stack([
                loss.detach() * share, metrics["accuracy"] * pairs, metrics["margin"] * pairs,
                torch.tensor(float(pairs), device=device)]), reduction="sum")
            logged = [total[0].item(), (total[1] / total[3]).item(), (total[2] / total[3]).item(),
                      round(total[3].item())]
            # every process checks the same validation set, so all reach the same decision to stop
            checked = check(step + 1) if val_examples and ((step + 1) % check_every == 0 or step + 1 == total_steps) \
                else {}
            if accelerator.is_main_process:
                train_log.append({
                    "step": step + 1, "epoch": epoch + (step_in_epoch + 1) / steps_per_epoch,
                    "loss": logged[0], "accuracy": logged[1], "margin": logged[2],
                    "grad_norm": float(grad_norm), "lr": scheduler.get_last_lr()[0], "rankings": len(step_ids),
                    "pairs": logged[3], **checked, "seconds": round(time.time() - started, 1)})
            bar.update(1)
            bar.set_postfix(loss=f"{logged[0]:.3f}", acc=f"{logged[1]:.2f}")
            if config.checkpoint_every and (step + 1) % config.checkpoint_every == 0 and step + 1 < total_steps:
                if accelerator.is_main_process:
                    last_good = run.save_checkpoint(step + 1, saved, optimizer, scheduler, asdict(config),
                                                    keep=KEEP_CHECKPOINTS, num_train_rankings=len(train_examples),
                                                    readout=asdict(readout), early_stopping=stopping,
                                                    readout_search=search_summary)
                accelerator.wait_for_everyone()
    finally:
        bar.close()
    if val_examples:  # keep the best check's weights
        with torch.no_grad():
            for name, p in trainable.items():
                p.copy_(best[name].to(p))

    summary: dict[str, Any] = {}
    if accelerator.is_main_process:
        rm.eval()
        norm = reward_normalisation(rm, tokenizer, train_examples, config.eval_batch_size)
        rm.reward_bias.fill_(norm["reward_bias"])
        curves = plot(out / "train_curves.png", [
            Panel([(train_log.frame, "step", key, None, "-")], title=f"train/{key}", smooth=len(train_log.rows) // 20)
            for key in ("loss", "accuracy", "margin")], panel_size=(4, 3.2))
        summary = {
            "steps": steps_run,
            "epochs": round(steps_run / steps_per_epoch, 2),
            "readout": asdict(readout),
            **({"readout_search": search_summary} if search_summary else {}),
            **({"validation": {"rankings": len(val_examples), "best_step": stopping["best_step"],
                               "best_epoch": round(stopping["best_step"] / steps_per_epoch, 2),
                               "best_loss": stopping["best_loss"], "start": stopping.get("start"),
                               "stopped_early": steps_run < total_steps}} if val_examples else {}),
            "data": files.train_source,
            "train_rankings": stats.rankings,
            "train_pairs": stats.pairs,
            "train_completions": stats.completions,
            "identical_pairs_skipped": stats.identical_pairs_skipped,
            "rankings_without_pairs": stats.rankings_without_pairs,
            "empty_completions_kept": stats.empty_completions,
            "truncated_samples": stats.truncated_samples,
            **({f"final_epoch_{key}": float(train_log.rolling_mean(key, steps_per_epoch).iloc[-1])  # the last epoch
                for key in ("loss", "accuracy")} if train_log.rows else {}),
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
        run.drop_checkpoints()  # finished: the model itself is the result
    return finish(accelerator, summary)  # the others wait here for the main process's summary
