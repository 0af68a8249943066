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
    epochs: int = 1
    """Passes over the training rankings; InstructGPT trains 1 epoch (more overfits)."""
    lr: float = 3e-4
    """Peak AdamW learning rate for the LoRA weights and the score head (LoRA needs ~10-100x the 9e-6
    InstructGPT uses for full fine-tuning)."""
    lr_final_fraction: float = 0.1
    """Cosine decay to this fraction of `lr` by the end (InstructGPT appendix C.2: down to 10%)."""
    batch_rankings: int = 8
    """Rankings per step (per process); all their completions go through one padded forward pass."""
    max_length: int = 512
    """Tokens per sample (prompt + completion + EOS); longer prompts are truncated from the left."""
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
    dtype: str = "float32"
    """Backbone weights' dtype, float32 or bfloat16 (LoRA weights, score head and loss stay float32).
    float32 by default: measured side by side on this 2-core CPU (SmolLM2-135M, 16 sequences x 85
    tokens, alternating steps), bfloat16 took 97.5 s/step vs 83.8 s for float32 (machine shared)."""
    eval_batch_size: int = 32
    """Samples per forward pass when scoring (reward normalisation, held-out evaluation)."""
