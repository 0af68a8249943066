"""Prompt files (JSONL with a "prompt" field, a string or a conversation of messages, or a "messages" field in its
place; optional "id") and the one rule that holds prompts out,
shared by export (the reward model's test set), PPO (its evaluation prompts) and the demo."""

from __future__ import annotations

import hashlib
from pathlib import Path

from rlhf.errors import UserError
from rlhf.jsonl import read_jsonl
from rlhf.records import Prompt, encode_prompt, prompt_field


def read_prompts(path: str | Path, limit: int | None = None) -> list[tuple[str | None, Prompt]]:
    """[(id or None, prompt)] in file order from a JSONL file, or from any table `rlhf.tables` reads (Parquet,
    CSV, a save_to_disk folder, a hub id: its "train" split) with a "prompt" (or "messages") column and an
    optional "id"; a prompt is a string or a conversation ending in a user turn (`rlhf.records.parse_prompt`).
    A missing/empty/malformed prompt or duplicate id names its line (row)."""
    source = Path(path).expanduser()
    if source.suffix.lower() == ".jsonl" and not source.is_dir():
        rows = read_jsonl(source)
    else:
        rows = ((n + 1, row) for n, row in enumerate(_table_rows(source if source.exists() else str(path))))
    prompts: list[tuple[str | None, Prompt]] = []
    seen: set[str] = set()
    for line_no, obj in rows:
        try:
            prompt = prompt_field({k: v for k, v in obj.items() if v is not None})
        except ValueError as exc:
            raise UserError(f"{path}:{line_no}: {exc}") from None
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


def _table_rows(source: Path | str) -> list[dict]:
    from rlhf.tables import is_saved_dataset, load_hub, load_saved, looks_like_path, read_table_file

    if isinstance(source, Path) and source.is_file():
        table = read_table_file(source)
    elif isinstance(source, Path) and is_saved_dataset(source):
        table = load_saved(source).get("train")
    elif isinstance(source, Path) or looks_like_path(source):
        raise UserError(f"{source}: no such file")
    else:
        table = load_hub(source).get("train")
    if table is None:
        return []
    if "prompt" not in table.column_names and "messages" not in table.column_names:
        raise UserError(f"{source}: no 'prompt' column (its columns: {', '.join(table.column_names)})")
    return table.to_list()


def split_by_prompt(prompts: set[Prompt] | list[Prompt], test_fraction: float, seed: int) -> set[Prompt]:
    """The prompts that form the test set: the first round(test_fraction * n) in (seed, prompt)-hash order
    (at least one when test_fraction > 0 and there are two or more prompts; never all of them). A conversation
    hashes as its stored text (`rlhf.records.encode_prompt`), a string prompt as itself."""
    def key(prompt: Prompt) -> str:
        return hashlib.sha256(f"{seed}\x00{encode_prompt(prompt)}".encode()).hexdigest()

    unique = sorted(set(prompts), key=key)
    n_test = round(test_fraction * len(unique))
    if test_fraction > 0 and len(unique) >= 2:
        n_test = min(max(n_test, 1), len(unique) - 1)
    return set(unique[:n_test])
