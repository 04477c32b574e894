"""The python grader's sandbox: bubblewrap (`bwrap`) runs the interpreter with no network, no other
processes in view, a read-only view of the interpreter's own files only (so no data directory, no /etc), an
empty private /tmp, and as an unprivileged user in its own user namespace. Inside, the runner caps CPU time,
memory, file size and descriptors; outside, a wall-clock timeout kills the whole sandbox, and its
output is read up to a cap."""

import functools
import json
import math
import os
import platform
import shutil
import struct
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

RUNNER = (Path(__file__).with_name("sandbox_runner.py")).read_text()


@dataclass(frozen=True)
class Limits:
    cpu_seconds: int = 3
    wall_seconds: float = 6.0
    memory_bytes: int = 512 * 2**20
    output_bytes: int = 2**20


@dataclass(frozen=True)
class Outcome:
    score: float | None
    error: str | None


# Process creation is refused by a seccomp filter rather than RLIMIT_NPROC, which does not bind a server
# running as root. Per architecture: its audit number and its process-creating system calls.
NO_FORK = {
    "x86_64": (0xC000003E, (56, 57, 58, 435)),  # clone, fork, vfork, clone3
    "aarch64": (0xC00000B7, (220, 435)),  # clone, clone3
}
X32_SYSCALLS = 0x40000000


def _seccomp_filter() -> bytes | None:
    """A classic BPF program: the wrong architecture is killed, process creation (and x86's x32 calls)
    fails with EPERM, anything else is allowed."""
    if platform.machine() not in NO_FORK:
        return None
    arch, calls = NO_FORK[platform.machine()]
    load, jeq, jge, ret = 0x20, 0x15, 0x35, 0x06
    program = [(load, 0, 0, 4), (jeq, 1, 0, arch), (ret, 0, 0, 0x80000000), (load, 0, 0, 0)]
    program += [(jeq, len(calls) - i + 1, 0, nr) for i, nr in enumerate(calls)]
    program += [(jge, 1, 0, X32_SYSCALLS), (ret, 0, 0, 0x7FFF0000), (ret, 0, 0, 0x00050000 | 1)]
    return b"".join(struct.pack("HBBI", *instruction) for instruction in program)


def _interpreter() -> tuple[str, str]:
    """The interpreter's real path and its installation prefix (the standard library lives under it)."""
    executable = os.path.realpath(sys.executable)
    return executable, os.path.realpath(sys.base_prefix)


def _command(seccomp_fd: int) -> list[str]:
    executable, prefix = _interpreter()
    command = [
        "bwrap",
        "--seccomp",
        str(seccomp_fd),
        "--unshare-all",
        "--unshare-user",
        "--uid",
        "65534",
        "--gid",
        "65534",
    ]
    command += ["--die-with-parent", "--new-session", "--cap-drop", "ALL", "--clearenv"]
    command += ["--ro-bind", "/usr", "/usr"]
    for top in ("/lib", "/lib64", "/bin"):  # merged-/usr systems make these symlinks
        if os.path.islink(top):
            command += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            command += ["--ro-bind", top, top]
    if not prefix.startswith("/usr/"):
        command += ["--ro-bind", prefix, prefix]
    command += ["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp", "--chdir", "/tmp"]
    return [*command, "--setenv", "PATH", "/usr/bin:/bin", executable, "-I", "-S", "-c", RUNNER]


@functools.cache
def unavailable() -> str | None:
    """Why python graders cannot run here, or None when the sandbox works (probed once per process)."""
    if shutil.which("bwrap") is None:
        return "bubblewrap (bwrap) is not installed on the API server"
    if _seccomp_filter() is None:
        return f"the sandbox has no process filter for the {platform.machine()} architecture"
    try:
        result = _sandboxed(lambda fd: [*_command(fd)[:-3], "-c", "pass"], b"", 30)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"bubblewrap does not start ({error})"
    if result.returncode != 0:
        return f"bubblewrap cannot create its sandbox here ({result.stderr.decode(errors='replace')[-300:]})"
    return None


def _sandboxed(
    command: Callable[[int], list[str]],
    stdin: bytes,
    timeout: float,
    stdout: IO[bytes] | int = subprocess.PIPE,
    stderr: IO[bytes] | int = subprocess.PIPE,
) -> subprocess.CompletedProcess[bytes]:
    """Run `command(fd)` with the seccomp filter readable at `fd`; on timeout the sandbox is killed (bwrap
    is its init: everything inside dies with it) and TimeoutExpired raised."""
    with tempfile.TemporaryFile() as program:
        program.write(_seccomp_filter() or b"")
        program.seek(0)
        fd = program.fileno()
        with subprocess.Popen(
            command(fd), stdin=subprocess.PIPE, stdout=stdout, stderr=stderr, pass_fds=(fd,)
        ) as process:
            try:
                out, err = process.communicate(stdin, timeout=timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
                raise
            return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def run(source: str, sample: dict[str, Any], item: Any, limits: Limits = Limits()) -> Outcome:
    """Run `grade(sample, item)` from `source` in the sandbox: its score, or why there is none."""
    request = {"source": source, "sample": sample, "item": item, "limits": vars(limits)}
    with tempfile.TemporaryFile() as stdout, tempfile.TemporaryFile() as stderr:
        try:
            process = _sandboxed(
                _command, json.dumps(request).encode(), limits.wall_seconds, stdout=stdout, stderr=stderr
            )
        except subprocess.TimeoutExpired:
            return Outcome(None, f"the grader ran longer than {limits.wall_seconds:g} s and was stopped")
        stdout.seek(0)
        output = stdout.read(limits.output_bytes + 1)
        stderr.seek(0)
        errors = stderr.read(4000).decode(errors="replace").strip()
    lines = output.decode(errors="replace").strip().splitlines()
    try:
        result = json.loads(lines[-1]) if lines else {}
    except ValueError:
        result = {}
    if not isinstance(result, dict):
        result = {}
    # The code inside can write to the output itself: take only a finite number as a score.
    score, error = result.get("score"), result.get("error")
    if isinstance(score, int | float) and not isinstance(score, bool) and math.isfinite(score):
        return Outcome(float(score), None)
    if isinstance(error, str):
        return Outcome(None, error)
    if process.returncode > 128:  # killed by a signal: the CPU-time limit's, or the kernel's for memory
        return Outcome(
            None, f"the grader was stopped by the sandbox's limits (signal {process.returncode - 128})"
        )
    return Outcome(
        None, f"the grader ended without a score (exit status {process.returncode}): {errors[-500:]}"
    )
