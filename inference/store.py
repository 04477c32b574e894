"""Models in memory: every base model loaded once per process, the artifacts trained on it on top.

- LoRA adapters (lora, qlora; a qlora adapter runs on the unquantised base) of causal LMs all stay loaded
  on their shared base, one PeftModel per base: rows of one batch pick theirs by name (peft's mixed-adapter
  batches, `inference.batching`, each LoRA Linear layer batched across adapters by `inference.mixed_lora`),
  the base's own rows by "__base__".
- A new adapter's weights are copied into a spare slot (peft's `hotswap_adapter`, ~50 ms) rather than
  injected (`load_adapter`, 200-600 ms, growing with the adapters loaded). An evicted adapter's slot becomes
  the spare once no running row uses it; otherwise a background thread injects one, shaped like the last
  adapter, after each first use. Ranks, alphas and dropouts may differ between an adapter and its slot; one
  the slot can't take (a module the slot lacks) is injected as before, and the misfit spare dropped.
- Every other artifact (DoRA, which peft can't mix in a batch, ia3, prompt methods, full, freeze, bitfit,
  every classifier, feature_extraction) is a dedicated model: a fresh load of the base plus the training
  method's `load` hook.
- Both kinds share one LRU of `settings.inference_adapter_cache` entries.
- A base's lock is held while its adapters change and for each step of its batch, never for a whole
  request; an adapter in use by a running request is released only when that request ends.
- An artifact goes on a base only if its `lineage.json` names that base's content hash.
"""

import copy
import json
import logging
import tempfile
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peft import LoraConfig, PeftModel
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils.hotswap import hotswap_adapter
from pydantic import BaseModel, ValidationError
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from inference.mixed_lora import MixedLoRA
from models.base_store import local_base
from models.errors import APIError
from models.inference import Target
from models.lineage import LINEAGE_FILE, BaseModelRef, tokenizer_hash
from models.registry import content_hash
from models.settings import Settings
from models.spec import METHODS
from models.storage import open_store
from worker.training.device import DeviceConfig, select_device
from worker.training.loading import load_model, load_tokenizer, refuse_pickle_weights
from worker.training.methods import get_method
from worker.training.objectives.classification import LABELS_FILE

BASE_ADAPTER = "__base__"
"""peft's name, in a mixed-adapter batch, for a row on the base itself."""
log = logging.getLogger("ftjobs.inference")
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json")


def shares_base(method: str, target: Target) -> bool:
    """Whether the artifact is a LoRA-family adapter that rides on its shared base (else: dedicated)."""
    return method in METHODS and METHODS[method].shares_base and target.kind == "causal_lm"


class ServingLineage(BaseModel):
    """What serving reads of `lineage.json` (`models.lineage.Lineage`); the other fields describe the job,
    and lineage files that have more or fewer of those still serve."""

    base_model: BaseModelRef
    training_type: str
    hyperparameters: dict[str, object] = {}


@dataclass
class Served:
    """A model ready for one request."""

    model: Any
    """An `nn.Module`, or a feature-extraction classifier."""
    tokenizer: PreTrainedTokenizerBase
    labels: list[str] | None = None
    max_seq_length: int | None = None
    """Where classifier inputs are cut, as in training."""
    lock: threading.Lock = field(default_factory=threading.Lock)
    """Held while using the model or its tokenizer: a shared base's lock, or the dedicated model's own."""
    adapter: str | None = None
    """On a shared base: the adapter's name, or BASE_ADAPTER; None on a dedicated model."""
    current: Callable[[], Any] | None = None
    """A shared base's model as it is now (it becomes a PeftModel when adapters come); None: `model`."""

    def now(self) -> Any:
        return self.current() if self.current is not None else self.model


@dataclass
class Base:
    """A base model shared by the adapters hot-swapped on it."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    content_hash: str
    peft: PeftModel | None = None
    """The one PeftModel wrapping `model` while any adapter is loaded."""
    pending: list[str] = field(default_factory=list)
    """Adapters evicted while in use or while this base was busy: released once neither holds."""
    spare: str | None = None
    """A slot in `peft` no cached adapter uses, its weights stale: the next new adapter is copied into it."""
    shape: LoraConfig | None = None
    """The config of the last adapter put on this base: the shape of the next spare injected."""
    layers: list[BaseTunerLayer] = field(default_factory=list)
    """The adapter layers in `peft`, so a swap visits them alone (peft's set_adapter walks every module)."""
    mixed: MixedLoRA = field(default_factory=MixedLoRA)
    """The batched forward of `peft`'s mixed-adapter batches."""

    def refresh_layers(self) -> None:
        """After the adapters changed: the layers as they are now, and no batch plan of the old ones."""
        self.layers = [m for m in self.peft.modules() if isinstance(m, BaseTunerLayer)] if self.peft else []
        self.mixed.install(self.layers)  # the LoRA Linear layers are among them

    def activate(self, name: str) -> None:
        """What `PeftModel.set_adapter(name)` does for inference, on the cached layers; nothing when `name` is
        already active. peft's layer `set_adapter` also re-flags `requires_grad` on every loaded adapter's
        weights, most of a swap's cost and needless here: adapters load frozen and are never trained. It
        touches peft's `_active_adapter`; the tests that compare every answer with its adapter loaded alone
        catch a peft release that changes it."""
        assert self.peft is not None
        if self.peft.active_adapter == name:
            return
        for layer in self.layers:
            layer._active_adapter = [name]
        tuner = self.peft.base_model
        assert isinstance(tuner, BaseTuner)  # LoRA's (LoraModel), as every hot-swapped adapter is a LoRA
        tuner.active_adapter = name
        self.peft.active_adapter = name

    def swap_into_spare(self, directory: Path, device: str) -> str | None:
        """Copy the adapter in `directory` into the spare slot and return the slot's name. None if there is
        no spare, or if the adapter doesn't fit it: then the spare is dropped, so the next one injected has
        the shape of the adapters now coming."""
        name = self.spare
        if name is None or self.peft is None:
            return None
        # ModelStore._load checked already, but hotswap_adapter would torch.load a pickle: check at the call.
        refuse_pickle_weights(directory)
        config = LoraConfig.from_pretrained(str(directory))
        assert isinstance(config, LoraConfig)  # peft loads the class the file names: a LoRA
        self.spare = None
        try:
            # peft checks the new config against the active adapter's. What it compares can differ here:
            # the swap recomputes the scaling (rslora, alpha and rank patterns) from the new config, and
            # dropout is off at inference. So the spare takes the new config and becomes the active one.
            self.peft.peft_config[name] = config
            self.activate(name)
            hotswap_adapter(self.peft, str(directory), adapter_name=name, torch_device=device)
        except (ValueError, RuntimeError):  # a module the slot lacks
            self.delete_adapter(name)
            return None
        self.mixed.forget()
        return name

    def lora_config(self, name: str) -> LoraConfig:
        """The config of the adapter in slot `name`: every hot-swapped adapter is a LoRA."""
        assert self.peft is not None
        config = self.peft.peft_config[name]
        if not isinstance(config, LoraConfig):
            raise TypeError(f"adapter slot {name!r} holds a {type(config).__name__}, not a LoRA")
        return config

    def release(self, name: str) -> None:
        """An evicted adapter's slot: kept as the spare if there is none, else deleted."""
        if self.spare is None:
            self.spare = name
        else:
            self.delete_adapter(name)

    def delete_adapter(self, name: str) -> None:
        assert self.peft is not None
        self.peft.delete_adapter(name)
        if not self.peft.peft_config:
            # PeftModel cannot run without an adapter: give the plain base back.
            self.model, self.peft = self.peft.unload(), None
        self.refresh_layers()


@dataclass(frozen=True)
class AdapterEntry:
    base_path: str
    name: str
    tokenizer: PreTrainedTokenizerBase


@dataclass(frozen=True)
class DedicatedEntry:
    served: Served


class ModelStore:
    def __init__(self, settings: Settings, device: DeviceConfig | None = None) -> None:
        self.artifacts = open_store(settings)
        self.capacity = settings.inference_adapter_cache
        self.device = device or select_device()
        self.bases: dict[str, Base] = {}
        self.cache: OrderedDict[tuple[str, str], AdapterEntry | DedicatedEntry] = OrderedDict()
        self._hashes: dict[str, str] = {}
        self._base_dirs: dict[str, str] = {}
        """Each base's directory on this machine, by content hash (with object storage: in the node cache)."""
        self._tokenizers: dict[tuple[str, str], PreTrainedTokenizerBase] = {}
        """By base and tokenizer_hash: the adapters trained on one base share its tokenizer's files."""
        self._locks: dict[str, threading.Lock] = {}
        self._pins: Counter[tuple[str, str]] = Counter()
        """Requests running per adapter, by base and adapter name: an evicted adapter waits for them."""
        self._mutex = threading.Lock()
        """Guards the dictionaries above (never held while computing)."""
        self._names = 0
        self.background = ThreadPoolExecutor(1, thread_name_prefix="inference-spare")
        """Injects spare adapter slots, one base at a time, off the requests' path."""

    @contextmanager
    def serving(self, target: Target) -> Iterator[Served]:
        """The target's model for the duration of one request. The base's lock is held only to find or
        load it; an adapter stays loaded (pinned) until the request ends."""
        target = self._localized(target)
        lock = self.lock(target.base_path)
        with lock:
            self._delete_pending(target.base_path)
            served, pin = self._resolve(target, lock)
            if pin is not None:
                with self._mutex:
                    self._pins[pin] += 1
        try:
            yield served
        finally:
            if pin is not None:
                with self._mutex:
                    self._pins[pin] -= 1
                with lock:
                    self._delete_pending(target.base_path)

    def _localized(self, target: Target) -> Target:
        """The target with its base at a directory on this machine (fetched from object storage once)."""
        if target.base_content_hash is None:
            return target
        with self._mutex:
            known = self._base_dirs.get(target.base_content_hash)
        if known is None or not Path(known).is_dir():  # a cache entry can be evicted once its base unloads
            known = local_base(self.artifacts, target.base_path, target.base_content_hash)
            with self._mutex:
                self._base_dirs[target.base_content_hash] = known
        return target.model_copy(update={"base_path": known})

    def _resolve(self, target: Target, lock: threading.Lock) -> tuple[Served, tuple[str, str] | None]:
        """The served model and, for an adapter on a shared base, its pin (the caller holds `lock`)."""
        if target.artifact_key is None:
            if target.kind == "classification":
                raise APIError(
                    f"Model {target.model!r} is a base model without a classifier head.",
                    param="model",
                    code="model_not_supported",
                )
            base = self._base(target.base_path)
            return self._on_base(base, base.tokenizer, BASE_ADAPTER, lock), None
        key = (target.base_path, target.artifact_key)
        entry = self._cached(key)
        if entry is None:
            entry = self._load(target)
            self._remember(key, entry, target.base_path)
        if isinstance(entry, DedicatedEntry):
            return entry.served, None
        base = self.bases[target.base_path]
        return self._on_base(base, entry.tokenizer, entry.name, lock), (target.base_path, entry.name)

    @staticmethod
    def _on_base(
        base: Base, tokenizer: PreTrainedTokenizerBase, adapter: str, lock: threading.Lock
    ) -> Served:
        return Served(
            base.peft or base.model,
            tokenizer,
            lock=lock,
            adapter=adapter,
            current=lambda: base.peft or base.model,
        )

    def _load(self, target: Target) -> AdapterEntry | DedicatedEntry:
        directory, method, lineage = self.checked_artifact(target)
        tokenizer_dir = directory if any((directory / f).is_file() for f in TOKENIZER_FILES) else None
        if shares_base(method, target):
            base = self._base(target.base_path)
            tokenizer = self._tokenizer(target.base_path, tokenizer_dir) if tokenizer_dir else base.tokenizer
            name = base.swap_into_spare(directory, str(self.device.device))
            if name is None:
                name = self._new_name()
                refuse_pickle_weights(directory)  # checked_artifact did; peft would torch.load a pickle here
                if base.peft is None:
                    base.peft = PeftModel.from_pretrained(base.model, directory, adapter_name=name).eval()
                else:
                    base.peft.load_adapter(directory, adapter_name=name)
                base.refresh_layers()
            base.shape = base.lora_config(name)
            self.background.submit(self._inject_spare, target.base_path)
            return AdapterEntry(target.base_path, name, tokenizer)
        tokenizer = load_tokenizer(str(tokenizer_dir or target.base_path))
        return DedicatedEntry(self._dedicated(target, directory, method, tokenizer, lineage))

    def checked_artifact(self, target: Target) -> tuple[Path, str, ServingLineage]:
        """The target's artifact directory, the method that made it and its lineage, once it is known to
        be servable on the target's base: present, free of pickle weights, trained on this very base."""
        assert target.artifact_key is not None
        directory = self.artifacts.local_path(target.artifact_key)
        if not directory.is_dir():
            raise APIError(
                f"The artifact of model {target.model!r} is missing from the artifact store.",
                status_code=404,
                param="model",
                code="model_not_found",
            )
        try:
            refuse_pickle_weights(directory)
        except ValueError as exc:
            raise APIError(str(exc), param="model", code="model_not_supported") from exc
        lineage = read_lineage(directory, target.model)
        expected = self.content_hash(target.base_path)
        if lineage.base_model.content_hash != expected:
            raise APIError(
                f"Model {target.model!r} was trained on base {lineage.base_model.name!r} with content hash "
                f"{lineage.base_model.content_hash}, but the base at this name now has content hash "
                f"{expected}; refusing to serve it on a different base.",
                param="model",
                code="model_mismatch",
            )
        return directory, target.method or lineage.training_type, lineage

    def _dedicated(
        self,
        target: Target,
        directory: Path,
        method: str,
        tokenizer: PreTrainedTokenizerBase,
        lineage: ServingLineage,
    ) -> Served:
        if method == "feature_extraction":
            if target.kind != "classification":
                raise APIError(
                    f"Model {target.model!r} is a classifier.", param="model", code="model_not_supported"
                )
            # Imported here: scikit-learn loads only in a server that serves such a model.
            from worker.training.feature_extraction import load_feature_extraction

            classifier = load_feature_extraction(directory, target.base_path, self.device)
            return Served(classifier, classifier.tokenizer, classifier.labels)
        try:
            load = get_method(method).load
        except ValueError as exc:
            raise APIError(str(exc), param="model", code="model_not_supported") from exc
        auto_class: Any = AutoModelForCausalLM
        options: dict[str, Any] = {}
        labels: list[str] | None = None
        if target.kind == "classification":
            labels = read_labels(directory, target.model)
            # The head as training built it (see load_classifier): one output per label, named.
            auto_class = AutoModelForSequenceClassification
            options = {
                "num_labels": len(labels),
                "id2label": dict(enumerate(labels)),
                "label2id": {label: index for index, label in enumerate(labels)},
                "pad_token_id": tokenizer.pad_token_id,
            }

        def load_base(path: Path | None = None) -> PreTrainedModel:
            return load_model(str(path or target.base_path), self.device, auto_class=auto_class, **options)

        model = load(load_base, directory).eval()
        max_seq_length = lineage.hyperparameters.get("max_seq_length")
        return Served(model, tokenizer, labels, max_seq_length if isinstance(max_seq_length, int) else None)

    def settle(self, timeout: float | None = None) -> None:
        """Wait until the spare slots being injected are in (each waits for its base's lock)."""
        self.background.submit(lambda: None).result(timeout)

    def _new_name(self) -> str:
        # The trailing "_": peft's hotswap finds a slot's tensors by substring, and "adapter1" is in
        # "adapter12".
        with self._mutex:
            self._names += 1
            return f"adapter{self._names}_"

    def _inject_spare(self, base_path: str) -> None:
        """Give the base a spare slot shaped like its last adapter, unless it has one or no adapters."""
        with self.lock(base_path):
            base = self.bases[base_path]
            if base.spare is not None or base.peft is None or base.shape is None:
                return
            name = self._new_name()
            try:
                base.peft.add_adapter(name, copy.deepcopy(base.shape))
            except Exception:  # in a thread no one waits on: a new adapter will be injected instead
                log.exception("could not add a spare adapter slot to %s", base_path)
                return
            # add_adapter leaves the new modules in training mode: its dropout would run at inference.
            base.peft.eval().requires_grad_(False)
            base.refresh_layers()
            base.spare = name

    def _base(self, path: str) -> Base:
        """The shared base at `path`, loaded on first use (the caller holds its lock)."""
        base = self.bases.get(path)
        if base is None:
            model = load_model(path, self.device).eval()
            tokenizer = load_tokenizer(path)
            with tempfile.TemporaryDirectory() as saved:
                # Artifacts carry the tokenizer as training saved it, not byte for byte the base's files:
                # hashed alike, the adapters that kept it share this one instead of loading their own.
                tokenizer.save_pretrained(saved)
                key = (path, tokenizer_hash(Path(saved)))
            with self._mutex:
                self._tokenizers.setdefault(key, tokenizer)
            base = Base(model, tokenizer, self.content_hash(path))
            self.bases[path] = base
        return base

    def _tokenizer(self, base_path: str, directory: Path) -> PreTrainedTokenizerBase:
        """The tokenizer an adapter carries, loaded once per distinct set of files."""
        key = (base_path, tokenizer_hash(directory))
        with self._mutex:
            known = self._tokenizers.get(key)
        if known is None:
            known = load_tokenizer(str(directory))
            with self._mutex:
                self._tokenizers[key] = known
        return known

    def content_hash(self, path: str) -> str:
        with self._mutex:
            known = self._hashes.get(path)
        if known is None:
            known = content_hash(Path(path))
            with self._mutex:
                self._hashes[path] = known
        return known

    def lock(self, base_path: str) -> threading.Lock:
        with self._mutex:
            return self._locks.setdefault(base_path, threading.Lock())

    def _cached(self, key: tuple[str, str]) -> AdapterEntry | DedicatedEntry | None:
        with self._mutex:
            entry = self.cache.get(key)
            if entry is not None:
                self.cache.move_to_end(key)
            return entry

    def _remember(self, key: tuple[str, str], entry: AdapterEntry | DedicatedEntry, holding: str) -> None:
        """Add an entry; evict the least recently used beyond capacity. `holding`: the base whose lock the
        caller has."""
        with self._mutex:
            self.cache[key] = entry
            evicted = []
            while len(self.cache) > self.capacity:
                evicted.append(self.cache.popitem(last=False)[1])
        for old in evicted:
            if isinstance(old, DedicatedEntry):
                continue  # dropped with its last reference (a request still using it keeps it alive)
            base = self.bases[old.base_path]
            with self._mutex:
                base.pending.append(old.name)
            if old.base_path == holding:
                self._delete_pending(holding)
                continue
            lock = self.lock(old.base_path)
            if lock.acquire(blocking=False):  # else that base's next request or step releases it
                try:
                    self._delete_pending(old.base_path)
                finally:
                    lock.release()

    def _delete_pending(self, base_path: str) -> None:
        """Release the evicted adapters no running request uses (the caller holds the base's lock)."""
        base = self.bases.get(base_path)
        if base is None:
            return
        with self._mutex:
            free = [name for name in base.pending if not self._pins[(base_path, name)]]
            base.pending = [name for name in base.pending if name not in free]
        for name in free:
            base.release(name)


def read_lineage(directory: Path, model: str) -> ServingLineage:
    path = directory / LINEAGE_FILE
    if not path.is_file():
        raise APIError(
            f"Model {model!r} has no {LINEAGE_FILE}, so the base it was trained on cannot be checked; "
            "refusing to serve it.",
            param="model",
            code="missing_lineage",
        )
    try:
        return ServingLineage.model_validate_json(path.read_bytes())
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(map(str, error["loc"]))
        raise APIError(
            f"Model {model!r} has an invalid {LINEAGE_FILE}: {where}: {error['msg']}",
            param="model",
            code="missing_lineage",
        ) from exc


def read_labels(directory: Path, model: str) -> list[str]:
    path = directory / LABELS_FILE
    if not path.is_file():
        raise APIError(
            f"Classifier {model!r} has no {LABELS_FILE}.", param="model", code="model_not_supported"
        )
    labels: list[str] = json.loads(path.read_text(encoding="utf-8"))["labels"]
    return labels
