"""The labeling stage's subcommands: generate, import, users, label, simulate, export, stats.

Handlers are plain functions of the parsed arguments; bad input raises UserError. Heavy imports
(pyarrow, tqdm) happen inside the handlers so `rlhf --help` stays fast.
"""

from __future__ import annotations

import argparse
import json
import sys

from rlhf.config_args import positive_int
from rlhf.errors import UserError


def _db_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--db", required=True, help="label store: a SQLite file path (or sqlite:///path)")


def add_commands(sub) -> None:
    from labeling.generate import GenerateConfig
    from rlhf.config_args import add_config_arguments

    p = sub.add_parser("generate", help="sample K completions per prompt from the SFT model into labeling tasks",
                       description="Sample K completions per prompt (batched, KV cache) and write one labeling "
                                   "task per prompt to a JSONL file that `rlhf import` reads.")
    add_config_arguments(p, GenerateConfig)
    p.set_defaults(func=run_generate)

    p = sub.add_parser("import", help="load labeling tasks (JSONL from `rlhf generate`) into the label store",
                       description="Load tasks into the label store. Every file is checked first; a malformed "
                                   "line is reported as FILE:LINE and then nothing is imported. Tasks already "
                                   "stored with the same content are skipped.")
    _db_option(p)
    p.add_argument("files", nargs="+", metavar="TASKS.jsonl", help="task files, one task per line")
    p.set_defaults(func=run_import)

    p = sub.add_parser("users", help="manage annotator accounts", description="Add or list annotator accounts.")
    users = p.add_subparsers(dest="users_command", required=True, metavar="ACTION")
    q = users.add_parser("add", help="add an annotator (password from a prompt, or the first line of stdin)",
                         description="Add an annotator. The password is read with an interactive prompt, or "
                                     "from the first line of stdin when stdin is not a terminal.")
    _db_option(q)
    q.add_argument("name", help="annotator name: 1-64 letters, digits, '.', '_' or '-'")
    q.set_defaults(func=run_users_add)
    q = users.add_parser("list", help="list annotators with their ranked/skipped counts")
    _db_option(q)
    q.set_defaults(func=run_users_list)

    p = sub.add_parser("label", help="serve the ranking app to annotators (login required)",
                       description="Serve the annotators' Gradio app at /: each signed-in annotator ranks the "
                                   "completions of the tasks in their queue (keyboard, click or drag-and-drop), "
                                   "ties, skips, and edits earlier answers. The same server answers a JSON API "
                                   "under /api (same login).")
    p.add_argument("--db", required=True, help="label database (SQLite) made by `rlhf import`")
    p.add_argument("--host", default="127.0.0.1",
                   help="interface to listen on (default 127.0.0.1, this machine only; 0.0.0.0 for your network)")
    p.add_argument("--port", type=int, default=7860, help="TCP port (default 7860; 0 picks a free one)")
    p.add_argument("--overlap", type=int, default=2,
                   help="annotators who should rank each task before it leaves the queues (default 2)")
    p.add_argument("--guidelines", default=None, help="Markdown file shown to annotators in the Guidelines panel")
    p.add_argument("--admin", action="append", default=[], metavar="NAME",
                   help="annotator allowed to see the statistics view (repeatable)")
    p.set_defaults(func=run_label)

    p = sub.add_parser("simulate", help="rank pending tasks with scripted annotators driven by an oracle",
                       description="Scripted annotators sim-1..sim-N rank pending tasks through the same store "
                                   "API as the app, until the queue is empty. Rankings are Plackett-Luce samples "
                                   "from the oracle's scores at temperature NOISE x (the task's score range).")
    _db_option(p)
    p.add_argument("--oracle", required=True,
                   help="preference oracle: sentiment, descriptive, on_topic, formality, length, alliteration "
                        "(see rlhf/oracles.py), or module:function taking (prompt, completion)")
    p.add_argument("--annotators", type=positive_int, default=3, help="number of scripted annotators (default 3)")
    p.add_argument("--overlap", type=positive_int, default=2, help="rankings wanted per task (default 2)")
    p.add_argument("--noise", type=float, default=0.1,
                   help="sampling temperature relative to each task's score range; 0 = always sort by score "
                        "(default 0.1: best above worst with probability sigmoid(1/0.1))")
    p.add_argument("--tie-margin", type=float, default=0.0,
                   help="completions whose oracle scores differ by at most this are ranked as a tie "
                        "(default 0: only equal scores tie; set it for continuous oracles)")
    p.add_argument("--seed", type=int, default=0, help="random seed; the same seed reproduces a run")
    p.set_defaults(func=run_simulate)

    p = sub.add_parser("export", help="write rankings and train/test preference pairs (JSONL + Parquet)",
                       description="Write DIR/rankings.jsonl (with a split field), DIR/train.jsonl, DIR/test.jsonl "
                                   "and their Parquet twins. The split is by prompt: no prompt is in both.")
    _db_option(p)
    p.add_argument("--out", required=True, help="output folder (created if missing)")
    p.add_argument("--test-fraction", type=float, default=0.1, help="fraction of prompts held out (default 0.1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompt split")
    p.add_argument("--aggregate", choices=["none", "majority"], default="none",
                   help="none: every annotator's pairs (default); majority: one pair per completion pair by "
                        "majority vote, dropping tied votes")
    p.set_defaults(func=run_export)

    p = sub.add_parser("stats", help="labeling progress, annotator throughput and inter-annotator agreement")
    _db_option(p)
    p.add_argument("--overlap", type=positive_int, default=2,
                   help="rankings wanted per task, for the 'complete' count (default 2)")
    p.add_argument("--json", action="store_true", help="print the statistics as JSON")
    p.set_defaults(func=run_stats)


def run_generate(args) -> None:
    from labeling.generate import GenerateConfig
    from labeling.generate import run_generate as generate
    from rlhf.config_args import config_from_args

    config = config_from_args(GenerateConfig, args)
    count = generate(config)
    print(f"wrote {count} tasks x {config.k} completions to {config.out}")


def read_task_files(paths: list[str]) -> list:
    """Parse every task file fully; a bad line raises UserError 'FILE:LINE: reason' (a blank completion is
    one: there is nothing to rank). A task id repeated with different content is an error naming both
    places; an exact repeat is kept once."""
    from rlhf.jsonl import read_jsonl
    from rlhf.records import Task

    tasks: list[Task] = []
    seen: dict[str, tuple[Task, str]] = {}
    for path in paths:
        for line_no, obj in read_jsonl(path):
            try:
                task = Task.from_dict(obj)
            except ValueError as exc:
                raise UserError(f"{path}:{line_no}: {exc}") from None
            blank = next((c.id for c in task.completions if not c.text.strip()), None)
            if blank is not None:
                raise UserError(f"{path}:{line_no}: completion {blank!r} is blank (nothing to rank)")
            where = f"{path}:{line_no}"
            if task.id in seen:
                if seen[task.id][0] != task:
                    raise UserError(f"{where}: task id {task.id!r} repeats with different content "
                                    f"(first at {seen[task.id][1]})")
                continue
            seen[task.id] = (task, where)
            tasks.append(task)
    return tasks


def run_import(args) -> None:
    from pathlib import Path

    from labeling.store import open_store

    tasks = read_task_files(args.files)  # all files validated before anything is written
    db = str(args.db)
    path = Path(db[len("sqlite:///"):] if db.startswith("sqlite:///") else db)
    created = "://" not in str(path) and not path.exists()
    try:
        with open_store(args.db) as store:
            added, skipped = store.import_tasks(tasks)
            total = store.count_tasks()
    except BaseException:
        if created:  # a failed import leaves no empty database behind (it would look like a finished one)
            for suffix in ("", "-wal", "-shm", "-journal"):
                Path(f"{path}{suffix}").unlink(missing_ok=True)
        raise
    print(f"imported {added} tasks ({skipped} already present) into {args.db}; {total} tasks in total")


def _read_password(name: str) -> str:
    if sys.stdin is not None and sys.stdin.isatty():
        import getpass

        password = getpass.getpass(f"password for {name}: ")
        if getpass.getpass("repeat password: ") != password:
            raise UserError("the passwords do not match")
        return password
    line = sys.stdin.readline() if sys.stdin is not None else ""
    password = line.rstrip("\r\n")
    if not password:
        raise UserError("no password given: type it at the prompt or pipe it as the first line of stdin")
    return password


def run_users_add(args) -> None:
    from labeling.auth import add_annotator, check_annotator_name
    from labeling.store import open_store

    check_annotator_name(args.name)  # before asking for a password
    password = _read_password(args.name)
    with open_store(args.db) as store:
        add_annotator(store, args.name, password)
    print(f"added annotator {args.name}")


def run_users_list(args) -> None:
    from labeling.store import open_store

    with open_store(args.db, create=False) as store:
        progress = store.progress(1)
    if not progress.annotators:
        print("no annotators yet (add one with `rlhf users add`)")
        return
    width = max(9, *(len(a.annotator) for a in progress.annotators))
    print(f"{'annotator':<{width}}  {'ranked':>6}  {'skipped':>7}")
    for a in progress.annotators:
        print(f"{a.annotator:<{width}}  {a.ranked:>6}  {a.skipped:>7}")


def run_label(args) -> None:
    from labeling.app import render_guidelines
    from labeling.handlers import AppSettings
    from labeling.serve import bind_socket, make_server
    from labeling.store import open_store

    if args.overlap < 1:
        raise UserError(f"--overlap must be at least 1, got {args.overlap}")
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port must be 0-65535, got {args.port}")
    settings = AppSettings(overlap=args.overlap, guidelines_html=render_guidelines(args.guidelines),
                           admins=frozenset(args.admin))
    with open_store(args.db, create=False) as store:
        if store.count_tasks() == 0:  # an empty queue would be a confusing app
            raise UserError(f"{args.db} holds no tasks; import some first with "
                            f"`rlhf import --db {args.db} tasks.jsonl`")
        unknown = sorted(name for name in settings.admins if not store.has_annotator(name))
        if unknown:
            raise UserError(f"--admin names unknown annotators {unknown}; add them first")

        sock = bind_socket(args.host, args.port)  # a port in use fails here, before the app is built
        try:
            server = make_server(store, settings)
            shown = f"[{args.host}]" if ":" in args.host else args.host
            print(f"labeling app: http://{shown}:{sock.getsockname()[1]}/  ({store.count_tasks()} tasks, "
                  f"overlap {args.overlap}; Ctrl+C stops)", flush=True)
            if not store.list_annotators():
                print("no annotators yet: add one before anyone can sign in", file=sys.stderr, flush=True)
            server.run(sockets=[sock])
        finally:
            sock.close()


def run_simulate(args) -> None:
    from tqdm import tqdm

    from labeling.simulate import simulate
    from labeling.store import open_store
    from rlhf.oracles import load_oracle

    oracle = load_oracle(args.oracle)
    with open_store(args.db, create=False) as store:
        if store.count_tasks() == 0:
            raise UserError(f"{args.db} has no tasks; load some with `rlhf import`")
        with tqdm(total=store.open_slots(args.overlap), desc="simulate", unit="ranking", disable=None) as bar:
            summary = simulate(store, oracle, annotators=args.annotators, overlap=args.overlap, noise=args.noise,
                               seed=args.seed, on_progress=bar.update, tie_margin=args.tie_margin)
    agreement = summary["oracle_agreement"]
    print(f"{summary['rankings']} rankings by {len(summary['annotators'])} annotators; "
          f"{summary['complete']}/{summary['tasks']} tasks have {summary['overlap']} rankings; "
          f"agreement with the oracle: {'-' if agreement is None else f'{agreement:.3f}'}")


def run_export(args) -> None:
    from labeling.export import export
    from labeling.store import open_store

    with open_store(args.db, create=False) as store:
        summary = export(store, args.out, test_fraction=args.test_fraction, seed=args.seed, aggregate=args.aggregate)
    dropped = f"; {summary['dropped_contradicted']} contradicted pairs dropped" if args.aggregate == "majority" else ""
    print(f"{summary['rankings']} rankings of {summary['prompts']} prompts -> "
          f"train: {summary['train_pairs']} pairs ({summary['train_prompts']} prompts), "
          f"test: {summary['test_pairs']} pairs ({summary['test_prompts']} prompts){dropped}; written to {args.out}")


def run_stats(args) -> None:
    from labeling.stats import compute_stats, format_stats
    from labeling.store import open_store

    with open_store(args.db, create=False) as store:
        stats = compute_stats(store, overlap=args.overlap)
    print(json.dumps(stats, indent=2) if args.json else format_stats(stats))
