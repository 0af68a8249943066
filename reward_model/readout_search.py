"""Where the score head should read, found from the training rankings: frozen probes per read-out.

The read-out that separates preferences best differs by preference: word choice is plainest in a middle
layer's mean over the completion, while other judgements sit higher up or at the final token (docs/benchmarks.md,
"Reward-model quality"). No fixed default wins everywhere, so before fine-tuning:

1. one forward pass of the FROZEN base model over the training completions keeps, for each candidate layer
   (a grid of depths), the completion-mean and the last-token features, with the final norm applied as
   `reward_model.model.reward_features` applies it;
2. for each (layer, pool) a Bradley-Terry probe, r = w . features (L2-regularised logistic regression on the
   preferred-minus-other feature differences), is cross-validated with the folds split BY PROMPT, so the
   completions of one prompt never sit on both sides (an L2 from a short grid, picked per candidate);
3. the candidate with the lowest cross-validated log-loss wins: the log-loss moves smoothly where held-out
   accuracy on a few hundred pairs jumps by whole pairs, so the choice is less noisy;
4. its probe, refit on all the pairs, becomes the score head's starting weights: "linear probing, then fine-tuning"
   (LP-FT, Kumar et al. 2022), so fine-tuning starts from the probe's accuracy instead of a random head that the
   LoRA update would first have to make sense of.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor

from reward_model.model import Readout, first_layers, map_samples, num_decoder_layers
from rlhf.causal_lm import decoder_body, final_hidden_states, last_token_index
from rlhf.errors import UserError
from rlhf.records import Prompt, encode_prompt

log = logging.getLogger(__name__)

CANDIDATE_DEPTHS = (1 / 6, 1 / 4, 1 / 3, 1 / 2, 2 / 3, 5 / 6, 1.0)
"""Shares of the depth whose layers are tried (SmolLM2-135M's 30 layers: 5, 8, 10, 15, 20, 25, 30)."""
L2_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0)
"""L2 penalties tried per candidate, on standardised features (per pair: mean loss + l2 * |w|^2). A few hundred
pairs of 576 features often want 1.0 at the middle layers: a grid that stops at 0.1 leaves those layers
under-regularised, and their inflated cross-validated loss turns the choice away from them."""
FOLDS = 5
MAX_SEARCH_RANKINGS = 2000
"""The search reads at most this many rankings (a seeded sample): enough to rank the candidates, and the
cached features stay a few hundred MB."""


def candidate_layers(depth: int, requested: int | None = None) -> list[int]:
    """The layers tried, 1-based (the read-out records the last as 0 elsewhere); a fixed `requested` layer alone."""
    if requested is not None:
        return [requested or depth]
    return sorted({max(1, min(depth, round(share * depth))) for share in CANDIDATE_DEPTHS})


@torch.no_grad()
def layer_features(causal_lm, samples, layers: Sequence[int], pad_id: int, batch_size: int = 16,
                   progress: str | None = None) -> Tensor:
    """[N, 2 * len(layers), H] float32: for each sample, the completion-mean then the last-token features after
    each of `layers` (final norm applied), in one forward pass of the first max(layers) layers."""
    decoder = decoder_body(causal_lm)
    norm = getattr(decoder, "norm", None)
    blocks = getattr(decoder, "layers", None)
    if norm is None or blocks is None:
        raise UserError(f"{type(decoder).__name__} has no `norm` and `layers` to probe: give --readout-layer and "
                        f"--readout-pool explicitly")
    captured: dict[int, Tensor] = {}

    def keep(layer: int):
        def hook(_module, _inputs, output):
            captured[layer] = output[0] if isinstance(output, tuple) else output
        return hook

    depth = num_decoder_layers(causal_lm)
    top = max(layers)

    def features(input_ids: Tensor, attention_mask: Tensor, completion_mask: Tensor) -> Tensor:
        captured.clear()
        with first_layers(causal_lm, 0 if top == depth else top):
            final = final_hidden_states(causal_lm, input_ids, attention_mask)
        weights = (completion_mask * attention_mask).to(final.device, torch.float32).unsqueeze(-1)
        rows = torch.arange(final.shape[0], device=final.device)
        last = last_token_index(attention_mask).to(final.device)
        out = []
        for layer in layers:
            # the top layer's output is the one the body already normed
            hidden = final if layer == top else norm(captured[layer])
            hidden = hidden.float()
            out.append((hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0))
            out.append(hidden[rows, last])
        return torch.stack(out, dim=1)

    handles = [blocks[layer - 1].register_forward_hook(keep(layer)) for layer in layers if layer != top]
    try:
        return map_samples(features, samples, pad_id, next(causal_lm.parameters()).device, batch_size, progress)
    finally:
        for handle in handles:
            handle.remove()


def fit_bradley_terry(diffs: Tensor, l2: float) -> Tensor:
    """w minimising mean(-log sigmoid(diffs @ w)) + l2 |w|^2, each row a preferred-minus-other feature
    difference (no bias: it cancels in a difference)."""
    w = torch.zeros(diffs.shape[1], dtype=torch.float64, requires_grad=True)
    x = diffs.double()
    optimizer = torch.optim.LBFGS([w], max_iter=200, tolerance_grad=1e-7, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.softplus(-(x @ w)).mean() + l2 * (w * w).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return w.detach().float()


def prompt_folds(prompts: Sequence[Prompt], folds: int) -> list[int]:
    """A fold per pair from its prompt's hash (a conversation's as its stored text): the pairs of one prompt share
    a fold."""
    return [int(hashlib.sha256(encode_prompt(p).encode("utf-8", "surrogatepass")).hexdigest(), 16) % folds
            for p in prompts]


@dataclass(frozen=True)
class ProbeResult:
    """One candidate read-out's cross-validated probe."""

    layer: int
    pool: str
    l2: float
    cv_loss: float
    cv_accuracy: float


@dataclass
class ReadoutChoice:
    """The chosen read-out, its probe (in raw feature units: the score head's starting weight) and every
    candidate's cross-validated figures."""

    readout: Readout
    head_weight: Tensor
    candidates: list[ProbeResult] = field(default_factory=list)
    pairs: int = 0
    prompts: int = 0

    @property
    def best(self) -> ProbeResult:
        return min(self.candidates, key=lambda c: c.cv_loss)

    def summary(self) -> dict:
        """What train-rm prints and saves: the choice and the candidates' cross-validated accuracies."""
        return {"layer": self.readout.layer, "pool": self.readout.pool, "pairs": self.pairs, "prompts": self.prompts,
                "cv_accuracy": self.best.cv_accuracy, "cv_loss": self.best.cv_loss,
                "candidates": [asdict(c) for c in self.candidates]}

    def table(self) -> str:
        """One line per candidate layer: the cross-validated accuracy of each pool, the chosen one starred."""
        by_layer: dict[int, dict[str, ProbeResult]] = {}
        for c in self.candidates:
            by_layer.setdefault(c.layer, {})[c.pool] = c
        best = self.best
        lines = ["layer  mean    last    (cross-validated probe accuracy)"]
        for layer, pools in sorted(by_layer.items(), key=lambda item: item[0] or math.inf):  # 0 = the last layer
            cells = [f"{pools[p].cv_accuracy:.3f}{'*' if pools[p] is best else ' '}" if p in pools else "  -   "
                     for p in ("mean", "last")]
            lines.append(f"{layer or 'last':>5}  " + "  ".join(cells))
        return "\n".join(lines)


def cross_validate(diffs: Tensor, folds: Sequence[int], l2: float, num_folds: int) -> tuple[float, float]:
    """(mean held-out log-loss, held-out accuracy) over the folds that have pairs on both sides; a tie counts
    half, as in evaluation."""
    fold = torch.tensor(folds)
    losses, right, count = 0.0, 0.0, 0
    for k in range(num_folds):
        test = fold == k
        if not test.any() or test.all():
            continue
        w = fit_bradley_terry(diffs[~test], l2)
        margin = diffs[test] @ w
        losses += torch.nn.functional.softplus(-margin).sum().item()
        right += (margin > 0).sum().item() + 0.5 * (margin == 0).sum().item()
        count += int(test.sum())
    if not count:
        return math.inf, 0.5
    return losses / count, right / count


def choose_readout(features: Tensor, pair_rows: Sequence[tuple[int, int]], pair_prompts: Sequence[str],
                   layers: Sequence[int], depth: int, pools: Sequence[str] = ("mean", "last"),
                   num_folds: int = FOLDS) -> ReadoutChoice:
    """The read-out whose probe has the lowest cross-validated log-loss, and that probe refit on every pair.

    `features`: `layer_features`' [N, 2 * len(layers), H]; `pair_rows`: (preferred row, other row) per pair;
    `pair_prompts`: each pair's prompt (the folds are split by it). Features are standardised per dimension
    (a probe's L2 then means the same at every layer, whose scales differ); the returned weight is in raw units.
    """
    if not pair_rows:
        raise UserError("no comparison to choose a read-out from")
    better = torch.tensor([b for b, _ in pair_rows])
    worse = torch.tensor([w for _, w in pair_rows])
    folds = prompt_folds(pair_prompts, num_folds)
    num_folds = min(num_folds, len(set(folds)))
    results: list[tuple[ProbeResult, int]] = []
    for li, layer in enumerate(layers):
        for pi, pool in enumerate(("mean", "last")):
            if pool not in pools:
                continue
            column = 2 * li + pi
            x = features[:, column]
            scale = x.std(0, keepdim=True).clamp(min=1e-6)
            diffs = (x[better] - x[worse]) / scale
            scored = [(l2, *cross_validate(diffs, folds, l2, num_folds)) for l2 in L2_GRID]
            l2, loss, acc = min(scored, key=lambda s: s[1])
            results.append((ProbeResult(0 if layer == depth else layer, pool, l2, loss, acc), column))
    best, column = min(results, key=lambda r: r[0].cv_loss)
    x = features[:, column]
    scale = x.std(0).clamp(min=1e-6)
    w = fit_bradley_terry((x[better] - x[worse]) / scale, best.l2)
    return ReadoutChoice(Readout(best.layer, best.pool), w / scale, [r for r, _ in results], len(pair_rows),
                         len(set(pair_prompts)))


def search_readout(causal_lm, examples, pad_id: int, layer: int | None = None, pool: str | None = None,
                   seed: int = 0, batch_size: int = 16, progress: bool = True) -> ReadoutChoice:
    """`choose_readout` over tokenized training examples (`reward_model.data.RankingExample` with rows): a fixed
    `layer` (0 = last) or `pool` narrows the candidates to it."""
    import random

    if len(examples) > MAX_SEARCH_RANKINGS:
        examples = random.Random(seed).sample(list(examples), MAX_SEARCH_RANKINGS)
    depth = num_decoder_layers(causal_lm)
    layers = candidate_layers(depth, layer)
    samples, pair_rows, pair_prompts = [], [], []
    for ex in examples:
        offset = len(samples)
        samples.extend(ex.rows)
        for b, w, _gap in ex.pairs:
            pair_rows.append((offset + b, offset + w))
            pair_prompts.append(ex.prompt)
    was_training = causal_lm.training
    causal_lm.eval()
    try:
        features = layer_features(causal_lm, samples, layers, pad_id, batch_size,
                                  "probing read-outs" if progress else None)
    finally:
        causal_lm.train(was_training)
    pools = (pool,) if pool else ("mean", "last")
    return choose_readout(features, pair_rows, pair_prompts, layers, depth, pools)
