"""What a method sees: data, the reference architecture, training and logging helpers.

The reference is an MLP (widths, activations, batch norm), a CNN
(:class:`~nestsynth.registry.CNNSpec`, passed as ``spec``) or a graph network
(:class:`~nestsynth.registry.GraphSpec`, also ``spec``): :meth:`MethodContext.dense_model`
then builds ``spec.build(generator)``, a :class:`~nestsynth.sparse.SparseCNN` whose
``layers`` are MaskedConv2d layers followed by MaskedLinear ones, or a
:class:`~nestsynth.graph.SparseGraph` whose ``layers`` are its masked layers in graph
order.  A method that cannot run on every reference marks its run function:
:func:`mlp_only` (MLP references and graph networks of Linear layers only) or
:func:`chain_only` (no graph references); the runner then refuses the reference with one
sentence (:func:`check_supported`) before anything is written or trained.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable

import torch

from ..config import NEST_METHOD, Config
from ..data import DataBundle, random_affine
from ..errors import NestError
from ..registry import CNNSpec, GraphSpec
from ..sparse import SparseCNN, SparseMLP
from ..training import cosine_lr, epoch_steps, evaluate, make_optimizer, train_epoch

NEST = NEST_METHOD


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
        reason: why, completing the sentence (e.g. "its sensitivity factorises for
            linear layers only").

    Example:
        >>> @register_method("lobs", LobsConfig, "...")
        ... @mlp_only("layer-wise OBS is implemented for linear layers")
        ... def run_lobs(ctx, mcfg): ...
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
        run: its (marked) run function; None for NeST, which runs on every reference
            (:mod:`nestsynth.synthesis` grows and prunes chains and graph networks).
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
    """Raise NestError when ``method`` (a registered Method, or :data:`NEST`) cannot run on
    ``reference``.

    Raises:
        NestError: a CNN reference (or a graph network with convolutions) for a method
            marked :func:`mlp_only`, a graph reference for one marked :func:`chain_only`.
    """
    name = method if isinstance(method, str) else method.name
    message = refusal(name, None if isinstance(method, str) else method.run, reference)
    if message is not None:
        raise NestError(message)


class MethodContext:
    """The harness a baseline runs in; one per run.

    Attributes:
        cfg: the run's Config (``cfg.train`` is shared by every method).
        data: train/val/test split; decisions may use ``val`` only, never ``test``.
        widths, activations, batch_norm: the reference architecture (for a CNN: units per
            layer -- input channels, conv channels, fc neurons --, its activation, batch norm).
        spec: the CNN reference (a ``CNNSpec``) or graph reference (a ``GraphSpec``), or
            None for an MLP reference.
        device: where tensors live.
        generator: the run's random generator (seeded from ``cfg.seed``); every random
            choice of a method must draw from it, so runs are reproducible.
        X, y / Xv, yv: training / validation tensors on ``device``.
        history: logged rows (``metrics.jsonl``), see :meth:`log`.
        epochs: training epochs spent so far (the budget reported in comparisons).
        losses: the mean training loss of every epoch, in order (the sanity checks read it).
        dense: the dense reference's errors, when the method trained one (:meth:`record_dense`).
    """

    def __init__(self, cfg: Config, data: DataBundle, widths, activations, batch_norm: bool,
                 device: torch.device, progress: bool = False, on_log: Callable[["MethodContext"], None] | None = None,
                 spec=None):
        self.cfg, self.data, self.device, self.progress = cfg, data, device, progress
        self.spec = spec  # a CNNSpec or GraphSpec, None for an MLP
        self.on_log = on_log  # called after every logged row (the CLI prints it)
        self.widths, self.activations, self.batch_norm = list(widths), activations, batch_norm
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.X, self.y = data.train.X.to(device), data.train.y.to(device)
        self.Xv, self.yv = (data.val.X.to(device), data.val.y.to(device)) if data.val else (self.X, self.y)
        self.history: list[dict] = []
        self.epochs = 0
        self.losses: list[float] = []
        self.dense: dict | None = None
        self._t0 = time.monotonic()

    # ---- models ------------------------------------------------------------
    @property
    def is_cnn(self) -> bool:
        """True for a CNN reference (``dense_model`` builds a SparseCNN)."""
        return isinstance(self.spec, CNNSpec)

    @property
    def is_graph(self) -> bool:
        """True for a graph reference (``dense_model`` builds a SparseGraph)."""
        return isinstance(self.spec, GraphSpec)

    def dense_model(self) -> SparseMLP | SparseCNN:
        """A freshly initialized reference-architecture model with every mask entry 1.

        Returns:
            ``spec.build(generator)`` (a SparseCNN, or a SparseGraph) for a CNN or graph
            reference, else a SparseMLP of ``widths``; its initial weights are drawn from
            ``generator``.
        """
        if self.spec is not None:
            return self.spec.build(self.generator).to(self.device)
        return SparseMLP(self.widths, self.activations, self.batch_norm, generator=self.generator).to(self.device)

    def optimizer(self, model, lr_scale: float = 1.0, weight_decay: float | None = None):
        """``cfg.train``'s optimizer for ``model`` (optionally another L2 weight decay)."""
        t = self.cfg.train
        if weight_decay is not None:
            import dataclasses
            t = dataclasses.replace(t, weight_decay=weight_decay)
        return make_optimizer(model, t, lr_scale)

    # ---- training ------------------------------------------------------------
    def train(self, model, epochs: int, optimizer=None, *, lr_scale: float = 1.0,
              penalty: Callable[[], torch.Tensor] | None = None,
              after_step: Callable[[], None] | None = None,
              on_epoch: Callable[[int], None] | None = None) -> float | None:
        """Train ``epochs`` epochs on the training split; returns the last epoch's mean loss.

        Uses ``cfg.train`` (batch size, optimizer, cosine schedule over the whole call,
        augmentation) like NeST's own training.  Masks are respected automatically
        (dormant weights get zero gradient through ``W * M``).

        Args:
            optimizer: reuse an optimizer (default: a new one from ``cfg.train``).
            lr_scale: learning rate relative to ``cfg.train.lr``.
            penalty: added to every batch loss (e.g. an L0 or L2 term).
            after_step: run after every optimizer step (e.g. gradual pruning, re-masking).
            on_epoch: run after every epoch with the epoch index.
        """
        t = self.cfg.train
        optimizer = optimizer or self.optimizer(model, lr_scale)
        lr = t.lr * lr_scale
        per_epoch = self.steps_per_epoch()
        loss = None
        for e in range(epochs):
            lr_at = (lambda b, e=e: cosine_lr(e * per_epoch + b, epochs * per_epoch, lr, t.min_lr_scale)) \
                if t.schedule == "cosine" else (lambda b: lr)
            loss = train_epoch(model, self.X, self.y, optimizer, t.batch_size, self.generator,
                               self._augment(), None, lr_at, penalty, after_step, per_epoch)
            self.epochs += 1
            self.losses.append(loss)
            if on_epoch is not None:
                on_epoch(e)
        return loss

    def steps_per_epoch(self) -> int:
        """Optimizer steps in one epoch of :meth:`train` (``train.min_steps_per_epoch`` at least)."""
        return epoch_steps(self.cfg.train, len(self.X))

    def _augment(self):
        d = self.cfg.data
        if not (d.augment and self.data.is_image):
            return None
        return lambda xb: random_affine(xb, self.generator, rotate=d.rotate, shift=d.shift,
                                        scale=(d.scale_min, d.scale_max), shear=d.shear)

    def batch(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` training examples drawn without replacement (all when n <= 0 or n >= N)."""
        if n <= 0 or n >= len(self.X):
            return self.X, self.y
        idx = torch.randperm(len(self.X), generator=self.generator)[:n].to(self.device)
        return self.X[idx], self.y[idx]

    def val_error(self, model) -> float:
        """Error on the validation split (the only data decisions may look at)."""
        return evaluate(model, self.Xv, self.yv, self.cfg.train.eval_batch_size)[0]

    def train_dense(self, epochs: int, weight_decay: float | None = None):
        """A fresh reference-architecture model trained ``epochs`` (recorded as the dense
        reference and logged as phase "dense" when ``epochs`` > 0)."""
        model = self.dense_model()
        if epochs > 0:
            self.train(model, epochs, self.optimizer(model, weight_decay=weight_decay))
            self.log("dense", 0, model, val=self.record_dense(model))  # one validation pass
        return model

    def record_dense(self, model) -> float:
        """Note the dense reference this method trained (reported beside the result)."""
        val = self.val_error(model)
        test = self.data.test
        test_err = evaluate(model, test.X.to(self.device), test.y.to(self.device))[0] if test else None
        self.dense = {"val_error": val, "test_error": test_err, "epochs": self.epochs}
        return val

    def log(self, phase: str, iteration: int, model, val: float | None = None, **extra) -> dict:
        """Append a row to the run's history (the connections-vs-iteration plot reads it).

        ``val`` is computed when not given.  Extra keys must be plain data.
        """
        val = self.val_error(model) if val is None else val
        row = {"phase": phase, "iteration": iteration, "weights": model.active_weights(),
               "layer_weights": model.active_per_layer(), "neurons": model.widths[1:-1],
               "val_error": val, "epochs": self.epochs,
               "seconds": round(time.monotonic() - self._t0, 3), **extra}
        self.history.append(row)
        if self.on_log is not None:
            self.on_log(self)
        return row
