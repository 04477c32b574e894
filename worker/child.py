"""A training child process: spawn it, read its messages, stop it. No database here.

The child runs `python -m worker.training` in its own session (process group), so a cancel can end
it and everything it started; it reports on an inherited pipe, one JSON message per line. A job on several
devices, or on one node of several, runs `python -m worker.training.launch` instead, which starts one rank
per device; the ranks die with it (docs/distributed.md).
"""

import ctypes
import os
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pydantic import TypeAdapter

from models.spec import ChildMessage, TrainingSpec

_messages = TypeAdapter(ChildMessage)
_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Linux: the kernel kills a child (a trainer, an inference server) when the thread that started it
    dies, so no orphan keeps the GPU or the port."""
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def visible_devices() -> int:
    """The GPUs this process may use (`CUDA_VISIBLE_DEVICES` narrows them), or 1 without any: the CPU.
    Read without torch, which the worker's own process never loads."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return max(1, len([device for device in visible.split(",") if device.strip()]))
    gpus = Path("/proc/driver/nvidia/gpus")
    return max(1, len(list(gpus.iterdir()))) if gpus.is_dir() else 1


def class_name(name: str) -> str:
    """A device name as a class: lower case, runs of anything but a-z, 0-9, '.', '_' and '-' as '-'."""
    return re.sub(r"[^a-z0-9._-]+", "-", name.strip().lower()).strip("-")[:64] or "cpu"


def visible_device_class() -> str:
    """The device class of this machine: its first GPU's model name (`nvidia-a100-sxm4-80gb`), or `cpu`.
    Read from the driver's /proc files, without torch."""
    gpus = sorted(Path("/proc/driver/nvidia/gpus").glob("*/information"))
    for line in gpus[0].read_text().splitlines() if gpus else ():
        if line.startswith("Model:"):
            return class_name(line.removeprefix("Model:"))
    return "cpu"


@dataclass(frozen=True)
class Placement:
    """This machine's part in a job that spans several nodes (`ftjobs run-attempt` on a Slurm allocation):
    every node runs the launcher for its own devices, and the launchers meet at node 0's rendezvous."""

    nodes: int
    node_rank: int
    rendezvous: str
    """HOST:PORT of node 0's rendezvous, the same on every node."""
    run_id: str
    """Names the rendezvous, the same on every node: the job and its attempt."""


class TrainingProcess:
    def __init__(self, spec: TrainingSpec, workdir: Path, placement: Placement | None = None) -> None:
        self.spec = spec
        spec_path = workdir / "spec.json"
        spec_path.write_text(spec.model_dump_json(indent=2))
        self.log_path = workdir / "train.log"
        read_fd, write_fd = os.pipe()
        trainer = ["worker.training", "--spec", str(spec_path), "--events-fd", str(write_fd)]
        if placement is not None:
            launch = ["worker.training.launch", "--nproc", str(spec.devices), "--run-id", placement.run_id]
            launch += ["--nnodes", str(placement.nodes), "--rendezvous", placement.rendezvous]
            if placement.node_rank == 0:
                launch.append("--rendezvous-host")
            trainer = [*launch, *trainer[1:]]
        elif spec.devices > 1:
            launch = ["worker.training.launch", "--nproc", str(spec.devices)]
            trainer = [*launch, "--run-id", f"{spec.job_id}-{workdir.name}", *trainer[1:]]
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", *trainer],
                # The trainer asks its judges with the job's grant (spec.judge), never the inference token,
                # which reaches any organisation's models.
                env={key: value for key, value in os.environ.items() if key != "FTJOBS_INFERENCE_TOKEN"},
                pass_fds=(write_fd,),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=die_with_parent,
            )
        os.close(write_fd)
        self._fd = read_fd
        self._buffer = b""
        self._eof = False

    def messages(self, timeout: float) -> Iterator[ChildMessage]:
        """Messages that arrive within `timeout` seconds (possibly none)."""
        if self._eof:
            time.sleep(min(timeout, 0.1))
            return
        ready, _, _ = select.select([self._fd], [], [], timeout)
        if not ready:
            return
        chunk = os.read(self._fd, 1 << 16)
        if not chunk:
            self._eof = True
            os.close(self._fd)
        self._buffer += chunk
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            if line.strip():
                yield _messages.validate_json(line)

    @property
    def finished(self) -> bool:
        return self._eof and self.process.poll() is not None

    def request_stop(self, *, pause: bool = False) -> None:
        """Cooperative stop: the trainer checks this file before every optimizer step; `pause` asks it to
        checkpoint first."""
        # Atomically (rename), so the trainer never reads a half-written file as a plain stop.
        stop_file = Path(self.spec.stop_file)
        partial = stop_file.with_suffix(".partial")
        partial.write_text("pause" if pause else "stop")
        partial.replace(stop_file)

    def kill(self) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()

    def log_tail(self, max_chars: int = 2000) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return text[-max_chars:]
