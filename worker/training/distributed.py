"""The one place that knows a job may run as several ranks (torch's launcher, `launch.py`): who this rank
is, the process group, how the model is spread over the ranks, and the few collectives the recipe needs.

Adapter methods (`parallel="ddp"`) train data-parallel: every rank holds the same replica, trains its share
of each step's examples and the trained tensors' gradients are summed across ranks before the optimizer
step (one all-reduce a step; DDP's bucketed overlap buys nothing for adapter-sized gradients, and a summed
gradient stays exact when a step has fewer examples than ranks).

Whole-model methods (`parallel="fsdp"`: full, freeze) shard every weight, gradient and optimizer state
over the ranks with FSDP2 (`fully_shard`, one unit per transformer block plus the root): each rank holds
1/N of the model and all-gathers a block's weights just for its forward and backward. FSDP2 averages the
gradients it reduce-scatters (gloo has no pre-scaled sum), so each rank scales its loss by the world size
(`gradient_scale`) to train the summed gradient the data-parallel path trains.

At world size 1 every collective here is a no-op and the model stays a plain module.
"""

import math
import os
from collections.abc import Callable, Sequence
from typing import TypeVar, cast

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FSDPModule, fully_shard

T = TypeVar("T")
R = TypeVar("R")
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


def map_batches(
    model: nn.Module, score: Callable[[Sequence[T]], R], items: Sequence[T], size: int
) -> list[R]:
    """`score` of each batch of `size` items, in item order, on every rank: the batches are dealt to the
    ranks in turn and the results gathered, so a full evaluation costs each rank 1/N of it and every rank
    sums the same batches in the same order as one process (metrics, and the early stopping they drive,
    agree everywhere). The ranks of a sharded model run as many batches each (they gather its weights
    together in every forward): one whose deal is a batch short scores the first batch again, unused."""
    batches = [items[start : start + size] for start in range(0, len(items), size)]
    mine = [score(batch) for batch in batches[rank() :: world_size()]]
    if world_size() == 1:
        return mine
    if is_sharded(model):
        for _ in range(math.ceil(len(batches) / world_size()) - len(mine)):
            score(batches[0])
    gathered: list[list[R]] = [[] for _ in range(world_size())]
    dist.all_gather_object(gathered, mine)
    return [gathered[index % world_size()][index // world_size()] for index in range(len(batches))]


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


def shard(model: nn.Module, blocks: Sequence[nn.Module]) -> None:
    """Shard `model` over the ranks (FSDP2): each of its transformer `blocks` its own unit, so one block's
    weights are gathered at a time, and the rest (embeddings, final norm, head) in the root unit. At world
    size 1 the model stays as it is."""
    if world_size() == 1:
        return
    for block in blocks:
        fully_shard(block)
    fully_shard(model)


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def gradient_scale(model: nn.Module) -> float:
    """What each rank multiplies its loss by before backward so that the gradient reduction sums: FSDP2
    averages over the ranks, the data-parallel path sums."""
    return float(world_size()) if is_sharded(model) else 1.0


def reshard(model: nn.Module) -> None:
    """Put a sharded model's shards back in place of its parameters: FSDP2 leaves the root unit's weights
    gathered after a forward without backward (an evaluation), and state is read and written in shards."""
    for unit in _units(model):
        unit.reshard()


def _units(model: nn.Module) -> list[FSDPModule]:
    return [module for module in model.modules() if isinstance(module, FSDPModule)]


def whole_state(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """A sharded model's whole state by parameter name, gathered into rank 0's CPU memory (a collective:
    every rank calls it; the others get an empty dict); None for a model that is not sharded, whose own
    parameters are whole."""
    if not is_sharded(model):
        return None
    reshard(model)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = cast(dict[str, torch.Tensor], get_model_state_dict(model, options=options))
    # A tied weight (an LM head sharing the input embeddings) once, under its first name, as an unsharded
    # model's own state lists it: the gathered copies no longer share memory for savers to notice.
    names = {name for name, _ in model.named_parameters()} | {name for name, _ in model.named_buffers()}
    return {name: tensor for name, tensor in state.items() if name in names}


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def _device() -> torch.device:
    # NCCL carries only CUDA tensors; gloo takes CPU ones.
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
