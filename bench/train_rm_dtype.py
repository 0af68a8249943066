"""`rlhf train-rm` with its default `--dtype auto` against `--dtype float32` and `--dtype bfloat16` on the same
data, side by side in one run: whole commands (model load included), alternated, the median of `--repeats`.

    .venv/bin/python bench/train_rm_dtype.py [--rankings 16] [--repeats 2] [--dtypes auto float32 bfloat16]

The data: `--rankings` rankings of K = 4 short completions of the embedded prompts (a separable word
preference, like the tests'), one epoch at the default batch of 8 rankings, no checkpoints. On a CPU without
bf16 units `auto` must cost no more than float32 (it is float32 there); on one with them it is bfloat16. Each
command's start-up line (`dtype: ... (why); threads: ...`) is printed with its time.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rlhf.hardware import cpu_description
from rlhf.prompts import read_prompts

WORDS = "sun sea sky tree fox bear moon star boat bird key snow river stone".split()


def write_rankings(path: Path, count: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    prompts = [p for _, p in read_prompts("data/prompts.jsonl")]
    with open(path, "w", encoding="utf-8") as f:
        for i in range(count):
            texts = [" ".join(rng.choices(WORDS, k=12)) for _ in range(4)]
            good = rng.randrange(4)
            texts[good] += " with bright golden light"
            f.write(json.dumps({"task_id": f"t{i}", "annotator": "a", "prompt": prompts[i % len(prompts)],
                                "completions": [{"id": f"c{j}", "text": t, "rank": 1 if j == good else 2}
                                                for j, t in enumerate(texts)]}) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--rankings", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dtypes", nargs="+", default=["auto", "float32", "bfloat16"])
    args = parser.parse_args()

    rlhf = str(Path(sys.executable).with_name("rlhf"))
    times: dict[str, list[float]] = {d: [] for d in args.dtypes}
    lines: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "rankings.jsonl"
        write_rankings(data, args.rankings)
        for repeat in range(args.repeats):
            for dtype in args.dtypes:
                out = Path(tmp) / f"rm-{dtype}-{repeat}"
                command = [rlhf, "train-rm", "--data", str(data), "--out", str(out), "--model", args.model,
                           "--epochs", "1", "--checkpoint-every", "0", "--json"]
                if dtype != "auto":
                    command += ["--dtype", dtype]
                start = time.perf_counter()
                done = subprocess.run(command, capture_output=True, text=True)
                seconds = time.perf_counter() - start
                if done.returncode:
                    sys.exit(f"{' '.join(command)} failed: {done.stderr.strip().splitlines()[-1]}")
                times[dtype].append(seconds)
                lines[dtype] = next((x for x in done.stderr.splitlines() if x.startswith("dtype: ")), "?")
                print(f"{dtype}: {seconds:.1f} s  [{lines[dtype]}]", flush=True)

    base = statistics.median(times["float32"]) if "float32" in times else None
    print(f"\nCPU: {cpu_description()}; uptime: {os.popen('uptime').read().strip()}")
    print(f"{args.rankings} rankings x K = 4, 1 epoch, model {args.model}, median of {args.repeats}")
    print("| --dtype | seconds (whole command) | / float32 | resolved |\n|---|---:|---:|---|")
    for dtype, values in times.items():
        median = statistics.median(values)
        ratio = f"{median / base:.2f}x" if base else "-"
        print(f"| {dtype} | {median:.1f} | {ratio} | {lines[dtype]} |")


if __name__ == "__main__":
    main()
