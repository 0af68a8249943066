"""The reward model's training arguments, importable without torch (the CLI reads its defaults)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from rlhf.config_args import check_fields
from rlhf.errors import UserError
from rlhf.hardware import DtypeName
from rlhf.layer_request import check_layer_request

# Settings a checkpoint must share with the run that resumes it (`rlhf.run.open_run`). The learning rates are among
# them: the optimizer and scheduler state restored from the checkpoint carry the old ones.
RESUME_KEYS = ("model", "lora_r", "lora_alpha", "batch_rankings", "epochs", "seed", "max_length", "readout_layer",
               "readout_pool", "probe_init", "validation_fraction", "patience", "lr", "head_lr_multiplier",
               "pair_weighting", "length_decorrelation", "dtype", "init_rm")


@dataclass
class RewardTrainingConfig:
    """Arguments of `rlhf train-rm` / `train_reward_model`. Defaults follow InstructGPT where it applies."""

    # data
    data: str
    """Folder from `rlhf export` (rankings.jsonl, its rows marked "split": "test" held out; else
    train.jsonl/test.jsonl pairs); a .jsonl/.json/.parquet/.csv file of rankings or of pairs in TRL's format
    (prompt/chosen/rejected, texts or message lists); a folder saved with `save_to_disk`; or a hub dataset id."""
    out: str
    """Output folder: the reward model, train_log.csv, train_curves.png, checkpoints/."""
    data_split: str = "train"
    """The split of --data to train on; the split "test" (and rows marked "split": "test") is held out."""
    dataset_num_proc: int | None = None
    """Processes that tokenize the data (`Dataset.map`'s num_proc; off = this one). Tokens are cached
    with the dataset, so a second run on the same data and model skips this."""
    # model and LoRA
    model: str = "default"
    """Base model (the SFT model): 'default' (SmolLM2-135M-Instruct), a local folder or a HF id."""
    init_rm: str | None = None
    """Start the LoRA weights and the score head from this reward model (the same base model, LoRA shape and
    read-out) instead of fresh ones: an earlier round's model, retrained on more rankings. Its read-out is kept
    (no read-out search)."""
    lora_r: int = 16
    """LoRA rank of the adapters on the attention and MLP projections (16 against 8: docs/benchmarks.md,
    "Reward-model settings")."""
    lora_alpha: int = 32
    """LoRA scaling numerator (alpha / r scales the update); 2r is the usual choice."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA input; 0 keeps a resumed run bit-identical."""
    # optimisation
    epochs: int = 10
    """At most this many passes over the training rankings; with a validation split (--validation-fraction),
    training stops earlier once the validation loss (at the rewards' best scale: `loss.scale_free_loss`) has not
    improved for --patience checks, and the best check's weights are kept."""
    validation_fraction: float = 0.1
    """Share of the training prompts held back to choose when to stop (checked twice per epoch; the test split
    is never read). 0, or fewer than 5 validation prompts: train all --epochs and keep the last weights."""
    patience: int = 3
    """Validation checks without a lower validation loss before training stops."""
    lr: float = 3e-4
    """Peak AdamW learning rate for the LoRA weights and the score head (LoRA needs ~10-100x the 9e-6
    InstructGPT uses for full fine-tuning)."""
    lr_final_fraction: float = 0.1
    """Cosine decay to this fraction of `lr` by the end (InstructGPT appendix C.2: down to 10%)."""
    batch_rankings: int = 8
    """Rankings per step (per process); all their completions go through one padded forward pass."""
    max_length: int = 512
    """Tokens per sample (prompt + completion + EOS); longer prompts are truncated from the left."""
    # read-out
    readout_layer: str = "auto"
    """Where the score head reads: auto (chosen by frozen probes, cross-validated by prompt on the training
    rankings: reward_model/readout_search.py), a fraction of the depth (0.33 = a third of the way up: layer 10 of
    SmolLM2-135M's 30), a layer number, or 0 = the last layer. The layers above it are not run, so training and
    scoring cost that share of the depth."""
    readout_pool: Literal["auto", "mean", "last"] = "auto"
    """auto (chosen with the layer), "mean" over the completion's tokens (EOS included), or "last": the last real
    token, InstructGPT's read-out."""
    probe_init: bool = True
    """Start the score head from the frozen probe of the read-out (linear probing, then fine-tuning: Kumar et al.
    2022) instead of a random head; with a fixed read-out the probe is fitted for it."""
    head_lr_multiplier: float = 30.0
    """The score head's learning rate is `lr` times this: a fresh linear head needs far larger steps than
    the LoRA weights (docs/benchmarks.md, "What was wrong, and what changed")."""
    # loss
    pair_weighting: Literal["pair", "ranking"] = "pair"
    """"pair": every comparison weighs the same (TRL); "ranking": each ranking weighs the same, its
    C(K,2) comparisons sharing it (InstructGPT's 1/C(K,2)); they differ only when ties remove pairs."""
    margin: float = 0.0
    """Llama-2-style margin m: the loss is -log sigmoid(r_w - r_l - m * rank gap). 0 = InstructGPT's loss."""
    length_decorrelation: bool = False
    """Train a second head to explain the preferences that follow length and keep the reward uncorrelated with it;
    the length head is dropped at scoring (ODIN, Chen et al. 2024)."""
    max_grad_norm: float = 1.0
    """Gradient norm clip (TRL's RewardTrainer default)."""
    # run
    checkpoint_every: int = 50
    """Save a resumable checkpoint every N steps to OUT/checkpoints/step-N (the last 2 are kept); 0 = never."""
    resume: bool = False
    """Continue from the last checkpoint in OUT/checkpoints (same data order, no finished step lost)."""
    seed: int = 0
    """Seeds the score head's initialisation and each epoch's shuffle."""
    report_to: Literal["none", "tensorboard", "wandb", "trackio"] = "none"
    """Also send each train_log.csv row (under train/) to this tracker, through accelerate: "tensorboard"
    writes event files to OUT/tensorboard/; "wandb" and "trackio" need their package installed. The CSV log
    is written either way."""
    dtype: DtypeName = "auto"
    """Backbone weights' dtype (LoRA weights, score head and loss stay float32). auto: bfloat16 where the device
    computes it natively (a GPU with bf16 support, a CPU with AVX-512 BF16 or AMX), float32 elsewhere, where bf16
    runs many times slower (docs/benchmarks.md, "The dtype on a CPU without bf16 units"); the saved config records
    the one it chose."""
    eval_batch_size: int = 32
    """Samples per forward pass when scoring (reward normalisation, held-out evaluation)."""

    def readout_request(self) -> tuple[float | None, str | None]:
        """(layer, pool) as asked for, None where chosen from the data."""
        layer = None if self.readout_layer == "auto" else float(self.readout_layer)
        return layer, None if self.readout_pool == "auto" else self.readout_pool

    def check(self) -> None:
        check_fields(self, positive=("lora_r", "lora_alpha", "epochs", "patience", "batch_rankings", "max_length",
                                     "eval_batch_size", "dataset_num_proc"))
        if self.max_length < 8:
            raise UserError(f"--max-length {self.max_length} is too short to hold a completion")
        if not self.lr > 0 or not self.head_lr_multiplier > 0:
            raise UserError("--lr and --head-lr-multiplier must be > 0")
        if not 0 <= self.lr_final_fraction <= 1:
            raise UserError(f"--lr-final-fraction must be in [0, 1], got {self.lr_final_fraction}")
        if self.margin < 0:
            raise UserError(f"--margin must be >= 0, got {self.margin}")
        if self.checkpoint_every < 0:
            raise UserError("--checkpoint-every must be >= 0")
        if self.readout_layer != "auto":
            try:
                layer = float(self.readout_layer)
            except (TypeError, ValueError):
                raise UserError(f"--readout-layer must be auto, 0, a fraction or a layer number, got "
                                f"{self.readout_layer!r}") from None
            check_layer_request(layer, "--readout-layer")
        if not 0 <= self.validation_fraction < 1:
            raise UserError(f"--validation-fraction must be in [0, 1), got {self.validation_fraction}")
