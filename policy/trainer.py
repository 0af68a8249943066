"""PPO with a KL penalty to the frozen reference, RLOO and GRPO: the training loop and the updates, in one
readable file (CleanRL's ppo.py style).

    config = PPOConfig(prompts="data/prompts.jsonl", out="runs/ppo", rm="runs/rm")
    summary = train_policy(config)

Each step is numbered as in summarize_from_feedback_details/ppo.py (Huang et al. 2024): 1 sample, 2 score
+ missing-EOS penalty, 3 logprobs / reference logprobs / values (those three in policy/rollout.py), 4 per-token
KL reward, 5 GAE + whitening, 6 PPO epochs, 7 log. GRPO replaces 4-5 by group-normalised scores (its KL is a
loss term); RLOO replaces 4-6 by leave-one-out advantages and one REINFORCE step.

Sources: InstructGPT (Ouyang et al. 2022), Ziegler et al. 2019 ("Fine-tuning LMs from human
preferences": per-token KL penalty, adaptive KL controller), Huang et al. 2024 ("The N implementation
details of RLHF with PPO": logprobs at the sampling temperature, reward on the last real token, penalty
for responses without EOS, advantages whitened and computed once, clipped value loss), Ahmadian et al.
2024 ("Back to basics": RLOO), Shao et al. 2024 (DeepSeekMath: GRPO), Liu et al. 2025 ("Understanding
R1-Zero-like training": Dr. GRPO).

Where this code departs from the papers:
- KL estimator: the per-token penalty is k1 = log pi - log pi_ref by default, as in the papers; k2 and k3
  (Schulman 2020) are options, and GRPO puts k3 (or k2) in the loss, as Shao et al.
- Early stop on KL: a step's PPO/GRPO epochs end when KL(pi_old || pi) of the next minibatch exceeds
  `stop_kl` (OpenAI's Spinning Up); Huang et al. and TRL run every epoch.
- The critic reads a third of the depth (`critic_layer`; the papers' critic is a full model), which makes a
  PPO step 0.80x as long (bench/ppo_step.py). It is initialised from the RM (InstructGPT, Ziegler et al.)
  only when the RM reads that layer's last token as the critic does; the default RM reads a mean, and the
  critic then starts fresh with a zero value head.
- Value coefficient 0.1 (TRL, Huang et al.) where InstructGPT trains a separate value model: actor and critic
  are separate adapters, and Adam's steps barely depend on a loss's scale, so it mostly sets the critic's
  weight in the gradient-norm clip they share.
- LoRA roles on one base model (policy/roles.py): actor and critic are LoRA adapters on the frozen SFT
  model, the reference is that model with the adapters off, the RM a frozen adapter; the papers train full
  copies.
"""

from __future__ import annotations

import logging
import math
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from policy import core
from policy.config import RESUME_KEYS, PPOConfig
from policy.evaluate import append_eval_samples, evaluate, write_side_by_side
from policy.export import merge_policy
from policy.roles import ACTOR, CRITIC, build_roles, save_actor
from policy.rollout import Rollout, reward_function, rollout
from rlhf.errors import UserError
from rlhf.hardware import setup_compute
from rlhf.run import PromptSampler, finish, open_run, resume_settings, run_accelerator
from rlhf.seeds import MINIBATCH_ORDER, SAMPLING, derived_seed, seeded_generator

log = logging.getLogger(__name__)


def split_prompts(config: PPOConfig) -> tuple[list[str], list[str]]:
    """(train prompts, held-out eval prompts): `eval_prompts` when given, else the prompts that
    `split_by_prompt` holds out (the export's rule, so a demo's RL evaluation never sees a labeled prompt)."""
    from rlhf.prompts import read_prompts, split_by_prompt

    prompts = [p for _, p in read_prompts(config.prompts)]
    if config.eval_prompts:
        held_out = [p for _, p in read_prompts(config.eval_prompts)]
    elif config.eval_fraction > 0 and len(set(prompts)) > 1:
        test = split_by_prompt(prompts, config.eval_fraction, config.seed)
        held_out = [p for p in prompts if p in test]
        prompts = [p for p in prompts if p not in test]
    else:
        held_out = prompts
    return prompts, held_out[:config.eval_size]


# ---- the updates (steps 4-6) ----

@dataclass
class Update:
    """What an update computed: its metrics, the gradient steps it skipped (non-finite loss or gradient),
    and pi_old's logprobs and entropy [B, T]: the rollout's, or those of the update's own on-policy pass."""

    metrics: dict[str, float]
    skipped: int
    logprobs: Tensor
    entropy: Tensor


MicroStep = Callable[[Tensor, Tensor, dict], bool]
"""(micro-batch rows, its minibatch's rows, sums) -> whether its loss was finite. It runs its backward pass
whatever the loss (a non-finite loss gives a non-finite gradient, and the step is skipped): under several
processes every backward pass is a collective all-reduce that each process must join."""


def _minibatch_epochs(model, accelerator, optimizer, config: PPOConfig, step: int, batch_size: int,
                      micro_step: MicroStep, epochs: int, minibatch_size: int, micro_batch_size: int,
                      shuffle: bool = True) -> tuple[dict[str, float], int, int]:
    """The epoch / minibatch / micro-batch loop of every update (summarize_from_feedback_details/ppo.py,
    CleanRL's ppo.py): `epochs` passes over the batch in minibatches (reshuffled each pass when `shuffle`),
    one gradient step per minibatch. `micro_step` runs one micro-batch's forward and backward passes (its
    loss weighted so the accumulated gradient equals one pass over the minibatch: memory is bounded by
    `micro_batch_size`, the step unchanged) and adds its weighted statistics to `sums`.

    Several processes: each holds its own batch, and a minibatch is the union of the processes' minibatches
    (`minibatch_size` rows each). Losses and statistics are weighted by their share of that union (see
    `_token_share`), the gradients all-reduced by DDP, and the statistics summed over processes here, so every
    process takes the same decisions from the same numbers.

    Early stopping (`stop_kl`, OpenAI's Spinning Up PPO): each minibatch's forward pass measures
    KL(pi_old || pi) of the policy as it is now, after every earlier step; above `stop_kl` that minibatch's
    step is not taken and the update ends. Returns ({statistic: its mean over the steps taken and the
    stopping measurement, NaN when none}, skipped steps, epochs in which a step was taken)."""
    generator = seeded_generator(config.seed, step, MINIBATCH_ORDER)
    stats: dict[str, list[float]] = defaultdict(list)
    skipped = epochs_run = 0
    for epoch in range(epochs):
        stepped = stop = False
        order = torch.randperm(batch_size, generator=generator) if shuffle else torch.arange(batch_size)
        for start in range(0, batch_size, minibatch_size):
            minibatch = order[start:start + minibatch_size]
            optimizer.zero_grad(set_to_none=True)
            sums: dict[str, float] = defaultdict(float)
            finite = [micro_step(micro, minibatch, sums) for micro in minibatch.split(micro_batch_size)]
            finite, sums = _sum_over_processes(accelerator, all(finite), sums)
            stop = finite and config.stop_kl is not None and sums.get("approx_kl", 0.0) > config.stop_kl
            if stop:
                optimizer.zero_grad(set_to_none=True)
                log.info("step %d: approx KL %.3g > %.3g in epoch %d, stopping the update", step, sums["approx_kl"],
                         config.stop_kl, epoch + 1)
            elif not (finite and _optimizer_step(model, accelerator, optimizer, config)):
                skipped += 1
                continue
            for key, value in sums.items():
                stats[key].append(value)
            if stop:
                break
            stepped = True
        epochs_run += stepped
        if stop:
            break
    means = defaultdict(lambda: math.nan, {key: _mean_of_finite(values) for key, values in stats.items()})
    return means, skipped, epochs_run


def _optimizer_step(model, accelerator, optimizer, config: PPOConfig) -> bool:
    """Clip the accumulated gradients and step; a non-finite gradient skips the update (NaN guard). Under
    several processes the gradients are the all-reduced ones, so every process decides alike."""
    norm = accelerator.clip_grad_norm_(accelerator.unwrap_model(model).trainable_parameters(), config.max_grad_norm)
    if not torch.isfinite(torch.as_tensor(norm)):
        optimizer.zero_grad(set_to_none=True)
        return False
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return True


def _mean_of_finite(values: list[float]) -> float:
    """Mean of the finite values (NaN when there is none): a statistic over the steps an update took."""
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else float("nan")


def _token_share(accelerator, batch: Rollout, micro: Tensor, minibatch: Tensor) -> Tensor:
    """The micro-batch's share of the real tokens of its minibatch, the minibatch taken over all processes
    (weights per-token means)."""
    return batch.mask[micro].sum() / accelerator.reduce(batch.mask[minibatch].sum(), reduction="sum").clamp(min=1)


def _sum_over_processes(accelerator, finite: bool, sums: dict[str, float]) -> tuple[bool, dict[str, float]]:
    """A minibatch's statistics summed over processes (each already weighted by its share of the whole
    minibatch) and whether every process's losses were finite: the same numbers, hence the same early stop
    and the same skips, on every process. One process: as given."""
    if accelerator.num_processes == 1:
        return finite, sums
    keys = sorted(sums)
    local = torch.tensor([float(not finite), *(sums[key] for key in keys)], dtype=torch.float64,
                         device=accelerator.device)
    total = accelerator.reduce(local, reduction="sum").tolist()
    return total[0] == 0, dict(zip(keys, total[1:]))


def ppo_update(model, accelerator, optimizer, batch: Rollout, kl_coef: float, config: PPOConfig,
               step: int) -> Update:
    """PPO: per-token KL reward -> GAE (once, detached) -> whitened advantages -> epochs of the clipped
    policy loss + vf_coef * clipped value loss over shuffled minibatches.

    `model` is the roles as `accelerator.prepare` returned them (DDP-wrapped under several processes); the
    actor and the critic run through its forward (`PolicyRoles.forward`). Under several processes, `batch`
    is this process's share and the update is that of all the processes' rollouts together: advantages are
    whitened over all of them and each loss is weighted by its share of the whole minibatch (the gradient is
    the one-process gradient of the union, up to float rounding)."""
    world = accelerator.num_processes
    # 4. per-token reward: -beta * KL_t on every real token, the score added on the last one
    kl = core.kl_estimate(batch.logprobs, batch.ref_logprobs, config.kl_estimator)
    rewards = core.per_token_rewards(batch.scores, kl, batch.mask, kl_coef)
    # 5. GAE from the rollout's values, once; advantages whitened over the real tokens (Huang et al. 2024)
    advantages, returns = core.compute_gae(rewards, batch.values, batch.mask, config.gamma, config.lam)
    def total(x: Tensor) -> Tensor:  # over every process's rollouts
        return accelerator.reduce(x, reduction="sum")

    advantage_std = core.masked_var(advantages, batch.mask, total=total).sqrt().item()
    advantages = core.masked_whiten(advantages, batch.mask, total=total)
    T = batch.response_length

    def micro_step(micro: Tensor, minibatch: Tensor, sums: dict) -> bool:
        share = _token_share(accelerator, batch, micro, minibatch)
        # loss = pg_loss + vf_coef * vf_loss, backpropagated in two halves (actor, then critic) so only
        # one role's activations are alive at a time: same gradients, half the peak memory. DDP averages the
        # processes' gradients; `* world` turns that average into the sum of their shares.
        logits = model(ACTOR, batch.input_ids[micro], batch.attention_mask[micro], T)
        logp = core.logprobs_from_logits(logits, batch.responses[micro], config.temperature)
        del logits
        pg_loss, pg_stats = core.ppo_policy_loss(logp, batch.logprobs[micro], advantages[micro], batch.mask[micro],
                                                 config.clip_range)
        accelerator.backward(pg_loss * share * world)
        del logp
        new_values = model(CRITIC, batch.input_ids[micro], batch.attention_mask[micro], T)
        vf_loss, vf_stats = core.value_loss(new_values, batch.values[micro], returns[micro], batch.mask[micro],
                                            config.vf_clip)
        accelerator.backward(config.vf_coef * vf_loss * share * world)
        for key, value in (("pg", pg_loss), ("vf", vf_loss), ("approx_kl", pg_stats["approx_kl"]),
                           ("clipfrac", pg_stats["clipfrac"]), ("ratio", pg_stats["ratio"]),
                           ("vf_clipfrac", vf_stats["clipfrac"])):
            sums[key] += value.item() * share.item()
        return bool(torch.isfinite(pg_loss) and torch.isfinite(vf_loss))

    # 6. PPO epochs
    B = batch.responses.shape[0]
    stats, skipped, epochs = _minibatch_epochs(model, accelerator, optimizer, config, step, B, micro_step,
                                               config.ppo_epochs, config.minibatch_size or B, config.micro_batch_size)
    residual = core.masked_var(returns - batch.values, batch.mask)
    explained = 1.0 - (residual / core.masked_var(returns, batch.mask).clamp(min=1e-8)).item()
    return Update({
        "objective/rlhf_reward": (rewards * batch.mask).sum(1).mean().item(),
        "loss/policy": stats["pg"],
        "loss/value": stats["vf"],
        "policy/approx_kl": stats["approx_kl"],
        "policy/clipfrac": stats["clipfrac"],
        "policy/ratio": stats["ratio"],
        "policy/epochs": epochs,
        "policy/advantage_std": advantage_std,
        "val/mean": core.masked_mean(batch.values, batch.mask).item(),
        "val/clipfrac": stats["vf_clipfrac"],
        "val/explained_variance": explained,
    }, skipped, batch.logprobs, batch.entropy)


def rloo_update(model, accelerator, optimizer, batch: Rollout, kl_coef: float, config: PPOConfig,
                step: int = 0) -> Update:
    """RLOO (Ahmadian et al. 2024): reward = score - beta * sum_t (log pi - log pi_ref), i.e. score -
    beta * (CE_ref - CE_pi) of the sampled text (k1, as TRL's RLOOTrainer, whatever `kl_estimator`
    says), leave-one-out baseline over the k samples of each prompt, REINFORCE on the sequence
    logprob: one on-policy gradient step per batch.

    pi_old's logprobs come from this step's own forward pass (the same numbers: nothing has changed since
    sampling), run in micro-batches of whole prompt groups so each group's baseline is complete. `model` and
    several processes: as in `ppo_update` (every process holds the same number of rollouts, so DDP's average
    of the processes' gradients is the gradient of the mean over all of them)."""
    B, T, group = batch.responses.shape[0], batch.response_length, config.rloo_k
    logprobs = torch.full_like(batch.ref_logprobs, math.nan)
    entropy = torch.full_like(batch.ref_logprobs, math.nan)
    rewards, advantages = [], []

    def micro_step(micro: Tensor, minibatch: Tensor, sums: dict) -> bool:
        logits = model(ACTOR, batch.input_ids[micro], batch.attention_mask[micro], T)
        logp = core.logprobs_from_logits(logits, batch.responses[micro], config.temperature)
        # 4-5. sequence reward with the KL penalty, leave-one-out advantages (per prompt group)
        logprobs[micro], entropy[micro] = logp.detach(), core.entropy_from_logits(logits.detach(), config.temperature)
        del logits
        reward = core.sequence_kl_reward(batch.scores[micro], logp.detach(), batch.ref_logprobs[micro],
                                         batch.mask[micro], kl_coef)
        advantage = core.rloo_advantages(reward, group)
        loss = core.rloo_loss((logp * batch.mask[micro]).sum(1), advantage) * (len(micro) / B)
        rewards.append(reward), advantages.append(advantage)
        accelerator.backward(loss)
        sums["pg"] += loss.item() / accelerator.num_processes
        return bool(torch.isfinite(loss))

    # 6. one REINFORCE step over the whole batch
    micro_size = max(group, config.micro_batch_size // group * group)
    stats, skipped, _ = _minibatch_epochs(model, accelerator, optimizer, config, step, B, micro_step, 1, B,
                                          micro_size, shuffle=False)
    advantages = torch.cat(advantages)
    return Update({"objective/rlhf_reward": torch.cat(rewards).mean().item(),
                   "loss/policy": stats["pg"],
                   "policy/advantage_std": advantages.std().item() if len(advantages) > 1 else 0.0},
                  skipped, logprobs, entropy)


def grpo_update(model, accelerator, optimizer, batch: Rollout, kl_coef: float, config: PPOConfig,
                step: int) -> Update:
    """GRPO (Shao et al. 2024): the score of each response, normalised within its prompt's group of
    `grpo_k` samples, is the advantage of all its tokens (computed once, detached; no critic, no KL in
    the reward); `ppo_epochs` passes (mu) of the clipped surrogate plus beta * KL(pi || pi_ref) (k3) as
    a loss term, aggregated as `grpo_loss_norm` says (see `core.grpo_loss`), over shuffled minibatches.

    With one pass and one minibatch (the default) the update is on-policy: the rollout's logprobs are
    this forward pass's numbers (pi_old = pi, ratio 1), so the rollout leaves them to it. `model` and several
    processes: as in `ppo_update` (groups never straddle processes, so the advantages are the same)."""
    B, T, k = batch.responses.shape[0], batch.response_length, config.grpo_k
    world = accelerator.num_processes
    minibatch_size = config.minibatch_size or B
    # 4-5. the group-normalised score is the advantage of every token of the response (no KL in the reward)
    advantages = core.grpo_advantages(batch.scores, k, scale=config.grpo_scale_rewards)
    on_policy = batch.logprobs is None
    if on_policy and (config.ppo_epochs > 1 or minibatch_size < B):
        raise ValueError("GRPO with several passes or minibatches needs the rollout's logprobs (with_logprobs=True)")
    old_logprobs = torch.full_like(batch.ref_logprobs, math.nan) if on_policy else batch.logprobs
    entropy = torch.full_like(batch.ref_logprobs, math.nan) if on_policy else batch.entropy

    def micro_step(micro: Tensor, minibatch: Tensor, sums: dict) -> bool:
        logits = model(ACTOR, batch.input_ids[micro], batch.attention_mask[micro], T)
        logp = core.logprobs_from_logits(logits, batch.responses[micro], config.temperature)
        if on_policy:
            old_logprobs[micro] = logp.detach()
            entropy[micro] = core.entropy_from_logits(logits.detach(), config.temperature)
        del logits
        loss, loss_stats = core.grpo_loss(
            logp, old_logprobs[micro], batch.ref_logprobs[micro], advantages[micro], batch.mask[micro],
            config.clip_range, kl_coef, config.kl_estimator, config.grpo_loss_norm, config.response_length)
        # the minibatch's loss (over all processes) is the weighted sum of its micro-batches' losses; DDP
        # averages the processes' gradients, which `* world` turns into their sum
        token_share = _token_share(accelerator, batch, micro, minibatch).item()
        share = token_share if config.grpo_loss_norm == "token" else len(micro) / (len(minibatch) * world)
        accelerator.backward(loss * (share * world))
        sums["loss"] += loss.item() * share
        sums["pg"] += loss_stats["pg"].item() * share
        for key in ("kl", "approx_kl", "clipfrac", "ratio"):  # per-token means
            sums[key] += loss_stats[key].item() * token_share
        return bool(torch.isfinite(loss))

    # 6. epochs of the clipped surrogate + beta * KL to the reference
    stats, skipped, epochs = _minibatch_epochs(model, accelerator, optimizer, config, step, B, micro_step,
                                               config.ppo_epochs, minibatch_size, config.micro_batch_size,
                                               shuffle=not on_policy)
    groups = batch.scores.view(-1, k)
    return Update({
        "loss/policy": stats["pg"],
        "loss/kl": stats["kl"],
        "loss/total": stats["loss"],
        "policy/approx_kl": stats["approx_kl"],
        "policy/clipfrac": stats["clipfrac"],
        "policy/ratio": stats["ratio"],
        "policy/epochs": epochs,
        "policy/advantage_std": core.grpo_advantages(batch.scores, k, scale=False).std().item(),
        "policy/zero_std_groups": (groups.max(1).values == groups.min(1).values).float().mean().item(),
    }, skipped, old_logprobs, entropy)


UPDATES = {"ppo": ppo_update, "rloo": rloo_update, "grpo": grpo_update}


# ---- the loop ----

def policy_accelerator(config: PPOConfig):
    """The run's Accelerator, with the tracker `report_to` names. Under several processes it wraps the roles
    in DDP, told that a forward pass may leave trainable parameters unused: PPO runs the actor and the critic
    in separate passes (RLOO and GRPO train the actor alone)."""
    from accelerate import DistributedDataParallelKwargs

    return run_accelerator(config.report_to, config.out, kwargs_handlers=[
        DistributedDataParallelKwargs(find_unused_parameters=config.algo == "ppo")])


def _mean_over_processes(accelerator, row: dict[str, Any]) -> dict[str, Any]:
    """A log row's values averaged over processes (each measured its own rollouts, as many on every process),
    the step left as it is; with one process, the row as given."""
    if accelerator.num_processes == 1:
        return row
    keys = [key for key in row if key != "step"]
    local = torch.tensor([float(row[key]) for key in keys], dtype=torch.float64, device=accelerator.device)
    means = accelerator.reduce(local, reduction="mean").tolist()
    return {"step": row["step"], **{key: round(value) if isinstance(row[key], int) else value
                                    for key, value in zip(keys, means)}}


def train_policy(config: PPOConfig) -> dict[str, Any]:
    """Run PPO, RLOO or GRPO as configured; returns a summary (final eval metrics, output paths).

    Under `accelerate launch --num_processes N`, every process samples `batch_size` rollouts of its own share
    of the step's prompts (its own sampling seed), the update is that of all N * batch_size rollouts (DDP
    all-reduces the gradients), and only the main process evaluates and writes files."""
    from reward_model.model import read_meta
    from rlhf.models import eos_token_ids
    from rlhf.oracles import load_oracle
    from rlhf.runlog import start_tracking

    config.check()
    config = replace(config, dtype=setup_compute(config.dtype))  # "auto" -> the dtype this device runs fast
    out = Path(config.out)
    run = open_run(out, config.resume, resume_settings(config, RESUME_KEYS))
    rm_dir = config.rm if config.reward == "rm" else None
    model_name = config.model or (read_meta(rm_dir)["base_model"] if rm_dir else "default")
    train_prompts, eval_prompts = split_prompts(config)
    oracle = load_oracle(config.oracle) if config.oracle else None
    if oracle is None and config.reward != "rm":
        oracle = load_oracle(config.reward)  # the training oracle is also the eval metric

    # ---- derived sizes, computed once ----
    samples_per_prompt = config.samples_per_prompt
    prompts_per_step = config.batch_size // samples_per_prompt
    use_critic = config.algo == "ppo"
    # the update's own forward pass gives the old logprobs when it is a single on-policy step
    with_logprobs = use_critic or (config.algo == "grpo" and (
        config.ppo_epochs > 1 or (config.minibatch_size or config.batch_size) < config.batch_size))

    torch.manual_seed(config.seed)
    accelerator = policy_accelerator(config)
    rank, world, main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    roles, tokenizer = build_roles(model_name, rm_dir, lora_r=config.lora_r, lora_alpha=config.lora_alpha,
                                   dtype=getattr(torch, config.dtype), critic=use_critic,
                                   critic_layer=config.critic_layer, init_actor=config.init_policy)
    eos_ids = eos_token_ids(roles.model, tokenizer)
    reward_fn = reward_function(config, tokenizer)
    params = roles.trainable_parameters() if use_critic else list(roles.parameters_of(ACTOR).values())
    optimizer = torch.optim.Adam(params, lr=config.lr, eps=1e-5)  # eps 1e-5 as in CleanRL / Huang et al.
    # `model`: the roles in DDP under several processes (else the roles themselves); the updates run the actor
    # and the critic through it, sampling, scoring and evaluation use the roles
    model, optimizer = accelerator.prepare(roles, optimizer)
    kl_ctl = (core.AdaptiveKLController(config.kl_coef, config.target_kl, config.kl_horizon)
              if config.target_kl else core.FixedKLController(config.kl_coef))

    state = run.restore(roles.named_trainable(), optimizer)
    if run.resume_from:
        kl_ctl.load_state_dict(state["kl_ctl"])
    start_step = state["step"]
    if main:
        out.mkdir(parents=True, exist_ok=True)
        run.save_config(config)
    start_tracking(accelerator, "rlhf-policy", asdict(config))
    train_log = run.log("train_log.csv", start_step, tracker=accelerator)
    eval_log = run.log("eval.csv", start_step, tracker=accelerator, tracker_prefix="held_out/")
    sampler = PromptSampler(train_prompts, config.seed)

    last_eval: dict[str, Any] = {}

    def run_eval(step: int) -> None:
        if not main:  # the main process evaluates; the others go on to the next rollout
            return
        metrics, rows = evaluate(roles, tokenizer, eval_prompts, config, reward_fn, oracle, eos_ids)
        eval_log.append({"step": step, **metrics})
        last_eval.update(step=step, metrics=metrics, rows=rows)
        append_eval_samples(out / "eval_samples.jsonl", step, rows)
        log.warning("eval step %d: %s", step, " ".join(f"{k}={v:.3g}" for k, v in metrics.items()))

    if start_step == 0 or not eval_log.rows:
        run_eval(start_step)
    started, bad_in_a_row, step, warned_eos = time.time(), 0, start_step, False
    for step in range(start_step + 1, config.steps + 1):
        t0 = time.time()
        # 1-3. sample with the actor; score with the RM (or oracle), minus the missing-EOS penalty; logprobs
        # of the actor and the reference at the sampling temperature, values (policy/rollout.py)
        # (each process its own share of the step's prompts, its own sampling seed: the step's, mixed with its rank)
        sampling_seed = derived_seed(derived_seed(config.seed, step, SAMPLING), rank, world)
        batch = rollout(roles, tokenizer, sampler.batch(step - 1, prompts_per_step, rank, world), samples_per_prompt,
                        config, reward_fn, eos_ids, generator_seed=sampling_seed, with_values=use_critic,
                        with_logprobs=with_logprobs)
        if accelerator.reduce((~torch.isfinite(batch.raw_scores)).sum(), reduction="sum"):
            raise UserError(f"step {step}: the reward is not finite for some responses (NaN/inf from the "
                            f"{'reward model' if config.reward == 'rm' else 'oracle'})")
        t_rollout = time.time() - t0
        # 4-6. the update: PPO's per-token KL reward, GAE + whitening and epochs; RLOO's or GRPO's
        update = UPDATES[config.algo](model, accelerator, optimizer, batch, kl_ctl.value, config, step)
        # 7. log
        row = {
            "step": step,
            "objective/scores": batch.raw_scores.mean().item(),
            "objective/scores_penalized": batch.scores.mean().item(),
            "objective/kl": (update.logprobs - batch.ref_logprobs).mul(batch.mask).sum(1).mean().item(),
            "objective/kl_coef": kl_ctl.value,
            "policy/entropy": core.masked_mean(update.entropy, batch.mask).item(),
            **update.metrics,
            "response/length": batch.mask.sum(1).float().mean().item(),
            "response/finished": batch.finished.float().mean().item(),
            "time/rollout_s": t_rollout,
            "time/step_s": time.time() - t0,
            "skipped_updates": update.skipped,
        }
        row = _mean_over_processes(accelerator, row)
        if main:
            train_log.append(row)
        if main and config.missing_eos_penalty and row["response/finished"] < 0.5 and not warned_eos:
            warned_eos = True
            log.warning("step %d: only %.0f%% of the responses end with EOS within --response-length %d, so "
                        "--missing-eos-penalty %.3g lowers most scores: the policy learns to stop early more than "
                        "the preference; raise --response-length or turn the penalty off", step,
                        100 * row["response/finished"], config.response_length, config.missing_eos_penalty)
        kl_ctl.update(row["objective/kl"], config.batch_size * world)
        bad_in_a_row = bad_in_a_row + 1 if update.skipped else 0
        if update.skipped:
            log.warning("step %d: skipped %d update(s) with a non-finite loss or gradient", step, update.skipped)
            if bad_in_a_row >= config.max_bad_updates:
                raise UserError(f"non-finite loss or gradient in {bad_in_a_row} steps in a row (last: step "
                                f"{step}); lower --lr or --kl-coef, or check the reward")
        log.info("step %d: score=%.3f kl=%.3f %.1fs", step, row["objective/scores"], row["objective/kl"],
                 row["time/step_s"])
        if main and config.checkpoint_every and step % config.checkpoint_every == 0:
            run.save_checkpoint(step, roles.named_trainable(), optimizer, config=asdict(config),
                                kl_ctl=kl_ctl.state_dict())
        if config.eval_every and step % config.eval_every == 0 and step != config.steps:
            run_eval(step)
        if config.max_steps_time is not None and accelerator.reduce(  # stop together when any process is over
                torch.tensor(float(time.time() - started > config.max_steps_time), device=accelerator.device),
                reduction="sum"):
            log.warning("time budget of %.0f s reached after step %d", config.max_steps_time, step)
            break
    if not main:  # only the main process writes outputs; the others wait for it and return its summary
        return finish(accelerator, None)
    if last_eval.get("step") != step:  # the final evaluation, also the policy side of samples.jsonl
        run_eval(step)
    run.save_checkpoint(step, roles.named_trainable(), optimizer, config=asdict(config), kl_ctl=kl_ctl.state_dict())

    # ---- outputs: the policy, samples side by side with the reference, plots ----
    policy_dir = save_actor(roles, out / "policy", {
        "base_model": model_name, "algo": config.algo, "steps": step, "temperature": config.temperature,
        "response_length": config.response_length, "reward": config.reward, "rm": config.rm})
    ref_metrics, ref_rows = evaluate(roles, tokenizer, eval_prompts, config, reward_fn, oracle, eos_ids,
                                     reference=True)
    write_side_by_side(out / "samples.jsonl", ref_rows, last_eval["rows"])
    plots = write_plots(out / "plots", train_log, eval_log)
    merged = merge_policy(policy_dir, out / "merged") if config.save_merged else None
    return finish(accelerator, {
        "steps": step,
        "final": last_eval["metrics"],
        "reference": ref_metrics,
        "out": str(out),
        "policy": str(policy_dir),
        "merged": str(merged) if merged else None,
        "train_log": str(train_log.path),
        "eval_log": str(eval_log.path),
        "samples": str(out / "samples.jsonl"),
        "eval_samples": str(out / "eval_samples.jsonl"),
        "plots": [str(p) for p in plots],
    })


def write_plots(folder: Path, train_log, eval_log) -> list[Path]:
    """reward_vs_step.png (with the oracle beside the RM score when both are measured), kl_vs_step.png,
    reward_vs_kl.png (each point an evaluation, labelled with its step)."""
    from rlhf.runlog import Panel, plot

    train, evals = train_log.frame, eval_log.frame
    reward_key = next((k for k in ("objective/rm_score", "objective/oracle") if k in evals), None)
    kl_label = "KL to the reference (nats / response)"
    held_out = [(evals, "step", reward_key, "held-out", "o-")] if reward_key else []
    reward = [Panel([(train, "step", "objective/scores", "train (rollouts)", "-"), *held_out], ylabel="reward",
                    title="Reward")]
    if reward_key == "objective/rm_score" and "objective/oracle" in evals:
        reward.append(Panel([(evals, "step", "objective/oracle", None, "o-")], title="Oracle score (held-out)"))
    return [
        plot(folder / "reward_vs_step.png", reward),
        plot(folder / "kl_vs_step.png", [Panel([(train, "step", "objective/kl", "train (rollouts)", "-"),
                                                (evals, "step", "objective/kl", "held-out", "o-")],
                                               ylabel=kl_label, title="KL")]),
        plot(folder / "reward_vs_kl.png", [Panel([(evals, "objective/kl", "objective/rm_score", "reward model", "o-"),
                                                  (evals, "objective/kl", "objective/oracle", "oracle", "o-")],
                                                 xlabel=kl_label, ylabel="held-out score", title="Reward against KL",
                                                 annotate="step")]),
    ]
