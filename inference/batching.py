"""Continuous batching: requests for one model share its forward passes.

- One scheduler thread per model in use (a shared base with all its adapters, or a dedicated model). Each
  step it admits waiting requests (one prefill for their rows), decodes one token for every row in the batch
  in one forward pass, and retires the rows that finished or whose client left. It exits when idle.
- Rows of different lengths share one left-padded `DynamicCache`, with an attention mask and per-row
  position ids: joining rows are padded to the batch's length (or the batch to theirs), leaving rows are
  sliced out and the padding no row needs any more is cut.
- Rows may use different LoRA adapters of the base and the bare base: peft's mixed-adapter batches
  (`adapter_names`, "__base__" for the base), whose LoRA Linear layers `inference.mixed_lora` runs.
- An idle batch's first prefill waits a few milliseconds while requests keep arriving, so that a burst
  shares one prefill rather than all but its first waiting for the first's (`_gather`).
- Each request draws its samples from its own `torch.Generator`, row after row in a fixed order, so a seed
  gives the same answer whatever shares the batch.
- Fair between organisations: admission takes one request per organisation in turn, starting after the
  organisation served last, and an organisation with no row in the batch is admitted at the next step
  even when the batch is full, so a flood from one cannot hold back another's first token.
- At most `max_queue` requests wait for admission across the server: the next gets a 429.
"""

import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache, PretrainedConfig, PreTrainedTokenizerBase
from transformers.cache_utils import DynamicLayer

from inference.generation import OnEvent, Output, Row, Sampling, choose_tokens
from models.errors import APIError

BASE_ADAPTER = "__base__"
"""peft's name for a row that runs on the base without any adapter."""
MAX_BATCH_ROWS = 64
"""Rows past which only organisations with no row in the batch are admitted."""
RETRY_AFTER_SECONDS = 1
GATHER_GAP, GATHER_MAX = 0.005, 0.05
"""An idle batch's first prefill waits for arrivals this far apart (seconds), this long at most."""


@dataclass(eq=False)
class Job:
    """One request's rows (its prompts, each `n` times) and how they are sampled and reported."""

    organization: str
    prompts: list[list[int]]
    """One prompt per row."""
    limits: list[int]
    """Each row's max_new_tokens."""
    sampling: Sampling
    generator: torch.Generator
    tokenizer: PreTrainedTokenizerBase
    eos: set[int]
    adapter: str | None
    """The row's adapter on a shared base (BASE_ADAPTER for the base); None on a dedicated model."""
    model: Callable[[], nn.Module]
    """The model to run, as it is at each step (a shared base becomes a PeftModel when adapters come)."""
    lock: threading.Lock
    """Held for each step: the store changes a shared base's adapters only between steps."""
    on_event: OnEvent | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None
    rows: list[Row] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.rows = [Row(self.tokenizer, self.sampling, self.eos) for _ in self.prompts]

    def outputs(self) -> list[Output]:
        if self.error is not None:
            raise self.error
        return [row.output() for row in self.rows]


@dataclass(eq=False)
class _Slot:
    job: Job
    index: int
    """The row's index in its job."""
    token: int = 0
    """The row's last token: the next step's input."""

    @property
    def row(self) -> Row:
        return self.job.rows[self.index]


class Batcher:
    """The batch of one model, and its scheduler thread while it has work."""

    def __init__(self, owner: "Batching", key: object) -> None:
        self.owner, self.key = owner, key
        self.queues: OrderedDict[str, deque[Job]] = OrderedDict()
        """Waiting jobs by organisation; the first organisation is admitted first."""
        self.slots: list[_Slot] = []
        self.cache: DynamicCache | None = None
        self.mask = torch.zeros(0, 0, dtype=torch.long)
        self.positions = torch.zeros(0, dtype=torch.long)
        self.running = False

    def add(self, job: Job) -> None:
        """Queue a job (the owner's lock is held) and start the thread if it is idle."""
        self.queues.setdefault(job.organization, deque()).append(job)
        if not self.running:
            self.running = True
            threading.Thread(target=self._run, name="inference-batch", daemon=True).start()

    def _run(self) -> None:
        self._gather()
        while True:
            with self.owner.mutex:
                admitted = self._admit()
                if not admitted and not self.slots:
                    self.running = False
                    self.owner.forget(self)
                    return
            self._step(admitted)

    def _gather(self) -> None:
        """Let a burst's arrivals in before the first prefill: requests that come together (each tokenized
        in its caller's thread first) then share one prefill, instead of all but the first waiting for the
        first's. Waits while jobs keep coming GATHER_GAP apart, at most GATHER_MAX."""
        deadline = time.monotonic() + GATHER_MAX
        waiting = -1
        while time.monotonic() < deadline:
            with self.owner.mutex:
                now = sum(map(len, self.queues.values()))
            if now == waiting:
                return
            waiting = now
            time.sleep(GATHER_GAP)

    def _admit(self) -> list[Job]:
        """Jobs to join the batch now, one organisation at a time (the owner's lock is held)."""
        admitted: list[Job] = []
        rows = len(self.slots)
        present = {slot.job.organization for slot in self.slots}
        if self.slots and not self.owner.mergeable(self.slots[0].job):
            return admitted  # a cache that can't be re-padded: one job at a time
        progress = True
        while progress and self.queues:
            progress = False
            for organization in list(self.queues):
                queue = self.queues[organization]
                job = queue[0]
                if (
                    job.cancelled.is_set()
                    or rows + len(job.prompts) <= MAX_BATCH_ROWS
                    or (organization not in present)
                ):
                    queue.popleft()
                    self.owner.waiting -= 1
                    if not queue:
                        del self.queues[organization]
                    else:
                        self.queues.move_to_end(organization)
                    if job.cancelled.is_set():
                        job.done.set()
                        continue
                    admitted.append(job)
                    rows += len(job.prompts)
                    present.add(organization)
                    progress = True
                    if not self.owner.mergeable(job):
                        return admitted
        return admitted

    def _step(self, admitted: list[Job]) -> None:
        jobs = {slot.job for slot in self.slots} | set(admitted)
        lead = admitted[0] if admitted else self.slots[0].job
        try:
            with lead.lock, torch.no_grad():
                model = lead.model()
                self._retire(cancelled_only=True)
                if admitted:
                    self._prefill(model, admitted)
                if self.slots:
                    self._decode(model)
        except BaseException as error:  # the batch's jobs all fail; the next ones start a new batch
            for job in jobs:
                job.error = error
            self.slots, self.cache = [], None
            self.mask, self.positions = self.mask[:0, :0], self.positions[:0]
        for job in jobs:
            if job.error is not None or job.cancelled.is_set() or all(row.finish for row in job.rows):
                job.done.set()

    def _forward(
        self,
        model: nn.Module,
        slots: list[_Slot],
        ids: torch.Tensor,
        mask: torch.Tensor,
        positions: torch.Tensor,
        **kwargs: Any,
    ) -> Any:
        adapters = [slot.job.adapter for slot in slots]
        if adapters[0] is not None and hasattr(model, "peft_config"):
            kwargs["adapter_names"] = adapters
        device = next(model.parameters()).device
        return model(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            position_ids=positions.to(device),
            use_cache=True,
            **kwargs,
        )

    def _prefill(self, model: nn.Module, jobs: list[Job]) -> None:
        slots = [_Slot(job, index) for job in jobs for index in range(len(job.prompts))]
        prompts = [slot.job.prompts[slot.index] for slot in slots]
        width = max(map(len, prompts))
        ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], dtype=torch.long)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], dtype=torch.long)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        # logits_to_keep: only the last position's logits are drawn from; the LM head over every prompt
        # position would be a fifth of a small model's prefill.
        out = self._forward(
            model, slots, ids, mask, positions, past_key_values=DynamicCache(), logits_to_keep=1
        )
        self._join(slots, out.past_key_values, mask, torch.tensor([len(p) for p in prompts]))
        self._emit(slots, out.logits[:, -1, :])

    def _decode(self, model: nn.Module) -> None:
        ids = torch.tensor([[slot.token] for slot in self.slots], dtype=torch.long)
        mask = torch.cat([self.mask, torch.ones(len(self.slots), 1, dtype=torch.long)], dim=1)
        out = self._forward(model, self.slots, ids, mask, self.positions[:, None], past_key_values=self.cache)
        self.cache, self.mask, self.positions = out.past_key_values, mask, self.positions + 1
        self._emit(self.slots, out.logits[:, -1, :])

    def _emit(self, slots: list[_Slot], logits: torch.Tensor) -> None:
        """Each row's next token, drawn in batch order (a job's rows keep their order), then reported."""
        tokens = choose_tokens(logits, [(slot.job.sampling, slot.job.generator, slot.row) for slot in slots])
        for slot, token in zip(slots, tokens, strict=True):
            row, job = slot.row, slot.job
            slot.token = token
            row.report(
                job.on_event, slot.index, row.add(token, len(row.token_ids) + 1 >= job.limits[slot.index])
            )
        self._retire(cancelled_only=False)

    def _join(
        self, slots: list[_Slot], cache: DynamicCache, mask: torch.Tensor, positions: torch.Tensor
    ) -> None:
        """Add prefilled rows to the batch, left-padding whichever side is shorter."""
        if self.cache is None or not self.slots:
            self.slots, self.cache, self.mask, self.positions = slots, cache, mask, positions
            return
        width = max(self.mask.shape[1], mask.shape[1])
        for mine, theirs in zip(filled_layers(self.cache), filled_layers(cache), strict=True):
            mine.keys = torch.cat([pad_left(mine.keys, width, -2), pad_left(theirs.keys, width, -2)])
            mine.values = torch.cat([pad_left(mine.values, width, -2), pad_left(theirs.values, width, -2)])
        self.mask = torch.cat([pad_left(self.mask, width, -1), pad_left(mask, width, -1)])
        self.positions = torch.cat([self.positions, positions])
        self.slots = self.slots + slots

    def _retire(self, cancelled_only: bool) -> None:
        """Drop rows that finished (unless `cancelled_only`) or whose client left; cut unneeded padding."""
        keep = [
            index
            for index, slot in enumerate(self.slots)
            if not slot.job.cancelled.is_set() and (cancelled_only or slot.row.finish is None)
        ]
        if len(keep) == len(self.slots):
            return
        self.owner.abandoned_rows += sum(slot.job.cancelled.is_set() for slot in self.slots)
        self.slots = [self.slots[index] for index in keep]
        if not keep or self.cache is None:
            self.cache, self.mask, self.positions = None, self.mask[:0, :0], self.positions[:0]
            return
        indices = torch.tensor(keep, dtype=torch.long)
        mask = self.mask[indices]
        start = int(mask.any(dim=0).long().argmax())
        for layer in filled_layers(self.cache):
            device = layer.keys.device
            layer.keys = layer.keys[indices.to(device), :, start:, :]
            layer.values = layer.values[indices.to(device), :, start:, :]
        self.mask, self.positions = mask[:, start:], self.positions[indices]


class KeysValues(Protocol):
    keys: torch.Tensor
    values: torch.Tensor


def filled_layers(cache: DynamicCache) -> list[KeysValues]:
    """A filled cache's layers: keys and values of every position, as batches merge only full-attention
    models' caches (`Batching.mergeable`), whose layers are DynamicLayers."""
    assert all(isinstance(layer, DynamicLayer) and layer.keys is not None for layer in cache.layers)
    return cast(list[KeysValues], cache.layers)


def pad_left(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """`tensor` with zeros before its entries along `dim` (-1 or -2) up to `width`."""
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    return F.pad(tensor, (missing, 0) if dim == -1 else (0, 0, missing, 0))


class Batching:
    """The batchers of one server, and its bound on waiting requests."""

    def __init__(self, max_queue: int) -> None:
        self.max_queue = max_queue
        self.mutex = threading.Lock()
        self.waiting = 0
        self.batchers: dict[object, Batcher] = {}
        self.abandoned_rows = 0
        """Rows dropped from their batch because their client left (or their stream was cancelled)."""

    def rows(self) -> int:
        """Rows now in batches, every model's."""
        with self.mutex:
            return sum(len(batcher.slots) for batcher in self.batchers.values())

    def submit(self, key: object, job: Job, ready: Callable[[], None] | None = None) -> None:
        """Queue `job` on the batch of the model `key` names; a 429 if the server's queue is full, else
        `ready` is called before any row of the job can be reported."""
        with self.mutex:
            if self.waiting >= self.max_queue:
                raise APIError(
                    f"The inference server has {self.waiting} requests waiting; try again shortly.",
                    status_code=429,
                    type="rate_limit_error",
                    code="server_busy",
                    headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
                )
            self.waiting += 1
            if ready is not None:
                ready()
            batcher = self.batchers.get(key)
            if batcher is None:
                batcher = self.batchers[key] = Batcher(self, key)
            batcher.add(job)

    def forget(self, batcher: Batcher) -> None:
        """An idle batcher's thread has ended (the mutex is held): its model may be dropped."""
        if self.batchers.get(batcher.key) is batcher:
            del self.batchers[batcher.key]

    def mergeable(self, job: Job) -> bool:
        """Whether the model's cache can be re-padded: full attention in every layer (a sliding window's
        cache keeps only its last positions)."""
        config = job.model().config
        assert isinstance(config, PretrainedConfig)
        config = config.get_text_config()
        layer_types = getattr(config, "layer_types", None)
        if layer_types:
            return set(layer_types) == {"full_attention"}
        return getattr(config, "sliding_window", None) is None
