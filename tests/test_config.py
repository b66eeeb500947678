"""nestsynth.config: TOML files, --set overrides, validation, round trips and digests."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest

from nestsynth import config as C
from nestsynth.config import Config
from nestsynth.errors import NestError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def test_toml_file_and_overrides(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('model = "lenet-500-150"\nseed = 3\n[growth]\nalpha = 1\nmax_iterations = 4\n'
                    '[pruning]\nrate = 0.05\n')
    cfg = C.load(path, ["growth.beta=1", "pruning.max_iterations=7", "seed_net.ratio=0.25",
                        "growth.target=0.02", "data.dataset=npz:/tmp/x.npz", "growth.neurons=false"])
    assert cfg.model == "lenet-500-150" and cfg.seed == 3
    assert cfg.growth.alpha == 1.0 and type(cfg.growth.alpha) is float      # int -> float
    assert cfg.growth.beta == 1.0 and type(cfg.growth.beta) is float
    assert cfg.growth.max_iterations == 4 and type(cfg.growth.max_iterations) is int
    assert cfg.pruning.rate == 0.05 and cfg.pruning.max_iterations == 7
    assert cfg.seed_net.ratio == 0.25
    assert cfg.growth.target == "0.02" and cfg.target_error == pytest.approx(0.02)
    assert cfg.data.dataset == "npz:/tmp/x.npz"                               # bare string
    assert cfg.growth.neurons is False
    # untouched values keep their defaults
    assert cfg.train == C.TrainConfig() and cfg.dense == C.DenseConfig()


def test_overrides_do_not_mutate_base():
    base = Config()
    cfg = C.load(None, ["growth.alpha=0.9"], base=base)
    assert cfg.growth.alpha == 0.9 and base.growth.alpha == Config().growth.alpha


@pytest.mark.parametrize("item,name", [("growth.foo=1", "growth.foo"), ("nosuch=1", "nosuch"),
                                       ("pruning.rate.x=1", "pruning.rate")])
def test_unknown_or_misplaced_key(item, name):
    with pytest.raises(NestError, match=name.replace(".", r"\.")):
        C.load(None, [item])


def test_unknown_key_in_file(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[growth]\nalhpa = 0.5\n")
    with pytest.raises(NestError, match=r"growth\.alhpa"):
        C.load(path)


@pytest.mark.parametrize("item", ["growth.alpha", "=3", "growth..alpha=1", ""])
def test_malformed_override(item):
    with pytest.raises(NestError):
        C.load(None, [item])


@pytest.mark.parametrize("item", [
    "seed_net.ratio=-0.5", "seed_net.ratio=0", "seed_net.density=0", "seed_net.density=1.5",
    "pruning.rate=1.5", "pruning.rate=0", 'growth.target="abc"', "growth.target=abc", "growth.target=1.5",
    "growth.max_iterations=-1", "train.lr=0", "data.val_fraction=1", "growth.beta=0",
    "growth.sign=up", "train.optimizer=rmsprop", "device=tpu",
    # wrong types
    "seed=1.5", "growth.enabled=1", "dense.epochs=2.0", "growth.alpha=true",
])
def test_out_of_range_or_wrong_type(item):
    with pytest.raises(NestError):
        C.load(None, [item])


def test_bad_files(tmp_path):
    with pytest.raises(NestError, match="does not exist"):
        C.load(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("model = = 3\n")
    with pytest.raises(NestError):
        C.load(bad)
    section = tmp_path / "section.toml"
    section.write_text("growth = 3\n")
    with pytest.raises(NestError, match="growth"):
        C.load(section)


def test_to_toml_round_trip(tmp_path):
    cfg = C.load(None, ["growth.alpha=0.7", "pruning.schedule=\"cubic\"", "seed=5", "data.data_dir=\"/d\"",
                        "growth.target=0.03", "device=cpu"])
    text = cfg.to_toml()
    again = C.from_dict(tomllib.loads(text))
    assert again == cfg
    path = tmp_path / "config.toml"
    path.write_text(text)
    assert C.load(path) == cfg
    assert Config().to_toml() and C.from_dict(tomllib.loads(Config().to_toml())) == Config()


def test_digest_ignores_location_and_device_only():
    base = Config()
    d = base.digest()
    assert isinstance(d, str) and len(d) == 16
    assert dataclasses.replace(base, device="cpu").digest() == d
    moved = C.load(None, ['data.data_dir="/elsewhere"', "device=cuda"])
    assert moved.digest() == d
    assert C.load(None, ["seed=1"]).digest() != d
    assert C.load(None, ["growth.alpha=0.51"]).digest() != d
    assert C.load(None, ["data.val_fraction=0.2"]).digest() != d
    assert base.digest() == d  # computing the digest does not alter the config
    assert base.data.data_dir == "" and base.device == "auto"


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.toml")),
                         ids=lambda p: p.name)
def test_every_shipped_config_loads_and_validates(path):
    """A shipped config with a typo or an out-of-range value would fail only when a user runs it."""
    cfg = C.load(path)
    assert cfg.model and cfg.digest() == C.load(path).digest()
