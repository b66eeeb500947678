"""Several processes under ``torchrun``: data-parallel training and scans with identical masks.

``torchrun --standalone --nproc_per_node=N -m nestsynth synthesize ...`` (or ``prune``,
``compare``) starts N copies of the command; :func:`init_from_env` turns the environment
torchrun sets (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``) into one process group (gloo on
the CPU, NCCL on CUDA, device ``cuda:LOCAL_RANK``) and the process-wide :class:`Dist` that
:func:`current` returns.  Without torchrun (or with one process) :func:`current` is a
single-process :class:`Dist` whose every method is a no-op, and every caller keeps its
single-process code path, so a single process computes exactly what it did before.

How the ranks stay identical:

* Every rank holds the whole data set and the run's generator in the same state.  An
  epoch draws the same global batches on every rank; each rank trains on its slice of
  each global batch (``train.batch_size`` is the TOTAL batch: a rank gets
  ``batch_size / world_size`` examples) and the gradients are summed across ranks
  (:meth:`Dist.reduce_gradients`) before the optimizer step, so the parameters stay
  equal and every random draw that shapes the model (seed masks, neuron signs,
  feature-map candidates, the scan samples) is the same on every rank for free.
* The gradients are reduced by hand after ``backward`` instead of wrapping the model in
  ``DistributedDataParallel``: NeST replaces parameters on every growth and pruning step
  (new neurons, removed feature maps, a rebuilt model on rollback), and a DDP wrapper
  built before such surgery would keep buckets of stale parameters.  A hand reduction
  reads the optimizer's parameters at every step, so there is no wrapper to go stale.
* Scores that choose a mask and are computed on scan samples (dormant-connection and
  bridging gradients, neuron output statistics) are computed by each rank on its shard of
  the sample and summed across ranks before any top-k or threshold; evaluations sum the
  error counts of each rank's shard of the validation or test split.  A rank whose shard
  is empty (a sample with fewer examples than ranks) still enters every collective the
  others enter, with zeros of the same shapes (:meth:`Dist.shard_or_stand_in` where the
  shapes come from a forward pass).
* After every logged unit of work (a growth or pruning step of NeST, every logged row of a
  baseline) the ranks compare a SHA-256 of their masks and widths
  (:meth:`Dist.check_masks`); a mismatch stops every rank with one sentence
  (:class:`MaskMismatch`).
* Rank 0 alone writes the run directory (lock, config, checkpoints, metrics, report,
  plots) and prints progress; every rank reads the checkpoint on ``--resume``.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import re

import torch

from .errors import NestError

TIMEOUT_S = 300  # a rank waiting longer than this in a collective gives up (its peer died or hangs)
FLIP_ENV = "NESTSYNTH_TEST_FLIP_MASK"  # test hook "RANK:CHECK": that rank flips a mask bit before that check


class MaskMismatch(NestError):
    """The ranks' masks differ: the run cannot go on (every rank raises it)."""

    collective = True  # every rank knows; rank 0 alone prints it


class Dist:
    """The process group of a run, or a single process (every method a no-op).

    Attributes:
        world_size, rank, local_rank: as torchrun numbers the processes (1, 0, 0 alone).
        backend: "gloo" or "nccl", None for a single process.
        mask_checks, mask_mismatches: mask comparisons made and failed so far.
    """

    def __init__(self, world_size: int = 1, rank: int = 0, local_rank: int = 0, backend: str | None = None):
        self.world_size, self.rank, self.local_rank, self.backend = world_size, rank, local_rank, backend
        self.mask_checks = self.mask_mismatches = 0

    @property
    def active(self) -> bool:
        """True with more than one process."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes files and prints."""
        return self.rank == 0

    # ---- collectives ---------------------------------------------------------
    def shard(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """This rank's contiguous part of each tensor's first dimension (the whole tensors
        in a single process).  Parts differ by at most one row; with fewer rows than ranks
        the last ranks get empty parts."""
        if not self.active:
            return tensors
        return tuple(t[slice(*self.bounds(len(t)))] for t in tensors)

    def shard_or_stand_in(self, *tensors: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], bool]:
        """(this rank's parts, stand_in): :meth:`shard`, except that a rank whose part is
        empty while the tensors are not gets their first row instead, with ``stand_in``
        True.  Such a rank runs the same passes on that row, so it learns the shapes of the
        sums it accumulates (hidden outputs, group reads), then must zero those sums before
        the collective: every rank enters the same collectives with tensors of the same
        shape, and a rank without examples contributes zeros (``all_reduce_sum(...,
        stand_in)``; a rank that returned early instead would leave the others waiting in
        the collective until the timeout)."""
        parts = self.shard(*tensors)
        if parts and len(parts[0]) == 0 and len(tensors[0]) > 0:
            return tuple(t[:1] for t in tensors), True
        return parts, False

    def bounds(self, n: int) -> tuple[int, int]:
        """(first, end) of this rank's rows of ``n`` (as ``tensor_split``: the first ``n % N``
        ranks get one row more)."""
        q, r = divmod(n, self.world_size)
        lo = self.rank * q + min(self.rank, r)
        return lo, lo + q + (self.rank < r)

    def all_reduce_sum(self, tensors: list[torch.Tensor], stand_in: bool = False) -> list[torch.Tensor]:
        """Sum every tensor across ranks, in place, in one collective (one flat buffer of
        the first tensor's dtype and device); returns the tensors.  ``stand_in``: this
        rank's sums came from :meth:`shard_or_stand_in`'s stand-in row (it has no examples),
        so it contributes zeros of their shapes."""
        if stand_in:
            for t in tensors:
                t.zero_()
        if not self.active or not tensors:
            return tensors
        import torch.distributed as td

        flat = torch.cat([t.reshape(-1).to(tensors[0].dtype) for t in tensors])
        td.all_reduce(flat)
        start = 0
        for t in tensors:
            t.copy_(flat[start:start + t.numel()].view_as(t))
            start += t.numel()
        return tensors

    def reduce_gradients(self, params: list[torch.Tensor], extra: torch.Tensor) -> torch.Tensor:
        """Sum the gradients of ``params`` and the vector ``extra`` across ranks (one
        collective, in the gradients' dtype).

        A parameter without a gradient on this rank (it took no part in this rank's loss)
        counts as zeros; it gets the sum if any rank had a gradient for it and keeps None
        otherwise, so the optimizer skips the same parameters on every rank.

        Returns:
            ``extra`` summed.
        """
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        dtype, device = (grads[0].dtype, grads[0].device) if grads else (extra.dtype, extra.device)
        present = torch.tensor([p.grad is not None for p in params], dtype=dtype, device=device)
        head = torch.cat([extra.to(device, dtype), present])
        flat = torch.cat([head] + [g.reshape(-1).to(dtype) for g in grads])
        import torch.distributed as td

        td.all_reduce(flat)
        start = len(head)
        for p, g, count in zip(params, grads, flat[len(extra):len(head)].tolist()):
            n = g.numel()
            p.grad = flat[start:start + n].view_as(p).to(p.dtype) if count > 0 else None
            start += n
        return flat[:len(extra)].cpu()

    def average_norm_statistics(self, model: torch.nn.Module) -> None:
        """Average the batch norms' running statistics across ranks (each rank updated them
        from its own slices), so evaluation sees the same model everywhere."""
        if not self.active:
            return
        stats = [buf for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
                 for buf in (m.running_mean, m.running_var) if buf is not None]
        if stats:
            self.all_reduce_sum(stats)
            for buf in stats:
                buf.div_(self.world_size)

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as td

            td.barrier()

    # ---- mask checks -------------------------------------------------------------
    def check_masks(self, model, where: str) -> None:
        """Compare a hash of ``model``'s masks (and widths) across ranks.

        Raises:
            MaskMismatch: the hashes differ (on every rank).
        """
        if not self.active:
            return
        self.mask_checks += 1
        self._test_flip(model)
        digest = mask_digest(model)
        mine = torch.tensor(list(digest), dtype=torch.int64, device=self.device())
        import torch.distributed as td

        every = [torch.zeros_like(mine) for _ in range(self.world_size)]
        td.all_gather(every, mine)
        differ = [r for r, h in enumerate(every) if not torch.equal(h, every[0])]
        if differ:
            self.mask_mismatches += 1
            raise MaskMismatch(f"the ranks' masks differ after {where} (rank{'s' * (len(differ) > 1)} "
                               f"{', '.join(map(str, differ))} against rank 0), so the processes no longer train "
                               "one network; the run stops (this is a bug: please report it with the command).")

    def _test_flip(self, model) -> None:
        """Test hook (``NESTSYNTH_TEST_FLIP_MASK=RANK:CHECK``): flip the first mask bit of the
        first layer on that rank before that check, to prove a mismatch is caught."""
        rank, _, check = os.environ.get(FLIP_ENV, "").partition(":")
        if rank.isdigit() and check.isdigit() and int(rank) == self.rank and int(check) == self.mask_checks:
            with torch.no_grad():
                mask = model.layers[0].mask.view(-1)
                mask[0] = 1 - mask[0]

    def device(self) -> torch.device:
        """Where this backend's collectives take tensors."""
        return torch.device("cuda", self.local_rank) if self.backend == "nccl" else torch.device("cpu")

    def summary(self) -> dict:
        """The report's ``distributed`` block (without the batch and learning rate)."""
        return {"world_size": self.world_size, "backend": self.backend, "mask_checks": self.mask_checks,
                "mask_mismatches": self.mask_mismatches}

    def close(self) -> None:
        """Leave the process group (a no-op alone)."""
        if self.active:
            import torch.distributed as td

            if td.is_initialized():
                td.destroy_process_group()


def mask_digest(model) -> bytes:
    """SHA-256 of every layer's mask (and partial-area mask) as bools, and the widths, as 4
    int64 words."""
    h = hashlib.sha256(repr(list(model.widths)).encode())
    for layer in model.layers:
        for name in ("mask", "area"):
            m = getattr(layer, name, None)
            if isinstance(m, torch.Tensor):
                h.update(repr(tuple(m.shape)).encode())
                h.update((m != 0).cpu().numpy().tobytes())
    raw = h.digest()
    return tuple(int.from_bytes(raw[i:i + 8], "little", signed=True) for i in range(0, 32, 8))


_CURRENT = Dist()


def current() -> Dist:
    """The process's Dist (single-process unless :func:`init_from_env` joined a group)."""
    return _CURRENT


def failure_words(exc: BaseException) -> str:
    """The gist of a failed collective's message: its first sentence, without gloo's
    source location (``[.../pair.cc:537] Read error ...: Connection reset by peer.``)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    text = re.sub(r"^\[[^\]]*\]\s*", "", text)
    first = re.split(r"(?<=\.)\s", text, maxsplit=1)[0]
    return first[:200].rstrip(".")


def shutdown() -> None:
    """Leave the process group, if any, and return to a single process."""
    global _CURRENT
    _CURRENT.close()
    _CURRENT = Dist()


def speaks(exc: Exception) -> bool:
    """Whether this process prints ``exc``: always alone; under torchrun rank 0, and another
    rank for an error of its own (not one every rank raised: a :class:`MaskMismatch`, or a
    mistake in the command found before the process group exists)."""
    d = current()
    if not launched():
        return True
    if not d.active:  # before the group: every rank read the same command
        return os.environ.get("RANK", "0") == "0"
    return d.is_main or not getattr(exc, "collective", False)


def launched() -> bool:
    """True when torchrun started this process with more than one process in all."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


def init_from_env(device: str) -> Dist:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1), else stay alone.

    Args:
        device: the run's ``--device``: cpu (gloo), cuda / auto with a GPU (NCCL, device
            ``cuda:LOCAL_RANK``).

    Returns:
        The process's Dist (also :func:`current`).

    Raises:
        NestError: a CUDA device named by index (each rank takes ``cuda:LOCAL_RANK``), or
            a rank without a GPU of its own.
    """
    global _CURRENT
    if not launched():
        return _CURRENT
    import torch.distributed as td

    world, rank, local = (int(os.environ[k]) for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"))
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if cuda:
        if ":" in device:
            raise NestError(f"--device {device} names one GPU, but under torchrun each process takes "
                            "cuda:LOCAL_RANK; give --device cuda.")
        if not torch.cuda.is_available() or local >= torch.cuda.device_count():
            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
            raise NestError(f"process {rank} needs GPU cuda:{local}, but this machine has {count}; start at most "
                            f"{count} processes per node or use --device cpu.")
        torch.cuda.set_device(local)
    backend = "nccl" if cuda else "gloo"
    if not td.is_initialized():
        td.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=TIMEOUT_S))
    _CURRENT = Dist(world, rank, local, backend)
    if rank != 0:  # rank 0 speaks for the run: the others' sanity warnings would repeat its own
        import logging

        logging.getLogger("nestsynth").setLevel(logging.ERROR)
    return _CURRENT


def run_device(device: str) -> str:
    """The device a rank trains on: ``cuda:LOCAL_RANK`` under NCCL, else ``device``."""
    d = current()
    return f"cuda:{d.local_rank}" if d.backend == "nccl" else device
