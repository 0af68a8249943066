"""Standard model artifacts (reward_model/export_model.py, policy.export.merge_policy): the exported reward
model loads with AutoModelForSequenceClassification and gives the rewards of `rlhf score` (the default
read-out, a middle layer's mean, and the last layer's last token), the merged policy loads with
AutoModelForCausalLM, each folder has a model card, and a missing base model is one clear line."""

import json
import shutil

import pytest
import torch
from test_reward_model_data import marker_pairs, write_jsonl

from pipeline.cli import main

SAMPLES = [("Tell me about the sea.", "sun sea peppers"), ("Write a poem.", "Silver seas sing softly."),
           ("Say hi.", ""), ("A longer prompt, about the moon and the stars over the bay at night.", "moon key")]


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))


def train_rm(tiny_model_dir, tmp_path, capsys, *flags):
    rows = marker_pairs(16)
    write_jsonl(tmp_path / "pairs.jsonl", [{**r, "split": "test" if i >= 12 else "train"} for i, r in enumerate(rows)])
    out = tmp_path / "rm"
    assert main(["train-rm", "--data", str(tmp_path / "pairs.jsonl"), "--out", str(out), "--model", tiny_model_dir,
                 "--epochs", "2", "--lr", "3e-3", "--batch-rankings", "6", "--checkpoint-every", "0", *flags]) == 0
    capsys.readouterr()
    return out


def rlhf_score(rm, tmp_path, capsys, *flags) -> list[float]:
    write_jsonl(tmp_path / "in.jsonl", [{"prompt": p, "completion": c} for p, c in SAMPLES])
    assert main(["score", "--rm", str(rm), "--input", str(tmp_path / "in.jsonl"), "--out",
                 str(tmp_path / "scored.jsonl"), *flags]) == 0
    capsys.readouterr()
    return [json.loads(line)["reward"] for line in (tmp_path / "scored.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("readout", [["--readout-layer", "1", "--readout-pool", "mean"],
                                     ["--readout-layer", "0", "--readout-pool", "last", "--dtype", "float32"]],
                         ids=["mean after layer 1 of 2, the default dtype", "last layer, last token, float32"])
def test_exported_reward_model_gives_the_rewards_of_rlhf_score(tiny_model_dir, tmp_path, capsys, one_thread, readout):
    """The folder holds float32 weights: it matches `rlhf score` of a float32 RM as it is, and of a bfloat16 one
    (the default) scored in float32 (`--dtype float32`)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    rm = train_rm(tiny_model_dir, tmp_path, capsys, *readout)
    meta = json.loads((rm / "reward_model.json").read_text())
    assert meta["readout"] == ({"layer": 1, "pool": "mean"} if "mean" in readout else {"layer": 0, "pool": "last"})
    assert abs(meta["reward_bias"]) > 1e-3  # the normalisation is part of what must match
    expected = rlhf_score(rm, tmp_path, capsys, *(["--dtype", "float32"] if meta["dtype"] == "bfloat16" else []))

    out = tmp_path / "hf"
    assert main(["export-model", "--rm", str(rm), "--out", str(out)]) == 0
    assert "trust_remote_code=True" in capsys.readouterr().out
    model = AutoModelForSequenceClassification.from_pretrained(out, trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    assert model.config.body["num_hidden_layers"] == (1 if "mean" in readout else 2)

    def conversation(prompt, completion):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt},
                                              {"role": "assistant", "content": completion}], tokenize=False)

    with torch.no_grad():
        one_by_one = [model(**tokenizer(conversation(p, c), return_tensors="pt", add_special_tokens=False)).logits[0, 0]
                      .item() for p, c in SAMPLES]
        batches = {}
        for side in ("left", "right"):
            tokenizer.padding_side = side
            batch = tokenizer([conversation(p, c) for p, c in SAMPLES], return_tensors="pt", padding=True,
                              add_special_tokens=False)
            batches[side] = model(**batch).logits[:, 0].tolist()
    for got in (one_by_one, batches["left"], batches["right"]):
        assert got == pytest.approx(expected, abs=1e-4)

    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\n") and "# Reward model" in card
    test = meta["training"]["test"]
    assert f"| accuracy | {test['accuracy']:.4g} |" in card and f"| pairs | {test['pairs']} |" in card
    assert "trust_remote_code=True" in card and str(tmp_path / "pairs.jsonl") in card
    with pytest.raises(ValueError, match="trust_remote_code"):  # never silently loaded as another architecture
        AutoModelForSequenceClassification.from_pretrained(out, trust_remote_code=False)

    assert main(["export-model", "--rm", str(rm), "--out", str(out)]) == 0  # an earlier export is replaced
    capsys.readouterr()
    assert main(["eval-rm", "--rm", str(rm), "--data", str(tmp_path / "pairs.jsonl"), "--data-split", "test",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == test["accuracy"]  # the held-out rows, as in training


def test_export_refuses_a_missing_base_model_and_bad_out_in_one_line(tiny_model_dir, tmp_path, capsys):
    from reward_model.model import create_reward_model, save_reward_model

    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    rm, _ = create_reward_model(str(base), lora_r=4)
    save_reward_model(rm, tmp_path / "rm", {"base_model": str(base), "max_length": 64, "lora_r": 4})
    shutil.rmtree(base)
    assert main(["export-model", "--rm", str(tmp_path / "rm"), "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err.strip()
    assert f"its base model {str(base)!r} cannot be loaded" in err and "pass --base-model" in err
    assert len(err.splitlines()) == 1 and not (tmp_path / "hf").exists()
    for out, message in ((tmp_path / "rm", "is the folder being exported"),
                         (tmp_path, "exists and is not an exported model folder")):
        assert main(["export-model", "--rm", str(tmp_path / "rm"), "--out", str(out), "--base-model",
                     tiny_model_dir]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1
    assert main(["export-model", "--rm", str(tmp_path / "rm"), "--out", str(tmp_path / "hf"), "--base-model",
                 tiny_model_dir]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["base_model"] == tiny_model_dir


def test_merged_policy_loads_with_generation_config_and_card(tiny_model_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from policy.roles import build_roles, load_policy, save_actor
    from rlhf.runlog import RunLog

    torch.manual_seed(0)
    roles, _ = build_roles(tiny_model_dir, None, lora_r=4, lora_alpha=8, critic=False)
    with torch.no_grad():
        for name, param in roles.model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    run = tmp_path / "run"
    policy = save_actor(roles, run / "policy", {"base_model": tiny_model_dir, "algo": "grpo", "steps": 3,
                                                "temperature": 0.9, "response_length": 12, "reward": "length",
                                                "rm": None})
    (run / "config.json").write_text(json.dumps({"prompts": "data/prompts.jsonl", "lr": 1e-4, "kl_coef": 0.04}))
    RunLog(run / "eval.csv").append({"step": 3, "objective/oracle": 1.25, "objective/kl": 0.5})

    out = tmp_path / "merged"
    assert main(["export-model", "--policy", str(policy), "--out", str(out)]) == 0
    capsys.readouterr()
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    generation = merged.generation_config
    assert (generation.do_sample, generation.temperature, generation.max_new_tokens) == (True, 0.9, 12)
    assert generation.eos_token_id in (tokenizer.eos_token_id, [tokenizer.eos_token_id])
    adapter, _, _ = load_policy(policy)
    ids = tokenizer("Once upon a time", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, adapter(input_ids=ids).logits, atol=1e-4)
    card = (out / "README.md").read_text()
    assert "# Policy" in card and "| objective/oracle | 1.25 |" in card and "| algorithm | grpo |" in card

    moved = tmp_path / "run2"
    shutil.copytree(run, moved)
    meta = json.loads((moved / "policy" / "policy.json").read_text())
    (moved / "policy" / "policy.json").write_text(json.dumps({**meta, "base_model": str(tmp_path / "gone")}))
    assert main(["export-model", "--policy", str(moved / "policy"), "--out", str(tmp_path / "m2")]) == 2
    err = capsys.readouterr().err.strip()
    assert "its base model" in err and "pass --base-model" in err and len(err.splitlines()) == 1
