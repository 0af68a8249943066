"""The generate stage: sample K completions per prompt from the SFT model (batched, KV cache) into
labeling tasks. `rlhf generate` and the demo both run `run_generate`."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from rlhf.errors import UserError
from rlhf.hardware import DtypeName
from rlhf.records import Completion, Prompt, Task, content_id, encode_prompt

if TYPE_CHECKING:  # torch loads only when a command runs
    from rlhf.generation import SamplingParams


@dataclass
class GenerateConfig:
    """Settings of `rlhf generate`."""

    # data
    prompts: str
    """JSONL file, one {"prompt": ..., "id"?: ...} per line."""
    out: str
    """Output tasks JSONL that `rlhf import` reads (written atomically)."""
    limit: int | None = None
    """Use only the first N prompts."""
    # sampling
    model: str = "default"
    """SFT model: 'default' (SmolLM2-135M-Instruct, bundled), a local folder or a HF id."""
    k: int = 4
    """Completions per prompt (a ranking needs at least 2). A ranking of K gives C(K,2) pairs: a larger K teaches
    the reward model more per prompt at the cost of more reading per task (InstructGPT's labelers ranked 4 to 9;
    docs/benchmarks.md, "The learning curve and K = 8")."""
    temperature: float = 0.7
    """Sampling temperature."""
    top_p: float = 1.0
    """Nucleus sampling mass (1.0: off)."""
    max_new_tokens: int = 64
    """Completion length cap in tokens."""
    batch_size: int = 64
    """Sequences per generate call (prompts x K)."""
    dtype: DtypeName = "auto"
    """The model weights' dtype. auto: bfloat16 where the device computes it natively (a GPU with bf16 support, a
    CPU with AVX-512 BF16 or AMX), float32 elsewhere."""
    seed: int = 0
    """Random seed; the same seed reproduces a run."""

    def check(self) -> None:
        if self.k < 2:
            raise UserError(f"--k must be at least 2 (a ranking needs two completions), got {self.k}")
        if self.temperature <= 0:
            raise UserError("--temperature must be > 0")
        if not 0 < self.top_p <= 1:
            raise UserError("--top-p must be in (0, 1]")
        for name in ("max_new_tokens", "batch_size", "limit"):
            if (getattr(self, name) or 1) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be >= 1")


def run_generate(config: GenerateConfig, progress: bool | None = None) -> int:
    """Write one task per prompt to `config.out`; returns the number of tasks. `progress`: show a bar
    (None: only on a terminal)."""
    import torch
    from tqdm import tqdm

    from rlhf.generation import SamplingParams
    from rlhf.hardware import setup_compute
    from rlhf.jsonl import write_jsonl
    from rlhf.models import DEFAULT_MODEL, is_default_model, load_causal_lm, load_tokenizer
    from rlhf.prompts import read_prompts

    config.check()
    prompts = read_prompts(config.prompts, config.limit)
    dtype = setup_compute(config.dtype)
    tokenizer = load_tokenizer(config.model)
    model = load_causal_lm(config.model, dtype=getattr(torch, dtype)).eval()
    params = SamplingParams(config.temperature, config.top_p, config.max_new_tokens)
    name = DEFAULT_MODEL if is_default_model(config.model) else config.model
    disable = None if progress is None else not progress  # None: tqdm shows a bar on a terminal only
    with tqdm(total=len(prompts), desc="generate", unit="prompt", disable=disable) as bar:
        tasks = generate_tasks(model, tokenizer, prompts, config.k, params, model_name=name, seed=config.seed,
                               batch_size=config.batch_size, on_progress=bar.update)
        return write_jsonl(config.out, (t.to_dict() for t in tasks))


def generate_tasks(model, tokenizer, prompts: list[tuple[str | None, Prompt]], k: int, params: SamplingParams,
                   *, model_name: str, seed: int = 0, batch_size: int = 64,
                   on_progress: Callable[[int], None] | None = None) -> Iterator[Task]:
    """Yield one Task of K completions per (prompt_id, prompt), batching ~batch_size sequences per call.

    Prompts are batched in length order (less padding) but yielded in input order. Each batch is
    seeded from `seed` and its first prompt's index, so a run is reproducible. Empty or duplicate
    completions are resampled (up to 3 tries) so annotators get K distinct texts to rank.
    """
    if k < 2:
        raise ValueError("k must be at least 2 (a ranking needs two completions)")
    from rlhf.generation import decode_responses, sample_batch
    from rlhf.models import eos_token_ids
    from rlhf.seeds import SAMPLING, derived_seed

    eos = eos_token_ids(model, tokenizer)
    per_call = max(1, batch_size // k)
    order = sorted(range(len(prompts)), key=lambda i: len(encode_prompt(prompts[i][1])))
    results: dict[int, list[tuple[str, int]]] = {}
    next_to_yield = 0
    for start in range(0, len(order), per_call):
        idx = order[start:start + per_call]
        _, responses = sample_batch(model, tokenizer, [prompts[i][1] for i in idx], k, params,
                                    generator_seed=derived_seed(seed, idx[0], SAMPLING))
        decoded = decode_responses(tokenizer, responses, eos)
        for j, i in enumerate(idx):
            results[i] = _distinct(model, tokenizer, prompts[i][1], decoded[j * k:(j + 1) * k], params, eos)
        if on_progress:
            on_progress(len(idx))
        while next_to_yield in results:
            pid, prompt = prompts[next_to_yield]
            samples = results.pop(next_to_yield)
            task_id = pid or content_id("t-", encode_prompt(prompt), *[t for t, _ in samples])
            yield Task(task_id, prompt, tuple(
                Completion(f"{task_id}-{n}", text, model_name, ntok) for n, (text, ntok) in enumerate(samples)))
            next_to_yield += 1


def _distinct(model, tokenizer, prompt, samples, params, eos, tries: int = 3):
    from rlhf.generation import decode_responses, sample_batch

    samples = list(samples)
    for _ in range(tries):
        seen, bad = set(), []
        for n, (text, _) in enumerate(samples):
            if not text or text in seen:
                bad.append(n)
            seen.add(text)
        if not bad:
            break
        _, responses = sample_batch(model, tokenizer, [prompt], len(bad), params)
        for n, new in zip(bad, decode_responses(tokenizer, responses, eos)):
            samples[n] = new
    return samples
