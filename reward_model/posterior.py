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

`information_order` picks tasks one at a time, adding each pick's G^T G to A before scoring the rest
(batch-mode D-optimal design, Hoi et al. 2006), so one batch of rankings between two retrainings is not
spent on near-copies of one uncertain direction; log det is submodular, so the greedy batch is within
1 - 1/e of the best batch (Nemhauser et al. 1978). Features are standardised per dimension (mean |f|
over the candidates' completions), so one prior strength fits every dimension; `PRIOR` is the L2 weight
of the Bradley-Terry head the rule was measured with (README, Benchmarks, "Active labeling").
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
def information_order(candidates: Sequence[Tensor], ranked_pairs: Tensor, w: Tensor, batch: int,
                      prior: float = PRIOR) -> list[int]:
    """Indices of `candidates` (one [P_t, H] matrix of pair differences per task, raw features) in serving
    order: the first `batch` chosen greedily for their joint information gain, the rest by their own gain
    after that batch. `ranked_pairs` [n, H]: the ranked pairs' differences (preferred minus other); `w` [H]:
    the score head. Each greedy step costs O(T P^2 H) for T tasks of P pairs (H features)."""
    if not candidates:
        return []
    w = w.detach().double().flatten()
    width = max(len(c) for c in candidates)
    d = torch.zeros(len(candidates), width, len(w), dtype=torch.float64)
    for t, c in enumerate(candidates):
        d[t, :len(c)] = c.double()  # a task with fewer pairs is padded with zero rows: they add nothing
    scale = d.abs().sum((0, 1)) / max(sum(len(c) for c in candidates), 1) + 1e-6
    d = d / scale
    w = w * scale  # the same rewards in the standardised coordinates
    covariance = head_covariance(ranked_pairs.double() / scale, w, prior)
    q = torch.sigmoid(d @ w)
    g = (q * (1 - q)).sqrt().unsqueeze(2) * d  # [T, P, H]
    m = g @ covariance  # G A^-1 per task, kept up to date as picks are added
    s = torch.eye(width, dtype=torch.float64) + m @ g.transpose(1, 2)  # I + G A^-1 G^T
    taken = torch.zeros(len(candidates), dtype=torch.bool)
    chosen: list[int] = []
    for _ in range(min(batch, len(candidates))):
        gain = torch.logdet(s).masked_fill(taken, float("-inf"))
        best = int(gain.argmax())
        chosen.append(best)
        taken[best] = True
        # Woodbury: (A + G_b^T G_b)^-1 = A^-1 - A^-1 G_b^T S_b^-1 G_b A^-1, so every task's G A^-1 loses
        # (G A^-1 G_b^T) S_b^-1 (G_b A^-1), and its S the matching term.
        cross = m @ g[best].T  # [T, P, P_b]: G A^-1 G_b^T
        correction = cross @ torch.linalg.solve(s[best], m[best])  # [T, P, H]
        s = s - correction @ g.transpose(1, 2)
        m = m - correction
    gain = torch.logdet(s)
    rest = sorted((t for t in range(len(candidates)) if not taken[t]), key=lambda t: -float(gain[t]))
    return chosen + rest
