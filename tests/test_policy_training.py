"""The policy stage on tiny models: four roles on one base, rollouts, PPO/RLOO updates, the CLI, resume."""

import csv
import json
import math

import pytest
import torch
from policy_helpers import PROMPTS

from pipeline.cli import main as cli_main
from policy import core
from policy.config import PPOConfig
from policy.roles import ACTOR, CRITIC, REWARD, build_roles
from policy.rollout import reward_function, rollout
from policy.trainer import ppo_update, train_policy
from rlhf.errors import UserError
from rlhf.models import eos_token_ids

pytestmark = pytest.mark.usefixtures("one_thread")

def nan_oracle(prompt, completion):
    return float("nan")


def _snapshot(named):
    return {n: p.detach().clone() for n, p in named.items()}


def _changed(before, after):
    return [n for n in before if not torch.equal(before[n], after[n])]


def test_four_roles_share_one_base(tiny_model_dir, rm_dir):
    from transformers import AutoModelForCausalLM

    roles, _ = build_roles(tiny_model_dir, rm_dir, lora_r=4, lora_alpha=8)
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    base = roles.parameters_of("base")
    # one copy of the base weights (tied embeddings counted once), not four
    assert sum(p.numel() for p in base.values()) == sum(p.numel() for p in plain.parameters())
    assert roles.parameters_of(ACTOR) and roles.parameters_of(CRITIC) and roles.parameters_of(REWARD)
    trainable = {n for n, p in roles.named_parameters() if p.requires_grad}
    assert trainable == set(roles._trainable)
    assert all(f".{ACTOR}." in n or f".{CRITIC}." in n or n.startswith("value_head.") for n in trainable)
    assert any(f".{ACTOR}." in n for n in trainable) and any(f".{CRITIC}." in n for n in trainable)
    # the critic starts as the RM: same adapter weights, value head = score head
    critic = roles.parameters_of(CRITIC)
    reward = roles.parameters_of(REWARD)
    for name, p in critic.items():
        assert torch.equal(p, reward[name.replace(f".{CRITIC}.", f".{REWARD}.")])
    assert torch.equal(roles.value_head.weight, roles.score_head.weight)
    # the reference is exactly the base model
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        ref = roles.response_logits(None, ids, mask, 3)
        expected = plain(input_ids=ids, attention_mask=mask).logits[:, -4:-1]
    assert torch.allclose(ref, expected, atol=1e-5)


@pytest.fixture(scope="module")
def mean_rm_dir(tiny_model_dir, tmp_path_factory):
    """Like rm_dir, but read as the mean over the completion after the first layer."""
    from reward_model.model import create_reward_model, save_reward_model

    torch.manual_seed(4)
    rm, _ = create_reward_model(tiny_model_dir, lora_r=4, readout_layer=1, readout_pool="mean")
    with torch.no_grad():
        for name, param in rm.backbone.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
        rm.reward_bias.fill_(0.3)
    out = tmp_path_factory.mktemp("rm-mean")
    save_reward_model(rm, out, {"base_model": tiny_model_dir, "max_length": 256, "lora_r": 4})
    return str(out)


@pytest.mark.parametrize("which", ["rm_dir", "mean_rm_dir"])
def test_rm_role_scores_like_the_reward_model(tiny_model_dir, which, request):
    """The policy's reward role gives what `rlhf score` gives for the same texts, whatever the read-out,
    normalisation included, and it scores the re-encoded decoded text."""
    from reward_model.model import load_reward_model, score_texts

    rm_path = request.getfixturevalue(which)
    config = PPOConfig(rm=rm_path)
    roles, tokenizer = build_roles(tiny_model_dir, rm_path, lora_r=4, lora_alpha=8)
    rm, _ = load_reward_model(rm_path)
    prompts, texts = ["Tell a tale.", "Hi"], ["Once upon a time", "Sea and sky"]
    expected = score_texts(rm, tokenizer, prompts, texts)
    got = reward_function(config, tokenizer)(roles, prompts, texts, torch.device("cpu"))
    assert got.tolist() == pytest.approx(expected, abs=1e-5)
    assert not torch.allclose(got, torch.zeros(2))


def test_rollout_logprobs_mask_and_eos_penalty(tiny_model_dir, rm_dir):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    roles, tokenizer = build_roles(tiny_model_dir, rm_dir, lora_r=4, lora_alpha=8)
    config = PPOConfig(rm=rm_dir, response_length=6, temperature=0.7, missing_eos_penalty=1.0)
    eos = eos_token_ids(roles.model, tokenizer)
    batch = rollout(roles, tokenizer, PROMPTS[:4], 2, config, reward_function(config, tokenizer),
                    eos, generator_seed=1, with_values=True)
    B, T = batch.responses.shape
    assert B == 8 and T <= 6
    # logprobs are at the sampling temperature: recompute by hand with the plain base model (the
    # fresh actor LoRA is a no-op), real tokens only
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    from rlhf.causal_lm import position_ids_from_mask

    with torch.no_grad():
        logits = plain(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                       position_ids=position_ids_from_mask(batch.attention_mask)).logits[:, -T - 1:-1]
    manual = torch.log_softmax(logits / 0.7, -1).gather(-1, batch.responses.unsqueeze(-1)).squeeze(-1)
    real = batch.mask.bool()
    assert torch.allclose(batch.logprobs[real], manual[real], atol=1e-4)
    assert torch.allclose(batch.ref_logprobs[real], manual[real], atol=1e-4)
    # the mask covers the tokens up to and including the first EOS, nothing after it
    for row, m, done in zip(batch.responses, batch.mask, batch.finished):
        n = int(m.sum())
        if done:
            assert row[n - 1].item() in eos and not any(t in eos for t in row[:n - 1].tolist())
        else:
            assert n == T
    # the penalty is subtracted from the RM score of responses without EOS (their order is kept),
    # finished ones keep the RM score
    cut = ~batch.finished
    assert torch.allclose(batch.scores[cut], batch.raw_scores[cut] - 1.0)
    assert len(set(batch.scores[cut].tolist())) > 1
    assert torch.equal(batch.scores[batch.finished], batch.raw_scores[batch.finished])
    assert (~batch.finished).any()  # 6 tokens from a random model: most never stop


def test_ppo_updates_actor_and_critic_only(tiny_model_dir, rm_dir):
    from accelerate import Accelerator

    torch.manual_seed(0)
    roles, tokenizer = build_roles(tiny_model_dir, rm_dir, lora_r=4, lora_alpha=8)
    config = PPOConfig(rm=rm_dir, response_length=6, lr=1e-2, ppo_epochs=2, micro_batch_size=2)
    eos = eos_token_ids(roles.model, tokenizer)
    optimizer = torch.optim.Adam(roles.trainable_parameters(), lr=config.lr)
    before = {role: _snapshot(roles.parameters_of(role)) for role in ("base", ACTOR, CRITIC, REWARD)}
    heads = (roles.value_head.weight.detach().clone(), roles.score_head.weight.detach().clone())
    for step in (1, 2):
        batch = rollout(roles, tokenizer, PROMPTS[:4], 1, config, reward_function(config, tokenizer),
                        eos, generator_seed=step, with_values=True)
        update = ppo_update(roles, Accelerator(cpu=True), optimizer, batch, 0.05, config, step)
        metrics = update.metrics
        assert update.skipped == 0 and math.isfinite(metrics["loss/policy"]) and math.isfinite(metrics["loss/value"])
    assert not _changed(before["base"], roles.parameters_of("base")), "the reference (base weights) changed"
    assert not _changed(before[REWARD], roles.parameters_of(REWARD)), "the reward adapter changed"
    assert torch.equal(roles.score_head.weight, heads[1])
    assert _changed(before[ACTOR], roles.parameters_of(ACTOR)), "the actor did not train"
    assert _changed(before[CRITIC], roles.parameters_of(CRITIC)), "the critic did not train"
    assert not torch.equal(roles.value_head.weight, heads[0])


@pytest.mark.parametrize("algo,lr", [("rloo", 1e-2), ("ppo", 3e-3)])
def test_policy_raises_toy_reward_with_finite_kl(peaked_model_dir, prompts_file, tmp_path, algo, lr):
    summary = train_policy(PPOConfig(
        model=peaked_model_dir, reward="policy_helpers:e_fraction", prompts=prompts_file, out=str(tmp_path / algo),
        algo=algo, steps=8, batch_size=16, response_length=8, lr=lr, kl_coef=0.01, eval_every=0,
        eval_fraction=0, eval_size=4, missing_eos_penalty=None, seed=0))
    with open(summary["train_log"]) as handle:
        scores = [float(r["objective/scores"]) for r in csv.DictReader(handle)]
    assert len(scores) == 8
    assert summary["final"]["objective/oracle"] > summary["reference"]["objective/oracle"] + 0.2
    assert sum(scores[-3:]) / 3 > scores[0] + 0.2
    assert math.isfinite(summary["final"]["objective/kl"]) and summary["final"]["objective/kl"] < 50


def _read_csv(path):
    with open(path) as handle:
        return list(csv.DictReader(handle))


def test_cli_ppo_with_reward_model(tiny_model_dir, rm_dir, prompts_file, tmp_path, capsys):
    out = tmp_path / "run"
    code = cli_main(["ppo", "--rm", rm_dir, "--prompts", prompts_file, "--out", str(out), "--steps", "2",
                     "--batch-size", "4", "--response-length", "6", "--eval-every", "1", "--oracle", "length"])
    assert code == 0
    rows = _read_csv(out / "train_log.csv")
    assert [r["step"] for r in rows] == ["1", "2"]
    for key in ("objective/scores", "objective/kl", "loss/policy", "loss/value", "policy/approx_kl",
                "policy/clipfrac", "val/mean"):
        assert math.isfinite(float(rows[-1][key])), key
    evals = _read_csv(out / "eval.csv")
    assert [r["step"] for r in evals] == ["0", "1", "2"]
    for key in ("objective/rm_score", "objective/oracle", "objective/kl", "policy/entropy", "eval/distinct_1",
                "eval/distinct_2"):
        assert key in evals[0]
    assert float(evals[0]["objective/kl"]) == pytest.approx(0.0, abs=1e-5)  # step 0: policy == reference
    eval_samples = [json.loads(line) for line in (out / "eval_samples.jsonl").read_text().splitlines()]
    assert [r["step"] for r in eval_samples] == [0, 1, 2]  # one held-out prompt (10% of 6)
    assert {"prompt", "completion", "reward", "kl", "oracle"} <= set(eval_samples[0])  # ScoredSample rows
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert samples and {"reference", "policy"} <= set(samples[0])
    assert "reward" in samples[0]["policy"] and "oracle" in samples[0]["reference"]
    for name in ("reward_vs_step.png", "kl_vs_step.png", "reward_vs_kl.png"):
        assert (out / "plots" / name).stat().st_size > 1000
    assert (out / "policy" / "adapter_model.safetensors").is_file()
    capsys.readouterr()
    assert cli_main(["sample", "--policy", str(out / "policy"), "--prompts", prompts_file, "--n", "2",
                     "--json"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert len(lines) == 2 and {"prompt", "reference", "policy"} <= set(lines[0])
    # a second run into the same folder must not silently overwrite it
    assert cli_main(["ppo", "--rm", rm_dir, "--prompts", prompts_file, "--out", str(out), "--steps", "1"]) == 2
    assert "--resume" in capsys.readouterr().err


def test_cli_ppo_with_oracle_reward_and_errors(tiny_model_dir, prompts_file, tmp_path, capsys):
    out = tmp_path / "oracle"
    assert cli_main(["ppo", "--reward", "length", "--model", tiny_model_dir, "--prompts", prompts_file,
                     "--out", str(out), "--steps", "2", "--batch-size", "4", "--response-length", "5",
                     "--algo", "rloo", "--rloo-k", "2", "--eval-every", "0", "--save-merged",
                     "--kl-estimator", "k1", "--target-kl", "1.0"]) == 0
    rows = _read_csv(out / "train_log.csv")
    assert len(rows) == 2
    assert float(rows[0]["objective/kl_coef"]) == 0.05 and float(rows[1]["objective/kl_coef"]) != 0.05  # adaptive
    assert "objective/oracle" in _read_csv(out / "eval.csv")[0]
    assert (out / "merged" / "config.json").is_file()
    capsys.readouterr()
    assert cli_main(["ppo", "--prompts", prompts_file, "--out", str(tmp_path / "x")]) == 2
    assert "--rm DIR is required" in capsys.readouterr().err
    assert cli_main(["ppo", "--reward", "length", "--model", tiny_model_dir, "--prompts", prompts_file,
                     "--out", str(tmp_path / "y"), "--algo", "rloo", "--batch-size", "6", "--rloo-k", "4"]) == 2
    assert "multiple of --rloo-k" in capsys.readouterr().err
    assert cli_main(["ppo", "--rm", str(tmp_path / "nope"), "--prompts", prompts_file,
                     "--out", str(tmp_path / "z")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_resume_continues_exactly(tiny_model_dir, prompts_file, tmp_path):
    common = dict(model=tiny_model_dir, reward="length", prompts=prompts_file, batch_size=4, response_length=5,
                  lr=1e-2, eval_every=0, eval_size=2, seed=1)
    straight = train_policy(PPOConfig(out=str(tmp_path / "straight"), steps=3, **common))
    train_policy(PPOConfig(out=str(tmp_path / "resumed"), steps=2, checkpoint_every=1, **common))
    resumed = train_policy(PPOConfig(out=str(tmp_path / "resumed"), steps=3, resume=True, **common))
    assert resumed["steps"] == 3
    a = _read_csv(straight["train_log"])
    b = _read_csv(resumed["train_log"])
    assert [r["step"] for r in b] == ["1", "2", "3"]
    for key in ("objective/scores", "objective/kl", "loss/policy", "loss/value"):
        assert float(b[-1][key]) == pytest.approx(float(a[-1][key]), rel=1e-4, abs=1e-6), key
    with pytest.raises(UserError, match="no checkpoint"):
        train_policy(PPOConfig(out=str(tmp_path / "fresh"), steps=1, resume=True, **common))
    with pytest.raises(UserError, match="it was made with lr=0.01, this run has lr=0.02"):
        train_policy(PPOConfig(out=str(tmp_path / "resumed"), steps=4, resume=True, **{**common, "lr": 2e-2}))


def test_nan_reward_and_nan_loss_stop_with_a_clear_error(tiny_model_dir, prompts_file, tmp_path, monkeypatch):
    common = dict(model=tiny_model_dir, prompts=prompts_file, batch_size=4, response_length=4, eval_every=0,
                  eval_size=2, algo="rloo", rloo_k=2)
    with pytest.raises(UserError, match="not finite"):
        train_policy(PPOConfig(reward=f"{__name__}:nan_oracle", out=str(tmp_path / "a"), steps=2, **common))
    monkeypatch.setattr(core, "rloo_loss", lambda seq_logp, adv: (seq_logp * float("nan")).mean())
    with pytest.raises(UserError, match="non-finite loss or gradient in 3 steps in a row"):
        train_policy(PPOConfig(reward="length", out=str(tmp_path / "b"), steps=10, max_bad_updates=3, **common))


def test_critic_reads_its_layer_and_adapts_only_the_layers_below(tiny_model_dir, rm_dir):
    """PPOConfig.critic_layer: the value head reads the state after layer k (the final norm applied) and the
    critic's LoRA sits on layers < k only; the layers above k leave the values unchanged."""
    roles, _ = build_roles(tiny_model_dir, rm_dir, lora_r=4, lora_alpha=8, critic_layer=1)
    assert roles.critic_layer == 1
    critic = roles.parameters_of(CRITIC)
    assert critic and all(".layers.0." in name for name in critic), sorted(critic)
    torch.manual_seed(0)
    with torch.no_grad():
        roles.value_head.weight.normal_()
    ids, mask = torch.tensor([[5, 6, 7, 8, 9, 10]]), torch.ones(1, 6, dtype=torch.long)
    with torch.no_grad():
        values = roles.values(ids, mask, 3)
        body = roles.model.get_base_model().model
        hidden = body.embed_tokens(ids)
        position_ids = torch.arange(6)[None]
        embeddings = body.rotary_emb(hidden, position_ids)
        with roles.model.disable_adapter():  # a fresh critic adapter is the identity (LoRA B = 0)
            hidden = body.layers[0](hidden, attention_mask=None, position_ids=position_ids,
                                    position_embeddings=embeddings)
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden
        expected = roles.value_head(body.norm(hidden)[:, 2:5]).squeeze(-1)
        assert torch.allclose(values, expected, atol=1e-5)
        logits = roles.response_logits(ACTOR, ids, mask, 3)
        for p in body.layers[1].parameters():
            p.add_(torch.randn_like(p))
        assert torch.equal(roles.values(ids, mask, 3), values)
        assert not torch.allclose(roles.response_logits(ACTOR, ids, mask, 3), logits)


def test_critic_layer_is_checked():
    with pytest.raises(UserError, match="--critic-layer"):
        PPOConfig(rm="x", critic_layer=1.5).check()


def test_critic_layer_beyond_the_depth_names_the_critic_option(tiny_model_dir):
    with pytest.raises(UserError, match="--critic-layer must be .* a layer in 1..2, got 3"):
        build_roles(tiny_model_dir, None, lora_r=4, lora_alpha=8, critic_layer=3)
