"""Methods in one harness: config sections, `prune --method`, `compare`, `methods`."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from nestsynth import config as C
from nestsynth.errors import NestError
from test_cli import QUICK, _call, _one_error_line, _snapshot

FAST = ["--set", "train.batch_size=64", "--set", "methods.oneshot.dense_epochs=2",
        "--set", "methods.oneshot.finetune_epochs=1", "--set", "methods.oneshot.sparsity=0.9",
        "--set", "methods.dense.epochs=2"]
NEST_FAST = ["--set", "growth.max_iterations=2", "--set", "growth.epochs_per_iteration=3",
             "--set", "dense.epochs=3", "--set", "pruning.max_iterations=3", "--set", "pruning.retrain_epochs=1"]


def test_nest_digest_ignores_method_sections():
    """A NeST run's identity does not depend on the baselines' settings (old runs resume)."""
    plain = C.Config()
    other = C.from_dict({"methods": {"oneshot": {"sparsity": 0.5}, "han": {"iterations": 2}}})
    assert other.digest() == plain.digest()
    assert "methods" not in plain.to_dict() and "method" not in plain.to_dict()


def test_baseline_config_keeps_only_its_section_and_round_trips(tmp_path):
    cfg = C.from_dict({"method": "oneshot", "methods": {"oneshot": {"sparsity": 0.8}}, "seed": 3})
    d = cfg.to_dict()
    assert list(d["methods"]) == ["oneshot"] and "growth" not in d and "pruning" not in d
    path = tmp_path / "c.toml"
    path.write_text(cfg.to_toml())
    back = C.load(path)
    assert back.digest() == cfg.digest() and back.methods.oneshot.sparsity == 0.8 and back.seed == 3
    # changing the method's own setting changes the identity
    assert C.from_dict({"methods": {"oneshot": {"sparsity": 0.7}}}, cfg).digest() != cfg.digest()


def test_unknown_method_and_bad_method_values():
    with pytest.raises(NestError, match="unknown method 'nope'; known methods: nest, dense"):
        C.from_dict({"method": "nope"})
    with pytest.raises(NestError, match="unknown config key 'methods.nope'"):
        C.from_dict({"methods": {"nope": {}}})
    with pytest.raises(NestError, match="methods.oneshot.sparsity"):
        C.from_dict({"method": "oneshot", "methods": {"oneshot": {"sparsity": -0.1}}})


def test_cli_prune_errors_are_one_sentence(tmp_path):
    rc, _, err = _call(["prune", "--method", "nope", "--dataset", "digits", "--out", tmp_path / "r"])
    assert rc == 2 and "unknown method 'nope'" in _one_error_line(err)
    rc, _, err = _call(["prune", "--method", "oneshot", "--dataset", "digits", "--out", tmp_path / "r",
                        "--set", "methods.oneshot.sparsity=1.5"])
    assert rc == 2 and "methods.oneshot.sparsity" in _one_error_line(err)
    assert not (tmp_path / "r").exists()


def test_cli_prune_oneshot_writes_a_run(tmp_path):
    run = tmp_path / "oneshot"
    rc, out, err = _call(["prune", "--method", "oneshot", "--dataset", "digits", "--out", run, "--quiet",
                          "--device", "cpu", *FAST])
    assert rc == 0, err
    report = json.loads((run / "report.json").read_text())
    assert report["method"] == "oneshot" and report["budget"]["epochs"] == 3
    widths = [64, 300, 100, 10]
    kept = [round(a * b * (1 - 0.9)) for a, b in zip(widths[:-1], widths[1:])]  # layer scope: exact per layer
    assert [r["weights"] for r in report["layers"]] == kept
    assert report["weights"]["final"] == sum(kept) and f"weights: final {sum(kept)}" in out
    assert report["dense_reference"]["test_error"] is not None  # oneshot trained a dense model first
    assert (run / "model.pt").is_file() and (run / "plots" / "connections.png").is_file()
    # the same run again is refused without --resume, and nothing is touched
    before = _snapshot(run)
    rc, _, err = _call(["prune", "--method", "oneshot", "--dataset", "digits", "--out", run, *FAST])
    assert rc == 2 and "already holds a run" in _one_error_line(err)
    assert _snapshot(run) == before


def test_compare_two_seeds_writes_three_files_and_reuses_runs(tmp_path):
    out = tmp_path / "cmp"
    argv = ["compare", "--methods", "nest,dense,oneshot", "--seeds", "2", "--config", QUICK, "--out", out,
            "--device", "cpu", *FAST, *NEST_FAST]
    rc, stdout, err = _call(argv)
    assert rc == 0, err
    for name in ("comparison.md", "comparison.csv", "pareto.png"):
        assert (out / name).is_file(), name
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = list(csv.DictReader((out / "comparison.csv").open()))
    assert [(r["method"], r["seed"]) for r in rows] == [(m, s) for m in ("nest", "dense", "oneshot")
                                                        for s in ("0", "1")]
    for r in rows:  # each CSV row is the run's own report
        assert r["run_dir"] == f"{r['method']}/seed{r['seed']}"  # relative to the comparison directory
        report = json.loads((out / r["run_dir"] / "report.json").read_text())
        assert int(r["weights"]) == report["weights"]["final"]
        assert float(r["test_error"]) == pytest.approx(report["test_error"])
    dense = [r for r in rows if r["method"] == "dense"]
    assert all(int(r["weights"]) == 64 * 300 + 300 * 100 + 100 * 10 for r in dense)
    table = (out / "comparison.md").read_text()
    for m in ("nest", "dense", "oneshot"):
        assert f"| {m} | 2 |" in table
    errors = [100 * float(r["test_error"]) for r in rows if r["method"] == "oneshot"]
    mean = sum(errors) / 2
    assert f"| oneshot | 2 | {mean:.2f} ±" in table
    # a second call reuses every finished run (no report is rewritten)
    reports = {p: p.stat().st_mtime_ns for p in out.rglob("report.json")}
    rc, stdout, err = _call(argv)
    assert rc == 0 and stdout.count("reused") == 6
    assert {p: p.stat().st_mtime_ns for p in out.rglob("report.json")} == reports
    # a changed setting is refused for the directory that holds the old one
    rc, _, err = _call(argv + ["--set", "methods.dense.epochs=3"])
    assert rc == 2 and "holds a run of another config" in _one_error_line(err)


def test_methods_command_lists_every_registered_method():
    rc, out, _ = _call(["methods", "--json"])
    names = [r["name"] for r in json.loads(out)]
    assert rc == 0 and names[0] == "nest"
    assert {"dense", "random", "han", "oneshot", "gradual", "lottery", "snip", "grasp"} <= set(names)


def test_cli_compress_a_baseline_run(tmp_path):
    run = tmp_path / "dense"
    rc, _, err = _call(["prune", "--method", "dense", "--dataset", "digits", "--model", "mlp:64-16-10",
                        "--out", run, "--quiet", "--device", "cpu", "--set", "methods.dense.epochs=2"])
    assert rc == 0, err
    before = _snapshot(run)
    rc, _, err = _call(["compress", run, "--bits", "0"])
    assert rc == 2 and "bits" in _one_error_line(err) and _snapshot(run) == before
    rc, out, err = _call(["compress", run, "--bits", "3", "--json"])
    assert rc == 0, err
    result = json.loads((run / "compression.json").read_text())
    assert json.loads(out) == result
    assert result["bytes"]["dense"] == 4 * (64 * 16 + 16 + 16 * 10 + 10)  # every weight and bias at 32 bits
    assert result["bytes"]["huffman"] < result["bytes"]["shared"] < result["bytes"]["dense"]
    rc, out, _ = _call(["compress", run, "--bits", "3"])
    assert rc == 0 and "total" in out and "dense" in out
