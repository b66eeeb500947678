"""Registered compression methods: ``name -> (typed config, run function)``.

A method is a function ``run(ctx, mcfg) -> model`` of a
:class:`~nestsynth.run_context.RunContext` (data, reference architecture, training,
evaluation and logging helpers, the run directory) and the method's own config; it
returns the final masked model, which the runner measures and reports, so every method
is compared in one harness.

NeST itself is registered here too, first (:func:`nestsynth.synthesis.run_nest`): its
settings are the config's top-level sections (seed_net, dense, growth, pruning), so it
registers no ``[methods.nest]`` section, builds its own report (the growth and pruning
sections) and is checkpointed (``resume`` continues it from its last checkpoint).

Registering a baseline also registers its config section with
:func:`nestsynth.config.register_method_section` (the config reads that registry and
imports nothing from here).  The package :mod:`nestsynth.baselines` imports every
method module (:mod:`._modules`, NeST's first), so the registry is complete once it is
imported.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

from ..config import NEST_METHOD, method_names, register_method_section
from ..config import methods_config_type  # noqa: F401  (defined here before; config builds it now)
from ..errors import NestError

NEST = NEST_METHOD  # NeST's name in the registry


@dataclass(frozen=True)
class Method:
    """One registered method.

    Attributes:
        config: the dataclass of the method's hyperparameters (section ``[methods.NAME]``),
            or None for NeST, whose settings are the config's top-level sections.
        run: ``run(ctx, mcfg) -> model`` (``mcfg``: see :meth:`settings`).
        report: ``report(ctx, model, wall) -> dict`` building report.json, or None for
            the baselines' :func:`~nestsynth.baselines.runner.method_report`.
        checkpointed: a resumed run continues from its last checkpoint (NeST); otherwise
            it starts again from the beginning in the same directory.
    """

    name: str
    config: type | None
    run: Callable
    description: str
    report: Callable | None = None
    checkpointed: bool = False

    def settings(self, cfg):
        """What ``run`` gets as ``mcfg``: the ``[methods.NAME]`` section of ``cfg``, or the
        whole Config for a method without a section (NeST)."""
        return cfg if self.config is None else getattr(cfg.methods, self.name)


_METHODS: dict[str, Method] = {}


def register_method(name: str, config: type | None, description: str, *, report: Callable | None = None,
                    checkpointed: bool = False) -> Callable:
    """Decorator that registers ``run(ctx, mcfg)`` under ``name``.

    Args:
        config: the method's config dataclass (its ``[methods.NAME]`` section is
            registered with it); None only for NeST, which reads the top-level sections.
        report, checkpointed: see :class:`Method`.

    Raises:
        TypeError: ``config`` is not a dataclass (or None for another method than NeST).
        ValueError: the name is taken.

    Example:
        >>> @register_method("dense", DenseMethodConfig, "dense training, no pruning")
        ... def run_dense(ctx, mcfg): ...
    """
    if not (dataclasses.is_dataclass(config) or (config is None and name == NEST)):
        raise TypeError(f"the config of method {name!r} must be a dataclass")

    def wrap(fn: Callable) -> Callable:
        if name in _METHODS:
            raise ValueError(f"method {name!r} is registered twice")
        if config is not None:
            register_method_section(name, config)  # ValueError when the name is taken
        _METHODS[name] = Method(name, config, fn, description, report, checkpointed)
        return fn

    return wrap


def list_methods() -> list[Method]:
    """Every registered method, in registration order (NeST first)."""
    return list(_METHODS.values())


def get_method(name: str) -> Method:
    """The registered method ``name``.

    Raises:
        NestError: unknown name (the message lists the known ones).
    """
    if name not in _METHODS:
        raise NestError(f"unknown method {name!r}; known methods: {', '.join(method_names())}.")
    return _METHODS[name]
