"""Preference data for the reward model (and DPO): rankings (K completions, ranked) or plain pairs,
loaded with `datasets`, checked row by row, tokenized with `Dataset.map` (cached), batched as whole rankings.

A ranking stays one unit all the way to the loss: its K completions are scored once and all its
pairs are formed from those K scores (InstructGPT sec. 3.5). A pair is simply a ranking of 2.

Where data comes from (`find_data`, `read_records`):
- the folder `rlhf export` writes (labeling/export.py): `rankings.jsonl`, else `train.jsonl` (+ `test.jsonl`);
- a folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk` (the export's `rankings_dataset/`
  and `pairs_dataset/` are two);
- one JSON Lines (.jsonl, or gzip-compressed .jsonl.gz) / JSON / Parquet / CSV file;
- a Hugging Face hub dataset id (`datasets.load_dataset(id)`).

Rows are rankings, `{prompt, completions: [{text, rank, id?}], task_id?, annotator?}` (the prompt a string or a
conversation of `{"role", "content"}` messages ending in a user turn; `messages` in its place), or pairs in TRL's
preference format: `{prompt, chosen, rejected}` as texts, or its conversational form with message lists, where
the prompt is every message before the last assistant turn, either in a `prompt` column or shared by `chosen`
and `rejected` (`rlhf.records.Pair.from_dict`), or HH-RLHF's transcripts (`{chosen, rejected}` texts
"\\n\\nHuman: ...\\n\\nAssistant: ...", the shared turns the prompt). The chat template is applied by
`rlhf.models.format_prompt`.

A row may name its `subset` (a category of the evaluation set, as in RewardBench): `rlhf eval-rm` reports the
accuracy per subset.

Splits: a file is split "train"; a `DatasetDict` has its own; a row may carry "split": "train" | "test",
which places it in that split (the export marks its held-out rankings so). Training reads one split
(`--data-split`, default "train") and holds out the split "test".
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reward_model.loss import build_pair_index, ranking_pairs
from reward_model.model import EncodedSample, encode_sample_ids, pad_samples
from rlhf.errors import UserError
from rlhf.records import Pair, RankedCompletion, RankedTask, decode_prompt, encode_prompt, is_transcript
from rlhf.tables import (
    EXPORT_FORMAT,
    EXPORT_META,
    NotOnHub,
    is_jsonl,
    is_saved_dataset,
    load_hub,
    load_saved,
    looks_like_path,
    quiet_datasets,
    read_table_file,
)

log = logging.getLogger(__name__)

ROW_SPLITS = ("train", "test")
HELD_OUT_SPLIT = "test"
_EXPECTED = "rankings need the columns prompt, completions; pairs need prompt, chosen, rejected"


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
    origin: tuple[Any, int] | None = None  # (normalized dataset, row) it was read from: tokenized there


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
    """Samples over --max-length: their prompt shortened, or their completion cut (`cut_completions`)."""
    cut_completions: int = 0
    """Completions alone over --max-length, of which only the last tokens are read."""

    def warn(self, source: str) -> None:
        if self.identical_pairs_skipped:
            log.warning("%s: skipped %d pair(s) whose chosen and rejected texts are identical",
                        source, self.identical_pairs_skipped)
        if self.rankings_without_pairs:
            log.warning("%s: skipped %d ranking(s) left without any pair", source, self.rankings_without_pairs)
        if self.empty_completions:
            log.warning("%s: %d empty completion(s) kept (an empty answer is ranked like any other)",
                        source, self.empty_completions)


# ---- one row -> one record ----

def parse_record(obj: Mapping[str, Any]) -> RankedTask | Pair:
    """A rankings row (has 'completions') or a pairs row (has 'chosen'/'rejected', texts or message lists).
    Missing values (None, as a table gives them for a row without the field) count as absent."""
    obj = _without_nulls(obj)
    if "completions" in obj:
        return RankedTask.from_dict(obj)
    if "chosen" in obj or "rejected" in obj:
        return Pair.from_dict(obj)
    raise ValueError("expected a ranking ({prompt, completions: [{text, rank}]}) "
                     "or a pair ({prompt, chosen, rejected})")


def _without_nulls(obj: Mapping[str, Any]) -> dict[str, Any]:
    found = {key: value for key, value in obj.items() if value is not None}
    if isinstance(found.get("completions"), list):
        found["completions"] = [{k: v for k, v in c.items() if v is not None} if isinstance(c, Mapping) else c
                                for c in found["completions"]]
    return found


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
    origins = getattr(records, "origins", None)
    examples = []
    for i, record in enumerate(records):
        example = to_example(record)
        kept = [(b, w, g) for b, w, g in example.pairs if example.texts[b] != example.texts[w]]
        stats.identical_pairs_skipped += len(example.pairs) - len(kept)
        if not kept:
            stats.rankings_without_pairs += 1
            continue
        example.pairs = kept
        example.origin = origins[i] if origins is not None else None
        stats.rankings += 1
        stats.pairs += len(kept)
        stats.completions += len(example.texts)
        stats.empty_completions += sum(1 for t in example.texts if not t.strip())
        examples.append(example)
    return examples


# ---- tables -> checked rows ----

def _features():
    """The columns every source is brought to: one row per ranking (a pair is a ranking of 2)."""
    from datasets import Features, List, Value

    return Features({"prompt": Value("string"), "texts": List(Value("string")), "ranks": List(Value("int64")),
                     "completion_ids": List(Value("string")), "task_id": Value("string"),
                     "annotator": Value("string"), "split": Value("string"), "is_pair": Value("bool"),
                     "subset": Value("string")})


def _row_place(origin: str, jsonl: str | None, index: int) -> str:
    """'FILE:LINE' for a JSON Lines file (blank lines are not rows), else 'SOURCE: row N'."""
    if jsonl is not None:
        import gzip

        with gzip.open(jsonl, "rb") if jsonl.lower().endswith(".gz") else open(jsonl, "rb") as handle:
            rows = (line_no for line_no, line in enumerate(handle, start=1) if line.strip())
            line_no = next((n for i, n in enumerate(rows) if i == index), None)
        if line_no is not None:
            return f"{jsonl}:{line_no}"
    return f"{origin}: row {index + 1}"


def _normalize_rows(batch: dict[str, list], indices: list[int], origin: str, jsonl: str | None,
                    code_version: str) -> dict[str, list]:
    """`Dataset.map` function: each row checked (`parse_record`) and brought to `_features()`
    (`code_version` is only part of the cache key, see `_code_version`)."""
    out: dict[str, list] = {name: [] for name in ("prompt", "texts", "ranks", "completion_ids", "task_id",
                                                  "annotator", "split", "is_pair", "subset")}
    for j, index in enumerate(indices):
        row = {column: values[j] for column, values in batch.items()}
        try:
            record = parse_record(row)
            split = row.get("split")
            if split is not None and split not in ROW_SPLITS:
                raise ValueError(f"unknown split {split!r} (expected 'train' or 'test')")
            subset = row.get("subset")
            if subset is not None and (not isinstance(subset, str) or not subset.strip()):
                raise ValueError("'subset' must be a non-empty string")
        except ValueError as exc:
            raise UserError(f"{_row_place(origin, jsonl, index)}: {exc}") from None
        if isinstance(record, Pair):
            texts, ranks, ids = [record.chosen, record.rejected], [record.rank_chosen, record.rank_rejected], []
        else:
            texts = [c.text for c in record.completions]
            ranks, ids = [c.rank for c in record.completions], [c.id for c in record.completions]
        for name, value in (("prompt", encode_prompt(record.prompt)), ("texts", texts), ("ranks", ranks),
                            ("completion_ids", ids),
                            ("task_id", record.task_id), ("annotator", record.annotator), ("split", split),
                            ("is_pair", isinstance(record, Pair)), ("subset", subset)):
            out[name].append(value)
    return out


def _record(row: Mapping[str, Any]) -> RankedTask | Pair:
    """The record of a normalized row (checked when it was normalized)."""
    if row["is_pair"]:
        return Pair(decode_prompt(row["prompt"]), row["texts"][0], row["texts"][1], row["task_id"], row["annotator"],
                    row["ranks"][0], row["ranks"][1])
    completions = tuple(RankedCompletion(cid, text, rank)
                        for cid, text, rank in zip(row["completion_ids"], row["texts"], row["ranks"]))
    return RankedTask(row["task_id"], row["annotator"], decode_prompt(row["prompt"]), completions)


@functools.cache
def _code_version() -> str:
    """A hash of the code that checks and encodes rows. `datasets` keys a map's cache on the function's
    name, not its code, so without this an upgraded toolkit would read rows cached by the old one."""
    import hashlib

    import reward_model.model
    import rlhf.models
    import rlhf.records

    digest = hashlib.sha256()
    for module in (sys.modules[__name__], rlhf.records, reward_model.model, rlhf.models):
        digest.update(Path(module.__file__).read_bytes())
    return digest.hexdigest()[:16]


class _Part:
    """One table of a source: a file or one split of a saved or hub dataset, normalized on first use."""

    def __init__(self, split: str, raw, origin: str, jsonl: str | None = None):
        self.split, self.raw, self.origin, self.jsonl = split, raw, origin, jsonl
        self._rows = None
        self._list: list[dict[str, Any]] | None = None

    @property
    def row_splits(self) -> bool:
        """Whether rows may name their own split (a "split" column)."""
        return self.raw is not None and "split" in self.raw.column_names

    @property
    def rows(self):
        """The rows as `_features()` (a `Dataset`, cached beside the source's cache files)."""
        if self._rows is None:
            from datasets import Dataset

            if self.raw is None or self.raw.num_rows == 0:
                self._rows = Dataset.from_dict({name: [] for name in _features()}, features=_features())
            else:
                self._check_columns()
                with quiet_datasets():
                    self._rows = self.raw.map(_normalize_rows, batched=True, with_indices=True,
                                              remove_columns=self.raw.column_names, features=_features(),
                                              fn_kwargs={"origin": self.origin, "jsonl": self.jsonl,
                                                         "code_version": _code_version()})
        return self._rows

    def _check_columns(self) -> None:
        columns = self.raw.column_names
        if "completions" in columns:
            needed = ["messages" if "messages" in columns else "prompt", "completions"]
        elif "chosen" in columns or "rejected" in columns:
            # TRL's implicit prompt (dialogues) and HH-RLHF's transcripts need no prompt column
            first = self.raw[0].get("chosen") if "chosen" in columns else None
            prompt_free = isinstance(first, list) or is_transcript(first)
            needed = ["chosen", "rejected"] if prompt_free else ["prompt", "chosen", "rejected"]
        else:
            raise UserError(f"{self.origin}: neither rankings nor pairs ({_EXPECTED}); its columns: "
                            f"{', '.join(columns)}")
        missing = [c for c in needed if c not in columns]
        if missing:
            raise UserError(f"{self.origin}: missing column{'s' * (len(missing) > 1)} {', '.join(missing)} "
                            f"({_EXPECTED}); its columns: {', '.join(columns)}")

    def selected(self, split: str | None) -> list[tuple[int, dict[str, Any]]]:
        """(row, normalized row) of the rows in `split` (None: every row)."""
        if split is not None and split != self.split and not self.row_splits:
            return []
        if self._list is None:
            self._list = self.rows.to_list()
        return [(i, row) for i, row in enumerate(self._list)
                if split is None or (row["split"] or self.split) == split]


# ---- sources ----

def _saved_parts(path: Path) -> list[_Part]:
    saved = load_saved(path)
    if list(saved) == ["train"] and not (path / "dataset_dict.json").is_file():
        return [_Part("train", saved["train"], str(path))]
    return [_Part(split, table, f"{path} [{split}]") for split, table in saved.items()]


def _hub_parts(name: str) -> list[_Part]:
    return [_Part(split, table, f"{name} [{split}]") for split, table in load_hub(name).items()]


def check_export_folder(path: Path) -> None:
    """Refuse a folder written in another export format (an older one, without export.json, reads as it is)."""
    import json

    meta_path = path / EXPORT_META
    if not meta_path.is_file():
        return
    try:
        found = json.loads(meta_path.read_text(encoding="utf-8")).get("format")
    except (ValueError, AttributeError):
        raise UserError(f"{meta_path}: not a JSON object") from None
    if found != EXPORT_FORMAT:
        raise UserError(f"{path} was written by another version of `rlhf export` (format {found!r}); this "
                        f"version reads {EXPORT_FORMAT!r}: export the labels again, or upgrade")


def load_source(data: str | Path) -> list[_Part]:
    """The tables of a data source (see the module docstring), not yet read row by row."""
    path = Path(data).expanduser()
    if path.is_file():
        jsonl = str(path) if is_jsonl(path) else None  # JSONL errors name their line
        return [_Part("train", read_table_file(path), str(path), jsonl)]
    if path.is_dir():
        check_export_folder(path)
        if (path / "rankings.jsonl").is_file():
            return [_Part("train", read_table_file(path / "rankings.jsonl"), str(path / "rankings.jsonl"),
                          str(path / "rankings.jsonl"))]
        if (path / "train.jsonl").is_file():
            return [_Part(split, read_table_file(path / f"{split}.jsonl"), str(path / f"{split}.jsonl"),
                          str(path / f"{split}.jsonl"))
                    for split in ("train", "test") if (path / f"{split}.jsonl").is_file()]
        if is_saved_dataset(path):
            return _saved_parts(path)
        raise UserError(f"{path} has no rankings.jsonl or train.jsonl, nor a dataset saved with save_to_disk; "
                        f"export labels with `rlhf export` first")
    # The same first words whether the name can only be a path or could also be a hub id (a folder name typed
    # with or without its trailing slash): what follows says why neither was found.
    missing = f"data {data} does not exist"
    if looks_like_path(str(data)):
        raise UserError(f"{missing}: no such file or folder (expected a folder from `rlhf export`, a .jsonl, "
                        f".parquet or .csv file, a save_to_disk folder or a hub dataset id)")
    try:
        return _hub_parts(str(data))
    except NotOnHub as exc:
        raise UserError(f"{missing}: {exc}") from None


class Records(list):
    """Records (RankedTask or Pair) with the normalized row each came from, `origins[i]` = (dataset, row):
    examples built from them are tokenized by mapping over that dataset (cached)."""

    def __init__(self, records: Iterable[RankedTask | Pair] = (), origins: Iterable[tuple[Any, int]] = ()):
        super().__init__(records)
        self.origins = list(origins)


def _split_names(parts: Sequence[_Part]) -> list[str]:
    names = [part.split for part in parts]
    if any(part.row_splits for part in parts):
        names += ROW_SPLITS
    return list(dict.fromkeys(names))


def _records(parts: Sequence[_Part], split: str | None) -> tuple[Records, list[str]]:
    """The records of `split` (None: all) across the parts, in row order, and where they came from."""
    records, origins = Records(), []
    for part in parts:
        selected = part.selected(split)
        for i, row in selected:
            records.append(_record(row))
            records.origins.append((part.rows, i))
        if selected:
            origins.append(part.origin)
    return records, origins


@dataclass
class DataFiles:
    """Where the training and held-out records come from."""

    train: list[RankedTask | Pair]
    test: list[RankedTask | Pair]
    train_source: str
    test_source: str | None

    def warn_without_held_out(self) -> None:
        """One line when nothing is held out, so that a training run without a held-out evaluation says so."""
        if not self.test:
            log.warning("%s: no held-out rankings or pairs (no test split, no rows marked \"split\": \"test\"), so "
                        "there is no held-out evaluation; `rlhf export` holds out a share of the prompts",
                        self.train_source)


def find_data(data: str | Path, split: str = "train") -> DataFiles:
    """The records of `split` for training, and of the split "test" (rows marked so, or a split named so)
    held out. See the module docstring for the sources."""
    parts = load_source(data)
    names = _split_names(parts)
    if split not in names:
        raise UserError(f"{data} has no split {split!r} (its splits: {', '.join(names)})")
    train, train_origins = _records(parts, split)
    if not train:
        where = ", ".join(train_origins) or (parts[0].origin if len(parts) == 1 else str(data))
        raise UserError(f"{where}: no rankings or pairs in split {split!r}")
    test, test_origins = _records(parts, HELD_OUT_SPLIT) if split != HELD_OUT_SPLIT else (Records(), [])
    return DataFiles(train, test, ", ".join(train_origins), ", ".join(test_origins) or None)


def read_records(data: str | Path, split: str | None = None) -> list[tuple[dict[str, Any], RankedTask | Pair]]:
    """Every row of a source (or of one split) as (normalized row, record), for evaluation."""
    parts = load_source(data)
    if split is not None and split not in _split_names(parts):
        raise UserError(f"{data} has no split {split!r} (its splits: {', '.join(_split_names(parts))})")
    rows = [(row, _record(row)) for part in parts for _, row in part.selected(split)]
    if not rows:
        raise UserError(f"{data}: no rankings or pairs{f' in split {split!r}' if split else ''}")
    return rows


# ---- tokens ----

def _encode_rows(batch: dict[str, list], tokenizer, max_length: int, code_version: str) -> dict[str, list]:
    """`Dataset.map` function: every completion of each row as the reward model reads it (`code_version`
    is only part of the cache key)."""
    out: dict[str, list] = {"input_ids": [], "completion_lengths": [], "truncated": []}
    for prompt, texts in zip(batch["prompt"], batch["texts"]):
        samples = [encode_sample_ids(tokenizer, decode_prompt(prompt), text, max_length) for text in texts]
        out["input_ids"].append([s.ids for s in samples])
        out["completion_lengths"].append([s.completion_length for s in samples])
        out["truncated"].append([s.truncated for s in samples])
    return out


def tokenize_examples(examples: Sequence[RankingExample], tokenizer, max_length: int, stats: DataStats,
                      num_proc: int | None = None) -> None:
    """Fill each example's token rows (prompt truncated from the left past max_length), by mapping
    `_encode_rows` over the rows the examples came from: `datasets` caches the result beside the
    source's cache files, so a second run on the same data and tokenizer reads it back. Examples made
    in memory are tokenized through an in-memory dataset."""
    from datasets import Dataset

    groups: dict[int, tuple[Any, list[tuple[RankingExample, int]]]] = {}
    loose = [ex for ex in examples if ex.origin is None]
    if loose:
        table = Dataset.from_dict({"prompt": [encode_prompt(ex.prompt) for ex in loose],
                                   "texts": [list(ex.texts) for ex in loose]})
        groups[id(table)] = (table, [(ex, i) for i, ex in enumerate(loose)])
    for ex in examples:
        if ex.origin is not None:
            groups.setdefault(id(ex.origin[0]), (ex.origin[0], []))[1].append((ex, ex.origin[1]))
    for table, members in groups.values():
        encoded = table.select_columns(["prompt", "texts"]).map(
            _encode_rows, batched=True, remove_columns=["prompt", "texts"], num_proc=num_proc,
            fn_kwargs={"tokenizer": tokenizer, "max_length": max_length, "code_version": _code_version()},
            desc="tokenizing")
        columns = encoded.to_dict()
        for ex, i in members:
            ex.rows = [EncodedSample(ids, length, truncated) for ids, length, truncated in
                       zip(columns["input_ids"][i], columns["completion_lengths"][i], columns["truncated"][i])]
    truncated = {(ex.prompt, text): row for ex in examples for text, row in zip(ex.texts, ex.rows) if row.truncated}
    cut = sum(1 for row in truncated.values() if row.completion_length >= max_length)
    stats.truncated_samples += len(truncated)
    stats.cut_completions += cut
    if truncated:
        log.warning("%d sample(s) over --max-length %d: %d shortened their prompt (a conversation loses its oldest "
                    "turns first, then the first tokens go), %d completion(s) alone over it keep only their last "
                    "tokens", len(truncated), max_length, len(truncated) - cut, cut)


def collate(examples: Sequence[RankingExample], pad_id: int, weighting: str = "pair"):
    """All completions of the batch's rankings in ONE padded batch (input_ids, attention_mask,
    completion_mask), and where their pairs are."""
    rows = [row for ex in examples for row in ex.rows]
    tensors = pad_samples(rows, pad_id, "left")
    index = build_pair_index([ex.pairs for ex in examples], [len(ex.rows) for ex in examples], weighting)
    return tensors, index
