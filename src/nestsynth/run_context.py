"""The run context: the one harness in which NeST and every baseline train, evaluate, log
and write their run directory.

A :class:`RunContext` holds what a run shares whatever its method: the config, the data
(train / val tensors on the device), the reference architecture, the run's random
generator, augmentation, the epoch-training helper (one cosine cycle per call, or a
window of one cycle), validation and test errors, the history rows of ``metrics.jsonl``
and the run directory (its config.toml on start, its outputs at the end).

What a run has done so far -- the training epochs spent and the logged rows -- lives in
its :class:`RunRecord`.  NeST keeps its loop position in a subclass of it
(:class:`nestsynth.synthesis.LoopState`) that every checkpoint saves, so the epochs
counter and the history survive an interruption.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import checkpoint as ckpt
from .config import Config
from .data import DataBundle, random_affine
from .distributed import current
from .errors import NestError
from .graph.network import SparseGraph
from .metrics import activation_density, layer_table
from .registry import CNNSpec, GraphSpec, ModelSpec
from .sparse import SparseCNN, SparseMLP
from .training import (cosine_lr, epoch_steps, evaluate, make_optimizer, recalibrate_batch_norm, samples_per_epoch,
                       train_epoch)


@dataclass
class RunRecord:
    """What a run has done, in plain data.

    Attributes:
        epochs: training epochs spent so far (the budget reported in comparisons).
        history: the logged rows (``metrics.jsonl``), see :meth:`RunContext.row`.
    """

    epochs: int = 0
    history: list = field(default_factory=list)


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu.

    Raises:
        NestError: cuda requested but not available.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise NestError(f"device {name!r} was requested but this machine has no CUDA device; use cpu or auto.")
    return torch.device(name)


def is_graph_reference(reference) -> bool:
    """A SparseGraph, or a spec that builds one (not an MLP or CNN spec, not a SparseMLP)."""
    if isinstance(reference, SparseGraph):
        return True
    return not isinstance(reference, (ModelSpec, CNNSpec, SparseMLP)) and callable(getattr(reference, "build", None))


def reference_shape(reference) -> tuple[list[int], object, bool, str]:
    """(widths, activations, batch norm, model name) of a reference architecture.

    For a CNN the widths are units per layer (input channels, conv channels, fc neurons);
    a graph network's activations are in the network itself (None).
    """
    if is_graph_reference(reference):
        return list(reference.widths), None, False, getattr(reference, "name", "custom")
    if isinstance(reference, (CNNSpec, ModelSpec)):
        return list(reference.widths), reference.activation, reference.batch_norm, reference.name
    return list(reference.widths), list(reference.activation_specs), reference.batch_norm, "custom"


class RunContext:
    """The harness a run (NeST or a baseline) works in; one per run.

    Args:
        cfg: the run's Config (``cfg.train`` is shared by every method).
        data: train/val/test split; decisions may use ``val`` only, never ``test``.
        reference: the reference architecture: an MLP spec, a user's dense SparseMLP, a
            CNN spec, or a graph reference (a GraphSpec, or a SparseGraph whose
            architecture NeST redraws).
        out: the run directory, or None (in memory only).
        progress: show progress bars while training.
        on_iteration: called after every unit of work: a baseline's logged row (with the
            context) or a NeST checkpoint (with its LoopState); the CLI prints it.
        resume: continue the run in ``out`` (a checkpointed method picks up its last
            checkpoint; any other starts again in the same directory).
        device: where tensors live (default: ``cfg.device`` resolved).

    Attributes:
        widths, activations, batch_norm, model_name: the reference's shape
            (:func:`reference_shape`).
        spec: the CNN or graph reference, or None for an MLP.
        generator: the run's random generator (seeded from ``cfg.seed``); every random
            choice must draw from it, so runs are reproducible.
        X, y / Xv, yv: training / validation tensors on ``device`` (the validation ones
            are the training ones when the data has no validation split).
        record: epochs spent and logged rows (:class:`RunRecord`; NeST's is its LoopState).
        losses: the mean training loss of every epoch trained in this process, in order
            (the baselines' sanity checks read it).
        dense: the dense reference's errors, when a baseline trained one (:meth:`record_dense`).
    """

    def __init__(self, cfg: Config, data: DataBundle, reference, out: Path | None = None, *,
                 progress: bool = False, on_iteration: Callable | None = None, resume: bool = False,
                 device: torch.device | None = None):
        self.cfg, self.data, self.reference, self.out = cfg, data, reference, out
        self.progress, self.on_iteration, self.resume = progress, on_iteration, resume
        self.device = device if device is not None else resolve_device(cfg.device)
        self.widths, self.activations, self.batch_norm, self.model_name = reference_shape(reference)
        self.spec = reference if isinstance(reference, CNNSpec) or is_graph_reference(reference) else None
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.X, self.y = data.train.X.to(self.device), data.train.y.to(self.device)
        self.Xv, self.yv = (data.val.X.to(self.device), data.val.y.to(self.device)) if data.val else (self.X, self.y)
        self.record = RunRecord()
        self.losses: list[float] = []
        self.dense: dict | None = None
        self._t0 = time.monotonic()

    @property
    def epochs(self) -> int:
        """Training epochs spent so far (the record's)."""
        return self.record.epochs

    @property
    def history(self) -> list[dict]:
        """The logged rows (the record's)."""
        return self.record.history

    # ---- models ------------------------------------------------------------
    @property
    def is_cnn(self) -> bool:
        """True for a CNN reference (``dense_model`` builds a SparseCNN)."""
        return isinstance(self.spec, CNNSpec)

    @property
    def is_graph(self) -> bool:
        """True for a graph reference (``dense_model`` builds a SparseGraph)."""
        return isinstance(self.spec, GraphSpec)

    def build_reference(self, generator: torch.Generator | None = None) -> SparseMLP | SparseCNN | SparseGraph:
        """A freshly initialized reference-architecture model (on the CPU), every mask entry 1.

        Args:
            generator: draws the initial weights (default: the run's generator).

        Returns:
            ``spec.build(generator)`` (a SparseCNN, or a SparseGraph) for a CNN or graph
            spec, a redrawn copy of a SparseGraph reference, else a SparseMLP of ``widths``.
        """
        generator = self.generator if generator is None else generator
        if isinstance(self.spec, SparseGraph):
            return SparseGraph.from_module(self.spec, self.spec.input_shape, generator)
        if self.spec is not None:
            return self.spec.build(generator)
        return SparseMLP(self.widths, self.activations, self.batch_norm, generator=generator)

    def dense_model(self) -> SparseMLP | SparseCNN | SparseGraph:
        """:meth:`build_reference` from the run's generator, on ``device``."""
        return self.build_reference().to(self.device)

    def optimizer(self, model, lr_scale: float = 1.0, weight_decay: float | None = None):
        """``cfg.train``'s optimizer for ``model`` (optionally another L2 weight decay)."""
        t = self.cfg.train
        if weight_decay is not None:
            t = dataclasses.replace(t, weight_decay=weight_decay)
        return make_optimizer(model, t, lr_scale)

    # ---- training ------------------------------------------------------------
    def train(self, model, epochs: int, optimizer=None, *, lr_scale: float = 1.0,
              window: tuple[int, int] | None = None, generator: torch.Generator | None = None,
              desc: str = "training", penalty: Callable[[], torch.Tensor] | None = None,
              after_step: Callable[[], None] | None = None,
              on_epoch: Callable[[int], None] | None = None,
              objective: Callable | None = None) -> float | None:
        """Train ``epochs`` epochs on the training split; returns the last epoch's mean loss.

        Uses ``cfg.train`` (batch size, optimizer, schedule, augmentation).  With the
        cosine schedule every call is one annealing cycle, so what follows it sees an
        annealed model -- or, with ``window = (first, total)``, epochs first.. of one
        cycle of ``total`` epochs.  Masks are respected automatically (dormant weights get
        zero gradient through ``W * M``).  Every epoch counts in ``epochs`` and its mean
        loss is appended to ``losses``.

        Args:
            optimizer: reuse an optimizer (default: a new one from ``cfg.train``).
            lr_scale: learning rate relative to ``cfg.train.lr``.
            window: (first epoch, epochs) of the cosine cycle this call trains part of.
            generator: draws the batch order and augmentation (default: the run's).
            desc: the progress bar's label.
            penalty: added to every batch loss (e.g. an L0 or L2 term).
            after_step: run after every optimizer step (e.g. gradual pruning, re-masking).
            on_epoch: run after every epoch with the epoch index.
            objective: the batch loss instead of the cross-entropy (``train_epoch``).

        Raises:
            NonFiniteLoss: a batch loss became NaN or infinite.
        """
        from tqdm.auto import tqdm

        t = self.cfg.train
        optimizer = optimizer or self.optimizer(model, lr_scale)
        generator = self.generator if generator is None else generator
        lr = t.lr * lr_scale
        per_epoch = self.steps_per_epoch()
        samples = epochs * samples_per_epoch(len(self.X), t.batch_size, per_epoch)
        loss = None
        with tqdm(total=samples, desc=desc, unit="sample", disable=not self.progress,
                  leave=False, dynamic_ncols=True) as bar:
            for e in range(epochs):
                start, total = (window[0] + e, window[1]) if window else (e, epochs)
                lr_at = (lambda b, k=start: cosine_lr(k * per_epoch + b, total * per_epoch, lr, t.min_lr_scale)) \
                    if t.schedule == "cosine" else (lambda b: lr)
                loss = train_epoch(model, self.X, self.y, optimizer, t.batch_size, generator,
                                   self.augmentation(generator), bar.update, lr_at, penalty, after_step, per_epoch,
                                   objective)
                self.record.epochs += 1
                self.losses.append(loss)
                if on_epoch is not None:
                    on_epoch(e)
        return loss

    def steps_per_epoch(self) -> int:
        """Optimizer steps in one epoch of :meth:`train` (``train.min_steps_per_epoch`` at least)."""
        return epoch_steps(self.cfg.train, len(self.X))

    def augmentation(self, generator: torch.Generator | None = None) -> Callable | None:
        """The training batches' random affine transform drawn from ``generator`` (default:
        the run's), or None when ``data.augment`` is off or the inputs are not images."""
        d = self.cfg.data
        if not (d.augment and self.data.is_image):
            return None
        generator = self.generator if generator is None else generator

        def distort(xb: torch.Tensor, **rows) -> torch.Tensor:
            return random_affine(xb, generator, rotate=d.rotate, shift=d.shift, scale=(d.scale_min, d.scale_max),
                                 shear=d.shear, **rows)

        distort.by_rows = True  # takes batch=, start= (random_affine): a rank distorts its slice only
        return distort

    def batch(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` training examples drawn without replacement (all when n <= 0 or n >= N)."""
        if n <= 0 or n >= len(self.X):
            return self.X, self.y
        idx = torch.randperm(len(self.X), generator=self.generator)[:n].to(self.device)
        return self.X[idx], self.y[idx]

    def calibrated(self, model, samples: int):
        """``model`` with its batch norms' running statistics recomputed on the first
        ``samples`` training inputs (:func:`~nestsynth.training.recalibrate_batch_norm`;
        no draw from the run's generator, nothing done without batch norm): for a network
        whose weights changed after its statistics were gathered, such as the test-time
        view of a network trained under noisy L0 gates."""
        recalibrate_batch_norm(model, self.X[:samples], self.cfg.train.eval_batch_size)
        return model

    # ---- evaluation --------------------------------------------------------------
    def val_error(self, model) -> float:
        """Error on the validation split (the only data decisions may look at)."""
        return evaluate(model, self.Xv, self.yv, self.cfg.train.eval_batch_size)[0]

    def test_error(self, model) -> float | None:
        """Error on the test split (reports only), or None when the data has none."""
        test = self.data.test
        return evaluate(model, test.X.to(self.device), test.y.to(self.device))[0] if test else None

    def dense_errors(self, model, val: float | None = None) -> dict:
        """The dense reference's record: validation and test errors (``val`` when already
        measured) and the epochs spent so far."""
        val = self.val_error(model) if val is None else val
        return {"val_error": val, "test_error": self.test_error(model), "epochs": self.epochs}

    def train_dense(self, epochs: int, weight_decay: float | None = None):
        """A fresh reference-architecture model trained ``epochs`` (recorded as the dense
        reference and logged as phase "dense" when ``epochs`` > 0)."""
        model = self.dense_model()
        if epochs > 0:
            self.train(model, epochs, self.optimizer(model, weight_decay=weight_decay))
            self.log("dense", 0, model, val=self.record_dense(model))  # one validation pass
        return model

    def record_dense(self, model) -> float:
        """Note the dense reference this method trained (reported beside the result);
        returns its validation error."""
        self.dense = self.dense_errors(model)
        return self.dense["val_error"]

    # ---- history -----------------------------------------------------------------
    def row(self, phase: str, iteration: int, model, val: float, seconds: float | None = None, **extra) -> dict:
        """One history row: the model's size and validation error after a unit of work.

        Args:
            seconds: the unit's duration (default: the time since the context started).
            extra: method-specific keys (plain data).

        Returns:
            ``{phase, iteration, weights, layer_weights, neurons, val_error, epochs,
            seconds, **extra}``.
        """
        seconds = time.monotonic() - self._t0 if seconds is None else seconds
        current().check_masks(model, f"{phase} {iteration}")  # under torchrun: every logged unit of work
        return {"phase": phase, "iteration": iteration, "weights": model.active_weights(),
                "layer_weights": model.active_per_layer(), "neurons": model.widths[1:-1],
                "val_error": val, "epochs": self.epochs, "seconds": round(seconds, 3), **extra}

    def log(self, phase: str, iteration: int, model, val: float | None = None, **extra) -> dict:
        """Append a :meth:`row` to the history (the connections-vs-iteration plot reads it)
        and tell ``on_iteration``.

        ``val`` is computed when not given.  Extra keys must be plain data.
        """
        row = self.row(phase, iteration, model, self.val_error(model) if val is None else val, **extra)
        self.history.append(row)
        if self.on_iteration is not None:
            self.on_iteration(self)
        return row

    # ---- run directory -------------------------------------------------------------
    def open_directory(self, checkpointed: bool) -> None:
        """Create ``out`` and write the run's config.toml; nothing without ``out``.

        A resumed run of a checkpointed method (NeST) leaves the directory as it is: its
        checkpoint, checked against the config's digest, says where it continues.  Any
        other resumed run starts again in the directory of the same config.

        Raises:
            NestError: ``out`` is a file, holds a run and ``resume`` is off, or holds a
                run of another config.
        """
        out = self.out
        if out is None or (self.resume and checkpointed):
            return
        dist = current()
        if out.exists() and not out.is_dir():
            raise NestError(f"--out {str(out)!r} is a file, not a directory.")
        config = ckpt.config_path(out)
        if not self.resume and (config.exists() or ckpt.checkpoint_path(out).exists()):
            raise NestError(f"{str(out)!r} already holds a run; continue it with --resume or choose another --out.")
        if config.exists():
            from .config import load
            if load(config).digest() != self.cfg.digest():
                raise NestError(f"{str(out)!r} holds a run of another config; start a new run instead.")
        dist.barrier()  # under torchrun: every rank has checked before rank 0 writes
        if dist.is_main:
            out.mkdir(parents=True, exist_ok=True)
            ckpt.atomic_write_text(config, self.cfg.to_toml())

    def measure(self, model) -> tuple[list[dict], float | None]:
        """(per-layer rows of :func:`~nestsynth.metrics.layer_table`, test error) of a final
        model; activations are measured on the test split (validation without one)."""
        test = self.data.test
        act = activation_density(model, test.X.to(self.device) if test else self.Xv, self.cfg.train.eval_batch_size)
        return layer_table(model, act), self.test_error(model)

    def write_outputs(self, model, report: dict) -> None:
        """metrics.jsonl (the history), report.json, model.pt and the plots in ``out`` (by
        rank 0 alone under torchrun)."""
        if self.out is None or not current().is_main:
            return
        from .report import write_run_outputs

        ckpt.write_jsonl(ckpt.metrics_path(self.out), self.history)
        write_run_outputs(self.out, model, report)
