"""The one place that knows a job may run as several ranks (torch's launcher, `launch.py`): who this rank
is, the process group, and the few collectives the recipe needs.

Adapter methods train data-parallel: every rank holds the same replica, trains its share of each step's
examples and the trained tensors' gradients are summed across ranks before the optimizer step (one
all-reduce a step; DDP's bucketed overlap buys nothing for adapter-sized gradients, and a summed gradient
stays exact when a step has fewer examples than ranks). At world size 1 every function here is a no-op.
"""

import os
from collections.abc import Sequence
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn

T = TypeVar("T")
STOP_CODES = {None: 0, "stop": 1, "pause": 2}


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def start() -> None:
    """Join the process group that torch's launcher set up (its environment names the rendezvous): NCCL
    between GPUs, gloo on CPU with one intra-op thread per rank (more threads per rank only contend)."""
    if world_size() == 1:
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("cuda:nccl,cpu:gloo")
    else:
        torch.set_num_threads(1)
        dist.init_process_group("gloo")


def finish() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def share(examples: Sequence[T]) -> list[T]:
    """This rank's share of a micro-batch: every world_size-th example, so the ranks together train the
    whole batch and each rank's share is at most one example larger than another's."""
    return list(examples[rank() :: world_size()])


def sum_across(values: Sequence[float]) -> list[float]:
    """Each value summed over the ranks (float64, so token counts stay exact)."""
    if world_size() == 1:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=_device())
    dist.all_reduce(tensor)
    return tensor.tolist()


def sum_gradients(parameters: Sequence[nn.Parameter]) -> None:
    """Sum the gradients of `parameters` over the ranks in one flat all-reduce; a parameter this rank did
    not reach (no examples in its share) contributes zeros."""
    if world_size() == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for param, grad in zip(parameters, grads, strict=True):
        param.grad = flat[offset : offset + grad.numel()].view_as(grad).to(grad.dtype)
        offset += grad.numel()


def agree_on_stop(request: str | None) -> str | None:
    """Rank 0's reading of the stop file, for every rank: all ranks leave the loop at the same step, so
    none is left waiting in a collective."""
    if world_size() == 1:
        return request
    code = torch.tensor([STOP_CODES.get(request, 1) if is_main() else 0], device=_device())
    dist.broadcast(code, src=0)
    return next(name for name, value in STOP_CODES.items() if value == code.item())


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def _device() -> torch.device:
    # NCCL carries only CUDA tensors; gloo takes CPU ones.
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
