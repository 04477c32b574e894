"""The pre-flight estimate in a child process of the inference server, bounded in time and memory and stopped
when its caller leaves (docs/preflight.md). Tokenizing a pathological file (one 10 MB message) is CPU-bound
work inside the tokenizer that no thread can be interrupted in; a process can be killed, and its memory goes
with it, so the server and its other requests never pay for it."""

import asyncio
import logging
import multiprocessing
import time
import traceback
from collections.abc import Awaitable, Callable
from multiprocessing.connection import Connection

import psutil
from starlette.concurrency import run_in_threadpool

from inference.preflight import estimate
from models.errors import APIError, client_closed_request
from models.preflight import PreflightReport, PreflightRequest
from models.spec import DataError

log = logging.getLogger("ftjobs.inference")

MEMORY_LIMIT_BYTES = 2 * 2**30
"""How much the child may grow: far more than the tokenized rows of an ordinary file need, and about what one
10 MB message takes once tokenized with offsets (2.2 GB), which is what it stops."""
POLL_SECONDS = 0.05
CONTEXT = multiprocessing.get_context("forkserver")
# Children fork from a server that has imported the training code once, so none imports it again, and from a
# process that has run nothing (forking the inference server itself would copy its threads' held locks).
CONTEXT.set_forkserver_preload([__name__])


def run(request_json: str, results: Connection) -> None:
    """The child: the estimate, or what the job would fail on, or what went wrong, sent back as plain data."""
    try:
        report = estimate(PreflightRequest.model_validate_json(request_json))
        results.send(("report", report.model_dump_json()))
    except DataError as error:
        results.send(("data_error", (error.code, error.message, error.param)))
    except Exception:
        results.send(("failed", traceback.format_exc()))


async def bounded_estimate(
    request: PreflightRequest,
    seconds: float,
    disconnected: Callable[[], Awaitable[bool]],
    memory_bytes: int = MEMORY_LIMIT_BYTES,
) -> PreflightReport:
    """The estimate, if it ends within `seconds` and `memory_bytes` of growth (else a 400 that says which) and
    while the caller is there (else the child is killed at once)."""
    results, sender = CONTEXT.Pipe(duplex=False)
    child = CONTEXT.Process(target=run, args=(request.model_dump_json(), sender), daemon=True)
    await run_in_threadpool(child.start)  # blocks while the first forkserver imports the training code
    sender.close()  # so the child's end alone keeps the pipe open: a dead child reads as end of file
    try:
        pid = child.pid
        assert pid is not None  # set by start()
        baseline, started = resident(pid), time.monotonic()
        while not results.poll():
            elapsed = time.monotonic() - started
            if await disconnected():
                log.warning("pre-flight stopped after %.1f s: its client left", elapsed)
                raise client_closed_request()
            if elapsed > seconds:
                log.warning("pre-flight stopped at its time limit of %g s", seconds)
                raise too_costly(f"took more than {seconds:g} s (FTJOBS_PREFLIGHT_TIMEOUT_SECONDS)")
            if resident(pid) - baseline > memory_bytes:
                log.warning("pre-flight stopped at its memory limit of %d bytes", memory_bytes)
                raise too_costly(f"needed more than {memory_bytes / 2**30:g} GiB")
            await asyncio.sleep(POLL_SECONDS)
        try:
            kind, value = results.recv()
        except EOFError:
            raise RuntimeError(f"The pre-flight process ended with exit code {child.exitcode}.") from None
    finally:
        child.kill()  # a no-op once it has ended
        results.close()
        await run_in_threadpool(child.join)
    if kind == "data_error":  # what the job would fail on: the request's fault, as at job creation
        code, message, param = value
        raise APIError(message, param=param, code=code)
    if kind == "failed":
        raise RuntimeError(f"The pre-flight estimate failed:\n{value}")
    return PreflightReport.model_validate_json(value)


def resident(pid: int) -> int:
    """The child's resident memory; 0 once it has ended (its result, or end of file, is then in the pipe, and
    its parent, the fork server, may already have reaped it)."""
    try:
        return int(psutil.Process(pid).memory_info().rss)
    except psutil.NoSuchProcess:
        return 0


def too_costly(why: str) -> APIError:
    return APIError(
        f"The pre-flight estimate {why} and was stopped: the training file is too costly to estimate ahead "
        "(a job on it would spend at least as long validating and tokenizing it before its first step).",
        param="training_file",
        code="preflight_too_costly",
    )
