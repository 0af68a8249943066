"""Reading prompt files (JSONL with a "prompt" field, optional "id"), shared by generate, PPO and the demo."""

from __future__ import annotations

from pathlib import Path

from rlhf.errors import UserError
from rlhf.jsonl import read_jsonl


def read_prompts(path: str | Path, limit: int | None = None) -> list[tuple[str | None, str]]:
    """[(id or None, prompt)] in file order; a missing/empty prompt or duplicate id names its line."""
    prompts: list[tuple[str | None, str]] = []
    seen: set[str] = set()
    for line_no, obj in read_jsonl(path):
        prompt = obj.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise UserError(f"{path}:{line_no}: 'prompt' must be a non-empty string")
        pid = obj.get("id")
        if pid is not None:
            pid = str(pid)
            if pid in seen:
                raise UserError(f"{path}:{line_no}: duplicate id {pid!r}")
            seen.add(pid)
        prompts.append((pid, prompt))
        if limit is not None and len(prompts) >= limit:
            break
    if not prompts:
        raise UserError(f"{path}: no prompts in the file")
    return prompts
