"""Where a claimed attempt trains (`FTJOBS_EXECUTOR`): `local`, a child process of this worker, or `slurm`,
the nodes of a Slurm allocation.

The Slurm executor only submits: `sbatch` asks for `compute.nodes` nodes, and `srun` starts `ftjobs
run-attempt JOB ATTEMPT` once on each, which runs the same `Attempt` code as a local worker (claim check,
lease and heartbeat, fenced writes, publishing by the node that got rank 0). The job's lease names the
allocation (`slurm:ID`), so the reconciler can keep it while the allocation waits for nodes and requeue the
job when the allocation ends before the job does (worker/reconciler.py).
"""

import logging
import shlex
from typing import TYPE_CHECKING

from models.db import session_scope
from models.jobs import JobRepository
from models.settings import Settings
from worker import slurm
from worker.runner import Executor, LocalExecutor

if TYPE_CHECKING:
    from worker.runner import Attempt

log = logging.getLogger("ftjobs.worker")


def make_executor(settings: Settings) -> Executor:
    return SlurmExecutor(settings) if settings.executor == "slurm" else LocalExecutor()


class SlurmExecutor:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def start(self, attempt: "Attempt") -> None:
        with session_scope(attempt.runner.session_factory) as session:
            job = JobRepository(session).get(attempt.job_id)
            assert job is not None
            compute = job.compute or {}
        nodes, devices = compute.get("nodes", 1), compute.get("devices", 1)
        try:
            slurm_id = slurm.submit(
                self.batch_script(attempt, nodes), self.sbatch_options(attempt, nodes, devices)
            )
        except slurm.SlurmError as error:
            # Maybe passing (slurmctld restarting), maybe not (more nodes than the partition has): attempts
            # are the retry budget either way, and the last one fails the job with Slurm's words.
            attempt.retry(f"Slurm did not take attempt {attempt.attempt}: {error}")
            return
        event = f"Attempt {attempt.attempt} submitted to Slurm as job {slurm_id} ({nodes} node(s))"
        if not attempt.hand_over(slurm.owner(slurm_id), event):
            # Cancelled meanwhile: don't hold nodes for nothing (if this fails, its runners exit on start).
            try:
                slurm.cancel(slurm_id)
            except slurm.SlurmError as error:
                log.warning("job %s: could not cancel Slurm job %s: %s", attempt.job_id, slurm_id, error)
            return
        log.info("job %s: attempt %s is Slurm job %s", attempt.job_id, attempt.attempt, slurm_id)

    def sbatch_options(self, attempt: "Attempt", nodes: int, devices: int) -> list[str]:
        settings = self.settings
        logs = settings.work_root / "slurm"
        logs.mkdir(parents=True, exist_ok=True)
        options = [
            f"--job-name=ftjobs-{attempt.job_id}",
            f"--nodes={nodes}",
            "--ntasks-per-node=1",
            f"--gpus-per-node={devices}" if settings.slurm_gpus else f"--cpus-per-task={devices}",
            "--no-requeue",  # a retry is a new attempt of ours, resuming from a checkpoint, not a rerun
            "--export=ALL",  # the nodes get this worker's FTJOBS_* settings
            f"--output={logs / '%x-%j.log'}",
        ]
        if settings.slurm_partition:
            options.append(f"--partition={settings.slurm_partition}")
        if settings.slurm_account:
            options.append(f"--account={settings.slurm_account}")
        return options + shlex.split(settings.slurm_extra_args)

    def batch_script(self, attempt: "Attempt", nodes: int) -> str:
        """One `run-attempt` per node. The batch script runs on the allocation's first node (node 0), whose
        address every task sees as SLURM_LAUNCH_NODE_IPADDR: the ranks' rendezvous is there."""
        command = shlex.split(self.settings.slurm_command)
        run = [*command, "run-attempt", attempt.job_id, str(attempt.attempt), "--nodes", str(nodes)]
        port = f"$(({self.settings.slurm_rendezvous_port} + SLURM_JOB_ID % 1000))"
        node_args = f'--node-rank "$SLURM_NODEID" --rendezvous "$SLURM_LAUNCH_NODE_IPADDR:{port}"'
        return (
            "#!/bin/sh\n"
            f"# ftjobs: attempt {attempt.attempt} of {attempt.job_id} on {nodes} node(s)\n"
            f"exec srun --ntasks-per-node=1 sh -c 'exec \"$@\" {node_args}' sh {shlex.join(run)}\n"
        )
