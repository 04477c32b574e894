"""Reinforcement fine-tuning by group-relative policy optimisation (GRPO; Shao et al., 2024, DeepSeekMath),
with OpenAI's graders as the reward.

Each step samples a group of answers per prompt from the model being trained, grades them (in this process:
string_check, text_similarity and multi directly, python graders through the bubblewrap sandbox, model
graders by asking their judge on the inference server, a step's answers concurrently), normalises
the rewards within each group into advantages, and takes the clipped-ratio policy loss plus beta times the
KL divergence to the starting model (the base with the adapter switched off; a frozen copy of the base for
methods that train its own weights). One optimisation pass per sampled group, as TRL's default: the
"old" policy is the current one, detached, so the ratio is 1 in value and the clipping bites only on
further passes. The loss is TRL's `grpo` loss: per answer the mean over its tokens, then the mean over
answers.

A sample the grader fails on (a python grader that crashes, loops or is refused something by the sandbox, a
template naming a part of the answer that is not there, a judge that does not answer in time or answers no
score) scores 0, and a `warn` event says why.

Full evaluation: `mean_reward` of the answers to the validation prompts (greedy, or eval_samples sampled
answers each), and `mean_reward_{name}` of each sub-grader of a multi grader.
"""

import copy
from collections.abc import Generator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from graders import judging
from graders.errors import GraderError
from graders.grading import Result, grade
from graders.judging import Judge, Reply
from graders.shapes import AnyGrader, SamplingParams, parse_grader
from models.spec import METHODS, Details, JudgeAccess, Metrics
from worker.training import distributed
from worker.training.data import IGNORE_INDEX, Example, collate, read_jsonl, template_message
from worker.training.loading import load_model
from worker.training.methods import untouched
from worker.training.objectives import BatchStats, Objective, register
from worker.training.objectives.causal_lm import trained_logits
from worker.training.tokens import decode, pad_token_id, render_chat

CLIP_EPSILON = 0.2
"""How far the probability ratio may move before the advantage stops pulling (PPO's and TRL's default)."""
ADVANTAGE_EPSILON = 1e-4
"""Added to a group's reward deviation, so a group whose answers all score alike has zero advantages."""
DETAIL_SAMPLES = 8
"""Validation answers kept in an evaluation's details."""
EVAL_BATCH = 16
"""Validation prompts per generation call at least: one call per prompt is several times slower, and the
left-padded prompts are masked, so the batch does not change what is generated."""
JUDGE_TIMEOUT = httpx.Timeout(60.0, connect=5.0)
"""Longest wait for one judge reply: a judge that takes longer scores its sample 0 and the step goes on."""
JUDGE_CONCURRENCY = 8
"""Judge requests in flight at once: a chat completion takes one conversation, so a step's answers go
concurrently and the inference server batches them."""


@dataclass(frozen=True)
class Prompt:
    """A training or validation row: the conversation up to the user's last message, rendered with the
    generation prompt, and the whole row, which graders read as `item`."""

    input_ids: list[int]
    item: dict[str, Any]

    @property
    def length(self) -> int:
        return len(self.input_ids)

    @property
    def units(self) -> int:
        return 1


@dataclass(frozen=True)
class Graded:
    """The answers sampled for some prompts (one group of `group` answers per prompt, in order) and their
    grades."""

    answers: list[list[int]]
    rewards: torch.Tensor
    results: list[Result]


def group_advantages(rewards: torch.Tensor, group: int) -> torch.Tensor:
    """Each answer's reward relative to its group: minus the group's mean, over its (sample) standard
    deviation."""
    grouped = rewards.view(-1, group)
    mean = grouped.mean(dim=1, keepdim=True)
    std = grouped.std(dim=1, keepdim=True)
    return ((grouped - mean) / (std + ADVANTAGE_EPSILON)).view(-1)


def grpo_token_losses(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    ref_log_probs: torch.Tensor | None,
    advantages: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """Per answer token: the clipped surrogate loss of its answer's advantage, plus beta times the k3
    estimate of KL(policy || reference) (Schulman's unbiased, always positive estimator)."""
    ratio = torch.exp(log_probs - old_log_probs)
    clipped = torch.clamp(ratio, 1 - CLIP_EPSILON, 1 + CLIP_EPSILON)
    losses = -torch.min(ratio * advantages, clipped * advantages)
    if ref_log_probs is not None and beta > 0:
        delta = ref_log_probs - log_probs
        losses = losses + beta * (torch.exp(delta) - delta - 1)
    return losses


def answer_means(values: torch.Tensor, rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    """The mean of per-token values over each row's tokens (`rows` holds each token's row)."""
    sums = values.new_zeros(n_rows).index_add(0, rows, values)
    counts = values.new_zeros(n_rows).index_add(0, rows, torch.ones_like(values))
    return sums / counts.clamp(min=1)


@register("grpo")
class GRPO(Objective[Prompt]):
    accuracy = "mean_reward"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.spec.grader is None:
            raise ValueError("a reinforcement job's spec carries its grader")
        self.grader: AnyGrader = parse_grader(self.spec.grader)
        self.judge = remote_judge(self.spec.judge) if self.spec.judge else None
        self.reference: nn.Module | None = None
        """A frozen copy of the base, for methods that train its own weights (others switch off theirs)."""

    def load_model(self, **options: Any) -> PreTrainedModel:
        return load_model(self.spec.base_model_path, self.device, **options)

    def load_examples(self, path: str, split: str) -> Sequence[Prompt]:
        """Prompts keep their last max_seq_length - max_completion_tokens tokens (the end of the
        conversation, right before the answer), so an answer always fits."""
        room = max(1, self.hp.max_seq_length - self.hp.max_completion_tokens)
        prompts, truncated = [], 0
        for _, record in read_jsonl(path):
            messages = [template_message(message) for message in record["messages"]]
            text = render_chat(
                self.tokenizer, messages, tools=record.get("tools"), add_generation_prompt=True
            )
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            truncated += len(ids) > room
            prompts.append(Prompt(ids[-room:], record))
        if truncated:
            self.events.log(
                f"{truncated} {split} prompts exceed max_seq_length - max_completion_tokens = {room} tokens "
                "and were cut from the left",
                level="warn",
            )
        if split == "training":
            self.truncated = truncated
        return prompts

    def before_training(self, model: nn.Module, examples: Sequence[Prompt]) -> None:
        if self.hp.beta > 0 and METHODS[self.hp.training_type].trains_base_weights:
            self.reference = copy.deepcopy(model).eval().requires_grad_(False)

    def batch_stats(self, model: nn.Module, examples: Sequence[Prompt]) -> BatchStats:
        group = self.hp.group_size
        graded = self.sample_and_grade(model, examples, group, greedy=False)
        loss_sum, tokens = self.group_loss(model, examples, graded.answers, graded.rewards)
        return BatchStats(
            loss_sum=loss_sum,
            units=len(examples),
            correct=graded.rewards.view(-1, group).mean(dim=1).sum().item(),
            tokens=tokens,
        )

    def group_loss(
        self, model: nn.Module, prompts: Sequence[Prompt], answers: list[list[int]], rewards: torch.Tensor
    ) -> tuple[torch.Tensor, int]:
        """The GRPO loss of the answers to `prompts` (a group each, in order) summed over the prompts (the
        recipe averages over them), and the tokens fed: each prompt with each of its answers is one row."""
        group = len(answers) // len(prompts)
        rows = [
            Example([*prompt.input_ids, *answer], [IGNORE_INDEX] * prompt.length + answer)
            for prompt, answer in zip((p for p in prompts for _ in range(group)), answers, strict=True)
        ]
        batch = {k: v.to(self.device.device) for k, v in collate(rows, pad_token_id(self.tokenizer)).items()}
        log_probs, token_rows = self.token_log_probs(model, batch)
        ref_log_probs = None
        if self.hp.beta > 0:
            with torch.no_grad(), self._reference(model) as reference:
                ref_log_probs, _ = self.token_log_probs(reference, batch)
        advantages = group_advantages(rewards.to(log_probs.device), group)
        losses = grpo_token_losses(
            log_probs, log_probs.detach(), ref_log_probs, advantages[token_rows], self.hp.beta
        )
        per_answer = answer_means(losses, token_rows, len(rows))
        return per_answer.view(-1, group).mean(dim=1).sum(), sum(len(row.input_ids) for row in rows)

    def evaluate(self, model: nn.Module, examples: Sequence[Prompt]) -> tuple[Metrics, Details]:
        samples = self.hp.eval_samples
        size = max(self.hp.batch_size, EVAL_BATCH)

        def score(prompts: Sequence[Prompt]) -> tuple[list[Result], list[list[int]]]:
            graded = self.sample_and_grade(model, prompts, samples, greedy=samples == 1)
            return graded.results, graded.answers

        scores = distributed.map_batches(model, score, examples, size)
        results = [result for batch, _ in scores for result in batch]
        answers = [answer for _, batch in scores for answer in batch]
        metrics = {"mean_reward": sum(r.reward for r in results) / len(results)}
        for name in results[0].sub_rewards:
            metrics[f"mean_reward_{name}"] = sum(r.sub_rewards.get(name, 0.0) for r in results) / len(results)
        kept = [
            {"answer": decode(self.tokenizer, answer, skip_special_tokens=True), "reward": result.reward}
            for answer, result in zip(answers[:DETAIL_SAMPLES], results, strict=False)
        ]
        return metrics, {"samples": kept}

    def sample_and_grade(
        self, model: nn.Module, prompts: Sequence[Prompt], group: int, *, greedy: bool
    ) -> Graded:
        """`group` answers per prompt from `model` (without dropout, without grad), each graded."""
        answers = self.sample(model, prompts, group, greedy=greedy)
        texts = [decode(self.tokenizer, answer, skip_special_tokens=True) for answer in answers]
        items = [prompts[index // group].item for index in range(len(answers))]
        if self.judge is None:
            results = list(map(self.grade, texts, items))
        else:
            with ThreadPoolExecutor(JUDGE_CONCURRENCY) as pool:
                results = list(pool.map(self.grade, texts, items))
        failures = [reason for reason in map(failure, results) if reason]
        if failures:
            self.events.log(
                f"{len(failures)} of {len(answers)} sampled answers scored 0 because the grader failed on "
                f"them; the first: {failures[0]}",
                level="warn",
            )
        rewards = torch.tensor([result.reward for result in results], dtype=torch.float32)
        return Graded(answers, rewards, results)

    def grade(self, text: str, item: dict[str, Any]) -> Result:
        try:
            return grade(self.grader, text, item, self.judge, "method.reinforcement.grader")
        except GraderError as error:  # e.g. {{sample.output_json.x}} on an answer that is not such JSON
            result = Result(0.0, self.grader.name, self.grader.type, 0.0)
            result.errors.sample_parse_error = True
            result.errors.python_grader_runtime_error_details = f"{error.param}: {error.message}"
            return result

    def sample(
        self, model: nn.Module, prompts: Sequence[Prompt], group: int, *, greedy: bool
    ) -> list[list[int]]:
        """Answer tokens (up to and including the end of turn) for each prompt, `group` in a row each:
        left-padded prompts, sampled at temperature 1 over the whole vocabulary, or greedily."""
        pad = pad_token_id(self.tokenizer)
        width = max(prompt.length for prompt in prompts)
        input_ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            input_ids[row, width - prompt.length :] = torch.tensor(prompt.input_ids)
            attention_mask[row, width - prompt.length :] = 1
        was_training = model.training
        model.eval()
        options: dict[str, Any] = {"do_sample": False} if greedy else {
            "do_sample": True, "temperature": 1.0, "top_p": 1.0, "top_k": 0,
        }  # fmt: skip
        with torch.no_grad():
            # nn.Module types attributes as tensors or modules; a causal LM (or its PEFT wrapper) generates.
            output = model.generate(  # pyright: ignore[reportCallIssue]
                input_ids=input_ids.to(self.device.device),
                attention_mask=attention_mask.to(self.device.device),
                max_new_tokens=self.hp.max_completion_tokens,
                num_return_sequences=group,
                pad_token_id=pad,
                eos_token_id=self.tokenizer.eos_token_id,
                # A sharded model's ranks gather its weights in every forward: each goes on generating
                # (its own rows finished) until every rank's rows are.
                synced_gpus=distributed.is_sharded(model),
                **options,
            )
        model.train(was_training)
        answers = []
        for row in output[:, width:].tolist():
            end = (
                row.index(self.tokenizer.eos_token_id) + 1 if self.tokenizer.eos_token_id in row else len(row)
            )
            answers.append(row[:end] or [self.tokenizer.eos_token_id])
        return answers

    def token_log_probs(
        self, model: nn.Module, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probability of each answer token under `model`, and the row of each."""
        logits, targets, rows = trained_logits(model, batch)
        return -F.cross_entropy(logits.float(), targets, reduction="none"), rows

    def _reference(self, model: nn.Module) -> AbstractContextManager[nn.Module]:
        return nullcontext(self.reference) if self.reference is not None else untouched(model)


class GrantFile(httpx.Auth):
    """The job's grant as the worker last renewed it, read for each request: one read once would expire."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers["Authorization"] = f"Bearer {self.path.read_text()}"
        yield request


def remote_judge(access: JudgeAccess) -> Judge:
    """A judge asking the inference server with the job's grant: only the job's judge models answer."""
    auth = GrantFile(access.grant_file) if access.grant_file else None
    client = httpx.Client(base_url=access.url, timeout=JUDGE_TIMEOUT, auth=auth)

    def ask(model: str, messages: list[dict[str, str]], sampling: SamplingParams | None) -> Reply:
        body = judging.request(model, messages, sampling)
        return judging.ask(client, access.targets[model], access.organization, body)

    return ask


def failure(result: Result) -> str | None:
    """Why the grader could not score this sample, if it could not."""
    errors = result.errors
    if errors.python_grader_runtime_error or errors.sample_parse_error:
        return errors.python_grader_runtime_error_details or "the grader failed"
    if errors.model_grader_server_error:
        return f"the judge did not answer: {errors.model_grader_server_error_details}"
    if errors.model_grader_parse_error:
        return "the judge's reply held no label or in-range score"
    if errors.formula_parse_error:
        return "the formula could not be evaluated for this sample"
    return None
