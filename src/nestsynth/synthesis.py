"""The NeST loop: sequences seed -> (dense reference) -> growth -> pruning -> report.

The loop runs in a :class:`~nestsynth.run_context.RunContext` -- the harness every
method shares: training epochs, validation, history rows, the run directory -- and is
registered as the method ``nest`` (:func:`run_nest`), so
:func:`~nestsynth.baselines.runner.run_method` runs it like any baseline.

One loop serves every reference: the connection-level policies (Policy 1 growth by
|dL/dw|, Policy 4 pruning by |W*| with the size schedule, scopes, rewiring and top-up, and
partial-area convolution) work on ``model.layers`` of any masked network (a SparseMLP or
SparseCNN chain, or a :class:`~nestsynth.graph.SparseGraph`); what depends on how units are
wired -- the seed, the dense reference, unit growth (Policies 2 and 3) and unit removal --
is dispatched to a *unit backend*: :class:`ChainUnits` (hidden layer h read by layer
h + 1) or :class:`GraphUnits` (coupled groups of a graph: :mod:`nestsynth.growth.groups`,
:mod:`nestsynth.pruning.groups`, :mod:`nestsynth.seeds.graph`).  On a one-member,
one-consumer group the graph rules reduce to the chain's; the chain keeps its own code so
its results stay exactly as they were.

Every unit of work (the dense reference, one growth iteration, one pruning
iteration, the final fine-tuning) ends with an atomic checkpoint that holds the
model, the optimizer, the random generator and the loop's plain-data state, so a
resumed run continues to exactly the result an uninterrupted one reaches.  A NaN
loss rolls back to the last checkpoint and halves the learning rate.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field

import torch

from . import checkpoint as ckpt
from .baselines.registry import NEST, register_method
from .config import Config
from .distributed import current
from .errors import NestError
from .growth import (connections_to_grow, gradient_scan, grow_connections, grow_connections_global,
                     grow_neurons)
from .growth.scores import scan_indices
from .pruning import gates as G
from .pruning.gates import (BETA, FlopsControl, L0Gates, L0SizeControl, initial_log_alpha, keep_most_open,
                            macs_per_weight, theta_scale)
from .pruning import (constant_rate_removal, cubic_count, effective_scores, erk_allocation, lamp_scores,
                      neurons_to_keep, output_statistics, prune_smallest_global, remove_neurons, split_removal)
from .graph.network import KIND as GRAPH_KIND
from .graph.network import SparseGraph
from .run_context import RunContext, RunRecord, is_graph_reference
from .seeds import make_seed
from .sparse import MaskedConv2d, append_units, model_from_arch, set_mask
from .training import Distillation, NonFiniteLoss, make_optimizer

MAX_ROLLBACKS = 4
MAP_SAMPLES = 2048  # examples on which feature-map candidates are compared (Policy 3)


@dataclass
class LoopState(RunRecord):
    """Plain-data position of the loop (saved in every checkpoint); the run context's
    record, so its ``epochs`` (the budget, dense reference included) and ``history``
    are checkpointed with it."""

    phase: str = "dense"  # dense | growth | pruning | finetune | done
    iteration: int = 0
    target: float | None = None
    bound: float | None = None
    reached: bool = False
    accepted_val: float | None = None
    lr_scale: float = 1.0
    rollbacks: int = 0
    elapsed: float = 0.0
    dense: dict | None = None
    weights: dict = field(default_factory=dict)
    widths: dict = field(default_factory=dict)
    post_growth_layers: list = field(default_factory=list)
    frozen: list = field(default_factory=list)  # layers no longer pruned (pruning.layer_rest)
    rate_scale: float = 1.0  # multiplies pruning.rate and area_rate; halved per back-off (pruning.backoff)
    prune_start: int = 0  # live connections when the size schedule started
    prune_iterations: int = 0  # pruning iterations planned (size schedule, budget); 0 = until rest
    stop_reason: str | None = None  # why pruning ended: bound, target, iterations, floor
    kept_iteration: int | None = None  # the pruning iteration whose model was kept (None: post-growth)


class Synthesis:
    """One NeST run, in a run context.

    The context holds the config, data, reference, run directory, generator and the
    training, evaluation and logging helpers; its record is the loop's :class:`LoopState`.

    Args:
        ctx: the run context.  Its reference is a spec fitted to the data (an MLP or CNN
            spec, or a graph spec: anything whose ``build(generator)`` returns a
            SparseGraph), a user's dense SparseMLP whose widths and activations are the
            reference, or a SparseGraph (its architecture; the weights are drawn anew).
            Its ``on_iteration`` is called after every checkpoint with the loop state
            (tests use it to simulate an interruption).
    """

    def __init__(self, ctx: RunContext):
        self.ctx, self.cfg = ctx, ctx.cfg
        ctx.record = LoopState()  # the loop's position is the record a NeST run keeps (and checkpoints)
        self.units = GraphUnits(self) if is_graph_reference(ctx.reference) else ChainUnits(self)
        self.model = self.units.seed().to(ctx.device)
        self.optimizer = make_optimizer(self.model, self.cfg.train)
        self.accepted: dict | None = None
        self.area_removed = 0  # output positions removed by the current pruning step (CNNs)
        # pruning.criterion = "l0": the gated network and its size controller while pruning runs
        self.gates: L0Gates | None = None
        self.gate_control: L0SizeControl | None = None
        self.flops_control: FlopsControl | None = None  # and with pruning.target_flops its FLOP controller
        self._view = None  # the gated network's test-time view (:meth:`_gated_view`)
        self._distill: Distillation | None = None  # pruning.distill: fits the post-growth network's outputs
        self._last: dict | None = None
        self._clock = time.monotonic()

    @property
    def state(self) -> LoopState:
        """The loop's plain-data position (the context's record)."""
        return self.ctx.record

    # ---- public ------------------------------------------------------------
    def run(self):
        """Run (or continue) the loop to the end; returns the final model."""
        if not self.state.history:
            self._start()
        steps = {"dense": self._dense_step, "growth": self._growth_step,
                 "pruning": self._pruning_step, "finetune": self._finetune_step}
        while self.state.phase != "done":
            try:
                steps[self.state.phase]()
            except NonFiniteLoss:
                self._rollback()
                continue
            self._save()
        return self.model

    def resume(self, checkpoint: dict) -> None:
        """Restore the loop from a checkpoint dict (see :meth:`_checkpoint`).

        Raises:
            NestError: the checkpoint was written for another config.
        """
        if checkpoint.get("format") != ckpt.FORMAT or checkpoint.get("config") != self.cfg.digest():
            raise NestError("the checkpoint does not belong to this run's config.toml (it was written by "
                            "another run or the config was edited); start a new run instead.")
        self._restore(checkpoint)
        self._last = checkpoint

    # ---- phases ------------------------------------------------------------
    def _start(self) -> None:
        st, cfg = self.state, self.cfg
        st.weights["seed"] = self.model.active_weights()
        st.widths["seed"] = self.model.widths
        self._snapshot("seed")
        val = self.ctx.val_error(self.model)
        self._log("seed", 0, val=val)
        st.target = cfg.target_error
        st.phase = "dense" if (st.target is None or cfg.dense.train) and cfg.growth.enabled else "growth"
        if not cfg.growth.enabled:
            self._enter_pruning(val)
        self._save()

    def _dense_step(self) -> None:
        """Train the dense reference; its validation error becomes the growth target unless
        the target is a number."""
        t0 = time.monotonic()
        gen = torch.Generator().manual_seed(self.cfg.seed + 7919)
        dense = self.ctx.build_reference(gen).to(self.ctx.device)
        self._train(dense, self.cfg.dense.epochs, "dense reference", optimizer=make_optimizer(dense, self.cfg.train),
                    generator=gen)
        self.state.dense = {**self.ctx.dense_errors(dense), "seconds": time.monotonic() - t0}
        val = self.state.dense["val_error"]
        if self.state.target is None:
            self.state.target = val
        self.state.phase = "growth"
        self._log("dense", 0, val=val, model=dense, seconds=time.monotonic() - t0)

    def _growth_step(self) -> None:
        st, g = self.state, self.cfg.growth
        t0 = time.monotonic()
        loss = self._train(self.model, g.epochs_per_iteration, f"growth {st.iteration}")
        val = self.ctx.val_error(self.model)
        capped = g.max_epochs > 0 and st.epochs + g.epochs_per_iteration > g.max_epochs
        if val <= st.target or st.iteration + 1 >= g.max_iterations or capped:
            st.reached = val <= st.target
            self._log("growth", st.iteration, val=val, loss=loss, seconds=time.monotonic() - t0)
            self._enter_pruning(val)
            return
        grown = self._grow()
        self._log("growth", st.iteration, val=val, loss=loss, seconds=time.monotonic() - t0, **grown)
        st.iteration += 1

    def _enter_pruning(self, val: float) -> None:
        st = self.state
        st.weights["post_growth"] = self.model.active_weights()
        st.widths["post_growth"] = self.model.widths
        st.post_growth_layers = self.model.active_per_layer()
        self._snapshot("post_growth")
        if self.cfg.pruning.distill > 0:
            self._set_teacher(self._model_state())
        reference = st.target if (st.target is not None and val <= st.target) else val
        st.bound = reference + self.cfg.pruning.tolerance
        st.accepted_val = val
        self.accepted = self._model_state()
        st.phase, st.iteration = ("pruning" if self.cfg.pruning.enabled else "finetune"), 0
        st.prune_start, st.prune_iterations = self._plan_pruning()

    def _set_teacher(self, snap: dict | None) -> None:
        """``pruning.distill``: the frozen post-growth network (``snap``: its :meth:`_model_state`)
        whose outputs the pruning and fine-tuning also fit (a deviation from the paper, which
        trains on the labels only)."""
        self._distill = None
        if snap is not None:
            teacher = model_of_arch(snap["arch"]).to(self.ctx.device)
            teacher.load_state_dict(snap["model"])
            p = self.cfg.pruning
            self._distill = Distillation(teacher, p.distill, p.distill_temperature)

    def _plan_pruning(self) -> tuple[int, int]:
        """(live connections at the start, pruning iterations planned; 0 = until rest).

        With ``pruning.target_weights`` the iterations are those the budget leaves after
        growth and fine-tuning (``budget_epochs``), else ``schedule_steps``; the cubic
        schedule of ``pruning.schedule = "cubic"`` runs ``schedule_steps`` iterations.
        ``max_iterations`` caps both.
        """
        p, st = self.cfg.pruning, self.state
        start = self._live()
        if p.target_weights > 0 and p.budget_epochs > 0:
            left = p.budget_epochs - st.epochs - p.final_epochs
            planned = max(1, left // max(p.retrain_epochs, 1))
        elif p.target_weights > 0 or p.schedule == "cubic":
            planned = p.schedule_steps
        else:
            return start, 0
        return start, min(planned, p.max_iterations)

    def _size_goal(self, t: int) -> int | None:
        """Live connections wanted after pruning step t; None under the constant rate."""
        p, st = self.cfg.pruning, self.state
        if p.target_weights > 0:  # rises if growth stopped below the target
            return cubic_count(t, st.prune_start, self._pruned_size(), self._falling_steps())
        if p.schedule == "cubic":  # final_sparsity of the connections live when pruning starts
            return cubic_count(t, st.prune_start, round(st.prune_start * (1 - p.final_sparsity)), p.schedule_steps)
        return None

    def _pruned_size(self) -> int:
        """Where a size target's pruning schedule ends: the target, or with
        ``pruning.final_regrow = r`` (1 - r) of it (the rest is grown back before fine-tuning)."""
        p = self.cfg.pruning
        return p.target_weights - round(p.final_regrow * p.target_weights)

    def _falling_steps(self) -> int:
        """Iterations over which a size target's schedule falls (``schedule_share`` of the planned)."""
        return max(1, round(self.state.prune_iterations * self.cfg.pruning.schedule_share))

    def _pruning_step(self) -> None:
        """One pruning iteration: prune, retrain, then accept or reject by the validation bound.

        Under a size target (``pruning.target_weights``) every iteration is kept: the bound
        only warns, or with ``guard = "stop"`` ends the phase at the last model within it.
        An iteration that had nothing to remove (the size schedule already met, or every
        layer at its floor) is a retraining step, not a rejection.
        """
        st, p = self.state, self.cfg.pruning
        if p.criterion == "l0":
            self._gated_step()
            return
        t0 = time.monotonic()
        removed, neurons_removed, rewired = self._prune()
        window = (st.iteration * p.retrain_epochs, st.prune_iterations * p.retrain_epochs) \
            if p.lr_schedule == "phase" and st.prune_iterations else None
        loss = self._train(self.model, p.retrain_epochs, f"pruning {st.iteration}", p.lr_scale, window=window)
        val = self.ctx.val_error(self.model)
        sized = p.target_weights > 0
        for _ in range(p.recover_epochs if val > st.bound and not sized else 0):
            loss = self._train(self.model, 1, "recovery", p.lr_scale)
            val = self.ctx.val_error(self.model)
            if val <= st.bound:
                break
        nothing = removed + sum(neurons_removed) + getattr(self, "area_removed", 0) == 0
        accepted = val <= st.bound or (sized and p.guard == "warn")
        extra = {"pruned_area": self.area_removed} if self.units.has_area else {}
        if p.backoff:
            extra["rate_scale"] = st.rate_scale
        if rewired:
            extra["rewired"] = rewired
        self._log("pruning", st.iteration, val=val, loss=loss, seconds=time.monotonic() - t0,
                  pruned_connections=removed, pruned_neurons=neurons_removed, accepted=accepted, **extra)
        if accepted:
            self.accepted, st.accepted_val, st.kept_iteration = self._model_state(), val, st.iteration
        st.iteration += 1
        if not accepted:
            self._load_model_state(self.accepted)  # back to the last accepted model
            if p.schedule == "constant" and not sized and st.rate_scale > 0.5 ** p.backoff \
                    and st.iteration < p.max_iterations:
                st.rate_scale /= 2  # smaller steps from the last accepted model
                return
            if p.layer_rest and not sized and self._freeze_smallest_layer():
                st.history[-1]["frozen"] = list(st.frozen)
                return
            self._end_pruning("bound")  # comes to rest
        elif st.prune_iterations and st.iteration >= st.prune_iterations:
            self._end_pruning("target" if sized else "schedule")
        elif nothing and st.prune_iterations == 0:
            self._end_pruning("floor")  # the constant rate has nothing left to remove
        elif st.iteration >= p.max_iterations:
            self._end_pruning("iterations")

    def _end_pruning(self, reason: str) -> None:
        self.state.stop_reason, self.state.phase = reason, "finetune"

    def _freeze_smallest_layer(self) -> bool:
        """Stop pruning the smallest layer still being pruned; False when none is left.

        With ``pruning.layer_rest`` a rejected iteration does not end the phase: the layer
        with the fewest connections (the one a 1% cut hurts most) comes to rest alone and
        the others go on.  The phase ends when every layer has come to rest.
        """
        live = [i for i in range(len(self.model.layers)) if i not in self.state.frozen]
        if len(live) <= 1:
            return False
        self.state.frozen.append(min(live, key=lambda i: (self.model.layers[i].active_connections(), -i)))
        return True

    def _gated_step(self) -> None:
        """One pruning iteration under ``pruning.criterion = "l0"`` (a deviation from the
        paper's Policy 4, which ranks by |W*|): ``retrain_epochs`` of training with a hard
        concrete gate on every live connection and the expected-L0 penalty of Louizos et
        al., its lam steered after every step so the expected size follows the cubic size
        schedule to ``target_weights`` over ``schedule_share`` of the iterations
        (:class:`~nestsynth.pruning.gates.L0SizeControl`, as the ``l0`` baseline).  Nothing
        is removed while the gates train; after the last iteration exactly
        ``target_weights`` connections are kept, those with the most open gates, the
        test-time gates are folded into the weights, weak or disconnected units are
        removed and Policy 1 grows back what their removal took (:meth:`_project_gates`)."""
        st, p = self.state, self.cfg.pruning
        t0 = time.monotonic()
        row = {}
        if self.gates is None:
            # growth stopped below the target (a capped growth phase): Policy 1 grows the shortfall
            # first, at weight 0, so the gates start from the target size (they can only close)
            if grown := self._top_up(p.target_weights):
                row["grown_connections"] = grown
            self._attach_gates(initial_log_alpha(self.model, G.DROPRATE, self.ctx.generator), G.LAM, 0)
        if self.units.has_area:  # partial-area convolution goes on under the gates (scored on the gated net)
            self._prune_area(self._score_data()[0], self._gated_view())
            if self.flops_control is not None:
                self.flops_control.refresh()  # a smaller area makes a weight cheaper
            row["pruned_area"] = self.area_removed
        window = (st.iteration * p.retrain_epochs, st.prune_iterations * p.retrain_epochs) \
            if p.lr_schedule == "phase" else None
        self._view = None  # the area may have changed, and the gates train now
        loss = self._train(self.gates, p.retrain_epochs, f"pruning {st.iteration}", p.lr_scale, window=window,
                           penalty=self._gate_penalty, after_step=self._gate_controls)
        gated = self._gated_view()
        val = self.ctx.val_error(gated)
        extra = {"expected_l0": round(float(self.gates.expected_l0().detach()), 1), "lam": self.gate_control.lam,
                 "goal": self.gate_control.goal(self.gate_control.step)}
        if self.flops_control is not None:
            extra.update(expected_flops=round(self.flops_control.expected_flops()), mu=self.flops_control.mu)
        self._log("pruning", st.iteration, val=val, model=gated, loss=loss,
                  seconds=time.monotonic() - t0, accepted=True, **extra, **row)
        st.iteration += 1
        if st.iteration < st.prune_iterations:
            return
        units = self._project_gates()
        val = self.ctx.val_error(self.model)
        self._log("project", st.iteration, val=val, seconds=time.monotonic() - t0, pruned_neurons=units)
        self.accepted, st.accepted_val, st.kept_iteration = self._model_state(), val, st.iteration - 1
        self._end_pruning("target")

    def _gated_view(self):
        """The gated network at its test-time gates (a folded copy) with batch-norm statistics
        recomputed for them on the first ``growth.score_samples`` training inputs
        (``ctx.calibrated``: a gated network trains its statistics under noisy gates; without
        this ResNet-8/MNIST logged 19-38% validation error under the gates).  The view of an
        iteration's end is kept for the next iteration's area scoring: nothing changes the
        gates in between."""
        if self._view is None:
            self._view = self.ctx.calibrated(self.gates.deterministic_model(), self.cfg.growth.score_samples)
        return self._view

    def _attach_gates(self, log_alpha: list[torch.Tensor], lam: float, step: int, flops: dict | None = None) -> None:
        """Gate the model (``pruning.criterion = "l0"``): the gates' parameters join the
        optimizer (without weight decay) and the size controller starts at ``lam`` after
        ``step`` optimizer steps (0 for a new phase, more on resume); with
        ``pruning.target_flops`` a FLOP controller too (``flops``: its saved state)."""
        p, st = self.cfg.pruning, self.state
        scale = theta_scale(G.LR_SCALE, self.cfg.train.optimizer)
        self._view = None
        self.gates = L0Gates(self.model, log_alpha, BETA, scale, self.ctx.generator).to(self.ctx.device)
        self.optimizer.add_param_group({"params": list(self.gates.theta), "weight_decay": 0.0})
        steps = st.prune_iterations * p.retrain_epochs * self.ctx.steps_per_epoch()
        self.gate_control = L0SizeControl(self.gates, lam, p.target_weights, steps, G.GAIN, p.schedule_share,
                                          p.gate_release)
        self.gate_control.step = step
        self.flops_control = FlopsControl(self.gates, p.target_flops, steps, G.FLOPS_GAIN, p.schedule_share,
                                          **(flops or {})) if p.target_flops > 0 else None

    def _gate_controls(self) -> None:
        self.gate_control()
        if self.flops_control is not None:
            self.flops_control()

    def _gate_penalty(self) -> torch.Tensor:
        return self.gates.penalty(self.gate_control.lam, len(self.ctx.X))

    def _gate_state(self) -> dict | None:
        if self.gates is None:
            return None
        return {"theta": [t.detach().cpu().clone() for t in self.gates.theta],
                "lam": self.gate_control.lam, "step": self.gate_control.step,
                "flops": self.flops_control.state() if self.flops_control is not None else None}

    def _project_gates(self) -> list[int]:
        """End of a gated phase: keep the ``target_weights`` most open gates and fold them
        into the weights, then remove weak units and grow back by Policy 1 to the target.
        The optimizer starts afresh for the fine-tuning (as the ``l0`` baseline's).

        Returns:
            Units removed per hidden layer.
        """
        target = self.cfg.pruning.target_weights
        keep_most_open(self.gates, target)
        # unit removal and the grow-back's scan read the folded network
        self.ctx.calibrated(self.model, self.cfg.growth.score_samples)
        self.gates = self.gate_control = self.flops_control = self._view = None
        self.optimizer = make_optimizer(self.model, self.cfg.train, self.state.lr_scale)
        units = self.units.prune()
        self._top_up(target)
        return units

    def _finetune_step(self) -> None:
        st, p = self.state, self.cfg.pruning
        regrown = self._top_up(p.target_weights) if p.final_regrow > 0 and p.target_weights > 0 else 0
        if p.final_epochs > 0:
            t0 = time.monotonic()
            loss = self._train(self.model, p.final_epochs, "fine-tuning", p.final_lr_scale)
            val = self.ctx.val_error(self.model)
            # a regrown run ends at its size; a gated one was fitted to it only by the projection
            keep = val <= st.accepted_val or regrown > 0 or p.criterion == "l0"
            self._log("finetune", 0, val=val, loss=loss, seconds=time.monotonic() - t0, accepted=keep,
                      **({"regrown": regrown} if regrown else {}))
            if keep:
                st.accepted_val = val
            else:
                self._load_model_state(self.accepted)
        st.phase = "done"

    # ---- growth and pruning actions -----------------------------------------
    def _score_data(self) -> tuple[torch.Tensor, torch.Tensor]:
        ctx = self.ctx
        idx = scan_indices(len(ctx.X), self.cfg.growth.score_samples, ctx.generator).to(ctx.device)
        return ctx.X[idx], ctx.y[idx]

    def _grow(self) -> dict:
        """One growth step: connections (Policy 1) in every layer, then units (Policies 2
        and 3, by the unit backend)."""
        g, model = self.cfg.growth, self.model
        X, y = self._score_data()
        # networks with convolutions rank dormant connections in blocks with a running top-k (bounded memory)
        blocked = _has_conv(model) and g.connections and g.connection_scope == "global"
        bridges = g.neurons and self.units.scan_bridges
        scan = (gradient_scan(model, X, y, self.cfg.train.eval_batch_size, bridges=bridges, grads=not blocked)
                if bridges or not blocked else None)
        conns = 0
        if g.connections:
            masks = [layer.mask for layer in model.layers]
            k_layer = [connections_to_grow(m[0].numel(), m.shape[0], g.connection_fraction) for m in masks]
            if blocked:
                from .growth import top_dormant
                new_masks = top_dormant(model, X, y, sum(k_layer), self.cfg.train.eval_batch_size)
            elif g.connection_scope == "global":
                new_masks = grow_connections_global([grad.abs() for grad in scan.grads], masks, sum(k_layer))
            else:
                new_masks = [grow_connections(grad.abs(), m, k) for grad, m, k in zip(scan.grads, masks, k_layer)]
            for layer, new in zip(model.layers, new_masks):
                conns += int(new.sum() - layer.mask.sum())
                set_mask(layer, new, self.optimizer, g.adam_warm)
        return {"grown_connections": conns, **self.units.grow(scan, X, y)}

    def _prune(self) -> tuple[int, list[int], int]:
        """One pruning step: the smallest effective weights (per layer or over the whole
        network, ``pruning.scope``), optional rewiring, then weak neurons.

        Returns:
            (connections removed, units removed per hidden layer, connections rewired).
        """
        p = self.cfg.pruning
        before = self._live()
        self._prune_connections(self._removal_counts())
        rewired = self._rewire() if p.rewire > 0 else 0
        removed = before - self._live()
        units = self.units.prune()
        self._top_up()
        return removed, units, rewired

    def _live(self) -> int:
        """Connections switched on by the masks (a just-grown one is live at weight 0)."""
        return sum(layer.active_connections() for layer in self.model.layers)

    def _top_up(self, goal: int | None = None) -> int:
        """Under a size target, grow to the schedule's goal (or ``goal``) when the network
        is below it (neuron removal took more, growth stopped below the target, or
        ``final_regrow`` held some back): wake that many dormant connections with the
        largest |dL/dw| (Policy 1), at weight zero, so a sized run ends at its size.
        Returns the connections grown."""
        p, st, model = self.cfg.pruning, self.state, self.model
        if goal is None:
            goal = self._size_goal(st.iteration) if p.target_weights > 0 else None
        if goal is None:
            return 0
        if p.scope == "erk" and p.criterion == "magnitude":  # each layer back to its own share (the
            # gates compete over the whole network, so theirs is one global top-up)
            live = [layer.active_connections() for layer in model.layers]
            short = [max(0, g - a) for g, a in zip(self._layer_goals(goal), live)]
            if sum(short) > 0:
                self._grow_by_gradient(short)
            return sum(short)
        short = goal - self._live()
        if short <= 0:
            return 0
        self._grow_by_gradient(short)
        return short

    def _layer_goals(self, goal: int) -> list[int]:
        """``pruning.scope = "erk"``: the network's goal shared among layers by the
        Erdős–Rényi(-kernel) rule over their present shapes (:func:`erk_allocation`)."""
        return erk_allocation(goal, [tuple(layer.mask.shape) for layer in self.model.layers])

    def _grow_by_gradient(self, counts: list[int] | int, barred: list[torch.Tensor] | None = None) -> None:
        """Wake the dormant connections with the largest |dL/dw| (Policy 1's score), at
        weight 0: ``counts`` over all layers, or ``counts[i]`` in layer i.  Frozen layers
        and the ``barred`` positions (bool, one per layer) cannot grow.  Under a FLOP target
        (``pruning.target_flops``) the score is |dL/dw| per multiply-accumulate the weight
        would cost, so the grow-back after the gates' projection does not undo their FLOP
        savings (a LeNet-5 conv1 weight costs 576 MACs, an fc weight one)."""
        model = self.model
        X, y = self._score_data()
        scan = gradient_scan(model, X, y, self.cfg.train.eval_batch_size, bridges=False)
        blocked = self._frozen_masks() if barred is None else [f | b for f, b in zip(self._frozen_masks(), barred)]
        scores = [g.abs().masked_fill(b, 0.0) for g, b in zip(scan.grads, blocked)]
        if self.cfg.pruning.target_flops > 0:
            scores = [s_ / macs_per_weight(layer).clamp_min(1.0) for s_, layer in zip(scores, model.layers)]
        masks = [layer.mask for layer in model.layers]
        new = grow_connections_global(scores, masks, counts) if isinstance(counts, int) else \
            [grow_connections(s, m, k) for s, m, k in zip(scores, masks, counts)]
        for layer, mask in zip(model.layers, new):
            set_mask(layer, mask, self.optimizer, self.cfg.growth.adam_warm)

    def _removal_counts(self) -> list[int] | int:
        """Connections to remove now: one count per layer (layer scope) or one for the
        whole network (global scope).  The constant rate takes ``rate`` of every live
        layer (Policy 4); a size schedule removes what is above its goal."""
        p, st, model = self.cfg.pruning, self.state, self.model
        active = [layer.active_connections() for layer in model.layers]
        floors = self._floors(active)
        goal = self._size_goal(st.iteration)
        if goal is None:
            counts = [0 if i in st.frozen else constant_rate_removal(a, p.rate * st.rate_scale, p.min_weights)
                      for i, a in enumerate(active)]
            return sum(counts) if p.scope not in ("layer", "erk") else counts
        if p.scope == "erk":
            return [max(0, a - max(g, f)) for a, g, f in zip(active, self._layer_goals(goal), floors)]
        total = max(0, sum(active) - goal)
        return total if p.scope != "layer" else split_removal(total, active, floors)

    def _floors(self, active: list[int]) -> list[int]:
        """The least each layer keeps: ``min_weights``, or all of a frozen layer."""
        return [a if i in self.state.frozen else min(self.cfg.pruning.min_weights, a) for i, a in enumerate(active)]

    def _prune_connections(self, counts: list[int] | int) -> list[torch.Tensor]:
        """Remove the smallest |W*|: ``counts[i]`` in layer i, or ``counts`` over all layers.

        Returns:
            The masks before the removal (the rewiring step needs them).
        """
        model = self.model
        old = [layer.mask.clone() for layer in model.layers]
        scores = [effective_scores(model, i) for i in range(len(model.layers))]
        if self.cfg.pruning.scope == "lamp":
            scores = [lamp_scores(s) for s in scores]
        floors = self._floors([layer.active_connections() for layer in model.layers])
        if isinstance(counts, int):
            new = prune_smallest_global(scores, old, counts, floors)
        else:
            new = [prune_smallest_global([s], [m], n, [f])[0] for s, m, n, f in zip(scores, old, counts, floors)]
        for layer, mask in zip(model.layers, new):
            set_mask(layer, mask, self.optimizer)
        return old

    def _rewire(self) -> int:
        """Drop + regrow (``pruning.rewire``): remove a further share of the smallest |W*|
        and wake as many dormant connections with the largest |dL/dw| (Policy 1's score),
        at weight zero.  The share decays as a cosine over the size schedule (as in
        RigL); the just-dropped connections cannot regrow, so the size is unchanged.

        Returns:
            Connections rewired.
        """
        p, st, model = self.cfg.pruning, self.state, self.model
        steps = self._falling_steps() if st.prune_iterations else p.max_iterations
        share = p.rewire * 0.5 * (1 + math.cos(math.pi * min(st.iteration, steps) / steps))
        live = [layer.active_connections() for layer in model.layers]
        k = int(round(share * sum(live)))
        if k <= 0:
            return 0
        per_layer_scope = p.scope in ("layer", "erk")
        counts = k if not per_layer_scope else split_removal(k, live, self._floors(live))
        before = self._prune_connections(counts)
        dropped = [b.bool() & ~layer.mask.bool() for b, layer in zip(before, model.layers)]
        per_layer = [int(d.sum()) for d in dropped]
        self._grow_by_gradient(sum(per_layer) if not per_layer_scope else per_layer, dropped)
        return sum(per_layer)

    def _frozen_masks(self) -> list[torch.Tensor]:
        """Per layer: all True for a frozen layer (nothing may grow there), else all False."""
        return [torch.full_like(layer.mask, i in self.state.frozen, dtype=torch.bool)
                for i, layer in enumerate(self.model.layers)]

    def _prune_area(self, X: torch.Tensor, scored=None) -> None:
        """Partial-area convolution (Algorithm 2) in every conv layer still being pruned;
        ``area_removed`` counts the output positions switched off.  The positions are scored
        on ``scored`` (default: the model; under gates, its gated copy) and switched off in
        the model."""
        from .pruning import area_scores, prune_area

        p, model = self.cfg.pruning, self.model
        scored = model if scored is None else scored
        self.area_removed = 0
        if not (p.area and p.area_rate > 0):
            return
        for i, layer in enumerate(model.layers):
            if not isinstance(layer, MaskedConv2d) or i in self.state.frozen:
                continue
            new = prune_area(area_scores(scored, i, X, self.cfg.train.eval_batch_size), layer.area,
                             p.area_rate * self.state.rate_scale)
            self.area_removed += int(layer.area.sum() - new.sum())
            layer.area.copy_(new)

    # ---- training helpers ----------------------------------------------------
    def _train(self, model, epochs: int, desc: str, lr_scale: float = 1.0, **options) -> float | None:
        """:meth:`RunContext.train` of ``model`` with the loop's optimizer (unless ``options``
        give another) at ``train.lr * lr_scale`` times the rollback factor
        (``state.lr_scale``, halved per NaN rollback: a power of two, so the product is
        exact whichever way it is taken)."""
        options.setdefault("optimizer", self.optimizer)
        if self._distill is not None and self.state.phase in ("pruning", "finetune"):
            options.setdefault("objective", self._distill)
        return self.ctx.train(model, epochs, lr_scale=lr_scale * self.state.lr_scale, desc=desc, **options)

    def _log(self, phase: str, iteration: int, val: float, model=None, loss=None, seconds=0.0, **extra) -> None:
        """Append the context's row for ``model`` (default: the loop's), with the unit's
        training loss and duration."""
        self.state.history.append(self.ctx.row(phase, iteration, model or self.model, val, seconds,
                                               train_loss=loss, **extra))

    # ---- state, checkpoints, rollback --------------------------------------
    def _model_state(self, model=None) -> dict:
        """Plain data of ``model`` (default: the loop's): its architecture and CPU tensors."""
        model = self.model if model is None else model
        return {"arch": model.arch(),
                "model": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}}

    def _load_model_state(self, snap: dict) -> None:
        self.model = model_of_arch(snap["arch"]).to(self.ctx.device)
        self.model.load_state_dict(snap["model"])
        self.optimizer = make_optimizer(self.model, self.cfg.train, self.state.lr_scale)

    def _snapshot(self, name: str) -> None:
        if self.ctx.out is not None and current().is_main:
            ckpt.atomic_torch_save(self._model_state(), ckpt.checkpoint_path(self.ctx.out, name))

    def _checkpoint(self) -> dict:
        st = self.state
        return {"format": ckpt.FORMAT, "version": ckpt.FORMAT_VERSION, "config": self.cfg.digest(),
                **self._model_state(),
                "optimizer": copy.deepcopy(self.optimizer.state_dict()),
                "generator": self.ctx.generator.get_state(),
                "accepted": self.accepted,
                "gates": self._gate_state(),
                "teacher": self._model_state(self._distill.teacher) if self._distill is not None else None,
                "state": copy.deepcopy(st.__dict__)}

    def _save(self) -> None:
        now = time.monotonic()
        self.state.elapsed += now - self._clock
        self._clock = now
        self._last = self._checkpoint()
        out = self.ctx.out
        if out is not None and current().is_main:  # under torchrun rank 0 alone writes
            ckpt.atomic_torch_save(self._last, ckpt.checkpoint_path(out))
            ckpt.write_jsonl(ckpt.metrics_path(out), self.state.history)
        if self.ctx.on_iteration is not None:
            self.ctx.on_iteration(self.state)

    def _restore(self, c: dict) -> None:
        self.ctx.record = LoopState(**copy.deepcopy(c["state"]))
        self._load_model_state(c)
        self.gates = self.gate_control = self.flops_control = None
        if c.get("gates"):  # a gated pruning phase: its parameters are in the optimizer state
            g = c["gates"]
            self._attach_gates([torch.zeros_like(t) for t in g["theta"]], g["lam"], g["step"], g.get("flops"))
            with torch.no_grad():  # theta itself: log_alpha / scale would not round-trip exactly
                for theta, saved in zip(self.gates.theta, g["theta"]):
                    theta.copy_(saved)
        self.optimizer.load_state_dict(copy.deepcopy(c["optimizer"]))  # may alias; Adam steps in place
        self.ctx.generator.set_state(c["generator"])
        self.accepted = c["accepted"]
        self._set_teacher(c.get("teacher"))
        self._clock = time.monotonic()

    def _rollback(self) -> None:
        """NaN loss: return to the last checkpoint with half the learning rate."""
        rollbacks, scale = self.state.rollbacks + 1, self.state.lr_scale * 0.5
        if rollbacks > MAX_ROLLBACKS or self._last is None:
            t = self.cfg.train
            raise NestError(f"training diverged: the loss became NaN or infinite {rollbacks} times even after "
                            f"halving the learning rate each time (now {t.lr * scale:g}); lower train.lr "
                            f"({t.lr:g}) or the values that scale updates (train.weight_decay, train.momentum, "
                            "pruning.lr_scale, growth.alpha).")
        self._restore(self._last)
        self.state.rollbacks, self.state.lr_scale = rollbacks, scale  # _train reads lr_scale


@register_method(NEST, None, "NeST: grow from a sparse seed, then prune (sections growth, pruning)",
                 report=lambda ctx, model, wall: nest_report(ctx, model), checkpointed=True)
def run_nest(ctx: RunContext, cfg: Config):
    """NeST as a registered method: the loop in ``ctx`` to the end, continued from the run
    directory's last checkpoint when ``ctx.resume``.  Its settings are the top-level
    sections (``cfg`` is the whole Config: seed_net, dense, growth, pruning, train).

    Returns:
        The final model.

    Raises:
        NestError: the checkpoint belongs to another config.
    """
    job = Synthesis(ctx)
    if ctx.resume and ctx.out is not None:
        job.resume(ckpt.safe_load(ckpt.checkpoint_path(ctx.out)))
    return job.run()


def nest_report(ctx: RunContext, model) -> dict:
    """report.json of a finished NeST run in ``ctx`` (its record is the loop's LoopState):
    the core report with the growth and pruning sections, the time its checkpoints
    accumulated, and the sanity checks' warnings (also logged on ``nestsynth.sanity``)."""
    from .report import build_report
    from .sanity import synthesis_warnings

    st = ctx.record
    rows, test_error = ctx.measure(model)
    report = build_report(
        cfg=ctx.cfg, model_name=ctx.model_name, dataset=ctx.data.name, state=st,
        rows=rows, test_error=test_error, val_error=st.accepted_val,
        ref_widths=ctx.widths, final_widths=model.widths, device=str(ctx.device),
        input_shape=ctx.data.input_shape, reference=ctx.spec)
    report["warnings"] = synthesis_warnings(st, ctx.data, report)
    return report


def model_of_arch(arch: dict):
    """The network a plain-data ``arch()`` describes: a SparseGraph, SparseCNN or SparseMLP."""
    return SparseGraph.from_arch(arch) if arch.get("kind") == GRAPH_KIND else model_from_arch(arch)


def _has_conv(model) -> bool:
    return any(isinstance(layer, MaskedConv2d) for layer in model.layers)


class ChainUnits:
    """Unit backend of a chain (SparseMLP, SparseCNN): hidden layer h, read by layer h + 1.

    Args:
        run: the synthesis (its config, model and optimizer, and its context's reference
            -- a ModelSpec / SparseMLP (MLP) or a CNNSpec --, generator and data are read).
    """

    def __init__(self, run: Synthesis):
        self.run, self.spec = run, run.ctx.spec  # a CNNSpec, or None for an MLP

    @property
    def has_area(self) -> bool:
        """Pruning steps log the output positions partial-area convolution removed."""
        return self.spec is not None

    @property
    def scan_bridges(self) -> bool:
        """Neuron growth reads the bridging gradients of the growth step's scan."""
        return True

    def seed(self):
        ctx, s = self.run.ctx, self.run.cfg.seed_net
        if self.spec is not None:
            from .seeds.cnn import make_cnn_seed
            return make_cnn_seed(self.spec, s.ratio, s.density, ctx.generator)
        return make_seed(ctx.widths, s.ratio, s.density, ctx.generator, ctx.activations, ctx.batch_norm, s.topology)

    def grow(self, scan, X: torch.Tensor, y: torch.Tensor) -> dict:
        """Feature maps in every conv layer (Policy 3), then neurons in every hidden linear
        layer (Policy 2) from the scan's bridging gradients."""
        run, g = self.run, self.run.cfg.growth
        model = run.model
        maps = self._grow_feature_maps(X, y) if self.spec is not None else []
        neurons = []
        if g.neurons and g.neurons_per_step > 0:
            for h in range(model.n_hidden):
                if scan.bridges[h] is None:  # conv layers grow feature maps instead
                    continue
                w_in, w_out = grow_neurons(scan.bridges[h], g.neurons_per_step, g.beta, g.alpha,
                                           model.effective_weight(h), model.effective_weight(h + 1),
                                           run.ctx.generator, g.sign)
                # neurons born in layer h-1 during this step are not among the scanned inputs
                w_in = torch.nn.functional.pad(w_in, (0, model.layers[h].in_features - w_in.shape[1]))
                append_units(model, h, w_in, w_out, run.optimizer, warm=g.adam_warm)
                neurons.append(w_in.shape[0])
        return _units_row(neurons, maps)

    def _grow_feature_maps(self, X: torch.Tensor, y: torch.Tensor) -> list[dict]:
        """Policy 3 in every conv layer, first to last, each on the model grown so far.

        A new map's kernels are the best of ``growth.map_candidates`` random sets, judged
        by the loss on up to MAP_SAMPLES of the scoring examples.  The loss reductions of
        the chosen sets and the mean reductions of all candidates (a random choice) are
        logged, for the paper's "about twice the reduction of a random set".
        """
        from .growth.feature_maps import grow_feature_maps

        run, g = self.run, self.run.cfg.growth
        model = run.model
        if not g.neurons or g.feature_maps_per_step <= 0:
            return []
        Xm, ym = X[:MAP_SAMPLES], y[:MAP_SAMPLES]
        grown = []
        for h in range(model.n_conv):
            layer = model.layers[h]
            density = g.map_density or max(float(layer.mask.mean()), 1.0 / layer.mask[0].numel())
            w_in, w_out, stats = grow_feature_maps(model, h, g.feature_maps_per_step, Xm, ym,
                                                   g.map_candidates, density, run.ctx.generator, g.map_scale,
                                                   g.map_out)
            append_units(model, h, w_in, w_out, run.optimizer, warm=g.adam_warm)
            grown.append(_map_stats(w_in.shape[0], stats))
        return grown

    def prune(self) -> list[int]:
        """Units removed per hidden layer: for a CNN partial-area convolution first, then
        weak or disconnected feature maps and neurons; for an MLP weak or disconnected
        neurons."""
        run, p = self.run, self.run.cfg.pruning
        model = run.model
        if self.spec is not None:
            return self._prune_cnn_units()
        neurons = [0] * model.n_hidden
        if p.neurons:
            X, _ = run._score_data()
            out_abs, out_mean = output_statistics(model, X, run.cfg.train.eval_batch_size)
            for h in range(model.n_hidden):
                keep = neurons_to_keep(out_abs[h], model.layers[h].mask, model.layers[h + 1].mask,
                                       p.neuron_threshold)
                neurons[h] = remove_neurons(model, h, keep, out_mean[h], run.optimizer)
        return neurons

    def _prune_cnn_units(self) -> list[int]:
        from .pruning import feature_map_statistics, maps_to_keep, remove_feature_maps

        run, p = self.run, self.run.cfg.pruning
        model = run.model
        X, _ = run._score_data()
        run._prune_area(X)
        removed = [0] * model.n_hidden
        if p.neurons:
            stats = feature_map_statistics(model, X, run.cfg.train.eval_batch_size)
            for h in range(model.n_hidden):
                layer = model.layers[h]
                keep = maps_to_keep(stats.abs_means[h], layer.mask, model.layers[h + 1].mask, p.neuron_threshold,
                                    getattr(layer, "area", None))
                removed[h] = remove_feature_maps(model, h, keep, stats, run.optimizer)
        return removed


def _units_row(grown: list[int], maps: list[dict]) -> dict:
    """The unit part of a growth row: units grown per layer or group, and with feature maps
    (:func:`_map_stats` records) the counts and loss reductions of Policy 3."""
    row = {"grown_neurons": grown}
    if maps:
        row.update(grown_maps=[m["count"] for m in maps], map_best_reduction=[m["best"] for m in maps],
                   map_random_reduction=[m["random"] for m in maps])
    return row


def _map_stats(count: int, stats: list[dict]) -> dict:
    """A growth row's record of the maps grown in one layer or group (Policy 3)."""
    return {"count": count, "best": sum(st["best_reduction"] for st in stats),
            "random": sum(st["mean_random_reduction"] for st in stats)}


class GraphUnits:
    """Unit backend of a :class:`~nestsynth.graph.SparseGraph`: the units of every resizable
    coupled group (a residual stream's channels are one group).

    * seed: :func:`nestsynth.seeds.graph.make_graph_seed` of the reference drawn anew;
    * growth: per resizable group, in graph order, Policy 3 (``feature_maps_per_step``
      best-of-candidates units, :func:`nestsynth.growth.groups.grow_group_maps`) when its
      members are convolutions, Policy 2 (``neurons_per_step`` bridging neurons,
      :func:`nestsynth.growth.groups.grow_group_neurons`) when they and their consumers are
      Linear layers; a group mixing both grows no units;
    * pruning: partial-area convolution in every conv layer (the area masks are the
      layers' own, sized for the graph's input), then dead, unread or weak units of every
      resizable group (:func:`nestsynth.pruning.groups.prune_group_units`).

    Log rows list units per resizable group (``grown_neurons``, ``pruned_neurons``: neurons
    or feature maps), and for the conv groups the Policy 3 statistics (``grown_maps``...).

    Args:
        run: the synthesis (its context's reference is a SparseGraph, or a spec whose
            ``build(generator)`` returns one).
    """

    has_area = property(lambda self: _has_conv(self.run.model))
    scan_bridges = False  # each group's bridging gradient is taken right before it grows

    def __init__(self, run: Synthesis):
        self.run = run

    def seed(self) -> SparseGraph:
        from .seeds.graph import make_graph_seed

        ctx, s = self.run.ctx, self.run.cfg.seed_net
        return make_graph_seed(ctx.build_reference(), s.ratio, s.density, ctx.generator)

    def _groups(self) -> list:
        return [group for group in self.run.model.groups() if group.resizable]

    def grow(self, scan, X: torch.Tensor, y: torch.Tensor) -> dict:
        from .graph.units import current
        from .growth.groups import grow_group_maps, grow_group_neurons, is_conv_group, is_linear_group

        run, g = self.run, self.run.cfg.growth
        model, bs = run.model, run.cfg.train.eval_batch_size
        grown, maps = [], []
        for group in self._groups():
            group, n = current(model, group), 0
            if g.neurons and is_conv_group(model, group) and g.feature_maps_per_step > 0:
                stats = grow_group_maps(model, group, g.feature_maps_per_step, X[:MAP_SAMPLES], y[:MAP_SAMPLES],
                                        g.map_candidates, g.map_density or None, run.ctx.generator, g.map_scale,
                                        g.map_out, run.optimizer, g.adam_warm)
                n = len(stats)
                maps.append(_map_stats(n, stats))
            elif g.neurons and is_linear_group(model, group) and g.neurons_per_step > 0:
                n = grow_group_neurons(model, group, g.neurons_per_step, X, y, g.beta, g.alpha, run.ctx.generator,
                                       g.sign, run.optimizer, g.adam_warm, bs)
            grown.append(n)
        return _units_row(grown, maps)

    def prune(self) -> list[int]:
        from .pruning.groups import prune_group_units

        run, p = self.run, self.run.cfg.pruning
        X, _ = run._score_data()
        run._prune_area(X)
        if not p.neurons:
            return [0] * len(self._groups())
        return prune_group_units(run.model, X, p.neuron_threshold, run.cfg.train.eval_batch_size, run.optimizer)
