"""`compare --sizes` (error-size curves) and `sweep`: one row per run, sizes reached, resume."""

from __future__ import annotations

import csv

import pytest

from nestsynth import config as C
from nestsynth.baselines.compare import plan, size_overrides
from nestsynth.errors import NestError
from test_cli import _call, _one_error_line

TINY = ["--model", "mlp:64-32-16-10", "--dataset", "digits", "--device", "cpu", "--set", "growth.target=0.0",
        "--set", "growth.max_iterations=2", "--set", "growth.epochs_per_iteration=1",
        "--set", "seed_net.ratio=0.5", "--set", "seed_net.density=0.3", "--set", "pruning.retrain_epochs=1"]
DENSE = 64 * 32 + 32 * 16 + 16 * 10  # 2,720


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_compare_sizes_one_row_per_run_at_its_size_and_resumes(tmp_path):
    out = tmp_path / "curves"
    argv = ["compare", "--methods", "nest,gradual,l0,dense", "--sizes", "300,700", "--epochs", "4", "--seeds", "1",
            "--out", str(out), *TINY]
    rc, text, err = _call(argv)
    assert rc == 0, err
    rows = _rows(out / "curves.csv")
    keys = sorted((r["method"], r["size"], r["seed"]) for r in rows)
    expected = sorted([(m, str(s), str(k)) for m in ("nest", "gradual", "l0") for s in (300, 700) for k in (0,)]
                      + [("dense", "", "0")])
    assert keys == expected
    for r in rows:
        assert int(r["epochs"]) == 4  # one budget for every method, NeST's growth included
        if r["size"]:
            assert abs(int(r["weights"]) - int(r["size"])) <= 0.05 * int(r["size"]), r
        else:
            assert int(r["weights"]) == DENSE
    md = (out / "curves.md").read_text()
    assert "| nest | 300 | 1 |" in md and "| Size | nest | gradual | l0 |" in md
    assert (out / "curves.png").stat().st_size > 10_000
    # the same command again reuses every finished run
    rc, text, err = _call(argv)
    assert rc == 0 and text.count("reused") == len(rows) and _rows(out / "curves.csv") == rows


def test_an_interrupted_compare_writes_the_curves_of_its_finished_runs(tmp_path, monkeypatch):
    from nestsynth.baselines import compare

    real, calls = compare._run_job, []

    def second_run_interrupted(job, data_dir, threads):
        calls.append(job.label)
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C, or SIGTERM through the CLI's handler
        return real(job, data_dir, threads)

    monkeypatch.setattr(compare, "_run_job", second_run_interrupted)
    out = tmp_path / "cut"
    argv = ["compare", "--methods", "gradual", "--sizes", "300,700", "--epochs", "2", "--seeds", "1",
            "--out", str(out), *TINY]
    rc, _, err = _call(argv)
    assert rc == 130 and "the same command" in err
    rows = _rows(out / "curves.csv")
    assert [(r["method"], r["size"]) for r in rows] == [("gradual", "300")]
    assert "1 of 2 runs did not finish" in (out / "curves.md").read_text()
    monkeypatch.setattr(compare, "_run_job", real)
    rc, text, _ = _call(argv)  # the same command reuses the finished run and runs the other
    assert rc == 0 and text.count("reused") == 1 and len(_rows(out / "curves.csv")) == 2


def test_an_interrupt_stops_the_worker_processes_and_starts_no_queued_run(tmp_path):
    """--jobs: a KeyboardInterrupt in the parent (SIGTERM to it alone, through the CLI's handler)
    must stop the running runs and cancel the queued ones, not wait for them and run the rest."""
    import multiprocessing as mp

    from nestsynth.baselines.compare import run_all

    base = C.load(None, ['model="mlp:64-32-16-10"', 'data.dataset="digits"', 'device="cpu"'])
    quick = plan(base, ["gradual"], [0], tmp_path, [300], 1, DENSE)
    slow = plan(base, ["gradual"], [0], tmp_path, [700, 1000], 3000, DENSE)  # minutes each if let run

    def interrupt_at_the_first_finished_run(line):
        if "done" in line:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt) as stopped:
        run_all(quick + slow, workers=2, threads=1, tell=interrupt_at_the_first_finished_run)
    assert [job.size for job, _ in stopped.value.finished] == [300]
    assert not mp.active_children()  # the worker running a slow job was stopped
    assert not any((job.run_dir / "report.json").exists() for job in slow)


def test_size_overrides_per_method():
    base = C.Config()
    assert size_overrides("nest", 500, 1000, 60, base) == {"pruning": {"target_weights": 500, "budget_epochs": 60},
                                                          "growth": {"max_epochs": 12}}
    g = size_overrides("gradual", 250, 1000, 60, base)["methods"]["gradual"]
    assert g["final_sparsity"] == pytest.approx(0.75) and g["epochs"] == 60 and g["end_epoch"] == 40
    assert size_overrides("oneshot", 100, 1000, 30, base)["methods"]["oneshot"] == {
        "sparsity": pytest.approx(0.9), "dense_epochs": 10, "finetune_epochs": 20}
    assert size_overrides("l0", 100, 1000, None, base) == {"methods": {"l0": {"target_weights": 100}}}
    with pytest.raises(NestError, match="method han has no size target"):
        size_overrides("han", 100, 1000, 60, base)
    with pytest.raises(NestError, match="size 1000 is out of range"):
        size_overrides("gradual", 1000, 1000, 60, base)


def test_compare_sizes_refuses_bad_input(tmp_path):
    for extra, words in ((["--sizes", "0,5"], "--sizes must be positive"), (["--sizes", "a"], "whole numbers"),
                         (["--epochs", "5"], "given with --sizes"),
                         (["--sizes", "100", "--methods", "han"], "no size target")):
        argv = ["compare", "--methods", "gradual", "--out", str(tmp_path / "x"), *TINY, *extra]
        if "--methods" in extra:
            argv = argv[:1] + argv[3:]
        rc, _, err = _call(argv)
        assert rc == 2 and words in _one_error_line(err)
    assert not (tmp_path / "x").exists()


def test_plan_directories_and_dense_once(tmp_path):
    jobs = plan(C.Config(), ["dense", "gradual"], [0, 1], tmp_path, [100, 200], 10, 1000)
    assert [j.run_dir.relative_to(tmp_path).as_posix() for j in jobs] == [
        "dense/seed0", "dense/seed1", "gradual/size100/seed0", "gradual/size100/seed1",
        "gradual/size200/seed0", "gradual/size200/seed1"]


def test_sweep_writes_csv_and_plot(tmp_path):
    out = tmp_path / "sweep"
    rc, text, err = _call(["sweep", "--values", "seed_net.ratio=0.3,0.6", "--seeds", "1", "--out", str(out), *TINY,
                           "--set", "pruning.max_iterations=2"])
    assert rc == 0, err
    rows = _rows(out / "sweep.csv")
    assert [(r["key"], r["value"]) for r in rows] == [("seed_net.ratio", "0.3"), ("seed_net.ratio", "0.6")]
    assert int(rows[0]["seed_weights"]) < int(rows[1]["seed_weights"])  # a larger seed
    assert all(r["growth_seconds"] and r["post_growth_weights"] for r in rows)
    assert (out / "sweep.png").stat().st_size > 10_000
    rc, _, err = _call(["sweep", "--values", "seed_net.nope=1", "--out", str(out / "b"), *TINY])
    assert rc == 2 and "unknown config key 'seed_net.nope'" in _one_error_line(err)


def test_first_seed_adds_seeds_to_an_earlier_run(tmp_path):
    out = tmp_path / "sweep"
    rc, _, err = _call(["sweep", "--values", "seed_net.ratio=0.3", "--seeds", "1", "--first-seed", "2",
                        "--out", str(out), *TINY, "--set", "pruning.max_iterations=1"])
    assert rc == 0, err
    assert [p.name for p in (out / "seed_net.ratio=0.3").iterdir() if p.is_dir()] == ["seed2"]
    assert 'seed = 2' in (out / "seed_net.ratio=0.3" / "seed2" / "config.toml").read_text()
    rc, _, err = _call(["sweep", "--values", "seed_net.ratio=0.3", "--first-seed", "-1", "--out", str(out), *TINY])
    assert rc == 2 and "--first-seed must be 0 or more" in _one_error_line(err)


def _bench(name):
    """A script of bench/ as a module."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(f"bench_{name}", Path(__file__).parents[1] / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _curve_rows():
    return [
        {"method": "nest", "size": 3000, "seed": 0, "weights": 3000, "flops": 6000, "flops_act": 4697,
         "test_error": 0.0209, "val_error": 0.0216, "epochs": 60, "seconds": 512.5, "run_dir": "nest/size3000/seed0"},
        {"method": "dense", "size": None, "seed": 1, "weights": 266200, "flops": 532400, "flops_act": 400000,
         "test_error": float("nan"), "val_error": None, "epochs": 60, "seconds": 1e3, "run_dir": "dense/seed1"},
    ]


def test_read_curves_csv_round_trips_the_written_types():
    import math

    from nestsynth.report.curves import format_curves_csv, read_curves_csv

    rows = read_curves_csv(format_curves_csv(_curve_rows()))
    assert rows[0] == _curve_rows()[0]
    assert type(rows[0]["size"]) is int and type(rows[0]["seconds"]) is float
    dense = rows[1]
    assert dense["size"] is None and dense["val_error"] is None and math.isnan(dense["test_error"])
    assert dense["seconds"] == 1000.0 and dense["weights"] == 266200


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.replace(",run_dir", ""), "lacks the column(s) run_dir"),
    (lambda t: t.replace(",3000,0,3000,", ",3000,0,3k,"), "line 2: weights is '3k', not an integer"),
    (lambda t: t.replace("0.0209", "low"), "line 2: test_error is 'low', not a number"),
])
def test_read_curves_csv_names_what_is_wrong(edit, message):
    from nestsynth.report.curves import format_curves_csv, read_curves_csv

    with pytest.raises(ValueError) as err:
        read_curves_csv(edit(format_curves_csv(_curve_rows())))
    assert message in str(err.value)


def test_merge_curves_keeps_earlier_rows_and_sorts_them(tmp_path):
    from nestsynth.report.curves import format_curves_csv, format_curves_markdown, read_curves_csv

    bench = _bench("curves")
    first = _curve_rows()[0]
    later = [dict(first, seed=2, test_error=0.0195, run_dir="nest/size3000/seed2"),
             dict(first, seed=1, test_error=0.0208, run_dir="nest/size3000/seed1")]
    out, results = tmp_path / "out", tmp_path / "results"
    out.mkdir(), results.mkdir()
    (out / "curves.csv").write_text(format_curves_csv(later))
    (out / "curves.md").write_text(format_curves_markdown(later, "t", ["- **nest**: later"]))
    bench.merge_curves(format_curves_csv([first]), out, results, "--merge", "- **nest**: first")
    rows = read_curves_csv((results / "curves.csv").read_text())
    assert [r["seed"] for r in rows] == [0, 1, 2]
    assert [r["test_error"] for r in rows] == [0.0209, 0.0208, 0.0195]
    md = (results / "curves.md").read_text()
    assert "1 rows kept" in md and "2.04 ± 0.08" in md


def test_joined_curves_later_sources_replace_rows_of_the_same_run(tmp_path, monkeypatch):
    from nestsynth.report.curves import format_curves_csv, read_curves_csv

    from nestsynth.report.curves import join_curve_rows

    bench = _bench("join_curves")
    nest, dense = _curve_rows()
    old = [dict(nest, seed=s, test_error=0.03) for s in (0, 1)] + [dict(nest, size=8000, seed=0), dense]
    new = [dict(nest, seed=1, test_error=0.02), dict(nest, method="l0", seed=0)]
    rows, kept = join_curve_rows([old, new])
    assert kept == [3, 2]
    assert [(r["method"], r["size"], r["seed"], r["test_error"]) for r in rows][:4] == [
        ("nest", 3000, 0, 0.03), ("nest", 3000, 1, 0.02), ("nest", 8000, 0, 0.0209), ("dense", None, 1, rows[3]["test_error"])]
    assert rows[4]["method"] == "l0"
    # the script: reads committed folders, writes the joined csv, refuses a missing source in one line
    monkeypatch.setattr(bench, "ROOT", tmp_path)
    for name, table in (("a", old), ("b", new)):
        (tmp_path / "bench" / "results" / name).mkdir(parents=True)
        (tmp_path / "bench" / "results" / name / "curves.csv").write_text(format_curves_csv(table))
    assert bench.main(["--name", "ab", "a", "b"]) == 0
    assert len(read_curves_csv((tmp_path / "bench" / "results" / "ab" / "curves.csv").read_text())) == 5
    assert "3 of the 4 rows of `a`" in (tmp_path / "bench" / "results" / "ab" / "curves.md").read_text()
    assert bench.main(["--name", "x", "a", "missing"]) == 2


def test_join_curves_collects_the_finished_runs_of_a_cut_off_compare(tmp_path, monkeypatch):
    import json

    from nestsynth.report.curves import read_curves_csv

    bench = _bench("join_curves")
    runs = tmp_path / "cut"
    for rel, method, seed, err in (("nest/size3000/seed1", "nest", 1, 0.021), ("l0/size8000/seed0", "l0", 0, 0.013),
                                   ("dense/seed0", "dense", 0, 0.016)):
        (runs / rel).mkdir(parents=True)
        (runs / rel / "report.json").write_text(json.dumps({
            "method": method, "seed": seed, "test_error": err, "val_error": err + 0.001, "wall_seconds": 9.5,
            "weights": {"final": 2990}, "flops": {"final": 5980, "final_act": 4000}, "budget": {"epochs": 60}}))
    (runs / "nest" / "size5000" / "seed0").mkdir(parents=True)  # cut off: no report.json
    rows = bench.rows_of_runs(runs)
    assert [(r["method"], r["size"], r["seed"], r["test_error"], r["epochs"], r["run_dir"]) for r in rows] == [
        ("dense", None, 0, 0.016, 60, "dense/seed0"), ("l0", 8000, 0, 0.013, 60, "l0/size8000/seed0"),
        ("nest", 3000, 1, 0.021, 60, "nest/size3000/seed1")]
    monkeypatch.setattr(bench, "ROOT", tmp_path)
    assert bench.main(["--name", "joined", str(runs)]) == 0
    assert len(read_curves_csv((tmp_path / "bench" / "results" / "joined" / "curves.csv").read_text())) == 3
    kept = tmp_path / "bench" / "results" / "joined" / "runs" / "cut" / "nest" / "size3000" / "seed1" / "report.json"
    assert kept.read_text() == (runs / "nest" / "size3000" / "seed1" / "report.json").read_text()
    (tmp_path / "empty").mkdir()
    assert bench.main(["--name", "x", str(tmp_path / "empty")]) == 2
