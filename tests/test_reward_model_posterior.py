"""The score head's Laplace posterior and the information order (reward_model/posterior.py), against slow
references written from the formulas."""

import math

import pytest
import torch

from reward_model.posterior import PRIOR, head_covariance, information_order, pair_matrix


def test_pair_matrix_and_covariance_on_hand_made_numbers():
    f = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 1.0]])
    assert pair_matrix(f, [(2, 0), (0, 1)]).tolist() == [[2.0, 1.0], [1.0, -2.0]]
    assert pair_matrix(f, []).shape == (0, 2)
    d = torch.tensor([[2.0, 0.0]], dtype=torch.float64)
    w = torch.tensor([0.0, 1.0], dtype=torch.float64)  # w . d = 0: p = 1/2, p (1 - p) = 1/4
    # A = PRIOR * 1 * I + 1/4 d d^T = diag(PRIOR + 1, PRIOR)
    assert head_covariance(d, w).diag().tolist() == pytest.approx([1 / (PRIOR + 1), 1 / PRIOR])
    assert head_covariance(d[:0], w).diag().tolist() == pytest.approx([1 / PRIOR, 1 / PRIOR])  # the prior alone


def _slow_order(candidates, ranked, w, batch):
    """The greedy batch recomputed from scratch at every step: A^-1 inverted anew, each gain a fresh log det."""
    scale = torch.cat([c.double() for c in candidates]).abs().mean(0) + 1e-6
    ws = w.double() * scale
    precision = torch.linalg.inv(head_covariance(ranked.double() / scale, ws))

    def g(t):
        d = candidates[t].double() / scale
        q = torch.sigmoid(d @ ws)
        return (q * (1 - q)).sqrt().unsqueeze(1) * d

    def gain(t, covariance):
        return 0.5 * math.log(torch.linalg.det(torch.eye(len(candidates[t]), dtype=torch.float64)
                                               + g(t) @ covariance @ g(t).T))

    chosen = []
    for _ in range(batch):
        covariance = torch.linalg.inv(precision)
        best = max((t for t in range(len(candidates)) if t not in chosen), key=lambda t: gain(t, covariance))
        chosen.append(best)
        precision = precision + g(best).T @ g(best)
    covariance = torch.linalg.inv(precision)
    return chosen + sorted((t for t in range(len(candidates)) if t not in chosen), key=lambda t: -gain(t, covariance))


def test_information_order_equals_the_slow_greedy_reference():
    generator = torch.Generator().manual_seed(0)
    h = 10
    # tasks of 1 to 6 pairs (K = 2..4 and partial ones): the padding must not change a gain
    candidates = [torch.randn(n, h, generator=generator) for n in [1, 3, 6, 6, 3, 1, 6, 2, 5, 6, 3, 4]]
    ranked = torch.randn(15, h, generator=generator)
    w = 0.4 * torch.randn(h, generator=generator)
    for batch in (1, 4, 12):
        assert information_order(candidates, ranked, w, batch) == _slow_order(candidates, ranked, w, batch)
    assert information_order([], ranked, w, 3) == []


def test_information_prefers_unexplored_directions_and_spreads_a_batch():
    ranked = torch.tensor([[1.0, 0.0, 0.0]]).repeat(40, 1)  # 40 ranked pairs along the first axis
    along, across = torch.tensor([[1.0, 0.0, 0.0]]), torch.tensor([[0.0, 1.0, 0.0]])
    # every pair a coin flip (w = 0), so the margin cannot tell them apart; the settled direction comes last
    assert information_order([along, across], ranked, torch.zeros(3), batch=1) == [1, 0]
    # a third direction the head is fairly sure of (w . d = 3: q = 0.95): on its own gain it is worth less than
    # the unexplored `across` (0.21 against 0.27 after standardising), but more than a second copy of
    # `across` once the first is chosen (0.17)
    third = torch.tensor([[0.0, 0.0, 1.0]])
    w = torch.tensor([0.0, 0.0, 3.0])
    assert information_order([across, across.clone(), third], ranked, w, batch=0) == [0, 1, 2]  # own gains only
    assert information_order([across, across.clone(), third], ranked, w, batch=1) == [0, 2, 1]
