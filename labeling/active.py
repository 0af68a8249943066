"""Active labeling: a reward model chooses which tasks people rank first, and can propose an order.

Human rankings are the scarce resource; once a first reward model exists, spend them where it is least sure.

**Order** (`rlhf label --order`, `rlhf simulate --order`):

- `fewest-rankings` (default): the store's own queue, the tasks with the fewest rankings first.
- `uncertainty`: margin-based uncertainty sampling (Lewis & Gale 1994; the margin form: Scheffer et al.
  2001). The reward model scores the task's K completions; sorted by reward, the smallest gap between two
  adjacent ones is the task's margin,

      margin(task) = min_i (r_(i) - r_(i+1)),   r_(1) >= r_(2) >= ... >= r_(K)

  and the task with the smallest margin is served first: the pair it is least sure how to order, whose
  Bradley-Terry probability sigmoid(margin) is closest to 1/2. A task is served until it has `overlap`
  rankings, then the next most uncertain one.
- `information`: the tasks whose ranking would tell the reward model's score head most, as expected
  information gain under its Laplace posterior (MacKay 1992; the D-optimal design criterion):
  `reward_model.posterior`. Unlike the margin it discounts a close pair whose direction the ranked pairs
  already settle. It needs the read-out features of every open task's completions and of the ranked ones
  (one pass of the reward model over both).
- `random`: a seeded random order (the baseline the benchmark compares against).

Tasks the reward model has not scored (imported after the server started) come after the scored ones, in
the store's order.

**Proposal** (`rlhf label --pre-rank RM`): each task opens with the reward model's order already set (rank 1
= highest reward; equal rewards tie) and the annotator corrects it or keeps it. The proposal is stored apart
from the annotator's ranking, in the submit event of the store's event log (`"proposal"`, `"proposal_kept"`:
whether it was submitted unchanged, `"proposal_moves"`: how many completion pairs the annotator ordered
differently), so anchoring (people keeping what they are shown) can be measured; `rlhf stats` reports how
often the proposal was kept.

**The loop** (`rlhf simulate --order S --rm-every N`): scripted annotators rank N tasks in the strategy's
order, a reward model is trained from scratch on every ranking so far, the unranked tasks are scored again
and the queue re-ordered, and so on until the queue is empty. The first N come in random order when there
is no reward model yet, so every strategy shares its first round.

Pure functions and the queue at the top (no torch). Scoring and retraining need the reward model (the floor
below this package): they import `reward_model` inside the functions below (`score_tasks`, `score_store`,
`information_order`, `reorder_queue`, `base_model_of`, `retrain_reward_model`), so the queue, the store and
the app never load torch unless active labeling is asked for.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from itertools import combinations
from pathlib import Path
from typing import TYPE_CHECKING, Any

from labeling.store.sql import MAX_HELD
from rlhf.errors import UserError

if TYPE_CHECKING:
    from labeling.store import SQLLabelStore
    from rlhf.records import RankedTask, Task

log = logging.getLogger(__name__)

ORDERS = ("fewest-rankings", "uncertainty", "information", "random")
SCORED_ORDERS = ("uncertainty", "information")  # the orders a reward model's scores decide


# ---- pure functions ----

def reward_margin(rewards: Sequence[float]) -> float:
    """The smallest gap between two adjacent rewards in sorted order (0 when two tie; inf for one reward)."""
    ordered = sorted(rewards, reverse=True)
    return min((a - b for a, b in zip(ordered, ordered[1:])), default=float("inf"))


def proposed_ranks(rewards: Mapping[str, float]) -> dict[str, int]:
    """Dense ranks (1 best) by reward, highest first; equal rewards tie."""
    levels = {value: rank for rank, value in enumerate(sorted(set(rewards.values()), reverse=True), start=1)}
    return {cid: levels[value] for cid, value in rewards.items()}


def random_key(seed: int, task_id: str) -> str:
    """A task's place in the random order that `seed` fixes (the same on every server)."""
    return hashlib.sha256(f"{seed}\x00{task_id}".encode("utf-8", "surrogatepass")).hexdigest()


# ---- the queue ----

class ActiveQueue:
    """Serves tasks in an `ORDERS` order and proposes the reward model's ranking of a task (`proposal`).

    `rewards` {task id: {completion id: reward}} orders the queue (uncertainty); `proposal_rewards` those
    proposed to annotators (the same mapping when one reward model does both). The store keeps the rules:
    a task is handed out through `store.assign_task`, which checks its free places atomically, so the
    overlap holds with several servers; this class only chooses which task to try first."""

    def __init__(self, order: str = "fewest-rankings", rewards: Mapping[str, Mapping[str, float]] | None = None,
                 proposal_rewards: Mapping[str, Mapping[str, float]] | None = None, seed: int = 0,
                 task_ids: Iterable[str] = (), clock: Callable[[], float] = time.time):
        if order not in ORDERS:
            raise UserError(f"order must be one of {', '.join(ORDERS)}, got {order!r}")
        self.order, self.seed, self.clock = order, seed, clock
        self.rewards: dict[str, dict[str, float]] = {}
        self.proposal_rewards = {t: dict(r) for t, r in (proposal_rewards or {}).items()}
        self._known: list[str] = []
        self._ranked: list[str] = []
        self.update(rewards or {}, task_ids)

    def update(self, rewards: Mapping[str, Mapping[str, float]], task_ids: Iterable[str] | None = None,
               informative_first: Sequence[str] = ()) -> None:
        """New reward-model scores (after retraining): the queue is re-ordered. `task_ids`: tasks to order even
        without a score (after the scored ones, in the random order). `informative_first`: the scored tasks in
        the `information` order (`information_order`), which the scores alone do not decide."""
        self.rewards = {t: dict(r) for t, r in rewards.items()}
        self._known = list(dict.fromkeys([*self._known, *(task_ids or ()), *self.rewards]))
        shuffled = sorted(self._known, key=lambda t: random_key(self.seed, t))
        if self.order in SCORED_ORDERS:
            if self.order == "uncertainty":
                scored = sorted(self.rewards, key=lambda t: (reward_margin(list(self.rewards[t].values())),
                                                             random_key(self.seed, t)))
            else:
                scored = list(dict.fromkeys(informative_first))
                if set(scored) != set(self.rewards):
                    raise ValueError("the information order must list exactly the scored tasks")
            self._ranked = scored + [t for t in shuffled if t not in self.rewards]
        elif self.order == "random":
            self._ranked = shuffled
        else:
            self._ranked = []

    @property
    def serving_order(self) -> list[str]:
        """The known tasks in the order they are tried (empty for `fewest-rankings`: the store's queue)."""
        return list(self._ranked)

    def proposal(self, task_id: str) -> dict[str, int] | None:
        """The reward model's ranking of a task to open it with (None: no proposal for it)."""
        rewards = self.proposal_rewards.get(task_id)
        return proposed_ranks(rewards) if rewards else None

    def next_task(self, store: SQLLabelStore, annotator: str, overlap: int, *, max_held: int = MAX_HELD,
                  gold_rate: float = 0.0) -> Task | None:
        """The next task for this annotator in this queue's order, assigned to them; as `store.next_task`: their
        own open assignment first, never a task they ranked or skipped, only a task with a free place. When
        the ordered tasks are done, the store's own queue serves the rest. Gold questions are not in this order:
        the store serves them at `gold_rate` (`SQLLabelStore.next_task`), among the ordered tasks too."""
        if not self._ranked:
            return store.next_task(annotator, overlap, max_held=max_held, gold_rate=gold_rate)
        gold = store.gold_answers()
        if gold and gold_rate > 0 and store.gold_draw() < gold_rate:
            served = store.next_task(annotator, overlap, max_held=max_held, gold_rate=1.0)
            if served is not None and served.id in gold:
                return served
        done = {item.task_id for item in store.history(annotator)}  # ranked or skipped by them
        counts = Counter(r.task_id for r in store.export_rankings())
        now, held, mine = self.clock(), Counter(), []
        for a in store.assignments():
            if a.annotator == annotator:
                mine.append(a.task_id)
            elif a.expires_at > now:
                held[a.task_id] += 1
        for task_id in [*mine, *self._ranked]:
            if task_id in done or task_id in gold or counts[task_id] + held[task_id] >= overlap:
                continue
            if store.assign_task(annotator, task_id, overlap, max_held=max_held):  # checked again, atomically
                return store.task_for(annotator, task_id)
        return store.next_task(annotator, overlap, max_held=max_held, gold_rate=gold_rate)


# ---- scoring with a reward model ----

def score_tasks(rm, tokenizer, tasks: Iterable[Task], batch_size: int = 32) -> dict[str, dict[str, float]]:
    """{task id: {completion id: reward}}: every completion scored once by the reward model."""
    from reward_model.model import score_texts

    tasks = list(tasks)
    prompts = [t.prompt for t in tasks for _ in t.completions]
    texts = [c.text for t in tasks for c in t.completions]
    rewards = iter(score_texts(rm, tokenizer, prompts, texts, batch_size=batch_size,
                               max_length=getattr(rm, "meta", {}).get("max_length", 512)))
    return {t.id: {c.id: next(rewards) for c in t.completions} for t in tasks}


def information_order(rm, tokenizer, open_tasks: Sequence[Task], ranked: Iterable[RankedTask],
                      batch_size: int = 32) -> tuple[dict[str, dict[str, float]], list[str]]:
    """The `information` order of `open_tasks` for a reward model whose training rankings are `ranked`: their
    rewards ({task id: {completion id: reward}}, as `score_tasks`) and their ids in serving order
    (`reward_model.posterior.information_order`)."""
    import torch

    from reward_model.model import head_rewards, readout_texts
    from reward_model.posterior import information_order as order_by_information
    from reward_model.posterior import pair_matrix
    from rlhf.pairs import pair_indices

    open_tasks, ranked = list(open_tasks), list(ranked)
    # Each completion is read once, though a task ranked by several annotators, or ranked and still open
    # (overlap > 1), comes more than once; the open tasks' rows come first.
    rows = {(t.id, c.id): (t.prompt, c.text) for t in open_tasks for c in t.completions}
    for task in ranked:
        for c in task.completions:
            rows.setdefault((task.task_id, c.id), (task.prompt, c.text))
    row = {key: i for i, key in enumerate(rows)}
    features = readout_texts(rm, tokenizer, [p for p, _ in rows.values()], [c for _, c in rows.values()],
                             batch_size, getattr(rm, "meta", {}).get("max_length", 512))
    open_rows = sum(len(t.completions) for t in open_tasks)
    rewards = dict(zip(rows, head_rewards(rm, features[:open_rows])))

    def task_features(task_id, completions):
        return features[[row[(task_id, c.id)] for c in completions]]

    scores = {t.id: {c.id: rewards[(t.id, c.id)] for c in t.completions} for t in open_tasks}
    candidates = [pair_matrix(task_features(t.id, t.completions), list(combinations(range(len(t.completions)), 2)))
                  for t in open_tasks]
    ranked_pairs = [features.new_zeros(0, features.shape[1])]
    ranked_pairs += [pair_matrix(task_features(t.task_id, t.completions), pair_indices(t.ranks)) for t in ranked]
    order = order_by_information(candidates, torch.cat(ranked_pairs), rm.score_head.weight.detach().cpu().flatten())
    return scores, [open_tasks[i].id for i in order]


def store_tasks(store: SQLLabelStore) -> list[Task]:
    """Every task in the store, in import order."""
    return [store.get_task(task_id) for task_id in store.task_ids()]


def score_store(rm_dir: str | Path, store: SQLLabelStore, batch_size: int = 32) -> dict[str, dict[str, float]]:
    """The reward model at `rm_dir` scores every task of the store (what `rlhf label --rm` does at start)."""
    from reward_model.model import load_reward_model

    rm, tokenizer = load_reward_model(rm_dir)
    return score_tasks(rm, tokenizer, store_tasks(store), batch_size)


def open_tasks_of(store: SQLLabelStore, overlap: int) -> list[Task]:
    """The store's tasks with fewer than `overlap` rankings, in import order (full ones are never served)."""
    counts = Counter(r.task_id for r in store.export_rankings())
    return [t for t in store_tasks(store) if counts[t.id] < overlap]


def reorder_queue(queue: ActiveQueue, rm_dir: str | Path, store: SQLLabelStore, overlap: int,
                  batch_size: int = 32) -> dict[str, dict[str, float]]:
    """The reward model at `rm_dir` scores the store's open tasks and `queue` is re-ordered by its order.
    Returns the scores ({task id: {completion id: reward}})."""
    from reward_model.model import load_reward_model

    rm, tokenizer = load_reward_model(rm_dir)
    tasks = open_tasks_of(store, overlap)
    if queue.order == "information":
        scores, order = information_order(rm, tokenizer, tasks, store.export_ranked_tasks(), batch_size)
        queue.update(scores, informative_first=order)
    else:
        scores = score_tasks(rm, tokenizer, tasks, batch_size)
        queue.update(scores)
    return scores


def base_model_of(rm_dir: str | Path) -> str:
    """The base model a reward model directory was trained on (its retrained successors use the same)."""
    from reward_model.model import read_meta

    return read_meta(rm_dir)["base_model"]


# ---- the simulated loop: label N, retrain, re-order ----

def retrain_reward_model(store: SQLLabelStore, out: Path, settings: Mapping[str, Any]) -> dict[str, Any]:
    """Train a reward model from scratch on every ranking in the store (written to OUT/data/rankings.jsonl);
    `settings` are RewardTrainingConfig fields (model, epochs, ...). Returns the training summary."""
    from reward_model.config import RewardTrainingConfig
    from reward_model.train import train_reward_model
    from rlhf.jsonl import write_jsonl

    count = write_jsonl(out / "data" / "rankings.jsonl", (r.to_dict() for r in store.export_ranked_tasks()))
    if not count:
        raise UserError("no rankings to train a reward model on yet")
    config = RewardTrainingConfig(data=str(out / "data"), out=str(out / "rm"), **{"checkpoint_every": 0, **settings})
    return train_reward_model(config, progress=False)


class RetrainingLoop:
    """What `rlhf simulate --rm-every N` does between rounds: after every N new rankings, train a reward model
    on all of them (OUT/round-R/), score every task again and re-order the queue. `on_round(round, rankings,
    rm_dir)` is called after each retraining (the benchmark evaluates the reward model there)."""

    def __init__(self, store: SQLLabelStore, queue: ActiveQueue, every: int, out: str | Path,
                 rm_settings: Mapping[str, Any], on_round: Callable[[int, int, str], None] | None = None,
                 overlap: int = 1):
        if every < 1:
            raise UserError(f"--rm-every must be >= 1, got {every}")
        self.store, self.queue, self.every, self.out, self.overlap = store, queue, every, Path(out), overlap
        self.rm_settings, self.on_round = dict(rm_settings), on_round
        self.rounds: list[dict[str, Any]] = []

    def __call__(self, rankings: int) -> None:
        """Called by `simulate` after each stored ranking, with the number stored so far."""
        if rankings % self.every == 0:
            self.retrain(rankings)

    def retrain(self, rankings: int) -> None:
        folder = self.out / f"round-{len(self.rounds) + 1}"
        started = time.time()
        summary = retrain_reward_model(self.store, folder, self.rm_settings)
        if self.queue.order in SCORED_ORDERS:  # the other orders do not depend on the scores
            reorder_queue(self.queue, summary["rm_dir"], self.store, self.overlap)
        self.rounds.append({"round": len(self.rounds) + 1, "rankings": rankings, "rm_dir": summary["rm_dir"],
                            "seconds": round(time.time() - started, 1)})
        log.warning("round %d: reward model retrained on %d rankings in %.0f s", len(self.rounds), rankings,
                    time.time() - started)
        if self.on_round is not None:
            self.on_round(len(self.rounds), rankings, summary["rm_dir"])
