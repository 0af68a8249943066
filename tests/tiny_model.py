"""A tiny Llama-style chat model built from a config (random weights, a small byte-level BPE
tokenizer), for tests and `rlhf demo --quick --tiny`: it exercises every code path of the real
default model in milliseconds, including its traps (chat template, pad id == EOS id)."""

from __future__ import annotations

from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

_CORPUS = [
    "Once upon a time a small fox found a silver key in the snow and the tall tree told a tale.",
    "Describe a sunny morning at the beach. The sea is warm, the sand is soft and the sky is blue.",
    "Give three tips for staying focused while studying: sleep well, take breaks, and plan your day.",
    "Write a short poem about the moon. Silver moon, softly shining, sings to sleepy seas.",
    "The lighthouse keeper heard a knock at midnight, and a brave brown bear stood by the door.",
    "Peter Piper picked a peck of pickled peppers; big bright birds built bold blue boats.",
]


def build_tiny_model(path: str | Path, *, seed: int = 0, hidden_size: int = 32, layers: int = 2,
                     vocab_size: int = 384, max_positions: int = 512) -> Path:
    """Write a tiny chat model + tokenizer to `path` (loadable with from_pretrained) and return it."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(_CORPUS * 4, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|im_end|>",
        unk_token="<|endoftext|>", pad_token="<|im_end|>",  # pad == EOS, like the default model
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(path)

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=hidden_size * 2,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=max_positions, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    return path
