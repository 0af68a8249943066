"""Run logs: one CSV per log (`train_log.csv`, `eval.csv`), one row per step, kept with pandas and
rewritten atomically after each append (the files are small), and the plots drawn from them.

    log = RunLog(out / "train_log.csv", resume_step=None)   # a resumed run: resume_step=its checkpoint's step
    log.append({"step": 1, "loss": 0.69})
    plot(out / "curves.png", [Panel([(log.frame, "step", "loss", None, "-")], title="loss", smooth=5)])

A tracker (`--report-to tensorboard|wandb|trackio`, through accelerate's trackers) receives every row a RunLog
appends, with its numeric values under `tracker_prefix + column` at the row's step: the CSV stays the record,
the tracker a live view of the same numbers.

    accelerator = Accelerator(**tracker_options(config.report_to, out))
    start_tracking(accelerator, "rlhf-policy", asdict(config))
    log = RunLog(out / "train_log.csv", tracker=accelerator)
    ...
    end_tracking(accelerator)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from rlhf.errors import UserError
from rlhf.jsonl import atomic_write


def read_log(path: str | Path) -> pd.DataFrame:
    """The rows of a log file (an empty frame when there is none yet)."""
    path = Path(path)
    return pd.read_csv(path) if path.is_file() and path.stat().st_size else pd.DataFrame()


class RunLog:
    """A CSV log with a `step` column. `resume_step=None` starts it afresh; a resumed run keeps the rows up
    to its checkpoint's step, since the steps after it are redone (the log never holds a step twice)."""

    def __init__(self, path: str | Path, resume_step: int | None = None, tracker=None, tracker_prefix: str = ""):
        self.path = Path(path)
        self.tracker, self.tracker_prefix = tracker, tracker_prefix  # tracker: anything with .log(values, step=)
        self.rows: list[dict[str, Any]] = []
        if resume_step is not None:
            frame = read_log(self.path)
            if not frame.empty:
                self.rows = frame[frame["step"] <= resume_step].to_dict("records")

    @property
    def frame(self) -> pd.DataFrame:
        """The rows as a DataFrame, columns in the order they first appeared."""
        return pd.DataFrame(self.rows)

    def append(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        with atomic_write(self.path) as handle:
            self.frame.to_csv(handle, index=False, na_rep="nan")
        if self.tracker is not None:
            self.tracker.log({self.tracker_prefix + key: value for key, value in row.items()
                              if key != "step" and isinstance(value, (int, float))}, step=int(row["step"]))

    def rolling_mean(self, column: str, window: int) -> pd.Series:
        """Mean of each row's value and the `window - 1` before it (fewer at the start)."""
        return rolling_mean(self.frame[column], window)


def tracker_options(report_to: str, out: str | Path) -> dict[str, Any]:
    """`Accelerator` keyword arguments for `--report-to`: the tracker (none for "none") and where local trackers
    write (TensorBoard: OUT/tensorboard/<project>/). A tracker whose package is missing is an error here;
    accelerate itself would drop it without a word."""
    from accelerate.tracking import get_available_trackers
    from accelerate.utils import ProjectConfiguration

    if report_to == "none":
        return {}
    if report_to not in {str(tracker) for tracker in get_available_trackers()}:
        raise UserError(f"--report-to {report_to}: the {report_to} package is not installed (pip install {report_to})")
    return {"log_with": report_to,
            "project_config": ProjectConfiguration(project_dir=str(out), logging_dir=str(Path(out) / "tensorboard"))}


def start_tracking(accelerator, project: str, config: dict[str, Any]) -> None:
    """Open the tracker's run (main process only, as accelerate does), with the run's settings as its
    hyperparameters; nothing when no tracker was asked for."""
    if accelerator.log_with:
        accelerator.init_trackers(project, config=config)


def end_tracking(accelerator) -> None:
    """Close the tracker's run. Not `accelerator.end_training()`: that also tears down the process group,
    which a caller running its next stage in the same processes (as `rlhf demo` does) still needs."""
    for tracker in accelerator.trackers:
        tracker.finish()


def rolling_mean(values: pd.Series, window: int) -> pd.Series:
    return values.rolling(max(1, window), min_periods=1).mean()


Curve = tuple  # (frame, x column, y column, legend label or None, matplotlib format such as "-" or "o-")


@dataclass
class Panel:
    """One set of axes. A curve whose columns are missing is left out; rows where x or y is not a finite
    number are skipped."""

    curves: list[Curve]
    title: str = ""
    xlabel: str = "step"
    ylabel: str = ""
    smooth: int = 0
    """Above 1: draw each curve faintly and its rolling mean over this many rows on top."""
    annotate: str | None = None
    """Label each point of the curves with this column's value (e.g. "step")."""


def _points(frame: pd.DataFrame, x: str, y: str, annotate: str | None) -> pd.DataFrame:
    if x not in frame or y not in frame:
        return pd.DataFrame()
    columns = list(dict.fromkeys([x, y] + ([annotate] if annotate and annotate in frame else [])))
    points = frame[columns].apply(pd.to_numeric, errors="coerce")
    return points[points[x].notna() & points[y].notna()]


def plot(path: str | Path, panels: list[Panel], panel_size: tuple[float, float] = (4.8, 3.6), dpi: int = 100) -> Path:
    """Draw `panels` side by side into one PNG (matplotlib, Agg backend) and return its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, len(panels), figsize=(panel_size[0] * len(panels), panel_size[1]), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        labelled = False
        for frame, x, y, label, style in panel.curves:
            points = _points(frame, x, y, panel.annotate)
            if points.empty:
                continue
            labelled |= label is not None
            if panel.smooth > 1:
                ax.plot(points[x], points[y], style, lw=0.8, alpha=0.5)
                ax.plot(points[x], rolling_mean(points[y], panel.smooth), lw=1.5, label=label)
            else:
                ax.plot(points[x], points[y], style, label=label)
            if panel.annotate in points:
                for _, row in points.iterrows():
                    ax.annotate(f"{row[panel.annotate]:g}", (row[x], row[y]), fontsize=7)
        ax.set_title(panel.title, fontsize=10)
        ax.set_xlabel(panel.xlabel)
        ax.set_ylabel(panel.ylabel)
        ax.grid(alpha=0.3)
        if labelled:
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
