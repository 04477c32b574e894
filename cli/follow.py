"""Following a job until it ends. Metrics events move a bar over the job's steps (loss and the server's ETA
beside it) and every other event is printed above the bar. Without a terminal on stderr there is no bar:
every event, metrics included, is printed as a line, which is what a CI log wants."""

import time

from openai import OpenAI
from openai.types.fine_tuning import FineTuningJob, FineTuningJobEvent
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from cli.progress import bars

TERMINAL = {"succeeded", "failed", "cancelled"}
HISTORY, RECENT = 1000, 100
"""Events fetched on the first poll (the API's largest page: a finished job shows its whole history), then
on each later one (far more than a job logs between two polls)."""


def follow(client: OpenAI, job_id: str, *, poll_seconds: float = 2.0) -> FineTuningJob:
    """Show the job's events and progress until it succeeds, fails or is cancelled; return it then."""
    seen: set[str] = set()
    limit = HISTORY
    columns = (BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[postfix]}"), TimeElapsedColumn())
    with bars(TextColumn("{task.description}"), *columns) as progress:
        steps = _Steps(progress, job_id)
        while True:
            # The job first: once it is terminal, the events fetched after it are complete.
            job = client.fine_tuning.jobs.retrieve(job_id)
            events = client.fine_tuning.jobs.list_events(job_id, limit=limit).data
            limit = RECENT
            for event in reversed(events):  # the API lists newest first
                if event.id not in seen:
                    seen.add(event.id)
                    steps.show(event, job.estimated_finish)
            if job.status in TERMINAL:
                return job
            time.sleep(poll_seconds)


class _Steps:
    def __init__(self, progress: Progress, job_id: str) -> None:
        self.progress = progress
        self.job_id = job_id
        self.task: TaskID | None = None

    def show(self, event: FineTuningJobEvent, estimated_finish: int | None) -> None:
        data = event.data if isinstance(event.data, dict) else {}
        if event.type == "metrics" and "total_steps" in data and not self.progress.disable:
            if self.task is None:
                self.task = self.progress.add_task(self.job_id, total=int(data["total_steps"]), postfix="")
            postfix = _postfix(data, estimated_finish)
            self.progress.update(self.task, completed=int(data["step"]), postfix=postfix)
        else:
            self.progress.console.print(f"[{event.level}] {event.message}", markup=False)


def _postfix(data: dict[str, float], estimated_finish: int | None) -> str:
    parts = [f"loss={data['train_loss']:.4f}"] if "train_loss" in data else []
    if "valid_loss" in data:
        parts.append(f"val_loss={data['valid_loss']:.4f}")
    if estimated_finish:
        parts.append(f"eta={max(0, estimated_finish - int(time.time()))}s")
    return " ".join(parts)
