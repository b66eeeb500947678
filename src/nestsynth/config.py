"""Typed configuration for a synthesis run: one dataclass per concern.

A config is read from TOML (``--config FILE``), overridden with ``--set key=value``
(dotted keys, TOML values) and validated as a whole.  The fully resolved config is
written back to ``config.toml`` in the run directory, so a run is reproducible from
that file alone.

Each baseline's section ``[methods.NAME]`` is a dataclass that its module registers
here with :func:`register_method_section` (through
:func:`nestsynth.baselines.register_method`); this module reads that registry and
imports nothing from the methods.  Importing :mod:`nestsynth` (any of its modules)
loads :mod:`nestsynth.baselines`, so every method is registered before a Config is
built.
"""

from __future__ import annotations

import dataclasses
import hashlib
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import tomli_w

from .errors import NestError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass
class DataConfig:
    """Where the data comes from and how it is split and augmented."""

    dataset: str = "digits"
    data_dir: str = ""  # "" = $NESTSYNTH_DATA_DIR, then ~/.cache/nestsynth
    val_fraction: float = 0.1  # carved from the training set; decisions use it
    split_seed: int = 0
    augment: bool = False  # random affine distortion of training images
    rotate: float = 10.0  # degrees
    shift: float = 0.08  # fraction of the image size
    scale_min: float = 0.92
    scale_max: float = 1.08
    shear: float = 8.0  # degrees


@dataclass
class SeedNetConfig:
    """Seed architecture (paper §3.1, §4.1.1): hidden widths x ratio, connection density."""

    ratio: float = 0.4
    density: float = 0.1
    topology: str = "random"  # random | radix (RadiX-Net masks, density quantized; seeds/radix.py)


@dataclass
class TrainConfig:
    """Training between growth and pruning steps."""

    optimizer: str = "adam"  # adam | sgd
    lr: float = 1e-3
    momentum: float = 0.9  # sgd only
    weight_decay: float = 0.0
    schedule: str = "cosine"  # cosine: every training call anneals lr -> lr*min_lr_scale; constant
    min_lr_scale: float = 0.01
    batch_size: int = 128
    eval_batch_size: int = 2048
    # an epoch has at least this many optimizer steps (fresh permutations on small data);
    # 0 = one pass; MNIST (422 steps at batch 128) is unchanged (README, "Training budgets")
    min_steps_per_epoch: int = 150


@dataclass
class DenseConfig:
    """The dense reference: trained when growth.target = "dense" (its validation error
    becomes the target) or when ``train`` is true (reported only)."""

    epochs: int = 10
    train: bool = False


@dataclass
class GrowthConfig:
    """Growth phase (paper §3.2)."""

    enabled: bool = True
    target: str = "dense"  # "dense" or a validation error as a fraction, e.g. "0.02"
    max_iterations: int = 10
    epochs_per_iteration: int = 2
    score_samples: int = 0  # samples used for gradient scores; 0 = whole training set
    connections: bool = True
    connection_fraction: float = 0.02  # of the possible connections, per step
    connection_scope: str = "global"  # global: one |dL/dw| ranking over all layers; layer: a quota per layer
    neurons: bool = True
    neurons_per_step: int = 4  # per hidden layer, per step
    beta: float = 0.05  # growth ratio: top beta*M*N bridging pairs per new neuron
    alpha: float = 0.5  # birth strength (Eq. 7)
    sign: str = "descent"  # descent | paper: sign rule of Algorithm 1 (see growth/neurons.py)
    feature_maps_per_step: int = 2  # CNNs: new feature maps per conv layer per step (Policy 3)
    map_candidates: int = 8  # random kernel sets tried per new feature map; the best is kept
    map_density: float = 0.0  # share of a new map's kernel weights that are active; 0 = the layer's current density
    adam_warm: bool = False  # grown weights start with the layer's mean Adam second moment, not zero
    map_out: str = "gradient"  # a new map's outgoing weights: gradient (along -dL/dw_out) or random
    map_scale: str = "default"  # candidate kernels: default (PyTorch's 1/sqrt(fan_in)) or layer (the layer's |w|)
    max_epochs: int = 0  # growth ends before it would spend more epochs than this (dense reference included); 0 = no cap


@dataclass
class PruningConfig:
    """Pruning phase (paper §3.3.1, Policy 4)."""

    enabled: bool = True
    schedule: str = "constant"  # constant: `rate` of the remaining; cubic: s(t) to final_sparsity
    rate: float = 0.01
    final_sparsity: float = 0.9  # cubic only, relative to the post-growth weights
    schedule_steps: int = 100  # cubic only
    max_iterations: int = 400
    retrain_epochs: int = 1
    recover_epochs: int = 1  # extra epochs tried before pruning comes to rest
    tolerance: float = 0.002  # allowed rise of the validation error over the target
    layer_rest: bool = False  # on a rejected iteration freeze the smallest layer and go on (see README)
    backoff: int = 0  # on a rejected iteration halve rate and area_rate (at most this often) and go on
    neurons: bool = True
    neuron_threshold: float = 0.01  # relative to the layer's mean output magnitude
    min_weights: int = 1  # never prune a layer below this many connections
    lr_scale: float = 1.0  # learning rate of the retraining, relative to train.lr
    final_epochs: int = 0  # fine-tuning of the kept model (kept only if val improves)
    final_lr_scale: float = 0.1
    area: bool = True  # CNNs: partial-area convolution (Algorithm 2) in every pruning iteration
    area_rate: float = 0.01  # gamma: share of each conv layer's live output positions removed per iteration
    scope: str = "layer"  # layer: same share per layer (Policy 4); global: one |W*| ranking; lamp: one LAMP ranking;
    # erk: a size schedule's goal shared among layers by the Erdos-Renyi rule, |W*| ranked within each
    target_weights: int = 0  # > 0: prune on a cubic size schedule to this many connections (see README)
    budget_epochs: int = 0  # with target_weights: epochs of the whole synthesis (dense reference included); 0 = none
    schedule_share: float = 0.75  # with target_weights: share of the pruning iterations over which the size falls
    lr_schedule: str = "cycle"  # cycle: each retraining is one cosine cycle; phase: one cosine over the pruning phase
    guard: str = "warn"  # with target_weights: above the validation bound, warn (go on) or stop (keep the last good model)
    rewire: float = 0.0  # share of live connections dropped (smallest |W*|) and regrown (largest |dL/dw|) per iteration
    final_regrow: float = 0.0  # with target_weights: prune to (1 - r) of it, grow r back (Policy 1) before final_epochs
    criterion: str = "magnitude"  # magnitude: smallest |W*| (Policy 4); l0: learned hard-concrete gates (see README)
    gate_release: float = 25.0  # criterion l0: below the size goal lam falls this many times faster than it rises (1: symmetric)
    target_flops: int = 0  # criterion l0: > 0 steers the gates' expected FLOPs (2 per MAC) down to this (see README)
    distill: float = 0.0  # > 0: pruning and fine-tuning also fit the post-growth network's outputs, with this weight (see README)
    distill_temperature: float = 4.0  # softmax temperature of that distillation loss


@dataclass
class Config:
    """Everything a synthesis run depends on."""

    model: str = "lenet-300-100"
    method: str = "nest"  # nest, or a registered baseline (nestsynth.baselines)
    seed: int = 0
    device: str = "auto"
    data: DataConfig = field(default_factory=DataConfig)
    seed_net: SeedNetConfig = field(default_factory=SeedNetConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dense: DenseConfig = field(default_factory=DenseConfig)
    growth: GrowthConfig = field(default_factory=GrowthConfig)
    pruning: PruningConfig = field(default_factory=PruningConfig)
    # one section per baseline, [methods.NAME]; the type is built from the registered sections
    methods: Any = field(default_factory=lambda: methods_config_type()())

    # ---- (de)serialisation -------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The TOML layout.  Only what the run's method reads is kept: a NeST run has no
        ``method``/``methods`` keys (so its digest is that of earlier versions), and a
        baseline run keeps its own ``[methods.NAME]`` section instead of NeST's
        seed_net/dense/growth/pruning sections."""
        d = dataclasses.asdict(self)
        if self.method == NEST_METHOD:
            d.pop("method")
            d.pop("methods")
        else:
            d["methods"] = {self.method: d["methods"][self.method]}
            for key in ("seed_net", "dense", "growth", "pruning"):
                d.pop(key)
        return d

    def to_toml(self) -> str:
        return tomli_w.dumps(self.to_dict())

    def digest(self) -> str:
        """A short hash of everything that determines the result (used to match checkpoints).

        Where the data lives and which device runs the job are left out: a run may be
        resumed on another machine.  Only values that differ from the defaults enter
        the hash, so adding a new option (at a default that keeps the old behaviour)
        does not orphan existing runs.
        """
        values, defaults = self.to_dict(), Config(method=self.method).to_dict()
        for d in (values, defaults):
            d.pop("device")
            d["data"].pop("data_dir")
        d = _without_defaults(values, defaults)
        if self.method != NEST_METHOD:
            d["method"] = self.method
        return hashlib.sha256(tomli_w.dumps(d).encode()).hexdigest()[:16]

    @property
    def target_error(self) -> float | None:
        """The numeric growth target, or None when it is "dense"."""
        return None if self.growth.target == "dense" else float(self.growth.target)


NEST_METHOD = "nest"  # NeST itself: no [methods.NAME] section, listed before the baselines

# ---- method sections --------------------------------------------------------
_METHOD_SECTIONS: dict[str, type] = {}  # name -> dataclass of [methods.NAME], in registration order
_METHODS_TYPE: type | None = None


def register_method_section(name: str, section: type) -> None:
    """Add the section ``[methods.NAME]`` (a dataclass, built with its defaults) to Config.

    Raises:
        TypeError: ``section`` is not a dataclass.
        ValueError: ``name`` is taken (by another method or by NeST).
    """
    if not dataclasses.is_dataclass(section):
        raise TypeError(f"the config of method {name!r} must be a dataclass")
    if name in _METHOD_SECTIONS or name == NEST_METHOD:
        raise ValueError(f"method {name!r} is registered twice")
    _METHOD_SECTIONS[name] = section


def method_names() -> list[str]:
    """``nest`` followed by every method whose section is registered."""
    return [NEST_METHOD, *_METHOD_SECTIONS]


def methods_config_type() -> type:
    """A dataclass with one field per registered method, holding that method's config.

    It is built from the registered sections so that a new method only needs its own
    module; ``Config.methods`` is an instance of it (TOML sections ``[methods.NAME]``).
    """
    global _METHODS_TYPE
    if _METHODS_TYPE is None or [f.name for f in dataclasses.fields(_METHODS_TYPE)] != list(_METHOD_SECTIONS):
        fields = [(name, cls, dataclasses.field(default_factory=cls)) for name, cls in _METHOD_SECTIONS.items()]
        _METHODS_TYPE = dataclasses.make_dataclass("MethodsConfig", fields)
        _METHODS_TYPE.__module__ = __name__
    return _METHODS_TYPE


def _without_defaults(values: dict, defaults: dict) -> dict:
    """The entries of ``values`` (nested dicts) that differ from ``defaults``."""
    out = {}
    for key, value in values.items():
        base = defaults.get(key)
        if isinstance(value, dict) and isinstance(base, dict):
            sub = _without_defaults(value, base)
            if sub:
                out[key] = sub
        elif key not in defaults or value != base:
            out[key] = value
    return out


def _section_types(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


def _coerce(value: Any, typ: Any, key: str) -> Any:
    """Check ``value`` against the annotated type, converting ints to floats; floats must be
    finite and ints must fit in 64 bits."""
    import math

    if get_origin(typ) is Union:
        typ = next(t for t in get_args(typ) if t is not type(None))
    if typ is list or get_origin(typ) is list:  # list[int] etc.: check every element
        if not isinstance(value, list):
            raise NestError(f"config key {key!r} must be a list, got {value!r}.")
        (item,) = get_args(typ) or (Any,)
        return value if item is Any else [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value) if abs(value) < 2**1023 else math.inf
    if typ is float and isinstance(value, float) and not math.isfinite(value):
        raise NestError(f"config key {key!r} must be a finite number, got {value!r}.")
    if typ is int and isinstance(value, int) and not isinstance(value, bool) and not -2**63 <= value < 2**63:
        raise NestError(f"config key {key!r} must fit in 64 bits (-2**63 .. 2**63-1), got {value}.")
    if typ is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, typ) and not (typ is int and isinstance(value, bool)):
        return value
    raise NestError(f"config key {key!r} must be {typ.__name__}, got {value!r}.")


def from_dict(raw: dict[str, Any], base: Config | None = None) -> Config:
    """Build a Config from nested dicts (TOML layout), on top of ``base``.

    Raises:
        NestError: on an unknown key or a value of the wrong type.
    """
    cfg = dataclasses.replace(base) if base else Config()
    cfg = _merge(cfg, raw, prefix="")
    validate(cfg)
    return cfg


def _merge(obj: Any, raw: dict[str, Any], prefix: str) -> Any:
    types = _section_types(type(obj))
    updates = {}
    for key, value in raw.items():
        dotted = prefix + key
        if key not in types:
            known = ", ".join(prefix + k for k in types)
            raise NestError(f"unknown config key {dotted!r}; known keys: {known}.")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise NestError(f"config key {dotted!r} is a section; set {dotted}.<key> instead.")
            updates[key] = _merge(dataclasses.replace(current), value, dotted + ".")
        else:
            updates[key] = _coerce(value, types[key], dotted)
    return dataclasses.replace(obj, **updates)


def load(path: str | Path | None = None, overrides: list[str] | None = None,
         base: Config | None = None) -> Config:
    """Load a TOML config file (optional) and apply ``key=value`` overrides.

    Args:
        path: TOML file, or None for the defaults.
        overrides: strings such as ``"growth.alpha=0.5"``; the value is read as TOML
            (numbers, booleans, quoted strings), or as a bare string if that fails.
        base: config to start from (defaults when None).

    Returns:
        The validated Config.

    Raises:
        NestError: unreadable file, malformed override, unknown key, bad value.
    """
    cfg = dataclasses.replace(base) if base else Config()
    layers = ([read_toml(path)] if path is not None else []) + [parse_override(item) for item in overrides or []]
    for raw in layers:  # validated once, at the end: checks that tie keys together see every override
        cfg = _merge(cfg, raw, prefix="")
    validate(cfg)
    return cfg


def read_toml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    try:
        return tomllib.loads(p.read_text())
    except FileNotFoundError:
        raise NestError(f"config file {str(p)!r} does not exist.") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError, IsADirectoryError) as exc:
        raise NestError(f"config file {str(p)!r} is not valid TOML ({exc}).") from None


def parse_override(item: str) -> dict[str, Any]:
    """Turn ``"a.b=1"`` into ``{"a": {"b": 1}}``.

    Raises:
        NestError: when ``item`` has no ``=`` or an empty key.
    """
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise NestError(f"--set expects key=value (e.g. growth.alpha=0.5), got {item!r}.")
    try:
        value = tomllib.loads(f"v = {text.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = text.strip()
    nested: dict[str, Any] = {}
    node = nested
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return nested


def check(ok: bool, key: str, value: Any, valid: str) -> None:
    """Raise ``NestError("KEY = VALUE is out of range; it must be VALID.")`` unless ``ok``."""
    if not ok:
        raise NestError(f"{key} = {value!r} is out of range; it must be {valid}.")


_check = check


def validate(cfg: Config) -> None:
    """Range checks on every numeric option; one sentence for the first failure."""
    d, s, t, g, p = cfg.data, cfg.seed_net, cfg.train, cfg.growth, cfg.pruning
    _check(cfg.device in ("auto", "cpu", "cuda") or cfg.device.startswith("cuda:"),
           "device", cfg.device, "auto, cpu or cuda")
    _check(0 <= d.val_fraction < 1, "data.val_fraction", d.val_fraction, "in [0, 1)")
    _check(d.rotate >= 0 and d.shear >= 0 and 0 <= d.shift < 1, "data.rotate/shift/shear",
           (d.rotate, d.shift, d.shear), "non-negative (shift < 1)")
    _check(0 < d.scale_min <= d.scale_max, "data.scale_min/scale_max", (d.scale_min, d.scale_max),
           "positive with scale_min <= scale_max")
    _check(0 < s.ratio <= 1, "seed_net.ratio", s.ratio, "in (0, 1]")
    _check(0 < s.density <= 1, "seed_net.density", s.density, "in (0, 1]")
    _check(s.topology in ("random", "radix"), "seed_net.topology", s.topology, "random or radix")
    _check(t.optimizer in ("adam", "sgd"), "train.optimizer", t.optimizer, "adam or sgd")
    _check(t.lr > 0, "train.lr", t.lr, "positive")
    _check(t.schedule in ("cosine", "constant"), "train.schedule", t.schedule, "cosine or constant")
    _check(0 <= t.min_lr_scale <= 1, "train.min_lr_scale", t.min_lr_scale, "in [0, 1]")
    _check(p.lr_scale > 0, "pruning.lr_scale", p.lr_scale, "positive")
    _check(0 <= t.momentum < 1, "train.momentum", t.momentum, "in [0, 1)")
    _check(t.weight_decay >= 0, "train.weight_decay", t.weight_decay, "non-negative")
    _check(t.batch_size >= 1 and t.eval_batch_size >= 1, "train.batch_size", t.batch_size, ">= 1")
    _check(t.min_steps_per_epoch >= 0, "train.min_steps_per_epoch", t.min_steps_per_epoch, ">= 0")
    _check(cfg.dense.epochs >= 1, "dense.epochs", cfg.dense.epochs, ">= 1")
    if g.target != "dense":
        try:
            tgt = float(g.target)
        except ValueError:
            raise NestError(f"growth.target = {g.target!r} must be \"dense\" or an error "
                            "fraction such as 0.02.") from None
        _check(0 <= tgt < 1, "growth.target", g.target, "\"dense\" or a fraction in [0, 1)")
    for key in ("max_iterations", "epochs_per_iteration", "score_samples", "neurons_per_step"):
        _check(getattr(g, key) >= 0, f"growth.{key}", getattr(g, key), ">= 0")
    _check(0 <= g.connection_fraction <= 1, "growth.connection_fraction", g.connection_fraction,
           "in [0, 1]")
    _check(g.connection_scope in ("global", "layer"), "growth.connection_scope", g.connection_scope,
           "global or layer")
    _check(0 < g.beta <= 1, "growth.beta", g.beta, "in (0, 1]")
    _check(g.alpha > 0, "growth.alpha", g.alpha, "positive")
    _check(g.sign in ("descent", "paper"), "growth.sign", g.sign, "descent or paper")
    _check(p.schedule in ("constant", "cubic"), "pruning.schedule", p.schedule, "constant or cubic")
    _check(0 < p.rate < 1, "pruning.rate", p.rate, "in (0, 1)")
    _check(0 <= p.final_sparsity < 1, "pruning.final_sparsity", p.final_sparsity, "in [0, 1)")
    _check(p.schedule_steps >= 1, "pruning.schedule_steps", p.schedule_steps, ">= 1")
    for key in ("max_iterations", "retrain_epochs", "recover_epochs", "final_epochs", "backoff"):
        _check(getattr(p, key) >= 0, f"pruning.{key}", getattr(p, key), ">= 0")
    _check(p.min_weights >= 1, "pruning.min_weights", p.min_weights, ">= 1")
    _check(p.tolerance >= 0, "pruning.tolerance", p.tolerance, "non-negative")
    _check(p.neuron_threshold >= 0, "pruning.neuron_threshold", p.neuron_threshold, "non-negative")
    _check(p.final_lr_scale > 0, "pruning.final_lr_scale", p.final_lr_scale, "positive")
    _check(0 <= p.area_rate < 1, "pruning.area_rate", p.area_rate, "in [0, 1)")
    _check(p.scope in ("layer", "global", "lamp", "erk"), "pruning.scope", p.scope, "layer, global, lamp or erk")
    _check(p.target_weights >= 0, "pruning.target_weights", p.target_weights, ">= 0 (0: no size target)")
    _check(p.budget_epochs >= 0, "pruning.budget_epochs", p.budget_epochs, ">= 0 (0: no budget)")
    _check(p.gate_release >= 1, "pruning.gate_release", p.gate_release, ">= 1")
    _check(0 < p.schedule_share <= 1, "pruning.schedule_share", p.schedule_share, "in (0, 1]")
    _check(p.lr_schedule in ("cycle", "phase"), "pruning.lr_schedule", p.lr_schedule, "cycle or phase")
    _check(p.guard in ("warn", "stop"), "pruning.guard", p.guard, "warn or stop")
    _check(0 <= p.rewire < 1, "pruning.rewire", p.rewire, "in [0, 1)")
    _check(0 <= p.final_regrow < 1, "pruning.final_regrow", p.final_regrow, "in [0, 1)")
    _check(0 <= p.distill <= 1, "pruning.distill", p.distill, "in [0, 1]")
    _check(p.distill_temperature > 0, "pruning.distill_temperature", p.distill_temperature, "positive")
    _check(p.criterion in ("magnitude", "l0"), "pruning.criterion", p.criterion, "magnitude or l0")
    _check(p.target_flops >= 0, "pruning.target_flops", p.target_flops, ">= 0")
    if p.target_flops > 0:
        _check(p.criterion == "l0", "pruning.target_flops", p.target_flops, '0 unless pruning.criterion = "l0"')
    if p.criterion == "l0":
        _check(p.target_weights > 0, "pruning.target_weights", p.target_weights,
               '> 0 with pruning.criterion = "l0" (the gates are steered to a size)')
        for key in ("rewire", "final_regrow"):
            _check(getattr(p, key) == 0, f"pruning.{key}", getattr(p, key), '0 with pruning.criterion = "l0"')
        _check(p.guard == "warn", "pruning.guard", p.guard, 'warn with pruning.criterion = "l0"')
    _check(g.max_epochs >= 0, "growth.max_epochs", g.max_epochs, ">= 0 (0: no cap)")
    _check(g.feature_maps_per_step >= 0, "growth.feature_maps_per_step", g.feature_maps_per_step, ">= 0")
    _check(g.map_candidates >= 1, "growth.map_candidates", g.map_candidates, ">= 1")
    _check(0 <= g.map_density <= 1, "growth.map_density", g.map_density, "in [0, 1]")
    _check(g.map_scale in ("default", "layer"), "growth.map_scale", g.map_scale, "default or layer")
    _check(g.map_out in ("gradient", "random"), "growth.map_out", g.map_out, "gradient or random")
    _validate_method(cfg)


def _validate_method(cfg: Config) -> None:
    names = method_names()
    if cfg.method not in names:
        raise NestError(f"unknown method {cfg.method!r}; known methods: {', '.join(names)}.")
    if cfg.method != NEST_METHOD:
        mcfg = getattr(cfg.methods, cfg.method)
        if hasattr(mcfg, "validate"):
            mcfg.validate(f"methods.{cfg.method}")
