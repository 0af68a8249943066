"""Sampling K completions per prompt from a causal LM: batched across prompts and samples, left
padding, KV cache (HF `generate`), stop at EOS. Used by the generate stage (`labeling.generate`) and by
the policy stage."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from rlhf.models import eos_token_ids, format_prompt

log = logging.getLogger(__name__)


@dataclass
class SamplingParams:
    temperature: float = 0.7
    """Softmax temperature; logprobs used in RL are taken at this same temperature."""
    top_p: float = 1.0
    """Nucleus sampling mass (1.0 = off)."""
    max_new_tokens: int = 64
    """Longest completion in tokens; a completion that reaches it without EOS is 'unfinished'."""


@dataclass
class EncodedPrompts:
    input_ids: torch.Tensor       # [B, P], left-padded
    attention_mask: torch.Tensor  # [B, P]
    truncated: list[bool]         # which prompts lost tokens on the left to fit the context


def encode_prompts(tokenizer, prompts: list[str], max_prompt_tokens: int) -> EncodedPrompts:
    """Chat-format and tokenize prompts, keep the last `max_prompt_tokens` tokens of each (the end of
    a prompt, with the generation prompt, matters most), and left-pad them into one batch."""
    texts = [format_prompt(tokenizer, p) for p in prompts]
    templated = bool(getattr(tokenizer, "chat_template", None))
    rows = [tokenizer(t, add_special_tokens=not templated)["input_ids"] for t in texts]
    truncated = [len(r) > max_prompt_tokens for r in rows]
    rows = [r[-max_prompt_tokens:] for r in rows]
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], dtype=torch.long)
    attention_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long)
    return EncodedPrompts(input_ids, attention_mask, truncated)


def max_prompt_tokens(model, max_new_tokens: int) -> int:
    context = getattr(model.config, "max_position_embeddings", None) or 2048
    if context <= max_new_tokens:
        raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in a context of {context}")
    return context - max_new_tokens


def completion_lengths(response_ids: torch.Tensor, eos_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: number of tokens before the first EOS (or all of them), and whether an EOS was seen."""
    is_eos = torch.isin(response_ids, torch.tensor(eos_ids, device=response_ids.device))
    finished = is_eos.any(dim=1)
    cap = torch.full_like(finished, response_ids.shape[1], dtype=torch.long)
    first_eos = torch.where(finished, is_eos.float().argmax(dim=1), cap)
    return first_eos, finished


@torch.no_grad()
def sample_batch(model, tokenizer, prompts: list[str], num_samples: int, params: SamplingParams,
                 generator_seed: int | None = None, with_logits: bool = False):
    """Sample `num_samples` completions for each prompt in one `generate` call.

    Returns the encoded prompts and the response ids [B*num_samples, T] (rows grouped by prompt,
    samples of prompt i at rows i*num_samples ... ); tokens after the first EOS are padding.
    `with_logits=True` adds a third item: the model's raw logits [B*num_samples, T, V] at every sampled
    position, before temperature and any logits processor (what a forward pass over the sequence gives, up
    to float error), on the model's device.
    """
    encoded = encode_prompts(tokenizer, prompts, max_prompt_tokens(model, params.max_new_tokens))
    for prompt, cut in zip(prompts, encoded.truncated):
        if cut:
            log.warning("prompt longer than the model's context, truncated from the left: %.60r", prompt)
    if generator_seed is not None:
        torch.manual_seed(generator_seed)
    device = next(model.parameters()).device
    out = model.generate(
        input_ids=encoded.input_ids.to(device),
        attention_mask=encoded.attention_mask.to(device),
        do_sample=True,
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=0,
        max_new_tokens=params.max_new_tokens,
        min_new_tokens=1,  # an immediate EOS would give an empty completion
        num_return_sequences=num_samples,
        eos_token_id=eos_token_ids(model, tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        use_cache=True,
        output_logits=with_logits,
        return_dict_in_generate=with_logits,
    )
    if not with_logits:
        return encoded, out[:, encoded.input_ids.shape[1]:].cpu()
    return encoded, out.sequences[:, encoded.input_ids.shape[1]:].cpu(), torch.stack(out.logits, dim=1)


def decode_responses(tokenizer, response_ids: torch.Tensor, eos_ids: list[int]) -> list[tuple[str, int]]:
    """(text, token count) per row, cut at the first EOS."""
    lengths, _ = completion_lengths(response_ids, eos_ids)
    return [(tokenizer.decode(row[:n], skip_special_tokens=True).strip(), int(n))
            for row, n in zip(response_ids, lengths.tolist())]
