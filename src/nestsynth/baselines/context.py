"""Which references a method runs on.

A method runs in a :class:`~nestsynth.run_context.RunContext` (data, reference
architecture, training and logging helpers).  The reference is an MLP (widths,
activations, batch norm), a CNN (:class:`~nestsynth.registry.CNNSpec`, the context's
``spec``) or a graph network (:class:`~nestsynth.registry.GraphSpec`, also ``spec``):
:meth:`~nestsynth.run_context.RunContext.dense_model` then builds
``spec.build(generator)``, a :class:`~nestsynth.sparse.SparseCNN` whose ``layers`` are
MaskedConv2d layers followed by MaskedLinear ones, or a
:class:`~nestsynth.graph.SparseGraph` whose ``layers`` are its masked layers in graph
order.  A method that cannot run on every reference marks its run function:
:func:`mlp_only` (MLP references and graph networks of Linear layers only) or
:func:`chain_only` (no graph references); the runner then refuses the reference with one
sentence (:func:`check_supported`) before anything is written or trained.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from ..errors import NestError
from ..registry import CNNSpec, GraphSpec


def _mark(kind: str, reason: str) -> Callable:
    """Mark a run function with ``kind`` ("mlp_only" / "chain_only") = ``reason``; the wrapped
    function refuses an unsupported reference (:func:`refusal`) before any work."""
    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def run(ctx, mcfg):
            message = refusal(ctx.cfg.method, run, ctx.spec)
            if message is not None:
                raise NestError(message)
            return fn(ctx, mcfg)

        setattr(run, kind, reason)
        return run

    return wrap


def mlp_only(reason: str) -> Callable:
    """Mark a method's run function as supporting MLP references only.

    The wrapped function raises :class:`NestError` ("method X supports MLP references
    only; REASON.") when its context holds a CNN reference or a graph network with
    convolutions (or whose output is not its last layer's), before any work; the runner
    checks the same mark (:func:`check_supported`) before it creates the run directory.

    Args:
        reason: why, completing the sentence (e.g. "its neuron significance is defined
            for fully connected neurons only").

    Example:
        >>> @register_method("n2ps", N2psConfig, "...")
        ... @mlp_only("its neuron significance is defined for fully connected neurons only")
        ... def run_n2ps(ctx, mcfg): ...
    """
    return _mark("mlp_only", reason)


def chain_only(reason: str) -> Callable:
    """Mark a method's run function as supporting chain references only (an MLP or a
    sequential CNN, not a :class:`~nestsynth.registry.GraphSpec`).

    The refusal reads "method X supports chain references (an MLP or a sequential CNN)
    only; REASON."; it combines with :func:`mlp_only` (put either outermost).

    Args:
        reason: why, completing the sentence (e.g. "it removes neurons of hidden layer h
            from layer h + 1").
    """
    return _mark("chain_only", reason)


def unsupported_message(method: str, reason: str) -> str:
    """The one-sentence error for an MLP-only method given a CNN reference."""
    return f"method {method} supports MLP references only; {reason}."


def refusal(method: str, run: Callable | None, reference) -> str | None:
    """The sentence refusing ``reference`` for ``method`` (its run function ``run``), or None
    when it runs on it.

    Args:
        method: the method's name.
        run: its (marked) run function (NeST's is unmarked: :mod:`nestsynth.synthesis`
            grows and prunes chains and graph networks).
        reference: a spec (ModelSpec, CNNSpec, GraphSpec), a user's SparseMLP, or None.
    """
    graph = isinstance(reference, GraphSpec)
    chain = getattr(run, "chain_only", None)
    if graph and chain is not None:
        return f"method {method} supports chain references (an MLP or a sequential CNN) only; {chain}."
    reason = getattr(run, "mlp_only", None)
    if reason is not None and (isinstance(reference, CNNSpec) or (graph and not reference.is_mlp)):
        return unsupported_message(method, reason)
    return None


def check_supported(method, reference) -> None:
    """Raise NestError when ``method`` (a registered Method) cannot run on ``reference``.

    Raises:
        NestError: a CNN reference (or a graph network with convolutions) for a method
            marked :func:`mlp_only`, a graph reference for one marked :func:`chain_only`.
    """
    message = refusal(method.name, method.run, reference)
    if message is not None:
        raise NestError(message)
