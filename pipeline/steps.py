"""One resumable step of a multi-stage command (`rlhf demo`'s stages, each round's steps of `rlhf loop`): its
summary is written to a marker file when it succeeds, and a rerun with the marker present skips it."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from rlhf.errors import UserError


def finished_step(marker: Path) -> dict | None:
    """The summary a finished step left in `marker`, or None when it has not finished."""
    return json.loads(marker.read_text()) if marker.is_file() else None


def run_step(marker: Path, name: str, step: Callable[[], dict]) -> dict:
    """Run `step`, add its `seconds`, and write its summary to `marker`. A failure becomes one line naming the
    step (`name`, e.g. "stage 'policy'"); the traceback goes to the log with --verbose. Ctrl-C stays itself."""
    started = time.perf_counter()
    try:
        summary = step()
    except UserError as exc:
        raise UserError(f"{name} failed: {exc}") from None
    except KeyboardInterrupt:
        raise
    except Exception as exc:
        raise UserError(f"{name} failed: {type(exc).__name__}: {exc}") from exc
    summary = dict(summary, seconds=round(time.perf_counter() - started, 1))
    marker.write_text(json.dumps(summary, indent=2, default=str))
    return summary
