"""The pre-flight estimate's computation (docs/preflight.md): a job's files loaded by the training code
itself (validation, tokenization, truncation, packing), a loss-mask preview of the first examples, and a
memory estimate from the base model's config (no weights are read). Runs in the inference server, which the
API asks once it has checked the request as job creation does (`api/preflight`).
"""

from pathlib import Path

from inference.preflight.examples import file_stats, load, preview, unpacked
from inference.preflight.memory import estimate_job_memory
from models.base_store import local_base
from models.hyperparameters import HYPERPARAMETERS, resolve
from models.objectives import Mismatch, objective_for
from models.preflight import Device, PreflightFile, PreflightReport, PreflightRequest
from models.spec import DataError, TrainingSpec
from models.storage import ArtifactStore
from models.validation import validate_job_files
from worker.training.device import describe, select_device
from worker.training.loading import load_tokenizer
from worker.training.lr_range import affordable_steps
from worker.training.recipe import check_training_examples


def localized(request: PreflightRequest, store: ArtifactStore) -> PreflightRequest:
    """The request with its files and base model at paths on this machine (from the node cache, with object
    storage)."""

    def file(ref: PreflightFile | None) -> PreflightFile | None:
        return ref.model_copy(update={"path": str(store.local_path(ref.key))}) if ref else None

    base = local_base(store, request.base_model_path, request.base_content_hash)
    return request.model_copy(
        update={
            "base_model_path": base,
            "training_file": file(request.training_file),
            "validation_file": file(request.validation_file),
        }
    )


def estimate(request: PreflightRequest) -> PreflightReport:
    """The report on a job request that job creation accepts; DataError for what the job would fail on."""
    method_type = request.method["type"]
    requested = HYPERPARAMETERS[method_type].model_validate(request.method[method_type]["hyperparameters"])
    valid_file = request.validation_file
    train, valid = validate_job_files(
        Path(request.training_file.path),
        Path(valid_file.path) if valid_file else None,
        max_examples=request.max_file_examples,
    )
    objective = objective_for(method_type, train.format)
    if isinstance(objective, Mismatch):  # job creation saw the first example's format; validation saw all
        raise DataError("invalid_file_format", objective.message, objective.param)
    hp = resolve(requested, train.n_examples, objective)
    spec = TrainingSpec(
        job_id="preflight",
        base_model_path=request.base_model_path,
        training_file=request.training_file.path,
        validation_file=valid_file.path if valid_file else None,
        data_format=train.format,
        objective=objective,
        labels=list(train.labels),
        output_dir="",
        stop_file="",
        seed=0,
        hyperparameters=hp,
        max_training_tokens=request.max_file_tokens,
    )
    tokenizer = load_tokenizer(request.base_model_path)
    training = load(spec, tokenizer, spec.training_file, "training_file")
    try:
        check_training_examples(training.rows, spec.max_training_tokens)
    except ValueError as error:
        message = f"The job would fail: {error} (max_seq_length={hp.max_seq_length})."
        raise DataError("invalid_example", message, "training_file") from error
    warnings = list(training.warnings)
    validation = None
    if valid_file and valid:
        # Validation is never packed; loaded as an objective loads training files, so its cuts are counted.
        loaded = load(unpacked(spec), tokenizer, valid_file.path, "validation_file")
        validation = file_stats(spec, valid_file.id, valid.n_examples, loaded)
        if loaded.truncated:
            warnings.append(
                f"{loaded.truncated} validation examples exceed max_seq_length={hp.max_seq_length} "
                "and will be truncated at the end"
            )
    if request.device is not None:
        device = Device(**request.device.model_dump(), source="the worker of the latest job to start")
    else:
        device = Device(**describe(select_device()).model_dump(), source="the inference server")
        warnings.append(
            "No job has reported its device yet: memory is estimated for the inference server's own."
        )
    memory = estimate_job_memory(spec, training.rows, device, request.devices)
    if memory.reason:
        warnings.append(memory.reason)
    per_step = hp.batch_size * hp.gradient_accumulation_steps
    test_steps = (
        affordable_steps(hp.n_epochs * len(training.rows), per_step) if hp.learning_rate_search else 0
    )
    return PreflightReport(
        method=method_type,
        training_type=hp.training_type,
        max_seq_length=hp.max_seq_length,
        n_epochs=1 if hp.training_type == "feature_extraction" else hp.n_epochs,
        hyperparameters=hp.model_dump(),
        learning_rate_test_examples=test_steps * per_step,
        training_file=file_stats(spec, request.training_file.id, train.n_examples, training),
        validation_file=validation,
        loss_mask_preview=preview(spec, tokenizer),
        memory=memory,
        warnings=warnings,
    )
