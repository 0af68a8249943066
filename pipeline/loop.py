"""`rlhf loop`: iterated online RLHF. Each round the current policy's own samples go to the annotators, and the
reward model and the policy learn from them (Bai et al. 2022, "iterated online RLHF"; InstructGPT collected its
comparisons on the current policies' samples too).

    round r:  sample    K completions per prompt from the current policy (round r-1's; the SFT model in round 1),
                        on prompts no earlier round used; optionally some of each task's K from the previous
                        round's policy or from the reference (`mix`)
              import    a new batch of tasks in the label store, ids `r<r>-...`, each completion's `model` naming
                        the policy that wrote it; a running `rlhf label` server on the store serves them at once
              label     scripted annotators rank them (`annotate simulate`), or the loop waits for people until
                        the round's budget is met, printing ranked / wanted per annotator (`annotate people`)
              rm-before round r-1's reward model judges the round's new rankings: how well it scored the samples
                        of the policy it trained
              reward-model  trained on every ranking so far (from round r-1's weights or afresh: `rm_init`)
              policy    PPO, GRPO, RLOO or DPO, continued from round r-1's weights against the new reward model;
                        the reference stays the SFT model, so the KL is always to it
              evaluate  on fixed held-out prompts: the oracle's score, KL, distinct-n, the reward model's score and,
                        with an oracle, its accuracy on the new policy's samples; a row of OUT/rounds.csv and the
                        report (OUT/report.html)

Every step writes its outputs under OUT/round-<r>/ and, when it succeeds, OUT/round-<r>/steps/<step>.json with its
summary; a rerun with --resume skips the steps that have that file, and a trainer killed mid-run continues from its
last checkpoint (`rlhf.run`). Rankings live in the label store, so none is lost by a kill.
"""

from __future__ import annotations

import json
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

from pipeline.steps import finished_step, run_step
from rlhf.config_args import check_fields
from rlhf.errors import UserError
from rlhf.hardware import DtypeName

PROMPTS_FILE = Path(__file__).resolve().parent.parent / "data" / "prompts.jsonl"
STEPS = ("sample", "import", "label", "rm-before", "reward-model", "policy", "evaluate")
SETTINGS = "loop.json"
ROUNDS_LOG = "rounds.csv"
REFERENCE_TAG = "reference"


@dataclass
class LoopConfig:
    """Settings of `rlhf loop`. The defaults follow the demo's (`rlhf demo`), split into rounds."""

    # data and models
    out: str = "runs/loop"
    """Run folder: one round-<r>/ folder per round (tasks, rankings, reward model, policy), rounds.csv, the report."""
    model: str = "default"
    """SFT model, also the reference of every round: 'default' (SmolLM2-135M-Instruct), a local folder or a HF id."""
    prompts: str = str(PROMPTS_FILE)
    """Prompt set. `eval_fraction` of it is held out for evaluation (`split_by_prompt`); each round labels the next
    `prompts_per_round` of the rest, in a seeded order, and the policy trains on all of the rest."""
    db: str | None = None
    """Label store (a SQLite file or a postgresql:// URL) that a running `rlhf label` server may share; default
    OUT/labels.db."""
    eval_fraction: float = 0.1
    """Share of the prompts held out for evaluation; never labeled, never trained on."""
    eval_prompts: int = 24
    """Most held-out prompts per evaluation (the same ones, sampled with the same seed, every round)."""
    # rounds and sampling
    rounds: int = 3
    """Rounds of sample -> label -> reward model -> policy."""
    prompts_per_round: int = 64
    """New prompts labeled per round (K completions each, one task per prompt)."""
    k: int = 4
    """Completions per task."""
    mix: Literal["none", "previous", "reference"] = "none"
    """Where `mix_k` of each task's K completions come from: "none" (all from the current policy), "previous"
    (the policy of the round before the current one; the SFT model in round 2) or "reference" (the SFT model)."""
    mix_k: int = 1
    """Completions per task from the `mix` source (0 < mix_k < k)."""
    max_new_tokens: int = 32
    """Completion length of the tasks, of the policy's rollouts and of the evaluation."""
    temperature: float = 0.7
    """Sampling temperature of the tasks, the rollouts and the evaluation."""
    # labeling
    annotate: Literal["simulate", "people"] = "simulate"
    """"simulate": scripted annotators rank each round's tasks with `oracle` (`rlhf simulate`); "people": the loop
    waits until people (in `rlhf label` on the same store) have ranked the round's budget."""
    rankings_per_round: int | None = None
    """The round's ranking budget; default: every task of the round at `overlap`."""
    order: Literal["fewest-rankings", "uncertainty", "information", "random"] = "information"
    """Order the scripted annotators (and `serve_port`'s app) take a round's tasks in, from round 2 on, when the
    last reward model orders them (`labeling.active`); round 1 has none and uses the store's order."""
    oracle: str | None = "descriptive"
    """The scripted annotators' preference, and the evaluation's true score (also with `annotate people`, where
    it only scores); 'off' without one."""
    annotators: int = 3
    """Scripted annotators."""
    overlap: int = 1
    """Rankings per task."""
    noise: float = 0.1
    """Scripted annotators' noise (labeling/simulate.py)."""
    poll_seconds: float = 10.0
    """`annotate people`: seconds between two looks at the store while waiting."""
    serve_port: int | None = None
    """`annotate people`: also serve the labeling app on this port of 127.0.0.1 from the loop itself, in `order`
    with each round's reward model (a separate `rlhf label` server serves the store's order)."""
    # reward model
    rm_init: Literal["previous", "fresh"] = "previous"
    """Start each round's reward model from the last round's weights, or train it afresh."""
    rm_epochs: int = 6
    """Reward-model epochs over all rankings so far, each round."""
    rm_lr: float = 3e-4
    """Reward-model learning rate of the LoRA weights (the score head's is 30x, RewardTrainingConfig)."""
    rm_test_fraction: float = 0.2
    """Share of each round's prompts whose rankings are held out from the reward model, to measure it."""
    # policy
    algo: Literal["ppo", "grpo", "rloo", "dpo"] = "ppo"
    """The policy's trainer: PPO, GRPO or RLOO against the reward model, or DPO on the round's rankings."""
    policy_steps: int = 8
    """PPO / GRPO / RLOO steps per round."""
    batch_size: int = 8
    """Rollouts per step."""
    policy_lr: float = 3e-4
    """The policy's learning rate (PPO / GRPO / RLOO; DPO takes `dpo_lr`)."""
    kl_coef: float | None = None
    """beta of the KL to the SFT model; default: the trainer's (PPOConfig.kl_coef)."""
    eval_every: int = 0
    """Evaluate PPO / GRPO / RLOO on the held-out prompts every N steps of a round too (0: at its start and end)."""
    dpo_lr: float = 1e-4
    """DPO's learning rate."""
    dpo_beta: float = 0.1
    """DPO's beta."""
    # run
    dtype: DtypeName = "auto"
    """The models' dtype. auto: bfloat16 where the device computes it natively, float32 elsewhere (rlhf.hardware)."""
    seed: int = 0
    """Seed of every step (each round's sampling and policy prompts derive from it)."""
    resume: bool = False
    """Continue the run in OUT: the finished steps are skipped, a trainer continues from its checkpoint."""

    def check(self) -> None:
        check_fields(self, positive=("eval_prompts", "rounds", "prompts_per_round", "k", "max_new_tokens",
                                     "annotators", "overlap", "rm_epochs", "policy_steps", "batch_size",
                                     "rankings_per_round"))
        if self.k < 2:
            raise UserError(f"--k must be at least 2 (a ranking needs two completions), got {self.k}")
        if self.mix != "none" and not 0 < self.mix_k < self.k:
            raise UserError(f"--mix-k must be between 1 and --k - 1 ({self.k - 1}), got {self.mix_k}")
        if not 0 < self.eval_fraction < 1:
            raise UserError(f"--eval-fraction must be in (0, 1), got {self.eval_fraction}")
        if not 0 <= self.rm_test_fraction < 1:
            raise UserError(f"--rm-test-fraction must be in [0, 1), got {self.rm_test_fraction}")
        if self.annotate == "simulate" and not self.oracle:
            raise UserError("--annotate simulate needs --oracle: the scripted annotators' preference")
        if self.overlap > self.annotators and self.annotate == "simulate":
            raise UserError(f"--overlap {self.overlap} needs at least {self.overlap} annotators")
        if self.rankings_per_round and self.rankings_per_round > self.prompts_per_round * self.overlap:
            raise UserError(f"--rankings-per-round {self.rankings_per_round} is more than a round's tasks can take "
                            f"(--prompts-per-round {self.prompts_per_round} x --overlap {self.overlap})")
        if self.poll_seconds <= 0:
            raise UserError("--poll-seconds must be > 0")



# ---- `rlhf demo --online` ----

DEMO_ONLINE = dict(out="runs/demo-online", rounds=3, prompts_per_round=64, policy_steps=4, rm_epochs=3)
"""The online demo: the demo's ~200 labeled prompts in 3 rounds, 4 PPO steps a round, 3 reward-model epochs a
round (each round's model starts from the last one's), within the demo's time (docs/benchmarks.md, "The online
demo")."""
DEMO_ONLINE_QUICK = dict(DEMO_ONLINE, rounds=2, prompts_per_round=8, eval_prompts=8, max_new_tokens=24, rm_epochs=1,
                         policy_steps=2)
# The demo's flags that mean the same in the loop, under the loop's name.
DEMO_FLAGS = {"out": "out", "model": "model", "prompts": "prompts", "eval_fraction": "eval_fraction",
              "eval_prompts": "eval_prompts", "k": "k", "max_new_tokens": "max_new_tokens",
              "temperature": "temperature", "oracle": "oracle", "annotators": "annotators", "overlap": "overlap",
              "noise": "noise", "rm_epochs": "rm_epochs", "rm_lr": "rm_lr", "dtype": "dtype", "seed": "seed",
              "resume": "resume", "kl_coef": "kl_coef", "ppo_lr": "policy_lr", "ppo_batch_size": "batch_size"}


def online_demo_config(given: dict[str, Any], quick: bool = False) -> LoopConfig:
    """The LoopConfig of `rlhf demo --online` from the demo flags given: the preset, the shared flags under their
    loop names, `--label-prompts` spread over the rounds and `--ppo-steps` as the steps of each round."""
    settings = dict(DEMO_ONLINE_QUICK if quick else DEMO_ONLINE)
    settings.update({DEMO_FLAGS[key]: value for key, value in given.items() if key in DEMO_FLAGS})
    if "label_prompts" in given:
        settings["prompts_per_round"] = -(-given["label_prompts"] // settings["rounds"])
    if "ppo_steps" in given:
        settings["policy_steps"] = given["ppo_steps"]
    ignored = sorted(set(given) - set(DEMO_FLAGS) - {"label_prompts", "ppo_steps"})
    if ignored:
        raise UserError(f"--online runs no DPO stage and evaluates once a round: "
                        f"{', '.join('--' + k.replace('_', '-') for k in ignored)} do not apply")
    return LoopConfig(**settings)


# ---- the run folder ----

def round_dir(out: Path, r: int) -> Path:
    return out / f"round-{r}"


def policy_dir(out: Path, r: int) -> Path | None:
    """The policy of round r (None for round 0: the SFT model)."""
    return round_dir(out, r) / "policy" / "policy" if r > 0 else None


def rm_dir(out: Path, r: int) -> Path | None:
    return round_dir(out, r) / "rm" if r > 0 else None


def task_prefix(r: int) -> str:
    """The id prefix of round r's tasks: the round's tag in the store."""
    return f"r{r}-"


def round_of(task_id: str) -> int | None:
    """The round a task id was made in (None: not a loop task)."""
    head = task_id.split("-", 1)[0]
    return int(head[1:]) if head[:1] == "r" and head[1:].isdigit() else None


def policy_tag(r: int) -> str:
    """What a completion's `model` says about the policy that wrote it: round r's policy, or the reference."""
    return f"round-{r}/policy" if r > 0 else REFERENCE_TAG


def mix_source(r: int, mix: str) -> int | None:
    """The round whose policy writes the `mix` share of round r's tasks (0: the SFT model), or None when all K come
    from the current policy, round r-1's: with mix "none", and in round 1, where the SFT model is the only one."""
    source = {"previous": max(r - 2, 0), "reference": 0}.get(mix)
    return None if source is None or source == r - 1 else source


# ---- the steps ----

class Loop:
    """One run of `rlhf loop`; `run()` does every step not done yet. `after_step(round, step)` is called after each
    step's summary is stored (the tests interrupt the run there)."""

    def __init__(self, cfg: LoopConfig, after_step: Callable[[int, str], None] | None = None,
                 sleep: Callable[[float], None] = time.sleep, queue=None):
        self.cfg, self.out, self.after_step, self.sleep = cfg, Path(cfg.out), after_step, sleep
        self.db = cfg.db or str(self.out / "labels.db")
        self.queue = queue  # the ActiveQueue the loop re-orders each round (its app's, or the scripted annotators')

    # -- set-up

    def prepare(self) -> None:
        """The held-out split and the labeling order of the prompts, written once; the settings checked against
        the run's on --resume."""
        from rlhf.jsonl import write_jsonl
        from rlhf.prompts import read_prompts, split_by_prompt

        cfg, out = self.cfg, self.out
        # what a resumed run must share with the run: not its folder (it may move), nor how long it goes on or
        # how it waits
        settings = {k: v for k, v in asdict(cfg).items()
                    if k not in ("out", "resume", "rounds", "poll_seconds", "serve_port")}
        saved = out / SETTINGS
        if cfg.resume:
            if not saved.is_file():
                raise UserError(f"--resume: {out} holds no loop run ({SETTINGS} is missing); run without --resume")
            before = json.loads(saved.read_text())
            for key, value in settings.items():
                if before.get(key) != value:
                    raise UserError(f"--resume: --{key.replace('_', '-')} was {before.get(key)!r} in this run, "
                                    f"now {value!r}; use the run's settings or another --out")
            return
        if out.exists() and any(out.iterdir()):
            raise UserError(f"{out} already holds a run: add --resume to continue it, or choose another --out")
        prompts = [p for _, p in read_prompts(cfg.prompts)]
        held_out = split_by_prompt(prompts, cfg.eval_fraction, cfg.seed)
        train = list(dict.fromkeys(p for p in prompts if p not in held_out))
        random.Random(f"{cfg.seed}\x00label-order").shuffle(train)
        if len(train) < cfg.prompts_per_round:
            raise UserError(f"{cfg.prompts}: {len(train)} prompts outside the held-out set, fewer than one round's "
                            f"--prompts-per-round {cfg.prompts_per_round}")
        out.mkdir(parents=True, exist_ok=True)
        write_jsonl(out / "prompts_train.jsonl", ({"prompt": p} for p in train))
        write_jsonl(out / "prompts_eval.jsonl", ({"prompt": p} for p in prompts if p in held_out))
        saved.write_text(json.dumps(settings, indent=2) + "\n")

    def round_prompts(self, r: int) -> list[str]:
        """Round r's new prompts: the next `prompts_per_round` of the labeling order."""
        from rlhf.jsonl import read_jsonl

        train = [obj["prompt"] for _, obj in read_jsonl(self.out / "prompts_train.jsonl")]
        chunk = train[(r - 1) * self.cfg.prompts_per_round:r * self.cfg.prompts_per_round]
        if len(chunk) < self.cfg.prompts_per_round:
            raise UserError(f"round {r}: only {len(chunk)} unused prompts are left in {self.cfg.prompts} "
                            f"({len(train)} outside the held-out set, {self.cfg.prompts_per_round} per round); "
                            "lower --rounds or --prompts-per-round")
        return chunk

    def open_store(self, create: bool = True):
        from labeling.store import open_store

        return open_store(self.db, create=create)

    # -- 1. sample

    def sample(self, r: int) -> dict:
        """Round r's tasks, from round r-1's policy (and the `mix` source), written to round-<r>/tasks.jsonl."""
        import torch

        from labeling.generate import generate_tasks
        from policy.roles import build_roles
        from rlhf.generation import SamplingParams
        from rlhf.hardware import setup_compute
        from rlhf.jsonl import write_jsonl
        from rlhf.records import Completion, Task
        from rlhf.seeds import LOOP_ROUND, derived_seed

        cfg, out = self.cfg, self.out
        prompts = [(None, p) for p in self.round_prompts(r)]
        dtype = setup_compute(cfg.dtype)
        mixed = mix_source(r, cfg.mix)
        params = SamplingParams(cfg.temperature, 1.0, cfg.max_new_tokens)
        seed = derived_seed(cfg.seed, r, LOOP_ROUND)

        def draw(source: int, k: int, salt: int) -> list[Task]:
            """K completions per prompt from round `source`'s policy (0: the reference)."""
            roles, tokenizer = build_roles(cfg.model, None, dtype=getattr(torch, dtype), critic=False,
                                           init_actor=str(policy_dir(out, source)) if source > 0 else None,
                                           **self.lora())
            with roles.actor() if source > 0 else roles.reference:
                return list(generate_tasks(roles.model, tokenizer, prompts, k, params, model_name=policy_tag(source),
                                           seed=seed + salt, batch_size=64))

        main_k = cfg.k - (cfg.mix_k if mixed is not None else 0)
        drawn = [draw(r - 1, max(main_k, 2), 0)]
        if mixed is not None:
            drawn.append(draw(mixed, max(cfg.mix_k, 2), 1))
        tasks = []
        for parts in zip(*drawn):
            completions = [*parts[0].completions[:main_k], *(parts[1].completions[:cfg.mix_k] if mixed is not None
                                                             else ())]
            task_id = task_prefix(r) + parts[0].id
            # U+FFFD for a NUL: the label store cannot hold one (PostgreSQL's text), and a sampler can write it
            tasks.append(Task(task_id, parts[0].prompt, tuple(
                Completion(f"{task_id}-{i}", c.text.replace("\x00", "\ufffd"), c.model, c.num_tokens)
                for i, c in enumerate(completions))))
        count = write_jsonl(round_dir(out, r) / "tasks.jsonl", (t.to_dict() for t in tasks))
        sources = Counter(c.model for t in tasks for c in t.completions)
        return {"tasks": count, "k": cfg.k, "completions_by_policy": dict(sources)}

    def lora(self) -> dict:
        from policy.config import PPOConfig

        return {"lora_r": PPOConfig.lora_r, "lora_alpha": PPOConfig.lora_alpha}

    # -- 2. import

    def import_tasks(self, r: int) -> dict:
        from rlhf.jsonl import read_jsonl
        from rlhf.records import Task

        tasks = [Task.from_dict(obj) for _, obj in read_jsonl(round_dir(self.out, r) / "tasks.jsonl")]
        with self.open_store() as store:
            added, skipped = store.import_tasks(tasks)
            if self.queue is not None:
                self.order_round(self.queue, store, r)
        return {"added": added, "already_stored": skipped, "db": self.db}

    def order_round(self, queue, store, r: int) -> None:
        """Put round r's open tasks first in `queue`, in its order by round r-1's reward model (round 1 has none:
        unscored, in the queue's random order)."""
        from labeling.active import SCORED_ORDERS, information_order, open_tasks_of, score_tasks

        tasks = [t for t in open_tasks_of(store, self.cfg.overlap) if round_of(t.id) == r]
        if r == 1 or queue.order not in SCORED_ORDERS:
            queue.update({}, [t.id for t in tasks])
            return
        from reward_model.model import load_reward_model

        rm, tokenizer = load_reward_model(rm_dir(self.out, r - 1), dtype=self.cfg.dtype)
        if queue.order == "information":
            scores, order = information_order(rm, tokenizer, tasks, store.export_ranked_tasks())
            queue.update(scores, informative_first=order)
        else:
            queue.update(score_tasks(rm, tokenizer, tasks))

    # -- 3. label

    def wanted(self, r: int) -> int:
        tasks = sum(1 for _ in open(round_dir(self.out, r) / "tasks.jsonl", encoding="utf-8"))
        return self.cfg.rankings_per_round or tasks * self.cfg.overlap

    def round_rankings(self, store, r: int) -> list:
        return [t for t in store.export_ranked_tasks() if round_of(t.task_id) == r]

    def label(self, r: int) -> dict:
        from rlhf.jsonl import write_jsonl

        wanted = self.wanted(r)
        with self.open_store() as store:
            if self.cfg.annotate == "simulate":
                summary = self.simulate(store, r, wanted)
            else:
                summary = self.wait_for_people(store, r, wanted)
            ranked = self.round_rankings(store, r)
        count = write_jsonl(round_dir(self.out, r) / "rankings.jsonl", (t.to_dict() for t in ranked))
        return {**summary, "rankings": count, "wanted": wanted,
                "by_annotator": dict(Counter(t.annotator for t in ranked))}

    def simulate(self, store, r: int, wanted: int) -> dict:
        from labeling.active import SCORED_ORDERS, ActiveQueue
        from labeling.simulate import simulate
        from rlhf.oracles import load_oracle

        cfg = self.cfg
        # the round's tasks first: in the reward model's order where it orders them, else in a seeded random order
        queue = ActiveQueue(cfg.order if r > 1 and cfg.order in SCORED_ORDERS else "random", seed=cfg.seed + r)
        self.order_round(queue, store, r)
        done = len(self.round_rankings(store, r))  # a rerun after a kill mid-round keeps what was ranked

        def serve(annotator: str, overlap: int):
            while done + stored[0] < wanted:
                task = queue.next_task(store, annotator, overlap)
                if task is None or round_of(task.id) == r:
                    return task
                # another round's open task (the store's order serves it once the round's are taken): not ours
                store.skip_task(annotator, task.id, reason="not in the loop's current round")
            return None

        stored = [0]

        def count(n: int) -> None:
            stored[0] = n

        summary = simulate(store, load_oracle(cfg.oracle), annotators=cfg.annotators, overlap=cfg.overlap,
                           noise=cfg.noise, seed=cfg.seed * 1000 + r, next_task=serve, after_ranking=count)
        return {"simulated": summary["rankings"], "skipped": summary["skipped"],
                "oracle_agreement": summary["oracle_agreement"]}

    def wait_for_people(self, store, r: int, wanted: int) -> dict:
        """Poll the store until round r holds `wanted` rankings, printing ranked / wanted per annotator."""
        started, last = time.time(), None
        while True:
            ranked = self.round_rankings(store, r)
            per = Counter(t.annotator for t in ranked)
            line = (f"[loop] round {r}: {len(ranked)}/{wanted} ranked"
                    + (" (" + ", ".join(f"{a} {n}" for a, n in sorted(per.items())) + ")" if per else ""))
            if line != last:
                print(line, flush=True)
                last = line
            if len(ranked) >= wanted:
                return {"waited_seconds": round(time.time() - started, 1)}
            self.sleep(self.cfg.poll_seconds)

    # -- 4. the last reward model on the new rankings

    def held_out_split(self, r: int) -> set[str]:
        """The prompts of round r whose rankings the reward model never trains on."""
        from rlhf.prompts import split_by_prompt

        if not self.cfg.rm_test_fraction:
            return set()
        return split_by_prompt(self.round_prompts(r), self.cfg.rm_test_fraction, self.cfg.seed + r)

    def rankings_of(self, r: int, held_out: bool | None = None) -> list[dict]:
        from rlhf.jsonl import read_jsonl

        rows = [obj for _, obj in read_jsonl(round_dir(self.out, r) / "rankings.jsonl")]
        if held_out is None:
            return rows
        test = self.held_out_split(r)
        return [row for row in rows if (row["prompt"] in test) == held_out]

    def rm_accuracy(self, rm_path: Path, records: list[dict]) -> dict:
        from reward_model.evaluate import evaluate_reward_model
        from reward_model.model import load_reward_model

        if not records:
            return {"pairs": 0, "accuracy": None}
        rm, tokenizer = load_reward_model(rm_path, dtype=self.cfg.dtype)
        result = evaluate_reward_model(rm, tokenizer, records)
        return {key: result.get(key) for key in ("pairs", "prompts", "accuracy", "accuracy_interval", "mean_margin")}

    def rm_before(self, r: int) -> dict:
        if r == 1:
            return {"all": None, "held_out": None}
        previous = rm_dir(self.out, r - 1)
        return {"all": self.rm_accuracy(previous, self.rankings_of(r)),
                "held_out": self.rm_accuracy(previous, self.rankings_of(r, held_out=True))}

    # -- 5. the reward model

    def reward_model(self, r: int) -> dict:
        from reward_model.config import RewardTrainingConfig
        from reward_model.train import train_reward_model
        from rlhf.jsonl import write_jsonl
        from rlhf.run import has_checkpoint

        folder = round_dir(self.out, r)
        # every ranking in the store now: also those people added to earlier rounds after their budget was met, and
        # any the store held before the loop (trained on; each round holds its own prompts' share out)
        held_out = {past: self.held_out_split(past) for past in range(1, r + 1)}
        with self.open_store() as store:
            rows = [{**t.to_dict(), "split": "test" if t.prompt in held_out.get(round_of(t.task_id), ()) else "train"}
                    for t in store.export_ranked_tasks() if (round_of(t.task_id) or 0) <= r]
        write_jsonl(folder / "rm_data" / "rankings.jsonl", rows)
        if not any(row["split"] == "train" for row in rows):
            raise UserError(f"no ranking so far is of a prompt the reward model may train on ({len(rows)} rankings in "
                            "all, their prompts held out by --rm-test-fraction; tasks whose completions all tie are "
                            "skipped): rank more tasks a round (--prompts-per-round, --rankings-per-round)")
        out = folder / "rm"
        resume = has_checkpoint(out)
        init = rm_dir(self.out, r - 1) if self.cfg.rm_init == "previous" else None
        config = RewardTrainingConfig(data=str(folder / "rm_data"), out=str(out), model=self.cfg.model,
                                      init_rm=str(init) if init else None, epochs=self.cfg.rm_epochs,
                                      lr=self.cfg.rm_lr, seed=self.cfg.seed, dtype=self.cfg.dtype, max_length=384,
                                      checkpoint_every=10, resume=resume)
        summary = train_reward_model(config, progress=False)
        after = self.rm_accuracy(out, self.rankings_of(r, held_out=True))
        return {"train_rankings": summary.get("train_rankings"), "test_accuracy": summary.get("test_accuracy"),
                "held_out_new": after, "seconds": summary.get("seconds")}

    # -- 6. the policy

    def policy(self, r: int) -> dict:
        from rlhf.jsonl import read_jsonl, write_jsonl
        from rlhf.run import has_checkpoint

        cfg, folder = self.cfg, round_dir(self.out, r)
        out = folder / "policy"
        resume = has_checkpoint(out)
        if out.exists() and not resume:  # a kill before the first checkpoint: start the round's policy afresh
            import shutil

            shutil.rmtree(out)
        previous = policy_dir(self.out, r - 1)
        init = str(previous) if previous else None
        if cfg.algo == "dpo":
            from policy.dpo import DPOConfig, train_dpo

            rows = [{**row, "split": "test" if row["prompt"] in self.held_out_split(r) else "train"}
                    for row in self.rankings_of(r)]
            write_jsonl(folder / "dpo_data" / "rankings.jsonl", rows)
            config = DPOConfig(data=str(folder / "dpo_data"), out=str(out), model=cfg.model, init_policy=init,
                               eval_prompts=str(self.out / "prompts_eval.jsonl"), rm=str(rm_dir(self.out, r)),
                               oracle=cfg.oracle, beta=cfg.dpo_beta, lr=cfg.dpo_lr, seed=cfg.seed, max_length=384,
                               eval_size=cfg.eval_prompts, response_length=cfg.max_new_tokens,
                               temperature=cfg.temperature, dtype=cfg.dtype, checkpoint_every=10, resume=resume,
                               **self.lora())
            summary = train_dpo(config, progress=False)
        else:
            from policy.config import PPOConfig
            from policy.trainer import train_policy

            # The whole training pool in a round's own order: the trainer's seed (and so its held-out samples)
            # stays the same every round, which makes the rounds' evaluations paired.
            pool = [obj["prompt"] for _, obj in read_jsonl(self.out / "prompts_train.jsonl")]
            random.Random(f"{cfg.seed}\x00policy-prompts\x00{r}").shuffle(pool)
            write_jsonl(folder / "policy_prompts.jsonl", ({"prompt": p} for p in pool))
            extra = {"kl_coef": cfg.kl_coef} if cfg.kl_coef is not None else {}
            config = PPOConfig(prompts=str(folder / "policy_prompts.jsonl"),
                               eval_prompts=str(self.out / "prompts_eval.jsonl"), out=str(out),
                               rm=str(rm_dir(self.out, r)), reward="rm", model=cfg.model, algo=cfg.algo,
                               init_policy=init, steps=cfg.policy_steps, batch_size=cfg.batch_size,
                               response_length=cfg.max_new_tokens, temperature=cfg.temperature, lr=cfg.policy_lr,
                               eval_every=cfg.eval_every, eval_size=cfg.eval_prompts, oracle=cfg.oracle, seed=cfg.seed,
                               dtype=cfg.dtype, checkpoint_every=2, resume=resume, **self.lora(), **extra)
            summary = train_policy(config)
        return {"final": summary.get("final"), "reference": summary.get("reference"), "policy": summary["policy"],
                "samples": summary["samples"]}

    # -- 7. evaluate

    def evaluate(self, r: int, done: dict[str, dict]) -> dict:
        from rlhf.runlog import RunLog

        final, reference = done["policy"].get("final") or {}, done["policy"].get("reference") or {}
        before, rm = done["rm-before"], done["reward-model"]
        on_policy = self.rm_on_policy_samples(r) if self.cfg.oracle else None
        row = {
            "step": r,
            "rankings": done["label"]["rankings"],
            "rankings_total": rm.get("train_rankings"),
            "rm_acc_before_new": _get(before, "all", "accuracy"),
            "rm_acc_before_held_out": _get(before, "held_out", "accuracy"),
            "rm_acc_after_held_out": _get(rm, "held_out_new", "accuracy"),
            "rm_acc_policy_samples": _get(on_policy, "accuracy"),
            "rm_score": final.get("objective/rm_score"),
            "kl": final.get("objective/kl"),
            "oracle": final.get("objective/oracle"),
            "oracle_sft": reference.get("objective/oracle"),
            "distinct_1": final.get("eval/distinct_1"),
            "distinct_2": final.get("eval/distinct_2"),
        }
        log = RunLog(self.out / ROUNDS_LOG, resume_step=r - 1)  # a redone round replaces its row
        log.append(row)
        return {"row": row, "rm_on_policy_samples": on_policy}

    def rm_on_policy_samples(self, r: int) -> dict:
        """The new reward model's accuracy on K samples per held-out prompt from the new policy, ranked by the
        oracle without noise: how well it judges where the policy now is."""
        import torch

        from labeling.generate import generate_tasks
        from labeling.simulate import oracle_scores, sample_ranks
        from policy.roles import build_roles
        from rlhf.generation import SamplingParams
        from rlhf.hardware import setup_compute
        from rlhf.jsonl import read_jsonl
        from rlhf.oracles import load_oracle
        from rlhf.records import RankedCompletion, RankedTask
        from rlhf.seeds import EVAL_SAMPLES, LOOP_ROUND, derived_seed

        cfg = self.cfg
        prompts = [(None, obj["prompt"]) for _, obj in read_jsonl(self.out / "prompts_eval.jsonl")][:cfg.eval_prompts]
        dtype = setup_compute(cfg.dtype)
        roles, tokenizer = build_roles(cfg.model, None, dtype=getattr(torch, dtype), critic=False,
                                       init_actor=str(policy_dir(self.out, r)), **self.lora())
        tasks = generate_tasks(roles.model, tokenizer, prompts, cfg.k,
                               SamplingParams(cfg.temperature, 1.0, cfg.max_new_tokens), model_name=policy_tag(r),
                               seed=derived_seed(cfg.seed, EVAL_SAMPLES, LOOP_ROUND))
        oracle, rng, records = load_oracle(cfg.oracle), random.Random(0), []
        for task in tasks:
            ranks = sample_ranks(oracle_scores(oracle, task), 0.0, 0.0, rng)
            if len(set(ranks)) > 1:
                records.append(RankedTask(task.id, "oracle", task.prompt, tuple(
                    RankedCompletion(c.id, c.text, rank) for c, rank in zip(task.completions, ranks))))
        del roles
        return self.rm_accuracy(rm_dir(self.out, r), records)

    # -- the run

    def run(self) -> dict[int, dict[str, dict]]:
        self.cfg.check()
        self.prepare()
        return self.run_rounds()

    def run_rounds(self) -> dict[int, dict[str, dict]]:
        cfg = self.cfg
        rounds: dict[int, dict[str, dict]] = {}
        for r in range(1, cfg.rounds + 1):
            done: dict[str, dict] = {}
            steps_dir = round_dir(self.out, r) / "steps"
            steps_dir.mkdir(parents=True, exist_ok=True)
            for step in STEPS:
                marker = steps_dir / f"{step}.json"
                earlier = finished_step(marker)
                if earlier is not None:
                    done[step] = earlier
                    continue
                print(f"[loop] round {r}/{cfg.rounds}: {step}", flush=True)
                done[step] = run_step(marker, f"round {r}, step '{step}'",
                                      partial(self.run_step, r, step, done))
                if step == "evaluate":
                    self.write_report()
                if self.after_step is not None:
                    self.after_step(r, step)
            rounds[r] = done
            row = done["evaluate"]["row"]
            print(f"[loop] round {r} done: {row['rankings']} rankings, oracle {_fmt(row['oracle'])} "
                  f"(SFT {_fmt(row['oracle_sft'])}), KL {_fmt(row['kl'])}, RM accuracy on the new rankings "
                  f"before retraining {_fmt(row['rm_acc_before_new'])}", flush=True)
        self.write_report()
        return rounds

    def run_step(self, r: int, step: str, done: dict[str, dict]) -> dict:
        if step == "sample":
            return self.sample(r)
        if step == "import":
            return self.import_tasks(r)
        if step == "label":
            return self.label(r)
        if step == "rm-before":
            return self.rm_before(r)
        if step == "reward-model":
            return self.reward_model(r)
        if step == "policy":
            return self.policy(r)
        return self.evaluate(r, done)

    def write_report(self) -> dict:
        from pipeline.loop_report import write_loop_report

        return write_loop_report(self.out, asdict(self.cfg))


def _get(summary: dict | None, *keys: str):
    for key in keys:
        if not isinstance(summary, dict):
            return None
        summary = summary.get(key)
    return summary


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def run_loop(cfg: LoopConfig, after_step: Callable[[int, str], None] | None = None) -> dict[int, dict[str, dict]]:
    """Run (or resume) the loop; with `serve_port`, the labeling app is served from this process meanwhile."""
    loop = Loop(cfg, after_step)
    if cfg.annotate != "people" or cfg.serve_port is None:
        return loop.run()
    cfg.check()
    loop.prepare()
    return serve_while(loop)


def serve_while(loop: Loop) -> dict[int, dict[str, dict]]:
    """Serve the labeling app on 127.0.0.1:`serve_port` in a thread, its queue in `order`, while the loop's
    rounds run: each round's import puts the new tasks first in that queue, ordered by the last reward model."""
    import threading

    from labeling.active import ActiveQueue
    from labeling.handlers import AppSettings
    from labeling.serve import bind_socket, make_server

    cfg = loop.cfg
    loop.queue = ActiveQueue(cfg.order, seed=cfg.seed)
    sock = bind_socket("127.0.0.1", cfg.serve_port)
    store = loop.open_store()
    server = make_server(store, AppSettings(overlap=cfg.overlap, active=loop.queue))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    print(f"[loop] labeling app: http://127.0.0.1:{sock.getsockname()[1]}/ (store {loop.db})", flush=True)
    try:
        return loop.run_rounds()
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
        store.close()


def add_commands(sub) -> None:
    from rlhf.config_args import add_config_arguments

    p = sub.add_parser("loop", help="iterated online RLHF: rounds of sample -> label -> reward model -> policy",
                       description=__doc__.split("\n\n")[0] + " Writes OUT/round-<r>/, OUT/rounds.csv and "
                                                              "OUT/report.html.")
    add_config_arguments(p, LoopConfig)
    p.set_defaults(func=run_loop_command)


def run_loop_command(args) -> None:
    from rlhf.config_args import config_from_args

    run_loop_config(config_from_args(LoopConfig, args))


def run_loop_config(cfg: LoopConfig) -> None:
    """Run the loop and say where its report is (the commands `rlhf loop` and `rlhf demo --online`)."""
    start = time.perf_counter()
    run_loop(cfg)
    print(f"[loop] finished in {time.perf_counter() - start:.0f} s: open {Path(cfg.out) / 'report.html'}")
