"""`python -m worker.training.launch --nproc N --run-id ID --spec SPEC.json --events-fd N`: one job on N
devices of this machine. Torch's own launcher (torchrun's engine) starts N ranks of `python -m
worker.training`; rank 0 reports on this process's event pipe, opened by path since the launcher closes
inherited descriptors. With `--nnodes M --rendezvous HOST:PORT`, this is one of M nodes whose launchers meet
at a c10d rendezvous on node 0 (`--rendezvous-host` there); the rendezvous numbers the ranks, so global
rank 0, the one that reports, may be on any node.

The runner's rules hold as for the plain child: restarts are off (a retry is a new attempt of the job,
resuming from its newest checkpoint), and a rank killed by a signal makes this process die of the same
signal, so the attempt counts as killed (retried), not failed.
"""

import argparse
import os
import signal
import sys

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.launcher.api import LaunchConfig, elastic_launch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker.training.launch", description=__doc__)
    parser.add_argument("--nproc", type=int, required=True, help="ranks, one per device")
    parser.add_argument("--run-id", required=True, help="names the rendezvous: the job and its attempt")
    parser.add_argument("--spec", required=True, help="TrainingSpec JSON file")
    parser.add_argument("--events-fd", type=int, required=True, help="inherited file descriptor for events")
    parser.add_argument("--nnodes", type=int, default=1, help="nodes of the job, each running this launcher")
    parser.add_argument(
        "--rendezvous",
        default="localhost:0",  # one node: a free port, so jobs on one machine never share a rendezvous
        help="HOST:PORT where the nodes' launchers meet (node 0's address)",
    )
    parser.add_argument("--rendezvous-host", action="store_true", help="this node serves the rendezvous")
    args = parser.parse_args(argv)

    config = LaunchConfig(
        min_nodes=args.nnodes,
        max_nodes=args.nnodes,
        nproc_per_node=args.nproc,
        run_id=args.run_id,
        rdzv_backend="c10d",
        rdzv_endpoint=args.rendezvous,
        # Said, not guessed from host names: several nodes may share a machine (and its name).
        rdzv_configs={"is_host": args.rendezvous_host} if args.nnodes > 1 else {},
        max_restarts=0,
    )
    ranks = elastic_launch(config, sys.executable)
    events_path = f"/proc/{os.getpid()}/fd/{args.events_fd}"
    try:
        ranks("-m", "worker.training", "--spec", args.spec, "--events-path", events_path)
    except ChildFailedError as error:
        if (signum := killed_by([failure.exitcode for failure in error.failures.values()])) is not None:
            # This process would exit 1, which the runner reads as the trainer failing.
            if signum != signal.SIGKILL:  # SIGKILL's handler can be neither replaced nor reset
                signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        return 1
    return 0


def killed_by(exit_codes: list[int]) -> int | None:
    """The signal that ended the attempt, or None when a rank failed on its own.

    Once one rank ends, the launcher sends the others SIGTERM, and a rank whose peer vanished fails in its
    next collective (exit 1): so a signal other than SIGTERM wins over everything, while SIGTERM counts
    only when no rank exited with an error."""
    signals = [-code for code in exit_codes if code < 0]
    if others := [signum for signum in signals if signum != signal.SIGTERM]:
        return others[0]
    if signals and all(code < 0 for code in exit_codes):
        return signal.SIGTERM
    return None


if __name__ == "__main__":
    sys.exit(main())
