"""Adapter serving benchmark: many LoRA adapters hot-swapped on one shared base in the in-process inference
engine (`inference.engine.Engine`), on SmolLM2-135M-Instruct. Not a test.

    python bench/adapter_serving.py [--adapters 10] [--requests 40] [--throughput-requests 20] [--block 5]
                                    [--max-tokens 8] [--throughput-tokens 32] [--swaps 50] [--threads N]
                                    [--model-dir DIR]

The bench builds `--adapters` LoRA adapters of the service's default shape (`lora_config` with the resolved
default hyperparameters: r=8, alpha=16, all linear layers) with seeded random A and non-zero B, so each one
changes the outputs, and saves each as the runner publishes one (adapter, tokenizer, `lineage.json`) into a
temporary artifact store. Settings keep every adapter in the cache. It measures:
1. the added latency of a cached adapter: short greedy chat requests (`--max-tokens`) on one fixed adapter
   (no swap) against requests cycling over all the adapters (a swap every request), in alternating blocks
   of `--block` requests; and the swap alone (`set_adapter`, and the store's whole cache-hit path);
2. first use of an adapter, the base already loaded: the store's attach timed directly (this process), on
   an idle server (the spare slot injected after the last first use is in) and back to back (first uses
   racing the spare's injection), and a first request minus the same request cached (in a fresh child
   process, idle);
3. resident memory of that fresh child with the base loaded and with every adapter loaded;
4. completion tokens/s of requests interleaved over all the adapters against one fixed adapter
   (`--throughput-tokens` per request), in alternating blocks.

With other work on the cores, torch's default threads (one per core) stall each other at every op
(8 tokens took 6 s instead of 0.8 s with one thread here): `--threads 1` keeps such a run meaningful.
"""

import argparse
import gc
import json
import os
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STARTED = time.monotonic()
"""Before the heavy imports below, so the runtime printed is the whole run's."""

# Run as a script, this file's folder comes first on sys.path, where `api.py` would shadow the api package:
# swap it for the repository root, so that `bench._common` imports as it would from anywhere else.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [str(_HERE.parent)] + [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import numpy as np  # noqa: E402
import torch  # noqa: E402
from peft import PeftModel, get_peft_model  # noqa: E402

from bench._common import MODEL, SEED, base_model, machine_facts  # noqa: E402
from inference.engine import Engine  # noqa: E402
from models.hyperparameters import SupervisedHyperparameters, resolve  # noqa: E402
from models.inference import ChatCompletionRequest, ChatMessage, Target  # noqa: E402
from models.lineage import (  # noqa: E402
    LINEAGE_FILE,
    BaseModelRef,
    FileRef,
    Lineage,
    library_versions,
    tokenizer_hash,
)
from models.registry import content_hash  # noqa: E402
from models.settings import Settings  # noqa: E402
from models.storage import LocalArtifactStore  # noqa: E402
from worker.training.device import select_device  # noqa: E402
from worker.training.loading import load_model, load_tokenizer  # noqa: E402
from worker.training.methods.lora import lora_config  # noqa: E402

ADDED_LATENCY_MS = 20.0
FIRST_USE_MS = 300.0
MEMORY_SLACK = 0.10
THROUGHPUT_RATIO = 0.8
B_STD = 0.1
"""Spread of the random lora_B: large enough that every adapter's greedy answer differs, small enough that
the answers stay fluent text (no early end-of-sequence, so every request generates max_tokens)."""
PROMPT = "Tell me a long story about a lighthouse keeper who finds a message in a bottle."
MIB = 1024 * 1024


# --- Adapters -------------------------------------------------------------------------------------------


def build_adapters(model_dir: Path, settings: Settings, count: int) -> tuple[list[Target], int, int]:
    """`count` adapters saved where the store finds them; their targets, the adapter file's size and the
    adapter tensors' bytes (both of adapter 0; every adapter has the same shape)."""
    model = load_model(str(model_dir), select_device())
    tokenizer = load_tokenizer(str(model_dir))
    hyperparameters = resolve(SupervisedHyperparameters(batch_size=4), 400, "sft")
    peft = get_peft_model(model, lora_config(model, hyperparameters))
    lora = [(name, p) for name, p in peft.named_parameters() if "lora_" in name]
    tensor_bytes = sum(p.numel() * p.element_size() for _, p in lora)
    store = LocalArtifactStore(settings.artifacts_root)
    base = BaseModelRef(name=MODEL, content_hash=content_hash(model_dir))
    targets = []
    for index in range(count):
        generator = torch.Generator().manual_seed(SEED + index)
        with torch.no_grad():
            for name, parameter in lora:
                if "lora_A" in name:  # peft's own init: kaiming-uniform, bound 1/sqrt(fan_in)
                    bound = parameter.shape[1] ** -0.5
                    parameter.uniform_(-bound, bound, generator=generator)
                else:  # peft starts B at zero (a no-op adapter); a trained one is not
                    parameter.normal_(0.0, B_STD, generator=generator)
        job_id = f"ftjob-bench-adapter-{index}"
        key = f"jobs/{job_id}/attempt-1/adapter"
        directory = store.local_path(key)
        peft.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
        lineage = Lineage(
            job_id=job_id,
            base_model=base,
            tokenizer_hash=tokenizer_hash(directory),
            training_file=FileRef(id="file-bench", sha256="0" * 64),
            validation_file=None,
            method={"type": "supervised", "supervised": {"hyperparameters": {"batch_size": 4}}},
            objective="sft",
            training_type="lora",
            hyperparameters=hyperparameters.model_dump(),
            libraries=library_versions(),
            step=100,
            metrics={"train_loss": 1.0},
        )
        (directory / LINEAGE_FILE).write_text(lineage.model_dump_json(indent=2) + "\n", encoding="utf-8")
        name = f"ft:{MODEL}:bench::bench{index:02d}"
        targets.append(Target(model=name, base_path=str(model_dir), artifact_key=key, method="lora"))
    file_size = (store.local_path(targets[0].artifact_key or "") / "adapter_model.safetensors").stat().st_size
    return targets, file_size, tensor_bytes


def chat(max_tokens: int) -> ChatCompletionRequest:
    return ChatCompletionRequest(
        model=MODEL,
        messages=[ChatMessage(role="user", content=PROMPT)],
        temperature=0,
        max_tokens=max_tokens,
    )


def timed_chat(engine: Engine, target: Target, request: ChatCompletionRequest) -> tuple[float, int, str]:
    """Seconds, completion tokens and text of one request."""
    start = time.perf_counter()
    response = engine.chat(target, request)
    seconds = time.perf_counter() - start
    return seconds, response["usage"]["completion_tokens"], response["choices"][0]["message"]["content"]


# --- Memory and first use, in a fresh process ------------------------------------------------------------


def proc_status() -> dict[str, int]:
    """This process's VmRSS, RssAnon, RssFile and VmHWM in bytes, after a full garbage collection."""
    gc.collect()
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
            fields[name] = int(value.split()[0]) * 1024
    return fields


def memory_child(spec_path: Path) -> None:
    """The child's part: base, then every adapter's first request and the same request twice again."""
    spec = json.loads(spec_path.read_text())
    settings = Settings(data_dir=Path(spec["data_dir"]), inference_adapter_cache=spec["cache"])
    targets = [Target.model_validate(t) for t in spec["targets"]]
    request = chat(spec["max_tokens"])
    engine = Engine(settings)
    base_target = Target(model=MODEL, base_path=targets[0].base_path)
    timed_chat(engine, base_target, request)  # loads the base, warms generation up
    timed_chat(engine, base_target, request)
    base = proc_status()
    first, again = [], []
    for target in targets:
        engine.models.settle()
        first.append(timed_chat(engine, target, request)[0])
        engine.models.settle()
        # The median of two cached requests: one sample of machine noise would weigh as much as the load.
        again.append(float(np.median([timed_chat(engine, target, request)[0] for _ in range(2)])))
    loaded = proc_status()
    spec_path.with_suffix(".out.json").write_text(
        json.dumps({"base": base, "loaded": loaded, "first": first, "again": again})
    )


def run_memory_child(tmp: Path, settings: Settings, targets: list[Target], max_tokens: int) -> dict[str, Any]:
    spec_path = tmp / "child.json"
    spec = {
        "data_dir": str(settings.data_dir),
        "cache": settings.inference_adapter_cache,
        "targets": [t.model_dump() for t in targets],
        "max_tokens": max_tokens,
    }
    spec_path.write_text(json.dumps(spec))
    command = [sys.executable, __file__, "--memory-child", str(spec_path)]
    subprocess.run([*command, "--threads", str(torch.get_num_threads())], check=True)
    result: dict[str, Any] = json.loads(spec_path.with_suffix(".out.json").read_text())
    return result


def first_uses(
    settings: Settings, model_dir: Path, targets: list[Target], max_tokens: int, idle: bool
) -> tuple[Engine, list[float]]:
    """A fresh engine, its base loaded, and the time each adapter's first `serving()` took: `idle`, each
    after the store's background work is done; else back to back."""
    engine = Engine(settings)
    timed_chat(engine, Target(model=MODEL, base_path=str(model_dir)), chat(max_tokens))  # loads the base
    times = []
    for target in targets:
        if idle:
            engine.models.settle()
        start = time.perf_counter()
        with engine.models.serving(target):
            pass
        times.append(time.perf_counter() - start)
    engine.models.settle()
    return engine, times


# --- Fixed against interleaved, in alternating blocks ----------------------------------------------------


@dataclass
class Side:
    latencies: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    round_p50: list[float] = field(default_factory=list)
    texts: dict[str, str] = field(default_factory=dict)
    """The answer of each adapter (greedy, so one per adapter)."""

    @property
    def tokens_per_second(self) -> float:
        return sum(self.tokens) / sum(self.latencies)

    @property
    def median_tokens_per_second(self) -> float:
        """Tokens of a median request over its time: one burst of other work moves it less."""
        return float(np.median(self.tokens) / np.median(self.latencies))


def alternating(
    engine: Engine, targets: list[Target], request: ChatCompletionRequest, rounds: int, size: int
) -> tuple[Side, Side]:
    """`rounds` rounds of one block of `size` requests per side: fixed on adapter k (k moves on by `size`
    each round, so both sides see the same adapters and answers), or cycling k+1, k+2, ... (a swap every
    request). The side that goes first alternates, so drift in machine load falls on both alike."""
    fixed, cycling = Side(), Side()
    n = len(targets)
    for round_ in range(rounds):
        k = round_ * size % n
        blocks = [(fixed, [k] * size), (cycling, [(k + 1 + j) % n for j in range(size)])]
        for side, order in blocks if round_ % 2 == 0 else blocks[::-1]:
            with engine.models.serving(targets[k]):
                pass  # adapter k active before either block (untimed): a fixed block never swaps
            block = [timed_chat(engine, targets[i], request) for i in order]
            side.latencies += [seconds for seconds, _, _ in block]
            side.tokens += [tokens for _, tokens, _ in block]
            side.round_p50.append(float(np.median([seconds for seconds, _, _ in block])))
            side.texts.update((targets[i].model, text) for i, (_, _, text) in zip(order, block, strict=True))
        print(f"  round {round_ + 1}/{rounds} done", flush=True)
    return fixed, cycling


def swap_times(engine: Engine, targets: list[Target], repeats: int) -> dict[str, list[float]]:
    """The swap alone: peft's `set_adapter` and the store's cache-hit path (`serving` entered and left, lock
    and LRU included), cycling over the adapters and on one fixed adapter."""
    base = engine.models.bases[targets[0].base_path]
    assert base.peft is not None
    peft: PeftModel = base.peft
    names = [engine.models.cache[(t.base_path, t.artifact_key or "")].name for t in targets]  # type: ignore[union-attr]

    def timed(calls: Iterable[Callable[[], object]]) -> list[float]:
        times = []
        for call in calls:
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
        return times

    def serve(target: Target) -> None:
        with engine.models.serving(target):
            pass

    n = len(targets)
    return {
        "set_adapter, cycling": timed(lambda i=i: peft.set_adapter(names[i % n]) for i in range(repeats)),
        "set_adapter, fixed": timed(lambda: peft.set_adapter(names[0]) for _ in range(repeats)),
        "store cache hit, cycling": timed(lambda i=i: serve(targets[i % n]) for i in range(repeats)),
        "store cache hit, fixed": timed(lambda: serve(targets[0]) for _ in range(repeats)),
    }


class CpuMeter:
    """CPU seconds the whole machine spent busy (/proc/stat) less this process's and its children's: what
    other processes took from the cores while the bench ran."""

    def __init__(self) -> None:
        self.start = self._busy(), self._own()

    @staticmethod
    def _busy() -> float:
        user, nice, system, _idle, _iowait, irq, softirq, steal = map(
            int, Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]
        )
        return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _own() -> float:
        own = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return sum(usage.ru_utime + usage.ru_stime for usage in own)

    def others(self) -> float:
        return (self._busy() - self.start[0]) - (self._own() - self.start[1])


# --- Report -----------------------------------------------------------------------------------------------


def ms(seconds: float) -> float:
    return seconds * 1000


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


@dataclass
class Results:
    adapters: int
    file_size: int
    tensor_bytes: int
    memory: dict[str, Any]
    attach: list[float]
    burst: list[float]
    tokenizer: list[float]
    swaps: dict[str, list[float]]
    latency: tuple[Side, Side]
    throughput: tuple[Side, Side]
    answers: dict[str, int]


def report(
    command: str, facts: str, args: argparse.Namespace, r: Results, started: float, cpu: CpuMeter
) -> None:
    line = "=" * 110
    n = r.adapters
    fixed, cycling = r.latency
    t_fixed, t_cycling = r.throughput
    first = [ms(a - b) for a, b in zip(r.memory["first"], r.memory["again"], strict=True)]
    base, loaded = r.memory["base"], r.memory["loaded"]
    expected = base["VmRSS"] + n * r.file_size
    allowed = expected * (1 + MEMORY_SLACK)
    print(f"\n{line}\nMachine: {facts}\nCommand: {command}")
    print(
        f"Model: {MODEL}, {n} LoRA adapters (r=8, alpha=16, all linear layers; random B, std {B_STD}), "
        f"adapter cache {max(n, 10)}; greedy chat, prompt {len(PROMPT)} chars.\nAnswers: "
        f"{r.answers['distinct']} distinct greedy answers over {r.answers['answered']} adapters "
        f"({args.throughput_tokens} tokens), "
        f"{r.answers['short']} requests ended before max_tokens."
    )

    print(f"\n1. Per-request latency, {args.max_tokens} tokens, {len(fixed.latencies)} requests per side")
    print(f"{'':<36}{'p50 ms':>9}{'p90 ms':>9}{'mean ms':>9}{'tokens/s':>10}   round p50s ms")
    for name, side in (("fixed adapter (no swap)", fixed), (f"cycling {n} adapters (swap each)", cycling)):
        rounds = ", ".join(f"{ms(v):.0f}" for v in side.round_p50)
        print(
            f"{name:<36}{ms(pct(side.latencies, 50)):>9.1f}{ms(pct(side.latencies, 90)):>9.1f}"
            f"{ms(float(np.mean(side.latencies))):>9.1f}{side.tokens_per_second:>10.1f}   {rounds}"
        )
    added = ms(pct(cycling.latencies, 50) - pct(fixed.latencies, 50))
    per_round = [ms(c - f) for c, f in zip(cycling.round_p50, fixed.round_p50, strict=True)]
    print(
        f"{'cycling - fixed':<36}{added:>+9.1f}"
        f"{ms(pct(cycling.latencies, 90) - pct(fixed.latencies, 90)):>+9.1f}"
        f"{ms(float(np.mean(cycling.latencies) - np.mean(fixed.latencies))):>+9.1f}{'':>10}   "
        + ", ".join(f"{v:+.0f}" for v in per_round)
    )
    print(f"\n   swap alone ({len(next(iter(r.swaps.values())))} calls each)   p50 ms   p90 ms   max ms")
    for name, times in r.swaps.items():
        print(f"   {name:<30}{ms(pct(times, 50)):>8.3f}{ms(pct(times, 90)):>9.3f}{ms(max(times)):>9.3f}")
    print("   (set_adapter: peft's own swap, for comparison; a request pays the store's cache hit)")

    print(f"\n2. First use of an adapter, base loaded ({n} adapters, in load order)")
    print(f"{'':<44}{'p50 ms':>8}{'max ms':>8}   each ms")
    rows = (
        ("store attach (serving() entered), idle", [ms(s) for s in r.attach]),
        ("store attach, back to back", [ms(s) for s in r.burst]),
        ("first request - same request again, child", first),
        ("of an attach: load_tokenizer(adapter dir)", [ms(s) for s in r.tokenizer]),
    )
    for name, values in rows:
        each = ", ".join(f"{v:.0f}" for v in values)
        print(f"{name:<44}{pct(values, 50):>8.0f}{max(values):>8.0f}   {each}")
    print(
        "(the first adapter on a base wraps it in a PeftModel. Idle, later ones are copied into the spare\n"
        " slot injected after the previous one; back to back, most are injected with load_adapter. The\n"
        " child's cached request: the median of the same adapter's next two requests, so the difference is\n"
        " load + swap.)"
    )

    print("\n3. Resident memory of the fresh child process (after gc.collect())")
    print(f"{'MiB':<36}{'VmRSS':>9}{'RssAnon':>9}{'RssFile':>9}{'VmHWM':>9}")
    for name, status in (("base loaded, no adapter", base), (f"all {n} adapters loaded", loaded)):
        print(
            f"{name:<36}{status['VmRSS'] / MIB:>9.1f}{status['RssAnon'] / MIB:>9.1f}"
            f"{status['RssFile'] / MIB:>9.1f}{status['VmHWM'] / MIB:>9.1f}"
        )
    growth = {k: loaded[k] - base[k] for k in ("VmRSS", "RssAnon")}
    print(
        f"{'growth':<36}{growth['VmRSS'] / MIB:>9.1f}{growth['RssAnon'] / MIB:>9.1f}\n"
        f"adapter size: adapter_model.safetensors {r.file_size / MIB:.2f} MiB, adapter tensors "
        f"{r.tensor_bytes / MIB:.2f} MiB; {n} x file = {n * r.file_size / MIB:.1f} MiB\n"
        f"allowed: (base VmRSS + {n} x adapter file) x {1 + MEMORY_SLACK:.2f} = {allowed / MIB:.1f} MiB; "
        f"growth / ({n} x adapter file) = {growth['VmRSS'] / (n * r.file_size):.2f} (VmRSS), "
        f"{growth['RssAnon'] / (n * r.file_size):.2f} (RssAnon)"
    )

    print(
        f"\n4. Throughput, {args.throughput_tokens} tokens per request, "
        f"{len(t_fixed.latencies)} requests per side"
    )
    print(f"{'':<36}{'tokens':>8}{'seconds':>9}{'tokens/s':>10}{'median':>8}   round p50s ms")
    for name, side in (("fixed adapter", t_fixed), (f"interleaved over {n} adapters", t_cycling)):
        rounds = ", ".join(f"{ms(v):.0f}" for v in side.round_p50)
        print(
            f"{name:<36}{sum(side.tokens):>8}{sum(side.latencies):>9.1f}"
            f"{side.tokens_per_second:>10.2f}{side.median_tokens_per_second:>8.2f}   {rounds}"
        )
    print("(tokens/s: all completion tokens / all request time; median: a median request's)")
    ratio = t_cycling.tokens_per_second / t_fixed.tokens_per_second
    median_ratio = t_cycling.median_tokens_per_second / t_fixed.median_tokens_per_second
    attach = [ms(seconds) for seconds in r.attach]
    burst = [ms(seconds) for seconds in r.burst]
    swap = ms(pct(r.swaps["store cache hit, cycling"], 50))
    growth = (loaded["VmRSS"] - base["VmRSS"]) / (n * r.file_size)

    # (figure, value, target, passed, judged): lines not judged are other readings of the same target.
    rows = [
        ("added latency, cycling - fixed, p50", f"{added:+.1f} ms", added <= ADDED_LATENCY_MS, True),
        ("swap alone: store cache hit, p50", f"{swap:.2f} ms", swap <= ADDED_LATENCY_MS, False),
        ("first use, store attach, p50", f"{pct(attach, 50):.0f} ms", pct(attach, 50) <= FIRST_USE_MS, True),
        ("first use, store attach, max", f"{max(attach):.0f} ms", max(attach) <= FIRST_USE_MS, True),
        ("first use, back to back, p50", f"{pct(burst, 50):.0f} ms", pct(burst, 50) <= FIRST_USE_MS, False),
        (
            "first use, 1st - cached request, p50",
            f"{pct(first, 50):.0f} ms",
            pct(first, 50) <= FIRST_USE_MS,
            False,
        ),
        ("VmRSS all loaded / allowed", f"{loaded['VmRSS'] / allowed:.2f}", loaded["VmRSS"] <= allowed, True),
        (f"VmRSS growth / ({n} x adapter file)", f"{growth:.2f}", growth <= 1 + MEMORY_SLACK, False),
        ("tokens/s, interleaved / fixed", f"{ratio:.2f}", ratio >= THROUGHPUT_RATIO, True),
        (
            "median tokens/s, interleaved / fixed",
            f"{median_ratio:.2f}",
            median_ratio >= THROUGHPUT_RATIO,
            False,
        ),
    ]
    goals = [f"<= {ADDED_LATENCY_MS:.0f} ms"] * 2 + [f"<= {FIRST_USE_MS:.0f} ms"] * 4
    goals += ["<= 1.00", f"<= {1 + MEMORY_SLACK:.2f}", f">= {THROUGHPUT_RATIO}", f">= {THROUGHPUT_RATIO}"]
    print(f"\n{'figure':<40}{'value':>10}  {'target':<11}result")
    for (name, value, passed, judged), goal in zip(rows, goals, strict=True):
        result = "PASS" if passed else "FAIL"
        print(f"{name:<40}{value:>10}  {goal:<11}{result if judged else f'({result}, for reference)'}")
    runtime = time.monotonic() - started
    others = cpu.others()
    print(
        f"\nOther processes used {others:.0f} CPU-s during the run's {runtime:.0f} s "
        f"({others / (runtime * (os.cpu_count() or 1)):.0%} of the machine); 1-min load average at end "
        f"{os.getloadavg()[0]:.2f}; runtime {runtime:.0f} s\n{line}"
    )


# --- Main -----------------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--adapters", type=int, default=10)
    parser.add_argument(
        "--requests", type=int, default=40, help="latency requests per side (rounded up to whole rounds)"
    )
    parser.add_argument("--throughput-requests", type=int, default=20, help="throughput requests per side")
    parser.add_argument("--max-tokens", type=int, default=8, help="tokens per latency request")
    parser.add_argument("--throughput-tokens", type=int, default=32, help="tokens per throughput request")
    parser.add_argument("--block", type=int, default=5, help="requests per block (at most --adapters)")
    parser.add_argument("--swaps", type=int, default=50, help="calls per swap-alone timing")
    parser.add_argument("--model-dir", type=Path, help="default: the copy `ftjobs models pull` makes")
    parser.add_argument(
        "--threads",
        type=int,
        help="torch threads (default: torch's own); 1 keeps a core shared with other work from stalling",
    )
    parser.add_argument("--memory-child", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.memory_child is not None:
        torch.set_num_threads(args.threads)
        memory_child(args.memory_child)
        return
    if args.adapters < 2:
        raise SystemExit("--adapters must be at least 2: cycling needs something to swap to")
    started, cpu = STARTED, CpuMeter()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    command = shlex.join(["python", *sys.argv])
    facts = machine_facts()
    print(f"Machine: {facts}\nCommand: {command}", flush=True)
    model_dir = base_model(args.model_dir)
    with tempfile.TemporaryDirectory(prefix="ftjobs-bench-") as name:
        tmp = Path(name)
        settings = Settings(data_dir=tmp, inference_adapter_cache=max(args.adapters, 10))
        print(f"building {args.adapters} adapters...", flush=True)
        targets, file_size, tensor_bytes = build_adapters(model_dir, settings, args.adapters)
        gc.collect()
        print("memory and first use, in a fresh child process...", flush=True)
        memory = run_memory_child(tmp, settings, targets, args.max_tokens)

        _, burst = first_uses(settings, model_dir, targets, args.max_tokens, idle=False)
        gc.collect()
        engine, attach = first_uses(settings, model_dir, targets, args.max_tokens, idle=True)
        tokenizer = []
        for target in targets:  # part of every attach: the adapter's own tokenizer is loaded
            start = time.perf_counter()
            load_tokenizer(str(settings.artifacts_root / (target.artifact_key or "")))
            tokenizer.append(time.perf_counter() - start)
        print("warming up...", flush=True)
        for target in targets:
            timed_chat(engine, target, chat(args.max_tokens))
        swaps = swap_times(engine, targets, args.swaps)
        size = min(args.block, args.adapters)
        rounds = -(-args.requests // size)
        print(f"latency: {rounds} rounds of {size} requests per side...", flush=True)
        latency = alternating(engine, targets, chat(args.max_tokens), rounds, size)
        rounds = -(-args.throughput_requests // size)
        print(f"throughput: {rounds} rounds of {size} requests per side...", flush=True)
        throughput = alternating(engine, targets, chat(args.throughput_tokens), rounds, size)
    answers = {"distinct": len(set(throughput[1].texts.values())), "short": 0}
    answers["short"] += sum(t < args.max_tokens for side in latency for t in side.tokens)
    answers["short"] += sum(t < args.throughput_tokens for side in throughput for t in side.tokens)
    answers["answered"] = len(throughput[1].texts)
    results = Results(
        args.adapters,
        file_size,
        tensor_bytes,
        memory,
        attach,
        burst,
        tokenizer,
        swaps,
        latency,
        throughput,
        answers,
    )
    report(command, facts, args, results, started, cpu)


if __name__ == "__main__":
    main()
