"""The reward model's training arguments, importable without torch (the CLI reads its defaults)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class RewardTrainingConfig:
    """Arguments of `rlhf train-rm` / `train_reward_model`. Defaults follow InstructGPT where it applies."""

    data: str
    """Folder from `rlhf export`: rankings.jsonl (rows marked "split": "test" are held out), else
    train.jsonl/test.jsonl pairs (TRL's prompt/chosen/rejected); or one such JSONL file."""
    out: str
    """Output folder: the reward model, train_log.csv, train_curves.png, checkpoints/."""
    model: str = "default"
    """Base model (the SFT model): 'default' (SmolLM2-135M-Instruct), a local folder or a HF id."""
    lora_r: int = 8
    """LoRA rank of the adapters on the attention and MLP projections."""
    lora_alpha: int = 16
    """LoRA scaling numerator (alpha / r scales the update); 2r is the usual choice."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA input; 0 keeps a resumed run bit-identical."""
    epochs: int = 5
    """Passes over the training rankings. InstructGPT trains 1 epoch on ~33k prompts (more overfits there);
    on a few hundred rankings held-out accuracy kept rising with epochs (sentiment 0.70 / 0.75 / 0.79 and
    descriptive 0.79 / 0.82 / 0.82 at 2 / 3 / 5 epochs, bench/rm_quality.py). With tens of thousands of
    rankings, use 1."""
    lr: float = 3e-4
    """Peak AdamW learning rate for the LoRA weights and the score head (LoRA needs ~10-100x the 9e-6
    InstructGPT uses for full fine-tuning)."""
    lr_final_fraction: float = 0.1
    """Cosine decay to this fraction of `lr` by the end (InstructGPT appendix C.2: down to 10%)."""
    batch_rankings: int = 8
    """Rankings per step (per process); all their completions go through one padded forward pass."""
    max_length: int = 512
    """Tokens per sample (prompt + completion + EOS); longer prompts are truncated from the left."""
    readout_layer: float = 0.33
    """Where the score head reads: a fraction of the depth (0.33 = a third of the way up: layer 10 of
    SmolLM2-135M's 30), a layer number, or 0 = the last layer. The layers above it are not run, so
    training and scoring cost a third. Frozen probes on five preferences (README, Benchmarks,
    "Reward-model quality") were best on average at a third of the depth and worst at the last layer."""
    readout_pool: str = "mean"
    """"mean" over the completion's tokens (EOS included), or "last": the last real token, InstructGPT's
    read-out, where SmolLM2's states barely differ between completions of one prompt."""
    head_lr_multiplier: float = 30.0
    """The score head's learning rate is `lr` times this. A fresh linear head needs far larger steps than
    the LoRA weights: at 1x the head had barely moved after 38 steps (sentiment: train accuracy 0.58,
    held-out 0.63); at 30x it fits (0.85 / 0.70), the LoRA rate unchanged."""
    pair_weighting: str = "pair"
    """"pair": every comparison weighs the same (TRL); "ranking": each ranking weighs the same, its
    C(K,2) comparisons sharing it (InstructGPT's 1/C(K,2)); they differ only when ties remove pairs."""
    margin: float = 0.0
    """Llama-2-style margin m: the loss is -log sigmoid(r_w - r_l - m * rank gap). 0 = InstructGPT's loss."""
    max_grad_norm: float = 1.0
    """Gradient norm clip (TRL's RewardTrainer default)."""
    checkpoint_every: int = 50
    """Save a resumable checkpoint every N steps to OUT/checkpoints/step-N (the last 2 are kept); 0 = never."""
    resume: bool = False
    """Continue from the last checkpoint in OUT/checkpoints (same data order, no finished step lost)."""
    seed: int = 0
    """Seeds the score head's initialisation and each epoch's shuffle."""
    dtype: str = "bfloat16"
    """Backbone weights' dtype, bfloat16 or float32 (LoRA weights, score head and loss stay float32).
    bfloat16 by default: on a 2-core CPU with AVX-512 BF16 (SmolLM2-135M, 32 sequences x 83 tokens,
    10 layers, measured side by side) a forward took 0.89 s vs 1.45 s in float32 and a training step
    2.4 s vs 3.1-3.6 s; GPUs since Ampere have it natively. Use float32 on a CPU without bf16 units."""
    eval_batch_size: int = 32
    """Samples per forward pass when scoring (reward normalisation, held-out evaluation)."""
