"""What the reward model and the policy both do with a causal LM's tensors: find the last real token,
count positions over real tokens, run the decoder body without the LM head, name the projections LoRA
adapts, pad token rows."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

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


def decoder_body(causal_lm) -> nn.Module:
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
    out = decoder_body(causal_lm)(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
    )
    return out.last_hidden_state


def lora_target_modules(causal_lm) -> list[str]:
    """The attention and MLP projections to adapt: Llama's names when present, else every Linear
    inside the decoder (the LM head excluded), which peft matches by module-name suffix."""
    names = set()
    for name, module in decoder_body(causal_lm).named_modules():
        if not isinstance(module, nn.Linear) or ".lora_" in name:
            continue
        # Under an existing peft wrapper the original layer is `<proj>.base_layer`.
        names.add(name.removesuffix(".base_layer").rsplit(".", 1)[-1])
    llama = [n for n in _LLAMA_PROJECTIONS if n in names]
    return llama if llama else sorted(names)


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
