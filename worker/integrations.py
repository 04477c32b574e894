"""Where a job's integrations log. The request names the run (project, experiment, tags) and never where it
goes: destinations are the operator's settings, split per organisation (a subdirectory, an experiment name
prefix) so one organisation's runs never land among another's."""

from models.orm import Job
from models.settings import Settings
from models.spec import MlflowTracker, TensorboardTracker, Tracker, WandbTracker


def trackers(settings: Settings, job: Job, organization: str) -> list[Tracker]:
    """The training spec's trackers for `job` of `organization` (its name), from its stored integrations."""
    targets: list[Tracker] = []
    for integration in job.integrations or []:
        kind = integration["type"]
        given = integration.get(kind) or {}
        if kind == "wandb":
            wandb = WandbTracker(
                project=given["project"],
                name=given.get("name"),
                entity=given.get("entity"),
                tags=given.get("tags") or [],
                run_id=given.get("run_id") or job.id,
                dir=str((settings.wandb_root / organization).resolve()),
            )
            targets.append(wandb)
        elif kind == "mlflow":
            experiment = given.get("experiment_name")
            mlflow = MlflowTracker(
                tracking_uri=settings.resolved_mlflow_tracking_uri(),
                experiment_name=f"{organization}/{experiment}" if experiment else organization,
                run_name=given.get("run_name") or job.id,
                tags=given.get("tags") or {},
            )
            targets.append(mlflow)
        elif kind == "tensorboard":
            log_dir = (settings.tensorboard_root / organization / job.id).resolve()
            targets.append(TensorboardTracker(log_dir=str(log_dir)))
    return targets
