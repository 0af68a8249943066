"""PPOConfig: every setting of `rlhf ppo` with its default (kept free of torch so `rlhf --help` is fast)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from rlhf.config_args import check_fields
from rlhf.errors import UserError
from rlhf.hardware import DtypeName
from rlhf.layer_request import check_layer_request

GrpoLossNorm = Literal["sequence", "token", "constant"]  # see policy.core.grpo_loss
GRPO_LOSS_NORMS = get_args(GrpoLossNorm)
# Defaults that depend on the algorithm, filled in where a field is left at None (see each field).
ALGO_DEFAULTS = {
    "ppo": {"kl_coef": 0.05, "kl_estimator": "k1", "ppo_epochs": 4},
    "rloo": {"kl_coef": 0.05, "kl_estimator": "k1", "ppo_epochs": 1},
    "grpo": {"kl_coef": 0.04, "kl_estimator": "k3", "ppo_epochs": 1},
}

# Settings a checkpoint must share with the run that resumes it (`rlhf.run.open_run`): the prompt order, the
# sampling seeds, the updates and the optimizer's state depend on them. `steps` is not among them: a finished
# run resumes to train further.
RESUME_KEYS = ("prompts", "model", "reward", "rm", "algo", "lr", "lora_r", "lora_alpha", "critic_layer", "dtype",
               "seed", "response_length", "temperature", "missing_eos_penalty", "batch_size", "minibatch_size",
               "rloo_k", "grpo_k", "kl_coef", "kl_estimator", "target_kl", "kl_horizon", "ppo_epochs", "clip_range",
               "stop_kl", "gamma", "lam", "vf_clip", "vf_coef", "max_grad_norm", "grpo_scale_rewards",
               "grpo_loss_norm", "eval_prompts", "eval_fraction", "init_policy")


@dataclass
class PPOConfig:
    """Everything `rlhf ppo` and the demo set. Each field's docstring gives the source of its default."""

    # data and models
    prompts: str = "data/prompts.jsonl"
    """JSONL prompt file ({"prompt": ...} per line); the RL data set is prompts only."""
    out: str = "runs/ppo"
    """Output folder: train_log.csv, eval.csv, eval_samples.jsonl, plots/, samples.jsonl, policy/, checkpoints/."""
    model: str | None = None
    """Base (SFT) model; default: the RM's base model, else 'default' (SmolLM2-135M-Instruct)."""
    reward: str = "rm"
    """"rm" for the reward model, or an oracle (`alliteration`, `length`, `module:function`) instead."""
    rm: str | None = None
    """Reward model directory (`rlhf train-rm`); needed when `reward` is "rm"."""
    init_policy: str | None = None
    """Start the actor from this policy folder (OUT/policy of `rlhf ppo` or `rlhf dpo`, the same --lora-r and
    --lora-alpha) instead of a fresh adapter; the reference stays the base model, so the KL is still to it."""
    # algorithm
    algo: Literal["ppo", "rloo", "grpo"] = "ppo"
    """"ppo" (clipped surrogate + critic + GAE), "rloo" (REINFORCE leave-one-out, no critic) or "grpo"
    (group-normalised advantages, clipped surrogate, KL to the reference as a loss term; no critic)."""
    steps: int = 100
    """Number of RL steps (one batch of rollouts and its update each)."""
    lr: float = 1e-4
    """Adam learning rate for the LoRA adapters and the value head (LoRA needs ~10x full fine-tuning's)."""
    lora_r: int = 16
    """Rank of the actor's (and a fresh critic's) LoRA adapter."""
    lora_alpha: int = 32
    """LoRA alpha (scale = alpha / r)."""
    critic_layer: float = 0.33
    """PPO: the value head reads the hidden state after this layer (a fraction of the depth, a layer
    number, or 0 = the last layer, as `rlhf train-rm --readout-layer`), and the critic's LoRA adapts only
    the layers below it, so its forward and backward passes run a third of the model by default
    (docs/benchmarks.md, "PPO step"). It is where the default reward model reads, so the critic sees what the
    reward depends on. 0 = the papers' critic, which starts as the RM when the RM reads the last layer's last
    token (InstructGPT; Ziegler et al. 2019)."""
    dtype: DtypeName = "auto"
    """The base weights' dtype, shared by all four roles (the LoRA weights, the value head, log-probabilities,
    advantages and losses stay float32). auto: bfloat16 where the device computes it natively (a GPU with bf16
    support, a CPU with AVX-512 BF16 or AMX), float32 elsewhere. In bfloat16 the rollout log-probabilities take a
    forward pass of their own (policy/rollout.py)."""
    seed: int = 0
    """Random seed (adapter init, prompt order, sampling)."""
    # sampling
    response_length: int = 48
    """Most new tokens per response; a response that reaches it without EOS is unfinished (see
    `missing_eos_penalty`)."""
    temperature: float = 0.7
    """Sampling temperature; logprobs are computed at the same temperature (Huang et al. 2024)."""
    missing_eos_penalty: float | None = None
    """Subtracted (>= 0) from the score of each response that ends without EOS, as TRL's
    missing_eos_penalty (Huang et al. 2024 penalise such responses); the RM's order among unfinished
    responses is kept. Off by default: when most responses reach `response_length` without EOS (as the
    bundled SFT model's do), a penalty on most rollouts teaches a length prior instead of the
    preference; a warning is logged when it is on and fewer than half finish."""
    # batch sizes
    batch_size: int = 8
    """Rollouts (sequences) per step and process (`accelerate launch --num_processes N`: N times as many per
    step, each process sampling its own share of the prompts). RLOO uses batch_size / rloo_k prompts with
    rloo_k samples each, GRPO batch_size / grpo_k prompts with grpo_k samples each."""
    minibatch_size: int | None = None
    """PPO, GRPO: rollouts per gradient step and process; default: the whole batch (one minibatch per epoch).
    RLOO always makes one on-policy step per batch."""
    micro_batch_size: int = 4
    """Rollouts per forward/backward pass; gradients accumulate up to the minibatch, so this bounds
    memory without changing the update."""
    rloo_k: int = 4
    """RLOO: samples per prompt (the baseline of each is the mean reward of the other k-1)."""
    grpo_k: int = 4
    """GRPO: samples per prompt, G (Shao et al. 2024 use 64, TRL's num_generations is 8; 4 fits the
    default batch of 8 on a CPU)."""
    # KL to the reference
    kl_coef: float | None = None
    """beta (initial value when adaptive). PPO and RLOO: weight of the KL penalty in the reward, default
    0.05 (TRL's PPOTrainer and RLOOTrainer). GRPO: weight of the KL loss term, default 0.04 (Shao et al.
    2024, section 4.2)."""
    kl_estimator: Literal["k1", "k2", "k3"] | None = None
    """Per-token KL estimate: k1 = log p/p_ref, k2 = (log p/p_ref)^2/2, k3 = (r-1)-log r, r = p_ref/p.
    PPO (in the per-token reward): any, default k1 (Ziegler et al. 2019; InstructGPT). RLOO: k1 only, the
    sequence reward score - beta * sum_t (log p - log p_ref) (Ahmadian et al. 2024; TRL's RLOOTrainer).
    GRPO (in the loss): k3, default, as Shao et al. 2024 eq. 4, or k2 (k1's gradient is zero in expectation)."""
    target_kl: float | None = None
    """When set, beta adapts to keep the per-sequence KL near this many nats (Ziegler et al. 2019)."""
    kl_horizon: int = 10_000
    """Horizon of the adaptive KL controller, in rollouts (Ziegler et al. 2019)."""
    # PPO / GRPO update
    ppo_epochs: int | None = None
    """Passes over each batch of rollouts. PPO: default 4 (TRL's num_ppo_epochs; Huang et al. 2024).
    GRPO: mu of Shao et al. 2024, default 1 (their single update per exploration stage; TRL's
    num_iterations). RLOO always makes one on-policy update."""
    clip_range: float = 0.2
    """PPO ratio clipping epsilon."""
    stop_kl: float | None = 0.1
    """Stop a step's PPO/GRPO epochs early: before each gradient step, the minibatch's mean KL(pi_old ||
    pi) per token (k3) of the CURRENT policy is measured; above this, that step and the rest are skipped
    (the early stopping of OpenAI's Spinning Up PPO)."""
    gamma: float = 1.0
    """Discount (1: the episode is one short response)."""
    lam: float = 0.95
    """GAE lambda."""
    vf_clip: float = 0.2
    """Value clipping range around the rollout's values."""
    vf_coef: float = 0.1
    """Weight of the value loss in the total loss."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm."""
    grpo_scale_rewards: bool = True
    """GRPO: divide the group-centred rewards by the group's std (Shao et al. 2024). False: centring
    only (Dr. GRPO, Liu et al. 2025)."""
    grpo_loss_norm: GrpoLossNorm = "sequence"
    """GRPO: how token losses are averaged: "sequence" (mean per response, then over responses; Shao
    et al. 2024, default), "token" (over all real tokens; DAPO, Yu et al. 2025) or "constant" (sum /
    (responses * response_length); Dr. GRPO, Liu et al. 2025)."""
    # evaluation
    eval_every: int = 10
    """Evaluate on the held-out prompts every N steps (and before the first and after the last)."""
    eval_prompts: str | None = None
    """Held-out prompt file; default: a held-out fraction of `prompts`."""
    eval_fraction: float = 0.1
    """Fraction of `prompts` held out for evaluation when `eval_prompts` is not given."""
    eval_size: int = 32
    """Most held-out prompts used per evaluation."""
    oracle: str | None = None
    """Also score evaluation samples with this oracle (e.g. alliteration) as `objective/oracle`."""
    # run
    checkpoint_every: int = 0
    """Save a resumable checkpoint every N steps to OUT/checkpoints (0: only at the end)."""
    resume: bool = False
    """Continue from OUT/checkpoints (same settings; `steps` may be raised to train further)."""
    save_merged: bool = False
    """Also write the base model with the actor adapter merged into OUT/merged (a plain HF model)."""
    max_bad_updates: int = 3
    """Stop with an error after this many consecutive updates with a non-finite loss or gradient."""
    max_steps_time: float | None = None
    """Stop after this many seconds of training (benchmarks); None: run all steps."""
    report_to: Literal["none", "tensorboard", "wandb", "trackio"] = "none"
    """Also send each train_log.csv and eval.csv row (eval.csv's under held_out/) to this tracker, through
    accelerate: "tensorboard" writes event files to OUT/tensorboard/; "wandb" and "trackio" need their
    package installed. The CSV logs are written either way."""

    def __post_init__(self) -> None:
        for name, value in ALGO_DEFAULTS.get(self.algo, ALGO_DEFAULTS["ppo"]).items():
            if getattr(self, name) is None:
                setattr(self, name, value)

    @property
    def samples_per_prompt(self) -> int:
        return {"rloo": self.rloo_k, "grpo": self.grpo_k}.get(self.algo, 1)

    def check(self) -> None:
        check_fields(self, positive=("steps", "batch_size", "response_length", "ppo_epochs", "micro_batch_size",
                                     "lora_r", "lora_alpha", "eval_size", "kl_horizon", "max_bad_updates"))
        if self.algo == "rloo" and self.kl_estimator != "k1":
            raise UserError("--algo rloo takes the KL of the whole response, score - beta * sum_t (log p - log p_ref) "
                            "(k1); --kl-estimator k2/k3 applies to ppo and grpo")
        if self.algo == "grpo" and self.kl_estimator == "k1":
            raise UserError("--algo grpo puts the KL in the loss, where k1 has no useful gradient: use k3 "
                            "(default) or k2")
        if self.missing_eos_penalty is not None and self.missing_eos_penalty < 0:
            raise UserError("--missing-eos-penalty is subtracted from the score of responses without EOS: give "
                            "a value >= 0 (or 'off')")
        if self.reward == "rm" and not self.rm:
            raise UserError("--rm DIR is required unless --reward names an oracle (e.g. --reward alliteration)")
        check_layer_request(self.critic_layer, "--critic-layer")
        if self.temperature <= 0:
            raise UserError("--temperature must be > 0")
        if self.kl_coef < 0:
            raise UserError("--kl-coef must be >= 0")
        if self.target_kl is not None and self.target_kl <= 0:
            raise UserError("--target-kl must be > 0")
        if self.algo == "rloo" and (self.rloo_k < 2 or self.batch_size % self.rloo_k):
            raise UserError(f"--batch-size ({self.batch_size}) must be a multiple of --rloo-k ({self.rloo_k}) >= 2")
        if self.algo == "grpo" and (self.grpo_k < 2 or self.batch_size % self.grpo_k):
            raise UserError(f"--batch-size ({self.batch_size}) must be a multiple of --grpo-k ({self.grpo_k}) >= 2")
        if self.minibatch_size is not None and not 1 <= self.minibatch_size <= self.batch_size:
            raise UserError("--minibatch-size must be between 1 and --batch-size")
        if not 0 <= self.eval_fraction < 1:
            raise UserError("--eval-fraction must be in [0, 1)")
        if self.eval_every < 0 or self.checkpoint_every < 0:
            raise UserError("--eval-every and --checkpoint-every must be >= 0")
