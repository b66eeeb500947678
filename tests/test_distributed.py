"""Several processes under torchrun (gloo on the CPU): identical masks on every rank, results
close to one process, a forced mismatch caught, resume, Ctrl-C; the CUDA path when a GPU exists.

Every multi-process test launches ``python -m torch.distributed.run --standalone
--nproc_per_node=2 -m nestsynth ...`` on the bundled digits with a short budget and one
thread per process.

Tolerance against one process: the two processes sum two half-batch gradients (and two
half-sample scans) where one process sums one batch, so the floating-point additions come
in another order and the weights differ in their last bits.  A mask is chosen by a top-k or
threshold over those numbers, so a borderline entry could go the other way, and the
difference then grows with the steps that follow.  So the comparison is not exact: the
per-row training loss must agree to 1e-4 (relative), the active weights of every logged
row to 1% and the validation and test errors to 2 percentage points (6 of the 288
validation examples).  On this machine the runs below agree exactly in every mask count
and error and in the loss to ~1e-8.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nestsynth import distributed
from nestsynth.cli import main
from nestsynth.sparse import SparseMLP

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "digits-quick.toml")
SHORT = ["--set", "dense.epochs=2", "--set", "growth.max_iterations=3", "--set", "growth.epochs_per_iteration=1",
         "--set", "pruning.max_iterations=3", "--set", "pruning.retrain_epochs=1", "--set", "pruning.recover_epochs=0",
         "--set", "train.min_steps_per_epoch=20"]
GRADUAL = ["--method", "gradual", "--dataset", "digits", "--model", "mlp:64-64-32-10",
           "--set", "methods.gradual.epochs=4", "--set", "methods.gradual.begin_epoch=1",
           "--set", "methods.gradual.end_epoch=3", "--set", "methods.gradual.frequency=10",
           "--set", "train.min_steps_per_epoch=20"]


def _env(**extra) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **extra}
    env.pop("WORLD_SIZE", None)
    return env


def torchrun(args: list[str], n: int = 2, timeout: float = 240, **env) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node=n -m nestsynth ARGS`` (one thread per process)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
           "-m", "nestsynth", *args]
    return subprocess.run(cmd, cwd=ROOT, env=_env(**env), capture_output=True, text=True, timeout=timeout)


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _report(run: Path) -> dict:
    return json.loads((run / "report.json").read_text())


def _assert_close(one: Path, two: Path) -> None:
    """The 2-process run matches the single-process one within the module's tolerance."""
    a, b = _rows(one), _rows(two)
    assert [(r["phase"], r["iteration"]) for r in a] == [(r["phase"], r["iteration"]) for r in b]
    for x, y in zip(a, b):
        assert abs(x["weights"] - y["weights"]) <= 0.01 * x["weights"], (x, y)
        assert abs(x["val_error"] - y["val_error"]) <= 0.02, (x, y)
        if x.get("train_loss") is not None:
            assert y["train_loss"] == pytest.approx(x["train_loss"], rel=1e-4)
    ra, rb = _report(one), _report(two)
    assert abs(ra["test_error"] - rb["test_error"]) <= 0.02
    assert "distributed" not in ra  # a single process's report is as it was


def _assert_checked(run: Path, batch: int = 128, lr: float = 0.001) -> dict:
    """report.json's distributed block: one mask comparison per logged row, none failed."""
    d = _report(run)["distributed"]
    assert d == {"world_size": 2, "backend": "gloo", "mask_checks": len(_rows(run)), "mask_mismatches": 0,
                 "total_batch": batch, "batch_per_rank": batch / 2, "lr": lr}
    assert not (run / ".lock").exists()
    return d


# ---- single process: every helper is a no-op ------------------------------------------------
def test_single_process_is_a_no_op():
    d = distributed.current()
    assert not d.active and d.is_main and d.world_size == 1 and d.backend is None
    x, y = torch.arange(6.0), torch.arange(6)
    assert all(a is b for a, b in zip(d.shard(x, y), (x, y)))
    t = torch.ones(3)
    d.all_reduce_sum([t])
    assert t.tolist() == [1.0, 1.0, 1.0]
    d.check_masks(SparseMLP([4, 3, 2]), "anywhere")
    assert d.mask_checks == 0


def test_mask_digest_sees_one_bit_and_the_widths():
    a, b = SparseMLP([4, 3, 2]), SparseMLP([4, 3, 2])
    assert distributed.mask_digest(a) == distributed.mask_digest(b)
    b.layers[1].mask.view(-1)[4] = 0
    assert distributed.mask_digest(a) != distributed.mask_digest(b)
    assert distributed.mask_digest(SparseMLP([4, 3, 2])) != distributed.mask_digest(SparseMLP([4, 5, 2]))


def test_shard_splits_the_rows_without_overlap():
    parts = [distributed.Dist(3, r).shard(torch.arange(8))[0].tolist() for r in range(3)]
    assert parts == [[0, 1, 2], [3, 4, 5], [6, 7]]


def test_an_empty_part_gets_a_stand_in_row():
    x, y = torch.arange(1.0), torch.arange(1)
    (xs, ys), stand_in = distributed.Dist(2, 0).shard_or_stand_in(x, y)
    assert not stand_in and xs.tolist() == [0.0] and ys.tolist() == [0]
    (xs, ys), stand_in = distributed.Dist(2, 1).shard_or_stand_in(x, y)  # 1 row for 2 ranks: rank 1 has none
    assert stand_in and xs.tolist() == [0.0] and ys.tolist() == [0]
    (xs,), stand_in = distributed.Dist(2, 1).shard_or_stand_in(x[:0])  # no rows anywhere: nothing to stand in
    assert not stand_in and len(xs) == 0


def test_augmenting_slices_equals_augmenting_the_batch():
    """A rank distorts only its rows of the global batch, with the draws of the whole batch, so
    the slices put together are the single-process batch and the generator stays in step."""
    from nestsynth.data import random_affine

    x = torch.rand(7, 1, 8, 8)
    whole_gen, part_gen = torch.Generator().manual_seed(3), [torch.Generator().manual_seed(3) for _ in range(3)]
    whole = random_affine(x, whole_gen)
    parts = []
    for rank, gen in enumerate(part_gen):
        lo, hi = distributed.Dist(3, rank).bounds(len(x))
        parts.append(random_affine(x[lo:hi], gen, batch=len(x), start=lo))
        assert torch.equal(gen.get_state(), whole_gen.get_state())
    assert torch.equal(torch.cat(parts), whole)
    empty_gen = torch.Generator().manual_seed(3)
    assert random_affine(x[:0], empty_gen, batch=len(x), start=7).shape == (0, 1, 8, 8)
    assert torch.equal(empty_gen.get_state(), whole_gen.get_state())


# ---- two processes ------------------------------------------------------------------------------
SCANS = ["gradient_scan", "gradient_scan_cnn", "dormant_topk_cached", "dormant_topk_uncached", "output_statistics", "evaluate", "area_scores",
         "feature_map_statistics", "grow_feature_maps_gradient", "grow_feature_maps_random", "group_bridging_gradient",
         "group_statistics", "grow_group_maps", "mean_gradient", "hessian_gradient", "layer_hessian",
         "layer_hessian_conv", "mean_activations", "sensitivity", "sensitivity_cnn"]


def _probe(*args: str) -> None:
    """tests/dist_scans_probe.py on 2 ranks: every scan printed OK on both."""
    import re

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests" / "dist_scans_probe.py"), *args]
    r = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    found = re.findall(r"(OK|BAD) (\w+) \(largest difference", r.stdout)
    assert sorted(name for verdict, name in found if verdict == "OK") == sorted(SCANS * 2), r.stdout


def test_every_sharded_scan_equals_the_whole_scan():
    """Oracle: on each of 2 ranks every score computed on the rank's part of the sample and
    summed across ranks equals (1e-4 relative) the score computed alone on the whole sample,
    and Policy 3 picks the same units (tests/dist_scans_probe.py)."""
    _probe()


def test_a_rank_with_no_examples_enters_every_collective():
    """A scan sample of 1 example on 2 ranks: rank 1's part is empty, yet it runs every
    collective rank 0 runs (with zeros of the same shapes), so every scan ends in seconds
    with the single-process result; a rank that skipped one (feature-map and group
    statistics once returned early) would fail the probe after its 20 s collective timeout."""
    _probe("--examples", "1", "--timeout", "20")


def test_nest_two_processes_match_one(tmp_path):
    """NeST on an MLP with augmented images (each rank distorts its slice with the batch's draws)."""
    one, two = tmp_path / "one", tmp_path / "two"
    sets = [*SHORT, "--set", "data.augment=true"]
    assert main(["synthesize", "--config", CONFIG, "--out", str(one), "--quiet", *sets]) == 0
    r = torchrun(["synthesize", "--config", CONFIG, "--out", str(two), *sets])
    assert r.returncode == 0, r.stderr[-3000:]
    _assert_checked(two)
    _assert_close(one, two)
    assert r.stdout.count("run directory:") == 1  # rank 0 alone prints
    assert "2 processes (gloo): a total batch of 128, 64 per process, learning rate 0.001" in r.stdout


def test_baseline_two_processes_match_one(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["prune", *GRADUAL, "--out", str(one), "--quiet"]) == 0
    r = torchrun(["prune", *GRADUAL, "--out", str(two), "--quiet"])
    assert r.returncode == 0, r.stderr[-3000:]
    _assert_checked(two)
    _assert_close(one, two)


@pytest.mark.slow
def test_gated_nest_two_processes_match_one(tmp_path):
    """pruning.criterion = "l0": the gates' penalty is added once across ranks and their noise is
    drawn in step on every rank (the gated rows, the projection and fine-tuning agree)."""
    sets = [*SHORT, "--set", "dense.epochs=1", "--set", "growth.max_iterations=2", "--set", 'pruning.criterion="l0"',
            "--set", "pruning.target_weights=1200", "--set", "pruning.budget_epochs=8", "--set", "pruning.final_epochs=1"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["synthesize", "--config", CONFIG, "--out", str(one), "--quiet", *sets]) == 0
    r = torchrun(["synthesize", "--config", CONFIG, "--out", str(two), "--quiet", *sets])
    assert r.returncode == 0, r.stderr[-3000:]
    _assert_checked(two)
    _assert_close(one, two)
    assert [x.get("expected_l0") for x in _rows(one)] == pytest.approx([x.get("expected_l0") for x in _rows(two)],
                                                                       rel=1e-3)
    assert _report(two)["weights"]["final"] == 1200


@pytest.mark.slow
def test_cnn_two_processes_match_one(tmp_path):
    """A CNN: feature-map growth, partial-area scores and feature-map statistics under 2 ranks."""
    config = str(ROOT / "configs" / "digits-cnn-quick.toml")
    sets = [*SHORT, "--set", "dense.epochs=1"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["synthesize", "--config", config, "--out", str(one), "--quiet", *sets]) == 0
    r = torchrun(["synthesize", "--config", config, "--out", str(two), "--quiet", *sets])
    assert r.returncode == 0, r.stderr[-3000:]
    _assert_checked(two, batch=64, lr=0.01)
    _assert_close(one, two)
    assert [x.get("pruned_area") for x in _rows(one)] == [x.get("pruned_area") for x in _rows(two)]


@pytest.mark.slow
@pytest.mark.parametrize("method, sets", [
    ("snip", ["--set", "methods.snip.epochs=2"]),
    ("lobs", ["--set", "methods.lobs.dense_epochs=2", "--set", "methods.lobs.retrain_epochs=1"]),
    ("n2ps", ["--set", "methods.n2ps.dense_epochs=2", "--set", "methods.n2ps.retrain_epochs=1"]),
    ("sensitivity", ["--set", "methods.sensitivity.epochs=2"]),
])
def test_sharded_scans_match_one_process(tmp_path, method, sets):
    """The baselines whose scores are sharded and summed (gradients, Hessians, activations)."""
    args = ["prune", "--method", method, "--dataset", "digits", "--model", "mlp:64-64-32-10", "--quiet",
            "--set", "train.min_steps_per_epoch=30", *sets]
    one, two = tmp_path / "one", tmp_path / "two"
    assert main([*args, "--out", str(one)]) == 0
    r = torchrun([*args, "--out", str(two)])
    assert r.returncode == 0, r.stderr[-3000:]
    _assert_checked(two)
    _assert_close(one, two)


def test_forced_mismatch_stops_every_rank_with_one_sentence(tmp_path):
    out = tmp_path / "run"
    r = torchrun(["synthesize", "--config", CONFIG, "--out", str(out), "--quiet", *SHORT],
                 **{distributed.FLIP_ENV: "1:3"})  # rank 1 flips a bit before the third check (growth 0)
    assert r.returncode != 0
    sentence = ("nestsynth: error: the ranks' masks differ after growth 0 (rank 1 against rank 0), so the "
                "processes no longer train one network")
    assert (r.stdout + r.stderr).count(sentence) == 1
    assert "exitcode  : 2" in r.stderr  # both workers exited with the user-error status, no hang
    assert 'nestsynth/' not in r.stderr.split("ChildFailedError")[0]  # no traceback of ours
    assert not (out / "report.json").exists() and not (out / ".lock").exists()


LONGER = [*SHORT, "--set", "growth.max_iterations=6", "--set", "train.min_steps_per_epoch=150"]


def _launch_until_growth(out: Path, rows: int = 2) -> subprocess.Popen:
    """A 2-process synthesis (``LONGER``) in its own process group, returned once ``rows``
    growth rows are in its metrics.jsonl."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "nestsynth",
           "synthesize", "--config", CONFIG, "--out", str(out), "--quiet", *LONGER]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        metrics = out / "metrics.jsonl"
        if metrics.is_file() and metrics.read_text().count('"phase": "growth"') >= rows:
            return proc
        time.sleep(0.02)
    proc.kill()
    raise AssertionError("the run ended before it could be interrupted")


@pytest.mark.slow
def test_a_killed_rank_stops_the_other(tmp_path):
    """SIGKILL of rank 1 mid-run: rank 0 stops within seconds with one sentence, and the last
    checkpoint stays (the run can be resumed)."""
    out = tmp_path / "run"
    proc = _launch_until_growth(out)
    children = subprocess.run(["ps", "-o", "pid=", "--ppid", str(proc.pid)], capture_output=True, text=True)
    environ = {int(pid): dict(entry.split("=", 1) for entry in Path(f"/proc/{pid}/environ").read_text().split("\0")
                              if "=" in entry) for pid in children.stdout.split()}
    ranks = {int(env["RANK"]): pid for pid, env in environ.items() if "RANK" in env}
    assert sorted(ranks) == [0, 1]
    t0 = time.monotonic()
    os.kill(ranks[1], signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    assert time.monotonic() - t0 < 60 and proc.returncode != 0
    assert err.count("nestsynth: error: stopping because another process of this launch stopped") == 1
    assert (out / "checkpoints" / "last.pt").is_file() and not (out / ".lock").exists()


@pytest.mark.slow
def test_ctrl_c_then_resume_under_two_processes(tmp_path):
    """Ctrl-C (SIGINT to the launch's process group) stops both ranks; ``--resume`` under
    torchrun ends exactly where an uninterrupted 2-process run ends."""
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert torchrun(["synthesize", "--config", CONFIG, "--out", str(full), "--quiet", *LONGER]).returncode == 0
    proc = _launch_until_growth(cut)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and not (cut / "report.json").exists()
    assert "continue with nestsynth synthesize --out" in err
    r = torchrun(["synthesize", "--out", str(cut), "--resume", "--quiet"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert [(x["phase"], x["weights"], x["val_error"]) for x in _rows(cut)] == \
        [(x["phase"], x["weights"], x["val_error"]) for x in _rows(full)]
    a, b = _report(full), _report(cut)
    assert a["test_error"] == b["test_error"] and a["weights"] == b["weights"]
    ma = torch.load(full / "model.pt", weights_only=True)["model"]
    mb = torch.load(cut / "model.pt", weights_only=True)["model"]
    assert all(torch.equal(ma[k], mb[k]) for k in ma)
    assert b["distributed"]["mask_mismatches"] == 0 and b["distributed"]["mask_checks"] > 0


@pytest.mark.slow
def test_compare_under_two_processes(tmp_path):
    out = tmp_path / "cmp"
    r = torchrun(["compare", "--methods", "gradual,oneshot", "--seeds", "1", "--dataset", "digits",
                  "--model", "mlp:64-64-32-10", "--out", str(out), "--set", "train.min_steps_per_epoch=20",
                  "--set", "methods.gradual.epochs=3", "--set", "methods.gradual.begin_epoch=1",
                  "--set", "methods.gradual.end_epoch=2", "--set", "methods.gradual.frequency=10",
                  "--set", "methods.oneshot.dense_epochs=1", "--set", "methods.oneshot.finetune_epochs=1"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "comparison.md").is_file() and r.stdout.count("wrote ") >= 1
    for method in ("gradual", "oneshot"):  # counted per run, not summed over the launch
        _assert_checked(out / method / "seed0")


def test_compare_refuses_jobs_under_torchrun(tmp_path):
    r = torchrun(["compare", "--methods", "gradual", "--seeds", "1", "--dataset", "digits", "--jobs", "2",
                  "--model", "mlp:64-64-32-10", "--out", str(tmp_path / "cmp")])
    assert r.returncode != 0
    assert "nestsynth: error: --jobs runs several processes of its own" in r.stderr


# ---- CUDA --------------------------------------------------------------------------------------
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_synthesis(tmp_path):
    one = tmp_path / "one"
    assert main(["synthesize", "--config", CONFIG, "--out", str(one), "--quiet", "--device", "cuda", *SHORT]) == 0
    assert _report(one)["environment"]["device"].startswith("cuda")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_nccl_two_processes(tmp_path):
    out = tmp_path / "two"
    r = torchrun(["synthesize", "--config", CONFIG, "--out", str(out), "--quiet", "--device", "cuda", *SHORT])
    assert r.returncode == 0, r.stderr[-3000:]
    d = _report(out)["distributed"]
    assert d["backend"] == "nccl" and d["mask_checks"] == len(_rows(out)) and d["mask_mismatches"] == 0
