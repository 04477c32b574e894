"""Read back what a job logged to W&B (offline), MLflow and TensorBoard, each with the library's own types."""

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Curves = dict[str, dict[int, float]]
"""Metric name → step → value."""

WANDB_BLOCK, WANDB_CHUNK_HEADER, WANDB_FILE_HEADER = 32768, 7, 7
WANDB_FULL, WANDB_LAST = 1, 4


@dataclass
class WandbRun:
    run_id: str = ""
    project: str = ""
    entity: str = ""
    name: str = ""
    tags: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    curves: Curves = field(default_factory=dict)
    exit_code: int | None = None


def wandb_records(path: Path) -> list[Any]:
    """The records of a `.wandb` file: W&B's own protobuf `Record`s in a LevelDB-style log (32 KiB blocks of
    chunks, each with a 7-byte header: checksum, length, type), after a 7-byte `:W&B` file header. Recent
    wandb versions have no Python reader of their own (their Go core reads these files)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    records, pending, offset = [], b"", WANDB_FILE_HEADER
    while offset + WANDB_CHUNK_HEADER <= len(data):
        if WANDB_BLOCK - offset % WANDB_BLOCK < WANDB_CHUNK_HEADER:  # a block's tail too short for a chunk
            offset += WANDB_BLOCK - offset % WANDB_BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[offset : offset + WANDB_CHUNK_HEADER])
        if kind == 0:  # zero padding: nothing more was written
            break
        start = offset + WANDB_CHUNK_HEADER
        pending += data[start : start + length]
        offset = start + length
        if kind in (WANDB_FULL, WANDB_LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def wandb_run(root: Path, run_id: str) -> WandbRun:
    """Everything the offline runs of `run_id` under the W&B directory `root` logged, attempts in order."""
    run = WandbRun()
    # One directory per attempt, `offline-run-{time}-{id}` (with `-1`, `-2`... for several in a second).
    for path in sorted(root.glob(f"wandb/offline-run-*/run-{run_id}.wandb")):
        for record in wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                info = record.run
                run.run_id, run.project, run.entity = info.run_id, info.project, info.entity
                run.name, run.tags = info.display_name, list(info.tags)
                updates = info.config.update
                run.config |= {u.key: json.loads(u.value_json) for u in updates if u.key != "_wandb"}
            elif kind == "history":
                items = {
                    item.key or "/".join(item.nested_key): json.loads(item.value_json)
                    for item in record.history.item
                }
                step = int(items.pop("_step"))
                for name, value in items.items():
                    if not name.startswith("_"):
                        run.curves.setdefault(name, {})[step] = value
            elif kind == "exit":
                run.exit_code = record.exit.exit_code
    return run


@dataclass
class MlflowRun:
    status: str
    name: str
    params: dict[str, str]
    tags: dict[str, str]
    curves: Curves


def mlflow_runs(tracking_uri: str, experiment_name: str) -> list[MlflowRun]:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name(experiment_name)
    assert experiment is not None, f"no MLflow experiment {experiment_name!r}"
    runs = []
    for run in client.search_runs([experiment.experiment_id]):
        curves = {
            name: {metric.step: metric.value for metric in client.get_metric_history(run.info.run_id, name)}
            for name in run.data.metrics
        }
        runs.append(MlflowRun(run.info.status, run.info.run_name, run.data.params, run.data.tags, curves))
    return runs


def tensorboard_run(log_dir: Path) -> tuple[Curves, dict[str, Any]]:
    """The scalars (all of them, purged past a resumed attempt's first step) and the HParams entry."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import metadata as hparams_metadata
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    curves = {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}
    content = events.PluginTagToContent(hparams_metadata.PLUGIN_NAME)[hparams_metadata.SESSION_START_INFO_TAG]
    start = HParamsPluginData.FromString(content).session_start_info
    hparams: dict[str, Any] = {}
    for name, value in start.hparams.items():
        kind = value.WhichOneof("kind")
        hparams[name] = getattr(value, kind)
    return curves, hparams
