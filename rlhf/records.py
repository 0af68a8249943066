"""The records that flow through the stages: task -> ranking -> pair -> scored sample.

Each is defined once here, with its JSON form (`to_dict` / `from_dict`). `from_dict` checks
everything it is given and raises ValueError with a one-line reason; callers that read files
prefix the file and line.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


def is_text(value: Any) -> bool:
    """Whether `value` is a str of valid Unicode: JSON's "\\ud800" escapes decode to lone surrogates, which no
    file or database can store."""
    if not isinstance(value, str):
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _unicode(value: str, what: str) -> str:
    if not is_text(value):
        raise ValueError(f"{what} is not valid Unicode text (it holds a lone surrogate)")
    return value


def _text(obj: Mapping[str, Any], key: str, *, allow_empty: bool = False) -> str:
    value = obj.get(key)
    if not isinstance(value, str):
        raise ValueError(f"'{key}' must be a string")
    if not allow_empty and not value.strip():
        raise ValueError(f"'{key}' is empty")
    return _unicode(value, f"'{key}'")


def content_id(prefix: str, *parts: str) -> str:
    """A stable id from content, so re-importing the same data yields the same ids."""
    # surrogatepass: hashing must not fail before the content's own check names the problem
    digest = hashlib.sha1("\x00".join(parts).encode("utf-8", "surrogatepass")).hexdigest()[:12]
    return f"{prefix}{digest}"


@dataclass(frozen=True)
class Completion:
    """One model completion of a task's prompt."""

    id: str
    text: str
    model: str = ""
    num_tokens: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "text": self.text, "model": self.model, "num_tokens": self.num_tokens}

    @classmethod
    def from_dict(cls, obj: Mapping[str, Any], default_id: str) -> Completion:
        if isinstance(obj, str):  # bare strings are accepted for completions made elsewhere
            obj = {"text": obj}
        if not isinstance(obj, Mapping):
            raise ValueError("each completion must be an object or a string")
        cid = obj.get("id", default_id)
        if not isinstance(cid, str) or not cid:
            raise ValueError("completion 'id' must be a non-empty string")
        _unicode(cid, "completion 'id'")
        num_tokens = obj.get("num_tokens")
        if num_tokens is not None and (isinstance(num_tokens, bool) or not isinstance(num_tokens, int)
                                       or num_tokens < 0):
            raise ValueError("completion 'num_tokens' must be a non-negative integer")
        model = obj.get("model") or ""
        if not isinstance(model, str):
            raise ValueError("completion 'model' must be a string")
        _unicode(model, "completion 'model'")
        return cls(id=cid, text=_text(obj, "text", allow_empty=True), model=model, num_tokens=num_tokens)


@dataclass(frozen=True)
class Task:
    """A labeling task: one prompt and K >= 2 completions to rank. One line of tasks.jsonl."""

    id: str
    prompt: str
    completions: tuple[Completion, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "prompt": self.prompt, "completions": [c.to_dict() for c in self.completions]}

    @classmethod
    def from_dict(cls, obj: Mapping[str, Any]) -> Task:
        prompt = _text(obj, "prompt")
        raw = obj.get("completions")
        if not isinstance(raw, list):
            raise ValueError("'completions' must be a list")
        if len(raw) < 2:
            raise ValueError(f"a task needs at least 2 completions to rank, got {len(raw)}")
        texts = [c.get("text", "") if isinstance(c, Mapping) else c for c in raw]
        task_id = obj.get("id") or content_id("t-", prompt, *[str(t) for t in texts])
        if not isinstance(task_id, str):
            raise ValueError("'id' must be a string")
        _unicode(task_id, "'id'")
        completions = tuple(Completion.from_dict(c, f"{task_id}-{i}") for i, c in enumerate(raw))
        ids = [c.id for c in completions]
        if len(set(ids)) != len(ids):
            raise ValueError("completion ids must be unique within a task")
        return cls(id=task_id, prompt=prompt, completions=completions)


@dataclass(frozen=True)
class Ranking:
    """One annotator's ranking of one task: completion id -> rank (1 is best; equal ranks are ties)."""

    task_id: str
    annotator: str
    ranks: Mapping[str, int] = field(default_factory=dict)
    seconds: float | None = None
    """Time the annotator spent on the task as the client reported it, summed over edits (None if not given)."""
    request_id: str | None = None
    """Request id of the submission that wrote the current ranks (None if not given)."""
    created_at: float | None = None
    """Unix time of the first submission."""
    updated_at: float | None = None
    """Unix time of the latest submission (== created_at unless edited)."""

    @staticmethod
    def normalized(ranks: Mapping[str, int], completion_ids: list[str] | tuple[str, ...]) -> dict[str, int]:
        """Check that `ranks` covers exactly `completion_ids` with positive integers; return dense ranks 1..m.

        Only the order matters: {a: 1, b: 1, c: 5} becomes {a: 1, b: 1, c: 2}.
        """
        if not isinstance(ranks, Mapping):
            raise ValueError("ranks must map completion ids to integers")
        given, expected = set(ranks), set(completion_ids)
        if given != expected:
            missing, extra = sorted(expected - given), sorted(given - expected)
            parts = ([f"missing {missing}"] if missing else []) + ([f"unknown {extra}"] if extra else [])
            raise ValueError("ranking must cover exactly the task's completions: " + "; ".join(parts))
        for cid, rank in ranks.items():
            if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
                raise ValueError(f"rank of {cid!r} must be a positive integer, got {rank!r}")
        if len(set(ranks.values())) == 1:
            raise ValueError("a ranking where every completion ties says nothing; skip the task instead")
        dense = {value: i + 1 for i, value in enumerate(sorted(set(ranks.values())))}
        return {cid: dense[ranks[cid]] for cid in completion_ids}


@dataclass(frozen=True)
class RankedCompletion:
    """A completion of a ranked task with its rank (1 is best; equal ranks are ties)."""

    id: str
    text: str
    rank: int


@dataclass(frozen=True)
class RankedTask:
    """A task joined with one annotator's ranking: one line of rankings.jsonl, what the RM trains on."""

    task_id: str
    annotator: str
    prompt: str
    completions: tuple[RankedCompletion, ...]

    @property
    def ranks(self) -> tuple[int, ...]:
        """The ranks in completion order."""
        return tuple(c.rank for c in self.completions)

    @classmethod
    def from_task(cls, task: Task, ranking: Ranking) -> RankedTask:
        dense = Ranking.normalized(ranking.ranks, [c.id for c in task.completions])
        return cls(task.id, ranking.annotator, task.prompt,
                   tuple(RankedCompletion(c.id, c.text, dense[c.id]) for c in task.completions))

    def to_dict(self) -> dict[str, Any]:
        return {"task_id": self.task_id, "annotator": self.annotator, "prompt": self.prompt,
                "completions": [{"id": c.id, "text": c.text, "rank": c.rank} for c in self.completions]}

    @classmethod
    def from_dict(cls, obj: Mapping[str, Any]) -> RankedTask:
        prompt = _text(obj, "prompt")
        raw = obj.get("completions")
        if not isinstance(raw, list) or len(raw) < 2:
            raise ValueError("'completions' must be a list of at least 2 ranked completions")
        task_id = str(obj.get("task_id") or content_id("t-", prompt, *[str(c.get("text", "")) for c in raw
                                                                        if isinstance(c, Mapping)]))
        completions = tuple(Completion.from_dict(c, f"{task_id}-{i}") for i, c in enumerate(raw))
        if len({c.id for c in completions}) != len(completions):
            raise ValueError("completion ids must be unique within a ranking")
        ranking = Ranking(task_id, str(obj.get("annotator") or ""),
                          {c.id: r.get("rank") for c, r in zip(completions, raw)})
        return cls.from_task(Task(task_id, prompt, completions), ranking)


@dataclass(frozen=True)
class Pair:
    """A (chosen, rejected) preference: one row of train.jsonl / test.jsonl, TRL's preference format."""

    prompt: str
    chosen: str
    rejected: str
    task_id: str = ""
    annotator: str = ""
    rank_chosen: int | None = None
    rank_rejected: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "prompt": self.prompt,
            "chosen": self.chosen,
            "rejected": self.rejected,
            "task_id": self.task_id,
            "annotator": self.annotator,
            "rank_chosen": self.rank_chosen,
            "rank_rejected": self.rank_rejected,
        }

    @classmethod
    def from_dict(cls, obj: Mapping[str, Any]) -> Pair:
        def rank(key: str) -> int | None:
            value = obj.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise ValueError(f"'{key}' must be an integer")
            return value

        return cls(
            prompt=_text(obj, "prompt"),
            chosen=_text(obj, "chosen", allow_empty=True),
            rejected=_text(obj, "rejected", allow_empty=True),
            task_id=str(obj.get("task_id") or ""),
            annotator=str(obj.get("annotator") or ""),
            rank_chosen=rank("rank_chosen"),
            rank_rejected=rank("rank_rejected"),
        )


@dataclass(frozen=True)
class ScoredSample:
    """A prompt and completion with a scalar reward: what `rlhf score` writes, and each held-out evaluation
    sample of `rlhf ppo` (eval_samples.jsonl, samples.jsonl), which adds "kl" and "oracle" beside it."""

    prompt: str
    completion: str
    reward: float

    def to_dict(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "completion": self.completion, "reward": self.reward}
