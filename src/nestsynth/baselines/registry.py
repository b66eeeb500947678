"""Registered compression methods: ``name -> (typed config, run function)``.

A method is a function ``run(ctx, mcfg) -> SparseMLP`` of a
:class:`~nestsynth.baselines.context.MethodContext` (data, reference architecture,
training helpers, logging) and the method's own config dataclass.  It returns the
final masked model; the runner measures and reports it exactly as it reports a
NeST synthesis, so every method is compared in one harness.

Registering a method also registers its config section with
:func:`nestsynth.config.register_method_section` (the config reads that registry and
imports nothing from here).  The package :mod:`nestsynth.baselines` imports every
method module (:mod:`._modules`), so the registry is complete once it is imported.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

from ..config import NEST_METHOD, method_names, register_method_section
from ..config import methods_config_type  # noqa: F401  (defined here before; config builds it now)
from ..errors import NestError

NEST = NEST_METHOD  # NeST itself: run by nestsynth.synthesis, listed beside the baselines


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
        register_method_section(name, config)  # ValueError when the name is taken
        _METHODS[name] = Method(name, config, fn, description)
        return fn

    return wrap


def list_methods() -> list[Method]:
    """Every registered baseline, in registration order (NeST itself is not in the list)."""
    return list(_METHODS.values())


def get_method(name: str) -> Method:
    """The registered baseline ``name``.

    Raises:
        NestError: unknown name (the message lists the known ones).
    """
    if name not in _METHODS:
        raise NestError(f"unknown method {name!r}; known methods: {', '.join(method_names())}.")
    return _METHODS[name]
