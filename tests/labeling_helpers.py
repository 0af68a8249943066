"""Hand-made labeling tasks for the labeling tests (no model needed)."""

from __future__ import annotations

import json
import random
from pathlib import Path

from rlhf.records import Task

_WORDS = ("big bold bright cats chase cheerful dogs daily every evening fast fun green gardens happy hills "
          "quiet rivers run slowly silver stars shine tall trees <b>bold</b> ünïcode 'quotes' \"double\"").split()


def make_tasks(n: int, k: int = 4, seed: int = 0, prefix: str = "task") -> list[Task]:
    """n tasks with distinct prompts and k varied completions each (ids '{prefix}-{i}', '{prefix}-{i}-{j}')."""
    rng = random.Random(seed)
    tasks = []
    for i in range(n):
        completions = [{"id": f"{prefix}-{i}-{j}",
                        "text": f"{j}: " + " ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 12)))}
                       for j in range(k)]
        tasks.append(Task.from_dict({"id": f"{prefix}-{i}", "prompt": f"Prompt {i}: describe thing {i}.",
                                     "completions": completions}))
    return tasks


def write_tasks(path: Path, tasks: list[Task]) -> Path:
    path.write_text("".join(json.dumps(t.to_dict()) + "\n" for t in tasks), encoding="utf-8")
    return path


def order_ranks(task: Task, order: list[int]) -> dict[str, int]:
    """Ranks that put task.completions[order[0]] first, order[1] second, ... (positions in stored order)."""
    return {task.completions[i].id: rank for rank, i in enumerate(order, start=1)}


def raw_connection(url: str):
    """A plain driver connection to a label store's database (autocommit), to do what the store never would."""
    if url.startswith("postgresql://"):
        import psycopg

        return psycopg.connect(url, autocommit=True)
    import sqlite3

    return sqlite3.connect(url, isolation_level=None)
