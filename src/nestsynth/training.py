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


def train_epoch(model, X: torch.Tensor, y: torch.Tensor, optimizer, batch_size: int,
                generator: torch.Generator, augment: Callable | None = None,
                progress: Callable[[int], None] | None = None,
                lr_at: Callable[[int], float] | None = None,
                penalty: Callable[[], torch.Tensor] | None = None,
                after_step: Callable[[], None] | None = None) -> float:
    """One epoch of minibatch training in a random order drawn from ``generator``.

    ``lr_at(batch_index)`` (optional) sets the learning rate before every batch.
    ``penalty()`` (optional) is added to every batch loss (regularizers such as L0);
    the reported loss excludes it.  ``after_step()`` (optional) runs after every
    optimizer step (mask re-application, gradual pruning, custom updates).

    Returns:
        The mean training loss.

    Raises:
        NonFiniteLoss: as soon as a batch loss is NaN or infinite.
    """
    model.train()
    order = torch.randperm(len(X), generator=generator).to(X.device)
    total, count = 0.0, 0
    for b, start in enumerate(range(0, len(X), batch_size)):
        if lr_at is not None:
            set_lr(optimizer, lr_at(b))
        idx = order[start:start + batch_size]
        xb, yb = X[idx], y[idx]
        if augment is not None:
            xb = augment(xb)
        loss = F.cross_entropy(model(xb), yb)
        full = loss + penalty() if penalty is not None else loss
        if not torch.isfinite(full):
            raise NonFiniteLoss(f"training loss became {full.item()}")
        optimizer.zero_grad(set_to_none=True)
        full.backward()
        optimizer.step()
        if after_step is not None:
            after_step()
        total += loss.item() * len(idx)
        count += len(idx)
        if progress is not None:
            progress(len(idx))
    return total / max(count, 1)


@torch.no_grad()
def evaluate(model, X: torch.Tensor, y: torch.Tensor, batch_size: int = 2048) -> tuple[float, float]:
    """(error rate, mean loss) of the model in eval mode."""
    was_training = model.training
    model.eval()
    wrong, loss = 0, 0.0
    for start in range(0, len(X), batch_size):
        logits = model(X[start:start + batch_size])
        yb = y[start:start + batch_size]
        wrong += int((logits.argmax(1) != yb).sum())
        loss += float(F.cross_entropy(logits, yb, reduction="sum"))
    model.train(was_training)
    n = max(len(X), 1)
    return wrong / n, loss / n
