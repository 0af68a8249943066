"""The rows `rlhf import` reads, one labeling task each (docs/data-formats.md, "Tasks"):

- our tasks, `{id?, prompt, completions}`, the prompt a string or a conversation (`messages` in its place);
- preference rows, whose two replies become the task's two completions to rank: TRL's pairs as texts
  (`{prompt, chosen, rejected}`) or in its conversational form, with the prompt explicit (`prompt` messages,
  `chosen`/`rejected` one assistant message each) or implicit (`chosen`/`rejected` whole dialogues sharing every
  turn before the last assistant turn);
- raw transcripts as in Anthropic's HH-RLHF files: `{chosen, rejected}` texts of the form
  "\\n\\nHuman: ...\\n\\nAssistant: ...", parsed into turns (a `System:` turn may come first).

A row that does not fit raises ValueError with a one-line reason; the caller names the file and line.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from rlhf.records import (
    Completion,
    Message,
    Pair,
    Task,
    check_conversation,
    content_id,
    encode_prompt,
    parse_prompt,
)

_SPEAKERS = {"Human": "user", "Assistant": "assistant", "System": "system"}
_TURN = re.compile(r"\n\n(Human|Assistant|System):")


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
    """(prompt, chosen reply, rejected reply) of an HH-RLHF row: two transcripts that share every turn before
    their last, the assistant's reply."""
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


def task_from_row(obj: Mapping[str, Any]) -> Task:
    """The labeling task of one row of any form above (see the module docstring)."""
    if "completions" in obj:
        return Task.from_dict(obj)
    if "chosen" not in obj and "rejected" not in obj:
        raise ValueError("expected a task ({prompt or messages, completions}) or a preference row ({prompt, chosen, "
                         "rejected}, TRL's conversational form, or an HH-RLHF transcript pair {chosen, rejected})")
    if obj.get("prompt") is None and isinstance(obj.get("chosen"), str):
        prompt, chosen, rejected = transcript_pair(obj.get("chosen"), obj.get("rejected"))
    else:
        pair = Pair.from_dict(obj)
        prompt, chosen, rejected = pair.prompt, pair.chosen, pair.rejected
        if isinstance(prompt, str):
            prompt = parse_prompt(prompt)
    for key, text in (("chosen", chosen), ("rejected", rejected)):
        if not text.strip():
            raise ValueError(f"the '{key}' reply is empty (nothing to rank)")
    if chosen == rejected:
        raise ValueError("'chosen' and 'rejected' are the same reply (nothing to rank)")
    task_id = obj.get("id") or content_id("t-", encode_prompt(prompt), chosen, rejected)
    if not isinstance(task_id, str):
        raise ValueError("'id' must be a string")
    return Task(task_id, prompt, (Completion(f"{task_id}-0", chosen), Completion(f"{task_id}-1", rejected)))
