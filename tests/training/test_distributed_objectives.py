"""The other objectives and the 4-bit method on two CPU ranks, started as the runner starts them: DPO with
`full` (sharded: the reference log-probabilities come from the sharded model before the first step, each
rank scores its share of the pairs) and text classification with `lora` (data-parallel, a new head trained
in full) each equal their 1-rank run; `qlora` runs what it runs on CPU today (bitsandbytes' CPU 4-bit
layers) on 2 ranks to the end. Five children at once; tiny models, one epoch of 4 steps.
"""

from pathlib import Path

import pytest

from models.spec import CompletedMessage, MetricsMessage, TrainingSpec
from tests.tiny_model import build_tiny_llama
from tests.training.classifier_jobs import job_spec, texts
from tests.training.classifier_jobs import write_jsonl as write_rows
from tests.training.test_distributed import finish, losses, start
from tests.training.test_preference import preference_spec
from tests.training.test_sft_run import Run, make_spec, write_jsonl

pytestmark = pytest.mark.distributed

LOSS_TOLERANCE = 1e-5
"""As tests/training/test_distributed.py: the same sums in another order."""


def on(spec: TrainingSpec, devices: int, name: str) -> TrainingSpec:
    """`spec` on `devices` ranks, in a work directory of its own named `name`."""
    workdir = Path(spec.output_dir).parent.parent / name
    workdir.mkdir(parents=True, exist_ok=True)
    spec = spec.model_copy(
        update={
            "devices": devices,
            "output_dir": str(workdir / "out"),
            "stop_file": str(workdir / "STOP"),
            "job_id": f"ftjob-{name}",
        }
    )
    (workdir / "spec.json").write_text(spec.model_dump_json())
    return spec


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Run]:
    root = tmp_path_factory.mktemp("objectives")
    base = build_tiny_llama(root / "base")
    dpo = preference_spec(root, "dpo", base, "dpo", "full")
    dpo = dpo.model_copy(update={"hyperparameters": dpo.hyperparameters.model_copy(update={"n_epochs": 1})})
    classify = job_spec(
        root / "classify",
        base,
        "classification",
        ["animal", "fruit"],
        write_rows(root / "texts.jsonl", texts(15, seed=1)),
        write_rows(root / "texts_valid.jsonl", texts(4, seed=2)),
        training_type="lora",
        batch_size=4,
        learning_rate=1e-2,
    )
    sft = write_jsonl(root / "sft.jsonl", 15)
    qlora = make_spec(root, "qlora", base, sft, write_jsonl(root / "sft_valid.jsonl", 4, offset=100))
    qlora = qlora.model_copy(
        update={
            "hyperparameters": qlora.hyperparameters.model_copy(
                update={"training_type": "qlora", "n_epochs": 1, "batch_size": 4}
            )
        }
    )
    specs = {
        "dpo_1": on(dpo, 1, "dpo_1"),
        "dpo_2": on(dpo, 2, "dpo_2"),
        "classify_1": on(classify, 1, "classify_1"),
        "classify_2": on(classify, 2, "classify_2"),
        "qlora_2": on(qlora, 2, "qlora_2"),
    }
    children = {name: start(spec) for name, spec in specs.items()}
    return {name: finish(child) for name, child in children.items()}


@pytest.mark.parametrize("name", ["dpo", "classify"])
def test_two_ranks_train_what_one_rank_trains(runs: dict[str, Run], name: str) -> None:
    one, two = runs[f"{name}_1"], runs[f"{name}_2"]
    assert losses(two) and losses(two) == pytest.approx(losses(one), abs=LOSS_TOLERANCE)
    for ours, theirs in zip(two.of_type(MetricsMessage), one.of_type(MetricsMessage), strict=True):
        assert ours.metrics == pytest.approx(theirs.metrics, rel=LOSS_TOLERANCE, abs=LOSS_TOLERANCE)
    [done_one], [done_two] = one.of_type(CompletedMessage), two.of_type(CompletedMessage)
    assert done_two.metrics == pytest.approx(done_one.metrics, rel=LOSS_TOLERANCE, abs=LOSS_TOLERANCE)


def test_qlora_runs_on_two_ranks(runs: dict[str, Run]) -> None:
    qlora = runs["qlora_2"]
    assert list(losses(qlora)) == list(range(1, 5))
    [completed] = qlora.of_type(CompletedMessage)
    assert (Path(completed.adapter_path) / "adapter_model.safetensors").is_file()
