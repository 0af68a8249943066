"""Seeds derived from a run's `--seed`: one formula, `seed * stream + index`, with a stream per use.

Each use (an epoch's shuffle, a PPO step's minibatch order, a batch of samples) draws from its own
stream, a prime far from the others, so that two uses never share a generator for nearby seeds and
indices; `index` (the epoch, the step, the batch's first prompt) makes every draw a pure function of
(seed, index), so a resumed run replays it.

    order = torch.randperm(n, generator=seeded_generator(config.seed, epoch, EPOCH_ORDER))
"""

from __future__ import annotations

EPOCH_ORDER = 100_003
"""The trainers' shuffled order of their rankings, per epoch (reward model, DPO)."""
PROMPT_ORDER = 7_919
"""PPO's order of the training prompts, per pass over them."""
MINIBATCH_ORDER = 104_729
"""The minibatch order of a policy update, per step."""
SAMPLING = 1_000_003
"""Sampling completions: generation, PPO's rollouts, the held-out evaluation."""
EVAL_SAMPLES = 99_991
"""Offset of the held-out evaluation's batches within the SAMPLING stream, apart from the rollouts' steps."""

LOOP_ROUND = 1_009
"""`rlhf loop`: sampling a round's tasks (index: the round) and its on-policy check samples."""


def derived_seed(seed: int, index: int, stream: int) -> int:
    """The seed of draw `index` of `stream`: seed * stream + index."""
    return seed * stream + index


def seeded_generator(seed: int, index: int, stream: int):
    """A CPU `torch.Generator` seeded with `derived_seed(seed, index, stream)`."""
    import torch

    return torch.Generator().manual_seed(derived_seed(seed, index, stream))
