"""The percentile bootstrap over clusters, for every interval the project reports over held-out prompts."""

from __future__ import annotations

import math
from collections.abc import Sequence


def cluster_bootstrap_interval(totals: Sequence[float], counts: Sequence[float], draws: int = 2000,
                               seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of sum(totals) / sum(counts) when the clusters, one (total, count) each, are
    resampled with replacement (Efron 1979; the cluster form: Davison & Hinkley 1997, sec. 3.8). A held-out
    prompt is one cluster: its right pairs and its pairs for an accuracy, its value and 1 for a mean. Seeded,
    so a report is stable; 100 draws at a time in torch (10,000 clusters take under a second)."""
    import torch

    totals_t = torch.tensor(list(totals), dtype=torch.float64)
    counts_t = torch.tensor(list(counts), dtype=torch.float64)
    generator = torch.Generator().manual_seed(seed)
    ratios = []
    for start in range(0, draws, 100):
        picks = torch.randint(len(totals_t), (min(100, draws - start), len(totals_t)), generator=generator)
        ratios.append(totals_t[picks].sum(1) / counts_t[picks].sum(1))
    ordered = torch.cat(ratios).sort().values.tolist()
    return ordered[int(0.025 * (draws - 1))], ordered[math.ceil(0.975 * (draws - 1))]
