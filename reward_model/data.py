"""Preference data for the reward model: rankings (K completions, ranked) or plain pairs, read from
JSONL, checked, tokenized once, and batched as whole rankings.

A ranking stays one unit all the way to the loss: its K completions are scored once and all its
pairs are formed from those K scores (InstructGPT sec. 3.5). A pair from a pairs-only file
(TRL's prompt/chosen/rejected format) is simply a ranking of 2.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch

from reward_model.loss import PairIndex, build_pair_index, ranking_pairs
from reward_model.model import EncodedSample, encode_sample_ids, pad_samples
from rlhf.errors import UserError
from rlhf.jsonl import read_jsonl
from rlhf.records import Pair, RankedTask

log = logging.getLogger(__name__)


@dataclass
class RankingExample:
    """One ranking (or one pair, as a ranking of 2) ready for the loss."""

    prompt: str
    texts: tuple[str, ...]
    ranks: tuple[int, ...]
    pairs: list[tuple[int, int, int]]   # (better, worse, rank gap), indices into texts
    task_id: str = ""
    annotator: str = ""
    rows: list[EncodedSample] = field(default_factory=list)  # one per completion, once tokenized


@dataclass
class DataStats:
    """What loading dropped or changed, reported in the training summary."""

    rankings: int = 0
    pairs: int = 0
    completions: int = 0
    identical_pairs_skipped: int = 0
    rankings_without_pairs: int = 0
    empty_completions: int = 0
    truncated_samples: int = 0

    def warn(self, source: str) -> None:
        if self.identical_pairs_skipped:
            log.warning("%s: skipped %d pair(s) whose chosen and rejected texts are identical",
                        source, self.identical_pairs_skipped)
        if self.rankings_without_pairs:
            log.warning("%s: skipped %d ranking(s) left without any pair", source, self.rankings_without_pairs)
        if self.empty_completions:
            log.warning("%s: %d empty completion(s) kept (an empty answer is ranked like any other)",
                        source, self.empty_completions)


def parse_record(obj: Mapping[str, Any]) -> RankedTask | Pair:
    """A rankings.jsonl row (has 'completions') or a pairs row (has 'chosen'/'rejected')."""
    if "completions" in obj:
        return RankedTask.from_dict(obj)
    if "chosen" in obj or "rejected" in obj:
        return Pair.from_dict(obj)
    raise ValueError("expected a ranking ({prompt, completions: [{text, rank}]}) "
                     "or a pair ({prompt, chosen, rejected})")


def read_records(path: str | Path) -> list[tuple[dict[str, Any], RankedTask | Pair]]:
    """Every row of a rankings or pairs JSONL file as (raw object, record); bad rows name their line."""
    records = []
    for line_no, obj in read_jsonl(path):
        try:
            records.append((obj, parse_record(obj)))
        except ValueError as exc:
            raise UserError(f"{path}:{line_no}: {exc}") from None
    if not records:
        raise UserError(f"{path}: no rankings or pairs in the file")
    return records


def to_example(record: RankedTask | Pair) -> RankingExample:
    if isinstance(record, Pair):
        ranks = (record.rank_chosen or 1, record.rank_rejected or 2)
        if ranks[0] >= ranks[1]:
            ranks = (1, 2)
        return RankingExample(record.prompt, (record.chosen, record.rejected), ranks,
                              [(0, 1, ranks[1] - ranks[0])], record.task_id, record.annotator)
    return RankingExample(record.prompt, tuple(c.text for c in record.completions), record.ranks,
                          ranking_pairs(record.ranks), record.task_id, record.annotator)


def build_examples(records: Iterable[RankedTask | Pair], stats: DataStats) -> list[RankingExample]:
    """Examples with identical chosen/rejected pairs removed (counted), rankings left empty dropped."""
    examples = []
    for record in records:
        example = to_example(record)
        kept = [(b, w, g) for b, w, g in example.pairs if example.texts[b] != example.texts[w]]
        stats.identical_pairs_skipped += len(example.pairs) - len(kept)
        if not kept:
            stats.rankings_without_pairs += 1
            continue
        example.pairs = kept
        stats.rankings += 1
        stats.pairs += len(kept)
        stats.completions += len(example.texts)
        stats.empty_completions += sum(1 for t in example.texts if not t.strip())
        examples.append(example)
    return examples


@dataclass
class DataFiles:
    """Where the training and held-out records come from."""

    train: list[RankedTask | Pair]
    test: list[RankedTask | Pair]
    train_source: str
    test_source: str | None


def _split_field(records, path) -> tuple[list, list]:
    """Rows may carry "split": "train" | "test" (rows without it train)."""
    train, test = [], []
    for obj, record in records:
        split = obj.get("split", "train")
        if split not in ("train", "test"):
            raise UserError(f"{path}: unknown split {split!r} (expected 'train' or 'test')")
        (test if split == "test" else train).append(record)
    return train, test


def find_data(data: str | Path) -> DataFiles:
    """The training (and held-out) records under `data`.

    `data` is a folder or one JSONL file. In a folder (as `rlhf export` writes it, see
    labeling/export.py): `rankings.jsonl`, whose rows marked "split": "test" are held out; else
    `train.jsonl` (+ `test.jsonl`), pairs in TRL's prompt/chosen/rejected format from any source.
    """
    path = Path(data)
    if not path.exists():
        raise UserError(f"data {path} does not exist (expected a folder with rankings.jsonl or train.jsonl)")
    if path.is_file():
        train, test = _split_field(read_records(path), path)
        return DataFiles(train, test, str(path), str(path) if test else None)
    candidates = [("rankings.jsonl", None), ("train.jsonl", "test.jsonl")]
    for train_name, test_name in candidates:
        train_path = path / train_name
        if not train_path.is_file():
            continue
        train, test = _split_field(read_records(train_path), train_path)
        test_source = str(train_path) if test else None
        if test_name and (path / test_name).is_file():
            test += [record for _, record in read_records(path / test_name)]
            test_source = str(path / test_name)
        return DataFiles(train, test, str(train_path), test_source)
    raise UserError(f"{path} has no rankings.jsonl or train.jsonl; "
                    f"export labels with `rlhf export` first")


def tokenize_examples(examples: Sequence[RankingExample], tokenizer, max_length: int, stats: DataStats) -> None:
    """Fill each example's token rows once (prompt truncated from the left past max_length)."""
    cache: dict[tuple[str, str], EncodedSample] = {}
    for ex in examples:
        ex.rows = []
        for text in ex.texts:
            key = (ex.prompt, text)
            if key not in cache:
                cache[key] = encode_sample_ids(tokenizer, ex.prompt, text, max_length)
                stats.truncated_samples += cache[key].truncated
            ex.rows.append(cache[key])
    if stats.truncated_samples:
        log.warning("%d sample(s) over --max-length %d: prompts truncated from the left, completions kept",
                    stats.truncated_samples, max_length)


def epoch_order(num_examples: int, seed: int, epoch: int) -> list[int]:
    """The shuffled order of one epoch, a pure function of (seed, epoch): a resumed run replays it."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(num_examples, generator=generator).tolist()


def steps_per_epoch(num_examples: int, rankings_per_step: int) -> int:
    return math.ceil(num_examples / rankings_per_step)


def collate(examples: Sequence[RankingExample], pad_id: int, weighting: str = "pair"):
    """All completions of the batch's rankings in ONE padded batch (input_ids, attention_mask,
    completion_mask), and where their pairs are."""
    rows = [row for ex in examples for row in ex.rows]
    tensors = pad_samples(rows, pad_id, "left")
    index = build_pair_index([ex.pairs for ex in examples], [len(ex.rows) for ex in examples], weighting)
    return tensors, index
