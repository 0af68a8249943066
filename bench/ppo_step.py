"""Seconds per PPO step and peak memory: our one-base layout (actor, critic, reward and reference as LoRA
adapters / adapters-off on ONE SmolLM2-135M in memory) against four separate model copies, same code
path otherwise. Batch 8, 32 new tokens, 4 PPO epochs. Each layout runs in its own subprocess so the
max-RSS peaks do not mix. Layouts: `shared` (the defaults), `shared-bf16` (--dtype bfloat16),
`shared-full-critic` (--critic-layer 0, the papers' full-depth critic), `separate`, `trl`.

    .venv/bin/python bench/ppo_step.py                 # every layout, side by side
    .venv/bin/python bench/ppo_step.py --only shared trl

Where `trl==1.12.0` is installed (pip install trl==1.12.0; it changes neither torch nor
transformers), TRL's PPOTrainer runs as a layout with the same sizes and its own defaults (bf16 autocast,
gradient checkpointing): LoRA policy (reference = adapters off, as TRL does with peft_config), separate
value and reward models (its design). Earlier reference figures for TRL (~27 s/step, 5.3 GB) are printed too.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TRL_SECONDS, TRL_PEAK_GB = 27.0, 5.3  # an earlier measurement of TRL's PPOTrainer on this machine
LAYOUTS = ["shared", "shared-bf16", "shared-full-critic", "separate", "trl"]


class PhaseTimer:
    """Seconds per phase of a step, summed over the timed steps (`on` False during the warm-up step)."""

    def __init__(self):
        self.on, self.seconds = False, {}

    def wrap(self, owner, name: str, phase, *, no_grad_only: bool = False):
        """Time calls of owner.name under `phase` (a label, or a function of the call's args giving one)."""
        import torch

        inner = getattr(owner, name)

        def timed(*args, **kwargs):
            if not self.on or (no_grad_only and torch.is_grad_enabled()):
                return inner(*args, **kwargs)
            t0 = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                label = phase(*args, **kwargs) if callable(phase) else phase
                self.seconds[label] = self.seconds.get(label, 0.0) + time.perf_counter() - t0

        setattr(owner, name, timed)


def separate_roles(model_name: str, rm_dir: str, lora_r: int, lora_alpha: int):
    """The textbook layout: four full model copies (actor, reference, critic, reward), with the same
    interface as policy.roles.PolicyRoles so the trainer's rollout/update code runs unchanged."""
    import torch
    from peft import PeftModel, get_peft_model
    from safetensors.torch import load_file
    from torch import nn

    from policy.config import PPOConfig
    from policy.roles import _lora_config
    from reward_model.model import Readout, first_layers, num_decoder_layers, read_meta, reward_features
    from rlhf.causal_lm import final_hidden_states, lora_target_modules, position_ids_from_mask
    from rlhf.layer_request import resolve_layer
    from rlhf.models import load_causal_lm, load_tokenizer

    class SeparateRoles(nn.Module):
        def __init__(self):
            super().__init__()
            tokenizer = load_tokenizer(model_name)
            base = load_causal_lm(model_name)
            base.requires_grad_(False)
            targets = lora_target_modules(base)
            depth = num_decoder_layers(base)
            self.critic_layer = critic_layer = resolve_layer(PPOConfig.critic_layer, depth, "--critic-layer")
            self.model = get_peft_model(base, _lora_config(targets, lora_r, lora_alpha))
            self.reference = load_causal_lm(model_name).requires_grad_(False).eval()
            # the critic as the shared layout's: a fresh adapter and value head, reading PPOConfig.critic_layer
            self.critic = get_peft_model(load_causal_lm(model_name).requires_grad_(False),
                                         _lora_config(targets, lora_r, lora_alpha, layers=critic_layer)).eval()
            self.reward = PeftModel.from_pretrained(load_causal_lm(model_name), rm_dir).requires_grad_(False).eval()
            head = load_file(str(Path(rm_dir) / "score_head.safetensors"))
            meta = read_meta(rm_dir)
            bias = float(meta.get("reward_bias", 0.0))
            self.rm_readout, self.rm_max_length = Readout.from_meta(meta), int(meta["max_length"])
            hidden = base.config.hidden_size
            self.value_head, self.score_head = nn.Linear(hidden, 1), nn.Linear(hidden, 1).requires_grad_(False)
            with torch.no_grad():
                self.score_head.weight.copy_(head["weight"]), self.score_head.bias.copy_(head["bias"] - bias)
                self.value_head.weight.zero_(), self.value_head.bias.zero_()
            self.model.eval()
            self.tokenizer = tokenizer

        @contextmanager
        def actor(self):
            yield

        def trainable_parameters(self):
            return [p for p in self.parameters() if p.requires_grad]

        def forward(self, role, input_ids, attention_mask, response_length):  # as PolicyRoles.forward
            if role == "critic":
                return self.values(input_ids, attention_mask, response_length)
            return self.response_logits(role, input_ids, attention_mask, response_length)

        def response_logits(self, adapter, input_ids, attention_mask, response_length):
            lm = self.model if adapter is not None else self.reference
            out = lm(input_ids=input_ids, attention_mask=attention_mask,
                     position_ids=position_ids_from_mask(attention_mask), logits_to_keep=response_length + 1,
                     use_cache=False)
            return out.logits[:, :-1]

        def values(self, input_ids, attention_mask, response_length):
            with first_layers(self.critic, self.critic_layer):
                hidden = final_hidden_states(self.critic, input_ids, attention_mask)
            hidden = hidden[:, -response_length - 1:-1]
            return self.value_head(hidden.float()).squeeze(-1)

        @torch.no_grad()
        def scores(self, input_ids, attention_mask, completion_mask):  # as PolicyRoles.scores
            features = reward_features(self.reward, self.rm_readout, input_ids, attention_mask, completion_mask)
            return self.score_head(features).squeeze(-1)

    roles = SeparateRoles()
    return roles, roles.tokenizer


def run_trl(rm_dir: str, steps: int, batch: int, length: int) -> dict:
    """TRL's PPOTrainer, same sizes: batch 8, 32 new tokens, 4 PPO epochs, one minibatch, LoRA policy."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForSequenceClassification, TrainerCallback
    from trl.experimental.ppo import PPOConfig as TRLConfig
    from trl.experimental.ppo import PPOTrainer

    from rlhf.causal_lm import lora_target_modules
    from rlhf.models import format_prompt, load_causal_lm, load_tokenizer, resolve_model
    from rlhf.prompts import read_prompts

    torch.manual_seed(0)
    path = resolve_model("default")
    tokenizer = load_tokenizer("default")
    policy = load_causal_lm("default")
    targets = lora_target_modules(policy)
    value = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)
    reward = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)
    for m in (value, reward):
        m.config.pad_token_id = tokenizer.pad_token_id
    prompts = [p for _, p in read_prompts(ROOT / "data" / "prompts.jsonl")][:batch * steps]
    dataset = Dataset.from_dict({"input_ids": [tokenizer(format_prompt(tokenizer, p), add_special_tokens=False)
                                               ["input_ids"] for p in prompts]})
    out = tempfile.mkdtemp(prefix="trl-ppo-")
    args = TRLConfig(output_dir=out, per_device_train_batch_size=batch, gradient_accumulation_steps=1,
                     num_mini_batches=1, num_ppo_epochs=4, response_length=length, total_episodes=batch * steps,
                     local_rollout_forward_batch_size=batch, num_sample_generations=0, temperature=0.7,
                     stop_token="eos", missing_eos_penalty=1.0, learning_rate=1e-5, report_to=[],
                     save_strategy="no", use_cpu=True, logging_steps=1, seed=0)
    times = [time.perf_counter()]
    import trl.experimental.ppo.ppo_trainer as trl_ppo

    timer = PhaseTimer()
    timer.wrap(trl_ppo, "batch_generation", "generation (+ actor logprobs from its logits)")
    timer.wrap(trl_ppo, "forward", "reference logprobs", no_grad_only=True)
    timer.wrap(trl_ppo, "get_reward", "values + reward (no grad)", no_grad_only=True)

    class StepTimer(TrainerCallback):
        def on_step_end(self, *a, **k):
            times.append(time.perf_counter())
            timer.on = True  # the first step is the warm-up

    trainer = PPOTrainer(args=args, processing_class=tokenizer, model=policy, ref_model=None, reward_model=reward,
                         train_dataset=dataset, value_model=value, callbacks=[StepTimer()],
                         peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=targets))
    times[0] = time.perf_counter()
    trainer.train()
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2
    params = sum(p.numel() for p in {id(p): p for m in (trainer.model, reward) for p in m.parameters()}.values())
    step_s = [b - a for a, b in zip(times, times[1:])]
    split = {k: v / max(steps - 1, 1) for k, v in timer.seconds.items()}
    split["PPO epochs and the rest"] = sum(step_s[1:]) / max(steps - 1, 1) - sum(split.values())
    return {"layout": "trl", "step_s": step_s, "peak_gb": peak_gb, "params_m": params / 1e6, "split": split}


def run_layout(layout: str, rm_dir: str, steps: int, batch: int, length: int) -> dict:
    import torch
    from accelerate import Accelerator

    from policy.config import PPOConfig
    from policy.roles import build_roles
    from policy.rollout import reward_function, rollout
    from policy.trainer import ppo_update
    from rlhf.models import eos_token_ids
    from rlhf.prompts import read_prompts

    torch.manual_seed(0)
    config = PPOConfig(rm=rm_dir, batch_size=batch, response_length=length, ppo_epochs=4, lr=1e-5,
                       stop_kl=None)  # all 4 epochs every step, as in the spec
    import rlhf.generation

    if layout.startswith("shared"):
        dtype = torch.bfloat16 if layout == "shared-bf16" else torch.float32
        critic_layer = 0 if layout == "shared-full-critic" else config.critic_layer
        roles, tokenizer = build_roles("default", rm_dir, lora_r=config.lora_r, lora_alpha=config.lora_alpha,
                                       dtype=dtype, critic_layer=critic_layer)
    else:
        roles, tokenizer = separate_roles("default", rm_dir, config.lora_r, config.lora_alpha)
    optimizer = torch.optim.Adam(roles.trainable_parameters(), lr=config.lr, eps=1e-5)
    accelerator = Accelerator(cpu=True)
    eos = eos_token_ids(roles.model, tokenizer)
    timer = PhaseTimer()
    timer.wrap(rlhf.generation, "sample_batch", "generation")
    timer.wrap(type(roles), "response_logits", lambda self, adapter, *a, **k: "reference logprobs" if adapter is None
               else "actor logprobs (no grad)", no_grad_only=True)
    timer.wrap(type(roles), "values", "values (no grad)", no_grad_only=True)
    reward_fn = reward_function(config, tokenizer)
    holder = type("Holder", (), {"fn": staticmethod(reward_fn)})
    timer.wrap(holder, "fn", "reward")
    prompts = [p for _, p in read_prompts(ROOT / "data" / "prompts.jsonl")]
    times = []
    update_label = "PPO epochs (forward + backward)"
    for step in range(steps):
        timer.on = step > 0  # the first step is the warm-up
        t0 = time.perf_counter()
        batch_prompts = prompts[step * batch:(step + 1) * batch]
        data = rollout(roles, tokenizer, batch_prompts, 1, config, holder.fn, eos, generator_seed=step,
                       with_values=True)
        timer.on, t1 = False, time.perf_counter()
        ppo_update(roles, accelerator, optimizer, data, config.kl_coef, config, step)
        times.append(time.perf_counter() - t0)
        if step > 0:
            timer.seconds[update_label] = timer.seconds.get(update_label, 0.0) + time.perf_counter() - t1
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2  # ru_maxrss is KiB on Linux
    params = sum(p.numel() for p in roles.parameters())
    return {"layout": layout, "step_s": times, "peak_gb": peak_gb, "params_m": params / 1e6,
            "split": {k: v / max(steps - 1, 1) for k, v in timer.seconds.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layout", choices=LAYOUTS, help="run one layout (internal)")
    parser.add_argument("--only", nargs="+", choices=LAYOUTS, help="measure just these layouts")
    parser.add_argument("--rm", help="reward model dir (default: an untrained one on SmolLM2, made once)")
    parser.add_argument("--steps", type=int, default=3, help="PPO steps per layout; the first is warm-up")
    parser.add_argument("--batch-size", type=int, default=8, help="rollouts per step")
    parser.add_argument("--response-length", type=int, default=32, help="new tokens per response")
    args = parser.parse_args()
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if args.layout == "trl":
        print(json.dumps(run_trl(args.rm, args.steps, args.batch_size, args.response_length)))
        return
    if args.layout:
        print(json.dumps(run_layout(args.layout, args.rm, args.steps, args.batch_size, args.response_length)))
        return

    rm_dir = args.rm
    if rm_dir is None:
        from reward_model.model import create_reward_model, save_reward_model

        rm_dir = tempfile.mkdtemp(prefix="ppo-step-rm-")
        rm, _ = create_reward_model("default", lora_r=8)
        save_reward_model(rm, rm_dir, {"base_model": "default", "max_length": 512, "lora_r": 8})
        del rm
    import importlib.util

    layouts = ["shared", "shared-bf16", "separate"] + (["trl"] if importlib.util.find_spec("trl") else [])
    if args.only:
        layouts = args.only
    print(f"uptime: {os.popen('uptime').read().strip()}", flush=True)
    results = []
    for layout in layouts:
        proc = subprocess.run([sys.executable, __file__, "--layout", layout, "--rm", rm_dir, "--steps",
                               str(args.steps), "--batch-size", str(args.batch_size), "--response-length",
                               str(args.response_length)], capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"{layout} failed:\n{proc.stderr[-3000:]}")
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(f"\nPPO step, SmolLM2-135M + LoRA, batch {args.batch_size}, {args.response_length} new tokens, "
          f"4 epochs; {args.steps} steps, first = warm-up, median of the rest\n")
    print("| layout | s / step | peak RSS (GB) | params in memory (M) | s vs TRL (27 s) | memory vs TRL (5.3 GB) |")
    print("|---|---|---|---|---|---|")
    for r in results:
        timed = sorted(r["step_s"][1:] or r["step_s"])
        median = timed[len(timed) // 2]
        r["median"] = median
        print(f"| {r['layout']} | {median:.1f} | {r['peak_gb']:.2f} | {r['params_m']:.0f} | "
              f"{median / TRL_SECONDS:.2f}x | {r['peak_gb'] / TRL_PEAK_GB:.2f}x |")
    by = {r["layout"]: r for r in results}
    if "shared" in by and "separate" in by:
        print(f"\none base vs four copies: {by['shared']['median'] / by['separate']['median']:.2f}x time, "
              f"{by['shared']['peak_gb'] / by['separate']['peak_gb']:.2f}x peak memory")
    if "shared" in by and "trl" in by:
        print(f"one base vs TRL PPOTrainer measured in this run: {by['shared']['median'] / by['trl']['median']:.2f}x "
              f"time, {by['shared']['peak_gb'] / by['trl']['peak_gb']:.2f}x peak memory (targets: <= 0.5x, <= 0.4x)")
    elif "trl" not in by:
        print("TRL PPOTrainer: not installed, not measured in this run (the TRL columns use the earlier figures).")
    print("\ntime split per step (s, mean over the timed steps):")
    for r in results:
        if r.get("split"):
            print(f"  {r['layout']}: " + ", ".join(f"{k} {v:.1f}" for k, v in r["split"].items()))
    if "shared-bf16" in by and "trl" in by:
        print(f"one base in bf16 vs TRL PPOTrainer: {by['shared-bf16']['median'] / by['trl']['median']:.2f}x time, "
              f"{by['shared-bf16']['peak_gb'] / by['trl']['peak_gb']:.2f}x peak memory")
    print(f"uptime: {os.popen('uptime').read().strip()}")
    print("all step times per layout:", {r["layout"]: [round(t, 1) for t in r["step_s"]] for r in results})


if __name__ == "__main__":
    main()
