"""Reinforcement fine-tuning (GRPO) on the tiny Llama, trained in this process through the recipe: the loss
of a fixed batch against TRL's own GRPO loss, a LoRA job with its rewards in evaluations, checkpoints and
the results file, and a hostile python grader or an unreachable judge that scores 0 without stopping the
job."""

import csv
import json
import subprocess
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from trl.trainer.grpo_trainer import GRPOTrainer
from trl.trainer.utils import nanstd, selective_log_softmax

from graders import sandbox
from models.spec import (
    CheckpointMessage,
    CompletedMessage,
    EvaluationMessage,
    JudgeAccess,
    LogMessage,
    MetricsMessage,
    TrainingSpec,
)
from models.validation import validate_file
from tests.training.test_sft_resume import run_here
from tests.training.test_sft_run import make_spec
from worker.child import TrainingProcess
from worker.training.device import DeviceConfig
from worker.training.events import EventWriter
from worker.training.loading import load_tokenizer
from worker.training.methods import get_method, untouched
from worker.training.objectives.grpo import GRPO, Prompt

N_TRAIN, N_VALID, BATCH_SIZE = 8, 4, 4
CPU = DeviceConfig(torch.device("cpu"), torch.float32)
SIMILARITY = {
    "type": "text_similarity",
    "name": "close",
    "input": "{{sample.output_text}}",
    "reference": "{{item.answer}}",
    "evaluation_metric": "fuzzy_match",
}
TOLERANCE = 1e-5
"""Float32 sums of the same terms in another order: far below any real difference in the formula."""


def prompt_row(i: int) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": f"What is {i} plus {i}?"}], "answer": f"{2 * i}"}


def rft_spec(
    root: Path, name: str, base: Path, grader: dict[str, Any], **hyperparameters: Any
) -> TrainingSpec:
    train, valid = root / f"{name}-train.jsonl", root / f"{name}-valid.jsonl"
    for path, rows in ((train, range(N_TRAIN)), (valid, range(100, 100 + N_VALID))):
        path.write_text("".join(json.dumps(prompt_row(i)) + "\n" for i in rows))
        summary = validate_file(path, param="training_file", min_examples=1, grader_fields=["answer"])
        assert summary.format == "prompts"
    spec = make_spec(root, name, base, train, valid)
    hp = spec.hyperparameters.model_copy(
        update={
            "batch_size": BATCH_SIZE,
            "n_epochs": 1,
            "learning_rate": 1e-2,
            "max_completion_tokens": 8,
            "eval_interval": 1,
            "metric_for_best_checkpoint": "full_valid_mean_reward",
            **hyperparameters,
        }
    )
    return spec.model_copy(
        update={"data_format": "prompts", "objective": "grpo", "hyperparameters": hp, "grader": grader}
    )


def test_the_loss_of_a_fixed_batch_is_trls(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Two prompts, three fixed answers each, fixed rewards, a LoRA policy whose adapter already moved it
    from the base (so the KL term is not zero): our loss and its gradients are those of TRL's
    `GRPOTrainer._compute_loss` (loss_type "grpo", token-level ratio, clipping 0.2, beta 0.1) given the
    same per-token log-probabilities, TRL's own `selective_log_softmax` over the model's logits."""
    spec = rft_spec(tmp_path, "fixed", tiny_model_dir, SIMILARITY, beta=0.1)
    tokenizer = load_tokenizer(str(tiny_model_dir))
    objective = GRPO(spec, tokenizer, CPU, EventWriter(None))
    torch.manual_seed(0)
    model = get_method("lora").prepare(objective.load_model(), spec.hyperparameters)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            parameter.data.normal_(0, 0.05)
    model.eval()  # no adapter dropout: both losses see the same forward passes
    prompts = [Prompt(tokenizer(f"What is {i} plus {i}?")["input_ids"], prompt_row(i)) for i in (1, 2)]
    assert prompts[0].length == prompts[1].length  # TRL's left padding would shift positions otherwise
    eos = tokenizer.eos_token_id
    answers = [[40, 41, eos], [42, eos], [43, 44, 45, 46], [47, eos], [48, 49, 50, eos], [51]]
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.25, 1.0, 0.0])

    ours, _ = objective.group_loss(model, prompts, answers, rewards)
    ours = ours / len(prompts)
    ours_grads = torch.autograd.grad(ours, [p for p in model.parameters() if p.requires_grad])

    width = max(map(len, answers))
    completion_ids = torch.tensor([a + [eos] * (width - len(a)) for a in answers])
    completion_mask = torch.tensor([[1] * len(a) + [0] * (width - len(a)) for a in answers])
    prompt_ids = torch.tensor([p.input_ids for p in prompts for _ in range(3)])

    def log_probs(
        model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, keep: int, **_: Any
    ) -> Any:
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, -keep - 1 : -1]
        return selective_log_softmax(logits, input_ids[:, -keep:]), torch.zeros_like(logits[..., 0]), None

    grouped = rewards.view(-1, 3)
    advantages = (grouped - grouped.mean(dim=1, keepdim=True)) / (nanstd(grouped, dim=1, keepdim=True) + 1e-4)
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([torch.ones_like(prompt_ids), completion_mask], dim=1)
    with torch.no_grad(), untouched(model):
        reference, _, _ = log_probs(model, input_ids, attention_mask, width)
    trainer = SimpleNamespace(
        _get_per_token_logps_and_entropies=log_probs,
        aux_loss_enabled=False,
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        importance_sampling_level="token",
        beta=0.1,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None),
        loss_type="grpo",
        epsilon_low=0.2,
        epsilon_high=0.2,
        use_vllm=False,
        model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1,
        _entropy_bonus_enabled=False,
        _metrics=defaultdict(lambda: defaultdict(list)),
        accelerator=SimpleNamespace(gather=lambda x: x, reduce=lambda x, reduction: x),
    )
    inputs = {
        "prompt_ids": prompt_ids,
        "prompt_mask": torch.ones_like(prompt_ids),
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "advantages": advantages.view(-1),
        "ref_per_token_logps": reference,
    }
    trls = GRPOTrainer._compute_loss(trainer, model, inputs)  # pyright: ignore[reportArgumentType]
    trls_grads = torch.autograd.grad(trls, [p for p in model.parameters() if p.requires_grad])

    assert trainer._metrics["train"]["kl"][0] > 1e-4  # the reference differs, so the KL term counts
    assert ours.item() == pytest.approx(trls.item(), abs=TOLERANCE)
    for mine, theirs in zip(ours_grads, trls_grads, strict=True):
        torch.testing.assert_close(mine, theirs, atol=TOLERANCE, rtol=1e-4)


def test_a_lora_job_reports_rewards_everywhere(tiny_model_dir: Path, tmp_path: Path) -> None:
    spec = rft_spec(tmp_path, "lora", tiny_model_dir, SIMILARITY)
    events = run_here(spec)

    evaluations = events.of_type(EvaluationMessage)
    assert [e.step for e in evaluations] == [0, 1, 2] and evaluations[0].baseline
    for evaluation in evaluations:
        assert 0.0 <= evaluation.metrics["full_valid_mean_reward"] <= 1.0
        assert len(evaluation.details["samples"]) == N_VALID
    steps = events.of_type(MetricsMessage)
    assert [m.step for m in steps] == [1, 2]
    assert all(0.0 <= m.metrics["train_mean_reward"] <= 1.0 for m in steps)
    checkpoints = events.of_type(CheckpointMessage)
    assert [c.step for c in checkpoints] == [1, 2]
    assert all("full_valid_mean_reward" in c.metrics for c in checkpoints)
    [completed] = events.of_type(CompletedMessage)
    assert "full_valid_mean_reward" in completed.metrics
    with open(completed.results_csv, newline="") as file:
        rows = list(csv.DictReader(file))
    assert [row["step"] for row in rows] == ["0", "1", "2"]
    assert all(row["full_valid_mean_reward"] for row in rows)
    assert rows[1]["train_accuracy"]  # the results file's accuracy column holds the mean reward


def test_multi_grader_reports_each_sub_grader(tiny_model_dir: Path, tmp_path: Path) -> None:
    grader = {
        "type": "multi",
        "name": "both",
        "calculate_output": "0.5 * close + 0.5 * exact",
        "graders": {
            "close": SIMILARITY,
            "exact": {
                "type": "string_check",
                "name": "exact",
                "input": "{{sample.output_text}}",
                "reference": "{{item.answer}}",
                "operation": "eq",
            },
        },
    }
    spec = rft_spec(tmp_path, "multi", tiny_model_dir, grader, n_epochs=1, eval_interval=0)
    events = run_here(spec)
    baseline = events.of_type(EvaluationMessage)[0].metrics
    assert {"full_valid_mean_reward", "full_valid_mean_reward_close", "full_valid_mean_reward_exact"} <= set(
        baseline
    )
    expected = 0.5 * baseline["full_valid_mean_reward_close"] + 0.5 * baseline["full_valid_mean_reward_exact"]
    assert baseline["full_valid_mean_reward"] == pytest.approx(expected)


@pytest.mark.skipif(bool(sandbox.unavailable()), reason="no bubblewrap sandbox here")
def test_a_hostile_python_grader_scores_zero_and_the_job_goes_on(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """The grader forks, and reads the host's files: the sandbox refuses both, each sample scores 0 with
    the reason in a warn event, and the job trains to the end."""
    marker = tmp_path / "secret.txt"
    marker.write_text("host data")
    source = (
        "import os\n"
        "def grade(sample, item):\n"
        f"    open({str(marker)!r}).read()\n"
        "    os.fork()\n"
        "    return 1.0\n"
    )
    grader = {"type": "python", "name": "hostile", "source": source}
    spec = rft_spec(tmp_path, "hostile", tiny_model_dir, grader, eval_interval=0)
    events = run_here(spec)

    assert all(e.metrics["full_valid_mean_reward"] == 0.0 for e in events.of_type(EvaluationMessage))
    warnings = [m.message for m in events.of_type(LogMessage) if m.level == "warn"]
    assert any("scored 0 because the grader failed" in w and "secret.txt" in w for w in warnings)
    assert events.of_type(CompletedMessage)
    assert marker.read_text() == "host data"


def test_an_unreachable_judge_scores_zero_and_the_job_goes_on(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A model grader whose inference server does not answer: each sample scores 0 with the reason in a
    warn event, and the job trains to the end."""
    grader = {
        "type": "score_model",
        "name": "judge",
        "model": "tiny-judge",
        "input": [{"role": "user", "content": "Score {{sample.output_text}} against {{item.answer}}."}],
    }
    nowhere = JudgeAccess(
        url="http://127.0.0.1:9",  # nothing listens there
        grant_file=None,
        organization="org-test",
        targets={"tiny-judge": {"model": "tiny-judge", "base_path": str(tiny_model_dir)}},
    )
    spec = rft_spec(tmp_path, "judge", tiny_model_dir, grader, eval_interval=0)
    events = run_here(spec.model_copy(update={"judge": nowhere}))

    assert all(e.metrics["full_valid_mean_reward"] == 0.0 for e in events.of_type(EvaluationMessage))
    warnings = [m.message for m in events.of_type(LogMessage) if m.level == "warn"]
    assert any("the judge did not answer: the inference server is not reachable" in w for w in warnings)
    assert events.of_type(CompletedMessage)


def test_the_trainer_is_started_without_the_inference_token(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its judges answer its grant (spec.judge): the worker's token, which reaches any organisation's
    models, is not in its environment."""
    monkeypatch.setenv("FTJOBS_INFERENCE_TOKEN", "s3cret")
    started: dict[str, Any] = {}
    monkeypatch.setattr(subprocess, "Popen", lambda command, **options: started.update(options))
    TrainingProcess(rft_spec(tmp_path, "env", tiny_model_dir, SIMILARITY), tmp_path)
    assert "FTJOBS_INFERENCE_TOKEN" not in started["env"] and "PATH" in started["env"]
