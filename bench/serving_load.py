"""Serving under load: concurrent streaming clients, each on its own LoRA adapter of one shared base, in the
in-process inference engine (`inference.engine.Engine`, continuous batching), on SmolLM2-135M-Instruct.
Not a test.

    python bench/serving_load.py [--clients 1,4,8,16] [--tokens 64] [--adapters 8] [--threads N]
                                 [--model-dir DIR]

The adapters are adapter_serving's (`build_adapters`: the service's default LoRA shape, seeded random
weights, published as training publishes them). For each client count, that many clients start together,
client i on adapter i mod `--adapters`, each one greedy streamed chat of `--tokens` new tokens. Reported:
aggregate decode tokens/s (all completion tokens over the wall time from start to the last answer) and
p50/p95 time to first token. Then the same 8 clients all on one adapter: mixed-adapter batches against
one-adapter batches. Targets: 8 clients >= 3x the 1-client tokens/s; p50 TTFT at 8 clients <= 3x the
1-client p50; mixed >= 0.8x one adapter. The last line gives the 8-client ratios (the largest count run,
if 8 isn't).

When vLLM is importable (and not `--no-vllm`), the same run adds base-model figures for both engines at
each client count (`inference.vllm_engine.VLLMEngine`, float32 like ours, VLLM_CPU_KVCACHE_SPACE=1 GiB
unless set), and vLLM's mixed-adapter figure at the reference count.
"""

import argparse
import importlib.util
import os
import shlex
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

STARTED = time.monotonic()

# As in adapter_serving: this folder's `api.py` must not shadow the api package.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [str(_HERE.parent)] + [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench._common import base_model, machine_facts  # noqa: E402
from bench.adapter_serving import build_adapters, chat  # noqa: E402
from inference.engine import Engine  # noqa: E402
from models.inference import Target  # noqa: E402
from models.settings import Settings  # noqa: E402

TOKENS_RATIO, TTFT_RATIO, MIXED_RATIO = 3.0, 3.0, 0.8


@dataclass
class Load:
    clients: int
    seconds: float
    tokens: int
    first_tokens: list[float]

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds

    def ttft(self, q: float) -> float:
        return float(np.percentile(self.first_tokens, q))


def run_clients(engine: Engine, targets: list[Target], tokens: int) -> Load:
    """One streamed chat per target, all started together."""
    request = chat(tokens).model_copy(update={"stream": True, "stream_options": {"include_usage": True}})
    start = threading.Barrier(len(targets) + 1)
    first: list[float] = [0.0] * len(targets)
    counted: list[int] = [0] * len(targets)

    def client(index: int) -> None:
        start.wait()
        began = time.perf_counter()
        for chunk in engine.stream_chat(targets[index], request, f"org-{index}"):
            choices = chunk["choices"]
            if not first[index] and choices and choices[0]["delta"].get("content"):
                first[index] = time.perf_counter() - began
            if chunk.get("usage"):
                counted[index] = chunk["usage"]["completion_tokens"]

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(targets))]
    for thread in threads:
        thread.start()
    start.wait()
    began = time.perf_counter()
    for thread in threads:
        thread.join()
    return Load(len(targets), time.perf_counter() - began, sum(counted), first)


def line(name: str, load: Load) -> str:
    return (
        f"{name:<24} {load.tokens_per_second:>9.1f} tok/s  TTFT p50 {load.ttft(50) * 1000:>7.0f} ms  "
        f"p95 {load.ttft(95) * 1000:>7.0f} ms  ({load.tokens} tokens in {load.seconds:.1f} s)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", default="1,4,8,16", help="comma-separated client counts")
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per request")
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's, one per core)")
    parser.add_argument("--model-dir", type=Path, help="default: the copy `ftjobs models pull` makes")
    parser.add_argument("--no-vllm", action="store_true", help="skip vLLM's figures even if it is installed")
    args = parser.parse_args()
    with_vllm = not args.no_vllm and importlib.util.find_spec("vllm") is not None
    counts = sorted({int(c) for c in args.clients.split(",")})
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    print(f"Machine: {machine_facts()}\nCommand: {shlex.join(['python', *sys.argv])}", flush=True)
    model_dir = base_model(args.model_dir)
    with tempfile.TemporaryDirectory(prefix="ftjobs-bench-") as name:
        settings = Settings(data_dir=Path(name), inference_adapter_cache=args.adapters)
        print(f"building {args.adapters} adapters...", flush=True)
        adapters, _, _ = build_adapters(model_dir, settings, args.adapters)
        engine = Engine(settings)
        for target in adapters:  # load the base and every adapter (and the spare slot) before timing
            engine.chat(target, chat(1))
        engine.models.settle()
        base = Target(model=adapters[0].model, base_path=str(model_dir))
        loads = {}
        for count in counts:
            loads[count] = run_clients(
                engine, [adapters[i % len(adapters)] for i in range(count)], args.tokens
            )
            print(line(f"{count} clients, mixed", loads[count]), flush=True)
            if with_vllm:
                print(
                    line(f"{count} clients, base", run_clients(engine, [base] * count, args.tokens)),
                    flush=True,
                )
        reference = 8 if 8 in loads else counts[-1]
        single = run_clients(engine, [adapters[0]] * reference, args.tokens)
        print(line(f"{reference} clients, one adapter", single), flush=True)
        if with_vllm:
            vllm_figures(settings, base, adapters, counts, reference, args.tokens)
    one, many = loads[counts[0]], loads[reference]
    print(
        f"runtime {time.monotonic() - STARTED:.0f} s; targets: tokens/s >= {TOKENS_RATIO}x, TTFT p50 <= "
        f"{TTFT_RATIO}x, mixed >= {MIXED_RATIO}x one adapter"
    )
    speedup = many.tokens_per_second / one.tokens_per_second
    print(
        f"{reference} clients vs {one.clients}: tokens/s {speedup:.2f}x, TTFT p50 "
        f"{many.ttft(50) / one.ttft(50):.2f}x, mixed/one adapter "
        f"{many.tokens_per_second / single.tokens_per_second:.2f}x"
    )


def vllm_figures(
    settings: Settings, base: Target, adapters: list[Target], counts: list[int], reference: int, tokens: int
) -> None:
    """vLLM's base-model figures at each count, then its mixed adapters at `reference` clients."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from inference.vllm_engine import VLLMEngine

    started = time.perf_counter()
    engine = VLLMEngine(settings.model_copy(update={"inference_vllm_args": {"dtype": "float32"}}))
    try:
        engine.chat(base, chat(1))
        print(f"vLLM: base loaded and answered in {time.perf_counter() - started:.0f} s", flush=True)
        for count in counts:
            print(
                line(f"vLLM {count} clients, base", run_clients(engine, [base] * count, tokens)), flush=True
            )
        started = time.perf_counter()
        engine.chat(adapters[0], chat(1))
        print(f"vLLM: first adapter request {time.perf_counter() - started:.1f} s", flush=True)
        for target in adapters[1:]:
            engine.chat(target, chat(1))
        mixed = run_clients(engine, [adapters[i % len(adapters)] for i in range(reference)], tokens)
        print(line(f"vLLM {reference} clients, mixed", mixed), flush=True)
    finally:
        engine.close()


if __name__ == "__main__":
    main()
