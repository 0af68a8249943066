"""Data parallel over two processes (`accelerate launch`, gloo on the CPU) against one process with the whole
batch: the reward model and the PPO / RLOO / GRPO updates reach the same weights, `rlhf ppo` runs, and only
the main process writes files.

accelerate starts several CPU processes only through its multi-GPU launcher (torchrun): with `--cpu` it runs a
single process. So the launch here is `accelerate launch --multi_gpu --num_processes 2 ...` with the GPUs
hidden (CUDA_VISIBLE_DEVICES=""), which accelerate runs as MULTI_CPU with the gloo backend.

This file is also the launched script (`main` at the bottom). One launch does everything, in the same two
processes (one start-up instead of three): one update of each algorithm on the process's half of a saved
batch of rollouts, then `rlhf train-rm`, then `rlhf ppo`, recording every file each process writes under
the runs' folder.

Tolerances: both sides compute in float32 and differ only in how sums are associated (DDP adds two
half-batch gradients where one process sums over the whole batch; batches padded to another length run
matmuls of other shapes): a few float32 ulps (1.2e-7 relative) in losses and gradients. The policy updates
run with plain SGD here, so their weights differ by lr times those gradient differences (measured: PPO 3e-8,
GRPO 7e-9, RLOO 0). The reward model's own AdamW divides by sqrt(v) + eps, which magnifies the rounding of a
near-zero gradient element up to lr / eps times; over its 4 steps the weights still agree to 7e-7 and the
losses to 1.2e-7. 1e-5 bounds both with room; a missing all-reduce or a wrong weighting of the processes'
shares is off by 1e-3 or more. `pytest -s` prints the differences.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parent.parent
WEIGHT_TOL = 1e-5
LOSS_TOL = 1e-5
ALGOS = ("ppo", "rloo", "grpo")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cpu_env() -> dict[str, str]:
    return {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error"}


def _check(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-8000:]


# ---- what both sides run ----

def write_uneven_rankings(path: Path, n: int = 27, seed: int = 1) -> None:
    """Rankings of 2 to 4 completions without ties (1, 3 or 6 pairs each): the processes' shares of a step hold
    different numbers of pairs, and 27 rankings leave the last step of 8 with 3 (2 on one process, 1 on the
    other)."""
    rng = random.Random(seed)
    words = "sun sea sky tree fox bear moon star boat bird key snow".split()
    with path.open("w") as handle:
        for i in range(n):
            k = rng.choice([2, 3, 4])
            ranks = rng.sample(range(1, k + 1), k)
            completions = [{"id": f"c{j}", "text": " ".join(rng.choices(words, k=5)), "rank": r}
                           for j, r in enumerate(ranks)]
            handle.write(json.dumps({"task_id": f"t{i}", "annotator": "a", "prompt": f"Tell me about {words[i % 12]}.",
                                     "completions": completions}) + "\n")


def _update_config(algo: str, batch_size: int):
    from policy.config import PPOConfig

    return PPOConfig(algo=algo, reward="policy_helpers:e_fraction", batch_size=batch_size, micro_batch_size=2,
                     rloo_k=2, grpo_k=2, response_length=6, lr=0.5, stop_kl=None, seed=0)


def _rows(batch, rows: slice):
    """The rollouts `rows` of a batch (tensors and lists alike)."""
    return dataclasses.replace(batch, **{f.name: getattr(batch, f.name)[rows] for f in dataclasses.fields(batch)
                                         if getattr(batch, f.name) is not None})


def _roles(model_dir: str, algo: str):
    """(roles, tokenizer) as both sides build them: the same seed, the same initial weights."""
    import torch

    from policy.roles import build_roles

    torch.manual_seed(0)
    return build_roles(model_dir, None, lora_r=4, lora_alpha=8, critic=algo == "ppo")


def run_updates(model_dir: str, rollout_path: str, rank: int = 0, world: int = 1) -> dict:
    """One update of each algorithm, from the same initial weights, on this process's share of the saved
    rollouts: {algo: {"weights": trainable tensors after it, "metrics": its metrics}}."""
    import torch
    from accelerate import Accelerator

    from policy.trainer import UPDATES, policy_accelerator

    full = torch.load(rollout_path, weights_only=False)
    size = len(full.prompts) // world
    batch = _rows(full, slice(rank * size, (rank + 1) * size))
    results = {}
    for algo in ALGOS:
        config = _update_config(algo, size)
        roles = _roles(model_dir, algo)[0]
        # launched: the trainer's own Accelerator; the one-process reference: on the CPU, as the launched ones are
        accelerator = policy_accelerator(config) if world > 1 else Accelerator(cpu=True)
        # plain SGD: the weights then differ by lr times the difference of the gradients (see the module docstring)
        optimizer = torch.optim.SGD(roles.trainable_parameters(), lr=config.lr)
        model, optimizer = accelerator.prepare(roles, optimizer)
        update = UPDATES[algo](model, accelerator, optimizer, batch, config.kl_coef, config, 1)
        assert update.skipped == 0
        results[algo] = {"weights": {k: v.detach().cpu().clone() for k, v in roles.named_trainable().items()},
                         "metrics": update.metrics}
    return results


# ---- the launch ----

@pytest.fixture(scope="module")
def runs(tiny_model_dir, rm_dir, prompts_file, tmp_path_factory):
    """The two-process launch (updates, `rlhf train-rm`, `rlhf ppo`) and what it was given."""
    import torch
    from policy_helpers import PROMPTS

    from policy.rollout import reward_function, rollout
    from rlhf.models import eos_token_ids

    base = tmp_path_factory.mktemp("multiprocess")
    outs, results = base / "runs", base / "results"
    outs.mkdir()
    results.mkdir()
    # four rollouts (2 prompts x 2 samples, with logprobs and values) that both sides update on
    config = _update_config("ppo", 4)
    roles, tokenizer = _roles(tiny_model_dir, "ppo")
    batch = rollout(roles, tokenizer, PROMPTS[:2], 2, config, reward_function(config, tokenizer),
                    eos_token_ids(roles.model, tokenizer), generator_seed=5, with_values=True)
    torch.save(batch, base / "rollout.pt")
    write_uneven_rankings(base / "rankings.jsonl")
    rm_args = ["--data", str(base / "rankings.jsonl"), "--model", tiny_model_dir, "--epochs", "1", "--lr", "3e-3",
               "--dtype", "float32", "--checkpoint-every", "2"]
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(_free_port()), __file__,
               str(outs), str(results), tiny_model_dir, str(base / "rollout.pt"),
               "--", "train-rm", *rm_args, "--out", str(outs / "rm"), "--batch-rankings", "4",
               "--", "ppo", "--rm", rm_dir, "--prompts", prompts_file, "--out", str(outs / "ppo"), "--steps", "2",
               "--batch-size", "2", "--response-length", "4", "--eval-every", "1", "--eval-size", "2",
               "--checkpoint-every", "1"]
    _check(subprocess.run(command, cwd=ROOT, env=_cpu_env(), capture_output=True, text=True, timeout=900))
    return SimpleNamespace(base=base, outs=outs, results=results, rm_args=rm_args)


def _written(runs, rank: int) -> list[str]:
    """What process `rank` wrote, created, renamed or removed under the runs' folder, relative to it."""
    return json.loads((runs.results / f"writes-{rank}.json").read_text())


# ---- the tests ----

def _rm_tensors(rm_dir: Path) -> dict:
    from safetensors.torch import load_file

    return {**load_file(str(rm_dir / "adapter_model.safetensors")),
            **{f"score_head.{k}": v for k, v in load_file(str(rm_dir / "score_head.safetensors")).items()}}


def test_reward_model_two_processes_match_one(runs):
    import pandas as pd

    one_dir, two_dir = runs.base / "rm-one", runs.outs / "rm"
    _check(subprocess.run([sys.executable, "-m", "pipeline.cli", "train-rm", *runs.rm_args, "--out", str(one_dir),
                           "--batch-rankings", "8"], cwd=ROOT, env=_cpu_env(), capture_output=True, text=True,
                          timeout=600))
    one, two = pd.read_csv(one_dir / "train_log.csv"), pd.read_csv(two_dir / "train_log.csv")
    assert list(two["rankings"]) == [8, 8, 8, 3] and list(two["pairs"]) == list(one["pairs"])
    loss_diff = (one["loss"] - two["loss"]).abs().max()
    weights_one, weights_two = _rm_tensors(one_dir), _rm_tensors(two_dir)
    assert weights_one.keys() == weights_two.keys()
    # The score head's bias cancels in every pair difference, so its gradient is rounding noise, which AdamW
    # (eps 1e-8) still turns into steps of about its learning rate, different for each batch layout. The
    # normalisation subtracts it again: what must match is the reward's offset, head bias - reward_bias.
    weight_diff = max((weights_one[k] - weights_two[k]).abs().max().item() for k in weights_one
                      if k != "score_head.bias")
    moved = max(weights_one[k].abs().max().item() for k in weights_one if "lora_B" in k)  # B starts at 0
    offset = [weights["score_head.bias"].item() - json.loads((folder / "reward_model.json").read_text())["reward_bias"]
              for folder, weights in ((one_dir, weights_one), (two_dir, weights_two))]
    print(f"reward model, 1 vs 2 processes: max |loss diff| {loss_diff:.2e}, max |weight diff| {weight_diff:.2e}, "
          f"|reward offset diff| {abs(offset[0] - offset[1]):.2e}")
    assert moved > 1e-3  # the LoRA B weights (zero at the start) really trained
    assert loss_diff < LOSS_TOL and weight_diff < WEIGHT_TOL and abs(offset[0] - offset[1]) < LOSS_TOL


def test_policy_updates_two_processes_match_one(runs, tiny_model_dir, one_thread):
    import torch

    one = run_updates(tiny_model_dir, str(runs.base / "rollout.pt"))
    ranks = [torch.load(runs.results / f"updates-{r}.pt", weights_only=False) for r in (0, 1)]
    for algo in ALGOS:
        start = {k: v.detach() for k, v in _roles(tiny_model_dir, algo)[0].named_trainable().items()}
        w1, w2 = one[algo]["weights"], ranks[0][algo]["weights"]
        assert w1.keys() == w2.keys() == ranks[1][algo]["weights"].keys()
        # DDP keeps the processes in step: the same all-reduced gradients, the same weights, bit for bit
        assert all(torch.equal(w2[k], ranks[1][algo]["weights"][k]) for k in w2), algo
        diff = max((w1[k] - w2[k]).abs().max().item() for k in w1)
        moved = max((w1[k] - start[k]).abs().max().item() for k in w1)
        losses = [k for k in ("loss/policy", "loss/value") if k in one[algo]["metrics"]]
        loss_diff = max(abs(one[algo]["metrics"][k] - ranks[0][algo]["metrics"][k]) for k in losses)
        print(f"{algo}, 1 vs 2 processes: max |weight diff| {diff:.2e} (largest change {moved:.2e}), "
              f"max |loss diff| {loss_diff:.2e}")
        assert moved > 1e-3, algo  # the update really moved the weights
        assert diff < WEIGHT_TOL and loss_diff < LOSS_TOL, algo


def test_ppo_runs_on_two_processes(runs):
    import pandas as pd

    out = runs.outs / "ppo"
    assert list(pd.read_csv(out / "train_log.csv")["step"]) == [1, 2]
    assert list(pd.read_csv(out / "eval.csv")["step"]) == [0, 1, 2]
    assert (out / "policy" / "adapter_model.safetensors").is_file() and (out / "checkpoints" / "step-2").is_dir()


def test_only_the_main_process_writes(runs):
    assert _written(runs, 1) == []
    written = _written(runs, 0)
    for name in ("rm/train_log.csv", "rm/checkpoints/", "rm/reward_model.json", "ppo/config.json",
                 "ppo/train_log.csv", "ppo/eval.csv", "ppo/samples.jsonl", "ppo/checkpoints/",
                 "ppo/policy/policy.json"):
        assert any(p.startswith(name) for p in written), name


# ---- the launched script ----

def _audit_writes(root: Path, record: list[str]) -> None:
    """Record every write under `root` that this process makes (Python audit events: open for writing, mkdir,
    rename/replace, remove, rmtree), as paths relative to `root`."""
    root_text = str(root.resolve())

    def under(path) -> str | None:
        try:
            path = os.path.abspath(os.fsdecode(path))
        except TypeError:  # a file descriptor
            return None
        return os.path.relpath(path, root_text) if path.startswith(root_text + os.sep) else None

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = args
            writing = any(c in mode for c in "wax+") if isinstance(mode, str) else bool(
                flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
            paths = [path] if writing else []
        elif event in ("os.mkdir", "os.remove", "os.rmdir", "shutil.rmtree"):
            paths = [args[0]]
        elif event == "os.rename":
            paths = list(args[:2])
        else:
            return
        record.extend(p for p in map(under, paths) if p)

    sys.addaudithook(hook)


def main(argv: list[str]) -> int:
    """RUNS RESULTS MODEL_DIR ROLLOUT [-- COMMAND ARGS...]...: the updates, then each `rlhf` command; what this
    process wrote under RUNS goes to RESULTS/writes-RANK.json."""
    import torch

    from pipeline.cli import main as rlhf_main

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    runs, results, model_dir, rollout_path, *rest = argv
    record: list[str] = []
    _audit_writes(Path(runs), record)
    torch.save(run_updates(model_dir, rollout_path, rank, world), Path(results) / f"updates-{rank}.pt")
    commands: list[list[str]] = []
    for arg in rest:
        if arg == "--":
            commands.append([])
        else:
            commands[-1].append(arg)
    for command in commands:
        if code := rlhf_main(command):
            return code
    (Path(results) / f"writes-{rank}.json").write_text(json.dumps(sorted(set(record))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
