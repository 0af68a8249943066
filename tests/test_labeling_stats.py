import math

import pytest
from labeling_helpers import make_tasks, order_ranks

from labeling.stats import compute_stats, format_stats, kendall_tau_b, pair_agreement
from labeling.store import open_store


@pytest.mark.parametrize("a, b, tau", [
    ([1, 2, 3, 4], [1, 2, 3, 4], 1.0),
    ([1, 2, 3, 4], [4, 3, 2, 1], -1.0),
    ([1, 2, 3], [2, 1, 3], 1 / 3),                 # C=2, D=1 over 3 pairs
    ([1, 1, 2], [1, 2, 3], 2 / math.sqrt(6)),      # tau-b: (2 - 0) / sqrt((3 - 1) * (3 - 0))
    ([1, 2, 3, 4], [2, 1, 4, 3], (4 - 2) / 6),     # two swaps: pairs (0,1), (2,3) discordant, 4 concordant
])
def test_kendall_tau_b_known_values(a, b, tau):
    assert kendall_tau_b(a, b) == pytest.approx(tau)


def test_kendall_tau_b_undefined_for_all_ties():
    assert kendall_tau_b([1, 1], [1, 2]) is None


def test_pair_agreement_counts_only_strict_pairs():
    assert pair_agreement([1, 2, 3], [1, 2, 3]) == (3, 3)
    assert pair_agreement([1, 2, 3], [2, 1, 3]) == (2, 3)
    assert pair_agreement([1, 1, 2], [1, 2, 3]) == (2, 2)
    assert pair_agreement([1, 2, 3], [3, 2, 1]) == (0, 3)


def test_compute_stats_on_hand_made_rankings(tmp_path):
    with open_store(tmp_path / "labels.db") as store:
        t0, t1, t2 = tasks = make_tasks(3, k=3)
        store.import_tasks(tasks)
        for name in ("a", "b", "c", "d"):
            store.add_annotator(name)
        store.submit_ranking("a", t0.id, order_ranks(t0, [0, 1, 2]), seconds=10)
        store.submit_ranking("b", t0.id, order_ranks(t0, [0, 1, 2]), seconds=5)
        store.submit_ranking("c", t0.id, order_ranks(t0, [2, 1, 0]))
        store.submit_ranking("a", t1.id, order_ranks(t1, [0, 1, 2]), seconds=20)
        store.submit_ranking("b", t1.id, order_ranks(t1, [1, 0, 2]))
        store.submit_ranking("a", t2.id, order_ranks(t2, [2, 0, 1]), seconds=40)
        store.skip_task("d", t2.id)
        stats = compute_stats(store, overlap=2)

    assert (stats["tasks"], stats["complete"], stats["rankings"], stats["skips"]) == (3, 2, 6, 1)
    NO_GOLD = {"gold_tasks": 0, "gold_accuracy": None, "flagged": False}
    assert stats["annotators"] == [
        {"name": "a", "ranked": 3, "skipped": 0, "median_seconds": 20.0} | NO_GOLD,
        {"name": "b", "ranked": 2, "skipped": 0, "median_seconds": 5.0} | NO_GOLD,
        {"name": "c", "ranked": 1, "skipped": 0, "median_seconds": None} | NO_GOLD,
        {"name": "d", "ranked": 0, "skipped": 1, "median_seconds": None} | NO_GOLD,
    ]
    agreement = stats["agreement"]
    # instances: t0 (a,b) 3/3 tau 1; t0 (a,c) 0/3 tau -1; t0 (b,c) 0/3 tau -1; t1 (a,b) 2/3 tau 1/3
    assert agreement["shared_tasks"] == 2
    assert agreement["pairwise_agreement"] == pytest.approx(5 / 12)
    assert agreement["mean_kendall_tau"] == pytest.approx((1 - 1 - 1 + 1 / 3) / 4)
    by_pair = {tuple(e["annotators"]): e for e in agreement["by_pair"]}
    assert set(by_pair) == {("a", "b"), ("a", "c"), ("b", "c")}
    assert by_pair[("a", "b")]["shared_tasks"] == 2
    assert by_pair[("a", "b")]["pairwise_agreement"] == pytest.approx(5 / 6)
    assert by_pair[("a", "b")]["mean_kendall_tau"] == pytest.approx(2 / 3)
    assert by_pair[("a", "c")]["pairwise_agreement"] == 0.0 and by_pair[("a", "c")]["mean_kendall_tau"] == -1.0

    report = format_stats(stats)
    assert "complete at overlap 2: 2" in report
    assert "pairwise 0.417, mean Kendall tau -0.167" in report
    assert "a vs b: 2 tasks, pairwise 0.833, tau 0.667" in report


def test_stats_with_no_shared_tasks(tmp_path):
    with open_store(tmp_path / "labels.db") as store:
        store.import_tasks(make_tasks(1))
        stats = compute_stats(store)
    assert stats["agreement"] == {"shared_tasks": 0, "pairwise_agreement": None, "mean_kendall_tau": None,
                                  "by_pair": []}
    assert "agreement on 0 shared tasks: pairwise -, mean Kendall tau -" in format_stats(stats)


@pytest.fixture
def ranked_store(tmp_path):
    """The hand-made rankings of test_compute_stats_on_hand_made_rankings."""
    store = open_store(tmp_path / "labels.db")
    t0, t1, t2 = tasks = make_tasks(3, k=3)
    store.import_tasks(tasks)
    for name in ("a", "b", "c", "d"):
        store.add_annotator(name)
    store.submit_ranking("a", t0.id, order_ranks(t0, [0, 1, 2]), seconds=10)
    store.submit_ranking("b", t0.id, order_ranks(t0, [0, 1, 2]), seconds=5)
    store.submit_ranking("c", t0.id, order_ranks(t0, [2, 1, 0]))
    store.submit_ranking("a", t1.id, order_ranks(t1, [0, 1, 2]), seconds=20)
    store.submit_ranking("b", t1.id, order_ranks(t1, [1, 0, 2]))
    store.submit_ranking("a", t2.id, order_ranks(t2, [2, 0, 1]), seconds=40)
    store.skip_task("d", t2.id)
    yield store
    store.close()


def test_stats_tables_are_dataframes(ranked_store):
    from labeling.stats import stats_tables

    tables = stats_tables(ranked_store, overlap=2)
    annotators = tables["annotators"].set_index("annotator")
    assert list(annotators.index) == ["a", "b", "c", "d"]
    assert annotators.loc["a", "median_seconds"] == 20.0 and math.isnan(annotators.loc["c", "median_seconds"])
    tasks = tables["tasks"].set_index("task_id")
    assert list(tasks["rankings"]) == [3, 2, 1] and tasks.loc["task-0", "annotators"] == "a, b, c"
    assert tasks.loc["task-0", "pairwise_agreement"] == pytest.approx(3 / 9)      # a=b, both reversed by c
    assert tasks.loc["task-0", "mean_kendall_tau"] == pytest.approx(-1 / 3)
    assert tasks.loc["task-1", "pairwise_agreement"] == pytest.approx(2 / 3)
    assert math.isnan(tasks.loc["task-2", "pairwise_agreement"])                  # one ranking: nothing to compare
    agreement = tables["agreement"].set_index(["annotator_a", "annotator_b"])
    assert agreement.loc[("a", "b"), "shared_tasks"] == 2
    assert agreement.loc[("a", "b"), "pairwise_agreement"] == pytest.approx(5 / 6)
    assert agreement.loc[("a", "c"), "mean_kendall_tau"] == -1.0


def test_stats_cli_formats(ranked_store, tmp_path, capsys):
    import json

    import pandas as pd

    from pipeline.cli import main

    db = str(tmp_path / "labels.db")
    assert main(["stats", "--db", db, "--format", "csv", "--out", str(tmp_path / "tables")]) == 0
    capsys.readouterr()
    tasks = pd.read_csv(tmp_path / "tables" / "tasks.csv")
    assert list(tasks.columns) == ["task_id", "rankings", "annotators", "median_seconds", "pairwise_agreement",
                                   "mean_kendall_tau"]
    assert list(tasks["rankings"]) == [3, 2, 1]
    assert list(pd.read_csv(tmp_path / "tables" / "annotators.csv")["annotator"]) == ["a", "b", "c", "d"]
    assert len(pd.read_csv(tmp_path / "tables" / "agreement.csv")) == 3

    assert main(["stats", "--db", db, "--format", "json", "--out", str(tmp_path / "tables")]) == 0
    capsys.readouterr()
    rows = json.loads((tmp_path / "tables" / "tasks.json").read_text())
    assert rows[2] == {"task_id": "task-2", "rankings": 1, "annotators": "a", "median_seconds": 40.0,
                       "pairwise_agreement": None, "mean_kendall_tau": None}

    assert main(["stats", "--db", db, "--format", "json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert set(printed) == {"annotators", "tasks", "agreement", "flags"} and len(printed["agreement"]) == 3
    assert printed["flags"] == []  # nobody flagged anything
    assert main(["stats", "--db", db, "--format", "csv"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# annotators\nannotator,ranked,skipped,median_seconds\na,3,0,20.0\n")
    assert "\n# tasks\ntask_id," in out and "\n# agreement\nannotator_a," in out
    assert out.endswith("\n# flags\nflag,rankings,skips\n")

    for flags, message in ((["--out", str(tmp_path / "x")], "--out writes the tables: give --format csv"),
                           (["--json", "--format", "csv"], "--json prints the summary")):
        assert main(["stats", "--db", db, *flags]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1
