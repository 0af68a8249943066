"""The ranking loss: Bradley-Terry on every comparison a ranking of K completions expresses.

InstructGPT (Ouyang et al. 2022, sec. 3.5, eq. 1):

    loss(theta) = -1/C(K,2) * E_{(x, y_w, y_l)} [ log sigmoid(r(x, y_w) - r(x, y_l)) ]

and "we train on all C(K,2) comparisons from each prompt as a single batch element": the K
completions are scored once and every pair loss is built from those K scores. With ties fewer than
C(K,2) pairs exist; the average is over the pairs that do. The optional margin subtracts
m * (rank gap) inside the sigmoid, like Llama 2's margin loss (Touvron et al. 2023, eq. 2).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from rlhf.pairs import pair_indices


def pairwise_loss(chosen: Tensor, rejected: Tensor, margin: Tensor | float = 0.0) -> Tensor:
    """Per-pair loss -log sigmoid(r_chosen - r_rejected - margin) (logsigmoid: stable for large gaps)."""
    return -F.logsigmoid(chosen - rejected - margin)


@dataclass
class PairIndex:
    """Which rows of a flat reward vector form the batch's comparisons, and how each is weighted."""

    better: Tensor  # [P] row of the preferred completion
    worse: Tensor   # [P] row of the other one
    gap: Tensor     # [P] rank difference (>= 1), for the margin
    weight: Tensor  # [P] the loss is the weighted sum of the pair losses (weights sum to 1)

    @property
    def num_pairs(self) -> int:
        return int(self.better.numel())


def build_pair_index(rankings: Sequence[Sequence[tuple[int, int, int]]], sizes: Sequence[int],
                     weighting: str = "pair") -> PairIndex:
    """Lay out the pairs of a batch of rankings whose completions are concatenated into one flat batch.

    `rankings[j]` lists ranking j's pairs as (better, worse, rank gap) with indices local to the
    ranking; `sizes[j]` is its number of completions (rows). Rankings without pairs are not allowed.
    `weighting`: "ranking" gives each ranking the same weight, shared by its pairs (InstructGPT's
    1/C(K,2)); "pair" gives every pair the same weight (TRL). They differ only when ties leave
    rankings with fewer pairs: then "ranking" weighs a ranking's lone pair up to C(K,2) times a pair
    of a full ranking, and those are the least certain comparisons.
    """
    total = sum(len(pairs) for pairs in rankings)
    better, worse, gap, weight = [], [], [], []
    offset = 0
    for pairs, size in zip(rankings, sizes, strict=True):
        if not pairs:
            raise ValueError("a ranking in the batch has no pairs")
        for b, w, g in pairs:
            better.append(offset + b)
            worse.append(offset + w)
            gap.append(g)
            weight.append(1.0 / (len(pairs) * len(rankings)) if weighting == "ranking" else 1.0 / total)
        offset += size
    return PairIndex(torch.tensor(better, dtype=torch.long), torch.tensor(worse, dtype=torch.long),
                     torch.tensor(gap, dtype=torch.float32), torch.tensor(weight, dtype=torch.float32))


def ranking_pairs(ranks: Sequence[int]) -> list[tuple[int, int, int]]:
    """(better, worse, rank gap) for every non-tied pair of one ranking (rank 1 best)."""
    return [(b, w, ranks[w] - ranks[b]) for b, w in pair_indices(tuple(ranks))]


def ranking_loss(rewards: Tensor, index: PairIndex, margin: float = 0.0) -> tuple[Tensor, dict[str, Tensor]]:
    """The weighted sum of the pair losses, with the index's weights (see `build_pair_index`).

    `rewards` [N] is float32; returns the scalar loss and detached per-batch metrics: `accuracy`
    (fraction of pairs ranked right, a tie counts as wrong) and `margin` (mean r_better - r_worse).
    """
    index = PairIndex(*(t.to(rewards.device) for t in (index.better, index.worse, index.gap, index.weight)))
    diff = rewards[index.better] - rewards[index.worse]
    losses = pairwise_loss(rewards[index.better], rewards[index.worse], margin * index.gap)
    loss = (losses * index.weight).sum()
    with torch.no_grad():
        metrics = {"accuracy": (diff > 0).float().mean(), "margin": diff.mean()}
    return loss, metrics


def scale_free_loss(diffs: Tensor, weights: Tensor) -> float:
    """The weighted pair loss at the best scale t >= 0 of the reward differences, min_t sum w * -log sigmoid(t * d)
    / sum w: how well the rewards order the pairs, whatever their spread (temperature scaling, Guo et al. 2017,
    "On Calibration of Modern Neural Networks"). Fine-tuning on few pairs soon makes the rewards over-confident,
    which raises the plain loss on held-back pairs while their order still improves; the reward is normalised after
    training anyway. log 2 when no scale helps; near 0 when every pair is ordered right."""
    d, w = diffs.double(), weights.double() / weights.double().sum()

    def loss(log_t: float) -> float:
        return float((w * -F.logsigmoid(d * 10.0 ** log_t)).sum())

    # convex in t, so unimodal in log t: golden-section search over t in [1e-4, 1e4], and t = 0 (log 2)
    lo, hi, ratio = -4.0, 4.0, (5 ** 0.5 - 1) / 2
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = loss(a), loss(b)
    for _ in range(60):
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = loss(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = loss(b)
    return min(fa, fb, loss(lo), loss(hi), math.log(2))


def pearson(x: Tensor, y: Tensor) -> Tensor:
    """Pearson correlation of two [N] vectors (0 where either is constant)."""
    x, y = x - x.mean(), y - y.mean()
    return (x * y).sum() / (x.norm() * y.norm()).clamp(min=1e-8)


def length_disentangling_loss(quality: Tensor, length_part: Tensor, lengths: Tensor, quality_weight: Tensor,
                              length_weight: Tensor) -> Tensor:
    """ODIN's extra terms (Chen et al. 2024, "ODIN: Disentangled Reward Mitigates Hacking in RLHF", eq. 4-5): the
    quality reward uncorrelated with the completion's length, the length head correlated with it, and the two
    heads' weight vectors orthogonal: |rho(r_Q, L)| - rho(r_L, L) + |cos(w_Q, w_L)|. The ranking loss is taken on
    r_Q + r_L, so the preferences that length explains flow into the length head, which scoring drops."""
    lengths = lengths.to(quality)
    cosine = torch.nn.functional.cosine_similarity(quality_weight.flatten(), length_weight.flatten(), dim=0)
    return pearson(quality, lengths).abs() - pearson(length_part, lengths) + cosine.abs()
