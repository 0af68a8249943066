"""One chat template for every stage: the same conversation gives the same token ids in generation (the
policy's prompts, PPO's queries), the reward model's encoding (training, `rlhf score`, evaluation, the policy's
reward role), the data pipeline (train-rm and DPO) and the exported AutoModelForSequenceClassification folder;
and the one truncation rule for over-long conversations."""

import logging
from types import SimpleNamespace

import pytest
import torch
from test_reward_model_data import write_jsonl

from reward_model.data import DataStats, build_examples, find_data, tokenize_examples
from reward_model.export_model import assistant_header_ids
from reward_model.model import encode_sample_ids
from reward_model.modeling_rlhf_reward import RLHFRewardModel
from rlhf.generation import encode_prompts
from rlhf.models import fit_prompt, load_tokenizer, prompt_token_ids
from rlhf.records import Message, parse_prompt

CHAT = [{"role": "system", "content": "You are a kind fox."}, {"role": "user", "content": "Tell a tale."},
        {"role": "assistant", "content": "Once upon a time a fox found a key."},
        {"role": "user", "content": "And then what happened at the beach?"}]
REPLY = "The sea was warm and the sky was blue."


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return load_tokenizer(tiny_model_dir)


def test_every_stage_reads_the_same_ids_for_a_conversation(tok, tmp_path):
    prompt = parse_prompt(CHAT)
    # the tokenizer's own chat template, as the model was tuned with
    expected_prompt = tok(tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True),
                          add_special_tokens=False)["input_ids"]
    reply_ids = tok(REPLY + tok.eos_token, add_special_tokens=False)["input_ids"]

    generation = encode_prompts(tok, [prompt], 10_000)  # generate, PPO's queries
    assert generation.input_ids[0].tolist() == expected_prompt and generation.truncated == [False]
    sample = encode_sample_ids(tok, prompt, REPLY, 10_000)  # score, eval-rm, the policy's reward role
    assert sample.ids == expected_prompt + reply_ids and sample.completion_length == len(reply_ids)

    # train-rm and DPO: the data pipeline, from TRL's conversational pairs and from a rankings row with messages
    write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": CHAT, "chosen": [{"role": "assistant", "content": REPLY}],
                                            "rejected": [{"role": "assistant", "content": "No."}]}])
    write_jsonl(tmp_path / "rankings.jsonl", [{"messages": CHAT, "completions": [{"text": "No.", "rank": 2},
                                                                                 {"text": REPLY, "rank": 1}]}])
    for name, position in (("pairs.jsonl", 0), ("rankings.jsonl", 1)):
        examples = build_examples(find_data(tmp_path / name).train, DataStats())
        tokenize_examples(examples, tok, 10_000, DataStats())
        assert examples[0].rows[position].ids == sample.ids, name

    # the exported folder: the transformers user formats the whole dialogue with the template; the model
    # finds the completion after the last assistant header, and it is exactly the tokens `rlhf score` reads
    full = tok.apply_chat_template(CHAT + [{"role": "assistant", "content": REPLY}], tokenize=False)
    ids = tok(full, add_special_tokens=False)["input_ids"]
    assert ids[:len(sample.ids)] == sample.ids  # the template only adds what follows the EOS
    config = SimpleNamespace(assistant_header_ids=assistant_header_ids(tok), eos_token_id=tok.eos_token_id,
                             pool="mean")
    mask = RLHFRewardModel.completion_mask(SimpleNamespace(config=config), torch.tensor([ids]),
                                           torch.ones(1, len(ids), dtype=torch.long))[0].tolist()
    assert [i for i, m in zip(ids, mask) if m] == reply_ids


def turns(n):
    """A system message and n exchanges, ending in a user turn (2n + 1 messages after the system one)."""
    chat = [Message("system", "Be brief.")]
    for i in range(n):
        chat += [Message("user", f"Question {i} about the silver moon and the sea?"),
                 Message("assistant", f"Answer {i}: the moon sings softly to the sleepy sea.")]
    return tuple(chat) + (Message("user", "Last question: what did the fox find?"),)


def test_an_over_long_conversation_loses_its_oldest_turns_first(tok):
    chat = turns(4)
    full = prompt_token_ids(tok, chat)
    keep_two = prompt_token_ids(tok, chat[:1] + chat[5:])  # system + the last 2 exchanges + the last user turn
    fitted = fit_prompt(tok, chat, len(keep_two))
    assert fitted == (keep_two, 4, 0) and fitted.shortened
    assert fit_prompt(tok, chat, len(full)) == (full, 0, 0)  # fits: untouched
    one_less = fit_prompt(tok, chat, len(keep_two) - 1)  # one exchange more goes; what is left starts with a user turn
    assert one_less == (prompt_token_ids(tok, chat[:1] + chat[7:]), 6, 0)
    minimal = prompt_token_ids(tok, (chat[0], chat[-1]))  # the system message and the last user turn are kept
    assert fit_prompt(tok, chat, len(minimal)) == (minimal, 8, 0)
    cut = fit_prompt(tok, chat, len(minimal) - 3)  # past that, the first tokens go
    assert cut == (minimal[3:], 8, 3)
    # a string prompt keeps its last tokens, as before
    text = prompt_token_ids(tok, "Tell me about the moon and the sea.")
    assert fit_prompt(tok, "Tell me about the moon and the sea.", len(text) - 2) == (text[2:], 0, 2)


def test_the_completion_is_never_cut_to_fit_and_training_counts_what_was_shortened(tok, tmp_path, caplog):
    chat = turns(4)
    reply_ids = tok(REPLY + tok.eos_token, add_special_tokens=False)["input_ids"]
    keep_two = prompt_token_ids(tok, chat[:1] + chat[5:])
    max_length = len(keep_two) + len(reply_ids)
    sample = encode_sample_ids(tok, chat, REPLY, max_length)
    assert sample.ids == keep_two + reply_ids and sample.truncated and sample.completion_length == len(reply_ids)
    long_reply = " ".join(["moon"] * 200)
    over = encode_sample_ids(tok, chat, long_reply, 32)  # a completion alone over the limit: said, not silent
    assert over.completion_length == 32 and over.truncated

    rows = [{"prompt": [m.to_dict() for m in chat], "chosen": [{"role": "assistant", "content": REPLY}],
             "rejected": [{"role": "assistant", "content": text}]} for text in ("No.", long_reply)]
    write_jsonl(tmp_path / "long.jsonl", rows + [{"prompt": "Hi", "chosen": "a", "rejected": "b"}])
    stats = DataStats()
    examples = build_examples(find_data(tmp_path / "long.jsonl").train, stats)
    with caplog.at_level(logging.WARNING):
        tokenize_examples(examples, tok, max_length, stats)
    # (chat, REPLY), (chat, "No.") shortened, (chat, long_reply) cut; the short pair fits
    assert (stats.truncated_samples, stats.cut_completions) == (3, 1)
    assert f"3 sample(s) over --max-length {max_length}: 2 shortened their prompt" in caplog.text
    assert "1 completion(s) alone over it keep only their last tokens" in caplog.text
