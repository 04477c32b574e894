"""The batched mixed-adapter LoRA forward answers as peft does: every row as if its adapter ran alone, across
ranks, scalings (rslora), target modules and the base, and with the weights a slot holds now."""

from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils.hotswap import hotswap_adapter

from inference.engine import Engine
from inference.mixed_lora import MixedLoRA
from models.inference import ChatCompletionRequest
from tests.inference.conftest import (
    MESSAGES,
    fresh_llama,
    publish,
    randomize,
    reference_answer,
    reference_peft,
    settings_for,
    target,
    training_prompt_ids,
)
from worker.training.loading import load_tokenizer

ADAPTERS = ["lora-a", "lora-b", "lora-r8", "lora-qv", "rslora"]
"""Rank 4 twice, rank 8, rank 2 on q and v only, and rank 4 with rslora's scaling (alpha / sqrt(r))."""
ROWS = ["lora-a", "__base__", "lora-r8", "lora-qv", "lora-b", "rslora", "lora-a"]


@pytest.fixture(scope="module")
def adapter_dirs(
    artifacts_root: Path, base_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    rslora = get_peft_model(
        fresh_llama(base_dir), LoraConfig(r=4, lora_alpha=32, use_rslora=True, target_modules="all-linear")
    )
    randomize(rslora, "lora_B", 21)
    directory = tmp_path_factory.mktemp("rslora") / "rslora"
    publish(rslora, directory, base_dir, "lora")
    return {key: artifacts_root / key for key in ADAPTERS[:-1]} | {"rslora": directory}


def close(ours: torch.Tensor, theirs: torch.Tensor) -> bool:
    """Float32 sums in another order (one stacked matmul, scaling before lora_B): ~1e-6 apart, 1e-5 at
    worst seen; greedy tokens must not move."""
    return torch.allclose(ours, theirs, atol=1e-4, rtol=1e-4)


def served(base_dir: Path, adapter_dirs: dict[str, Path]) -> PeftModel:
    """Every adapter on one base, named by its key, as the store keeps them."""
    model = PeftModel.from_pretrained(
        fresh_llama(base_dir), adapter_dirs[ADAPTERS[0]], adapter_name=ADAPTERS[0]
    )
    for key in ADAPTERS[1:]:
        model.load_adapter(adapter_dirs[key], adapter_name=key)
    return model.eval()


def batch(base_dir: Path, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of different prompts, left-padded as the batcher pads them."""
    tokenizer = load_tokenizer(str(base_dir))
    prompts = [training_prompt_ids(tokenizer, MESSAGES[: 2 + index % 3]) for index in range(rows)]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def logits(model: PeftModel, ids: torch.Tensor, mask: torch.Tensor, adapters: list[str]) -> torch.Tensor:
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return model(
            input_ids=ids, attention_mask=mask, position_ids=positions, adapter_names=adapters
        ).logits


def test_a_mixed_batch_gives_each_row_its_adapters_logits_alone(
    base_dir: Path, adapter_dirs: dict[str, Path]
) -> None:
    model = served(base_dir, adapter_dirs)
    ids, mask = batch(base_dir, len(ROWS))
    by_peft = logits(model, ids, mask, ROWS)
    mixed = MixedLoRA()
    mixed.install(model.modules())
    assert len(mixed.forwards) == 2 * 7  # every linear layer of the two decoder layers
    batched = logits(model, ids, mask, ROWS)
    real = mask.bool()  # padding's logits are no row's
    assert close(batched[real], by_peft[real])
    again = logits(model, ids, mask, ROWS)  # the layout's plans, reused
    assert torch.equal(again, batched)
    for index, key in enumerate(ROWS):
        alone_model = (
            reference_peft(base_dir, adapter_dirs[key]) if key != "__base__" else fresh_llama(base_dir)
        )
        row = slice(index, index + 1)
        with torch.no_grad():
            alone = alone_model(
                input_ids=ids[row],
                attention_mask=mask[row],
                position_ids=(mask[row].cumsum(-1) - 1).clamp(min=0),
            ).logits
        real = mask[index].bool()
        assert close(batched[index, real], alone[0, real]), key
        assert torch.equal(batched[index, real].argmax(-1), alone[0, real].argmax(-1)), key


def test_after_forget_a_slot_answers_with_the_weights_copied_into_it(
    base_dir: Path, adapter_dirs: dict[str, Path]
) -> None:
    model = served(base_dir, adapter_dirs)
    mixed = MixedLoRA()
    mixed.install(model.modules())
    ids, mask = batch(base_dir, 2)
    rows = ["lora-a", "__base__"]
    before = logits(model, ids, mask, rows)
    hotswap_adapter(model, str(adapter_dirs["lora-b"]), adapter_name="lora-a")
    mixed.forget()
    after = logits(model, ids, mask, rows)
    expected = logits(reference_peft(base_dir, adapter_dirs["lora-b"]), ids[:1], mask[:1], ["default"])
    assert not torch.allclose(after[0], before[0])
    assert close(after[0], expected[0])
    assert torch.equal(after[1], before[1])


def test_adapters_swapped_into_one_slot_in_turn_each_answer_as_alone(
    artifacts_root: Path, base_dir: Path
) -> None:
    """One cached adapter: each new one goes into the slot the one before last had, under the same name, so a
    batch plan kept from before would answer with the old weights."""
    engine = Engine(settings_for(artifacts_root, cache=1))
    tokenizer = load_tokenizer(str(base_dir))
    prompt = training_prompt_ids(tokenizer, MESSAGES)
    request = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": MESSAGES, "temperature": 0, "max_tokens": 12}
    )
    names = set()
    for key in ["lora-a", "lora-b", "lora-c", "lora-a"]:
        answer = engine.chat(target(base_dir, key), request)["choices"][0]["message"]["content"]
        expected = reference_answer(reference_peft(base_dir, artifacts_root / key), tokenizer, prompt, 12)[1]
        assert answer == expected, key
        engine.models.settle(60)
        peft = engine.models.bases[str(base_dir)].peft
        assert peft is not None
        names.update(peft.peft_config)
    assert len(names) == 2  # the two slots took turns
