"""Sampling K completions per prompt from a causal LM: batched across prompts and samples, left padding, KV
cache, stop at EOS; HF `generate`'s samples for a seed, in a fraction of its time (`decode_samples`). Used by
the generate stage (`labeling.generate`) and by the policy stage."""

from __future__ import annotations

import inspect
import logging
import math
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from rlhf.models import eos_token_ids, fit_prompt
from rlhf.records import Prompt

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


def encode_prompts(tokenizer, prompts: list[Prompt], max_prompt_tokens: int) -> EncodedPrompts:
    """Chat-format and tokenize prompts within `max_prompt_tokens` each (`rlhf.models.fit_prompt`: the end
    of a prompt, with the generation prompt, matters most), and left-pad them into one batch."""
    fitted = [fit_prompt(tokenizer, p, max_prompt_tokens) for p in prompts]
    truncated = [f.shortened for f in fitted]
    rows = [f.ids for f in fitted]
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
    """Sample `num_samples` completions for each prompt in one batched decode (`decode_samples`).

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
    responses, logits = decode_samples(model, encoded.input_ids.to(device), encoded.attention_mask.to(device),
                                       num_samples, params, eos_token_ids(model, tokenizer), tokenizer.pad_token_id,
                                       with_logits=with_logits)
    if not with_logits:
        return encoded, responses.cpu()
    return encoded, responses.cpu(), logits


@torch.no_grad()
def decode_samples(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, num_samples: int,
                   params: SamplingParams, eos_ids: list[int], pad_id: int, with_logits: bool = False):
    """(response ids [B*num_samples, T], raw logits [B*num_samples, T, V] or None): the samples of
    `model.generate(do_sample=True, temperature, top_p, top_k=0, min_new_tokens=1, num_return_sequences)` for
    the same seed, token for token, in a fraction of its time on a CPU:

    - each prompt is read once and its KV cache copied to its samples (generate reads it once per sample);
    - the cache is preallocated (a static cache) where the model supports one, so a step appends nothing;
    - the logits are taken at the last position only, and every per-row decision is one batched op;
    - on a CPU in float32, the linear layers run on weights packed for oneDNN (`packed_linear_weights`).

    The sampling ops are generate's own (temperature, then nucleus truncation, softmax, one multinomial draw
    over all rows), so they use the random stream exactly as it does; rows that have ended are fed `pad_id`.
    """
    rows, prompt_length = input_ids.shape
    steps = params.max_new_tokens
    total = rows * num_samples
    device = input_ids.device
    eos = torch.tensor(eos_ids, device=device)
    # generate's positions for left padding: the count of real tokens before each one (pads get 1)
    positions = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)
    nucleus = None
    if params.top_p < 1.0:
        from transformers import TopPLogitsWarper

        nucleus = TopPLogitsWarper(params.top_p)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a peft model's own
    # the forward argument that takes the KV cache: `cache` in newer transformers, `past_key_values` before
    cache_argument = "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"
    with packed_linear_weights(model, total):
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=True,
                    logits_to_keep=1)
        cache, static = _expanded_cache(base, out.past_key_values, num_samples, prompt_length + steps)
        logits = out.logits[:, -1].float().repeat_interleave(num_samples, 0)
        del out
        mask = torch.zeros(total, prompt_length + steps, dtype=attention_mask.dtype, device=device)
        mask[:, :prompt_length] = attention_mask.repeat_interleave(num_samples, 0)
        position = positions[:, -1].repeat_interleave(num_samples, 0)
        unfinished = torch.ones(total, dtype=torch.long, device=device)
        tokens, raw_logits = [], []
        for step in range(steps):
            if with_logits:
                raw_logits.append(logits)
            scores = logits.clone()
            if step == 0:  # min_new_tokens=1: an immediate EOS would give an empty completion
                scores[:, eos] = -math.inf
            scores = scores / params.temperature
            if nucleus is not None:
                scores = nucleus(None, scores)
            next_tokens = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
            next_tokens = next_tokens * unfinished + pad_id * (1 - unfinished)
            tokens.append(next_tokens)
            unfinished = unfinished & ~torch.isin(next_tokens, eos)
            if step == steps - 1 or not unfinished.any():
                break
            mask[:, prompt_length + step] = 1
            position = position + 1
            width = prompt_length + steps if static else prompt_length + step + 1
            out = model(input_ids=next_tokens[:, None], attention_mask=mask[:, :width], position_ids=position[:, None],
                        use_cache=True, logits_to_keep=1, **{cache_argument: cache},
                        cache_position=torch.tensor([prompt_length + step], device=device))
            logits = out.logits[:, -1].float()
    responses = torch.stack(tokens, dim=1)
    return responses, (torch.stack(raw_logits, dim=1) if with_logits else None)


def _expanded_cache(base, prefill_cache, copies: int, length: int):
    """(cache, is static): the prompts' KV cache with each row repeated `copies` times, in a static cache of `length`
    positions when the model `base` (not a peft wrapper) supports one (transformers' `_can_compile_fullgraph`), else
    the dynamic one, expanded."""
    if not getattr(base, "_can_compile_fullgraph", False):
        prefill_cache.batch_repeat_interleave(copies)
        return prefill_cache, False
    from transformers import StaticCache

    static = StaticCache(config=base.config, max_cache_len=length)
    prompt_length = prefill_cache.get_seq_length()
    for index, layer in enumerate(prefill_cache.layers):
        static.update(layer.keys.repeat_interleave(copies, 0), layer.values.repeat_interleave(copies, 0), index,
                      {"cache_position": torch.arange(prompt_length, device=layer.keys.device)})
    return static, True


@contextmanager
def packed_linear_weights(model, rows: int):
    """On a CPU in float32, every `nn.Linear` of `model` computes with its weight reordered once into oneDNN's
    blocked layout for the duration of the block (about 0.3 s for SmolLM2-135M; the copy is dropped after).
    Decoding multiplies a few rows by each weight, where the default GEMM on plain weights reaches a fraction of
    the memory bandwidth: for SmolLM2's tied 49,152 x 576 output layer at 8 rows, 7.5 ms against 23.7 ms on a
    2-core AVX2 CPU. Same products up to float rounding. Elsewhere (a GPU, bfloat16, a torch without oneDNN) it
    does nothing."""
    weight = next(model.parameters())
    if weight.device.type != "cpu" or weight.dtype != torch.float32 or not torch.backends.mkldnn.is_available():
        yield
        return
    patched = []
    try:
        for module in model.modules():
            if type(module) is nn.Linear:
                packed = torch.ops.mkldnn._reorder_linear_weight(module.weight.detach(), rows)
                module.forward = partial(_packed_linear, packed=packed, bias=module.bias)
                patched.append(module)
    except (RuntimeError, AttributeError) as exc:  # a torch built without these oneDNN ops: the plain path
        log.debug("packed linear weights unavailable: %s", exc)
        for module in patched:
            del module.forward
        patched = []
    try:
        yield
    finally:
        for module in patched:
            del module.forward


def _packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def decode_responses(tokenizer, response_ids: torch.Tensor, eos_ids: list[int]) -> list[tuple[str, int]]:
    """(text, token count) per row, cut at the first EOS. A NUL the model wrote becomes U+FFFD: PostgreSQL's text
    cannot hold it, and the label store refuses it rather than cut the text."""
    lengths, _ = completion_lengths(response_ids, eos_ids)
    return [(tokenizer.decode(row[:n], skip_special_tokens=True).replace("\x00", "\ufffd").strip(), int(n))
            for row, n in zip(response_ids, lengths.tolist())]
