"""Direct preference optimisation (DPO; Rafailov et al. 2023) from the same rankings the reward model
trains on, K-wise, with one readable loop (CleanRL style):

    config = DPOConfig(data="pairs/", out="runs/dpo")
    summary = train_dpo(config)

The loss (Rafailov et al. 2023, eq. 7), for a preferred completion y_w and a worse one y_l of prompt x:

    h(x, y_w, y_l) = [log pi(y_w|x) - log pi_ref(y_w|x)] - [log pi(y_l|x) - log pi_ref(y_l|x)]
    sigmoid: loss = -log sigmoid(beta * h)                   (DPO, Rafailov et al. 2023)
    ipo:     loss = (h - 1 / (2 * beta))^2                   (IPO, Azar et al. 2023, eq. 17; beta is their tau)

where log pi(y|x) is the sum of the completion's token log-probabilities (its EOS included), read with the
chat template as everywhere else in the toolkit (`reward_model.model.encode_sample_ids`). The implicit
reward of a completion is beta * (log pi - log pi_ref) (Rafailov et al. 2023, sec. 5): the `rewards/*`
metrics, named as TRL names them.

K-wise, as the reward model (InstructGPT sec. 3.5; reward_model/loss.py): one ranking of K completions is
one batch element, its K sequence log-probabilities are computed once, and all its C(K,2) pair losses are
taken from those K numbers (ties give no pair; `rlhf.pairs.pair_indices`): K sequences per ranking
where a pairwise trainer runs 2 * C(K,2). A pair from a pairs-only file (TRL's prompt/chosen/rejected) is
a ranking of 2, so such files train as they are.

The policy is the SFT model with a LoRA adapter; the reference is the same base with the adapter disabled
(one copy of the weights, `policy.roles`). Its log-probabilities never change, so they are computed once
before training (and kept in OUT/reference_logps.pt for a resumed run), never during a step.

Where this departs from the papers and TRL:
- Rafailov et al. and TRL take one (chosen, rejected) pair per batch element; here a ranking is one.
  Each comparison weighs the same by default (`pair_weighting`), so the loss equals TRL's on the
  expanded pairs.
- TRL's IPO averages the log-probabilities over the completion's tokens; this follows Azar et al. and
  sums them, as for DPO (a beta for TRL's IPO is not the same beta here).
- LoRA on the SFT model (Rafailov et al. fine-tune every weight, with lr 1e-6); LoRA takes a larger
  learning rate.

Evaluation: on the held-out rankings/pairs (the same `rewards/*` metrics and the loss) and, as the policy
trainer evaluates, on held-out prompts (`policy.evaluate`): KL to the reference, distinct-2, the reward
model's score with `rm`, the oracle's with `oracle`.

This module imports torch only inside functions, so `rlhf --help` stays fast.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from rlhf.config_args import check_fields
from rlhf.errors import UserError
from rlhf.hardware import DtypeName, setup_compute

if TYPE_CHECKING:
    from torch import Tensor

    from reward_model.loss import PairIndex

log = logging.getLogger(__name__)

REFERENCE_CACHE = "reference_logps.pt"
# The default micro-batch's size in completions. The K = 8 demo's 8 rankings (64 completions) in one pass peaked
# at 15.4 GB RSS; as two passes of 32, at 9.1 GB and 1.1x the pairs/s, with the same losses (docs/benchmarks.md,
# "DPO throughput").
COMPLETIONS_PER_PASS = 32
# Settings a checkpoint must share with the run that resumes it (`rlhf.run.open_run`): the data order and the
# optimiser depend on them.
RESUME_KEYS = ("model", "data", "loss", "beta", "pair_weighting", "epochs", "lr", "lr_final_fraction",
                "batch_rankings", "max_length", "lora_r", "lora_alpha", "dtype", "seed", "init_policy")


@dataclass
class DPOConfig:
    """Everything `rlhf dpo` and the demo set. Each field's docstring gives the source of its default."""

    # data and models
    data: str = "pairs"
    """Folder from `rlhf export` (rankings.jsonl; rows marked "split": "test" are held out), else
    train.jsonl/test.jsonl pairs in TRL's prompt/chosen/rejected format; or one such JSONL file."""
    out: str = "runs/dpo"
    """Output folder: train_log.csv, eval.csv, eval_samples.jsonl, samples.jsonl, plots/, policy/, checkpoints/,
    reference_logps.pt."""
    model: str | None = None
    """Base (SFT) model, also the reference; default: the base of `rm` when given, else 'default'
    (SmolLM2-135M-Instruct)."""
    eval_prompts: str | None = None
    """Held-out prompt file for the generation evaluation; default: the prompts of the held-out rankings/pairs."""
    init_policy: str | None = None
    """Start the policy from this policy folder (OUT/policy of `rlhf ppo` or `rlhf dpo`, the same --lora-r and
    --lora-alpha) instead of a fresh adapter; the reference stays the base model."""
    rm: str | None = None
    """Reward model directory (`rlhf train-rm`): when given, held-out samples are also scored by it
    (`objective/rm_score`), so DPO and PPO can be compared on the same scale. DPO itself never reads it."""
    oracle: str | None = None
    """Also score held-out samples with this oracle (e.g. descriptive) as `objective/oracle`."""
    # loss
    loss: Literal["sigmoid", "ipo"] = "sigmoid"
    """"sigmoid": DPO, -log sigmoid(beta * h) (Rafailov et al. 2023, eq. 7); "ipo": (h - 1/(2 beta))^2 (Azar
    et al. 2023, eq. 17), with h the difference of the two policy/reference log-ratios."""
    beta: float = 0.1
    """beta: strength of the implicit KL constraint to the reference (Rafailov et al. 2023 use 0.1-0.5; TRL's
    default 0.1). For "ipo" it is Azar et al.'s tau."""
    pair_weighting: Literal["pair", "ranking"] = "pair"
    """"pair": every comparison weighs the same (TRL on the expanded pairs); "ranking": each ranking weighs
    the same, its comparisons sharing it (InstructGPT's 1/C(K,2)). They differ only when ties remove pairs."""
    # optimisation
    epochs: int = 1
    """Passes over the training rankings (Rafailov et al. 2023 and TRL train one epoch; DPO overfits a small
    preference set quickly, its implicit rewards growing without bound)."""
    lr: float = 1e-4
    """Peak AdamW learning rate of the LoRA weights (Rafailov et al. use 1e-6 for full fine-tuning; LoRA needs
    far larger steps)."""
    lr_final_fraction: float = 0.1
    """Cosine decay to this fraction of `lr` by the end, no warm-up (as `rlhf train-rm`)."""
    batch_rankings: int = 8
    """Rankings per optimiser step; their completions go through the policy once per step."""
    micro_batch_rankings: int | None = None
    """Rankings per forward/backward pass; gradients accumulate up to `batch_rankings`, so this bounds memory
    without changing the update. Default: as many rankings as hold `COMPLETIONS_PER_PASS` completions (the
    whole batch of 8 at K <= 4, 4 rankings at K = 8)."""
    max_length: int = 512
    """Tokens per sample (prompt + completion + EOS); longer prompts are truncated from the left."""
    max_grad_norm: float = 1.0
    """Gradient norm clip (TRL's default)."""
    lora_r: int = 16
    """Rank of the policy's LoRA adapter (as `rlhf ppo`)."""
    lora_alpha: int = 32
    """LoRA alpha (scale = alpha / r)."""
    dtype: DtypeName = "auto"
    """Base weights' dtype (LoRA weights stay float32). auto: bfloat16 where the device computes it natively (a
    GPU with bf16 support, a CPU with AVX-512 BF16 or AMX), float32 elsewhere; float32 keeps the summed
    log-probabilities exact."""
    seed: int = 0
    """Random seed (adapter initialisation, data order, evaluation sampling)."""
    # evaluation
    eval_every: int = 0
    """Evaluate on the held-out pairs and prompts every N steps (0: only after the last step)."""
    eval_size: int = 32
    """Most held-out prompts sampled per evaluation."""
    response_length: int = 48
    """Most new tokens per held-out sample (the generation evaluation only; training reads the given texts)."""
    temperature: float = 0.7
    """Sampling temperature of the held-out samples; their KL to the reference is taken at it too."""
    eval_batch_size: int = 16
    """Sequences per forward pass without gradients (reference log-probabilities, held-out pairs)."""
    # run
    checkpoint_every: int = 50
    """Save a resumable checkpoint every N steps to OUT/checkpoints (0: only at the end)."""
    resume: bool = False
    """Continue from OUT/checkpoints (same settings and data; the cached reference log-probabilities are reused)."""

    def check(self) -> None:
        check_fields(self, positive=("epochs", "batch_rankings", "micro_batch_rankings", "max_length", "lora_r",
                                     "lora_alpha", "eval_size", "response_length", "eval_batch_size"))
        if not (self.beta > 0 and math.isfinite(self.beta)):
            raise UserError(f"--beta must be a finite number > 0, got {self.beta}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise UserError(f"--lr must be a finite number > 0, got {self.lr}")
        if not 0 <= self.lr_final_fraction <= 1:
            raise UserError(f"--lr-final-fraction must be in [0, 1], got {self.lr_final_fraction}")
        if self.max_length < 8:
            raise UserError(f"--max-length {self.max_length} is too short to hold a completion")
        if self.temperature <= 0:
            raise UserError("--temperature must be > 0")
        if self.eval_every < 0 or self.checkpoint_every < 0:
            raise UserError("--eval-every and --checkpoint-every must be >= 0")


# ---- the loss: a pure function of sequence log-probabilities ----

def dpo_loss(policy_logps: Tensor, reference_logps: Tensor, index: PairIndex, beta: float,
             loss_type: str = "sigmoid") -> tuple[Tensor, dict[str, Tensor]]:
    """The K-wise DPO/IPO loss of a batch of rankings whose completions are the rows of `policy_logps`.

    `policy_logps` / `reference_logps` [N]: sequence log-probabilities of the N completions (all the batch's
    rankings, concatenated); `index` (reward_model.loss.build_pair_index) says which rows form each pair and
    how each pair is weighted. Returns the weighted sum of the pair losses and detached metrics in TRL's
    names, means over the pairs: rewards/chosen, rewards/rejected (beta * log-ratio of the preferred / the
    other completion), rewards/accuracies (fraction of pairs with the preferred one's reward higher),
    rewards/margins, logps/chosen, logps/rejected."""
    import torch
    import torch.nn.functional as F

    device = policy_logps.device
    better, worse = index.better.to(device), index.worse.to(device)
    ratios = policy_logps - reference_logps.to(device)          # log pi/pi_ref per completion
    h = ratios[better] - ratios[worse]                          # per pair
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * h)
    elif loss_type == "ipo":
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss {loss_type!r} (expected 'sigmoid' or 'ipo')")
    loss = (losses * index.weight.to(device)).sum()
    with torch.no_grad():
        rewards = beta * ratios.detach()
        chosen, rejected = rewards[better], rewards[worse]
        metrics = {"rewards/chosen": chosen.mean(), "rewards/rejected": rejected.mean(),
                   "rewards/accuracies": (chosen > rejected).float().mean(),
                   "rewards/margins": (chosen - rejected).mean(),
                   "logps/chosen": policy_logps.detach()[better].mean(),
                   "logps/rejected": policy_logps.detach()[worse].mean()}
    return loss, metrics


def micro_batches(batch: Sequence, micro_batch_rankings: int | None) -> list[list]:
    """A step's rankings in forward/backward passes of `micro_batch_rankings` rankings each, or by default of as
    many as hold COMPLETIONS_PER_PASS completions (at least one ranking per pass)."""
    size = micro_batch_rankings or max(1, COMPLETIONS_PER_PASS // max([1, *(len(ex.rows) for ex in batch)]))
    return [list(batch[start:start + size]) for start in range(0, len(batch), size)]


# ---- sequence log-probabilities ----

def completion_logps(roles, adapter: str | None, input_ids: Tensor, attention_mask: Tensor,
                     completion_mask: Tensor) -> Tensor:
    """Sum of the completion tokens' log-probabilities [B] (temperature 1) of LEFT-padded rows laid out as
    `reward_model.model.pad_samples` makes them: the completion (and its EOS) ends every row. Logits are
    computed only at the completion's positions (`PolicyRoles.response_logits`). `adapter` None: the
    reference (every adapter disabled)."""
    from policy import core

    T = int(completion_mask.sum(1).max())
    logits = roles.response_logits(adapter, input_ids, attention_mask, T)
    logp = core.logprobs_from_logits(logits, input_ids[:, -T:], 1.0)
    return (logp * completion_mask[:, -T:].to(logp.dtype)).sum(1)


def row_key(ids: Sequence[int]) -> str:
    """Cache key of one encoded sample: a hash of its token ids."""
    return hashlib.sha1(json.dumps(list(ids)).encode("ascii")).hexdigest()


def logps_without_grad(roles, adapter: str | None, rows: Sequence, pad_id: int, device, batch_size: int,
                       progress: bool = False, desc: str = "") -> list[float]:
    """Sequence log-probabilities of encoded samples (`EncodedSample`), batched by length, in input order."""
    from reward_model.model import map_samples

    return map_samples(partial(completion_logps, roles, adapter), rows, pad_id, device, batch_size,
                       progress=desc if progress else None).tolist()


def reference_logps(roles, examples, pad_id: int, device, batch_size: int, cache_path: Path | None,
                    meta: dict[str, Any], progress: bool = False) -> dict[str, float]:
    """{row_key: log pi_ref} of every completion of `examples`, each distinct sample computed once. A cache
    file written for the same model and max_length is reused (the rows it lacks are computed and added)."""
    import torch

    cached: dict[str, float] = {}
    if cache_path is not None and cache_path.is_file():
        saved = torch.load(cache_path, map_location="cpu", weights_only=True)
        if saved.get("meta") == meta:
            cached = dict(saved["logps"])
    rows = {}
    for ex in examples:
        for row in ex.rows:
            key = row_key(row.ids)
            if key not in cached:
                rows.setdefault(key, row)
    if rows:
        keys = list(rows)
        values = logps_without_grad(roles, None, [rows[k] for k in keys], pad_id, device, batch_size, progress,
                                    desc="reference log-probs")
        cached.update(zip(keys, values))
        if cache_path is not None:
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_path.with_suffix(".tmp")
            torch.save({"meta": meta, "logps": cached}, tmp)
            tmp.replace(cache_path)
    return cached


# ---- evaluation ----

def evaluate_pairs(roles, examples, reference: dict[str, float], config: DPOConfig, pad_id: int,
                   device) -> dict[str, float]:
    """The loss and the `rewards/*`, `logps/*` metrics on held-out rankings/pairs (every pair weighs the same)."""
    import torch

    from policy.roles import ACTOR
    from reward_model.loss import build_pair_index

    if not examples:
        return {}
    unique = {}
    for ex in examples:
        for row in ex.rows:
            unique.setdefault(row_key(row.ids), row)
    keys = list(unique)
    policy = dict(zip(keys, logps_without_grad(roles, ACTOR, [unique[k] for k in keys], pad_id, device,
                                               config.eval_batch_size)))
    flat = [row_key(row.ids) for ex in examples for row in ex.rows]
    index = build_pair_index([ex.pairs for ex in examples], [len(ex.rows) for ex in examples], "pair")
    loss, metrics = dpo_loss(torch.tensor([policy[k] for k in flat]), torch.tensor([reference[k] for k in flat]),
                             index, config.beta, config.loss)
    return {"loss": loss.item(), **{k: v.item() for k, v in metrics.items()}, "pairs": index.num_pairs}


def held_out_prompts(config: DPOConfig, test_examples) -> list[str]:
    """The prompts the generation evaluation samples: `eval_prompts`, else the held-out records' prompts."""
    from rlhf.prompts import read_prompts

    if config.eval_prompts:
        prompts = [p for _, p in read_prompts(config.eval_prompts)]
    else:
        prompts = list(dict.fromkeys(ex.prompt for ex in test_examples))
    return prompts[:config.eval_size]


# ---- the loop ----

def train_dpo(config: DPOConfig, progress: bool = True) -> dict[str, Any]:
    """Train the policy with DPO (or IPO) on rankings or pairs; returns a summary (final held-out metrics,
    the reference's, output paths)."""
    import torch

    from policy.config import PPOConfig
    from policy.evaluate import append_eval_samples, evaluate, write_side_by_side
    from policy.roles import ACTOR, build_roles, save_actor
    from policy.rollout import reward_function
    from reward_model import data as rmdata
    from reward_model.model import read_meta as read_rm_meta
    from rlhf.models import eos_token_ids
    from rlhf.oracles import load_oracle
    from rlhf.run import EpochBatches, lr_schedule, open_run, progress_bar, resume_settings, run_accelerator

    config.check()
    started = time.time()
    out = Path(config.out)
    files = rmdata.find_data(config.data)
    stats = rmdata.DataStats()
    train_examples = rmdata.build_examples(files.train, stats)
    if not train_examples:
        raise UserError(f"{files.train_source}: no usable ranking or pair (every pair was a tie or identical texts)")
    stats.warn(files.train_source)
    files.warn_without_held_out()
    test_examples = rmdata.build_examples(files.test, rmdata.DataStats())
    # after the data is read, so that a bad --data is the only line printed
    config = replace(config, dtype=setup_compute(config.dtype))  # "auto" -> the dtype this device runs fast
    run = open_run(out, config.resume, resume_settings(config, RESUME_KEYS, num_train_rankings=len(train_examples)))
    model_name = config.model or (read_rm_meta(config.rm)["base_model"] if config.rm else "default")
    oracle = load_oracle(config.oracle) if config.oracle else None
    eval_prompts = held_out_prompts(config, test_examples)
    if not eval_prompts:
        log.warning("no held-out prompts (no test split, no --eval-prompts): the generation evaluation is skipped")

    torch.manual_seed(config.seed)
    accelerator = run_accelerator()
    if accelerator.num_processes > 1:
        raise UserError("rlhf dpo runs in one process (one GPU or the CPU); several processes are not supported yet")
    roles, tokenizer = build_roles(model_name, config.rm, lora_r=config.lora_r, lora_alpha=config.lora_alpha,
                                   dtype=getattr(torch, config.dtype), critic=False, init_actor=config.init_policy)
    rmdata.tokenize_examples(train_examples + test_examples, tokenizer, config.max_length, stats)
    pad_id = tokenizer.pad_token_id
    device = accelerator.device
    roles.to(device)

    # The reference never changes: its log-probabilities are computed once, before training.
    t0 = time.time()
    reference = reference_logps(roles, train_examples + test_examples, pad_id, device, config.eval_batch_size,
                                out / REFERENCE_CACHE, {"model": model_name, "max_length": config.max_length,
                                                        "dtype": config.dtype}, progress)
    reference_seconds = time.time() - t0

    batches = EpochBatches(len(train_examples), config.batch_rankings, config.seed)
    steps_per_epoch = batches.steps_per_epoch
    total_steps = config.epochs * steps_per_epoch
    params = list(roles.parameters_of(ACTOR).values())
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    scheduler = lr_schedule(optimizer, total_steps, config.lr_final_fraction)
    start_step = run.restore(roles.named_trainable(), optimizer, scheduler)["step"]
    roles, optimizer = accelerator.prepare(roles, optimizer)
    roles = accelerator.unwrap_model(roles)
    out.mkdir(parents=True, exist_ok=True)
    run.save_config(config)
    train_log = run.log("train_log.csv", start_step)
    eval_log = run.log("eval.csv", start_step)

    # The generation evaluation reuses the policy trainer's (same sampling, KL, distinct-n, scores).
    eval_config = PPOConfig(rm=config.rm, reward="rm" if config.rm else "none", seed=config.seed,
                            response_length=config.response_length, temperature=config.temperature,
                            eval_size=config.eval_size)
    if config.rm:
        reward_fn = reward_function(eval_config, tokenizer)
    else:
        def reward_fn(roles_, prompts, texts, device_):  # no reward model: the samples' "reward" is 0
            return torch.zeros(len(texts), device=device_)
    eos_ids = eos_token_ids(roles.model, tokenizer)
    last_eval: dict[str, Any] = {}

    def run_eval(step: int) -> None:
        metrics = evaluate_pairs(roles, test_examples, reference, config, pad_id, device)
        rows: list[dict] = []
        if eval_prompts:
            generated, rows = evaluate(roles, tokenizer, eval_prompts, eval_config, reward_fn, oracle, eos_ids)
            metrics.update(generated)
            append_eval_samples(out / "eval_samples.jsonl", step, rows)
        eval_log.append({"step": step, **metrics})
        last_eval.update(step=step, metrics=metrics, rows=rows)
        log.warning("eval step %d: %s", step, " ".join(f"{k}={v:.3g}" for k, v in metrics.items()))

    def micro_step(micro, share: float, sums: dict) -> None:
        tensors, index = rmdata.collate(micro, pad_id, config.pair_weighting)
        policy_logps = completion_logps(roles, ACTOR, *(t.to(device) for t in tensors))
        ref = torch.tensor([reference[row_key(row.ids)] for ex in micro for row in ex.rows], device=device)
        loss, metrics = dpo_loss(policy_logps, ref, index, config.beta, config.loss)
        if not torch.isfinite(loss):
            raise UserError(f"the DPO loss is {loss.item()} at step {step + 1}; nothing of this step was applied "
                            f"(try a lower --lr, or --dtype float32)")
        accelerator.backward(loss * share)
        sums["loss"] += loss.item() * share
        for key, value in metrics.items():  # means over the step's pairs
            sums[key] += value.item() * index.num_pairs
        sums["pairs"] += index.num_pairs

    bar = progress_bar(total_steps, start_step, "dpo", progress)
    train_seconds, pairs_seen = 0.0, 0
    step = start_step
    try:
        for step in range(start_step, total_steps):
            t_step = time.time()
            epoch, step_in_epoch, step_ids = batches.at(step)
            batch = [train_examples[i] for i in step_ids]
            total_pairs = sum(len(ex.pairs) for ex in batch)
            sums: dict[str, float] = defaultdict(float)
            for micro in micro_batches(batch, config.micro_batch_rankings):
                # each micro-batch's share of the step's loss, so the accumulated gradient is the whole batch's
                share = (sum(len(ex.pairs) for ex in micro) / total_pairs if config.pair_weighting == "pair"
                         else len(micro) / len(batch))
                micro_step(micro, share, sums)
            grad_norm = accelerator.clip_grad_norm_(params, config.max_grad_norm)
            if not math.isfinite(float(grad_norm)):
                raise UserError(f"the gradient is not finite at step {step + 1}; nothing of this step was applied "
                                f"(try a lower --lr, or --dtype float32)")
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            seconds = time.time() - t_step
            train_seconds += seconds
            pairs_seen += int(sums["pairs"])
            train_log.append({
                "step": step + 1, "epoch": epoch + (step_in_epoch + 1) / steps_per_epoch, "loss": sums["loss"],
                **{k: v / sums["pairs"] for k, v in sums.items() if "/" in k},
                "grad_norm": float(grad_norm), "lr": scheduler.get_last_lr()[0], "rankings": len(batch),
                "pairs": int(sums["pairs"]), "time/step_s": seconds})
            bar.update(1)
            bar.set_postfix(loss=f"{sums['loss']:.3f}", acc=f"{sums['rewards/accuracies'] / sums['pairs']:.2f}")
            if config.checkpoint_every and (step + 1) % config.checkpoint_every == 0 and step + 1 < total_steps:
                run.save_checkpoint(step + 1, roles.named_trainable(), optimizer, scheduler, asdict(config),
                                    num_train_rankings=len(train_examples))
            if config.eval_every and (step + 1) % config.eval_every == 0 and step + 1 < total_steps:
                run_eval(step + 1)
        step = total_steps
    finally:
        bar.close()

    run_eval(step)
    run.save_checkpoint(step, roles.named_trainable(), optimizer, scheduler, asdict(config),
                        num_train_rankings=len(train_examples))
    policy_dir = save_actor(roles, out / "policy", {
        "base_model": model_name, "algo": "dpo", "loss": config.loss, "beta": config.beta, "steps": step,
        "temperature": config.temperature, "response_length": config.response_length, "data": config.data})
    reference_metrics: dict[str, float] = {}
    if eval_prompts:
        reference_metrics, reference_rows = evaluate(roles, tokenizer, eval_prompts, eval_config, reward_fn, oracle,
                                                     eos_ids, reference=True)
        write_side_by_side(out / "samples.jsonl", reference_rows, last_eval["rows"])
    plots = write_plots(out / "plots", train_log, eval_log)
    return {
        "steps": step,
        "epochs": config.epochs,
        "data": files.train_source,
        "train_rankings": stats.rankings,
        "train_pairs": stats.pairs,
        "train_completions": stats.completions,
        "test_pairs": sum(len(ex.pairs) for ex in test_examples),
        "final": last_eval["metrics"],
        "reference": reference_metrics,
        "reference_seconds": round(reference_seconds, 1),
        "train_seconds": round(train_seconds, 1),
        "pairs_per_second": pairs_seen / train_seconds if train_seconds else None,
        "seconds": round(time.time() - started, 1),
        "out": str(out),
        "policy": str(policy_dir),
        "train_log": str(train_log.path),
        "eval_log": str(eval_log.path),
        "samples": str(out / "samples.jsonl") if eval_prompts else None,
        "plots": [str(p) for p in plots],
    }


def write_plots(folder: Path, train_log, eval_log) -> list[Path]:
    """train_curves.png: the loss, rewards/accuracies and rewards/margins per step (smoothed), with the held-out
    evaluations as points."""
    from rlhf.runlog import Panel, plot

    train, evals = train_log.frame, eval_log.frame
    smooth = len(train_log.rows) // 10 if len(train_log.rows) >= 20 else 0
    panels = [Panel([(train, "step", key, "train", "-"), (evals, "step", key, "held-out", "o")], title=key,
                    smooth=smooth) for key in ("loss", "rewards/accuracies", "rewards/margins")]
    return [plot(folder / "train_curves.png", panels, panel_size=(4, 3.2))]
