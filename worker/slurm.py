"""Slurm's command-line tools, the one place ftjobs calls them: submit an allocation (`sbatch`), read what
became of allocations (`squeue`), cancel one (`scancel`). No database here.

`sacct` needs Slurm's accounting daemon (slurmdbd), which a small cluster may not run; `squeue -t all` keeps
showing an ended allocation, with its final state, for the cluster's `MinJobAge` (300 s by default), which
is what the reconciler needs. An allocation missing from `squeue` ended longer ago than that.
"""

import subprocess
from typing import NamedTuple

TIMEOUT_SECONDS = 30.0

WAITING = frozenset({"PENDING", "CONFIGURING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD"})
"""States of an allocation that has not started its tasks yet (nobody heartbeats for it)."""
ALIVE = WAITING | {"RUNNING", "COMPLETING", "SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT", "RESIZING"}
"""States in which an allocation may still run, or come to run, its tasks."""


OWNER_PREFIX = "slurm:"
"""A job trained by an allocation has the lease owner `slurm:ID`, ID its Slurm job id."""


def owner(slurm_id: str) -> str:
    return f"{OWNER_PREFIX}{slurm_id}"


class SlurmError(Exception):
    """A Slurm command failed, or is not installed here."""


def submit(script: str, options: list[str]) -> str:
    """`sbatch` the batch `script` with `options`; returns the Slurm job id."""
    answer = _run(["sbatch", "--parsable", *options], stdin=script)
    return answer.strip().split(";")[0]  # "ID" or "ID;CLUSTER"


class Allocation(NamedTuple):
    state: str
    """`PENDING`, `RUNNING`, `COMPLETED`, `CANCELLED`, `NODE_FAIL`, `TIMEOUT`..."""
    reason: str
    """Why it waits or ended (`Resources`, `PartitionNodeLimit`...); `None` when there is nothing to say."""


def states(slurm_ids: list[str]) -> dict[str, Allocation]:
    """Each allocation `squeue` still knows; the others ended long enough ago to be forgotten."""
    if not slurm_ids:
        return {}
    try:
        answer = _run(
            ["squeue", "--noheader", "--states=all", f"--jobs={','.join(slurm_ids)}", "--format=%i %T %r"]
        )
    except SlurmError as error:
        if "Invalid job id" in str(error):  # squeue's answer when it knows none of them
            return {}
        raise
    rows = (line.split(maxsplit=2) for line in answer.splitlines())
    return {row[0]: Allocation(row[1], row[2]) for row in rows if len(row) == 3 and row[0] in slurm_ids}


def cancel(slurm_id: str) -> None:
    _run(["scancel", slurm_id])


def _run(command: list[str], stdin: str | None = None) -> str:
    try:
        done = subprocess.run(
            command, input=stdin, capture_output=True, text=True, timeout=TIMEOUT_SECONDS, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        raise SlurmError(f"{command[0]}: {error}") from error
    if done.returncode != 0:
        # Slurm's messages name their command already: "sbatch: error: invalid partition specified: ..."
        raise SlurmError(" ".join(done.stderr.split()) or f"{command[0]}: exit {done.returncode}")
    return done.stdout
