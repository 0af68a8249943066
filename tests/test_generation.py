import json

import pytest
import torch

from labeling.generate import generate_tasks
from pipeline.cli import main
from rlhf.generation import SamplingParams, completion_lengths, decode_responses, encode_prompts, sample_batch
from rlhf.models import format_prompt, load_causal_lm, load_tokenizer


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_causal_lm(tiny_model_dir).eval(), load_tokenizer(tiny_model_dir)


def test_encode_prompts_left_pads_and_truncates_from_the_left(tiny):
    _, tok = tiny
    enc = encode_prompts(tok, ["hi", "a much longer prompt about a fox and a key"], max_prompt_tokens=1000)
    short, long = enc.attention_mask
    assert long.all() and not short[0] and short[-1]  # padding sits on the left
    assert enc.input_ids[1].tolist() == tok(format_prompt(tok, "a much longer prompt about a fox and a key"),
                                            add_special_tokens=False)["input_ids"]
    cut = encode_prompts(tok, ["a much longer prompt about a fox and a key"], max_prompt_tokens=5)
    assert cut.truncated == [True] and cut.input_ids.shape[1] == 5
    assert cut.input_ids[0].tolist() == enc.input_ids[1, -5:].tolist()  # the end (generation prompt) is kept


def test_completion_lengths_stop_at_first_eos():
    responses = torch.tensor([[5, 6, 2, 7, 2], [5, 6, 7, 8, 9], [2, 2, 2, 2, 2]])
    lengths, finished = completion_lengths(responses, [2])
    assert lengths.tolist() == [2, 5, 0]
    assert finished.tolist() == [True, False, True]


def test_decoded_responses_stop_at_eos_and_replace_nul():
    class Tokenizer:  # decodes id i as chr(i): id 0 is a NUL, which the label store cannot hold
        def decode(self, ids, skip_special_tokens):
            return "".join(chr(i) for i in ids)

    rows = torch.tensor([[72, 0, 105, 2, 120], [32, 97, 98, 99, 32]])
    assert decode_responses(Tokenizer(), rows, [2]) == [("H\ufffdi", 3), ("abc", 5)]


def test_batched_sampling_matches_one_at_a_time(tiny):
    """Left padding + attention mask must not change what a prompt generates (near-greedy sampling)."""
    model, tok = tiny
    params = SamplingParams(temperature=1e-4, max_new_tokens=8)
    prompts = ["fox", "Tell a story about a tall tree and a brave bear"]
    _, batched = sample_batch(model, tok, prompts, 1, params, generator_seed=0)
    for i, prompt in enumerate(prompts):
        _, alone = sample_batch(model, tok, [prompt], 1, params, generator_seed=0)
        n = alone.shape[1]
        assert batched[i, :n].tolist() == alone[0].tolist()


def test_generate_tasks_shape_order_and_reproducibility(tiny):
    model, tok = tiny
    prompts = [("p1", "Write a poem"), (None, "Tell a much longer story about a small fox"), ("p3", "Hi")]
    params = SamplingParams(max_new_tokens=6)
    run = lambda seed: list(generate_tasks(model, tok, prompts, 3, params, model_name="tiny", seed=seed,
                                           batch_size=4))
    tasks = run(0)
    assert [t.prompt for t in tasks] == [p for _, p in prompts]  # input order kept despite length sorting
    assert tasks[0].id == "p1" and tasks[1].id.startswith("t-")
    for task in tasks:
        assert len(task.completions) == 3
        assert len({c.id for c in task.completions}) == 3
        assert all(c.model == "tiny" and 1 <= c.num_tokens <= 6 for c in task.completions)
    assert run(0) == tasks
    assert run(1) != tasks


def _write(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


def test_cli_generate_writes_tasks(tiny_model_dir, tmp_path, capsys):
    prompts = _write(tmp_path / "p.jsonl", [json.dumps({"id": f"q{i}", "prompt": f"Tell me about {w}"})
                                            for i, w in enumerate(["cats", "dogs", "the sea"])])
    out = tmp_path / "tasks.jsonl"
    assert main(["generate", "--prompts", prompts, "--k", "2", "--out", str(out), "--model", tiny_model_dir,
                 "--max-new-tokens", "4", "--limit", "2"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["q0", "q1"]
    assert all(len(r["completions"]) == 2 for r in rows)


@pytest.mark.parametrize("lines, args, message", [
    (None, [], "no such file"),
    (['{"prompt": "ok"}', '{"prompt": '], [], "p.jsonl:2: not valid JSON"),
    (['{"prompt": "ok"}', '{"prompt": "  "}'], [], "p.jsonl:2: 'prompt' is empty"),
    (['{"prompt": "ok"}'], ["--k", "1"], "--k must be at least 2"),
    (['{"prompt": "ok"}'], ["--model", "/nonexistent/model-dir"], "cannot load model"),
])
def test_cli_generate_bad_input_is_one_line_and_writes_nothing(tiny_model_dir, tmp_path, capsys, lines, args,
                                                               message):
    prompts = _write(tmp_path / "p.jsonl", lines) if lines is not None else str(tmp_path / "p.jsonl")
    out = tmp_path / "tasks.jsonl"
    out.write_text("previous\n")
    argv = ["generate", "--prompts", prompts, "--out", str(out), "--model", tiny_model_dir, "--max-new-tokens", "3"]
    assert main(argv + args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert out.read_text() == "previous\n"


def test_model_dir_without_config_is_a_clear_error(tmp_path):
    from rlhf.errors import UserError
    with pytest.raises(UserError, match="has no config.json"):
        load_tokenizer(str(tmp_path))


def _plain_generate(model, tok, prompts, k, params, seed, with_logits=False):
    """Today's reference: transformers' own sampler with the arguments the toolkit samples with."""
    from rlhf.models import eos_token_ids

    enc = encode_prompts(tok, prompts, 10_000)
    torch.manual_seed(seed)
    out = model.generate(input_ids=enc.input_ids, attention_mask=enc.attention_mask, do_sample=True,
                         temperature=params.temperature, top_p=params.top_p, top_k=0,
                         max_new_tokens=params.max_new_tokens, min_new_tokens=1, num_return_sequences=k,
                         eos_token_id=eos_token_ids(model, tok), pad_token_id=tok.pad_token_id, use_cache=True,
                         output_logits=with_logits, return_dict_in_generate=with_logits)
    if with_logits:
        return out.sequences[:, enc.input_ids.shape[1]:], torch.stack(out.logits, dim=1)
    return out[:, enc.input_ids.shape[1]:], None


PROMPTS = ["fox", "Tell a story about a tall tree and a brave bear", "Why is the sea blue?"]


@pytest.mark.parametrize("top_p", [1.0, 0.8])
@pytest.mark.parametrize("static_cache", [True, False])
def test_samples_equal_plain_generate_for_a_seed(tiny, top_p, static_cache, monkeypatch):
    """Prefix read once per prompt, static or dynamic cache, packed weights: token for token what
    `model.generate` samples for the same seed (and the same raw logits), over three seeds."""
    model, tok = tiny
    monkeypatch.setattr(type(model), "_can_compile_fullgraph", static_cache)
    # 20 more end-of-sequence ids, so that most rows end early and the padding after EOS is covered
    monkeypatch.setattr(model.generation_config, "eos_token_id", [tok.eos_token_id, *range(40, 60)])
    params = SamplingParams(temperature=0.9, top_p=top_p, max_new_tokens=12)
    for seed in range(3):
        expected, expected_logits = _plain_generate(model, tok, PROMPTS, 4, params, seed, with_logits=True)
        _, ids, logits = sample_batch(model, tok, PROMPTS, 4, params, generator_seed=seed, with_logits=True)
        assert ids.tolist() == expected.tolist()
        torch.testing.assert_close(logits, expected_logits, rtol=1e-4, atol=1e-4)
    assert (ids == tok.pad_token_id).any()


def test_packed_weights_are_used_and_then_dropped(tiny):
    from torch import nn

    from rlhf.generation import packed_linear_weights

    model, _ = tiny
    linears = [m for m in model.modules() if type(m) is nn.Linear]
    x = torch.randn(3, 5, linears[0].in_features)
    with packed_linear_weights(model, 3):
        packed = [("forward" in vars(m)) for m in linears]
        inside = linears[0](x)
    assert all(packed) == torch.backends.mkldnn.is_available()
    assert not any("forward" in vars(m) for m in linears)
    torch.testing.assert_close(inside, linears[0](x), rtol=1e-5, atol=1e-5)
