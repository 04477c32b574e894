"""The child's side of the event pipe: one JSON `ChildMessage` per line, flushed at once."""

import os
from collections.abc import Callable
from typing import Literal

from models.spec import ChildMessage, LogMessage


class EventWriter:
    def __init__(self, fd: int) -> None:
        self._stream = os.fdopen(fd, "w", encoding="utf-8")
        self._receivers: list[Callable[[ChildMessage], None]] = []

    def tee(self, receiver: Callable[[ChildMessage], None]) -> None:
        """Also hand every message emitted from now on to `receiver` (the job's trackers)."""
        self._receivers.append(receiver)

    def emit(self, message: ChildMessage) -> None:
        self._stream.write(message.model_dump_json() + "\n")
        # The runner reacts to events while we train, so nothing may sit in a buffer.
        self._stream.flush()
        for receiver in self._receivers:
            receiver(message)

    def log(self, message: str, level: Literal["info", "warn", "error"] = "info") -> None:
        self.emit(LogMessage(level=level, message=message))
