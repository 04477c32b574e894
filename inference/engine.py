"""The inference engine: OpenAI's chat completions and completions, and the classifications extension,
on the models `ModelStore` keeps in memory. A request is prepared in the caller's thread (tokenized and
checked), then its rows join its model's batch (`inference.batching`) and the caller waits for them;
streaming requests wait in a thread of their own and hand their chunks over through a queue."""

import threading
from collections.abc import Callable
from dataclasses import replace
from queue import Queue
from typing import Any

import numpy as np
import torch
from peft import PeftModel, PromptLearningConfig
from torch import nn
from transformers import PreTrainedTokenizerBase

from inference import shapes
from inference.batching import Batching, Job
from inference.constrained import Grammar
from inference.generation import (
    FinishReason,
    OnEvent,
    Output,
    Sampling,
    TokenLogprob,
    eos_token_ids,
    generate,
)
from inference.store import ModelStore, Served
from models.errors import APIError
from models.inference import (
    MAX_PROMPT_TOKENS,
    ChatCompletionRequest,
    ChatMessage,
    ClassificationRequest,
    CompletionRequest,
    ModelKind,
    Target,
)
from models.settings import Settings
from worker.training.data import template_message
from worker.training.device import DeviceConfig
from worker.training.objectives.classification import encode
from worker.training.tokens import render_chat

DEFAULT_MAX_TOKENS = 256
"""Completion tokens when the request names no max_tokens (always also capped by the model's context)."""
Chunk = dict[str, Any]


class Engine:
    def __init__(self, settings: Settings, device: DeviceConfig | None = None) -> None:
        self.models = ModelStore(settings, device)
        self.batching = Batching(settings.inference_max_queue)

    def close(self) -> None:
        """Stop what the engine runs beside this process (nothing here; vLLM's engine has processes)."""

    # Public surface: OpenAI's chat completions, completions, and the classifications extension.
    # `organization` is whose request it is (batches are fair between organisations); `cancelled`, once
    # set, drops the request from its batch (its client left).

    def chat(
        self,
        target: Target,
        request: ChatCompletionRequest,
        organization: str = "",
        cancelled: threading.Event | None = None,
    ) -> Chunk:
        prompt_lengths, outputs = self._generate(
            target, request, chat_prompts(request.messages), organization, cancelled=cancelled
        )
        return shapes.chat_completion(target.model, outputs, prompt_lengths)

    def complete(
        self,
        target: Target,
        request: CompletionRequest,
        organization: str = "",
        cancelled: threading.Event | None = None,
    ) -> Chunk:
        prompt_lengths, outputs = self._generate(
            target, request, text_prompts(request.prompts()), organization, cancelled=cancelled
        )
        return shapes.text_completion(target.model, outputs, prompt_lengths)

    def stream_chat(self, target: Target, request: ChatCompletionRequest, organization: str = "") -> "Stream":
        """The streamed answer's chunks; a request that cannot run raises here, before any chunk."""
        chunks = shapes.ChatChunks(target.model, include_usage(request), request.logprobs is True)
        return self._stream(target, request, chat_prompts(request.messages), chunks, organization)

    def stream_complete(self, target: Target, request: CompletionRequest, organization: str = "") -> "Stream":
        chunks = shapes.TextChunks(target.model, include_usage(request), request.logprobs is not None)
        return self._stream(target, request, text_prompts(request.prompts()), chunks, organization)

    def classify(self, target: Target, request: ClassificationRequest) -> Chunk:
        expect_kind(target, "classification")
        texts = request.texts()
        with self.models.serving(target) as served, served.lock:
            assert served.labels is not None
            probabilities = classifier_probabilities(served, texts)
        return shapes.classifications(target.model, served.labels, probabilities)

    # Generation.

    def _generate(
        self,
        target: Target,
        request: ChatCompletionRequest | CompletionRequest,
        prompts_of: Callable[[PreTrainedTokenizerBase], list[list[int]]],
        organization: str,
        on_ready: Callable[[int], None] | None = None,
        on_event: OnEvent | None = None,
        cancelled: threading.Event | None = None,
    ) -> tuple[list[int], list[Output]]:
        """Every prompt's `n` outputs (choice index = prompt index * n + row), and the prompts' lengths."""
        expect_kind(target, "causal_lm")
        n = request.n or 1
        generator = torch.Generator()
        if request.seed is None:
            generator.seed()
        else:
            generator.manual_seed(request.seed)
        with self.models.serving(target) as served:
            # Tokenizers only read their state here and when decoding, so requests share them without a lock.
            model = served.now()
            prompts = prompts_of(served.tokenizer)
            eos = eos_token_ids(model, served.tokenizer)
            sampling, limits = checked_sampling(
                request, prompts, context_length(model), served.tokenizer, eos, vocabulary_size(model)
            )
            ready = (lambda: on_ready(n * len(prompts))) if on_ready is not None else None
            if is_prompt_learning(model):
                outputs = self._one_by_one(
                    served, prompts, sampling, limits, generator, ready, on_event, cancelled
                )
                return [len(prompt) for prompt in prompts], outputs
            job = Job(
                organization=organization,
                prompts=[prompt for prompt in prompts for _ in range(n)],
                limits=[row_limit for row_limit in limits for _ in range(n)],
                sampling=sampling,
                generator=generator,
                tokenizer=served.tokenizer,
                eos=eos,
                adapter=served.adapter,
                model=served.now,
                lock=served.lock,
                on_event=on_event,
                cancelled=cancelled or threading.Event(),
            )
            self.batching.submit(served.lock, job, ready)
            job.done.wait()
            return [len(prompt) for prompt in prompts], job.outputs()

    @staticmethod
    def _one_by_one(
        served: Served,
        prompts: list[list[int]],
        sampling: Sampling,
        limits: list[int],
        generator: torch.Generator,
        ready: Callable[[], None] | None,
        on_event: OnEvent | None,
        cancelled: threading.Event | None,
    ) -> list[Output]:
        """A prompt method's prompts, one after another with transformers' `generate` (which adds the
        virtual tokens and their cache), holding the model's lock: these models are not batched."""
        if ready is not None:
            ready()
        outputs: list[Output] = []
        with served.lock:
            for index, (prompt, limit) in enumerate(zip(prompts, limits, strict=True)):
                offset = index * sampling.n

                def shifted(
                    row: int,
                    delta: str,
                    finish: FinishReason | None,
                    logprobs: list[TokenLogprob],
                    offset: int = offset,
                ) -> None:
                    assert on_event is not None
                    on_event(offset + row, delta, finish, logprobs)

                outputs += generate(
                    served.model,
                    served.tokenizer,
                    prompt,
                    replace(sampling, max_new_tokens=limit),
                    generator,
                    shifted if on_event is not None else None,
                    cancelled,
                )
        return outputs

    def _stream(
        self,
        target: Target,
        request: ChatCompletionRequest | CompletionRequest,
        prompts_of: Callable[[PreTrainedTokenizerBase], list[list[int]]],
        chunks: shapes.ChunkMaker,
        organization: str,
    ) -> "Stream":
        """Generation in its own thread, its chunks through a queue: the reader never blocks the model's
        thread, and the model's errors before the first token still reach the caller as exceptions."""
        queue: Queue[_Item] = Queue()
        cancelled = threading.Event()

        def ready(choices: int) -> None:
            queue.put(_READY)
            for index in range(choices):
                for chunk in chunks.opening(index):
                    queue.put(chunk)

        def run() -> None:
            try:
                lengths, outputs = self._generate(
                    target,
                    request,
                    prompts_of,
                    organization,
                    on_ready=ready,
                    on_event=lambda index, text, finish, logprobs: queue.put(
                        chunks.delta(index, text, finish, logprobs)
                    ),
                    cancelled=cancelled,
                )
                if include_usage(request):
                    queue.put(chunks.usage(shapes.usage(outputs, lengths)))
            except BaseException as exc:  # raised by the reader
                queue.put(exc)
            finally:
                queue.put(_END)

        threading.Thread(target=run, name="inference-stream", daemon=True).start()
        first = queue.get()
        if isinstance(first, BaseException):
            raise first
        return Stream(queue, cancelled)


class _Marker:
    pass


_READY, _END = _Marker(), _Marker()
_Item = Chunk | BaseException | _Marker


class Stream:
    """The chunks of one streamed response; `cancel()` stops its generation early (the client left)."""

    def __init__(self, queue: "Queue[_Item]", cancelled: threading.Event) -> None:
        self._queue, self._cancelled, self._done = queue, cancelled, False

    def __iter__(self) -> "Stream":
        return self

    def __next__(self) -> Chunk:
        if self._done:
            raise StopIteration
        item = self._queue.get()
        if isinstance(item, BaseException):
            self._done = True
            raise item
        if isinstance(item, _Marker):
            self._done = True
            raise StopIteration
        return item

    def cancel(self) -> None:
        self._cancelled.set()


def checked_sampling(
    request: ChatCompletionRequest | CompletionRequest,
    prompts: list[list[int]],
    room: int | None,
    tokenizer: PreTrainedTokenizerBase,
    eos: set[int],
    vocabulary: int,
) -> tuple[Sampling, list[int]]:
    """The request's sampling and each prompt's completion-token limit, once its prompts fit the limits
    and the model's context of `room` positions (a 400 naming the parameter otherwise). Every engine
    checks requests here."""
    limit = (
        request.token_limit(DEFAULT_MAX_TOKENS)
        if isinstance(request, ChatCompletionRequest)
        else request.max_tokens or DEFAULT_MAX_TOKENS
    )
    param = "messages" if isinstance(request, ChatCompletionRequest) else "prompt"
    total = sum(map(len, prompts))
    if total > MAX_PROMPT_TOKENS:
        raise APIError(
            f"A request's prompts may total at most {MAX_PROMPT_TOKENS} tokens; these have {total}.",
            param=param,
        )
    for prompt in prompts:
        if room is not None and len(prompt) >= room:
            raise APIError(
                f"This model's maximum context length is {room} tokens; the prompt has "
                f"{len(prompt)} tokens, which leaves no room for a completion.",
                param=param,
                code="context_length_exceeded",
            )
    schema = request.json_schema() if isinstance(request, ChatCompletionRequest) else None
    sampling = Sampling(
        max_new_tokens=limit,
        temperature=1.0 if request.temperature is None else request.temperature,
        top_p=1.0 if request.top_p is None else request.top_p,
        stop=request.stop_sequences(),
        n=request.n or 1,
        frequency_penalty=request.frequency_penalty or 0.0,
        presence_penalty=request.presence_penalty or 0.0,
        logit_bias=checked_logit_bias(request.logit_bias or {}, vocabulary),
        logprobs=request.logprob_alternatives(),
        grammar=Grammar(tokenizer, eos, schema) if schema is not None else None,
    )
    return sampling, [min(limit, room - len(p)) if room is not None else limit for p in prompts]


def adjusts_scores(request: ChatCompletionRequest | CompletionRequest) -> bool:
    """Whether the request reads or changes each draw's scores (logprobs, penalties, logit_bias,
    response_format): what only ftjobs' own engine does."""
    return bool(
        request.logprob_alternatives() is not None
        or request.frequency_penalty
        or request.presence_penalty
        or request.logit_bias
        or (isinstance(request, ChatCompletionRequest) and request.json_schema() is not None)
    )


def include_usage(request: ChatCompletionRequest | CompletionRequest) -> bool:
    return bool((request.stream_options or {}).get("include_usage"))


def expect_kind(target: Target, kind: ModelKind) -> None:
    if target.kind != kind:
        usage = "/v1/classifications" if target.kind == "classification" else "/v1/chat/completions"
        raise APIError(
            f"Model {target.model!r} is a {target.kind.replace('_', ' ')} model; use {usage} with it.",
            param="model",
            code="model_not_supported",
        )


def chat_prompts(messages: list[ChatMessage]) -> Callable[[PreTrainedTokenizerBase], list[list[int]]]:
    def render(tokenizer: PreTrainedTokenizerBase) -> list[list[int]]:
        return [chat_prompt_ids(tokenizer, messages)]

    return render


def chat_prompt_ids(tokenizer: PreTrainedTokenizerBase, messages: list[ChatMessage]) -> list[int]:
    """The prompt as training renders a conversation before an assistant turn (`tokenize_chat`): the
    chat template's text with the generation prompt, tokenized without added special tokens."""
    if not tokenizer.chat_template:
        raise APIError(
            "This model's tokenizer has no chat template; use /v1/completions with it.",
            param="model",
            code="model_not_supported",
        )
    conversation = [template_message({"role": m.role, "content": m.text()}) for m in messages]
    text = render_chat(tokenizer, conversation, add_generation_prompt=True)
    ids: list[int] = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids


def text_prompts(prompts: list[str]) -> Callable[[PreTrainedTokenizerBase], list[list[int]]]:
    def encode_all(tokenizer: PreTrainedTokenizerBase) -> list[list[int]]:
        # As prompt/completion training encodes its prompts.
        return [
            tokenizer(p, add_special_tokens=True)["input_ids"] or empty_prompt(tokenizer) for p in prompts
        ]

    return encode_all


def empty_prompt(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """What an empty prompt starts from: bos, or eos where the tokenizer has no bos."""
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if not isinstance(start, int):
        raise APIError(
            "This model's tokenizer has neither a bos nor an eos token to start an empty prompt from.",
            param="prompt",
        )
    return [start]


def is_prompt_learning(model: nn.Module) -> bool:
    return isinstance(model, PeftModel) and model.active_peft_config.is_prompt_learning


def vocabulary_size(model: nn.Module) -> int:
    """How many scores the model gives each position: the token ids `logit_bias` may name."""
    embeddings = model.get_output_embeddings()  # pyright: ignore[reportCallIssue]
    assert isinstance(embeddings, nn.Module)
    weight = embeddings.weight
    assert isinstance(weight, torch.Tensor)
    return weight.shape[0]


def checked_logit_bias(bias: dict[int, float], vocabulary: int) -> dict[int, float]:
    outside = [token for token in bias if not 0 <= token < vocabulary]
    if outside:
        raise APIError(
            f"logit_bias names token {outside[0]}, which is not in this model's vocabulary "
            f"(ids 0 to {vocabulary - 1}).",
            param="logit_bias",
        )
    return bias


def context_length(model: nn.Module) -> int | None:
    """Positions left for prompt and completion: the model's maximum, less a prompt method's virtual
    tokens."""
    config = getattr(model, "config", None)
    limit = getattr(config.get_text_config(), "max_position_embeddings", None) if config else None
    peft_config = model.active_peft_config if isinstance(model, PeftModel) else None
    if limit is not None and isinstance(peft_config, PromptLearningConfig):
        limit -= peft_config.num_virtual_tokens
    return limit


@torch.no_grad()
def classifier_probabilities(served: Served, texts: list[str]) -> np.ndarray:
    """Class probabilities per text: one text per forward pass, so no padding convention (left for
    decoders, right for encoders) can differ from training's."""
    if hasattr(served.model, "predict_proba"):  # feature extraction: embeddings + logistic regression
        probabilities: np.ndarray = served.model.predict_proba(texts)
        return probabilities
    limit = served.max_seq_length or served.tokenizer.model_max_length
    rows = []
    for text in texts:
        input_ids = encode(served.tokenizer, text, limit)[0]["input_ids"]
        ids = torch.tensor([input_ids], device=next(served.model.parameters()).device)
        logits = served.model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
        rows.append(logits.float().softmax(dim=-1)[0].cpu().numpy())
    return np.stack(rows)
