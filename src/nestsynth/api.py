"""The Python API: ``nestsynth.synthesize`` (NeST) and ``nestsynth.prune`` (any registered
method), both run by :func:`~nestsynth.baselines.runner.run_method`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import checkpoint as ckpt
from . import config as config_mod
from .config import Config
from .data import DataBundle, Dataset, load_dataset, split_validation
from .data.base import check_features, check_labels, check_training_size, count_classes
from .errors import NestError
from .registry import CNNSpec, GraphSpec, ModelSpec, get_model, in_features_of
from .sparse import SparseCNN, SparseMLP, cnn_from_sequential, from_sequential
from .baselines.registry import NEST
from .baselines.runner import run_method

DataLike = Any  # (X, y) tensors, a torch Dataset, or a nestsynth Dataset


def as_dataset(data: DataLike, what: str) -> Dataset:
    """Convert ``(X, y)`` or a map-style torch Dataset of (x, y) pairs to tensors.

    Inputs and labels are checked as strictly as the npz loader checks its arrays
    (numeric and finite inputs; integer labels >= 0).

    Raises:
        NestError: for anything else, X and y of different lengths, no samples, NaN or
            infinite inputs, negative, fractional or huge labels.
    """
    if isinstance(data, Dataset):
        X, y = data.X, data.y
    elif isinstance(data, (tuple, list)) and len(data) == 2:
        try:
            X, y = (torch.as_tensor(t) for t in data)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise NestError(f"the {what} data must be numeric tensors or arrays ({str(exc)[:80]}).") from None
    elif isinstance(data, torch.utils.data.Dataset):
        try:
            items = [data[i] for i in range(len(data))]
            X = torch.stack([torch.as_tensor(x) for x, _ in items]) if items else torch.zeros(0, 1)
            y = torch.as_tensor([t for _, t in items]).reshape(-1)
        except TypeError:
            raise NestError(f"the {what} data must be a map-style Dataset of (x, y) pairs with a length.") from None
        except (ValueError, RuntimeError) as exc:
            raise NestError(f"the {what} Dataset's samples are not numeric tensors of one shape "
                            f"({str(exc)[:80]}).") from None
    else:
        raise NestError(f"the {what} data must be a tuple (X, y) of tensors or a torch Dataset, "
                        f"got {type(data).__name__}.")
    if X.ndim < 1 or y.ndim < 1 or len(X) != len(y):
        raise NestError(f"the {what} data has {len(X) if X.ndim else 0} inputs but {len(y) if y.ndim else 0} "
                        "labels.")
    y = check_labels(y, f"the {what} data (y)")  # first: empty data is "no labels"
    return Dataset(check_features(X, f"the {what} data (X)"), y)


def bundle_from(train: DataLike, val: DataLike | None, test: DataLike | None, cfg: Config) -> DataBundle:
    """A DataBundle from user data; the validation split is carved from ``train`` if absent."""
    tr = as_dataset(train, "training")
    va = as_dataset(val, "validation") if val is not None else None
    te = as_dataset(test, "test") if test is not None else None
    shape = tuple(tr.X.shape[1:])
    for part, name in ((va, "validation"), (te, "test")):
        if part is not None and tuple(part.X.shape[1:]) != shape:
            raise NestError(f"the {name} inputs have shape {tuple(part.X.shape[1:])} but the "
                            f"training inputs have {shape}.")
    classes = count_classes(tr, [va, te], "the training data")  # before the split: every class in train
    if va is None:
        tr, va = split_validation(tr, cfg.data.val_fraction, cfg.data.split_seed)
    check_training_size(tr, classes, "the data")
    return DataBundle("user", tr, va, te, shape, classes)


def resolve_reference(model: str | nn.Module | ModelSpec | CNNSpec | GraphSpec, data: DataBundle):
    """The reference architecture for this data: a fitted spec (MLP, CNN or graph), a user's
    dense MLP, a user's CNN (as a CNNSpec named "custom"), or a user's network of any other
    shape (as a GraphSpec named "custom").

    A user's ``nn.Sequential`` that is a plain chain (Linear layers, or conv stages then
    Linear layers, with batch norm after every hidden layer or none) stays a SparseMLP /
    SparseCNN reference, so every method (NeST included) runs on it as before; any other
    ``nn.Module`` that :func:`nestsynth.graph.capture` accepts (residual adds,
    concatenations, batch norm on some layers only, a forward of its own) becomes a graph
    reference, which the baselines run on as a :class:`~nestsynth.graph.SparseGraph`.

    Raises:
        NestError: unknown model, an unsupported module (capture's one sentence), or a shape
            mismatch with the data.
    """
    features = in_features_of(data.input_shape)
    if isinstance(model, str):
        model = get_model(model)
    if isinstance(model, ModelSpec):
        return model.for_data(features, data.num_classes)
    if isinstance(model, (CNNSpec, GraphSpec)):
        return model.for_data(data.input_shape, data.num_classes)
    if isinstance(model, nn.Sequential):
        chain = _chain_of(model, data)
        model = chain if chain is not None else model
    if isinstance(model, SparseCNN):
        arch = model.arch()
        spec = CNNSpec("custom", tuple(arch["input_shape"]), tuple(arch["conv"]), tuple(arch["fc"]),
                       arch["batch_norm"], adaptive=False, description="user CNN")
        return spec.for_data(data.input_shape, data.num_classes)
    if isinstance(model, SparseMLP):
        if model.widths[0] != features or model.widths[-1] < data.num_classes:
            raise NestError(f"the model has {model.widths[0]} inputs and {model.widths[-1]} outputs, but the "
                            f"data has {features} features and {data.num_classes} classes.")
        return model
    if isinstance(model, nn.Module):
        return GraphSpec.of_module(model, data.input_shape, data.num_classes)
    raise NestError(f"model must be a registered name, an mlp: spec or a torch.nn.Module, got "
                    f"{type(model).__name__}.")


def _chain_of(seq: nn.Sequential, data: DataBundle) -> SparseMLP | SparseCNN | None:
    """The SparseMLP / SparseCNN of a plain-chain ``nn.Sequential``; None when it is not one
    (it is then captured as a graph).

    Raises:
        NestError: a Sequential with convolutions for data that are not images.
    """
    if any(isinstance(m, nn.Conv2d) for m in seq):
        if len(data.input_shape) != 3:
            raise NestError(f"a CNN needs image inputs (C, H, W), but the data's inputs have shape "
                            f"{tuple(data.input_shape)}.")
        convert = lambda: cnn_from_sequential(seq, data.input_shape)  # noqa: E731
    else:
        convert = lambda: from_sequential(seq)  # noqa: E731
    try:
        return convert()
    except NestError:  # not a chain the sparse MLP / CNN can express
        return None


def synthesize(model: str | nn.Module = "lenet-300-100", train: DataLike | None = None,
               val: DataLike | None = None, test: DataLike | None = None,
               config: Config | dict | str | Path | None = None, out: str | Path | None = None,
               progress: bool = False) -> tuple[SparseMLP, dict]:
    """Synthesize a compact network with NeST (grow, then prune).

    Args:
        model: a registered name (``"lenet-300-100"``), an ``"mlp:784-300-100-10"`` spec,
            or a ``torch.nn.Sequential`` chain of Linear (or conv stages then Linear)
            layers and element-wise activations (its widths and activations are the
            reference; the seed is derived from it), a registered graph network
            (``"resnet20"``) or any other ``nn.Module`` (a graph reference, see
            :func:`resolve_reference`).
        train: training data as ``(X, y)`` tensors or a torch Dataset; None loads
            ``config.data.dataset``.
        val: validation data; None carves ``config.data.val_fraction`` from ``train``.
        test: test data, used only for the final report.
        config: a Config, a dict in the TOML layout, a TOML path, or None (defaults).
        out: run directory for checkpoints, metrics, report and plots (None: memory only).
        progress: show progress bars.

    Returns:
        (model, report): the compact SparseMLP and the report (the layout of report.json).

    Example:
        >>> X, y = torch.randn(600, 20), torch.randint(0, 3, (600,))
        >>> net, report = nestsynth.synthesize(
        ...     nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 3)), (X, y),
        ...     config={"growth": {"target": "0.5", "max_iterations": 2}})
    """
    return prune(model, train, val, test, NEST, config, out, progress)


def prune(model="lenet-300-100", train=None, val=None, test=None, method: str = "gradual", config=None,
          out: str | Path | None = None, progress: bool = False):
    """Run a registered method (a baseline, or ``"nest"``) through the Python API.

    Args:
        model: a registered name (``"resnet20"``, ``"lenet-300-100"``), an ``mlp:`` spec,
            or any ``torch.nn.Module`` (see :func:`resolve_reference`: a plain
            ``nn.Sequential`` chain stays an MLP / CNN reference, any other network is a
            graph reference, built as a :class:`~nestsynth.graph.SparseGraph`).
        train, val, test, config, out, progress: as :func:`synthesize`.
        method: the method's name (``nestsynth methods`` lists them); it overrides the
            config's ``method``.

    Returns:
        (model, report): the final masked model (SparseMLP, SparseCNN or SparseGraph) and
        the report (the layout of report.json).

    Raises:
        NestError: unknown method or model, an unsupported network, or a method that
            cannot run on it (one sentence, before any work).

    Example:
        >>> net, report = nestsynth.prune(MyResNet(), (X, y), method="gradual",
        ...     config={"methods": {"gradual": {"epochs": 2, "end_epoch": 1}}})
    """
    cfg, data, reference = prepare(model, train, val, test, config, {"method": method})
    return run_method(cfg, data, reference, Path(out) if out is not None else None, progress=progress)


def prepare(model, train: DataLike | None, val: DataLike | None, test: DataLike | None,
            config: Config | dict | str | Path | None, overrides: dict | None = None):
    """The config, data and reference of an API run (:func:`synthesize`, :func:`prune`).

    Args:
        model, train, val, test, config: as :func:`synthesize`.
        overrides: config values set on top of ``config`` (e.g. ``{"method": "gradual"}``).

    Returns:
        (config, data bundle, reference from :func:`resolve_reference`).
    """
    cfg = _as_config(config)
    if overrides:
        cfg = config_mod.from_dict(overrides, cfg)
    if train is None:
        data = load_dataset(cfg.data.dataset, cfg.data.data_dir or None,
                            val_fraction=cfg.data.val_fraction, split_seed=cfg.data.split_seed)
    else:
        data = bundle_from(train, val, test, cfg)
    if isinstance(model, str) and cfg.model != model:
        cfg = config_mod.from_dict({"model": model}, cfg)
    return cfg, data, resolve_reference(model, data)


def _as_config(config) -> Config:
    if config is None:
        return Config()
    if isinstance(config, Config):
        config_mod.validate(config)
        return config
    if isinstance(config, dict):
        return config_mod.from_dict(config)
    return config_mod.load(config)


def load_run_config(out: Path) -> Config:
    """The config of an existing run directory.

    Raises:
        NestError: ``out`` is not a run directory.
    """
    if not ckpt.config_path(out).is_file() or not ckpt.checkpoint_path(out).is_file():
        raise NestError(f"{str(out)!r} is not a nestsynth run directory (it needs config.toml and "
                        "checkpoints/last.pt).")
    return config_mod.load(ckpt.config_path(out))
