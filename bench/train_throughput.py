"""Training throughput benchmark: real (non-padding) tokens per second of our SFT recipe with sequence
packing against a plain Hugging Face `Trainer` + peft LoRA script that pads each batch to its longest
example, and the validation loss each reaches. Not a test.

    python bench/train_throughput.py [--steps 60] [--data multi|single] [--batch-size 4]
                                     [--max-seq-length 256] [--slice 20] [--model-dir DIR]

Both sides train SmolLM2-135M-Instruct on the same training file with the same LoRA (r=8, alpha=16, dropout
0.05, all linear layers), learning rate 2e-4 decaying linearly after 5% warmup, batch size, max_seq_length,
seed and number of optimizer steps, each in a child process:
1. ours: the real training child (`python -m worker.training`) on a TrainingSpec with `packing: true`; real
   tokens from its CompletedMessage.trained_tokens, time from its MetricsMessage.elapsed_seconds (the
   training loop alone: the spec has no validation file, so nothing is evaluated inside it);
2. plain: this file in `plain` mode, a minimal Trainer script reading the same spec (`packing` ignored);
   real tokens are the attention-mask sums (Trainer's own "non_padding" count), time runs from the first
   optimizer step's start to the last one's end.
Model loading is timed on neither side. The two train in alternating turns of `--slice` seconds (the other
side SIGSTOPped), so whatever else the machine runs slows both alike; stopped time is not counted. Then
both adapters are scored here by one function on the same validation set: summed cross-entropy over the
answer tokens / their count.
"""

import argparse
import json
import math
import os
import random
import resource
import signal
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import (
    AutoModelForCausalLM,
    DataCollatorForSeq2Seq,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)

# Run as a script, this file's folder comes first on sys.path, where `api.py` would shadow the api package:
# swap it for the repository root, so that `bench._common` imports as it would from anywhere else.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [str(_HERE.parent)] + [p for p in sys.path if Path(p or ".").resolve() != _HERE]

from bench._common import (  # noqa: E402
    DATA,
    REPO,
    TrainingChild,
    base_model,
    die_with_parent,
    log_tail,
    machine_facts,
    read_jsonl,
    sft_spec,
    training_file,
    write_jsonl,
)
from models.spec import MetricsMessage, StartedMessage, TrainingSpec  # noqa: E402
from worker.training.batching import epoch_batches  # noqa: E402
from worker.training.data import IGNORE_INDEX, Example, collate, load_dataset, pack_examples  # noqa: E402
from worker.training.device import select_device  # noqa: E402
from worker.training.loading import load_model, load_tokenizer  # noqa: E402
from worker.training.objectives.causal_lm import token_stats  # noqa: E402

THROUGHPUT_TARGET = 1.5
LOSS_TOLERANCE = 0.02
VALID_SENTENCES = 300
MULTI_SYSTEM = (
    "Classify the sentiment of each numbered movie review. Answer with one line per review: its number, "
    "a period and exactly one word, positive or negative."
)
DATA_NOTES = {
    "multi": (
        "real sentences of sentiment/ (Pang & Lee movie reviews), 1 to {k} consecutive ones per chat example "
        "(seeded), answered\n  with one label per line (up to 4 reviews keep every example within 256 "
        "tokens).\n"
        "  Why: instruction data varies in length, and what padding costs grows with that variation. "
        "sentiment_chat (one review\n  after a fixed 25-token system prompt, one-word answer) hardly varies; "
        "--data single measures it."
    ),
    "single": (
        "sentiment/ (Pang & Lee movie reviews) in sentiment_chat's exact chat format, one review per "
        "example\n  (sentiment_chat's 400, then the rest of sentiment/train in the same format).\n"
        "  Why: the data the service ships. Its lengths hardly vary (a fixed system prompt dominates), so "
        "padding wastes little\n  and packing can gain little from removing it; --data multi has lengths "
        "that vary as instruction data does."
    ),
}


# --- Data ---------------------------------------------------------------------------------------------


def chat(system: str, user: str, answer: str) -> dict[str, Any]:
    return {
        "messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": user},
            {"role": "assistant", "content": answer},
        ]
    }


def multi_review_chats(rows: list[dict[str, str]], max_reviews: int, seed: int) -> list[dict[str, Any]]:
    """Consecutive sentences, a seeded 1..max_reviews of them per example, numbered and answered in turn."""
    rng, chats, start = random.Random(seed), [], 0
    while start < len(rows):
        group = rows[start : start + rng.randint(1, max_reviews)]
        start += len(group)
        user = "\n".join(f"{i}. {row['text']}" for i, row in enumerate(group, start=1))
        answer = "\n".join(f"{i}. {row['label']}" for i, row in enumerate(group, start=1))
        chats.append(chat(MULTI_SYSTEM, user, answer))
    return chats


def build_data(kind: str, max_reviews: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Training pool and validation set (from sentiment/validation.jsonl) as chat records."""
    train_rows = read_jsonl(DATA / "sentiment" / "train.jsonl")
    valid_rows = read_jsonl(DATA / "sentiment" / "validation.jsonl")[:VALID_SENTENCES]
    if kind == "multi":
        return multi_review_chats(train_rows, max_reviews, seed=1), multi_review_chats(
            valid_rows, max_reviews, 2
        )
    system = read_jsonl(DATA / "sentiment_chat" / "train.jsonl")[0]["messages"][0]["content"]
    return (
        [chat(system, row["text"], row["label"]) for row in train_rows],
        [chat(system, row["text"], row["label"]) for row in valid_rows],
    )


# --- The plain side: `plain` mode, in its own process -------------------------------------------------


@dataclass
class PlainResult:
    steps: int
    examples: int
    tokens: int
    padded_tokens: int
    started: float
    ended: float
    """First step's start and last step's end on the shared monotonic clock."""


class PaddingCount(DataCollatorForSeq2Seq):
    """HF's collator (pads to the batch's longest example, labels -100 on padding), noting each batch's real
    and padded token counts."""

    batches: list[tuple[int, int]]

    def __call__(self, features: list[dict[str, Any]], return_tensors: str | None = None) -> Any:
        batch = super().__call__(features, return_tensors)
        self.batches.append((int(batch["attention_mask"].sum()), batch["attention_mask"].numel()))
        return batch


class StepClock(TrainerCallback):
    """Stops the process once the model is loaded (the bench lets it run in turns), then times the steps."""

    started = ended = 0.0

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        os.kill(os.getpid(), signal.SIGSTOP)

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.started = self.started or time.monotonic()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.ended = time.monotonic()


def train_plain(spec: TrainingSpec, steps: int, output: Path) -> None:
    """Plain Trainer + peft LoRA on the spec's data and hyperparameters, tokenized as ours does (same ids,
    labels -100 on the prompt), each batch padded to its longest example. Writes output/adapter and
    output/result.json."""
    hp = spec.hyperparameters
    set_seed(spec.seed)
    tokenizer = load_tokenizer(spec.base_model_path)
    examples = load_dataset(spec.training_file, "chat", tokenizer, hp.max_seq_length).examples
    model = AutoModelForCausalLM.from_pretrained(spec.base_model_path, dtype=torch.float32)
    lora = LoraConfig(
        r=hp.lora_r,
        lora_alpha=hp.lora_alpha,
        lora_dropout=hp.lora_dropout,
        target_modules=hp.lora_target_modules,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    arguments = TrainingArguments(
        output_dir=str(output / "trainer"),
        max_steps=steps,
        per_device_train_batch_size=hp.batch_size,
        learning_rate=hp.learning_rate,
        lr_scheduler_type=hp.lr_scheduler,
        warmup_steps=hp.warmup_ratio,  # below 1 it is a ratio of the steps, rounded up as ours is
        weight_decay=hp.weight_decay,
        max_grad_norm=hp.max_grad_norm,
        optim="adamw_torch",  # the optimizer ours uses
        seed=spec.seed,
        use_cpu=True,
        include_num_input_tokens_seen="non_padding",
        save_strategy="no",
        logging_strategy="no",
        report_to="none",
        disable_tqdm=True,
    )
    collator = PaddingCount(tokenizer, label_pad_token_id=IGNORE_INDEX, padding="longest")
    collator.batches = []
    clock = StepClock()
    dataset = [{"input_ids": e.input_ids, "labels": e.labels} for e in examples]
    trainer = Trainer(
        model=model, args=arguments, train_dataset=dataset, data_collator=collator, callbacks=[clock]
    )
    trainer.train()
    model.save_pretrained(output / "adapter")
    # The dataloader may collate a batch beyond the last step; only the first `global_step` were trained.
    trained = collator.batches[: trainer.state.global_step]
    assert trainer.state.num_input_tokens_seen == sum(real for real, _ in trained), "token counts differ"
    result = PlainResult(
        steps=trainer.state.global_step,
        examples=trainer.state.global_step * hp.batch_size,
        tokens=trainer.state.num_input_tokens_seen,
        padded_tokens=sum(padded for _, padded in trained),
        started=clock.started,
        ended=clock.ended,
    )
    (output / "result.json").write_text(json.dumps(asdict(result)))


class PlainChild:
    """This file in `plain` mode; it stops itself once its model is loaded, ready to train."""

    def __init__(self, spec_path: Path, steps: int, output: Path) -> None:
        output.mkdir(parents=True, exist_ok=True)
        self.output, self.log = output, output / "train.log"
        command = [sys.executable, __file__, "plain", "--spec", str(spec_path), "--steps", str(steps)]
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                [*command, "--output", str(output)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                cwd=REPO,
                preexec_fn=die_with_parent,
            )
        self.pid = self.process.pid
        self.usage: Any = None

    def wait_until_ready(self) -> None:
        _, status = os.waitpid(self.pid, os.WUNTRACED)
        if not os.WIFSTOPPED(status):
            self._failed(os.waitstatus_to_exitcode(status))

    def exited(self) -> bool:
        pid, status, usage = os.wait4(self.pid, os.WNOHANG)
        if pid:
            self.process.returncode, self.usage = os.waitstatus_to_exitcode(status), usage
        return bool(pid)

    def wait(self) -> PlainResult:
        if self.usage is None:
            _, status, self.usage = os.wait4(self.pid, 0)
            self.process.returncode = os.waitstatus_to_exitcode(status)
        if self.process.returncode != 0:
            self._failed(self.process.returncode)
        return PlainResult(**json.loads((self.output / "result.json").read_text()))

    def _failed(self, code: int | None) -> None:
        raise RuntimeError(f"plain Trainer run failed (exit {code}); log tail:\n{log_tail(self.log)}")


# --- Taking turns -------------------------------------------------------------------------------------


class Turns:
    """When each child was let run (SIGCONT to SIGSTOP) on the monotonic clock all processes share."""

    def __init__(self) -> None:
        self._spans: dict[int, list[list[float]]] = defaultdict(list)

    def resume(self, pid: int, *, signal_it: bool = True) -> None:
        if signal_it:
            os.kill(pid, signal.SIGCONT)
        self._spans[pid].append([time.monotonic(), math.inf])

    def pause(self, pid: int) -> None:
        os.kill(pid, signal.SIGSTOP)
        self._spans[pid][-1][1] = time.monotonic()

    def running(self, pid: int) -> bool:
        return bool(self._spans[pid]) and self._spans[pid][-1][1] == math.inf

    def count(self, pid: int) -> int:
        return len(self._spans[pid])

    def active(self, pid: int, start: float, end: float) -> float:
        """Seconds of [start, end] that the child was let run."""
        return sum(max(0.0, min(stop, end) - max(go, start)) for go, stop in self._spans[pid])


def take_turns(ours: TrainingChild, plain: PlainChild, slice_seconds: float) -> Turns:
    """Ours starts alone (it still loads its model; the plain side has loaded and waits stopped) and takes
    turns of `slice_seconds` with the plain side from its first step on. Whichever finishes training first
    then runs to its end while the other waits, and the other after it."""
    turns = Turns()
    turns.resume(ours.pid, signal_it=False)  # running since it was started
    ours_trained = plain_done = False
    switch_at = math.inf
    while not ours.eof:
        if turns.running(ours.pid):
            for message in ours.read(timeout=0.2):
                if isinstance(message, MetricsMessage):
                    ours_trained = message.step == message.total_steps
                    switch_at = min(switch_at, time.monotonic() + slice_seconds)
            if not (ours_trained or plain_done) and time.monotonic() >= switch_at:
                turns.pause(ours.pid)
                turns.resume(plain.pid)
                switch_at = time.monotonic() + slice_seconds
        elif plain.exited():
            plain_done = True
            turns.resume(ours.pid)
        elif time.monotonic() >= switch_at:
            turns.pause(plain.pid)
            turns.resume(ours.pid)
            switch_at = time.monotonic() + slice_seconds
        else:
            time.sleep(0.1)
    if not plain_done:
        turns.resume(plain.pid)
    return turns


def busy_cpu_seconds() -> float:
    """CPU time the whole machine has been busy since boot (/proc/stat: everything but idle and iowait)."""
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(
        int, Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]
    )
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def cpu_seconds(usage: Any) -> float:
    return usage.ru_utime + usage.ru_stime


# --- Scoring ------------------------------------------------------------------------------------------


def validation_loss(model_dir: Path, adapter: Path | None, examples: list[Example], batch_size: int) -> float:
    """Summed next-token cross-entropy over the answer tokens / their count, for the base model (adapter
    None) or an adapter on it; unpacked batches as our evaluation scores them, padding masked."""
    device = select_device()
    model = load_model(str(model_dir), device)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    loss_sum, units = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            batch = collate(examples[start : start + batch_size], pad_token_id=0)  # padding is masked out
            loss, _, count = token_stats(model, {name: t.to(device.device) for name, t in batch.items()})
            loss_sum, units = loss_sum + loss.item(), units + count
    return loss_sum / units


def packing_leak(model_dir: Path, examples: list[Example], capacity: int) -> tuple[float, float]:
    """Largest |logit| difference between examples scored alone and inside one packed row as our collate
    builds it (restarting positions, no attention mask), and the same row under an all-ones attention mask,
    which does attend across examples: the second shows the first would see a leak."""
    model = load_model(str(model_dir), select_device()).eval()
    [row] = pack_examples([e for e in examples if e.length <= capacity // 3][:3], capacity)
    packed = collate([row], pad_token_id=0)
    ids, positions = packed["input_ids"], packed["position_ids"]
    starts = [i for i, p in enumerate(positions[0].tolist()) if p == 0] + [row.length]
    worst = [0.0, 0.0]
    with torch.no_grad():
        # use_cache=False as in training: with a cache, transformers skips the packed-sequence mask.
        isolated = model(input_ids=ids, position_ids=positions, use_cache=False).logits[0]
        masks = {"attention_mask": torch.ones_like(ids)}
        leaking = model(input_ids=ids, position_ids=positions, use_cache=False, **masks).logits[0]
        for start, end in zip(starts, starts[1:], strict=False):
            alone = model(input_ids=ids[:, start:end], use_cache=False).logits[0]
            for k, logits in enumerate((isolated, leaking)):
                worst[k] = max(worst[k], float((logits[start:end] - alone).abs().max()))
    return worst[0], worst[1]


# --- Report -------------------------------------------------------------------------------------------


@dataclass
class Side:
    name: str
    steps: int
    examples: int
    tokens: int
    padding: float
    seconds: float
    """Training steps only, time stopped for the other side's turns not counted."""
    turns: int
    loss: float = math.nan

    @property
    def rate(self) -> float:
        return self.tokens / self.seconds


def report(facts: str, notes: list[str], ours: Side, plain: Side, base_loss: float) -> None:
    line = "=" * 110
    speedup = ours.rate / plain.rate
    loss_change = ours.loss / plain.loss - 1
    print(f"\n{line}\nMachine: {facts}")
    print("\n".join(notes))
    header = f"{'side':<26}{'steps':>6}{'examples':>10}{'real tokens':>13}{'padding':>9}{'train s':>9}"
    print(f"\n{header}{'turns':>7}{'tokens/s':>10}{'valid loss':>12}")
    for side in (ours, plain):
        print(
            f"{side.name:<26}{side.steps:>6}{side.examples:>10,}{side.tokens:>13,}{side.padding:>9.1%}"
            f"{side.seconds:>9.1f}{side.turns:>7}{side.rate:>10.1f}{side.loss:>12.4f}"
        )
    print(f"{'base model, untrained':<26}{'':>66}{base_loss:>12.4f}")
    ceiling = (1 - ours.padding) / (1 - plain.padding)
    print(
        f"\nPadding alone bounds the gain at (1 - {ours.padding:.1%}) / (1 - {plain.padding:.1%}) = "
        f"{ceiling:.2f}x: what packing gives when a real token costs the same in either batch shape."
    )
    targets = [
        (
            "real tokens/s, ours / plain",
            f"{speedup:.2f}x",
            f">= {THROUGHPUT_TARGET}x",
            speedup >= THROUGHPUT_TARGET,
        ),
        # One-sided: lower is better, and at equal steps packed batches hold more examples.
        (
            "valid loss, ours vs plain",
            f"{loss_change:+.2%}",
            f"<= +{LOSS_TOLERANCE:.0%}",
            loss_change <= LOSS_TOLERANCE,
        ),
    ]
    print(f"\n{'figure':<32}{'value':<12}{'target':<10}result")
    for name, value, target, ok in targets:
        print(f"{name:<32}{value:<12}{target:<10}{'PASS' if ok else 'FAIL'}")
    print(
        "(valid loss: lower is better, so only a loss more than 2% above the plain script's fails; at equal "
        "steps each packed\n batch holds more examples, which is why ours can be well below it.)"
    )
    print(line)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("mode", nargs="?", choices=["run", "plain"], default="run", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps on each side")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-seq-length", type=int, default=256)
    parser.add_argument("--data", choices=["multi", "single"], default="multi", help="see the printout")
    parser.add_argument("--max-reviews", type=int, default=4, help="multi: most reviews in one example")
    parser.add_argument("--slice", type=float, default=20.0, help="seconds per turn of each side")
    parser.add_argument("--model-dir", type=Path, help="default: the copy `ftjobs models pull` makes")
    parser.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--output", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args()


@dataclass
class Training:
    ours: Side
    plain: Side
    adapters: tuple[Path, Path]
    truncated: int
    """Training examples longer than max_seq_length, cut at the end (both sides alike)."""
    background: str


def packed_padding(rows: list[Example], batch_size: int, seed: int) -> float:
    """Ours' padding: each batch of packed rows padded to its longest, in the order the recipe draws them."""
    lengths = [row.length for row in rows]
    batches = epoch_batches(lengths, batch_size, seed=seed, group_by_length=False)
    return 1 - sum(lengths) / sum(max(lengths[i] for i in batch) * len(batch) for batch in batches)


def train_both(
    spec: TrainingSpec, rows: list[Example], n_examples: int, tmp: Path, slice_seconds: float
) -> Training:
    """Both sides in turns; also how much CPU the rest of the machine took meanwhile (the honest caveat)."""
    spec_path = tmp / "spec.json"
    spec_path.write_text(spec.model_dump_json())
    started, busy_before = time.monotonic(), busy_cpu_seconds()
    self_before = cpu_seconds(resource.getrusage(resource.RUSAGE_SELF))
    steps = math.ceil(len(rows) / spec.hyperparameters.batch_size)
    plain_child = PlainChild(spec_path, steps, tmp / "plain")
    plain_child.wait_until_ready()
    ours_child = TrainingChild(spec, tmp / "ours")
    turns = take_turns(ours_child, plain_child, slice_seconds)
    ours_run, plain_run = ours_child.wait(), plain_child.wait()
    elapsed = time.monotonic() - started
    ours_cpu = cpu_seconds(ours_run.usage) + cpu_seconds(plain_child.usage)
    self_cpu = cpu_seconds(resource.getrusage(resource.RUSAGE_SELF)) - self_before
    others = busy_cpu_seconds() - busy_before - ours_cpu - self_cpu
    completed = ours_run.completed
    ours = Side(
        "ours (packing)",
        completed.step,
        n_examples,
        completed.trained_tokens,
        packed_padding(rows, spec.hyperparameters.batch_size, spec.seed),
        turns.active(ours_child.pid, *ours_run.training_window()),
        turns.count(ours_child.pid),
    )
    plain = Side(
        "plain Trainer (padding)",
        plain_run.steps,
        plain_run.examples,
        plain_run.tokens,
        1 - plain_run.tokens / plain_run.padded_tokens,
        turns.active(plain_child.pid, plain_run.started, plain_run.ended),
        turns.count(plain_child.pid),
    )
    background = (
        f"Turns: the two sides alternated every {slice_seconds:g} s. Other processes used {others:.0f} CPU-s "
        f"of the {elapsed:.0f} s both took: {others / (elapsed * (os.cpu_count() or 1)):.0%} of the machine."
    )
    adapters = (Path(completed.adapter_path), tmp / "plain" / "adapter")
    [started_message] = ours_run.of_type(StartedMessage)
    return Training(ours, plain, adapters, started_message.truncated_examples, background)


def main() -> None:
    args = parse_args()
    if args.mode == "plain":
        train_plain(TrainingSpec.model_validate_json(args.spec.read_text()), args.steps, args.output)
        return

    facts = machine_facts()
    print(f"Machine: {facts}", flush=True)
    model_dir = base_model(args.model_dir)
    tokenizer = load_tokenizer(str(model_dir))
    pool, valid = build_data(args.data, args.max_reviews)
    hyperparameters = {"batch_size": args.batch_size, "max_seq_length": args.max_seq_length, "packing": True}
    with tempfile.TemporaryDirectory(prefix="ftjobs-bench-") as name:
        tmp = Path(name)
        train, rows = training_file(
            pool,
            tmp / "train.jsonl",
            tokenizer,
            args.steps,
            args.batch_size,
            args.max_seq_length,
            packing=True,
        )
        n_train = len(read_jsonl(train))
        print(f"{args.steps} steps each: {n_train} examples, {len(rows)} packed rows...", flush=True)
        spec = sft_spec(tmp / "ours", model_dir, train, **hyperparameters)
        training = train_both(spec, rows, n_train, tmp, args.slice)
        print("Scoring the base model and both adapters on the validation set...", flush=True)
        valid_path = write_jsonl(tmp / "valid.jsonl", valid)
        valid_examples = load_dataset(valid_path, "chat", tokenizer, args.max_seq_length).examples
        ours_adapter, plain_adapter = training.adapters
        training.ours.loss = validation_loss(model_dir, ours_adapter, valid_examples, args.batch_size)
        training.plain.loss = validation_loss(model_dir, plain_adapter, valid_examples, args.batch_size)
        base_loss = validation_loss(model_dir, None, valid_examples, args.batch_size)
        leak = packing_leak(model_dir, valid_examples, args.max_seq_length)

    fill = sum(row.length for row in rows) / (len(rows) * args.max_seq_length)
    lengths = [example.length for example in valid_examples]
    notes = [
        f"Data ({args.data}): " + DATA_NOTES[args.data].format(k=args.max_reviews),
        f"  Training file: the first {n_train} examples ({training.truncated} cut at max_seq_length), "
        f"which pack into {len(rows)} rows of <= "
        f"{args.max_seq_length} tokens ({fill:.1%} full) = {args.steps} batches of {args.batch_size}; "
        f"validation: {len(valid_examples)} examples ({min(lengths)}-{max(lengths)} tokens).",
        training.background,
        f"Packed rows stay apart: max |logit diff| of 3 examples in one row vs each alone {leak[0]:.1e} "
        f"(an all-ones mask over the same row, which leaks: {leak[1]:.1e}).",
    ]
    report(facts, notes, training.ours, training.plain, base_loss)


if __name__ == "__main__":
    main()
