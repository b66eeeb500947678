"""Registered compression methods: ``name -> (typed config, run function)``.

A method is a function ``run(ctx, mcfg) -> SparseMLP`` of a
:class:`~nestsynth.baselines.context.MethodContext` (data, reference architecture,
training helpers, logging) and the method's own config dataclass.  It returns the
final masked model; the runner measures and reports it exactly as it reports a
NeST synthesis, so every method is compared in one harness.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import NestError

NEST = "nest"  # NeST itself: run by nestsynth.synthesis, listed beside the baselines


@dataclass(frozen=True)
class Method:
    """One registered method."""

    name: str
    config: type  # a dataclass of the method's hyperparameters (section [methods.NAME])
    run: Callable  # run(ctx, mcfg) -> SparseMLP
    description: str


_METHODS: dict[str, Method] = {}


def register_method(name: str, config: type, description: str) -> Callable:
    """Decorator that registers ``run(ctx, mcfg)`` under ``name``.

    Example:
        >>> @register_method("dense", DenseMethodConfig, "dense training, no pruning")
        ... def run_dense(ctx, mcfg): ...
    """
    if not dataclasses.is_dataclass(config):
        raise TypeError(f"the config of method {name!r} must be a dataclass")

    def wrap(fn: Callable) -> Callable:
        if name in _METHODS or name == NEST:
            raise ValueError(f"method {name!r} is registered twice")
        _METHODS[name] = Method(name, config, fn, description)
        return fn

    return wrap


def _load() -> None:
    from . import _modules  # noqa: F401  (importing registers every method)


def list_methods() -> list[Method]:
    """Every registered baseline, in registration order (NeST itself is not in the list)."""
    _load()
    return list(_METHODS.values())


def method_names() -> list[str]:
    """``nest`` followed by every registered baseline name."""
    return [NEST] + [m.name for m in list_methods()]


def get_method(name: str) -> Method:
    """The registered baseline ``name``.

    Raises:
        NestError: unknown name (the message lists the known ones).
    """
    _load()
    if name not in _METHODS:
        raise NestError(f"unknown method {name!r}; known methods: {', '.join(method_names())}.")
    return _METHODS[name]


def methods_config_type() -> type:
    """A dataclass with one field per registered method, holding that method's config.

    It is built from the registry so that a new method only needs its own module;
    ``Config.methods`` is an instance of it (TOML sections ``[methods.NAME]``).
    """
    _load()
    global _METHODS_TYPE
    if _METHODS_TYPE is None or [f.name for f in dataclasses.fields(_METHODS_TYPE)] != list(_METHODS):
        fields = [(m.name, m.config, dataclasses.field(default_factory=m.config)) for m in _METHODS.values()]
        _METHODS_TYPE = dataclasses.make_dataclass("MethodsConfig", fields)
        _METHODS_TYPE.__module__ = __name__
    return _METHODS_TYPE


_METHODS_TYPE: type | None = None
