"""The rows `rlhf import` reads, one labeling task each (docs/data-formats.md, "Tasks"):

- our tasks, `{id?, prompt, completions}`, the prompt a string or a conversation (`messages` in its place);
- preference rows, whose two replies become the task's two completions to rank: TRL's pairs as texts
  (`{prompt, chosen, rejected}`) or in its conversational form, with the prompt explicit (`prompt` messages,
  `chosen`/`rejected` one assistant message each) or implicit (`chosen`/`rejected` whole dialogues sharing every
  turn before the last assistant turn);
- raw transcripts as in Anthropic's HH-RLHF files: `{chosen, rejected}` texts of the form
  "\\n\\nHuman: ...\\n\\nAssistant: ...", parsed into turns (`rlhf.records.transcript_pair`).

A row that does not fit raises ValueError with a one-line reason; the caller names the file and line.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rlhf.records import Completion, Pair, Task, content_id, encode_prompt


def task_from_row(obj: Mapping[str, Any]) -> Task:
    """The labeling task of one row of any form above (see the module docstring)."""
    if "completions" in obj:
        return Task.from_dict(obj)
    if "chosen" not in obj and "rejected" not in obj:
        raise ValueError("expected a task ({prompt or messages, completions}) or a preference row ({prompt, chosen, "
                         "rejected}, TRL's conversational form, or an HH-RLHF transcript pair {chosen, rejected})")
    pair = Pair.from_dict(obj)
    prompt, chosen, rejected = pair.prompt, pair.chosen, pair.rejected
    for key, text in (("chosen", chosen), ("rejected", rejected)):
        if not text.strip():
            raise ValueError(f"the '{key}' reply is empty (nothing to rank)")
    if chosen == rejected:
        raise ValueError("'chosen' and 'rejected' are the same reply (nothing to rank)")
    task_id = obj.get("id") or content_id("t-", encode_prompt(prompt), chosen, rejected)
    if not isinstance(task_id, str):
        raise ValueError("'id' must be a string")
    return Task(task_id, prompt, (Completion(f"{task_id}-0", chosen), Completion(f"{task_id}-1", rejected)))
