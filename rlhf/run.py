"""What every trainer runs in (`rlhf train-rm`, `rlhf ppo`, `rlhf dpo`), so that their files hold their
config and their loop: the output folder and its checkpoints, the resume rule, the saved config, the
accelerator with its tracker, the run logs, epoch batching in a seeded order, the learning-rate schedule
and the progress bar.

    run = open_run(config.out, config.resume, resume_settings(config, RESUME_KEYS, num_train_rankings=n))
    accelerator = run_accelerator(config.report_to, run.out)
    start_step = run.restore(trainable, optimizer, scheduler)["step"]   # 0 for a fresh run
    train_log = run.log("train_log.csv", start_step, tracker=accelerator)
    batches = EpochBatches(n, per_step, config.seed)
    for step in range(start_step, config.epochs * batches.steps_per_epoch):
        epoch, step_in_epoch, ids = batches.at(step)
        ...
        run.save_checkpoint(step + 1, trainable, optimizer, scheduler, asdict(config))

The output folder: OUT/checkpoints/step-N/ (`rlhf.checkpoint`; a run whose checkpoints are in OUT/checkpoint/
resumes from there), OUT/config.json (PPO, DPO; the reward model keeps its config in reward_model.json, the
file its loaders read), OUT/train_log.csv and the trainer's own files.

The resume rule, the same for every trainer: without --resume, a folder that holds checkpoints is refused
(an unfinished run is never overwritten); with --resume, a folder without one is refused too (nothing to
continue: run without --resume); and a checkpoint made with other settings is refused, naming the first
setting that differs, since the data order and the optimizer's state depend on them.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rlhf import checkpoint
from rlhf.errors import UserError
from rlhf.runlog import RunLog, end_tracking, tracker_options
from rlhf.seeds import EPOCH_ORDER, PROMPT_ORDER, seeded_generator

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
OLD_CHECKPOINTS = "checkpoint"
"""The other name a run's checkpoint folder may have (PPO's and DPO's runs may use it); read when resuming."""
CONFIG = "config.json"


# ---- the output folder and the resume rule ----

def has_checkpoint(out: str | Path) -> bool:
    """Whether OUT holds a checkpoint to resume (under either folder name)."""
    return any(checkpoint.latest_checkpoint(Path(out) / name) for name in (CHECKPOINTS, OLD_CHECKPOINTS))


def resume_settings(config: Any, keys: Iterable[str], **extra: Any) -> dict[str, Any]:
    """The values a resumed run must share with its checkpoint: the config's `keys` and the `extra` facts
    saved beside it (e.g. num_train_rankings)."""
    return {**extra, **{key: getattr(config, key) for key in keys}}


@dataclass
class Run:
    """A trainer's output folder, and the checkpoint it resumes from (None: a fresh run)."""

    out: Path
    resume_from: Path | None = None

    @property
    def checkpoints(self) -> Path:
        return self.out / CHECKPOINTS

    def restore(self, trainable: Mapping[str, Any], optimizer, scheduler=None) -> dict[str, Any]:
        """Load the resume checkpoint into the trainable tensors, the optimizer and the scheduler (and the RNG
        states); returns its saved state, {"step": 0} for a fresh run."""
        if self.resume_from is None:
            return {"step": 0}
        state = checkpoint.load_checkpoint(self.resume_from, trainable, optimizer, scheduler)
        log.warning("resuming %s from step %d", self.out, state["step"])
        return state

    def log(self, name: str, start_step: int, tracker=None, tracker_prefix: str = "") -> RunLog:
        """OUT/name as a RunLog: a resumed run keeps its rows up to the checkpoint's step, a fresh one starts it
        afresh."""
        return RunLog(self.out / name, resume_step=start_step if self.resume_from else None, tracker=tracker,
                      tracker_prefix=tracker_prefix)

    def save_checkpoint(self, step: int, trainable: Mapping[str, Any], optimizer, scheduler=None,
                        config: Mapping[str, Any] | None = None, keep: int = 1, **extra: Any) -> Path:
        """OUT/checkpoints/step-N (`rlhf.checkpoint.save_checkpoint`)."""
        return checkpoint.save_checkpoint(self.checkpoints, step, trainable, optimizer, scheduler, config, keep=keep,
                                          **extra)

    def save_config(self, config: Any) -> Path:
        """OUT/config.json: the run's settings as it ran them (a dataclass)."""
        path = self.out / CONFIG
        path.write_text(json.dumps(asdict(config), indent=2) + "\n", encoding="utf-8")
        return path

    def drop_checkpoints(self) -> None:
        """Remove the checkpoints of a finished run whose result is the model itself."""
        shutil.rmtree(self.checkpoints, ignore_errors=True)


def open_run(out: str | Path, resume: bool, expected: Mapping[str, Any]) -> Run:
    """The run in OUT under the resume rule (module docstring); `expected`: `resume_settings`. Creates nothing."""
    out = Path(out)
    found = checkpoint.latest_checkpoint(out / CHECKPOINTS) or checkpoint.latest_checkpoint(out / OLD_CHECKPOINTS)
    if not resume:
        if found:
            raise UserError(f"{out} already holds checkpoints of an unfinished run: pass --resume to continue it, "
                            f"or choose another --out")
        return Run(out)
    if found is None:
        raise UserError(f"--resume: no checkpoint in {out / CHECKPOINTS}; run without --resume to start afresh")
    checkpoint.check_resumable(found, expected)
    return Run(out, found)  # an old run's checkpoint is read where it is; the run saves its next ones in CHECKPOINTS


# ---- the accelerator and its tracker ----

def run_accelerator(report_to: str = "none", out: str | Path = ".", **options: Any):
    """The run's `Accelerator`, with the tracker `--report-to` names. `cpu=True` when there is no GPU: accelerate
    then runs several launched processes as MULTI_CPU (gloo)."""
    import torch
    from accelerate import Accelerator

    return Accelerator(cpu=not torch.cuda.is_available(), **tracker_options(report_to, out), **options)


def finish(accelerator, summary: dict[str, Any] | None) -> dict[str, Any]:
    """End the tracker's run and give every process the main process's summary (the others wait for it here,
    while it writes the outputs)."""
    from accelerate.utils import broadcast_object_list

    end_tracking(accelerator)
    return broadcast_object_list([summary])[0]


# ---- epochs and the learning rate ----

def steps_per_epoch(num_examples: int, per_step: int) -> int:
    return math.ceil(num_examples / per_step)


def epoch_order(num_examples: int, seed: int, epoch: int) -> list[int]:
    """The shuffled order of one epoch, a pure function of (seed, epoch): a resumed run replays it."""
    import torch

    return torch.randperm(num_examples, generator=seeded_generator(seed, epoch, EPOCH_ORDER)).tolist()


class EpochBatches:
    """Which examples each step takes: `per_step` at a time through each epoch's shuffled order
    (`epoch_order`), the last step of an epoch taking what is left."""

    def __init__(self, num_examples: int, per_step: int, seed: int):
        self.num_examples, self.per_step, self.seed = num_examples, per_step, seed
        self.steps_per_epoch = steps_per_epoch(num_examples, per_step)
        self._order: tuple[int, list[int]] | None = None  # (epoch, its order), computed once per epoch

    def at(self, step: int) -> tuple[int, int, list[int]]:
        """(epoch, step within it, the step's example ids) of step `step` (from 0)."""
        epoch, step_in_epoch = divmod(step, self.steps_per_epoch)
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, epoch_order(self.num_examples, self.seed, epoch))
        return epoch, step_in_epoch, self._order[1][step_in_epoch * self.per_step:(step_in_epoch + 1) * self.per_step]


class PromptSampler:
    """Which prompts each step uses when steps run on past the end of the data (PPO): a fresh seeded permutation
    per pass over the prompts, the passes following each other without a break, so the order is a pure
    function of (seed, step) and a resumed run sees the same prompts."""

    def __init__(self, prompts: list[str], seed: int):
        self.prompts, self.seed = prompts, seed

    def batch(self, step: int, size: int, rank: int = 0, world: int = 1) -> list[str]:
        """Process `rank`'s `size` prompts of the step; the step takes `size * world` prompts in all, so
        processes share the prompts out instead of repeating them."""
        import torch

        n, total = len(self.prompts), size * world
        out = []
        for pos in range(step * total + rank * size, step * total + (rank + 1) * size):
            epoch, i = divmod(pos, n)
            perm = torch.randperm(n, generator=seeded_generator(self.seed, epoch, PROMPT_ORDER))
            out.append(self.prompts[int(perm[i])])
        return out


def lr_schedule(optimizer, total_steps: int, final_fraction: float):
    """Cosine decay from each group's peak learning rate to `final_fraction` of it over the run, no
    warm-up (InstructGPT appendix C.2: down to 10%)."""
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    return get_cosine_with_min_lr_schedule_with_warmup(optimizer, num_warmup_steps=0, num_training_steps=total_steps,
                                                       min_lr_rate=final_fraction)


def progress_bar(total: int, initial: int, desc: str, enabled: bool = True):
    """A tqdm bar of steps; off when not `enabled`, and when the output is not a terminal."""
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="step", disable=not enabled or None)
