"""`distributed.map_batches`, the sharing out of a full evaluation, on two real gloo ranks: each rank scores
its own batches (k, k + 2, ...), every rank ends with every batch's result in order, the same as one
process computes, and the ranks of an FSDP2-sharded model run as many forwards each (a rank dealt one batch
fewer scores a spare one; without it the other rank would wait forever in its third forward's all-gather).
"""

import json
import os
import socket
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.multiprocessing.spawn import spawn

from worker.training import distributed

pytestmark = pytest.mark.distributed

ITEMS, SIZE = list(range(9)), 2
"""Five batches: rank 0 is dealt 0, 2, 4 and rank 1 is dealt 1, 3."""


def two_layers() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))


def scorer(model: nn.Module, seen: list[int]) -> Callable[[Sequence[int]], float]:
    def score(batch: Sequence[int]) -> float:
        seen.append(batch[0] // SIZE)  # the batch's index
        with torch.no_grad():
            return model(torch.tensor(batch, dtype=torch.float32)[:, None].expand(-1, 4)).sum().item()

    return score


def rank_main(rank: int, port: int, sharded: bool, out: Path) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    distributed.start()
    model = two_layers()
    if sharded:
        # The first layer a unit of its own, as a transformer block is: gathered for each forward.
        distributed.shard(model, [model[0]])
    seen: list[int] = []
    results = distributed.map_batches(model, scorer(model, seen), ITEMS, SIZE)
    (out / f"{rank}.json").write_text(json.dumps({"seen": seen, "results": results}))
    # Neither rank tears gloo down while the other may still be in the gather (seen once: SIGABRT at exit).
    distributed.barrier()
    distributed.finish()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("sharded", [False, True], ids=["replicas", "fsdp2"])
def test_each_rank_scores_its_batches_and_all_get_every_result(tmp_path: Path, sharded: bool) -> None:
    model = two_layers()
    one_process = distributed.map_batches(model, scorer(model, []), ITEMS, SIZE)
    spawn(rank_main, args=(free_port(), sharded, tmp_path), nprocs=2)
    ranks = [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in (0, 1)]
    assert ranks[0]["seen"] == [0, 2, 4]
    assert ranks[1]["seen"] == ([1, 3, 0] if sharded else [1, 3])
    for rank in ranks:
        assert rank["results"] == pytest.approx(one_process, rel=1e-6)
