"""The labeling stage's subcommands: generate, import, users, label, simulate, export, stats, db.

Handlers are plain functions of the parsed arguments; bad input raises UserError. Heavy imports
(pyarrow, tqdm) happen inside the handlers so `rlhf --help` stays fast.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

from labeling.active import ORDERS, SCORED_ORDERS
from labeling.handlers import FLAGS, GOLD_RATE, REQUEST_BURST, REQUEST_RATE
from labeling.stats import GOLD_THRESHOLD
from labeling.store.sql import MAX_HELD
from rlhf.config_args import positive_int
from rlhf.errors import UserError
from rlhf.oracles import oracle_help


def _order_option(p: argparse.ArgumentParser) -> None:
    """--order, the queue's order, as `rlhf label` and `rlhf simulate` both take it."""
    p.add_argument("--order", choices=ORDERS, default="fewest-rankings",
                   help="which tasks are served first: fewest-rankings (default), random, uncertainty: the tasks "
                        "whose completions the reward model (--rm) finds hardest to order (smallest reward gap "
                        "between adjacent completions; uncertainty sampling), or information: those whose rankings "
                        "would tell it most (expected information gain)")


class _RenamedOption(argparse.Action):
    """An option's old name, still accepted for one release: it sets the new option's value and records the name
    given (as `<dest>_flag`), so that messages name the flag the user typed and the command can say it is old."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        setattr(namespace, f"{self.dest}_flag", option_string)


def _active_options(p: argparse.ArgumentParser) -> None:
    _order_option(p)
    p.add_argument("--rm", default=None, metavar="DIR",
                   help="reward model that orders the queue (--order uncertainty or information)")
    p.add_argument("--seed", type=int, default=0, help="seed of --order random (default 0)")


DB_HELP = ("label store: a SQLite file path (or sqlite:///path), or a PostgreSQL URL "
           "(postgresql://user:password@host:port/database; the database must exist)")


def _gold_threshold_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gold-threshold", type=float, default=GOLD_THRESHOLD,
                   help="gold accuracy (pairwise agreement with the known answers, ties half) under which an "
                        f"annotator is flagged (default {GOLD_THRESHOLD})")


def flag_names(text: str) -> tuple[str, ...]:
    """A comma-separated list of flag names (`--flags`, `--exclude-flags`); "" is none. A bad name is a one-line
    error naming it."""
    from labeling.store import FLAG_NAME, MAX_FLAGS

    names = tuple(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))
    bad = next((name for name in names if not FLAG_NAME.fullmatch(name)), None)
    if bad is not None:
        raise argparse.ArgumentTypeError(f"{bad!r} is not a flag name (1-40 lower-case letters, digits, '-', '_')")
    if len(names) > MAX_FLAGS:
        raise argparse.ArgumentTypeError(f"at most {MAX_FLAGS} flags")
    return names


def _db_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--db", required=True, help=DB_HELP)


def add_commands(sub) -> None:
    from labeling.generate import GenerateConfig
    from rlhf.config_args import add_config_arguments

    p = sub.add_parser("generate", help="sample K completions per prompt from the SFT model into labeling tasks",
                       description="Sample K completions per prompt (batched, KV cache) and write one labeling "
                                   "task per prompt to a JSONL file that `rlhf import` reads.")
    add_config_arguments(p, GenerateConfig)
    p.set_defaults(func=run_generate)

    p = sub.add_parser("import", help="load labeling tasks (JSONL from `rlhf generate`, or chat preference data) "
                                      "into the label store",
                       description="Load tasks into the label store: our tasks (a prompt string or 'messages', and "
                                   "completions), or preference rows whose two replies become a task to rank "
                                   "(TRL's pairs, as texts or conversations, explicit or implicit prompt; "
                                   "HH-RLHF transcripts \"\\n\\nHuman: ...\\n\\nAssistant: ...\"). .jsonl or "
                                   ".jsonl.gz. Every file is checked first; a malformed line is reported as "
                                   "FILE:LINE and then nothing is imported. Tasks already stored with the same "
                                   "content are skipped.")
    _db_option(p)
    p.add_argument("files", nargs="+", metavar="TASKS.jsonl",
                   help="task or preference files, one row per line (docs/data-formats.md, \"Tasks\")")
    p.set_defaults(func=run_import)

    p = sub.add_parser("users", help="manage annotator accounts",
                       description="Add, list, disable and enable annotator accounts, reset passwords, end "
                                   "sessions, make admins.")
    users = p.add_subparsers(dest="users_command", required=True, metavar="ACTION")
    q = users.add_parser("add", help="add an annotator (password from a prompt, or the first line of stdin)",
                         description="Add an annotator. The password is read with an interactive prompt, or "
                                     "from the first line of stdin when stdin is not a terminal.")
    _db_option(q)
    q.add_argument("name", help="annotator name: 1-64 letters, digits, '.', '_' or '-'")
    q.add_argument("--admin", action="store_true",
                   help="give the account the admin role (statistics and account management in the app)")
    q.set_defaults(func=run_users_add)
    q = users.add_parser("list", help="list annotators with their role, status and ranked/skipped counts")
    _db_option(q)
    q.set_defaults(func=run_users_list)
    for action, text in (("disable", "disable an account: it cannot sign in, and its sessions end now"),
                         ("enable", "enable a disabled account again"),
                         ("reset-password", "give an account a new password (prompt or first line of stdin); "
                                            "its sessions end"),
                         ("end-sessions", "sign an account out everywhere (every server on the database)")):
        q = users.add_parser(action, help=text, description=text[0].upper() + text[1:] + ".")
        _db_option(q)
        q.add_argument("name", help="annotator name")
        q.set_defaults(func=run_users_change, users_action=action)
    q = users.add_parser("role", help="make an account an admin or a plain annotator",
                         description="Set an account's role: admins see the statistics and manage accounts in "
                                     "the app; the server checks the role on every request.")
    _db_option(q)
    q.add_argument("name", help="annotator name")
    q.add_argument("role", choices=["admin", "annotator"], help="the new role")
    q.set_defaults(func=run_users_role)

    p = sub.add_parser("db", help="label store maintenance: copy a store between SQLite and PostgreSQL",
                       description="Label store maintenance.")
    db = p.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    q = db.add_parser("copy", help="copy a whole label store into an empty one (SQLite <-> PostgreSQL)",
                      description="Copy everything (tasks, accounts, rankings, skips, assignments, the event log) "
                                  "into an empty store, in one transaction, verified by row counts and a checksum. "
                                  "Sign-in sessions are not copied. A target that holds anything is refused.")
    q.add_argument("--from", dest="source", required=True, metavar="DB", help="the store to copy: " + DB_HELP)
    q.add_argument("--to", dest="target", required=True, metavar="DB",
                   help="an empty store to copy into (a new SQLite file, or an empty PostgreSQL database)")
    q.set_defaults(func=run_db_copy)

    p = sub.add_parser("label", help="serve the ranking app to annotators (login required)",
                       description="Serve the annotators' Gradio app at /: each signed-in annotator ranks the "
                                   "completions of the tasks in their queue (keyboard, click or drag-and-drop), "
                                   "ties, skips, and edits earlier answers. The same server answers a JSON API "
                                   "under /api (same login).")
    p.add_argument("--db", required=True, help="label store made by `rlhf import`: " + DB_HELP)
    p.add_argument("--host", default="127.0.0.1",
                   help="interface to listen on (default 127.0.0.1, this machine only; 0.0.0.0 for your network)")
    p.add_argument("--port", type=int, default=7860, help="TCP port (default 7860; 0 picks a free one)")
    p.add_argument("--overlap", type=int, default=2,
                   help="annotators who should rank each task before it leaves the queues (default 2)")
    p.add_argument("--max-held", type=positive_int, default=MAX_HELD,
                   help=f"the most tasks one annotator holds at a time, served and not yet answered (default "
                        f"{MAX_HELD}): nobody can take every place by opening tasks and leaving them")
    p.add_argument("--rate-limit", type=float, default=REQUEST_RATE, metavar="PER_SECOND",
                   help=f"requests a second each signed-in annotator may make, beyond a burst of {REQUEST_BURST} "
                        f"(static files free; default {REQUEST_RATE:g}: a person reading completions makes one "
                        "every few seconds); past it a 429 with Retry-After, so one client looping over the API "
                        "cannot slow the others; 0: no limit (a trusted script)")
    p.add_argument("--gold-rate", type=float, default=GOLD_RATE,
                   help=f"share of the tasks served that are gold questions (tasks imported with a known answer, "
                        f"or marked by an admin), blind among the others (default {GOLD_RATE})")
    _gold_threshold_option(p)
    p.add_argument("--flags", type=flag_names, default=FLAGS, metavar="NAME,...",
                   help="the flags an annotator may set on a ranking or a skip, besides an optional comment (default "
                        f"{','.join(FLAGS)}; \"\" for none); shown to admins, counted by `rlhf stats`, exported with "
                        "the rankings, and `rlhf export --exclude-flags` leaves the flagged rankings out")
    p.add_argument("--guidelines", default=None, help="Markdown file shown to annotators in the Guidelines panel")
    p.add_argument("--admin", action="append", default=[], metavar="NAME",
                   help="treat this annotator as an admin on this server, besides the accounts with the admin "
                        "role (`rlhf users role`): statistics view, account management (repeatable)")
    p.add_argument("--root-path", default="",
                   help="the path a reverse proxy serves the app under, e.g. /label (the proxy strips it)")
    _active_options(p)
    p.add_argument("--pre-rank", default=None, metavar="RM",
                   help="open each task with this reward model's order already set; the annotator corrects or keeps "
                        "it (whether it was kept, and how many pairs were moved, is stored apart from the ranking)")
    p.set_defaults(func=run_label)

    p = sub.add_parser("simulate", help="rank pending tasks with scripted annotators driven by an oracle",
                       description="Scripted annotators sim-1..sim-N rank pending tasks through the same store "
                                   "API as the app, until the queue is empty. Rankings are Plackett-Luce samples "
                                   "from the oracle's scores at temperature NOISE x (the task's score range).")
    _db_option(p)
    p.add_argument("--oracle", required=True, help=oracle_help())
    p.add_argument("--annotators", type=positive_int, default=3, help="number of scripted annotators (default 3)")
    p.add_argument("--overlap", type=positive_int, default=2, help="rankings wanted per task (default 2)")
    p.add_argument("--noise", type=float, default=0.1,
                   help="sampling temperature relative to each task's score range; 0 = always sort by score "
                        "(default 0.1: best above worst with probability sigmoid(1/0.1))")
    p.add_argument("--tie-margin", type=float, default=0.0,
                   help="completions whose oracle scores differ by at most this are ranked as a tie "
                        "(default 0: only equal scores tie; set it for continuous oracles)")
    p.add_argument("--seed", type=int, default=0, help="random seed; the same seed reproduces a run")
    _order_option(p)
    p.add_argument("--strategy", dest="order", choices=ORDERS, action=_RenamedOption,
                   help="the old name of --order, accepted until the next release")
    p.add_argument("--rm", default=None, metavar="DIR",
                   help="reward model that orders the tasks (--order uncertainty or information)")
    p.add_argument("--rm-every", type=positive_int, default=None, metavar="N",
                   help="after every N rankings, train a reward model from scratch on all rankings so far and "
                        "re-order the remaining tasks with it (the active-labeling loop); needs --rm-out")
    p.add_argument("--rm-out", default=None, metavar="DIR",
                   help="folder for the reward models the loop trains (DIR/round-1, DIR/round-2, ...)")
    p.add_argument("--model", default=None,
                   help="base model of the loop's reward models (default: --rm's base, else 'default')")
    p.add_argument("--rm-epochs", type=positive_int, default=5, help="epochs of each retraining (default 5)")
    p.set_defaults(func=run_simulate)

    p = sub.add_parser("export", help="write rankings and train/test preference pairs (JSONL, Parquet, datasets)",
                       description="Write DIR/rankings.jsonl (with a split field), DIR/train.jsonl, DIR/test.jsonl, "
                                   "their Parquet twins, and the same rankings and pairs as datasets.DatasetDict "
                                   "folders (DIR/rankings_dataset, DIR/pairs_dataset: datasets.load_from_disk reads "
                                   "them). The split is by prompt: no prompt is in both.")
    _db_option(p)
    p.add_argument("--out", required=True, help="output folder (created if missing)")
    p.add_argument("--test-fraction", type=float, default=0.1, help="fraction of prompts held out (default 0.1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompt split")
    p.add_argument("--resolve", dest="aggregate", choices=["none", "review", "majority"], default="none",
                   help="what becomes pairs: none: every annotator's pairs (default); review: a task's resolved "
                        "ranking where an admin set one in review, every annotator's pairs elsewhere; majority: one "
                        "pair per completion pair by majority vote, dropping tied votes")
    p.add_argument("--aggregate", dest="aggregate", choices=["none", "majority"], help="the former name of --resolve")
    p.add_argument("--exclude-flags", type=flag_names, default=(), metavar="NAME,...",
                   help="leave out every ranking an annotator flagged with one of these (e.g. unsafe,broken-prompt), "
                        "from the rankings and the pairs (default: none left out)")
    p.add_argument("--push-to-hub", metavar="REPO", default=None,
                   help="also upload the datasets to this Hugging Face hub dataset repository (owner/name): the "
                        "pairs as its default configuration, the rankings as the configuration 'rankings'")
    p.set_defaults(func=run_export)

    p = sub.add_parser("stats", help="labeling progress, annotator throughput and inter-annotator agreement",
                       description="Print the labeling statistics, or write their tables (per annotator, per "
                                   "task, per annotator pair) as CSV or JSON.")
    _db_option(p)
    p.add_argument("--overlap", type=positive_int, default=2,
                   help="rankings wanted per task, for the 'complete' count (default 2)")
    p.add_argument("--json", action="store_true", help="print the summary (progress, annotators, agreement) as JSON")
    p.add_argument("--format", choices=["text", "csv", "json"], default="text",
                   help="text: the report (default); csv or json: the tables annotators, tasks, agreement and flags, "
                        "printed one after another, or written to --out")
    p.add_argument("--out", metavar="DIR", default=None,
                   help="with --format csv|json: write DIR/annotators, DIR/tasks, DIR/agreement and DIR/flags "
                        "(.csv or .json)")
    p.add_argument("--by", choices=["annotator"], default=None,
                   help="annotator: one table of annotator metrics (rankings, skips, median seconds, gold accuracy "
                        "and flag, leave-one-out agreement, tie and first-shown-first shares) as text, CSV or JSON "
                        "(--out DIR writes DIR/by_annotator.csv or .json)")
    _gold_threshold_option(p)
    p.set_defaults(func=run_stats)


def run_generate(args) -> None:
    from labeling.generate import GenerateConfig
    from labeling.generate import run_generate as generate
    from rlhf.config_args import config_from_args

    config = config_from_args(GenerateConfig, args)
    count = generate(config)
    print(f"wrote {count} tasks x {config.k} completions to {config.out}")


def read_task_files(paths: list[str], gold: dict | None = None) -> list:
    """Parse every task file fully; a bad line raises UserError 'FILE:LINE: reason' (a blank completion is
    one: there is nothing to rank). A task id repeated with different content is an error naming both
    places; an exact repeat is kept once. A task's "gold" field, {completion id: rank}, its known answer (a gold
    question), goes into `gold` by task id, checked against the task's completions."""
    from labeling.task_files import task_from_row
    from rlhf.jsonl import read_jsonl
    from rlhf.records import Ranking, Task

    tasks: list[Task] = []
    seen: dict[str, tuple[Task, str]] = {}
    for path in paths:
        for line_no, obj in read_jsonl(path):
            answer = obj.pop("gold", None) if isinstance(obj, dict) else None
            try:
                task = task_from_row(obj)
                if answer is not None:
                    if not isinstance(answer, dict):
                        raise ValueError("'gold' must map completion ids to ranks")
                    answer = Ranking.normalized(answer, [c.id for c in task.completions])
            except (ValueError, TypeError) as exc:
                raise UserError(f"{path}:{line_no}: {exc}") from None
            if answer is not None and gold is not None:
                gold[task.id] = answer
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

    from labeling.store import open_store, parse_url

    gold: dict = {}
    tasks = read_task_files(args.files, gold)  # all files validated before anything is written
    backend, where = parse_url(args.db)
    path = Path(where)
    created = backend == "sqlite" and not path.exists()
    try:
        with open_store(args.db) as store:
            added, skipped = store.import_tasks(tasks, gold)
            total = store.count_tasks()
    except BaseException:
        if created:  # a failed import leaves no empty database behind (it would look like a finished one)
            for suffix in ("", "-wal", "-shm", "-journal"):
                Path(f"{path}{suffix}").unlink(missing_ok=True)
        raise
    marked = f", {len(gold)} of them gold questions" if gold else ""
    print(f"imported {added} tasks ({skipped} already present{marked}) into {args.db}; {total} tasks in total")


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
        add_annotator(store, args.name, password, role="admin" if args.admin else "annotator")
    print(f"added {'admin' if args.admin else 'annotator'} {args.name}")


def run_users_list(args) -> None:
    from labeling.store import open_store

    with open_store(args.db, create=False) as store:
        progress = {p.annotator: p for p in store.progress(1).annotators}
        accounts = store.accounts()
    if not accounts:
        print("no annotators yet (add one with `rlhf users add`)")
        return
    width = max(9, *(len(a.name) for a in accounts))
    print(f"{'annotator':<{width}}  {'role':<9}  {'status':<8}  {'ranked':>6}  {'skipped':>7}")
    for a in accounts:
        status = "disabled" if a.disabled else "active" if a.password_hash else "scripted"
        print(f"{a.name:<{width}}  {a.role:<9}  {status:<8}  {progress[a.name].ranked:>6}  "
              f"{progress[a.name].skipped:>7}")


def run_users_change(args) -> None:
    from labeling.auth import reset_password
    from labeling.store import open_store

    with open_store(args.db, create=False) as store:
        if not store.has_annotator(args.name):  # before asking for a password
            raise UserError(f"unknown annotator {args.name!r}")
        if args.users_action == "reset-password":
            ended = reset_password(store, args.name, _read_password(args.name))
            done = "gave a new password to"
        elif args.users_action == "end-sessions":
            ended, done = store.end_sessions(args.name), "signed out"
        else:
            ended = store.set_disabled(args.name, args.users_action == "disable")
            done = args.users_action + "d"
    print(f"{done} {args.name}" + (f"; {ended} session{'s' * (ended != 1)} ended" if ended else ""))


def run_users_role(args) -> None:
    from labeling.store import open_store

    with open_store(args.db, create=False) as store:
        store.set_role(args.name, args.role)
    print(f"{args.name} is now {'an admin' if args.role == 'admin' else 'an annotator'}")


def run_db_copy(args) -> None:
    from pathlib import Path

    from labeling.store import open_store, parse_url
    from labeling.store.copy import copy_store

    with open_store(args.source, create=False) as source:
        target_path = None
        backend, where = parse_url(args.target)
        if backend == "sqlite":
            target_path = None if Path(where).exists() else Path(where)  # made here: removed again on failure
        try:
            with open_store(args.target) as target:
                report = copy_store(source, target)
        except BaseException:
            if target_path is not None:
                for suffix in ("", "-wal", "-shm", "-journal"):
                    Path(f"{target_path}{suffix}").unlink(missing_ok=True)
            raise
        print(f"copied {source.location} -> {target.location}")
    width = max(len(table) for table in report.counts)
    for table, count in report.counts.items():
        print(f"  {table:<{width}}  {count:>8} rows")
    print(f"  checksum (SHA-256 of every row, equal in both): {report.checksum}")


def run_label(args) -> None:
    from labeling.app import render_guidelines
    from labeling.handlers import AppSettings
    from labeling.serve import bind_socket, make_server
    from labeling.store import open_store

    if args.overlap < 1:
        raise UserError(f"--overlap must be at least 1, got {args.overlap}")
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port must be 0-65535, got {args.port}")
    if not 0 <= args.gold_rate <= 1:
        raise UserError(f"--gold-rate must be from 0 to 1, got {args.gold_rate}")
    if not (args.rate_limit >= 0 and math.isfinite(args.rate_limit)):
        raise UserError(f"--rate-limit must be 0 (no limit) or a number of requests a second, got {args.rate_limit}")
    if not 0 <= args.gold_threshold <= 1:
        raise UserError(f"--gold-threshold must be from 0 to 1, got {args.gold_threshold}")
    settings = AppSettings(overlap=args.overlap, guidelines_html=render_guidelines(args.guidelines),
                           admins=frozenset(args.admin), max_held=args.max_held, gold_rate=args.gold_rate,
                           gold_threshold=args.gold_threshold, flags=args.flags, request_rate=args.rate_limit)
    root_path = args.root_path.rstrip("/")
    if root_path and not root_path.startswith("/"):
        raise UserError(f"--root-path must start with '/', got {args.root_path!r}")
    with open_store(args.db, create=False) as store:
        where = store.location
        if store.count_tasks() == 0:  # an empty queue would be a confusing app
            raise UserError(f"{where} holds no tasks; import some first with `rlhf import --db {where} tasks.jsonl`")
        if not any(a.password_hash and not a.disabled for a in store.accounts()):  # nobody could sign in
            raise UserError(f"{where} has no annotator who can sign in; add one first with "
                            f"`rlhf users add --db {where} NAME`")
        unknown = sorted(name for name in settings.admins if not store.has_annotator(name))
        if unknown:
            raise UserError(f"--admin names unknown annotators {unknown}; add them first")
        active = active_queue(store, args.order, args.rm, args.pre_rank, args.seed, args.overlap)  # slow: last check
        if active is not None:
            import dataclasses

            settings = dataclasses.replace(settings, active=active)

        sock = bind_socket(args.host, args.port)  # a port in use fails here, before the app is built
        try:
            server = make_server(store, settings, root_path=root_path)
            shown = f"[{args.host}]" if ":" in args.host else args.host
            print(f"labeling app: http://{shown}:{sock.getsockname()[1]}/  ({store.count_tasks()} tasks, "
                  f"overlap {args.overlap}, store: {where}; Ctrl+C stops)", flush=True)
            server.run(sockets=[sock])
        finally:
            sock.close()


def active_queue(store, order: str, rm: str | None, pre_rank: str | None, seed: int = 0, overlap: int = 1):
    """The ActiveQueue of `rlhf label --order/--rm/--pre-rank` (None without them): the tasks scored once now by
    the reward model(s), which takes a while for a large store (a progress line is printed)."""
    if order in SCORED_ORDERS and not rm:
        raise UserError(f"--order {order} needs --rm DIR: the reward model that orders the queue")
    if rm and order not in SCORED_ORDERS:
        raise UserError("--rm orders the queue only with --order uncertainty or information (use --pre-rank RM to "
                        "propose orders)")
    if order == "fewest-rankings" and not pre_rank:
        return None
    from labeling.active import ActiveQueue, reorder_queue, score_store

    queue = ActiveQueue(order, seed=seed, task_ids=store.task_ids())
    if rm:
        print(f"ordering the open tasks with the reward model {rm} ...", flush=True)
        scores = reorder_queue(queue, rm, store, overlap)
        if pre_rank == rm:
            queue.proposal_rewards = scores  # proposals are for the tasks still to be served: the open ones
    if pre_rank and pre_rank != rm:
        print(f"scoring {store.count_tasks()} tasks with the reward model {pre_rank} ...", flush=True)
        queue.proposal_rewards = score_store(pre_rank, store)
    return queue


def run_simulate(args) -> None:
    from pathlib import Path

    from tqdm import tqdm

    from labeling.simulate import simulate
    from labeling.store import open_store
    from rlhf.oracles import load_oracle

    flag = getattr(args, "order_flag", "--order")  # --strategy, the old name, when that is the one given
    if args.order in SCORED_ORDERS and not (args.rm or args.rm_every):
        raise UserError(f"{flag} {args.order} needs a reward model: --rm DIR, or --rm-every N to train one "
                        "as it goes")
    if args.rm and args.order not in SCORED_ORDERS:
        raise UserError(f"--rm orders the tasks only with {flag} uncertainty or information")
    if args.rm_every and not args.rm_out:
        raise UserError("--rm-every needs --rm-out DIR, the folder for the reward models it trains")
    if args.rm_out and not args.rm_every:
        raise UserError("--rm-out is used only with --rm-every N")
    if args.rm_out and Path(args.rm_out).exists() and any(Path(args.rm_out).iterdir()):
        raise UserError(f"--rm-out {args.rm_out} is not empty; choose a new folder")
    oracle = load_oracle(args.oracle)
    if flag != "--order":
        print(f"rlhf simulate: {flag} is deprecated and will be removed in the next release; use --order",
              file=sys.stderr)
    with open_store(args.db, create=False) as store:
        if store.count_tasks() == 0:
            raise UserError(f"{args.db} has no tasks; load some with `rlhf import`")
        serve = after = loop = None
        if args.order != "fewest-rankings" or args.rm_every:
            from labeling.active import ActiveQueue, RetrainingLoop, reorder_queue

            queue = ActiveQueue(args.order, seed=args.seed, task_ids=store.task_ids())
            if args.rm:
                reorder_queue(queue, args.rm, store, args.overlap)
            serve = lambda annotator, overlap: queue.next_task(store, annotator, overlap)  # noqa: E731
            if args.rm_every:
                from labeling.active import base_model_of

                model = args.model or (base_model_of(args.rm) if args.rm else "default")
                after = loop = RetrainingLoop(store, queue, args.rm_every, args.rm_out,
                                              {"model": model, "epochs": args.rm_epochs, "seed": args.seed},
                                              overlap=args.overlap)
        with tqdm(total=store.open_slots(args.overlap), desc="simulate", unit="ranking", disable=None) as bar:
            summary = simulate(store, oracle, annotators=args.annotators, overlap=args.overlap, noise=args.noise,
                               seed=args.seed, on_progress=bar.update, tie_margin=args.tie_margin,
                               next_task=serve, after_ranking=after)
    if loop is not None and loop.rounds:
        print(f"{len(loop.rounds)} reward models trained along the way; the last: {loop.rounds[-1]['rm_dir']}")
    agreement = summary["oracle_agreement"]
    print(f"{summary['rankings']} rankings by {len(summary['annotators'])} annotators; "
          f"{summary['complete']}/{summary['tasks']} tasks have {summary['overlap']} rankings; "
          f"agreement with the oracle: {'-' if agreement is None else f'{agreement:.3f}'}")


def run_export(args) -> None:
    from labeling.export import export
    from labeling.store import open_store

    with open_store(args.db, create=False) as store:
        summary = export(store, args.out, test_fraction=args.test_fraction, seed=args.seed, aggregate=args.aggregate,
                         exclude_flags=args.exclude_flags)
    dropped = f"; {summary['dropped_contradicted']} contradicted pairs dropped" if args.aggregate == "majority" else ""
    if args.exclude_flags:
        dropped += (f"; {summary['excluded_rankings']} rankings flagged {','.join(args.exclude_flags)} "
                    "left out")
    def prompts(count: int) -> str:
        return f"{count} prompt{'s' * (count != 1)}"

    print(f"{summary['rankings']} rankings of {prompts(summary['prompts'])} -> "
          f"train: {summary['train_pairs']} pairs ({prompts(summary['train_prompts'])}), "
          f"test: {summary['test_pairs']} pairs ({prompts(summary['test_prompts'])}){dropped}; written to {args.out}")
    if args.push_to_hub:
        from labeling.export import push_to_hub

        push_to_hub(args.out, args.push_to_hub)
        print(f"pushed to the hub dataset {args.push_to_hub} (configurations: default = pairs, rankings)")


def run_stats(args) -> None:
    from labeling.stats import compute_stats, format_stats, stats_tables, table_records, write_tables
    from labeling.store import open_store

    if args.out and args.format == "text":
        raise UserError("--out writes the tables: give --format csv or --format json")
    if args.json and args.format != "text":
        raise UserError("--json prints the summary; --format csv|json the tables: give one of them")
    if args.by and args.json:
        raise UserError("--by annotator prints its table: give --format text|csv|json instead of --json")
    with open_store(args.db, create=False) as store:
        if args.by:
            from labeling.stats import annotator_table

            tables = {"by_annotator": annotator_table(store, args.gold_threshold)}
            if args.format == "text":
                print(tables["by_annotator"].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
                return
        elif args.format == "text":
            stats = compute_stats(store, overlap=args.overlap, gold_threshold=args.gold_threshold)
            print(json.dumps(stats, indent=2) if args.json else format_stats(stats))
            return
        else:
            tables = stats_tables(store, overlap=args.overlap)
    if args.out:
        paths = write_tables(tables, args.out, args.format)
        print(f"wrote {', '.join(str(p) for p in paths)}")
    elif args.format == "json":
        print(json.dumps({name: table_records(frame) for name, frame in tables.items()}, indent=2))
    else:
        print("\n".join(f"# {name}\n{frame.to_csv(index=False)}" for name, frame in tables.items()), end="")
