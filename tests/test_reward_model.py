"""reward_model.model: last-token reads, padding invariance, LoRA wiring, save/load round trip."""

import json

import pytest
import torch

from reward_model.model import (
    Readout,
    create_reward_model,
    encode_sample_ids,
    encode_samples,
    final_hidden_states,
    head_rewards,
    last_token_index,
    load_reward_model,
    pad_rows,
    pad_samples,
    readout_texts,
    reward_features,
    save_reward_model,
    score_texts,
)
from rlhf.errors import UserError
from rlhf.models import format_sample


@pytest.fixture(scope="module")
def rm_and_tok(tiny_model_dir):
    torch.manual_seed(0)
    rm, tok = create_reward_model(tiny_model_dir, lora_r=4)
    # LoRA B starts at zero; give the adapter a non-trivial value so it visibly changes the output.
    with torch.no_grad():
        for name, p in rm.backbone.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    rm.eval()
    return rm, tok


def test_last_token_index_left_right_and_gaps():
    mask = torch.tensor([
        [0, 0, 1, 1, 1],   # left padded -> 4
        [1, 1, 1, 0, 0],   # right padded -> 2
        [1, 1, 1, 1, 1],   # full -> 4
        [0, 1, 0, 0, 0],   # single token -> 1
    ])
    assert last_token_index(mask).tolist() == [4, 2, 4, 1]
    assert last_token_index(mask.bool()).dtype == torch.long


def test_last_token_index_ignores_ids_equal_to_pad():
    # pad id == EOS id: a real EOS at the end must count; ids play no part at all.
    ids, mask = pad_rows([[5, 7, 2], [5, 2]], pad_id=2, side="right")
    assert ids.tolist() == [[5, 7, 2], [5, 2, 2]]
    assert last_token_index(mask).tolist() == [2, 1]


def test_lora_targets_attention_and_mlp(rm_and_tok):
    rm, _ = rm_and_tok
    targets = set(rm.backbone.peft_config["default"].target_modules)
    assert targets == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    from rlhf.causal_lm import lora_target_modules
    assert set(lora_target_modules(rm.backbone)) == targets  # also read through an existing adapter
    trainable = {n for n, p in rm.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in trainable)
    assert not any("embed_tokens" in n or "lm_head" in n for n in trainable)


def test_final_hidden_states_matches_full_model_and_runs_adapter(rm_and_tok):
    rm, tok = rm_and_tok
    ids, mask, _ = encode_samples(tok, ["Tell a tale.", "Hi"], ["Once upon a time", "Sea"], 64)
    h = final_hidden_states(rm.backbone, ids, mask)
    from rlhf.causal_lm import position_ids_from_mask
    full = rm.backbone(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                       output_hidden_states=True)
    torch.testing.assert_close(h, full.hidden_states[-1])
    with rm.backbone.disable_adapter():
        h_base = final_hidden_states(rm.backbone, ids, mask)
    assert not torch.allclose(h, h_base)  # the LoRA adapter is active in the direct decoder call


@pytest.mark.parametrize("readout", [Readout(0, "last"), Readout(0, "mean"), Readout(1, "mean"), Readout(1, "last")])
def test_reward_same_under_left_and_right_padding(rm_and_tok, readout):
    rm, tok = rm_and_tok
    short = encode_sample_ids(tok, "Hi", "Sea", 64)
    long = encode_sample_ids(tok, "Write a short poem about the moon.", "Silver moon, softly shining.", 64)
    assert len(long.ids) > len(short.ids) + 5
    saved, rm.readout = rm.readout, readout
    try:
        with torch.no_grad():
            alone = rm(*pad_samples([short], tok.pad_token_id))
            left = rm(*pad_samples([long, short], tok.pad_token_id, "left"))
            right = rm(*pad_samples([long, short], tok.pad_token_id, "right"))
    finally:
        rm.readout = saved
    torch.testing.assert_close(left, right, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(left[1], alone[0], atol=1e-5, rtol=1e-5)


def test_completion_mask_marks_the_completion_and_eos(rm_and_tok):
    _, tok = rm_and_tok
    sample = encode_sample_ids(tok, "Write a short poem.", "Silver moon", 64)
    completion = tok("Silver moon" + tok.eos_token, add_special_tokens=False)["input_ids"]
    assert sample.completion_length == len(completion) and sample.ids[-len(completion):] == completion
    other = encode_sample_ids(tok, "Hi", "Sea and sky and sun", 64)
    for side in ("left", "right"):
        ids, mask, comp = pad_samples([sample, other], tok.pad_token_id, side)
        for row, s in enumerate((sample, other)):
            assert ids[row][comp[row].bool()].tolist() == s.ids[-s.completion_length:]
        assert not (comp.bool() & ~mask.bool()).any()


def test_readout_mean_at_a_middle_layer_is_computed_by_hand(rm_and_tok):
    """The mean read-out after layer 1 equals the hand-computed mean of hidden_states[1] over the
    completion's tokens, with the final norm applied; the layers above are not run."""
    rm, tok = rm_and_tok
    samples = [encode_sample_ids(tok, "Tell a tale.", "Once upon a time", 64), encode_sample_ids(tok, "Hi", "Sea", 64)]
    ids, mask, comp = pad_samples(samples, tok.pad_token_id)
    decoder = rm.backbone.get_base_model().model
    with torch.no_grad():
        from rlhf.causal_lm import position_ids_from_mask
        out = decoder(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                      output_hidden_states=True)
        h1 = decoder.norm(out.hidden_states[1])
        expected = torch.stack([h1[i][comp[i].bool()].mean(0) for i in range(2)])
        got = reward_features(rm.backbone, Readout(1, "mean"), ids, mask, comp)
        last = reward_features(rm.backbone, Readout(1, "last"), ids, mask, comp)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(last, h1[:, -1], atol=1e-5, rtol=1e-5)
    assert len(decoder.layers) == 2  # restored after the truncated forward


def test_middle_readout_adapts_only_the_layers_it_runs(tiny_model_dir):
    rm, _ = create_reward_model(tiny_model_dir, lora_r=4, readout_layer=0.5, readout_pool="mean")
    assert rm.readout == Readout(1, "mean")
    lora_layers = {n.split(".layers.")[1].split(".")[0] for n, _ in rm.backbone.named_parameters() if "lora_A" in n}
    assert lora_layers == {"0"}


def test_encode_keeps_completion_and_truncates_prompt_left(rm_and_tok):
    _, tok = rm_and_tok
    prompt, completion = "The tall tree told a tale. " * 20, "Peter picked peppers"
    full_ids, _, cut = encode_sample_ids(tok, prompt, completion, 10_000)
    assert not cut
    # Same tokens as the one text form the RM scores (format_sample), for this boundary.
    assert tok.decode(full_ids) == format_sample(tok, prompt, completion)
    ids, _, cut = encode_sample_ids(tok, prompt, completion, 40)
    assert cut and len(ids) == 40
    assert ids[-1] == tok.eos_token_id
    comp = tok(completion + tok.eos_token, add_special_tokens=False)["input_ids"]
    assert ids[-len(comp):] == comp
    assert ids[:-len(comp)] == full_ids[len(full_ids) - 40:len(full_ids) - len(comp)]
    ids, n, cut = encode_sample_ids(tok, "x", "word " * 200, 16)
    assert n == 16
    assert cut and len(ids) == 16 and ids[-1] == tok.eos_token_id


def test_save_load_round_trip(rm_and_tok, tmp_path):
    rm, tok = rm_and_tok
    rm.reward_bias.fill_(0.25)
    try:
        prompts, completions = ["Tell a tale.", "Hi", "Sky?"], ["Once upon a time", "Sea", ""]
        before = score_texts(rm, tok, prompts, completions)
        save_reward_model(rm, tmp_path / "rm", {"base_model": rm_and_tok[0].backbone.peft_config["default"]
                                                .base_model_name_or_path, "max_length": 64, "lora_r": 4})
    finally:
        rm.reward_bias.fill_(0.0)
    names = {p.name for p in (tmp_path / "rm").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "score_head.safetensors",
            "reward_model.json"} <= names
    meta = json.loads((tmp_path / "rm" / "reward_model.json").read_text())
    assert meta["format"] == "rlhf-reward-model/2" and meta["reward_bias"] == 0.25
    assert meta["readout"] == {"layer": 0, "pool": "last"}
    loaded, tok2 = load_reward_model(tmp_path / "rm")
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    after = score_texts(loaded, tok2, prompts, completions)
    assert after == pytest.approx(before, abs=1e-6)
    from safetensors.torch import load_file
    head = load_file(str(tmp_path / "rm" / "score_head.safetensors"))
    assert head["weight"].shape == (1, 32) and head["bias"].shape == (1,)


def test_a_directory_of_the_first_format_loads_with_the_last_token_readout(rm_and_tok, tmp_path):
    rm, _ = rm_and_tok
    save_reward_model(rm, tmp_path / "rm", {"base_model": rm.backbone.peft_config["default"].base_model_name_or_path,
                                            "max_length": 64, "lora_r": 4})
    meta_path = tmp_path / "rm" / "reward_model.json"
    meta = json.loads(meta_path.read_text())
    del meta["readout"]
    meta_path.write_text(json.dumps({**meta, "format": "rlhf-reward-model/1"}))
    loaded, _ = load_reward_model(tmp_path / "rm")
    assert loaded.readout == Readout(0, "last")
    meta_path.write_text(json.dumps({**meta, "readout": {"layer": 0, "pool": "max"}}))
    with pytest.raises(UserError, match="pool must be"):
        load_reward_model(tmp_path / "rm")


def test_load_reward_model_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_reward_model(tmp_path / "nope")
    with pytest.raises(UserError, match="not a reward model directory"):
        load_reward_model(tmp_path)


def test_bfloat16_backbone_keeps_lora_head_and_loss_float32(tiny_model_dir):
    from reward_model.loss import build_pair_index, ranking_loss, ranking_pairs

    rm, tok = create_reward_model(tiny_model_dir, lora_r=4, dtype=torch.bfloat16)
    assert rm.backbone.get_base_model().model.embed_tokens.weight.dtype == torch.bfloat16
    lora = [p for n, p in rm.named_parameters() if p.requires_grad]
    assert lora and all(p.dtype == torch.float32 for p in lora)
    rewards = rm(*encode_samples(tok, ["Hi", "Hi", "Hi"], ["Sea", "Sun sea", "Moon"], 64))
    assert rewards.dtype == torch.float32
    loss, _ = ranking_loss(rewards, build_pair_index([ranking_pairs([1, 2, 3])], [3]))
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in lora)


def test_score_texts_is_the_forward_pass_and_readout_texts_what_the_head_reads(rm_and_tok):
    rm, tok = rm_and_tok
    rm.reward_bias.fill_(0.5)
    try:
        prompts, completions = ["Tell a tale.", "Hi", "Sky?", "Name a fruit."], ["Once upon a time", "Sea", "", "A"]
        ids, mask, completion_mask = encode_samples(tok, prompts, completions, 64)
        with torch.no_grad():
            batched = rm(ids, mask, completion_mask).tolist()  # one padded batch, not sorted by length
        # batch_size 3: two length-sorted batches, rows returned in input order
        assert score_texts(rm, tok, prompts, completions, batch_size=3) == pytest.approx(batched, abs=1e-5)
        features = readout_texts(rm, tok, prompts, completions, batch_size=3)
        assert features.shape == (4, 32) and features.dtype == torch.float32
        expected = (features @ rm.score_head.weight[0] + rm.score_head.bias - 0.5).tolist()
        assert head_rewards(rm, features) == pytest.approx(expected, abs=1e-6)
    finally:
        rm.reward_bias.fill_(0.0)
    assert readout_texts(rm, tok, [], []).shape == (0, 32) and score_texts(rm, tok, [], []) == []
    with pytest.raises(ValueError, match="2 prompts but 1 completions"):
        readout_texts(rm, tok, ["a", "b"], ["c"])
