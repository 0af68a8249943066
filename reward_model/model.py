"""The reward model: the SFT causal LM with LoRA adapters and a linear score head (InstructGPT, Ouyang
et al. 2022, sec. 3.5: "the SFT model with the final unembedding layer removed"; Ziegler et al. 2019).

Where the head reads is the `Readout`: the hidden state after decoder layer `layer` (0 = the last
layer; the layers above it are not run at all), either at the last real token (`pool="last"`, the
papers' choice) or averaged over the completion's tokens (`pool="mean"`). See `Readout` for why the
default is a middle layer's mean.

Load a trained one and score texts with one call each:

    from reward_model.model import load_reward_model, score_texts
    rm, tokenizer = load_reward_model("runs/rm")          # eval mode, frozen
    rewards = score_texts(rm, tokenizer, ["Write a poem."], ["Silver seas sing softly."])

An RM directory holds exactly: `adapter_config.json` + `adapter_model.safetensors` (peft's
`save_pretrained` of the LoRA adapter), `score_head.safetensors` (tensors `weight` [1, H] and `bias`
[1]) and `reward_model.json` ({"format": "rlhf-reward-model/2", "base_model", "reward_bias",
"max_length", "lora_r", "readout": {"layer", "pool"}, ... training summary}). The reward is
score_head(readout features) - reward_bias; a file without "readout" reads the last layer's last
token. The policy stage loads the parts into its own shared base model with `load_rm_parts`.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import warnings
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from rlhf.causal_lm import decoder_body, final_hidden_states, last_token_index, lora_target_modules, pad_rows
from rlhf.errors import UserError
from rlhf.hardware import announce, resolve_dtype
from rlhf.layer_request import resolve_layer
from rlhf.models import fit_prompt, load_causal_lm, load_tokenizer
from rlhf.records import Prompt

log = logging.getLogger(__name__)

FORMAT = "rlhf-reward-model/2"
# /1 read every reward at the last layer's last token; a /2 directory says where in "readout". Old
# directories still load (as that read-out); an older toolkit refuses a /2 one instead of misreading it.
FORMATS = ("rlhf-reward-model/1", FORMAT)
META_FILE = "reward_model.json"
HEAD_FILE = "score_head.safetensors"


@dataclass(frozen=True)
class Readout:
    """Which hidden states the score head reads.

    The default, a middle layer's mean over the completion, was chosen by held-out pairwise accuracy
    (bench/rm_quality.py; docs/benchmarks.md, "Reward-model quality"): at the last layer's last token
    (`<|im_end|>`) the states of different completions of one prompt are nearly identical (cosine 0.98-0.995 on
    SmolLM2), since that position mostly predicts the next template token; frozen linear probes on
    them are near chance, while a middle layer's mean over the completion carries the word-level
    content that preferences are about. Running only the first `layer` layers also cuts the cost to
    layer / depth (a third by default).
    """

    layer: int = 0
    """Decoder layers to run: the head reads the state after layer `layer` (1-based, with the model's
    final norm applied); 0 = all layers, the papers' read-out."""
    pool: str = "last"
    """"last": the last real token (EOS); "mean": the mean over the completion's tokens (EOS included)."""

    def check(self, num_layers: int | None = None) -> None:
        if self.pool not in ("last", "mean"):
            raise UserError(f"reward read-out pool must be 'last' or 'mean', got {self.pool!r}")
        if self.layer < 0 or (num_layers is not None and self.layer > num_layers):
            raise UserError(f"reward read-out layer must be in 0..{num_layers} (0 = last), got {self.layer}")

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> Readout:
        """The read-out recorded in reward_model.json (none recorded: the last layer's last token)."""
        readout = meta.get("readout", {})
        if not isinstance(readout, dict) or set(readout) - {"layer", "pool"}:
            raise UserError(f"reward_model.json: unreadable readout {readout!r}")
        found = cls(**readout)
        found.check()
        return found


# Shortening the shared module list is not safe for two threads at once; the lock makes it so.
_TRUNCATION_LOCK = threading.RLock()


@contextmanager
def first_layers(causal_lm, num_layers: int):
    """Run only the first `num_layers` decoder layers inside the block (0 or the full depth = all, on any
    architecture): the body's forward then returns layer `num_layers`'s output through the final norm.
    The layers stay in memory (the policy shares them); only the module list the forward loops over is
    shortened, which needs a body that keeps its layers in `.layers` (Llama, Mistral, Qwen, Gemma, ...)."""
    decoder = decoder_body(causal_lm)
    if not num_layers or num_layers >= num_decoder_layers(causal_lm):
        yield decoder
        return
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise UserError(f"{type(decoder).__name__} keeps no `layers` list: read the reward at the last layer "
                        f"(--readout-layer 0)")
    with _TRUNCATION_LOCK:
        decoder.layers = layers[:num_layers]
        try:
            yield decoder
        finally:
            decoder.layers = layers


def num_decoder_layers(causal_lm) -> int:
    config = getattr(causal_lm, "config", None) or decoder_body(causal_lm).config
    return int(config.num_hidden_layers)


def reward_features(causal_lm, readout: Readout, input_ids: Tensor, attention_mask: Tensor,
                    completion_mask: Tensor | None) -> Tensor:
    """The read-out features [B, H] (float32) of each row: see `Readout`. `completion_mask` marks the
    completion's tokens (needed for pool="mean")."""
    with first_layers(causal_lm, readout.layer):
        hidden = final_hidden_states(causal_lm, input_ids, attention_mask)
    if readout.pool == "mean":
        if completion_mask is None:
            raise ValueError("pool='mean' needs the completion mask")
        weights = (completion_mask * attention_mask).to(hidden.device, torch.float32).unsqueeze(-1)
        return (hidden.float() * weights).sum(1) / weights.sum(1).clamp(min=1.0)
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    return hidden[rows, last_token_index(attention_mask).to(hidden.device)].float()


class RewardModel(nn.Module):
    """LoRA-adapted causal LM body + linear score head on the `Readout` features."""

    def __init__(self, backbone, hidden_size: int, reward_bias: float = 0.0, readout: Readout = Readout()):
        super().__init__()
        self.backbone = backbone
        self.readout = readout
        # The head stays float32 whatever the backbone's dtype: it is tiny and the loss is sensitive.
        self.score_head = nn.Linear(hidden_size, 1, dtype=torch.float32)
        # "The N implementation details of RLHF with PPO" (Huang et al. 2024): reward head weights
        # ~ N(0, 1/sqrt(d_model + 1)), bias 0 (following Ziegler et al. 2019's lm-human-preferences).
        nn.init.normal_(self.score_head.weight, std=1.0 / math.sqrt(hidden_size + 1))
        nn.init.zeros_(self.score_head.bias)
        # Subtracted so that the SFT completions of the training data have mean reward 0 (InstructGPT
        # sec. 3.5 normalises the RM "so that the labeler demonstrations achieve a mean score of 0").
        self.register_buffer("reward_bias", torch.tensor(float(reward_bias), dtype=torch.float32))

        self.length_head: nn.Linear | None = None
        """Training with length decorrelation only (`add_length_head`): never saved, never used to score."""

    def add_length_head(self) -> nn.Linear:
        """A second head on the same features for ODIN's length part (Chen et al. 2024)."""
        hidden = self.score_head.in_features
        self.length_head = nn.Linear(hidden, 1, dtype=torch.float32).to(self.score_head.weight.device)
        nn.init.normal_(self.length_head.weight, std=1.0 / math.sqrt(hidden + 1))
        nn.init.zeros_(self.length_head.bias)
        return self.length_head

    def forward(self, input_ids: Tensor, attention_mask: Tensor, completion_mask: Tensor | None = None,
                with_length: bool = False) -> Tensor:
        """Reward per row [B] (float32) from the read-out features; `with_length`: [B, 2], the reward and the
        length head's part."""
        features = reward_features(self.backbone, self.readout, input_ids, attention_mask, completion_mask)
        reward = self.score_head(features).squeeze(-1) - self.reward_bias
        if not with_length:
            return reward
        return torch.stack([reward, self.length_head(features).squeeze(-1)], dim=1)


def create_reward_model(base_model: str, lora_r: int = 8, lora_alpha: int = 16, lora_dropout: float = 0.0,
                        dtype: torch.dtype = torch.float32, readout_layer: float = 0, readout_pool: str = "last"):
    """A fresh reward model on `base_model` (the --model string) and its tokenizer. LoRA adapts only the
    layers the read-out runs."""
    tokenizer = load_tokenizer(base_model)
    causal_lm = load_causal_lm(base_model, dtype=dtype)
    readout = Readout(resolve_layer(readout_layer, num_decoder_layers(causal_lm)), readout_pool)
    return attach_reward_head(causal_lm, readout, lora_r, lora_alpha, lora_dropout), tokenizer


def attach_reward_head(causal_lm, readout: Readout, lora_r: int = 8, lora_alpha: int = 16,
                       lora_dropout: float = 0.0) -> RewardModel:
    """A reward model on a loaded causal LM: LoRA adapters on the layers the read-out runs, and a fresh score head."""
    from peft import LoraConfig, get_peft_model

    depth = num_decoder_layers(causal_lm)
    readout.check(depth)
    used = readout.layer or depth
    config = LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, bias="none",
                        target_modules=lora_target_modules(causal_lm),
                        layers_to_transform=None if used == depth else list(range(used)))
    with warnings.catch_warnings():  # peft reads a transformers property deprecated in v5
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        backbone = get_peft_model(causal_lm, config)
    return RewardModel(backbone, causal_lm.config.hidden_size, readout=readout)


def save_reward_model(rm: RewardModel, out_dir: str | Path, meta: dict[str, Any]) -> Path:
    """Write the adapter, score head and reward_model.json into `out_dir` (see the module docstring)."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rm.backbone.save_pretrained(out_dir)
    head = rm.score_head
    save_file({"weight": head.weight.detach().float().cpu().contiguous(),
               "bias": head.bias.detach().float().cpu().contiguous()}, str(out_dir / HEAD_FILE))
    full = {"format": FORMAT, **meta, "reward_bias": float(rm.reward_bias), "readout": asdict(rm.readout)}
    for key in ("base_model", "max_length", "lora_r"):
        if key not in full:
            raise ValueError(f"reward model metadata needs {key!r}")
    (out_dir / META_FILE).write_text(json.dumps(full, indent=2) + "\n", encoding="utf-8")
    return out_dir


def read_meta(rm_dir: str | Path) -> dict[str, Any]:
    """reward_model.json of an RM directory, checked; UserError when it is not one."""
    rm_dir = Path(rm_dir)
    if not rm_dir.is_dir():
        raise UserError(f"reward model directory {rm_dir} does not exist")
    path = rm_dir / META_FILE
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{rm_dir} is not a reward model directory (no {META_FILE}); "
                        f"train one with `rlhf train-rm`") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON ({exc.msg})") from None
    if not isinstance(meta, dict) or meta.get("format") not in FORMATS:
        raise UserError(f"{path}: unknown format {meta.get('format') if isinstance(meta, dict) else None!r}, "
                        f"expected {FORMAT!r}")
    for name in ("adapter_config.json", "adapter_model.safetensors", HEAD_FILE):
        if not (rm_dir / name).is_file():
            raise UserError(f"reward model directory {rm_dir} is incomplete: {name} is missing")
    return meta


def load_head(head: nn.Linear, rm_dir: str | Path) -> None:
    """Copy a saved score head's weight and bias into `head`."""
    from safetensors.torch import load_file

    tensors = load_file(str(Path(rm_dir) / HEAD_FILE))
    with torch.no_grad():
        head.weight.copy_(tensors["weight"])
        head.bias.copy_(tensors["bias"])


class RMParts(NamedTuple):
    """What a model that hosts the RM's adapter itself (the policy's shared base) needs to score."""

    meta: dict[str, Any]
    readout: Readout
    score_head: nn.Linear  # float32, reward_bias folded into its bias, frozen
    max_length: int


def load_rm_parts(rm_dir: str | Path, hidden_size: int) -> RMParts:
    """The read-out, the score head (with the normalisation folded in) and the settings of an RM
    directory; its LoRA adapter loads with peft's `load_adapter(rm_dir)`."""
    meta = read_meta(rm_dir)
    head = nn.Linear(hidden_size, 1, dtype=torch.float32)
    load_head(head, rm_dir)
    with torch.no_grad():
        head.bias -= float(meta.get("reward_bias", 0.0))
    head.requires_grad_(False)
    return RMParts(meta, Readout.from_meta(meta), head, int(meta["max_length"]))


def scoring_dtype(trained: str, requested: str = "auto") -> tuple[str, str]:
    """(dtype name, why) of the backbone for scoring: `requested` when it names one; for "auto", the dtype it was
    trained (and normalised) in, so the stored reward bias and accuracy hold as they are, unless that is bfloat16
    and this device has no bf16 units, where float32 gives the same rewards to within bf16's rounding at a
    fraction of the time (rlhf.hardware)."""
    if requested != "auto":
        return resolve_dtype(requested)
    if trained == "float32":
        return "float32", "the reward model was trained in float32"
    return resolve_dtype("auto")


def load_reward_model(rm_dir: str | Path, dtype: torch.dtype | str | None = None, base_model: str | None = None):
    """(RewardModel, tokenizer) from an RM directory, in eval mode with every parameter frozen.

    `base_model` overrides the one recorded at training time (e.g. the same model in another
    folder); `dtype` is the backbone's dtype, a torch dtype or a `--dtype` name (default "auto":
    `scoring_dtype`; the score head is always float32).
    """
    from peft import PeftModel

    meta = read_meta(rm_dir)
    base = base_model or meta["base_model"]
    tokenizer = load_tokenizer(base)
    if dtype is None or isinstance(dtype, str):
        name, why = scoring_dtype(meta.get("dtype", "float32"), dtype or "auto")
        announce(name, why)
        dtype = getattr(torch, name)
    causal_lm = load_causal_lm(base, dtype=dtype)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        backbone = PeftModel.from_pretrained(causal_lm, str(rm_dir), is_trainable=False)
    readout = Readout.from_meta(meta)
    readout.check(num_decoder_layers(causal_lm))
    rm = RewardModel(backbone, causal_lm.config.hidden_size, reward_bias=float(meta.get("reward_bias", 0.0)),
                     readout=readout)
    load_head(rm.score_head, rm_dir)
    rm.eval()
    rm.requires_grad_(False)
    rm.meta = meta
    return rm, tokenizer


class EncodedSample(NamedTuple):
    """One (prompt, completion) as the reward model reads it."""

    ids: list[int]
    completion_length: int  # the last this-many ids are the completion and its EOS
    truncated: bool


def encode_sample_ids(tokenizer, prompt: Prompt, completion: str, max_length: int) -> EncodedSample:
    """Token ids of one sample, `format_sample`'s text: the chat-formatted prompt, then the completion
    and EOS, tokenized as two parts (prompt as in `rlhf.generation.encode_prompts`). The policy stage
    scores its responses through this same function on their decoded text, so the RM always reads
    the token sequence it was trained on.

    Over `max_length`: the prompt is shortened by `rlhf.models.fit_prompt` (a conversation's oldest turns
    first, then tokens on the LEFT) and the completion (+EOS) stays whole, since the reward is read from it;
    a completion alone over the limit keeps its last tokens, with a warning (training counts them).
    """
    completion_ids = tokenizer(completion + (tokenizer.eos_token or ""), add_special_tokens=False)["input_ids"]
    if len(completion_ids) >= max_length:
        log.warning("completion alone is %d tokens, over max_length=%d: scoring only its last %d tokens",
                    len(completion_ids), max_length, max_length)
        return EncodedSample(completion_ids[-max_length:], max_length, True)
    fitted = fit_prompt(tokenizer, prompt, max_length - len(completion_ids))
    return EncodedSample(fitted.ids + completion_ids, len(completion_ids), fitted.shortened)


def pad_samples(samples: Sequence[EncodedSample], pad_id: int, side: str = "left") -> tuple[Tensor, Tensor, Tensor]:
    """(input_ids, attention_mask, completion_mask) of encoded samples padded to the longest one."""
    input_ids, attention_mask = pad_rows([s.ids for s in samples], pad_id, side)
    width = input_ids.shape[1]
    positions = torch.arange(width)
    ends = attention_mask.sum(1) if side == "right" else torch.full((len(samples),), width)
    starts = ends - torch.tensor([s.completion_length for s in samples])
    completion_mask = ((positions >= starts[:, None]) & (positions < ends[:, None])).long()
    return input_ids, attention_mask, completion_mask


def encode_samples(tokenizer, prompts: Sequence[str], completions: Sequence[str], max_length: int):
    """(input_ids, attention_mask, completion_mask) of prompt+completion samples, padded on the
    tokenizer's side."""
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    samples = [encode_sample_ids(tokenizer, p, c, max_length) for p, c in zip(prompts, completions)]
    return pad_samples(samples, tokenizer.pad_token_id, getattr(tokenizer, "padding_side", "left"))


@torch.no_grad()
def map_samples(fn: Callable[[Tensor, Tensor, Tensor], Tensor], samples: Sequence[EncodedSample], pad_id: int,
                device, batch_size: int = 16, progress: str | None = None) -> Tensor:
    """fn(input_ids, attention_mask, completion_mask) -> [B, ...] over encoded samples, batched by length (less
    padding, left-padded), stacked in input order (on the CPU). `progress`: a progress bar's label (no bar
    without one)."""
    from tqdm import tqdm

    order = sorted(range(len(samples)), key=lambda i: len(samples[i].ids))
    rows: list[Tensor | None] = [None] * len(samples)
    starts = range(0, len(order), batch_size)
    for start in tqdm(starts, desc=progress, unit="batch", disable=progress is None or None):
        idx = order[start:start + batch_size]
        tensors = pad_samples([samples[i] for i in idx], pad_id)
        for i, row in zip(idx, fn(*(t.to(device) for t in tensors)).cpu()):
            rows[i] = row
    return torch.stack(rows) if rows else torch.zeros(0)


def score_samples(score: Callable[[Tensor, Tensor, Tensor], Tensor], samples: Sequence[EncodedSample],
                  pad_id: int, device, batch_size: int = 16) -> list[float]:
    """score(input_ids, attention_mask, completion_mask) -> [B] over encoded samples, in input order."""
    return map_samples(score, samples, pad_id, device, batch_size).tolist()


def score_rows(rm: RewardModel, samples: Sequence[EncodedSample], pad_id: int, batch_size: int = 16) -> list[float]:
    """Rewards of encoded samples, in input order."""
    return score_samples(rm, samples, pad_id, next(rm.parameters()).device, batch_size)


def readout_texts(rm: RewardModel, tokenizer, prompts: Sequence[str], completions: Sequence[str],
                  batch_size: int = 16, max_length: int = 512) -> Tensor:
    """What the score head reads, [N, H] float32, for each (prompt, completion) in input order: the reward is
    `rm.score_head(features) - rm.reward_bias` (active labeling's information order needs the features)."""
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    if not prompts:
        return torch.zeros(0, rm.score_head.in_features)
    was_training = rm.training
    rm.eval()
    try:
        samples = [encode_sample_ids(tokenizer, p, c, max_length) for p, c in zip(prompts, completions)]
        features = partial(reward_features, rm.backbone, rm.readout)
        return map_samples(features, samples, tokenizer.pad_token_id, next(rm.parameters()).device, batch_size)
    finally:
        rm.train(was_training)


@torch.no_grad()
def head_rewards(rm: RewardModel, features: Tensor) -> list[float]:
    """The rewards of read-out features [N, H] (`readout_texts`), as `RewardModel.forward` takes them."""
    head = rm.score_head
    return (head(features.to(head.weight.device)).squeeze(-1) - rm.reward_bias).tolist()


def score_texts(rm: RewardModel, tokenizer, prompts: Sequence[str], completions: Sequence[str],
                batch_size: int = 16, max_length: int = 512) -> list[float]:
    """The reward of each (prompt, completion), in input order."""
    return head_rewards(rm, readout_texts(rm, tokenizer, prompts, completions, batch_size, max_length))
