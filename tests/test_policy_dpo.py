"""`rlhf dpo` on tiny models: the K-wise loss against a pairwise reference, the cached reference
log-probabilities, K-wise = expanded pairs, training on an export and on a TRL pair file, resume, errors."""

import csv
import dataclasses
import json
import math

import pytest
import torch
from labeling_helpers import make_tasks

from pipeline.cli import build_parser
from pipeline.cli import main as cli_main
from policy.dpo import DPOConfig, completion_logps, dpo_loss, logps_without_grad, micro_batches, train_dpo
from reward_model.loss import build_pair_index, ranking_pairs
from rlhf.config_args import field_docs
from rlhf.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- the loss, on hand-made numbers ----

def _pairwise_reference(policy, reference, rankings, beta, loss_type, weighting):
    """The slow way: every (better, worse) pair of every ranking on its own, in plain Python floats."""
    losses, weights, chosen, rejected = [], [], [], []
    offset = 0
    for ranks in rankings:
        pairs = [(b, w) for b in range(len(ranks)) for w in range(len(ranks)) if ranks[b] < ranks[w]]
        for b, w in pairs:
            rb = policy[offset + b] - reference[offset + b]
            rw = policy[offset + w] - reference[offset + w]
            h = rb - rw
            losses.append(math.log(1 + math.exp(-beta * h)) if loss_type == "sigmoid" else (h - 1 / (2 * beta)) ** 2)
            weights.append(1 / (len(pairs) * len(rankings)) if weighting == "ranking" else None)
            chosen.append(beta * rb)
            rejected.append(beta * rw)
        offset += len(ranks)
    weights = [w if w is not None else 1 / len(losses) for w in weights]
    loss = sum(value * w for value, w in zip(losses, weights))
    accuracy = sum(c > r for c, r in zip(chosen, rejected)) / len(chosen)
    return loss, sum(chosen) / len(chosen), sum(rejected) / len(rejected), accuracy


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
@pytest.mark.parametrize("weighting", ["pair", "ranking"])
def test_kwise_loss_equals_the_pairwise_reference(loss_type, weighting):
    # a full ranking of 4, a ranking of 3 with a tie (the tied pair gives nothing), a TRL pair (a ranking of 2)
    rankings = [(2, 1, 4, 3), (1, 1, 2), (1, 2)]
    policy = [-12.5, -10.0, -30.25, -7.0, -5.5, -6.0, -9.0, -20.0, -21.5]
    reference = [-11.0, -10.5, -29.0, -8.5, -5.0, -6.5, -8.0, -19.0, -22.0]
    beta = 0.3
    index = build_pair_index([ranking_pairs(r) for r in rankings], [len(r) for r in rankings], weighting)
    assert index.num_pairs == 6 + 2 + 1
    loss, metrics = dpo_loss(torch.tensor(policy, dtype=torch.float64), torch.tensor(reference, dtype=torch.float64),
                             index, beta, loss_type)
    expected, chosen, rejected, accuracy = _pairwise_reference(policy, reference, rankings, beta, loss_type, weighting)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert metrics["rewards/chosen"].item() == pytest.approx(chosen, rel=1e-6)
    assert metrics["rewards/rejected"].item() == pytest.approx(rejected, rel=1e-6)
    assert metrics["rewards/margins"].item() == pytest.approx(chosen - rejected, rel=1e-6)
    assert metrics["rewards/accuracies"].item() == pytest.approx(accuracy)
    assert 0 < accuracy < 1  # the numbers exercise both outcomes


def test_loss_at_the_reference_and_its_gradient_direction():
    index = build_pair_index([[(0, 1, 1)]], [2])
    logps = torch.tensor([-3.0, -3.0], requires_grad=True)
    loss, metrics = dpo_loss(logps, torch.tensor([-3.0, -3.0]), index, beta=0.1)
    assert loss.item() == pytest.approx(math.log(2))  # policy == reference: -log sigmoid(0)
    assert metrics["rewards/accuracies"].item() == 0.0 and metrics["rewards/margins"].item() == 0.0
    loss.backward()
    assert logps.grad[0] < 0 < logps.grad[1]  # descent raises the preferred completion, lowers the other
    ipo, _ = dpo_loss(torch.tensor([-3.0, -3.0]), torch.tensor([-3.0, -3.0]), index, beta=0.1, loss_type="ipo")
    assert ipo.item() == pytest.approx((1 / 0.2) ** 2)
    with pytest.raises(ValueError, match="unknown DPO loss"):
        dpo_loss(logps, logps, index, 0.1, "hinge")


# ---- the model side ----

@pytest.fixture(scope="module")
def roles_and_tokenizer(tiny_model_dir):
    from policy.roles import ACTOR, build_roles

    torch.manual_seed(0)
    roles, tokenizer = build_roles(tiny_model_dir, None, lora_r=4, lora_alpha=8, critic=False)
    with torch.no_grad():  # a non-zero actor adapter, so the policy really differs from the reference
        for param in roles.parameters_of(ACTOR).values():
            param.normal_(0, 0.2)
    return roles, tokenizer


def _encoded(tokenizer, items):
    from reward_model.model import encode_sample_ids

    return [encode_sample_ids(tokenizer, p, c, 256) for p, c in items]


def test_reference_logps_are_the_adapter_free_models(tiny_model_dir, roles_and_tokenizer):
    from transformers import AutoModelForCausalLM

    from policy.roles import ACTOR

    roles, tokenizer = roles_and_tokenizer
    items = [("Tell a tale.", "Once upon a time a fox"), ("Hi", "Sea"), ("Write a short poem about the moon.", "")]
    rows = _encoded(tokenizer, items)
    reference = logps_without_grad(roles, None, rows, tokenizer.pad_token_id, "cpu", batch_size=2)
    policy = logps_without_grad(roles, ACTOR, rows, tokenizer.pad_token_id, "cpu", batch_size=3)
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    for row, ref, pol in zip(rows, reference, policy):
        ids = torch.tensor([row.ids])
        with torch.no_grad():
            logp = torch.log_softmax(plain(input_ids=ids).logits[0, :-1].double(), -1)
        targets = ids[0, 1:]
        by_hand = logp.gather(-1, targets[:, None])[-row.completion_length:].sum().item()  # completion + EOS only
        assert ref == pytest.approx(by_hand, abs=1e-4)
        assert abs(pol - by_hand) > 1e-3  # the adapter is on for the policy
    # the completion's tokens only: the EOS alone for an empty completion
    assert rows[2].completion_length == 1


def test_kwise_batch_equals_the_expanded_pairs(roles_and_tokenizer):
    """A ranking of K read once gives exactly the loss and gradient of its C(K,2) pairs read two sequences
    each (TRL's layout), with K sequences instead of 2 * C(K,2)."""
    from policy.roles import ACTOR
    from reward_model.data import RankingExample, collate

    roles, tokenizer = roles_and_tokenizer
    texts = ("A silver moon", "tall trees", "the sea is warm and blue", "fox")
    ranks = (2, 1, 4, 2)  # with a tie: 5 pairs
    kwise = RankingExample("Write a poem.", texts, ranks, ranking_pairs(ranks))
    kwise.rows = _encoded(tokenizer, [(kwise.prompt, t) for t in texts])
    pairs = []
    for b, w, gap in kwise.pairs:
        ex = RankingExample(kwise.prompt, (texts[b], texts[w]), (1, 2), [(0, 1, gap)])
        ex.rows = [kwise.rows[b], kwise.rows[w]]
        pairs.append(ex)
    params = list(roles.parameters_of(ACTOR).values())
    results = []
    for examples in ([kwise], pairs):
        tensors, index = collate(examples, tokenizer.pad_token_id)
        logps = completion_logps(roles, ACTOR, *tensors)
        ref = logps_without_grad(roles, None, [r for ex in examples for r in ex.rows], tokenizer.pad_token_id, "cpu", 8)
        loss, _ = dpo_loss(logps, torch.tensor(ref), index, 0.5)
        grads = torch.autograd.grad(loss, params)
        results.append((loss.item(), grads, tensors[0].shape[0]))
    (loss_k, grads_k, rows_k), (loss_p, grads_p, rows_p) = results
    assert (rows_k, rows_p) == (4, 10)
    assert loss_k == pytest.approx(loss_p, rel=1e-5)
    for a, b in zip(grads_k, grads_p):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


# ---- the trainer and the command ----

def _read_csv(path):
    with open(path) as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    """A demo-style export: hand-made tasks ranked by scripted annotators, split by prompt."""
    from labeling.export import export
    from labeling.simulate import simulate
    from labeling.store import open_store
    from rlhf.oracles import load_oracle

    folder = tmp_path_factory.mktemp("export")
    with open_store(folder / "labels.db") as store:
        store.import_tasks(make_tasks(10, k=4))
        simulate(store, load_oracle("length"), annotators=2, overlap=1, noise=0.0)
        export(store, folder / "pairs", test_fraction=0.3, seed=0)
    return folder / "pairs"


def test_micro_batches_hold_32_completions_by_default():
    from types import SimpleNamespace

    def rankings(k, n):
        return [SimpleNamespace(rows=[None] * k, name=i) for i in range(n)]

    sizes = lambda batch, micro: [len(m) for m in micro_batches(batch, micro)]  # noqa: E731
    assert sizes(rankings(8, 8), None) == [4, 4]           # K = 8: 32 completions a pass
    assert sizes(rankings(4, 8), None) == [8]              # K = 4: the whole batch, as before
    assert sizes(rankings(2, 8), None) == [8]              # pairs from elsewhere
    assert sizes(rankings(40, 3), None) == [1, 1, 1]       # one ranking wider than a pass still goes alone
    assert sizes(rankings(8, 8), 3) == [3, 3, 2]           # --micro-batch-rankings wins
    mixed = rankings(2, 4) + rankings(16, 1)               # the widest ranking sets the size: 32 // 16
    assert sizes(mixed, None) == [2, 2, 1]
    assert [r.name for m in micro_batches(mixed, None) for r in m] == [0, 1, 2, 3, 0]  # order kept


def test_cli_dpo_trains_on_an_export(tiny_model_dir, rm_dir, export_dir, tmp_path, capsys):
    out = tmp_path / "dpo"
    assert cli_main(["dpo", "--data", str(export_dir), "--out", str(out), "--model", tiny_model_dir, "--rm", rm_dir,
                     "--oracle", "length", "--batch-rankings", "3", "--micro-batch-rankings", "2", "--epochs", "2",
                     "--eval-every", "2", "--response-length", "6", "--lora-r", "4", "--lora-alpha", "8"]) == 0
    printed = capsys.readouterr().out
    assert "trained" in printed and "pairs/s" in printed
    train_rankings = sum(json.loads(line)["split"] == "train" for line in open(export_dir / "rankings.jsonl"))
    rows = _read_csv(out / "train_log.csv")
    total = 2 * math.ceil(train_rankings / 3)
    assert [int(r["step"]) for r in rows] == list(range(1, total + 1))
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                "logps/rejected", "grad_norm", "lr"):
        assert math.isfinite(float(rows[-1][key])), key
    assert float(rows[0]["loss"]) == pytest.approx(math.log(2), abs=1e-4)  # the first step starts at the reference
    evals = _read_csv(out / "eval.csv")
    assert [int(r["step"]) for r in evals] == list(range(2, total, 2)) + [total]
    for key in ("rewards/accuracies", "loss", "objective/kl", "objective/rm_score", "objective/oracle",
                "eval/distinct_2"):
        assert math.isfinite(float(evals[-1][key])), key
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert samples and {"reference", "policy"} <= set(samples[0]) and "oracle" in samples[0]["policy"]
    assert samples[0]["reference"]["kl"] == pytest.approx(0.0, abs=1e-5)
    assert (out / "reference_logps.pt").is_file() and (out / "plots" / "train_curves.png").stat().st_size > 1000
    meta = json.loads((out / "policy" / "policy.json").read_text())
    assert meta["algo"] == "dpo" and meta["base_model"] == tiny_model_dir
    capsys.readouterr()
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "Describe the sea."}) + "\n")
    assert cli_main(["sample", "--policy", str(out / "policy"), "--prompts", str(prompts), "--n", "1", "--json"]) == 0
    assert {"prompt", "reference", "policy"} <= set(json.loads(capsys.readouterr().out))
    # a second run into the same folder is refused, not silently overwritten
    assert cli_main(["dpo", "--data", str(export_dir), "--out", str(out), "--model", tiny_model_dir]) == 2
    assert "--resume" in capsys.readouterr().err


def test_dpo_trains_on_a_trl_pair_file_and_learns(peaked_model_dir, tmp_path):
    """Plain TRL rows (prompt/chosen/rejected, nothing else) are rankings of 2; IPO and DPO both fit them."""
    train = tmp_path / "trl.jsonl"
    rows = [{"prompt": f"Say something about item {i}.", "chosen": "the tall tree told a tale",
             "rejected": "peck of pickled peppers"} for i in range(6)]
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for loss_type in ("sigmoid", "ipo"):
        summary = train_dpo(DPOConfig(data=str(train), out=str(tmp_path / loss_type), model=peaked_model_dir,
                                      loss=loss_type, epochs=4, batch_rankings=3, lr=3e-3, lora_r=4, lora_alpha=8,
                                      checkpoint_every=0), progress=False)
        log = _read_csv(summary["train_log"])
        assert summary["train_pairs"] == 6 and summary["test_pairs"] == 0 and len(log) == 8
        assert summary["samples"] is None  # no held-out prompts: the generation evaluation is skipped
        assert float(log[-1]["rewards/accuracies"]) == 1.0 and float(log[-1]["rewards/margins"]) > 0
        assert float(log[-1]["loss"]) < float(log[0]["loss"])


def test_resume_continues_exactly(tiny_model_dir, export_dir, tmp_path, monkeypatch):
    from rlhf import checkpoint

    common = dict(data=str(export_dir), model=tiny_model_dir, batch_rankings=2, epochs=1, lr=1e-2, lora_r=4,
                  lora_alpha=8, response_length=4, eval_size=1, checkpoint_every=2)
    straight = train_dpo(DPOConfig(out=str(tmp_path / "straight"), **common), progress=False)
    real_save = checkpoint.save_checkpoint

    class Crash(Exception):
        pass

    def save_then_crash(*args, **kwargs):  # the run dies right after its first checkpoint (step 2)
        real_save(*args, **kwargs)
        raise Crash()

    monkeypatch.setattr(checkpoint, "save_checkpoint", save_then_crash)
    with pytest.raises(Crash):
        train_dpo(DPOConfig(out=str(tmp_path / "resumed"), **common), progress=False)
    monkeypatch.setattr(checkpoint, "save_checkpoint", real_save)
    assert len(_read_csv(tmp_path / "resumed" / "train_log.csv")) == 2
    resumed = train_dpo(DPOConfig(out=str(tmp_path / "resumed"), resume=True, **common), progress=False)
    a, b = _read_csv(straight["train_log"]), _read_csv(resumed["train_log"])
    assert len(a) > 2 and [r["step"] for r in b] == [r["step"] for r in a]
    for key in ("loss", "rewards/margins", "logps/chosen"):
        assert float(b[-1][key]) == pytest.approx(float(a[-1][key]), rel=1e-4, abs=1e-6), key
    with pytest.raises(UserError, match="it was made with beta=0.1"):
        train_dpo(DPOConfig(out=str(tmp_path / "resumed"), resume=True, **{**common, "beta": 0.5}), progress=False)


def test_bad_input_is_one_clear_line(tiny_model_dir, tmp_path, capsys):
    conversational = tmp_path / "chat.jsonl"
    conversational.write_text(json.dumps({"prompt": [{"role": "user", "content": "Hi"}], "chosen": "a",
                                          "rejected": "b"}) + "\n")
    ties = tmp_path / "ties.jsonl"
    ties.write_text(json.dumps({"prompt": "Hi", "chosen": "same", "rejected": "same"}) + "\n")
    cases = [(["--data", str(conversational)], "'prompt' must be a string"),
             (["--data", str(ties)], "no usable ranking or pair"),
             (["--data", str(tmp_path / "missing")], "does not exist"),
             (["--data", str(ties), "--beta", "0"], "--beta must be a finite number > 0"),
             (["--data", str(ties), "--batch-rankings", "0"], "--batch-rankings must be >= 1")]
    for flags, message in cases:
        assert cli_main(["dpo", "--out", str(tmp_path / "out"), "--model", tiny_model_dir, *flags]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, (flags, err)
        assert "chat.jsonl" in err or flags[1] != str(conversational)  # the file is named
    with pytest.raises(SystemExit):  # argparse names the choices
        cli_main(["dpo", "--out", str(tmp_path / "out"), "--data", str(ties), "--loss", "hinge"])
    assert "invalid choice: 'hinge'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing was written for a refused run


def test_every_field_is_a_flag_with_its_docstring_as_help():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    actions = {a.dest: a for a in sub.choices["dpo"]._actions}
    docs = field_docs(DPOConfig)
    for f in dataclasses.fields(DPOConfig):
        assert f.name in actions and docs[f.name][1] and docs[f.name][0], f.name
        assert actions[f.name].option_strings[0] == "--" + f.name.replace("_", "-")
    assert actions["data"].required and actions["out"].required
