"""`rlhf demo`: the whole pipeline end to end on the embedded defaults, with scripted annotators.

    generate -> label (import + simulate) -> export -> reward model -> policy (PPO) -> policy (DPO) -> report

PPO learns from the reward model, DPO directly from the same exported rankings; the report compares the SFT
model, RM + PPO and DPO on the same held-out prompts.

Every stage writes its outputs under OUT and, when it succeeds, `OUT/stages/<stage>.json` with its
summary. `--resume` skips the stages that have that file, so a crash late in PPO redoes neither the
labeling nor the reward model. A failing stage is named in the one-line error.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

from pipeline.steps import finished_step, run_step
from reward_model.config import RewardTrainingConfig
from rlhf.config_args import check_fields
from rlhf.errors import UserError
from rlhf.hardware import DtypeName
from rlhf.run import has_checkpoint

PROMPTS_FILE = Path(__file__).resolve().parent.parent / "data" / "prompts.jsonl"


@dataclass
class DemoConfig:
    """The demo's settings. `quick()` gives a run of a few minutes; the defaults take about half an hour on a
    2-core CPU with the default model (docs/benchmarks.md, "The demo")."""

    # data and models
    out: str = "runs/demo"
    """Folder for every stage's outputs and the report."""
    model: str = "default"
    """SFT model: 'default' (SmolLM2-135M-Instruct), a local folder or a HF id."""
    prompts: str = str(PROMPTS_FILE)
    """Prompt set. `eval_fraction` of it is held out (`split_by_prompt`, the export's rule); the first
    `label_prompts` of the rest are labeled, and PPO trains on all of the rest."""
    eval_fraction: float = 0.1
    """Share of the prompts held out for the policy's evaluation and the report's samples; never labeled."""
    label_prompts: int = 200
    """Prompts whose completions the scripted annotators rank (each gives up to overlap * C(K,2) pairs); the
    reward model's accuracy grows with them (docs/benchmarks.md, "The learning curve and K = 8")."""
    eval_prompts: int = 24
    """Most held-out prompts per policy evaluation (the report's samples come from them)."""
    # generation
    k: int = 4
    """Completions per prompt. K = 8 gives 28 pairs per ranking against 6, and a more accurate reward model at
    about twice the generation, reward-model and DPO time (docs/benchmarks.md, "The demo")."""
    max_new_tokens: int = 32
    """Completion length for generation and for PPO responses."""
    temperature: float = 0.7
    """Sampling temperature of generation and PPO."""
    oracle: str = "descriptive"
    """The scripted annotators' preference, also the report's true score: physically descriptive writing
    (colour, light, sound, texture words), one of the two stylistic preferences Ziegler et al. (2019)
    collected human labels for; a word-level preference a reward model can learn from a few hundred
    rankings (docs/benchmarks.md, "Reward-model quality"). `alliteration` is the KL-collapse experiment's reward."""
    # scripted annotators
    annotators: int = 3
    """Scripted annotators."""
    overlap: int = 1
    """Rankings per task. At 1 the demo's time buys rankings of more prompts: a second ranking of the same four
    completions by a scripted annotator with little noise repeats most of the first, yet doubles the reward
    model's and DPO's time; at 2 the report also shows the annotators' agreement (docs/benchmarks.md, "The
    demo")."""
    noise: float = 0.1
    """Annotator noise (Bradley-Terry sampling temperature relative to a task's score range)."""
    # reward model
    rm_epochs: int = 6
    """Most reward-model epochs over the training rankings (its validation stop may end it sooner): fewer than
    `rlhf train-rm`'s 10, so that the whole demo fits 20 minutes on a 2-core CPU without bf16 units
    (docs/benchmarks.md, "The demo", "Reward-model settings")."""
    rm_lr: float = RewardTrainingConfig.lr
    """Reward-model learning rate of the LoRA weights (the score head's is 30x, RewardTrainingConfig)."""
    dtype: DtypeName = "auto"
    """The models' dtype in every stage. auto: bfloat16 where the device computes it natively (a GPU with bf16
    support, a CPU with AVX-512 BF16 or AMX), float32 elsewhere (rlhf.hardware)."""
    # policy (PPO)
    ppo_steps: int = 8
    """PPO steps."""
    ppo_batch_size: int = 8
    """Rollouts per PPO step."""
    ppo_lr: float = 3e-4
    """PPO learning rate."""
    kl_coef: float = 0.05
    """beta of the per-token KL penalty."""
    missing_eos_penalty: float | None = None
    """Subtracted from the score of a PPO response cut off without EOS. Off in the demo: completions are capped at
    `max_new_tokens` for speed, so most SFT completions (which the RM learned from) are cut off too, and a
    penalty would teach brevity instead of the annotators' preference."""
    eval_every: int = 4
    """PPO evaluation interval in steps."""
    # policy (DPO)
    dpo_epochs: int = 1
    """DPO epochs over the exported training rankings (Rafailov et al. 2023 and TRL train one)."""
    dpo_lr: float = 1e-4
    """DPO learning rate of the LoRA weights (DPOConfig.lr)."""
    dpo_beta: float = 0.1
    """DPO's beta, the strength of its implicit KL constraint (Rafailov et al. 2023; TRL's default)."""
    # run
    seed: int = 0
    """Seed of every stage."""
    resume: bool = False
    """Skip the stages whose outputs are complete."""

    def check(self) -> None:
        check_fields(self, positive=("label_prompts", "eval_prompts", "k", "max_new_tokens", "annotators", "overlap",
                                     "rm_epochs", "ppo_steps", "ppo_batch_size", "eval_every", "dpo_epochs"))
        if self.k < 2:
            raise UserError(f"--k must be at least 2 (a ranking needs two completions), got {self.k}")
        if not 0 < self.eval_fraction < 1:
            raise UserError(f"--eval-fraction must be in (0, 1), got {self.eval_fraction}")

    @classmethod
    def quick(cls, **overrides: Any) -> DemoConfig:
        settings = dict(label_prompts=16, eval_prompts=8, max_new_tokens=24, rm_epochs=1, ppo_steps=2, eval_every=2)
        settings.update(overrides)
        return cls(**settings)


@dataclass
class Stage:
    name: str
    title: str
    run: Callable[[DemoConfig, Path, dict], dict]


def _generate(cfg: DemoConfig, out: Path, done: dict) -> dict:
    from labeling.generate import GenerateConfig, run_generate
    from rlhf.jsonl import write_jsonl
    from rlhf.prompts import read_prompts, split_by_prompt
    from rlhf.records import prompt_json

    prompts = read_prompts(cfg.prompts)
    held_out = split_by_prompt([p for _, p in prompts], cfg.eval_fraction, cfg.seed)
    if not held_out:
        raise UserError(f"{cfg.prompts}: too few prompts to hold {cfg.eval_fraction:.0%} out for evaluation")
    for name, rows in (("train", [r for r in prompts if r[1] not in held_out]),
                       ("eval", [r for r in prompts if r[1] in held_out])):
        write_jsonl(out / f"prompts_{name}.jsonl", ({"id": i, "prompt": prompt_json(p)} for i, p in rows))
    config = GenerateConfig(prompts=str(out / "prompts_train.jsonl"), out=str(out / "tasks.jsonl"),
                            limit=cfg.label_prompts, model=cfg.model, k=cfg.k, temperature=cfg.temperature,
                            max_new_tokens=cfg.max_new_tokens, seed=cfg.seed, dtype=cfg.dtype)
    count = run_generate(config, progress=True)
    return {"tasks": count, "k": cfg.k, "file": config.out, "held_out_prompts": len(held_out)}


def _label(cfg: DemoConfig, out: Path, done: dict) -> dict:
    from tqdm import tqdm

    from labeling.simulate import simulate
    from labeling.stats import compute_stats
    from labeling.store import open_store
    from rlhf.jsonl import read_jsonl
    from rlhf.oracles import load_oracle
    from rlhf.records import Task

    db = out / "labels.db"
    for suffix in ("", "-wal", "-shm"):  # a half-done earlier attempt: start the store afresh
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    tasks = [Task.from_dict(obj) for _, obj in read_jsonl(out / "tasks.jsonl")]
    store = open_store(db)
    try:
        added, _ = store.import_tasks(tasks)
        with tqdm(total=added * cfg.overlap, desc="label (scripted annotators)", unit="ranking") as bar:
            summary = simulate(store, load_oracle(cfg.oracle), annotators=cfg.annotators, overlap=cfg.overlap,
                               noise=cfg.noise, seed=cfg.seed, on_progress=bar.update)
        stats = compute_stats(store, overlap=cfg.overlap)
    finally:
        store.close()
    return {"db": str(db), "imported": added, "simulate": summary, "stats": stats}


def _export(cfg: DemoConfig, out: Path, done: dict) -> dict:
    from labeling.export import export
    from labeling.store import open_store

    store = open_store(out / "labels.db", create=False)
    try:
        return export(store, out / "pairs", test_fraction=0.15, seed=cfg.seed)
    finally:
        store.close()


def _reward_model(cfg: DemoConfig, out: Path, done: dict) -> dict:
    from reward_model.train import train_reward_model

    config = RewardTrainingConfig(data=str(out / "pairs"), out=str(out / "rm"), model=cfg.model,
                                  epochs=cfg.rm_epochs, lr=cfg.rm_lr, seed=cfg.seed, dtype=cfg.dtype,
                                  max_length=384, resume=cfg.resume and has_checkpoint(out / "rm"))
    return train_reward_model(config)


def _policy(cfg: DemoConfig, out: Path, done: dict) -> dict:
    from policy.config import PPOConfig
    from policy.trainer import train_policy

    config = PPOConfig(prompts=str(out / "prompts_train.jsonl"), eval_prompts=str(out / "prompts_eval.jsonl"),
                       out=str(out / "ppo"), rm=str(out / "rm"), reward="rm", model=cfg.model,
                       steps=cfg.ppo_steps, batch_size=cfg.ppo_batch_size, response_length=cfg.max_new_tokens,
                       temperature=cfg.temperature, lr=cfg.ppo_lr, kl_coef=cfg.kl_coef, eval_every=cfg.eval_every,
                       eval_size=cfg.eval_prompts, oracle=cfg.oracle, seed=cfg.seed,
                       resume=cfg.resume and has_checkpoint(out / "ppo"),  # a crash mid-PPO
                       missing_eos_penalty=cfg.missing_eos_penalty, dtype=cfg.dtype,
                       checkpoint_every=max(1, cfg.eval_every))
    return train_policy(config)


def _dpo(cfg: DemoConfig, out: Path, done: dict) -> dict:
    from policy.dpo import DPOConfig, train_dpo

    # The same held-out prompts, sampling seed, length and temperature as PPO's evaluation, so the three
    # policies (SFT, RM + PPO, DPO) are compared on the same footing; the RM only scores the samples.
    config = DPOConfig(data=str(out / "pairs"), out=str(out / "dpo"), model=cfg.model,
                       eval_prompts=str(out / "prompts_eval.jsonl"), rm=str(out / "rm"), oracle=cfg.oracle,
                       beta=cfg.dpo_beta, lr=cfg.dpo_lr, epochs=cfg.dpo_epochs, seed=cfg.seed, max_length=384,
                       eval_size=cfg.eval_prompts, response_length=cfg.max_new_tokens, temperature=cfg.temperature,
                       dtype=cfg.dtype, resume=cfg.resume and has_checkpoint(out / "dpo"))  # a crash mid-DPO
    return train_dpo(config)


def _report(cfg: DemoConfig, out: Path, done: dict) -> dict:
    from pipeline.report import write_report

    return write_report(out, asdict(cfg), done)


STAGES = [
    Stage("generate", "1/7 generate: sample K completions per prompt from the SFT model", _generate),
    Stage("label", "2/7 label: import tasks, scripted annotators rank them", _label),
    Stage("export", "3/7 export: rankings -> C(K,2) preference pairs, split by prompt", _export),
    Stage("reward_model", "4/7 reward model: LoRA + score head, K-wise loss", _reward_model),
    Stage("policy", "5/7 policy: PPO against the reward model with a KL penalty", _policy),
    Stage("dpo", "6/7 policy: DPO directly on the rankings, K-wise", _dpo),
    Stage("report", "7/7 report: report.html and report.md", _report),
]


def run_demo(cfg: DemoConfig) -> dict:
    """Run (or resume) every stage; returns {stage: summary}."""
    cfg.check()
    out = Path(cfg.out)
    stages_dir = out / "stages"
    if out.exists() and any(out.iterdir()) and not cfg.resume:
        raise UserError(f"{out} already holds a run: add --resume to continue it, or choose another --out")
    stages_dir.mkdir(parents=True, exist_ok=True)
    done: dict[str, dict] = {}
    for stage in STAGES:
        marker = stages_dir / f"{stage.name}.json"
        earlier = finished_step(marker) if cfg.resume and stage.name != "report" else None
        if earlier is not None:
            done[stage.name] = earlier
            print(f"[demo] {stage.name}: done earlier, skipped (--resume)", flush=True)
            continue
        print(f"[demo] {stage.title}", flush=True)
        done[stage.name] = run_step(marker, f"stage '{stage.name}'", partial(stage.run, cfg, out, done))
        print(f"[demo] {stage.name} done in {done[stage.name]['seconds']:.0f} s", flush=True)
    return done


def add_commands(sub) -> None:
    from rlhf.config_args import add_config_arguments

    p = sub.add_parser("demo", help="run the whole pipeline end to end with scripted annotators and write a report",
                       description=__doc__.split("\n\n")[0] + " Writes OUT/report.html and OUT/report.md.")
    p.add_argument("--quick", action="store_true",
                   help="a small run of a few minutes (fewer prompts and steps); other flags still apply")
    p.add_argument("--online", action="store_true",
                   help="run the pipeline in rounds instead (`rlhf loop`): each round the scripted annotators rank the "
                        "current policy's samples, then the reward model and PPO continue (default --out "
                        "runs/demo-online)")
    add_config_arguments(p, DemoConfig)
    p.set_defaults(func=run_demo_command)


def run_demo_command(args) -> None:
    from rlhf.config_args import given_fields

    if args.online:
        from pipeline.loop import online_demo_config, run_loop_config

        run_loop_config(online_demo_config(given_fields(DemoConfig, args), quick=args.quick))
        return
    cfg = (DemoConfig.quick if args.quick else DemoConfig)(**given_fields(DemoConfig, args))
    start = time.perf_counter()
    done = run_demo(cfg)
    report = done["report"]
    print(f"[demo] finished in {time.perf_counter() - start:.0f} s: open {report['html']}")
