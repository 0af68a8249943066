"""The records that flow through the stages: task -> ranking -> pair -> scored sample.

Each is defined once here, with its JSON form (`to_dict` / `from_dict`). `from_dict` checks
everything it is given and raises ValueError with a one-line reason; callers that read files
prefix the file and line.
"""

from __future__ import annotations

import hashlib
import json
import re
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


ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Message:
    """One turn of a conversation: its role (system, user or assistant) and its non-empty text."""

    role: str
    content: str

    def to_dict(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}

    @classmethod
    def from_dict(cls, obj: Any, where: str) -> Message:
        if not isinstance(obj, Mapping):
            raise ValueError(f"{where} must be {{\"role\": ..., \"content\": text}}")
        role, content = obj.get("role"), obj.get("content")
        if role not in ROLES:
            raise ValueError(f"{where} has the unknown role {role!r} (expected system, user or assistant)")
        if not isinstance(content, str):
            raise ValueError(f"{where} ({role}) must have a 'content' string")
        if not content.strip():
            raise ValueError(f"{where} ({role}) is empty")
        return cls(role, _unicode(content, f"{where} ({role})"))


Prompt = str | tuple[Message, ...]
"""What a completion answers: one text (a single user turn), or a conversation of messages that ends in a user
turn, the completion being the next assistant turn."""


def parse_messages(value: Any, key: str) -> tuple[Message, ...]:
    """A list of {"role", "content"} objects as messages, each checked (`key` names the field in errors)."""
    if not isinstance(value, list) or not value:
        raise ValueError(f"'{key}' must be a non-empty list of {{\"role\", \"content\"}} messages")
    return tuple(Message.from_dict(m, f"'{key}' message {i + 1}") for i, m in enumerate(value))


def check_conversation(messages: tuple[Message, ...], key: str) -> tuple[Message, ...]:
    """A conversation prompt: a system message only first, at least one user turn, the last turn the user's."""
    if any(m.role == "system" for m in messages[1:]):
        raise ValueError(f"'{key}': a system message may only come first")
    if messages[-1].role != "user":
        raise ValueError(f"'{key}' ends in a {messages[-1].role} turn: a conversation to continue must end in "
                         f"a user turn")
    return messages


def parse_prompt(value: Any, key: str = "prompt") -> Prompt:
    """A prompt from its JSON form: a non-empty string, or a conversation (a list of messages ending in a user
    turn)."""
    if isinstance(value, list):
        return check_conversation(parse_messages(value, key), key)
    if not isinstance(value, str):
        raise ValueError(f"'{key}' must be a string or a list of {{\"role\", \"content\"}} messages")
    if not value.strip():
        raise ValueError(f"'{key}' is empty")
    return _unicode(value, f"'{key}'")


def prompt_field(obj: Mapping[str, Any]) -> Prompt:
    """The prompt of a row (a task, a ranking, a prompts file's line): its "prompt", or a "messages" list in its
    place."""
    if "messages" in obj and obj.get("prompt") is not None:
        raise ValueError("a row has either 'prompt' or 'messages', not both")
    if "messages" in obj:
        return parse_prompt(obj.get("messages"), "messages")
    return parse_prompt(obj.get("prompt"))


def prompt_json(prompt: Prompt) -> str | list[dict[str, str]]:
    """A prompt's JSON form: the string, or the list of {"role", "content"} messages."""
    return prompt if isinstance(prompt, str) else [m.to_dict() for m in prompt]


def as_messages(prompt: Prompt) -> list[dict[str, str]]:
    """The prompt as chat messages: a string prompt is one user turn."""
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [m.to_dict() for m in prompt]


def as_conversation(prompt: Prompt) -> tuple[Message, ...]:
    """The prompt as a conversation: a string prompt is one user turn (the chat template reads both alike)."""
    return (Message("user", prompt),) if isinstance(prompt, str) else prompt


def last_user_turn(prompt: Prompt) -> str:
    """The text the completion answers directly: the prompt itself, or a conversation's last user turn."""
    return prompt if isinstance(prompt, str) else prompt[-1].content


_CONVERSATION_MARK = "\x1e"
"""Starts a stored prompt that is JSON: ASCII's record separator, which no typed prompt begins with. A plain
prompt that does begin with it is stored as JSON too, so reading back is never ambiguous."""


def encode_prompt(prompt: Prompt) -> str:
    """A prompt as one text (a database column, a dataset's string column): a plain prompt as itself, a
    conversation as the mark + its JSON. `decode_prompt` inverts it exactly."""
    if isinstance(prompt, str) and not prompt.startswith(_CONVERSATION_MARK):
        return prompt
    return _CONVERSATION_MARK + json.dumps(prompt_json(prompt), ensure_ascii=False, separators=(",", ":"))


def decode_prompt(text: str) -> Prompt:
    """The prompt `encode_prompt` wrote."""
    if not text.startswith(_CONVERSATION_MARK):
        return text
    value = json.loads(text[len(_CONVERSATION_MARK):])
    return value if isinstance(value, str) else tuple(Message(m["role"], m["content"]) for m in value)


def transcript(prompt: Prompt) -> str:
    """A conversation as flat text in HH-RLHF's transcript form ("\\n\\nHuman: ...\\n\\nAssistant:"),
    ending where the assistant's reply goes; a string prompt is returned as it is."""
    if isinstance(prompt, str):
        return prompt
    names = {"system": "System", "user": "Human", "assistant": "Assistant"}
    return "".join(f"\n\n{names[m.role]}: {m.content}" for m in prompt) + "\n\nAssistant:"


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
    prompt: Prompt
    completions: tuple[Completion, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "prompt": prompt_json(self.prompt),
                "completions": [c.to_dict() for c in self.completions]}

    @classmethod
    def from_dict(cls, obj: Mapping[str, Any]) -> Task:
        prompt = prompt_field(obj)
        raw = obj.get("completions")
        if not isinstance(raw, list):
            raise ValueError("'completions' must be a list")
        if len(raw) < 2:
            raise ValueError(f"a task needs at least 2 completions to rank, got {len(raw)}")
        texts = [c.get("text", "") if isinstance(c, Mapping) else c for c in raw]
        task_id = obj.get("id") or content_id("t-", encode_prompt(prompt), *[str(t) for t in texts])
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
    comment: str | None = None
    """The annotator's comment on the task (untrusted text; None: none)."""
    flags: tuple[str, ...] = ()
    """The flags the annotator set on the task (names from `rlhf label --flags`, e.g. "unsafe"), sorted."""

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
    prompt: Prompt
    completions: tuple[RankedCompletion, ...]
    comment: str | None = None
    """The annotator's comment (`Ranking.comment`)."""
    flags: tuple[str, ...] = ()
    """The annotator's flags (`Ranking.flags`)."""

    @property
    def ranks(self) -> tuple[int, ...]:
        """The ranks in completion order."""
        return tuple(c.rank for c in self.completions)

    @classmethod
    def from_task(cls, task: Task, ranking: Ranking) -> RankedTask:
        dense = Ranking.normalized(ranking.ranks, [c.id for c in task.completions])
        return cls(task.id, ranking.annotator, task.prompt,
                   tuple(RankedCompletion(c.id, c.text, dense[c.id]) for c in task.completions),
                   ranking.comment, tuple(ranking.flags))

    def to_dict(self) -> dict[str, Any]:
        return {"task_id": self.task_id, "annotator": self.annotator, "prompt": prompt_json(self.prompt),
                "completions": [{"id": c.id, "text": c.text, "rank": c.rank} for c in self.completions],
                "comment": self.comment, "flags": list(self.flags)}

    @classmethod
    def from_dict(cls, obj: Mapping[str, Any]) -> RankedTask:
        prompt = prompt_field(obj)
        raw = obj.get("completions")
        if not isinstance(raw, list) or len(raw) < 2:
            raise ValueError("'completions' must be a list of at least 2 ranked completions")
        texts = [str(c.get("text", "")) for c in raw if isinstance(c, Mapping)]
        task_id = str(obj.get("task_id") or content_id("t-", encode_prompt(prompt), *texts))
        completions = tuple(Completion.from_dict(c, f"{task_id}-{i}") for i, c in enumerate(raw))
        if len({c.id for c in completions}) != len(completions):
            raise ValueError("completion ids must be unique within a ranking")
        comment, flags = obj.get("comment"), obj.get("flags") or []
        if comment is not None and not isinstance(comment, str):
            raise ValueError("'comment' must be a string or null")
        if not isinstance(flags, list) or not all(isinstance(f, str) for f in flags):
            raise ValueError("'flags' must be a list of strings")
        ranking = Ranking(task_id, str(obj.get("annotator") or ""),
                          {c.id: r.get("rank") for c, r in zip(completions, raw)}, comment=comment,
                          flags=tuple(sorted(set(flags))))
        return cls.from_task(Task(task_id, prompt, completions), ranking)


@dataclass(frozen=True)
class Pair:
    """A (chosen, rejected) preference: one row of train.jsonl / test.jsonl, TRL's preference format. With a
    conversation prompt its JSON form is TRL's conversational one: the prompt's messages, and chosen and
    rejected as one assistant message each."""

    prompt: Prompt
    chosen: str
    rejected: str
    task_id: str = ""
    annotator: str = ""
    rank_chosen: int | None = None
    rank_rejected: int | None = None

    def to_dict(self) -> dict[str, Any]:
        def reply(text: str) -> str | list[dict[str, str]]:
            return text if isinstance(self.prompt, str) else [{"role": "assistant", "content": text}]

        return {
            "prompt": prompt_json(self.prompt),
            "chosen": reply(self.chosen),
            "rejected": reply(self.rejected),
            "task_id": self.task_id,
            "annotator": self.annotator,
            "rank_chosen": self.rank_chosen,
            "rank_rejected": self.rank_rejected,
        }

    @classmethod
    def from_dict(cls, obj: Mapping[str, Any]) -> Pair:
        """Texts ({prompt, chosen, rejected} strings); TRL's conversational form: message lists, with the
        prompt explicit (`prompt` messages, then `chosen` / `rejected` the assistant's reply) or implicit
        (`chosen` and `rejected` whole dialogues: the turns before their last assistant turn, the same in
        both, are the prompt); or, without a prompt, HH-RLHF's transcripts (`transcript_pair`)."""
        def rank(key: str) -> int | None:
            value = obj.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise ValueError(f"'{key}' must be an integer")
            return value

        if any(isinstance(obj.get(key), list) for key in ("prompt", "chosen", "rejected")):
            prompt, chosen, rejected = conversation_pair(obj.get("prompt"), obj.get("chosen"), obj.get("rejected"))
        elif obj.get("prompt") is None and is_transcript(obj.get("chosen")):
            prompt, chosen, rejected = transcript_pair(obj.get("chosen"), obj.get("rejected"))
        else:
            prompt = parse_prompt(obj.get("prompt"))
            chosen, rejected = _text(obj, "chosen", allow_empty=True), _text(obj, "rejected", allow_empty=True)
        return cls(
            prompt=prompt,
            chosen=chosen,
            rejected=rejected,
            task_id=str(obj.get("task_id") or ""),
            annotator=str(obj.get("annotator") or ""),
            rank_chosen=rank("rank_chosen"),
            rank_rejected=rank("rank_rejected"),
        )


_SPEAKERS = {"Human": "user", "Assistant": "assistant", "System": "system"}
_TURN = re.compile(r"\n\n(Human|Assistant|System):")


def is_transcript(value: Any) -> bool:
    """Whether `value` is a text in HH-RLHF's transcript form (it starts with "\\n\\nHuman:" or "\\n\\nSystem:")."""
    return isinstance(value, str) and _TURN.match(value) is not None and not value.startswith("\n\nAssistant:")


def parse_transcript(text: str, key: str) -> tuple[Message, ...]:
    """The turns of an HH-RLHF transcript ("\\n\\nHuman: ...\\n\\nAssistant: ..."); each turn's text stripped."""
    parts = _TURN.split(text)
    if parts[0].strip() or len(parts) < 3:
        raise ValueError(f"'{key}' is not a transcript: it must start with \"\\n\\nHuman:\" (turns "
                         f"\"\\n\\nHuman: ...\\n\\nAssistant: ...\")")
    turns = []
    for n, (speaker, content) in enumerate(zip(parts[1::2], parts[2::2]), start=1):
        if not content.strip():
            raise ValueError(f"'{key}' turn {n} ({speaker}) is empty")
        turns.append(Message(_SPEAKERS[speaker], content.strip()))
    return tuple(turns)


def transcript_pair(chosen: Any, rejected: Any) -> tuple[tuple[Message, ...], str, str]:
    """(prompt, chosen reply, rejected reply) of an HH-RLHF row: two transcripts ("\\n\\nHuman: ...\\n\\nAssistant:
    ...", a "System:" turn allowed first) that share every turn before their last, the assistant's reply."""
    dialogues = {}
    for key, text in (("chosen", chosen), ("rejected", rejected)):
        if not isinstance(text, str):
            raise ValueError(f"'{key}' must be a transcript string")
        turns = parse_transcript(text, key)
        if turns[-1].role != "assistant":
            raise ValueError(f"'{key}' ends in a {turns[-1].role} turn: it must end in the assistant's reply")
        if len(turns) < 2:
            raise ValueError(f"'{key}' has no turn before the assistant's reply")
        dialogues[key] = turns
    if dialogues["chosen"][:-1] != dialogues["rejected"][:-1]:
        raise ValueError("'chosen' and 'rejected' differ before their last assistant turn (they must share the "
                         "conversation)")
    return (check_conversation(dialogues["chosen"][:-1], "the conversation"), dialogues["chosen"][-1].content,
            dialogues["rejected"][-1].content)


def conversation_pair(prompt: Any, chosen: Any, rejected: Any) -> tuple[tuple[Message, ...], str, str]:
    """(prompt messages, chosen reply, rejected reply) of TRL's conversational preference form: `prompt`
    (optional) + `chosen` and + `rejected` are each a conversation that ends in the assistant's reply; the
    turns before it are the prompt, the same in both, ending in a user turn."""
    if not isinstance(chosen, list) or not isinstance(rejected, list):
        if isinstance(prompt, list):
            raise ValueError("'prompt' must be a string when 'chosen' and 'rejected' are strings (or all three "
                             "message lists, TRL's conversational form)")
        raise ValueError("'chosen' and 'rejected' must both be strings or both message lists")
    if prompt is not None and not isinstance(prompt, list):
        raise ValueError("'prompt' must be a message list when 'chosen' and 'rejected' are message lists")
    head = parse_messages(prompt, "prompt") if prompt is not None else ()
    prompts, replies = {}, {}
    for key, dialogue in (("chosen", chosen), ("rejected", rejected)):
        turns = head + parse_messages(dialogue, key)
        if turns[-1].role != "assistant":
            raise ValueError(f"'{key}' ends in a {turns[-1].role} turn: it must end in the assistant's reply")
        if len(turns) < 2:
            raise ValueError(f"'{key}' has no turn before the assistant's reply (no prompt)")
        prompts[key], replies[key] = turns[:-1], turns[-1].content
    if prompts["chosen"] != prompts["rejected"]:
        raise ValueError("'chosen' and 'rejected' differ before their last assistant turn (they must share the "
                         "prompt)")
    return check_conversation(prompts["chosen"], "prompt"), replies["chosen"], replies["rejected"]


@dataclass(frozen=True)
class ScoredSample:
    """A prompt and completion with a scalar reward: what `rlhf score` writes, and each held-out evaluation
    sample of `rlhf ppo` (eval_samples.jsonl, samples.jsonl), which adds "kl" and "oracle" beside it."""

    prompt: Prompt
    completion: str
    reward: float

    def to_dict(self) -> dict[str, Any]:
        return {"prompt": prompt_json(self.prompt), "completion": self.completion, "reward": self.reward}
