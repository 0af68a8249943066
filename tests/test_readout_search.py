"""The read-out chosen from the data (frozen probes, cross-validated by prompt), the probe as the score head's
start (LP-FT), early stopping on a validation split, and the reward's correlation with length."""

import json
import random

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from test_reward_model_train import write_marker_rankings

from reward_model import train as rmtrain
from reward_model.config import RewardTrainingConfig
from reward_model.data import DataStats, build_examples, find_data, tokenize_examples
from reward_model.model import Readout, encode_sample_ids, pad_samples, reward_features
from reward_model.readout_search import (
    candidate_layers,
    choose_readout,
    fit_bradley_terry,
    layer_features,
    prompt_folds,
)
from reward_model.train import STOP_METRIC, length_correlation, train_reward_model, validation_metrics, validation_split
from rlhf.errors import UserError
from rlhf.models import load_causal_lm, load_tokenizer


def test_candidate_layers_cover_the_depth_once_each():
    assert candidate_layers(30) == [5, 8, 10, 15, 20, 25, 30]
    assert candidate_layers(2) == [1, 2]
    assert candidate_layers(30, requested=12) == [12]
    assert candidate_layers(30, requested=0) == [30]


def planted_features(seed=0, prompts=60, k=3, hidden=8, layers=(1, 2, 3), signal=(2, "last")):
    """Random features for len(layers) layers x (mean, last), with the preference readable only from `signal`:
    there, dimension 0 ranks the completions (higher is better); elsewhere the columns are pure noise."""
    gen = torch.Generator().manual_seed(seed)
    n = prompts * k
    features = torch.randn(n, 2 * len(layers), hidden, generator=gen)
    column = 2 * layers.index(signal[0]) + (0 if signal[1] == "mean" else 1)
    rows, names = [], []
    for p in range(prompts):
        members = list(range(p * k, (p + 1) * k))
        for i in members:
            for j in members:
                if features[i, column, 0] > features[j, column, 0]:
                    rows.append((i, j))
                    names.append(f"prompt {p}")
    return features, rows, names


def test_the_read_out_holding_a_planted_preference_is_chosen():
    for signal in [(2, "last"), (1, "mean"), (3, "mean")]:
        features, rows, prompts = planted_features(signal=signal)
        choice = choose_readout(features, rows, prompts, layers=[1, 2, 3], depth=3)
        expected = Readout(0 if signal[0] == 3 else signal[0], signal[1])
        assert choice.readout == expected
        assert choice.best.cv_accuracy > 0.9
        others = [c.cv_accuracy for c in choice.candidates if (c.layer, c.pool) != (expected.layer, expected.pool)]
        assert len(others) == 5 and max(others) < 0.7  # noise columns: near chance under cross-validation
        assert choice.pairs == len(rows) and choice.prompts == 60


def test_pools_can_be_fixed_and_the_head_is_the_probe_refit_on_every_pair():
    features, rows, prompts = planted_features(signal=(2, "last"))
    choice = choose_readout(features, rows, prompts, layers=[1, 2, 3], depth=3, pools=("mean",))
    assert {c.pool for c in choice.candidates} == {"mean"} and len(choice.candidates) == 3
    choice = choose_readout(features, rows, prompts, layers=[1, 2, 3], depth=3)
    x = features[:, 3]  # layer 2, last
    scale = x.std(0)
    better, worse = torch.tensor([b for b, _ in rows]), torch.tensor([w for _, w in rows])
    w = fit_bradley_terry((x[better] - x[worse]) / scale, choice.best.l2)
    assert torch.allclose(choice.head_weight, w / scale, atol=1e-5)
    # in raw units the head scores the raw features: the refit probe ranks the training pairs as the planted order
    margins = (x[better] - x[worse]) @ choice.head_weight
    assert (margins > 0).float().mean() > 0.95


def test_folds_keep_a_prompts_pairs_together():
    folds = prompt_folds(["a", "b", "a", "c", "b"], 5)
    assert folds[0] == folds[2] and folds[1] == folds[4]
    assert folds == prompt_folds(["a", "b", "a", "c", "b"], 5)  # stable across runs (no salted hash)


def test_fit_bradley_terry_matches_the_closed_form_on_one_dimension():
    # one feature, preferred side positive in 3 of 4 pairs: the unpenalised optimum of
    # 3 log(1 + e^-w) + log(1 + e^w) is w = ln 3
    x = torch.tensor([[1.0], [1.0], [1.0], [-1.0]])
    w = fit_bradley_terry(x, l2=0.0)
    assert w.item() == pytest.approx(torch.log(torch.tensor(3.0)).item(), abs=1e-4)


def test_layer_features_equal_what_the_reward_model_reads(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    lm = load_causal_lm(tiny_model_dir, dtype=torch.float32).eval()
    samples = [encode_sample_ids(tok, p, c, 64) for p, c in
               [("Say hi.", "hi there"), ("Count.", "one two three four"), ("Say hi.", "")]]
    layers = candidate_layers(2)
    table = layer_features(lm, samples, layers, tok.pad_token_id)
    assert table.shape == (3, 4, lm.config.hidden_size)
    ids, mask, comp = pad_samples(samples, tok.pad_token_id)
    with torch.no_grad():
        for li, layer in enumerate(layers):
            for pi, pool in enumerate(("mean", "last")):
                direct = reward_features(lm, Readout(0 if layer == 2 else layer, pool), ids, mask, comp)
                assert torch.allclose(table[:, 2 * li + pi], direct, atol=1e-5), (layer, pool)


def test_length_correlation_is_measured_within_prompts():
    # across prompts, long answers score high; within each prompt the shorter one scores higher
    prompts = ["a", "a", "b", "b"]
    rewards = [1.0, 0.0, 11.0, 10.0]
    lengths = [1, 2, 11, 12]
    assert length_correlation(prompts, rewards, lengths) == pytest.approx(-1.0)
    assert length_correlation(prompts, [0.0, 1.0, 10.0, 11.0], lengths) == pytest.approx(1.0)
    assert length_correlation(["a", "b"], [1.0, 2.0], [3, 4]) == 0.0  # no prompt with two lengths


def write_many_prompts(path, n=60, seed=0):
    """The marker preference over n distinct prompts (enough for a validation split), 8 of them held out."""
    return write_marker_rankings(path, n=n, test_from=n - 8, seed=seed)


def test_validation_split_holds_back_whole_prompts(tmp_path):
    data = write_many_prompts(tmp_path / "r.jsonl")
    examples = build_examples(find_data(data).train, DataStats())
    fit, val = validation_split(examples, 0.1, seed=0)
    assert len(val) == 5 and len(fit) == len(examples) - 5
    assert not {ex.prompt for ex in fit} & {ex.prompt for ex in val}
    assert validation_split(examples, 0.1, seed=0)[1] == val
    assert validation_split(examples[:30], 0.1, seed=0)[1] == []  # 3 prompts: too few to judge by
    assert validation_split(examples, 0.0, seed=0)[1] == []


def test_probe_then_fine_tune_starts_the_head_at_the_probe(tiny_model_dir, tmp_path, monkeypatch):
    data = write_many_prompts(tmp_path / "r.jsonl")
    chosen = []
    search = rmtrain.search_readout
    monkeypatch.setattr(rmtrain, "search_readout", lambda *a, **k: chosen.append(search(*a, **k)) or chosen[-1])
    # an lr so small that the one epoch cannot move the head: what is saved is where it started
    base = dict(data=str(data), model=tiny_model_dir, epochs=1, lr=1e-12, checkpoint_every=0, validation_fraction=0)
    summary = train_reward_model(RewardTrainingConfig(out=str(tmp_path / "lpft"), **base), progress=False)
    head = load_file(str(tmp_path / "lpft" / "score_head.safetensors"))["weight"][0]
    assert torch.allclose(head, chosen[0].head_weight, atol=1e-6)
    assert summary["readout"] == {"layer": chosen[0].readout.layer, "pool": chosen[0].readout.pool}
    assert summary["readout_search"]["cv_accuracy"] == chosen[0].best.cv_accuracy
    saved = json.loads((tmp_path / "lpft" / "reward_model.json").read_text())
    assert saved["readout"] == summary["readout"]
    random_head = train_reward_model(RewardTrainingConfig(out=str(tmp_path / "random"), probe_init=False,
                                                          readout_layer="0", readout_pool="last", **base),
                                     progress=False)
    assert "readout_search" not in random_head  # a fixed read-out without a probe searches nothing
    other = load_file(str(tmp_path / "random" / "score_head.safetensors"))["weight"][0]
    assert not torch.allclose(other, head, atol=1e-3)


def test_early_stopping_keeps_the_best_validation_check(tiny_model_dir, tmp_path):
    data = write_many_prompts(tmp_path / "r.jsonl", n=80)
    # a high lr overshoots: later checks get worse, and training stops before its 12 epochs
    config = RewardTrainingConfig(data=str(data), out=str(tmp_path / "rm"), model=tiny_model_dir, epochs=12,
                                  lr=3e-2, batch_rankings=8, checkpoint_every=0, patience=2)
    summary = train_reward_model(config, progress=False)
    val = summary["validation"]
    frame = pd.read_csv(tmp_path / "rm" / "train_log.csv")
    checks = frame.dropna(subset=[STOP_METRIC])
    losses = [val["start"][STOP_METRIC], *checks[STOP_METRIC]]
    assert val["best_loss"] == pytest.approx(min(losses))
    best_step = 0 if val["best_loss"] == losses[0] else int(checks.loc[checks[STOP_METRIC].idxmin(), "step"])
    assert val["best_step"] == best_step
    after = [s for s in checks["step"] if s > best_step]  # checks without improvement
    assert val["stopped_early"] and len(after) == config.patience and summary["steps"] == after[-1]
    # the saved model is the best check's: its validation loss is the best one
    from reward_model.model import load_reward_model
    rm, tok = load_reward_model(tmp_path / "rm")
    examples = build_examples(find_data(data).train, DataStats())
    tokenize_examples(examples, tok, config.max_length, DataStats())
    _, val_examples = validation_split(examples, config.validation_fraction, config.seed)
    metrics = validation_metrics(rm, val_examples, tok.pad_token_id, "pair", 0.0, 32)
    assert metrics[STOP_METRIC] == pytest.approx(val["best_loss"], abs=1e-4)


def test_readout_flags_are_checked_before_the_model_loads(tmp_path):
    for bad in ("middle", "-1", "2.5"):
        with pytest.raises(UserError, match="--readout-layer"):
            RewardTrainingConfig(data="d", out="o", readout_layer=bad).check()
    with pytest.raises(UserError, match="--validation-fraction"):
        RewardTrainingConfig(data="d", out="o", validation_fraction=1.0).check()
    RewardTrainingConfig(data="d", out="o", readout_layer="0.5", readout_pool="last").check()
    assert RewardTrainingConfig(data="d", out="o").readout_request() == (None, None)
    assert RewardTrainingConfig(data="d", out="o", readout_layer="10", readout_pool="mean").readout_request() == \
        (10.0, "mean")


def test_rankings_file_in_random_order_reads_the_same(tmp_path):
    # the folds and the validation split depend on prompts only, never on file order
    data = write_many_prompts(tmp_path / "r.jsonl")
    lines = (tmp_path / "r.jsonl").read_text().splitlines()
    random.Random(1).shuffle(lines)
    (tmp_path / "s.jsonl").write_text("\n".join(lines) + "\n")
    a = build_examples(find_data(data).train, DataStats())
    b = build_examples(find_data(tmp_path / "s.jsonl").train, DataStats())
    assert {ex.prompt for ex in validation_split(a, 0.1, 0)[1]} == {ex.prompt for ex in validation_split(b, 0.1, 0)[1]}


def test_length_disentangling_loss_on_hand_made_tensors():
    from reward_model.loss import length_disentangling_loss, pearson

    lengths = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert pearson(lengths, 2 * lengths + 1).item() == pytest.approx(1.0)
    assert pearson(lengths, torch.ones(4)).item() == 0.0
    w_q, w_l = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0]])
    # quality independent of length, length part = length, orthogonal heads: the minimum, -1
    quality = torch.tensor([1.0, -1.0, -1.0, 1.0])
    assert length_disentangling_loss(quality, lengths, lengths, w_q, w_l).item() == pytest.approx(-1.0)
    # quality = length, length part anti-correlated, parallel heads: 1 + 1 + 1
    assert length_disentangling_loss(lengths, -lengths, lengths, w_q, w_q).item() == pytest.approx(3.0)


def write_length_rankings(path, n=60, seed=0):
    """A preference for the longer completion and nothing else: 2 completions per prompt, random words."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            short, long = (" ".join(rng.choices("sun sea sky tree fox bear moon".split(), k=m)) for m in (3, 9))
            f.write(json.dumps({"prompt": f"Prompt {i}: say something.", "completions": [
                {"text": short, "rank": 2}, {"text": long, "rank": 1}]}) + "\n")
    return path


def test_length_decorrelation_leaves_the_reward_uninformative_about_length(tiny_model_dir, tmp_path):
    data = write_length_rankings(tmp_path / "r.jsonl")
    base = dict(data=str(data), model=tiny_model_dir, epochs=4, lr=3e-3, checkpoint_every=0, validation_fraction=0,
                readout_layer="0", readout_pool="mean")
    plain = train_reward_model(RewardTrainingConfig(out=str(tmp_path / "plain"), **base), progress=False)
    odin = train_reward_model(RewardTrainingConfig(out=str(tmp_path / "odin"), length_decorrelation=True, **base),
                              progress=False)
    assert plain["length_correlation"] > 0.9  # the plain model learns the only thing there is: length
    assert abs(odin["length_correlation"]) < 0.5
    saved = load_file(str(tmp_path / "odin" / "score_head.safetensors"))
    assert set(saved) == {"weight", "bias"}  # the length head is not part of the model
