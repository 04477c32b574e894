"""`ftjobs jobs follow`: a live progress bar (step, loss, ETA) until the job reaches a terminal state."""

import time

from openai import OpenAI
from openai.types.fine_tuning import FineTuningJob
from tqdm import tqdm

TERMINAL = {"succeeded", "failed", "cancelled"}


def follow(client: OpenAI, job_id: str, *, poll_seconds: float = 2.0) -> FineTuningJob:
    seen: set[str] = set()
    bar: tqdm | None = None
    while True:
        job = client.fine_tuning.jobs.retrieve(job_id)
        events = client.fine_tuning.jobs.list_events(job_id, limit=100).data
        for event in reversed(events):  # the API lists newest first
            if event.id in seen:
                continue
            seen.add(event.id)
            data = event.data or {}
            if event.type == "metrics" and isinstance(data, dict) and "total_steps" in data:
                if bar is None:
                    bar = tqdm(total=int(data["total_steps"]), unit="step", desc=job_id, dynamic_ncols=True)
                bar.update(int(data["step"]) - bar.n)
                bar.set_postfix_str(_postfix(data, job.estimated_finish))
            else:
                tqdm.write(f"[{event.level}] {event.message}")
        if job.status in TERMINAL:
            if bar is not None:
                bar.close()
            return job
        time.sleep(poll_seconds)


def _postfix(data: dict[str, float], estimated_finish: int | None) -> str:
    parts = [f"loss={data['train_loss']:.4f}"]
    if "valid_loss" in data:
        parts.append(f"val_loss={data['valid_loss']:.4f}")
    if estimated_finish:
        parts.append(f"eta={max(0, estimated_finish - int(time.time()))}s")
    return " ".join(parts)
