"""The child's side of the event pipe: one JSON `ChildMessage` per line, flushed at once."""

import os
from collections.abc import Callable
from typing import Literal

from models.spec import ChildMessage, LogMessage


class EventWriter:
    def __init__(self, target: int | str | None) -> None:
        """`target`: the inherited pipe's descriptor; or its path (torch's launcher closes inherited
        descriptors, so a rank opens its launcher's pipe through /proc); or None for ranks other than 0,
        which write nothing, so the runner hears each event once."""
        if target is None:
            self._stream = None
        elif isinstance(target, int):
            self._stream = os.fdopen(target, "w", encoding="utf-8")
        else:
            self._stream = open(target, "w", encoding="utf-8")  # open until the process ends
        self._receivers: list[Callable[[ChildMessage], None]] = []

    def tee(self, receiver: Callable[[ChildMessage], None]) -> None:
        """Also hand every message emitted from now on to `receiver` (the job's trackers)."""
        self._receivers.append(receiver)

    def emit(self, message: ChildMessage) -> None:
        if self._stream is None:
            return
        self._stream.write(message.model_dump_json() + "\n")
        # The runner reacts to events while we train, so nothing may sit in a buffer.
        self._stream.flush()
        for receiver in self._receivers:
            receiver(message)

    def log(self, message: str, level: Literal["info", "warn", "error"] = "info") -> None:
        self.emit(LogMessage(level=level, message=message))
