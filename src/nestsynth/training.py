"""Train and evaluate; no growth or pruning logic here."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from .config import TrainConfig


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or infinite."""


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, lr_scale: float = 1.0) -> torch.optim.Optimizer:
    """Adam or SGD with momentum over all parameters (L2 weight decay as configured)."""
    lr = cfg.lr * lr_scale
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay)
    return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=cfg.weight_decay)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def cosine_lr(step: int, total: int, lr: float, min_scale: float) -> float:
    """Learning rate at ``step`` of a cosine annealing from ``lr`` to ``lr * min_scale``."""
    frac = min(max(step, 0), total) / max(total, 1)
    return lr * (min_scale + (1.0 - min_scale) * 0.5 * (1.0 + math.cos(math.pi * frac)))


def steps_per_epoch(n: int, batch_size: int, min_steps: int = 0) -> int:
    """Optimizer steps in one training epoch over ``n`` examples.

    An epoch is one pass over the data (``ceil(n / batch_size)`` steps, the last batch
    possibly partial) unless that is fewer than ``min_steps``; then it is ``min_steps``
    full batches drawn from fresh permutations one after another (see
    :func:`train_epoch`), so an epoch on a small data set means as much learning as on a
    large one.  ``train.min_steps_per_epoch`` sets ``min_steps`` (README, "Training
    budgets").

    Args:
        n: training examples.
        batch_size: examples per optimizer step.
        min_steps: the least number of steps an epoch has (0: one pass, always).

    Returns:
        ``max(ceil(n / batch_size), min_steps)``, or 0 when ``n`` is 0.

    Example:
        >>> steps_per_epoch(1293, 128, 150), steps_per_epoch(54000, 128, 150)
        (150, 422)
    """
    if n <= 0:
        return 0
    return max(math.ceil(n / batch_size), min_steps)


def epoch_steps(cfg: TrainConfig, n: int) -> int:
    """:func:`steps_per_epoch` of ``n`` examples under ``cfg`` (batch size, minimum steps)."""
    return steps_per_epoch(n, cfg.batch_size, cfg.min_steps_per_epoch)


def samples_per_epoch(n: int, batch_size: int, steps: int) -> int:
    """Examples drawn in an epoch of ``steps`` batches over ``n`` examples (progress bars).

    Returns:
        ``n`` for one pass (``steps <= ceil(n / batch_size)``), else ``steps * batch_size``.
    """
    return n if steps <= math.ceil(n / batch_size) else steps * batch_size


def batch_indices(n: int, batch_size: int, steps: int, generator: torch.Generator):
    """The example indices of every batch of one epoch, drawn from ``generator``.

    With ``steps <= ceil(n / batch_size)`` this is one permutation cut into consecutive
    batches (the last one possibly partial): exactly the draws of a plain epoch.  With
    more steps, permutations are drawn one after another and their concatenation is cut
    into ``steps`` full batches of ``batch_size``; every example is seen once per
    permutation.

    Args:
        n: training examples (> 0).
        batch_size: examples per batch.
        steps: batches in the epoch (see :func:`steps_per_epoch`).
        generator: source of the permutations.

    Returns:
        A list of ``steps`` index tensors (CPU, int64).
    """
    natural = math.ceil(n / batch_size)
    if steps <= natural:
        order = torch.randperm(n, generator=generator)
        return [order[start:start + batch_size] for start in range(0, n, batch_size)][:steps]
    passes = math.ceil(steps * batch_size / n)
    order = torch.cat([torch.randperm(n, generator=generator) for _ in range(passes)])
    return [order[s * batch_size:(s + 1) * batch_size] for s in range(steps)]


def train_epoch(model, X: torch.Tensor, y: torch.Tensor, optimizer, batch_size: int,
                generator: torch.Generator, augment: Callable | None = None,
                progress: Callable[[int], None] | None = None,
                lr_at: Callable[[int], float] | None = None,
                penalty: Callable[[], torch.Tensor] | None = None,
                after_step: Callable[[], None] | None = None,
                steps: int | None = None, objective: Callable | None = None) -> float:
    """One epoch of minibatch training in a random order drawn from ``generator``.

    ``lr_at(batch_index)`` (optional) sets the learning rate before every batch.
    ``penalty()`` (optional) is added to every batch loss (regularizers such as L0);
    the reported loss excludes it.  ``after_step()`` (optional) runs after every
    optimizer step (mask re-application, gradual pruning, custom updates).
    ``objective(logits, xb, yb, reduction)`` (optional) replaces the cross-entropy
    (e.g. :class:`Distillation`); it sees the batch as the model does, augmented.

    Args:
        steps: optimizer steps of the epoch (:func:`steps_per_epoch`); None or at most
            ``ceil(len(X) / batch_size)`` is one pass over the data in one permutation,
            more cycles through fresh permutations (:func:`batch_indices`).

    Returns:
        The mean training loss.

    Raises:
        NonFiniteLoss: as soon as a batch loss is NaN or infinite.
    """
    from .distributed import current

    model.train()
    steps = math.ceil(len(X) / batch_size) if steps is None else steps
    batches = batch_indices(len(X), batch_size, steps, generator) if len(X) else []
    total, count = 0.0, 0
    dist = current()
    for b, idx in enumerate(batches):
        if lr_at is not None:
            set_lr(optimizer, lr_at(b))
        idx = idx.to(X.device)
        if dist.active:
            loss = _shared_step(model, X, y, idx, optimizer, augment, penalty, dist, objective)
        else:
            loss = _local_step(model, X[idx], y[idx], optimizer, augment, penalty, objective)
        if after_step is not None:
            after_step()
        total += loss * len(idx)
        count += len(idx)
        if progress is not None:
            progress(len(idx))
    if dist.active:
        dist.average_norm_statistics(model)
    return total / max(count, 1)


def _batch_loss(model, xb: torch.Tensor, yb: torch.Tensor, objective: Callable | None,
                reduction: str = "mean") -> torch.Tensor:
    """The training loss of the batch: ``objective`` or the cross-entropy."""
    logits = model(xb)
    if objective is None:
        return F.cross_entropy(logits, yb, reduction=reduction)
    return objective(logits, xb, yb, reduction)


class Distillation:
    """Knowledge distillation (Hinton et al. 2015) from a frozen ``teacher`` as a training
    objective: ``(1 - alpha) * CE(s, y) + alpha * T^2 * KL(softmax(t / T) || softmax(s / T))``
    per example, with the student's logits s and the teacher's t (eval mode, no gradient)
    on the same (augmented) batch."""

    def __init__(self, teacher, alpha: float, temperature: float):
        self.teacher, self.alpha, self.temperature = teacher.eval(), alpha, temperature
        for p in self.teacher.parameters():
            p.requires_grad_(False)

    def __call__(self, logits: torch.Tensor, xb: torch.Tensor, yb: torch.Tensor,
                 reduction: str = "mean") -> torch.Tensor:
        T = self.temperature
        with torch.no_grad():
            target = F.log_softmax(self.teacher(xb) / T, dim=1)
        kl = F.kl_div(F.log_softmax(logits / T, dim=1), target, log_target=True, reduction="none").sum(1)
        ce = F.cross_entropy(logits, yb, reduction="none")
        per = (1 - self.alpha) * ce + self.alpha * T * T * kl
        return per.sum() if reduction == "sum" else per.mean()


def _local_step(model, xb: torch.Tensor, yb: torch.Tensor, optimizer, augment: Callable | None, penalty,
                objective: Callable | None = None) -> float:
    """One optimizer step of one process on the batch (xb, yb); returns its mean loss
    (without the penalty).

    Raises:
        NonFiniteLoss: the loss (with the penalty) is NaN or infinite.
    """
    if augment is not None:
        xb = augment(xb)
    loss = _batch_loss(model, xb, yb, objective)
    full = loss + penalty() if penalty is not None else loss
    if not torch.isfinite(full):
        raise NonFiniteLoss(f"training loss became {full.item()}")
    optimizer.zero_grad(set_to_none=True)
    full.backward()
    optimizer.step()
    return loss.item()


def _shared_step(model, X: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, optimizer,
                 augment: Callable | None, penalty, dist, objective: Callable | None = None) -> float:
    """One optimizer step of the global batch ``idx`` split across ranks (:mod:`nestsynth.distributed`).

    Every rank draws the augmentation of the whole global batch, so the generator stays in
    step; an augmentation that takes ``batch=``/``start=`` (``by_rows``, the run's own)
    distorts only this rank's rows, any other distorts the whole batch.  This rank's loss
    is the sum over its slice divided by the GLOBAL batch size (plus the penalty divided
    by the number of ranks), so the gradients summed across ranks are those of the global
    batch's mean loss (plus the penalty), as one process computes them.  The loss is
    checked for NaN after the reduction, so every rank raises together.

    Returns:
        The global batch's mean loss (without the penalty).

    Raises:
        NonFiniteLoss: the global loss (with the penalty) is NaN or infinite.
    """
    size = len(idx)
    lo, hi = dist.bounds(size)
    # a rank whose slice is empty (a last batch smaller than the ranks) still runs a forward
    # pass, weighted 0, so the draws a forward makes (L0 gate noise) stay in step
    weight = 1.0 if hi > lo else 0.0
    lo, hi = (lo, hi) if weight else (0, min(2, size))
    xb, yb = X[idx[lo:hi]], y[idx[lo:hi]]
    if augment is not None and getattr(augment, "by_rows", False):
        xb = augment(xb, batch=size, start=lo)
    elif augment is not None:
        xb = augment(X[idx])[lo:hi]
    params = [p for group in optimizer.param_groups for p in group["params"]]
    optimizer.zero_grad(set_to_none=True)
    local = _batch_loss(model, xb, yb, objective, "sum") * weight
    extra = penalty() if penalty is not None else None
    (local / size + (extra / dist.world_size if extra is not None else 0.0)).backward()
    loss_sum = float(dist.reduce_gradients(params, local.detach().reshape(1))[0])
    loss = loss_sum / size
    full = loss + (float(extra.detach()) if extra is not None else 0.0)
    if not math.isfinite(full):
        raise NonFiniteLoss(f"training loss became {full}")
    optimizer.step()
    return loss


@torch.no_grad()
def recalibrate_batch_norm(model, X: torch.Tensor, batch_size: int = 2048) -> bool:
    """Recompute every batch norm's running statistics of ``model`` from the inputs ``X``
    (forward passes in train mode, cumulative averages: ``momentum = None``), as SWA's
    ``update_bn`` does.  Used where the weights changed after the statistics were gathered:
    a gated network's test-time gates differ from the noisy gates it trained with, and
    folding them changes every layer's output scale.  Under torchrun every rank passes all
    of ``X``, so the statistics agree without a collective.

    Returns:
        False (nothing done) when the model has no batch norm.
    """
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
             and m.track_running_stats]
    if not norms:
        return False
    momenta = [m.momentum for m in norms]
    was_training = model.training
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    for start in range(0, len(X), batch_size):
        model(X[start:start + batch_size])
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    model.train(was_training)
    return True


@torch.no_grad()
def evaluate(model, X: torch.Tensor, y: torch.Tensor, batch_size: int = 2048) -> tuple[float, float]:
    """(error rate, mean loss) of the model in eval mode."""
    from .distributed import current

    dist = current()
    n = max(len(X), 1)
    X, y = dist.shard(X, y)  # under torchrun each rank evaluates its part; the counts are summed
    was_training = model.training
    model.eval()
    wrong, loss = 0, 0.0
    for start in range(0, len(X), batch_size):
        logits = model(X[start:start + batch_size])
        yb = y[start:start + batch_size]
        wrong += int((logits.argmax(1) != yb).sum())
        loss += float(F.cross_entropy(logits, yb, reduction="sum"))
    model.train(was_training)
    if dist.active:
        wrong, loss = dist.all_reduce_sum([torch.tensor([wrong, loss], dtype=torch.float64,
                                                        device=dist.device())])[0].tolist()
        wrong = int(round(wrong))
    return wrong / n, loss / n
