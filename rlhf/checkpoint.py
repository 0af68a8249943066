"""Resumable checkpoints, one format for every trainer: `ROOT/step-N/` holds

- `state.pt`: the trainable tensors by name, the optimizer's and scheduler's state, the RNG states;
- `trainer_state.json`: the step, the run's config and whatever else the trainer needs to resume.

Both are written into a temporary folder that is then renamed, so a kill leaves either the whole
checkpoint or none of it (a folder without `trainer_state.json` is never read). The newest `keep` are kept.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from rlhf.errors import UserError

STATE, META = "state.pt", "trainer_state.json"


def checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """The complete checkpoints under `root`, (step, folder), oldest first."""
    root, found = Path(root), []
    if root.is_dir():
        for path in root.glob("step-*"):
            if path.name[5:].isdigit() and (path / META).is_file() and (path / STATE).is_file():
                found.append((int(path.name[5:]), path))
    return sorted(found)


def latest_checkpoint(root: str | Path) -> Path | None:
    found = checkpoints(root)
    return found[-1][1] if found else None


def read_meta(path: str | Path) -> dict[str, Any]:
    """A checkpoint's `trainer_state.json`: {"step", "config", ...the trainer's extras}, without loading tensors."""
    return json.loads((Path(path) / META).read_text(encoding="utf-8"))


def save_checkpoint(root: str | Path, step: int, trainable: Mapping[str, torch.Tensor], optimizer, scheduler=None,
                    config: Mapping[str, Any] | None = None, keep: int = 1, **extra: Any) -> Path:
    """Write `ROOT/step-{step}` atomically and delete all but the newest `keep` checkpoints; returns the folder.
    `extra` values must be JSON-serialisable (they are read back by `read_meta`)."""
    root = Path(root)
    final, tmp, old = root / f"step-{step}", root / f".step-{step}.tmp", root / f".step-{step}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = {"trainable": {name: t.detach().cpu().clone() for name, t in trainable.items()},
             "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict() if scheduler else None,
             "rng": torch.get_rng_state(),
             "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
    with (tmp / STATE).open("wb") as handle:
        torch.save(state, handle)
        handle.flush()
        os.fsync(handle.fileno())
    meta = {"step": step, "config": dict(config or {}), **extra}
    (tmp / META).write_text(json.dumps(meta, indent=2, default=str) + "\n", encoding="utf-8")
    if final.exists():  # the same step saved again (the end of a run): swap, never delete first
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    for _, stale in checkpoints(root)[:-keep]:
        shutil.rmtree(stale, ignore_errors=True)
    return final


def load_checkpoint(path: str | Path, trainable: Mapping[str, torch.Tensor], optimizer,
                    scheduler=None) -> dict[str, Any]:
    """Copy the checkpoint's tensors into `trainable` (by name), restore the optimizer, scheduler and RNG
    states; returns its `trainer_state.json`."""
    path = Path(path)
    state = torch.load(path / STATE, map_location="cpu", weights_only=True)
    missing = set(trainable) - set(state["trainable"])
    if missing:
        raise UserError(f"{path}: checkpoint does not match this model/configuration ({len(missing)} trainable "
                        f"tensors missing, e.g. {sorted(missing)[0]})")
    with torch.no_grad():
        for name, tensor in trainable.items():
            tensor.copy_(state["trainable"][name])
    optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    if state["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return read_meta(path)


def check_resumable(path: Path, expected: Mapping[str, Any]) -> None:
    """UserError unless the checkpoint at `path` was made with the same values of `expected`'s keys (its
    config, or an extra such as "num_train_rankings" saved beside it): the data order and the optimizer
    depend on them, so a run resumed under other settings would not be the same run."""
    state = read_meta(path)
    saved = {**{k: v for k, v in state.items() if k != "config"}, **state.get("config", {})}
    for key, value in expected.items():
        if saved.get(key) != value:
            raise UserError(f"cannot resume from {path}: it was made with {key}={saved.get(key)!r}, "
                            f"this run has {key}={value!r}")
