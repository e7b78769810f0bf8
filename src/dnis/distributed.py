"""Multi-process training: `torchrun --nproc_per_node N -m dnis train|search --config FILE`.

torchrun starts N copies of the command and tells each its rank (`RANK`, `WORLD_SIZE`,
`LOCAL_RANK`); `setup` joins them into one process group (gloo on CPU, NCCL on GPU). Why a run of
N processes gives the metrics of one process:

- Every rank loads the whole dataset (encoding is deterministic, so ids agree) and draws the same
  shuffle from (seed, epoch). `train.batch_size` is the *global* batch: each rank takes its share
  of every batch (rows rank, rank + N, ...) and DistributedDataParallel averages the gradients, so
  each step is the step one process takes on the whole batch.
- Evaluation: each rank scores a contiguous run of whole evaluation batches; the scores are
  all-gathered in row order, so AUC, logloss, RMSE and top-k metrics are computed exactly over
  every row, identically on every rank (early stopping decides the same everywhere).
- DNIS's alpha steps: each rank takes its share of the validation batch; the alpha gradients are
  all-reduced (mean) before the step, so alpha stays identical on every rank.
- Files: rank 0 writes the run folder; rank r > 0 keeps its own checkpoints under
  `<run folder>/ranks/<r>/`, so `--resume` works with or without a shared file system.

Without torchrun (or with one process) every function here is a no-op.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn

from dnis.errors import ConfigError


def active() -> bool:
    """Whether this process is one of several in a process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def launched() -> bool:
    """Whether torchrun (or another launcher) started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device: str) -> None:
    """Join the process group torchrun describes in the environment (no-op without one).

    The backend follows the device: NCCL for CUDA, gloo for the CPU. Each rank of a CUDA run
    takes the GPU of its `LOCAL_RANK`.
    """
    if not launched() or active():
        return
    if not dist.is_available():
        raise ConfigError("this torch build has no torch.distributed; run with one process")
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def require_single(what: str) -> None:
    """Refuse a command that does not split its work across ranks."""
    if launched():
        raise ConfigError(
            f"{what} runs in one process; start it without torchrun (only `dnis train` and "
            "`dnis search` use several processes)"
        )


def local_device(device: torch.device) -> torch.device:
    """`cuda` without an index means this rank's GPU under torchrun."""
    if device.type == "cuda" and device.index is None and launched():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def wrap(model: nn.Module) -> nn.Module:
    """The module to run training steps through: DistributedDataParallel when distributed.

    `static_graph`: every step of our models uses the same parameters, and some leave a few out
    (a zero-width block's table); a static graph lets DDP learn that once, instead of waiting
    forever for their gradients or searching the autograd graph at every step.
    """
    if not active():
        return model
    from torch.nn.parallel import DistributedDataParallel

    device = next(iter(model.parameters())).device
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, static_graph=True)


def shard(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """This rank's rows of a global batch: rows rank, rank + N, ..."""
    if not active():
        return tensors
    r, n = rank(), world_size()
    return tuple(t[r::n] for t in tensors)


def rank_generator(generator: torch.Generator, seed: int) -> torch.Generator:
    """The generator of a rank's own draws (e.g. negative items): with one process the shared
    one, so single-process runs are unchanged; under DDP one per rank, so ranks draw apart."""
    if not active():
        return generator
    return torch.Generator().manual_seed((seed * 1_000_003 + rank() + 1) % (2**63 - 1))


def eval_range(rows: int, batch_size: int) -> tuple[int, int]:
    """This rank's rows of an evaluation: a contiguous run of whole batches (the same batch
    slices as one process scores, so scores match it exactly)."""
    if not active():
        return 0, rows
    batches = (rows + batch_size - 1) // batch_size
    r, n = rank(), world_size()
    first, last = batches * r // n, batches * (r + 1) // n
    return min(rows, first * batch_size), min(rows, last * batch_size)


def gather(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's `tensor` (same trailing shape, any length) concatenated in rank order."""
    if not active():
        return tensor
    device = collective_device()
    local = tensor.to(device)
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(world_size())]
    dist.all_gather(sizes, torch.tensor([len(local)], device=device))
    longest = int(max(sizes).item())
    padded = torch.zeros((longest, *local.shape[1:]), dtype=local.dtype, device=device)
    padded[: len(local)] = local
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    out = torch.cat([part[: int(size.item())] for part, size in zip(parts, sizes, strict=True)])
    return out.to(tensor.device)


def all_reduce_mean_(tensor: torch.Tensor) -> torch.Tensor:
    """Average `tensor` over ranks in place (and return it)."""
    if active():
        dist.all_reduce(tensor)
        tensor /= world_size()
    return tensor


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of `tensor` over ranks (a new tensor, where `tensor` was)."""
    if not active():
        return tensor
    total = tensor.to(collective_device(), copy=True)
    dist.all_reduce(total)
    return total.to(tensor.device)


def collective_device() -> torch.device:
    """Where collectives take their tensors: this rank's GPU under NCCL, else the CPU."""
    return torch.device("cuda") if dist.get_backend() == "nccl" else torch.device("cpu")


@contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first (e.g. building a data cache), the others after it."""
    if not active():
        yield
        return
    if not is_main():
        dist.barrier()
    yield
    if is_main():
        dist.barrier()
