"""The vLLM engine (`ftjobs serve --engine vllm`, FTJOBS_INFERENCE_ENGINE=vllm): base models and their LoRA
adapters generate in vLLM's engine (the v1 `AsyncLLM`, one per base, LoRA enabled, adapters loaded at run
time by name through `LoRARequest`); everything else about a request stays ftjobs':

- It is the same `Engine` with another `_generate`: the request is parsed, checked (`checked_sampling`),
  turned into prompt tokens with the same tokenizer and chat template, and shaped and streamed by the same
  code, so routes, limits, errors and response shapes cannot differ between the engines.
- Each choice is one vLLM request of one row, returning token ids only; our `Row` decodes them and applies
  `stop` and end-of-sequence exactly as the default engine does, and a finished or cancelled row aborts its
  vLLM request at once.
- Artifacts vLLM cannot take as LoRA adapters (dora, ia3, prompt methods, full, freeze, bitfit,
  classifiers) are served by the default engine in this same process, loaded only when first asked for.

vLLM is an optional install (docs/models.md); importing this module without it raises ImportError.
"""
# vLLM is absent where `make lint` usually runs; where it is installed, this module is checked against it.
# pyright: reportMissingImports=false

import asyncio
import itertools
import json
import threading
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any

from transformers import AutoConfig, GenerationConfig, PreTrainedTokenizerBase
from vllm import SamplingParams
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.inputs import TokensPrompt
from vllm.lora.request import LoRARequest
from vllm.sampling_params import RequestOutputKind
from vllm.v1.engine.async_llm import AsyncLLM

from inference.engine import Engine, adjusts_scores, checked_sampling, expect_kind
from inference.generation import OnEvent, Output, Row, Sampling, generation_eos
from inference.store import TOKENIZER_FILES, shares_base
from models.errors import APIError
from models.inference import ChatCompletionRequest, CompletionRequest, Target
from models.settings import Settings
from worker.training.loading import load_tokenizer

CANCEL_POLL_SECONDS = 0.25
"""How often a waiting request checks whether its client left."""
SEED_MODULUS = 2**63
"""Row r of a seeded request samples with seed + r (mod this), so its `n` choices differ."""


def engine_args(settings: Settings, base_path: str) -> AsyncEngineArgs:
    """ftjobs' defaults for one base, under what FTJOBS_INFERENCE_VLLM_ARGS overrides."""
    options: dict[str, Any] = {
        "model": base_path,
        "skip_tokenizer_init": True,  # ftjobs tokenizes and decodes: vLLM sees and returns token ids only
        "enable_lora": True,
        "max_loras": settings.inference_adapter_cache,
        "max_cpu_loras": settings.inference_adapter_cache,
        "max_lora_rank": 16,  # vLLM pads every adapter to it: on CPU its cost grows with it (docs)
        "seed": 0,
    }
    return AsyncEngineArgs(**{**options, **settings.inference_vllm_args})


class Base:
    """One base model in vLLM, with the tokenizer and end-of-sequence ids ftjobs reads it with."""

    def __init__(self, settings: Settings, path: str) -> None:
        self.tokenizer = load_tokenizer(path)
        try:
            generation_config: GenerationConfig | None = GenerationConfig.from_pretrained(path)
        except OSError:  # no generation_config.json: the tokenizer's eos alone ends an answer
            generation_config = None
        self.eos = generation_eos(generation_config, self.tokenizer)
        config = AutoConfig.from_pretrained(path, trust_remote_code=False).get_text_config()
        self.room: int | None = getattr(config, "max_position_embeddings", None)
        self.llm = AsyncLLM.from_engine_args(engine_args(settings, path))
        if self.llm.model_config.max_model_len is not None:
            self.room = min(
                self.room or self.llm.model_config.max_model_len, self.llm.model_config.max_model_len
            )


class VLLMEngine(Engine):
    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.settings = settings
        self.vllm_bases: dict[str, Base] = {}
        self._adapters: dict[str, tuple[LoRARequest, PreTrainedTokenizerBase | None]] = {}
        """By artifact key: the adapter's vLLM request and the tokenizer it carries."""
        self._ids = itertools.count(1)
        self._mutex = threading.Lock()
        self._base_lock = threading.Lock()
        """Held while a base loads into vLLM (a minute and more): one load at a time."""
        self._loop = asyncio.new_event_loop()
        threading.Thread(target=self._loop.run_forever, name="vllm-engine", daemon=True).start()

    def close(self) -> None:
        for base in self.vllm_bases.values():
            base.llm.shutdown()
        self._loop.call_soon_threadsafe(self._loop.stop)

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
        expect_kind(target, "causal_lm")
        adapter = None if target.artifact_key is None else self._adapter(target)
        if adjusts_scores(request) or (target.artifact_key is not None and adapter is None):
            # A request reading or changing each draw's scores, or an adapter that is not LoRA: ftjobs' own
            # engine serves it (docs/models.md).
            return super()._generate(target, request, prompts_of, organization, on_ready, on_event, cancelled)
        lora, tokenizer = adapter if adapter is not None else (None, None)
        base = self._base(target.base_path)
        tokenizer = tokenizer or base.tokenizer
        prompts = prompts_of(tokenizer)
        sampling, limits = checked_sampling(
            request, prompts, base.room, tokenizer, base.eos, base.llm.model_config.get_vocab_size()
        )
        rows = [
            (prompt, limit, Row(tokenizer, sampling, base.eos), row_seed(request.seed, row))
            for prompt, limit in zip(prompts, limits, strict=True)
            for row in range(sampling.n)
        ]
        work = asyncio.run_coroutine_threadsafe(self._rows(base, lora, sampling, rows, on_event), self._loop)
        if on_ready is not None:
            on_ready(len(rows))
        wait(work, cancelled)
        outputs = [row.output() for _, _, row, _ in rows]
        return [len(prompt) for prompt in prompts], outputs

    async def _rows(
        self,
        base: Base,
        lora: LoRARequest | None,
        sampling: Sampling,
        rows: list[tuple[list[int], int, Row, int | None]],
        on_event: OnEvent | None,
    ) -> None:
        await asyncio.gather(
            *(
                self._row(base, lora, sampling, index, prompt, limit, row, seed, on_event)
                for index, (prompt, limit, row, seed) in enumerate(rows)
            )
        )

    async def _row(
        self,
        base: Base,
        lora: LoRARequest | None,
        sampling: Sampling,
        index: int,
        prompt: list[int],
        limit: int,
        row: Row,
        seed: int | None,
        on_event: OnEvent | None,
    ) -> None:
        """One choice: vLLM's tokens as they come, through `row` (stop strings, eos); the vLLM request is
        aborted (by leaving its generator) as soon as the row is done."""
        params = SamplingParams(
            n=1,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            max_tokens=limit,
            seed=seed,
            stop_token_ids=sorted(base.eos),
            detokenize=False,
            output_kind=RequestOutputKind.DELTA,
        )
        request_id = f"ftjobs-{next(self._ids)}"
        generated = base.llm.generate(
            TokensPrompt(prompt_token_ids=prompt), params, request_id, lora_request=lora
        )
        try:
            async for output in generated:
                for token in output.outputs[0].token_ids:
                    delta = row.add(token, last=len(row.token_ids) + 1 >= limit)
                    if on_event is not None and delta:
                        on_event(index, delta, None, [])
                    if row.finish is not None:
                        break
                if row.finish is not None:
                    break
        finally:
            await generated.aclose()  # aborts the request in vLLM if it is still running
        if row.finish is None:  # vLLM ended it first (its own length cap)
            row.finish = "length"
        if on_event is not None:
            on_event(index, "", row.finish, [])

    def _base(self, path: str) -> Base:
        with self._mutex:
            base = self.vllm_bases.get(path)
        if base is None:
            with self._base_lock:
                base = self.vllm_bases.get(path)
                if base is None:
                    base = Base(self.settings, path)
                    with self._mutex:
                        self.vllm_bases[path] = base
        return base

    def _adapter(self, target: Target) -> tuple[LoRARequest, PreTrainedTokenizerBase | None] | None:
        """The target's vLLM LoRA request and its own tokenizer (None: the base's), or None when it is not
        an adapter vLLM takes. Checked as the default engine checks artifacts, once per adapter."""
        assert target.artifact_key is not None
        with self._mutex:
            known = self._adapters.get(target.artifact_key)
        if known is not None:
            return known
        directory, method, _ = self.models.checked_artifact(target)
        if not shares_base(method, target):
            return None
        rank = lora_rank(directory)
        limit = int(engine_args(self.settings, target.base_path).max_lora_rank)
        if rank > limit:
            raise APIError(
                f"Model {target.model!r} has LoRA rank {rank}, above this vLLM server's max_lora_rank "
                f"{limit} (FTJOBS_INFERENCE_VLLM_ARGS).",
                param="model",
                code="model_not_supported",
            )
        tokenizer = (
            load_tokenizer(str(directory))
            if any((directory / f).is_file() for f in TOKENIZER_FILES)
            else None
        )
        with self._mutex:
            lora = LoRARequest(target.artifact_key, next(self._ids), str(directory))
            self._adapters[target.artifact_key] = lora, tokenizer
        return lora, tokenizer


def wait(work: "Future[None]", cancelled: threading.Event | None) -> None:
    """Wait for the rows; if the client leaves meanwhile, cancel them (their vLLM requests are aborted)."""
    while True:
        try:
            return work.result(timeout=CANCEL_POLL_SECONDS)
        except FutureTimeout:
            if cancelled is not None and cancelled.is_set():
                work.cancel()
                return


def row_seed(seed: int | None, row: int) -> int | None:
    return None if seed is None else (seed + row) % SEED_MODULUS


def lora_rank(directory: Path) -> int:
    """The largest rank in the adapter's config (its `r`, or a larger one in its `rank_pattern`)."""
    config = json.loads((directory / "adapter_config.json").read_text())
    return max([int(config.get("r", 0)), *map(int, (config.get("rank_pattern") or {}).values())])
