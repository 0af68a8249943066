"""Real human preference sets for bench/rm_quality.py, written as folders that `rlhf train-rm --data` reads.

    .venv/bin/python bench/prepare_human_preferences.py [--sets qa-feedback pandalm] [--out DIR]
        [--source qa-feedback=PATH ...] [--test-fraction 0.2] [--seed 0]

Each set is one file of a public repository, kept unchanged (gzip -n) in bench/data/human_preferences/
(its README.md gives the repository, commit, path, license and sha256); `--source NAME=PATH` reads the
original file from a local path instead, and either copy must match the recorded sha256, so every run
reads the same labels. Offline and deterministic.

- qa-feedback: the preference feedback of fine-grained RLHF (Wu et al. 2023), its 500 dev questions
  (ASQA, long-form answers). Four sampled answers per question; annotators compared all six pairs (1 or 2 is
  the preferred answer, 0 no preference). The prompt is the Wikipedia passages the annotators were shown,
  then the question, last, so the reward model's left truncation of long prompts keeps it.
- pandalm: PandaLM's human-annotated test set (Wang et al. 2023): 999 pairs of answers by five instruction-
  tuned 7B models to the self-instruct human-evaluation instructions, each labelled by three annotators
  (1 or 2 preferred, 0 similar). The label is the majority; pairs without a majority for one answer are out.

Every human comparison becomes one ranking of its two answers (ranks 1 and 2: pairwise labels need not be
transitive, so the answers of one prompt are not merged into one ranking); "no preference" labels and
pairs of identical texts are left out. Rankings are split into train and test by prompt with the export's
rule (`rlhf.prompts.split_by_prompt`). For each set the script writes OUT/NAME/rankings.jsonl (RankedTask
rows with "split") and prints pairs, prompts, mean lengths in words, and the share of pairs whose longer
answer (in characters) was preferred, the accuracy of the length shortcut.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DATA = ROOT / "bench" / "data" / "human_preferences"
CACHE = Path(os.environ.get("RLHF_BENCH_CACHE", "/tmp/rlhf-bench-cache"))

# (comparison id, prompt, first text, second text, 1 or 2: the preferred one, first id, second id, annotator)
Comparison = tuple[str, str, str, str, int, str, str, str]


def qa_feedback_comparisons(records: list[dict]) -> Iterator[Comparison]:
    """The six pairwise preferences per question of fine-grained RLHF's qa-feedback (order 1v2, 1v3, 1v4,
    2v3, 2v4, 3v4 as its data README gives it)."""
    order = [(i, j) for i in range(4) for j in range(i + 1, 4)]
    for n, record in enumerate(records):
        passages = "\n\n".join(" ".join(s.strip() for s in passage[1:]) for passage in record["passages"])
        question = record["question"].strip()
        prompt = f"Wikipedia passages:\n\n{passages}\n\nAnswer this question from the passages: {question}"
        answers = [record[f"prediction {k + 1}"].strip() for k in range(4)]
        if len(record["preference"]) != len(order):
            raise ValueError(f"qa-feedback record {n}: {len(record['preference'])} preferences, expected 6")
        for (i, j), label in zip(order, record["preference"]):
            yield (f"qa-feedback-{n}-{i + 1}v{j + 1}", prompt, answers[i], answers[j], label,
                   f"prediction-{i + 1}", f"prediction-{j + 1}", "qa-feedback annotator")


def _answer_text(value) -> str:
    """PandaLM's file holds a few answers as JSON booleans (the text "True" parsed as one)."""
    return ("True" if value else "False") if isinstance(value, bool) else str(value).strip()


def pandalm_comparisons(records: list[dict]) -> Iterator[Comparison]:
    """PandaLM's test pairs labelled by the majority of their three annotators (0 when there is none)."""
    for record in records:
        votes = [record["annotator1"], record["annotator2"], record["annotator3"]]
        label = next((v for v in (1, 2) if votes.count(v) >= 2), 0)
        instruction, extra = record["instruction"].strip(), str(record["input"]).strip()
        prompt = f"{instruction}\n\n{extra}" if extra else instruction
        first, second = record["cmp_key"].split("_")
        yield (f"pandalm-{record['idx']}", prompt, _answer_text(record["response1"]),
               _answer_text(record["response2"]), label, first, second, "pandalm majority of 3")


@dataclass(frozen=True)
class HumanSet:
    file: str
    """The vendored copy in bench/data/human_preferences/ (the original, gzip -n)."""
    sha256: str
    """Of the original (uncompressed) file."""
    comparisons: Callable[[list[dict]], Iterator[Comparison]]


SETS = {
    "qa-feedback": HumanSet("qa_feedback_dev_feedback.json.gz",
                            "f394289ecfdc5a2d1663170254b92d75ad3c53ba36df9f627c70d4c6fc4f3291",
                            qa_feedback_comparisons),
    "pandalm": HumanSet("pandalm_testset-v1.json.gz",
                        "cc154f9067c7382d7ea86f8f246511a5e1ac87e1fddd845c5938d789505b07a4",
                        pandalm_comparisons),
}


def read_source(name: str, source: str | Path | None = None) -> list[dict]:
    """The records of set `name`: from `source` (the original file, plain or .gz) or the vendored copy."""
    spec = SETS[name]
    path = Path(source).expanduser() if source else DATA / spec.file
    if not path.is_file():
        raise SystemExit(f"{path}: no such file (set {name!r})")
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    digest = hashlib.sha256(raw).hexdigest()
    if digest != spec.sha256:
        raise SystemExit(f"{path}: sha256 {digest[:12]}... is not the file set {name!r} was prepared from "
                         f"({spec.sha256[:12]}...; see {DATA / 'README.md'})")
    return json.loads(raw)


def rankings_from_comparisons(comparisons, test_fraction: float, seed: int, limit: int | None = None) -> list[dict]:
    """RankedTask rows (one ranking of 2 per labelled comparison, "split" by prompt with the export's rule);
    comparisons labelled 0 (no preference) or of identical texts are left out; `limit`: only those of the
    first `limit` prompts, in order of appearance."""
    from rlhf.prompts import split_by_prompt

    comparisons = list(comparisons)
    if limit is not None:
        first = set(list(dict.fromkeys(c[1] for c in comparisons))[:limit])
        comparisons = [c for c in comparisons if c[1] in first]
    kept = [c for c in comparisons if c[4] in (1, 2) and c[2] != c[3]]
    test = split_by_prompt([c[1] for c in kept], test_fraction, seed)
    return [{"task_id": cid, "annotator": annotator, "prompt": prompt,
             "completions": [{"id": first_id, "text": first, "rank": 1 if label == 1 else 2},
                             {"id": second_id, "text": second, "rank": 2 if label == 1 else 1}],
             "split": "test" if prompt in test else "train"}
            for cid, prompt, first, second, label, first_id, second_id, annotator in kept]


def human_rankings(name: str, test_fraction: float = 0.2, seed: int = 0, source: str | Path | None = None,
                   limit: int | None = None) -> list[dict]:
    """The rankings rows of human preference set `name` (see the module docstring); `limit`: only the
    comparisons of its first `limit` prompts, in file order."""
    return rankings_from_comparisons(SETS[name].comparisons(read_source(name, source)), test_fraction, seed, limit)


def summarise(rows: list[dict]) -> dict:
    """Pairs and prompts per split, mean lengths in words, and the share of pairs (of unequal length in
    characters) whose longer answer is the preferred one."""
    def words(text):
        return len(text.split())

    chosen = [min(r["completions"], key=lambda c: c["rank"])["text"] for r in rows]
    rejected = [max(r["completions"], key=lambda c: c["rank"])["text"] for r in rows]
    unequal = [(len(c), len(w)) for c, w in zip(chosen, rejected) if len(c) != len(w)]
    n = max(len(rows), 1)
    return {
        "train_pairs": sum(r["split"] == "train" for r in rows),
        "test_pairs": sum(r["split"] == "test" for r in rows),
        "train_prompts": len({r["prompt"] for r in rows if r["split"] == "train"}),
        "test_prompts": len({r["prompt"] for r in rows if r["split"] == "test"}),
        "prompt_words": sum(words(r["prompt"]) for r in rows) / n,
        "chosen_words": sum(map(words, chosen)) / n,
        "rejected_words": sum(map(words, rejected)) / n,
        "longer_chosen": sum(c > w for c, w in unequal) / max(len(unequal), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", nargs="+", choices=sorted(SETS), default=list(SETS))
    parser.add_argument("--source", nargs="*", default=[], metavar="NAME=PATH",
                        help="read set NAME from the original file at PATH instead of the vendored copy")
    parser.add_argument("--out", default=str(CACHE / "human_preferences"), help="writes OUT/NAME/rankings.jsonl")
    parser.add_argument("--test-fraction", type=float, default=0.2, help="share of prompts held out")
    parser.add_argument("--seed", type=int, default=0, help="seed of the prompt split")
    args = parser.parse_args()
    sources = dict(item.split("=", 1) for item in args.source if "=" in item)
    if len(sources) != len(args.source) or not set(sources) <= set(SETS):
        parser.error(f"--source takes NAME=PATH with NAME one of {', '.join(SETS)}")

    from rlhf.jsonl import write_jsonl

    print("| set | train / test pairs | train / test prompts | words: prompt, chosen, rejected | longer chosen |")
    print("|---|---|---|---|---|")
    for name in args.sets:
        rows = human_rankings(name, args.test_fraction, args.seed, sources.get(name))
        write_jsonl(Path(args.out) / name / "rankings.jsonl", rows)
        s = summarise(rows)
        print(f"| {name} | {s['train_pairs']} / {s['test_pairs']} | {s['train_prompts']} / {s['test_prompts']} | "
              f"{s['prompt_words']:.0f}, {s['chosen_words']:.0f}, {s['rejected_words']:.0f} | "
              f"{s['longer_chosen']:.2f} |")
    print(f"-> {Path(args.out)}/<set>/rankings.jsonl")


if __name__ == "__main__":
    main()
