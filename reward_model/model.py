"""The reward model: the SFT causal LM with LoRA adapters and a linear score head on the hidden state
of the last real token (InstructGPT, Ouyang et al. 2022, sec. 3.5: "the SFT model with the final
unembedding layer removed"; Ziegler et al. 2019).

Load a trained one and score texts with one call each:

    from reward_model.model import load_reward_model, score_texts
    rm, tokenizer = load_reward_model("runs/rm")          # eval mode, frozen
    rewards = score_texts(rm, tokenizer, ["Write a poem."], ["Silver seas sing softly."])

An RM directory holds exactly: `adapter_config.json` + `adapter_model.safetensors` (peft's
`save_pretrained` of the LoRA adapter), `score_head.safetensors` (tensors `weight` [1, H] and `bias`
[1]) and `reward_model.json` ({"format": "rlhf-reward-model/1", "base_model", "reward_bias",
"max_length", "lora_r", ... training summary}). The reward is score_head(h_last) - reward_bias.
The policy stage loads the adapter into its own shared base model, so keep this layout stable.
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from rlhf.errors import UserError
from rlhf.models import format_prompt, load_causal_lm, load_tokenizer

log = logging.getLogger(__name__)

FORMAT = "rlhf-reward-model/1"
META_FILE = "reward_model.json"
HEAD_FILE = "score_head.safetensors"
# Llama-style attention and MLP projections: the LoRA targets when a model has them.
_LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def last_token_index(attention_mask: Tensor) -> Tensor:
    """Index of the last real token in each row, read from the attention mask.

    Correct under left and right padding alike. Never derived from the ids: the default
    tokenizer pads with its EOS id, and the EOS that ends a completion is a real token.
    """
    width = attention_mask.shape[-1]
    # The first 1 of the reversed mask is the last 1 of the mask (argmax returns the first maximum).
    return (width - 1 - attention_mask.flip(-1).to(torch.int8).argmax(dim=-1)).long()


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """Positions 0, 1, ... counted over real tokens only, so a left-padded row gets the same rotary
    positions as the same row right-padded (HF `generate` does the same)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _decoder(causal_lm) -> nn.Module:
    """The transformer body of a causal LM (or of a peft-wrapped one), without the LM head.

    peft injects LoRA layers in place inside the base model's modules, so calling the inner
    decoder directly still runs the active adapter.
    """
    from peft import PeftModel

    model = causal_lm.get_base_model() if isinstance(causal_lm, PeftModel) else causal_lm
    decoder = getattr(model, getattr(model, "base_model_prefix", ""), None)
    if isinstance(decoder, nn.Module) and decoder is not model:
        return decoder
    return model.get_decoder()


def final_hidden_states(causal_lm, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """The decoder's last hidden state [B, T, H] (after the final norm), without the LM head.

    Skipping the head matters: 49k-vocabulary logits over every position would cost more than the
    transformer itself for a 135M model. Works when `causal_lm` is a peft PeftModel.
    """
    out = _decoder(causal_lm)(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
    )
    return out.last_hidden_state


class RewardModel(nn.Module):
    """LoRA-adapted causal LM body + linear score head on the last real token's hidden state."""

    def __init__(self, backbone, hidden_size: int, reward_bias: float = 0.0):
        super().__init__()
        self.backbone = backbone
        # The head stays float32 whatever the backbone's dtype: it is tiny and the loss is sensitive.
        self.score_head = nn.Linear(hidden_size, 1, dtype=torch.float32)
        # "The N implementation details of RLHF with PPO" (Huang et al. 2024): reward head weights
        # ~ N(0, 1/sqrt(d_model + 1)), bias 0 (following Ziegler et al. 2019's lm-human-preferences).
        nn.init.normal_(self.score_head.weight, std=1.0 / math.sqrt(hidden_size + 1))
        nn.init.zeros_(self.score_head.bias)
        # Subtracted so that the SFT completions of the training data have mean reward 0 (InstructGPT
        # sec. 3.5 normalises the RM "so that the labeler demonstrations achieve a mean score of 0").
        self.register_buffer("reward_bias", torch.tensor(float(reward_bias), dtype=torch.float32))

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Reward per row [B] (float32), read at the last real token."""
        hidden = final_hidden_states(self.backbone, input_ids, attention_mask)
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        last = hidden[rows, last_token_index(attention_mask).to(hidden.device)]
        return self.score_head(last.float()).squeeze(-1) - self.reward_bias


def lora_target_modules(causal_lm) -> list[str]:
    """The attention and MLP projections to adapt: Llama's names when present, else every Linear
    inside the decoder (the LM head excluded), which peft matches by module-name suffix."""
    names = set()
    for name, module in _decoder(causal_lm).named_modules():
        if not isinstance(module, nn.Linear) or ".lora_" in name:
            continue
        # Under an existing peft wrapper the original layer is `<proj>.base_layer`.
        names.add(name.removesuffix(".base_layer").rsplit(".", 1)[-1])
    llama = [n for n in _LLAMA_PROJECTIONS if n in names]
    return llama if llama else sorted(names)


def create_reward_model(base_model: str, lora_r: int = 8, lora_alpha: int = 16, lora_dropout: float = 0.0,
                        dtype: torch.dtype = torch.float32):
    """A fresh reward model on `base_model` (the --model string) and its tokenizer."""
    from peft import LoraConfig, get_peft_model

    tokenizer = load_tokenizer(base_model)
    causal_lm = load_causal_lm(base_model, dtype=dtype)
    config = LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, bias="none",
                        target_modules=lora_target_modules(causal_lm))
    with warnings.catch_warnings():  # peft reads a transformers property deprecated in v5
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        backbone = get_peft_model(causal_lm, config)
    return RewardModel(backbone, causal_lm.config.hidden_size), tokenizer


def save_reward_model(rm: RewardModel, out_dir: str | Path, meta: dict[str, Any]) -> Path:
    """Write the adapter, score head and reward_model.json into `out_dir` (see the module docstring)."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rm.backbone.save_pretrained(out_dir)
    head = rm.score_head
    save_file({"weight": head.weight.detach().float().cpu().contiguous(),
               "bias": head.bias.detach().float().cpu().contiguous()}, str(out_dir / HEAD_FILE))
    full = {"format": FORMAT, **meta, "reward_bias": float(rm.reward_bias)}
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
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise UserError(f"{path}: unknown format {meta.get('format') if isinstance(meta, dict) else None!r}, "
                        f"expected {FORMAT!r}")
    for name in ("adapter_config.json", "adapter_model.safetensors", HEAD_FILE):
        if not (rm_dir / name).is_file():
            raise UserError(f"reward model directory {rm_dir} is incomplete: {name} is missing")
    return meta


def load_head(rm: RewardModel, rm_dir: str | Path) -> None:
    from safetensors.torch import load_file

    tensors = load_file(str(Path(rm_dir) / HEAD_FILE))
    with torch.no_grad():
        rm.score_head.weight.copy_(tensors["weight"])
        rm.score_head.bias.copy_(tensors["bias"])


def load_reward_model(rm_dir: str | Path, dtype: torch.dtype | None = None, base_model: str | None = None):
    """(RewardModel, tokenizer) from an RM directory, in eval mode with every parameter frozen.

    `base_model` overrides the one recorded at training time (e.g. the same model in another
    folder); `dtype` is the backbone's dtype (default float32; the score head is always float32).
    """
    from peft import PeftModel

    meta = read_meta(rm_dir)
    base = base_model or meta["base_model"]
    tokenizer = load_tokenizer(base)
    causal_lm = load_causal_lm(base, dtype=dtype or torch.float32)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        backbone = PeftModel.from_pretrained(causal_lm, str(rm_dir), is_trainable=False)
    rm = RewardModel(backbone, causal_lm.config.hidden_size, reward_bias=float(meta.get("reward_bias", 0.0)))
    load_head(rm, rm_dir)
    rm.eval()
    rm.requires_grad_(False)
    rm.meta = meta
    return rm, tokenizer


def encode_sample_ids(tokenizer, prompt: str, completion: str, max_length: int) -> tuple[list[int], bool]:
    """Token ids of one sample, `format_sample`'s text: the chat-formatted prompt, then the completion
    and EOS, tokenized as two parts exactly as the policy produced them (prompt as in
    `rlhf.generation.encode_prompts`, then the sampled tokens). Returns (ids, truncated).

    Over `max_length`: the prompt loses tokens on the LEFT and the completion (+EOS) stays whole,
    since the reward is read at its end; a completion alone over the limit keeps its last tokens.
    """
    templated = bool(getattr(tokenizer, "chat_template", None))
    prompt_ids = tokenizer(format_prompt(tokenizer, prompt), add_special_tokens=not templated)["input_ids"]
    completion_ids = tokenizer(completion + (tokenizer.eos_token or ""), add_special_tokens=False)["input_ids"]
    if len(prompt_ids) + len(completion_ids) <= max_length:
        return prompt_ids + completion_ids, False
    if len(completion_ids) >= max_length:
        log.warning("completion alone is %d tokens, over max_length=%d: scoring only its last %d tokens",
                    len(completion_ids), max_length, max_length)
        return completion_ids[-max_length:], True
    return prompt_ids[len(prompt_ids) + len(completion_ids) - max_length:] + completion_ids, True


def pad_rows(rows: Sequence[Sequence[int]], pad_id: int, side: str = "left") -> tuple[Tensor, Tensor]:
    """(input_ids, attention_mask) of token rows padded to the longest one."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if not row:
            continue
        span = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        ids[i, span] = torch.tensor(row, dtype=torch.long)
        mask[i, span] = 1
    return ids, mask


def encode_samples(tokenizer, prompts: Sequence[str], completions: Sequence[str], max_length: int):
    """(input_ids, attention_mask) of prompt+completion samples, padded on the tokenizer's side."""
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    rows = [encode_sample_ids(tokenizer, p, c, max_length)[0] for p, c in zip(prompts, completions)]
    return pad_rows(rows, tokenizer.pad_token_id, getattr(tokenizer, "padding_side", "left"))


@torch.no_grad()
def score_rows(rm: RewardModel, rows: Sequence[Sequence[int]], pad_id: int, batch_size: int = 16) -> list[float]:
    """Rewards of pre-tokenized rows, batched by length (less padding), in input order."""
    device = next(rm.parameters()).device
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    rewards = [0.0] * len(rows)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        ids, mask = pad_rows([rows[i] for i in idx], pad_id)
        for i, r in zip(idx, rm(ids.to(device), mask.to(device)).tolist()):
            rewards[i] = r
    return rewards


def score_texts(rm: RewardModel, tokenizer, prompts: Sequence[str], completions: Sequence[str],
                batch_size: int = 16, max_length: int = 512) -> list[float]:
    """The reward of each (prompt, completion), in input order."""
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    was_training = rm.training
    rm.eval()
    try:
        rows = [encode_sample_ids(tokenizer, p, c, max_length)[0] for p, c in zip(prompts, completions)]
        return score_rows(rm, rows, tokenizer.pad_token_id, batch_size)
    finally:
        rm.train(was_training)
