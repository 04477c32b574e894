"""DPO and reward modelling on the tiny Llama, trained in this process through the recipe.

Each pair asks "What is i plus i?" and prefers the right sum to a list of animals, so both objectives can
separate them within a few steps: 8 training pairs in batches of 4 for 3 epochs = 6 steps."""

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from models.spec import CompletedMessage, EvaluationMessage, LogMessage, MetricsMessage, TrainingSpec
from models.validation import validate_file
from tests.training.test_sft_resume import Recorder, run_here
from tests.training.test_sft_run import checkpoint_dir, make_spec
from worker.training.data import IGNORE_INDEX, Example
from worker.training.device import DeviceConfig
from worker.training.loading import load_tokenizer
from worker.training.objectives import get_objective
from worker.training.objectives.preference import DPO, REWARD_MODEL_FILE, RewardModel, make_pair
from worker.training.recipe import Recipe

N_TRAIN, N_VALID, BATCH_SIZE, EPOCHS = 8, 4, 4, 3
STEPS = EPOCHS * N_TRAIN // BATCH_SIZE
LOG_2 = math.log(2)
LEARNING_RATES = {"lora": 2e-2, "full": 1e-3}
CPU = DeviceConfig(torch.device("cpu"), torch.float32)
_OUTPUTS = ("preferred_output", "non_preferred_output")


def record(i: int, *, alias: bool = False, system: str = "You are a helpful assistant.") -> dict[str, Any]:
    """Pair i; `alias` spells its outputs as OpenAI's *_completion keys."""
    outputs = ("preferred_completion", "non_preferred_completion") if alias else _OUTPUTS
    return {
        "input": {
            "messages": [
                {"role": "system", "content": system},
                {"role": "user", "content": f"What is {i} plus {i}?"},
            ]
        },
        outputs[0]: [{"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}],
        outputs[1]: [{"role": "assistant", "content": "Animals: bird cat cow dog."}],
    }


def write_pairs(path: Path, records: list[dict[str, Any]]) -> Path:
    """Write `records` as JSONL, checked by the validator the runner applies first."""
    path.write_text("".join(json.dumps(line) + "\n" for line in records))
    assert validate_file(path, param="training_file", min_examples=1).format == "preference"
    return path


def preference_spec(root: Path, name: str, base: Path, objective: str, training_type: str) -> TrainingSpec:
    train, valid = root / "train.jsonl", root / "valid.jsonl"
    if not train.exists():
        write_pairs(train, [record(i) for i in range(N_TRAIN)])
        write_pairs(valid, [record(i) for i in range(100, 100 + N_VALID)])
    spec = make_spec(root, name, base, train, valid)
    hp = spec.hyperparameters.model_copy(
        update={
            "training_type": training_type,
            "batch_size": BATCH_SIZE,
            "n_epochs": EPOCHS,
            "learning_rate": LEARNING_RATES[training_type],
        }
    )
    return spec.model_copy(
        update={"data_format": "preference", "objective": objective, "hyperparameters": hp}
    )


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("preference")


@pytest.fixture(scope="module", params=["lora", "full"])
def dpo_run(
    request: pytest.FixtureRequest, root: Path, tiny_model_dir: Path
) -> tuple[TrainingSpec, Recorder]:
    spec = preference_spec(root, f"dpo-{request.param}", tiny_model_dir, "dpo", request.param)
    return spec, run_here(spec)


@pytest.fixture(scope="module", params=["lora", "full"])
def reward_run(
    request: pytest.FixtureRequest, root: Path, tiny_model_dir: Path
) -> tuple[TrainingSpec, Recorder]:
    spec = preference_spec(root, f"reward-{request.param}", tiny_model_dir, "reward", request.param)
    return spec, run_here(spec)


def make_objective(spec: TrainingSpec, objective: str = "dpo") -> Any:
    return get_objective(objective)(spec, load_tokenizer(spec.base_model_path), CPU, Recorder(spec))


def test_dpo_starts_at_log_2_and_learns_the_training_pairs(dpo_run: tuple[TrainingSpec, Recorder]) -> None:
    """Before any step the policy is its reference: every implicit reward is 0, the loss log 2."""
    _, events = dpo_run
    baseline = events.of_type(EvaluationMessage)[0]
    assert baseline.baseline and baseline.details == {}
    assert baseline.metrics == pytest.approx(
        {"full_valid_loss": LOG_2, "full_valid_reward_accuracy": 0.0, "full_valid_reward_margin": 0.0},
        abs=1e-5,
    )
    steps = events.of_type(MetricsMessage)
    assert [m.step for m in steps] == list(range(1, STEPS + 1))
    assert steps[0].metrics["train_loss"] == pytest.approx(LOG_2, abs=1e-5)
    assert steps[0].metrics["train_reward_accuracy"] == 0.0
    last = steps[-1].metrics
    assert last["train_loss"] < LOG_2 - 0.05 and last["train_reward_accuracy"] == 1.0
    [completed] = events.of_type(CompletedMessage)
    assert completed.metrics["full_valid_loss"] < LOG_2
    assert completed.metrics["full_valid_reward_margin"] > 0


def answer_log_prob(model: torch.nn.Module, row: Example) -> float:
    """Straight from the definition: one unpadded row, log-softmax, the labelled tokens' log-probabilities."""
    ids = torch.tensor([row.input_ids])
    log_probs = model(ids).logits[0, :-1].log_softmax(dim=-1)
    token_log_probs = log_probs.gather(1, ids[0, 1:, None])[:, 0]
    return token_log_probs[torch.tensor(row.labels[1:]) != IGNORE_INDEX].sum().item()


@pytest.mark.parametrize("resume", [False, True], ids=["start", "resume"])
def test_reference_log_probs_are_the_base_models(
    dpo_run: tuple[TrainingSpec, Recorder], resume: bool
) -> None:
    """Also when resuming a checkpoint whose weights have moved: the reference stays the base."""
    spec, _ = dpo_run
    if resume:
        spec = spec.model_copy(update={"resume_from": str(checkpoint_dir(spec, STEPS))})
    recipe = Recipe(spec, Recorder(spec))
    recipe.setup()
    objective: DPO = recipe.objective  # type: ignore[assignment]
    base = AutoModelForCausalLM.from_pretrained(spec.base_model_path)
    with torch.no_grad():
        for split, pairs in {"training": recipe.train_examples, "validation": recipe.valid_examples}.items():
            expected = [
                [answer_log_prob(base, pair.chosen), answer_log_prob(base, pair.rejected)] for pair in pairs
            ]
            torch.testing.assert_close(objective.reference[split], torch.tensor(expected), rtol=0, atol=1e-4)


def test_the_completion_spelling_reads_as_the_output_one(root: Path, tiny_model_dir: Path) -> None:
    spec = preference_spec(root, "alias", tiny_model_dir, "dpo", "lora")
    alias = write_pairs(root / "alias.jsonl", [record(i, alias=True) for i in range(N_TRAIN)])
    objective = make_objective(spec)
    assert objective.load_examples(str(alias), "training") == objective.load_examples(
        spec.training_file, "training"
    )


def test_truncation_cuts_the_prompt_from_the_left_and_keeps_the_answers(
    root: Path, tiny_model_dir: Path
) -> None:
    spec = preference_spec(root, "truncated", tiny_model_dir, "dpo", "lora")
    long_system = "You are a helpful assistant. " * 20
    path = write_pairs(root / "long.jsonl", [record(1), record(2, system=long_system)])
    [short, whole] = make_objective(spec).load_examples(str(path), "training")
    max_seq_length = short.length + 4
    objective = make_objective(
        spec.model_copy(
            update={
                "hyperparameters": spec.hyperparameters.model_copy(update={"max_seq_length": max_seq_length})
            }
        )
    )
    [kept, cut] = objective.load_examples(str(path), "training")
    assert objective.truncated == 1 and kept == short
    for row, untouched in [(cut.chosen, whole.chosen), (cut.rejected, whole.rejected)]:
        assert row.length == len(row.labels) <= max_seq_length
        answer = [label for label in untouched.labels if label != IGNORE_INDEX]
        assert row.labels[-len(answer) :] == answer
        assert untouched.input_ids[-row.length :] == row.input_ids  # the prompt's end, then the answer
    n_prompt = cut.chosen.labels.count(IGNORE_INDEX)
    assert cut.rejected.labels.count(IGNORE_INDEX) == n_prompt
    assert cut.chosen.input_ids[:n_prompt] == cut.rejected.input_ids[:n_prompt]
    [warning] = [m for m in objective.events.of_type(LogMessage) if m.level == "warn"]
    assert "1 training pairs exceed max_seq_length" in warning.message


@pytest.mark.parametrize(
    ("max_seq_length", "kept", "answers", "truncated"),
    [
        (8, [1, 2, 3], ([20, 21], [30, 31, 32]), False),
        # Both answers keep the same prompt: what the longer one leaves room for.
        (5, [2, 3], ([20, 21], [30, 31, 32]), True),
        # An answer too long on its own keeps one prompt token to be predicted from and loses its end.
        (3, [3], ([20, 21], [30, 31]), True),
    ],
    ids=["fits", "prompt-cut", "answer-cut"],
)
def test_make_pair(
    max_seq_length: int, kept: list[int], answers: tuple[list[int], list[int]], truncated: bool
) -> None:
    pair, was_truncated = make_pair([1, 2, 3], [20, 21], [30, 31, 32], max_seq_length, "training", 0)
    assert was_truncated is truncated
    for row, answer in zip([pair.chosen, pair.rejected], answers, strict=True):
        assert row == Example([*kept, *answer], [IGNORE_INDEX] * len(kept) + answer)
    assert (pair.length, pair.units) == (len(kept) + len(answers[1]), 1)


def test_reward_model_learns_to_rank_the_pairs(reward_run: tuple[TrainingSpec, Recorder]) -> None:
    _, events = reward_run
    baseline, *_, last = events.of_type(EvaluationMessage)
    assert last.metrics["full_valid_reward_accuracy"] == 1.0 > baseline.metrics["full_valid_reward_accuracy"]
    assert last.metrics["full_valid_loss"] < min(LOG_2, baseline.metrics["full_valid_loss"])
    assert last.metrics["full_valid_reward_margin"] > 0
    assert events.of_type(MetricsMessage)[-1].metrics["train_reward_accuracy"] == 1.0


def test_the_reward_model_artifact_reproduces_the_reported_scores(
    reward_run: tuple[TrainingSpec, Recorder],
) -> None:
    """A whole model loads by itself; an adapter onto the base loaded as its marker file says."""
    spec, events = reward_run
    [completed] = events.of_type(CompletedMessage)
    artifact = Path(completed.adapter_path)
    marker = json.loads((artifact / REWARD_MODEL_FILE).read_text())
    objective: RewardModel = make_objective(spec, "reward")
    assert marker == {
        "type": "reward_model",
        "head": "score",
        "num_labels": 1,
        "pad_token_id": objective.tokenizer.pad_token_id,
    }
    if spec.hyperparameters.training_type == "full":
        model = AutoModelForSequenceClassification.from_pretrained(artifact)
        assert (model.config.num_labels, model.config.pad_token_id) == (1, marker["pad_token_id"])
    else:
        base = AutoModelForSequenceClassification.from_pretrained(
            spec.base_model_path, num_labels=marker["num_labels"], pad_token_id=marker["pad_token_id"]
        )
        model = PeftModel.from_pretrained(base, artifact)
    model.eval()
    with torch.no_grad():
        metrics, _ = objective.evaluate(model, objective.load_examples(spec.validation_file, "validation"))
    assert {f"full_valid_{name}": value for name, value in metrics.items()} == pytest.approx(
        {name: value for name, value in completed.metrics.items() if name.startswith("full_valid_")}, abs=1e-5
    )
