"""The score head's Laplace posterior and the information order (reward_model/posterior.py), against slow
references written from the formulas."""

import math

import pytest
import torch

from reward_model.posterior import (
    PRIOR,
    head_covariance,
    information_gains,
    information_order,
    information_terms,
    pair_matrix,
)


def test_pair_matrix_and_covariance_on_hand_made_numbers():
    f = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 1.0]])
    assert pair_matrix(f, [(2, 0), (0, 1)]).tolist() == [[2.0, 1.0], [1.0, -2.0]]
    assert pair_matrix(f, []).shape == (0, 2)
    d = torch.tensor([[2.0, 0.0]], dtype=torch.float64)
    w = torch.tensor([0.0, 1.0], dtype=torch.float64)  # w . d = 0: p = 1/2, p (1 - p) = 1/4
    # A = PRIOR * 1 * I + 1/4 d d^T = diag(PRIOR + 1, PRIOR)
    assert head_covariance(d, w).diag().tolist() == pytest.approx([1 / (PRIOR + 1), 1 / PRIOR])
    assert head_covariance(d[:0], w).diag().tolist() == pytest.approx([1 / PRIOR, 1 / PRIOR])  # the prior alone


def _slow_gains(candidates, ranked, w):
    """Each task's gain from the formula, one task at a time: standardise, invert A, take a fresh log det."""
    scale = torch.cat([c.double() for c in candidates]).abs().mean(0) + 1e-6
    ws = w.double() * scale
    covariance = torch.linalg.inv(PRIOR * len(ranked) * torch.eye(len(w), dtype=torch.float64) + sum(
        (lambda p, d: p * (1 - p) * torch.outer(d, d))(torch.sigmoid(d @ ws), d) for d in ranked.double() / scale))
    gains = []
    for c in candidates:
        d = c.double() / scale
        q = torch.sigmoid(d @ ws)
        g = (q * (1 - q)).sqrt().unsqueeze(1) * d
        gains.append(0.5 * math.log(torch.linalg.det(torch.eye(len(c), dtype=torch.float64) + g @ covariance @ g.T)))
    return gains


def test_information_gains_and_order_equal_the_formula_task_by_task():
    generator = torch.Generator().manual_seed(0)
    h = 10
    # tasks of 1 to 6 pairs (K = 2..4 and partial ones): the padding must not change a gain
    candidates = [torch.randn(n, h, generator=generator) for n in [1, 3, 6, 6, 3, 1, 6, 2, 5, 6, 3, 4]]
    ranked = torch.randn(15, h, generator=generator)
    w = 0.4 * torch.randn(h, generator=generator)
    expected = _slow_gains(candidates, ranked, w)
    g, covariance = information_terms(candidates, ranked, w)
    assert information_gains(g, covariance).tolist() == pytest.approx(expected, rel=1e-9)
    assert information_gains(g, covariance, chunk=5).tolist() == pytest.approx(expected, rel=1e-9)
    assert information_order(candidates, ranked, w) == sorted(range(len(candidates)), key=lambda t: -expected[t])
    assert information_order([], ranked, w) == []


def test_information_prefers_unexplored_and_uncertain_directions():
    ranked = torch.tensor([[1.0, 0.0, 0.0]]).repeat(40, 1)  # 40 ranked pairs along the first axis
    along, across = torch.tensor([[1.0, 0.0, 0.0]]), torch.tensor([[0.0, 1.0, 0.0]])
    # every pair a coin flip (w = 0), so the margin cannot tell them apart; the settled direction comes last
    assert information_order([along, across], ranked, torch.zeros(3)) == [1, 0]
    # an unexplored direction the head is sure of (w . d = 6: q = 0.998) is worth less than one it is not
    sure = torch.tensor([[0.0, 0.0, 1.0]])
    assert information_order([sure, across], ranked, torch.tensor([0.0, 0.0, 6.0])) == [1, 0]
