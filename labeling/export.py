"""Export the store's rankings as reward-model training data, split by prompt.

Files written into the output folder, each atomically (temporary file + rename):

- `rankings.jsonl` / `rankings.parquet`: one line per stored ranking (`RankedTask.to_dict()`: with the
  annotator's `comment` and `flags`) plus a `split` field, "train" or "test". The split is the prompt's, the
  same as in the pair files, so a listwise reward model can hold out exactly the prompts that `test.jsonl`
  holds out (`RankedTask.from_dict` ignores the extra field).
- `train.jsonl` / `train.parquet`, `test.jsonl` / `test.parquet`: preference pairs in TRL's format
  (`Pair.to_dict()`: prompt, chosen, rejected, task_id, annotator, rank_chosen, rank_rejected).
- `pairs_dataset/`, `rankings_dataset/`: the same pairs and rankings as `datasets.DatasetDict`s
  (`save_to_disk`; `datasets.load_from_disk` reads them), with the splits "train" and "test" (a split
  without rows is left out); the rankings there carry no `split` field, their split says it.

Conversations: when any prompt is a conversation, every row is written in TRL's conversational form (the
prompt a list of {"role", "content"} messages, a string prompt becoming one user turn; chosen and rejected one
assistant message each), so that each column has one type, and `pairs_text_dataset/` holds the same pairs in
the flat text form: the prompt as an HH-RLHF transcript ("\\n\\nHuman: ...\\n\\nAssistant:", `transcript`),
chosen and rejected the reply texts.
- `export.json`: the format version (`EXPORT_FORMAT`) and the summary `export` returns. Readers refuse a
  folder of another format instead of misreading it.

`push_to_hub` uploads the two datasets to one hub dataset repository: the pairs as its default
configuration (what TRL's trainers load), the rankings as the configuration "rankings".

Split by prompt text, never by row: all rankings and pairs of a prompt land on the same side, or the
test set would measure memorised prompts. Prompts are ordered by a hash of (seed, prompt) and the
first round(test_fraction * prompts) form the test set: deterministic, independent of the store's
row order, and a prompt rarely changes side when more data is added.

Aggregation: "none" keeps every annotator's C(K,2) pairs (InstructGPT trains on all of them);
"majority" keeps one pair per (task, completion pair), oriented by the majority of the annotators who
ordered it, and drops pairs whose votes tie (contradicted); those pairs carry annotator "majority" and
no ranks. "review" takes a task's pairs from its resolved ranking where an admin set one in review
(`SQLLabelStore.resolve`; annotator "review"), and every annotator's pairs elsewhere.

Flags: `exclude_flags` (`rlhf export --exclude-flags unsafe,broken-prompt`) leaves out every ranking that carries
one of them, from the rankings files and from the pairs (majority votes and resolved tasks included: a task
left with no ranking makes no pairs). The pair files keep TRL's columns; comments and flags are in the rankings.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Iterable

from labeling.store import SQLLabelStore
from rlhf.errors import UserError
from rlhf.jsonl import atomic_write, replace_folder, write_jsonl
from rlhf.pairs import expand_pairs, pair_indices
from rlhf.prompts import split_by_prompt
from rlhf.records import Pair, RankedTask, Ranking, as_conversation, transcript
from rlhf.tables import EXPORT_FORMAT, EXPORT_META, quiet_datasets

AGGREGATIONS = ("none", "review", "majority")
PAIRS_DATASET = "pairs_dataset"
PAIRS_TEXT_DATASET = "pairs_text_dataset"
RANKINGS_DATASET = "rankings_dataset"


def majority_pairs(ranked: list[RankedTask]) -> tuple[list[Pair], int]:
    """One pair per completion pair of one task, by majority vote over its annotators' rankings.

    Returns (pairs, dropped): a completion pair that got as many votes each way is dropped. Pairs are
    ordered by the first ranking's pair order, then any pair only later rankings expressed."""
    votes: dict[tuple[int, int], int] = defaultdict(int)  # (i, j) with i < j -> (#i better) - (#j better)
    order: list[tuple[int, int]] = []
    for r in ranked:
        for better, worse in pair_indices(r.ranks):
            key = (min(better, worse), max(better, worse))
            if key not in votes:
                order.append(key)
            votes[key] += 1 if better == key[0] else -1
    first = ranked[0]
    pairs, dropped = [], 0
    for i, j in order:
        if votes[(i, j)] == 0:
            dropped += 1
            continue
        better, worse = (i, j) if votes[(i, j)] > 0 else (j, i)
        pairs.append(Pair(first.prompt, first.completions[better].text, first.completions[worse].text, first.task_id,
                          "majority"))
    return pairs, dropped


def _messages_type():
    import pyarrow as pa

    return pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))


def _pair_table(rows: list[dict], conversational: bool = False):
    import pyarrow as pa

    text = _messages_type() if conversational else pa.string()
    schema = pa.schema([("prompt", text), ("chosen", text), ("rejected", text),
                        ("task_id", pa.string()), ("annotator", pa.string()), ("rank_chosen", pa.int64()),
                        ("rank_rejected", pa.int64())])
    return pa.Table.from_pylist(rows, schema=schema)


def _ranking_table(rows: list[dict], with_split: bool = True, conversational: bool = False):
    import pyarrow as pa

    completion = pa.struct([("id", pa.string()), ("text", pa.string()), ("rank", pa.int64())])
    prompt = _messages_type() if conversational else pa.string()
    schema = pa.schema([("task_id", pa.string()), ("annotator", pa.string()), ("prompt", prompt),
                        ("completions", pa.list_(completion)), ("comment", pa.string()),
                        ("flags", pa.list_(pa.string()))] + ([("split", pa.string())] if with_split else []))
    return pa.Table.from_pylist(rows, schema=schema)


def _dataset_dict(splits: dict[str, list[dict]], table):
    """A DatasetDict of the non-empty splits, with the columns and types of `table(rows)`."""
    from datasets import Dataset, DatasetDict, Features

    return DatasetDict({name: Dataset.from_list(rows, features=Features.from_arrow_schema(table(rows).schema))
                        for name, rows in splits.items() if rows})


def _save_dataset(dataset, target: Path) -> None:
    """`save_to_disk`, swapped in whole: a failed export leaves the previous dataset as it was."""
    def save(tmp: Path) -> None:
        with quiet_datasets():
            dataset.save_to_disk(str(tmp))

    replace_folder(target, save)


def _write_parquet(path: Path, table) -> None:
    import pyarrow.parquet as pq

    with atomic_write(path, "wb") as handle:
        pq.write_table(table, handle)


def export(store: SQLLabelStore, out_dir, test_fraction: float = 0.1, seed: int = 0, aggregate: str = "none",
           exclude_flags: Iterable[str] = ()) -> dict:
    """Write rankings, train and test pairs (JSONL + Parquet) into `out_dir`; returns a summary dict
    (counts per split, dropped contradicted pairs, rankings left out for their flags, file paths). See the module
    docstring for the files."""
    if not 0 <= test_fraction < 1:
        raise UserError(f"--test-fraction must be in [0, 1), got {test_fraction}")
    if aggregate not in AGGREGATIONS:
        raise UserError(f"--aggregate must be one of {AGGREGATIONS}, got {aggregate!r}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder")
    excluded = frozenset(exclude_flags)
    ranked = list(store.export_ranked_tasks())
    if not ranked:  # six empty files would look like a finished export
        raise UserError("the label store holds no rankings yet; nothing was written (rank tasks with "
                        "`rlhf label` or `rlhf simulate` first)")
    kept = [r for r in ranked if not excluded.intersection(r.flags)]
    if not kept:
        raise UserError(f"every ranking carries one of the flags {', '.join(sorted(excluded))}; nothing was written")
    excluded_rankings, ranked = len(ranked) - len(kept), kept
    conversational = any(not isinstance(r.prompt, str) for r in ranked)
    if conversational:  # one type per column: every prompt a conversation
        ranked = [replace(r, prompt=as_conversation(r.prompt)) for r in ranked]
    test_prompts = split_by_prompt({r.prompt for r in ranked}, test_fraction, seed)

    rankings_rows, by_task = [], defaultdict(list)
    for r in ranked:
        rankings_rows.append({**r.to_dict(), "split": "test" if r.prompt in test_prompts else "train"})
        by_task[r.task_id].append(r)
    pairs: dict[str, list[Pair]] = {"train": [], "test": []}
    dropped = 0
    resolved = store.resolutions() if aggregate == "review" else {}
    for task_id, task_rankings in by_task.items():  # insertion order = task import order
        split = "test" if task_rankings[0].prompt in test_prompts else "train"
        if task_id in resolved:
            review = Ranking(task_id, "review", resolved[task_id][0])
            task_pairs = expand_pairs(RankedTask.from_task(store.get_task(task_id), review))
        elif aggregate == "majority":
            task_pairs, n_dropped = majority_pairs(task_rankings)
            dropped += n_dropped
        else:
            task_pairs = [p for r in task_rankings for p in expand_pairs(r)]
        pairs[split].extend(task_pairs)
    pair_rows = {split: [p.to_dict() for p in split_pairs] for split, split_pairs in pairs.items()}

    def pair_table(rows: list[dict]):
        return _pair_table(rows, conversational)

    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, rows, table in (("rankings", rankings_rows, lambda rows: _ranking_table(rows, True, conversational)),
                              ("train", pair_rows["train"], pair_table), ("test", pair_rows["test"], pair_table)):
        write_jsonl(out / f"{name}.jsonl", rows)
        _write_parquet(out / f"{name}.parquet", table(rows))
        files[name] = [str(out / f"{name}.jsonl"), str(out / f"{name}.parquet")]
    ranking_splits: dict[str, list[dict]] = {"train": [], "test": []}
    for row in rankings_rows:
        ranking_splits[row["split"]].append({k: v for k, v in row.items() if k != "split"})
    _save_dataset(_dataset_dict(pair_rows, pair_table), out / PAIRS_DATASET)
    _save_dataset(_dataset_dict(ranking_splits, lambda rows: _ranking_table(rows, False, conversational)),
                  out / RANKINGS_DATASET)
    files["datasets"] = [str(out / PAIRS_DATASET), str(out / RANKINGS_DATASET)]
    if conversational:
        flat = {split: [{**p.to_dict(), "prompt": transcript(p.prompt), "chosen": p.chosen, "rejected": p.rejected}
                        for p in split_pairs] for split, split_pairs in pairs.items()}
        _save_dataset(_dataset_dict(flat, _pair_table), out / PAIRS_TEXT_DATASET)
        files["datasets"].append(str(out / PAIRS_TEXT_DATASET))
    files["meta"] = str(out / EXPORT_META)
    n_prompts = len({r.prompt for r in ranked})
    summary = {
        "rankings": len(ranked),
        "prompts": n_prompts,
        "train_prompts": n_prompts - len(test_prompts),
        "test_prompts": len(test_prompts),
        "conversational": conversational,
        "train_pairs": len(pairs["train"]),
        "test_pairs": len(pairs["test"]),
        "dropped_contradicted": dropped,
        "excluded_flags": sorted(excluded),
        "excluded_rankings": excluded_rankings,
        "aggregate": aggregate,
        "test_fraction": test_fraction,
        "seed": seed,
        "files": files,
    }
    # export.json names its files relative to the export folder, which can then be moved or read from anywhere
    in_folder = {key: [Path(p).name for p in paths] if isinstance(paths, list) else Path(paths).name
                 for key, paths in files.items()}
    with atomic_write(out / EXPORT_META) as handle:
        handle.write(json.dumps({"format": EXPORT_FORMAT, **summary, "files": in_folder}, indent=2) + "\n")
    return summary


def push_to_hub(out_dir, repo: str) -> None:
    """Upload an export's datasets to the hub dataset repository `repo` (created if missing; the token of
    `hf auth login` or $HF_TOKEN): the pairs as the default configuration, the rankings as "rankings"."""
    from datasets import load_from_disk

    from rlhf.models import hub_reachable

    out = Path(out_dir)
    if not hub_reachable():
        raise UserError(f"cannot push to {repo!r}: the Hugging Face hub is not reachable (the export is in {out})")
    try:
        with quiet_datasets():
            pairs, rankings = load_from_disk(str(out / PAIRS_DATASET)), load_from_disk(str(out / RANKINGS_DATASET))
        pairs.push_to_hub(repo)
        rankings.push_to_hub(repo, config_name="rankings")
    except Exception as exc:  # noqa: BLE001 -- the hub client's errors have many types
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot push to {repo!r} ({reason}); the export is in {out}") from None
