"""What a reward model's score head is still unsure of, and which tasks would teach it most.

The reward is r(x) = w . f(x) + b on the read-out features f (`reward_model.model.Readout`); in a
comparison the bias cancels, and P(y_i preferred to y_j) = sigmoid(w . d) with d = f(y_i) - f(y_j)
(Bradley-Terry). Holding the features fixed, the head's posterior is approximated by a Gaussian around
the trained w (the Laplace approximation, MacKay 1992; over the last layer only: "last-layer Laplace",
Daxberger et al. 2021), whose precision is the prior's plus the Fisher information of the ranked pairs:

    A = prior * n * I + sum over the n ranked pairs of p (1 - p) d d^T,   p = sigmoid(w . d)

A task with pairs d_1..d_P would add G^T G, G's rows being sqrt(q (1 - q)) d_k (q = sigmoid(w . d_k));
for a logistic model that does not depend on the annotator's answer, so it is known before they rank.
The expected information its ranking brings about w is

    gain(task) = 1/2 log det(I + G A^-1 G^T)

(the D-optimal design criterion). It weighs a pair's closeness (q near 1/2) by how little the ranked
pairs already say about its direction, which the margin between two rewards cannot tell from a true tie.

`information_order` serves the tasks by that gain, largest first. Choosing each retraining's batch greedily
instead (adding each pick's G^T G to A before scoring the rest: batch-mode D-optimal design, Hoi et al.
2006) was measured and was no better on any preference tried, so the order stays the plain one
(docs/benchmarks.md, "Active labeling"). Features are standardised per dimension (mean |d| over the candidates'
pairs), so one prior strength fits every dimension; `PRIOR` is the L2 weight of the Bradley-Terry head the
rule was measured with.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

PRIOR = 0.02  # 2 x the head's L2 weight 0.01 on standardised features (bench/active_learning_rules.py)


def pair_matrix(features: Tensor, pairs: Sequence[tuple[int, int]]) -> Tensor:
    """[len(pairs), H]: f[i] - f[j] for each (i, j) of `pairs` (i the preferred, or the first of a candidate pair)."""
    if not pairs:
        return features.new_zeros(0, features.shape[1])
    first, second = (torch.tensor(side) for side in zip(*pairs))
    return features[first] - features[second]


def head_covariance(ranked_pairs: Tensor, w: Tensor, prior: float = PRIOR) -> Tensor:
    """A^-1 for the ranked pairs' differences [n, H] (standardised) and the head w [H]: see the module doc.
    With no ranked pairs the prior alone (as for n = 1) is used."""
    p = torch.sigmoid(ranked_pairs @ w)
    precision = prior * max(len(ranked_pairs), 1) * torch.eye(len(w), dtype=w.dtype)
    precision += (ranked_pairs * (p * (1 - p)).unsqueeze(1)).T @ ranked_pairs
    return torch.linalg.inv(precision)


@torch.no_grad()
def information_terms(candidates: Sequence[Tensor], ranked_pairs: Tensor, w: Tensor,
                      prior: float = PRIOR) -> tuple[Tensor, Tensor]:
    """(G [T, P, H], A^-1 [H, H]), float64, in standardised coordinates, for the candidate tasks (one [P_t, H]
    matrix of pair differences each, raw features; a task with fewer pairs is padded with zero rows, which add
    nothing), the ranked pairs' differences [n, H] (preferred minus other) and the score head w [H]."""
    w = w.detach().double().flatten()
    width = max((len(c) for c in candidates), default=0)
    d = torch.zeros(len(candidates), width, len(w), dtype=torch.float64)
    for t, c in enumerate(candidates):
        d[t, :len(c)] = c.double()
    scale = d.abs().sum((0, 1)) / max(sum(len(c) for c in candidates), 1) + 1e-6
    d = d / scale
    w = w * scale  # the same rewards in the standardised coordinates
    q = torch.sigmoid(d @ w)
    return (q * (1 - q)).sqrt().unsqueeze(2) * d, head_covariance(ranked_pairs.double() / scale, w, prior)


def information_gains(g: Tensor, covariance: Tensor, chunk: int = 256) -> Tensor:
    """1/2 log det(I + G A^-1 G^T) per task [T] (in chunks of tasks, to bound memory)."""
    eye = torch.eye(g.shape[1], dtype=g.dtype)
    return torch.cat([0.5 * torch.logdet(eye + part @ covariance @ part.transpose(1, 2))
                      for part in g.split(chunk)]) if len(g) else g.new_zeros(0)


def information_order(candidates: Sequence[Tensor], ranked_pairs: Tensor, w: Tensor,
                      prior: float = PRIOR) -> list[int]:
    """Indices of `candidates` by expected information gain, largest first (ties: the earlier first); the
    arguments as `information_terms`. Costs O(T P H^2) for T tasks of P pairs (H features)."""
    gains = information_gains(*information_terms(candidates, ranked_pairs, w, prior))
    return sorted(range(len(candidates)), key=lambda t: -float(gains[t]))
