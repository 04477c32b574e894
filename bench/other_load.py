"""CPU time that processes outside a bench use while it runs: on a shared machine every wall time depends
on it, so the benches that time whole jobs or servers report it beside their figures. Torch-free."""

import os
import threading
import time

import psutil


class OtherLoad:
    """CPU seconds of the processes outside this one's tree (and outside `excluded`, process-name prefixes of
    services whose work for the bench cannot be told apart from anyone else's), while the block runs.
    Sampled every second, so processes that live for less than a second are missed."""

    def __init__(self, excluded: tuple[str, ...] = ()) -> None:
        self.seconds = 0.0
        self.excluded = excluded
        self._started = time.time()
        self._seen: dict[tuple[int, float], float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "OtherLoad":
        self._sample(baseline=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample(baseline=False)

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            self._sample(baseline=False)

    def _sample(self, baseline: bool) -> None:
        ours = {os.getpid(), *(child.pid for child in psutil.Process().children(recursive=True))}
        for proc in psutil.process_iter(["name", "cpu_times", "create_time"]):
            info = proc.info
            if (
                proc.pid in ours
                or not info["cpu_times"]
                or info["create_time"] is None
                or (self.excluded and (info["name"] or "").startswith(self.excluded))
            ):
                continue
            key = (proc.pid, info["create_time"])
            used = info["cpu_times"].user + info["cpu_times"].system
            # A process born during the run counts from zero; one already running, from its first sample.
            before = self._seen.get(key, used if baseline or info["create_time"] < self._started else 0.0)
            self.seconds += used - before
            self._seen[key] = used
