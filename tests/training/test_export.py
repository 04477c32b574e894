"""Merged export of lora, dora and qlora adapters on the tiny models: the merge reproduces the adapter on its
base, reloads through the auto class of its head, keeps a classifier's trained head, fails loudly (and
writes nothing) when the merged model does not reproduce the trained one, and refuses other methods."""

import copy
import json
import shutil
from pathlib import Path
from typing import Any, get_args

import bitsandbytes as bnb
import pytest
import torch
from peft import PeftModel
from peft.utils import ModulesToSaveWrapper
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from models.spec import LORA_FAMILY, ResolvedHyperparameters, TrainingType
from tests.tiny_model import CORPUS, build_tiny_bert, build_tiny_llama
from worker.training.device import DeviceConfig, select_device
from worker.training.export import ExportMismatch, compare, export_merged, prompt_logits
from worker.training.loading import load_model, load_tokenizer
from worker.training.methods import get_method

DEVICE = select_device()
EXACT = 1e-5
"""float32 on the CPU: a merge on the tiny models is exact up to rounding (~1e-6)."""
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".ckpt"}


def hyperparameters(method: str) -> ResolvedHyperparameters:
    return ResolvedHyperparameters(
        training_type=method,  # type: ignore[arg-type]
        n_epochs=1,
        batch_size=2,
        learning_rate_multiplier=1.0,
        learning_rate=1e-3,
        lora_r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        lora_target_modules="all-linear",
        max_seq_length=32,
        warmup_ratio=0.0,
    )


def adapted_model(
    path: Path,
    method: str,
    auto_class: Any = AutoModelForCausalLM,
    device: DeviceConfig = DEVICE,
    **load: Any,
) -> nn.Module:
    """`method` prepared on the base at `path`, every trainable tensor moved off its initial value as
    training would move it: lora_B starts at zero (no effect) and a classifier's trained head copy starts
    equal to the base's, so without this a merge that dropped either would still pass."""
    method_ = get_method(method)
    base = load_model(str(path), device, auto_class, **method_.load_options(device), **load)
    torch.manual_seed(0)
    model = method_.prepare(base, hyperparameters(method))
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.1)
    return model.eval()


def prompts_for(tokenizer: PreTrainedTokenizerBase) -> list[list[int]]:
    return [tokenizer(line)["input_ids"] for line in CORPUS.splitlines()[1:5]]


def float_loader(
    path: Path, auto_class: Any = AutoModelForCausalLM, device: DeviceConfig = DEVICE, **load: Any
) -> Any:
    return lambda: load_model(str(path), device, auto_class, **load)


def assert_published(directory: Path) -> None:
    """A whole model and its tokenizer, safetensors only, nothing left staged beside it."""
    files = {path.name for path in directory.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= files
    assert "adapter_config.json" not in files
    assert not {name for name in files if Path(name).suffix in PICKLE_SUFFIXES}
    assert [path.name for path in directory.parent.iterdir()] == [directory.name]


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_merged_model_reloads_and_reproduces_the_adapter(
    method: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    adapted = adapted_model(tiny_model_dir, method)
    tokenizer = load_tokenizer(str(tiny_model_dir))
    prompts = prompts_for(tokenizer)
    before = prompt_logits(adapted, prompts)
    directory = tmp_path / "out" / "merged"

    report = export_merged(adapted, method, float_loader(tiny_model_dir), tokenizer, prompts, directory)

    assert report.directory == directory and report.trained_checked
    assert report.merge.max_abs_diff <= EXACT and report.trained.max_abs_diff <= EXACT
    assert report.merge.argmax_agreement == report.trained.argmax_agreement == 1.0
    assert report.adapter_effect > 0.1  # so the checks could see a merge that dropped the adapter
    assert_published(directory)
    reloaded = AutoModelForCausalLM.from_pretrained(directory)
    assert not any("lora" in name for name, _ in reloaded.named_parameters())
    for want, got in zip(before, prompt_logits(reloaded, prompts), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=EXACT)
    # The caller's trained model is untouched: still the adapter on its base, computing what it did.
    assert isinstance(adapted, PeftModel) and any("lora_B" in name for name, _ in adapted.named_parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, prompt_logits(adapted, prompts), strict=True))


def test_qlora_merges_onto_the_float_base(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A qlora adapter trained on the 4-bit base merges into the float base: the export is a plain float
    model equal to the adapter artifact applied to the float base with peft's own loader, and it differs
    from the 4-bit trained model by the quantisation error, which is reported, not checked."""
    adapted = adapted_model(tiny_model_dir, "qlora")
    assert adapted.get_base_model().is_loaded_in_4bit
    tokenizer = load_tokenizer(str(tiny_model_dir))
    prompts = prompts_for(tokenizer)
    directory = tmp_path / "merged"

    report = export_merged(adapted, "qlora", float_loader(tiny_model_dir), tokenizer, prompts, directory)

    assert report.merge.max_abs_diff <= EXACT and not report.trained_checked
    assert report.trained.max_abs_diff > 10 * EXACT  # the 4-bit base's rounding, reported
    assert_published(directory)
    reloaded = AutoModelForCausalLM.from_pretrained(directory)
    assert getattr(reloaded.config, "quantization_config", None) is None
    assert not any(isinstance(module, bnb.nn.Linear4bit) for module in reloaded.modules())
    assert {param.dtype for param in reloaded.parameters()} == {torch.float32}

    artifact = tmp_path / "adapter"
    get_method("qlora").save(adapted, artifact)
    on_float = PeftModel.from_pretrained(load_model(str(tiny_model_dir), DEVICE), artifact)
    for want, got in zip(prompt_logits(on_float, prompts), prompt_logits(reloaded, prompts), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=EXACT)


def test_a_half_precision_base_merges_in_float32(tiny_model_dir: Path, tmp_path: Path) -> None:
    """As on a GPU, where a frozen base trains in bfloat16: the merge is done and verified in float32 (a
    bfloat16 merge rounds the update away), and the gap to the bfloat16 trained model is only reported."""
    bf16 = DeviceConfig(torch.device("cpu"), torch.bfloat16)
    adapted = adapted_model(tiny_model_dir, "lora", device=bf16)
    tokenizer = load_tokenizer(str(tiny_model_dir))
    directory = tmp_path / "merged"

    report = export_merged(
        adapted,
        "lora",
        float_loader(tiny_model_dir, device=bf16),
        tokenizer,
        prompts_for(tokenizer),
        directory,
    )

    assert report.merge.max_abs_diff <= EXACT and report.adapter_effect > 0.1
    assert not report.trained_checked and report.trained.max_abs_diff > EXACT
    reloaded = AutoModelForCausalLM.from_pretrained(directory)
    assert {param.dtype for param in reloaded.parameters()} == {torch.float32}


@pytest.mark.parametrize("method", ["lora", "qlora"])
@pytest.mark.parametrize(
    ("architecture", "auto_class"),
    [
        ("llama", AutoModelForSequenceClassification),
        ("bert", AutoModelForSequenceClassification),
        ("bert", AutoModelForTokenClassification),
    ],
    ids=["llama-seq", "bert-seq", "bert-token"],
)
def test_classifier_merge_keeps_the_trained_head(
    architecture: str, auto_class: Any, method: str, tmp_path: Path, tiny_model_dir: Path
) -> None:
    path = tiny_model_dir if architecture == "llama" else build_tiny_bert(tmp_path / "bert")
    tokenizer = load_tokenizer(str(path))
    head = {"num_labels": 3, "pad_token_id": tokenizer.pad_token_id}
    adapted = adapted_model(path, method, auto_class, **head)
    prompts = prompts_for(tokenizer)
    before = prompt_logits(adapted, prompts)
    directory = tmp_path / "out" / "merged"

    report = export_merged(
        adapted, method, float_loader(path, auto_class, **head), tokenizer, prompts, directory
    )

    assert report.merge.max_abs_diff <= EXACT and report.adapter_effect > 0.1
    assert_published(directory)
    reloaded = auto_class.from_pretrained(directory)
    heads = {
        name: module.modules_to_save["default"]
        for name, module in adapted.get_base_model().named_modules()
        if isinstance(module, ModulesToSaveWrapper)
    }
    assert heads.keys() == {"score" if architecture == "llama" else "classifier"}
    for name, trained_head in heads.items():
        torch.testing.assert_close(reloaded.get_submodule(name).state_dict(), trained_head.state_dict())
    if method == "lora":
        for row, want, got in zip(prompts, before, prompt_logits(reloaded, prompts), strict=True):
            assert got.shape == (
                (1, 3) if auto_class is AutoModelForSequenceClassification else (1, len(row), 3)
            )
            torch.testing.assert_close(got, want, rtol=0, atol=EXACT)


def test_a_base_that_is_not_the_trained_one_fails_and_writes_nothing(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    adapted = adapted_model(tiny_model_dir, "lora")
    other_base = build_tiny_llama(tmp_path / "other", seed=1)
    tokenizer = load_tokenizer(str(tiny_model_dir))
    out = tmp_path / "out"

    with pytest.raises(
        ExportMismatch, match=r"not the one the adapter trained on \(base_model\.model\.\S+ differs"
    ):
        export_merged(
            adapted, "lora", float_loader(other_base), tokenizer, prompts_for(tokenizer), out / "merged"
        )
    assert not out.exists()


def test_a_merged_model_that_computes_otherwise_fails_and_writes_nothing(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """The base's weights are the trained ones but its config is not (a re-registered base with another
    norm epsilon): the merge is right for that base, yet it does not compute what was trained."""
    adapted = adapted_model(tiny_model_dir, "lora")
    other = tmp_path / "other"
    shutil.copytree(tiny_model_dir, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 0.5}))
    tokenizer = load_tokenizer(str(tiny_model_dir))
    out = tmp_path / "out"

    message = r"the merged and the trained model differ on prompt \d by max \|Δlogit\| \S+ > tolerance 0\.001"
    with pytest.raises(ExportMismatch, match=message) as caught:
        export_merged(adapted, "lora", float_loader(other), tokenizer, prompts_for(tokenizer), out / "merged")
    assert caught.value.max_abs_diff is not None and caught.value.max_abs_diff > 1e-2
    assert not out.exists()


def test_a_tampered_merge_is_caught(tiny_model_dir: Path) -> None:
    adapted = adapted_model(tiny_model_dir, "lora")
    prompts = prompts_for(load_tokenizer(str(tiny_model_dir)))
    expected = prompt_logits(adapted, prompts)
    merged: PreTrainedModel = copy.deepcopy(adapted).merge_and_unload()
    compare(expected, prompt_logits(merged, prompts), EXACT, "merged")

    with torch.no_grad():  # a merge that got one layer's update wrong, by a little
        merged.model.layers[1].mlp.down_proj.weight.add_(1e-3)
    with pytest.raises(ExportMismatch) as caught:
        compare(expected, prompt_logits(merged, prompts), EXACT, "the merged model and the adapter")
    assert caught.value.max_abs_diff > EXACT and caught.value.atol == EXACT
    assert f"on prompt {caught.value.prompt} by" in str(caught.value)

    with torch.no_grad():  # NaN compares false with any tolerance; it must fail, not pass
        merged.model.layers[0].self_attn.q_proj.weight[0, 0] = float("nan")
    with pytest.raises(ExportMismatch, match="by max \\|Δlogit\\| inf"):
        compare(expected, prompt_logits(merged, prompts), 1e9, "the merged model and the adapter")


@pytest.mark.parametrize("method", sorted(set(get_args(TrainingType)) - LORA_FAMILY))
def test_other_methods_are_refused(method: str, tmp_path: Path) -> None:
    def never() -> PreTrainedModel:
        raise AssertionError("no base should load for a refused export")

    with pytest.raises(ValueError, match=f"applies to lora, dora and qlora; {method} artifacts are not LoRA"):
        export_merged(nn.Linear(2, 2), method, never, None, [[1]], tmp_path / "merged")  # type: ignore[arg-type]
    assert not (tmp_path / "merged").exists()


def test_inconsistent_requests_are_refused(tiny_model_dir: Path, tmp_path: Path) -> None:
    adapted = adapted_model(tiny_model_dir, "lora")
    tokenizer = load_tokenizer(str(tiny_model_dir))
    loader = float_loader(tiny_model_dir)
    with pytest.raises(ValueError, match="use_dora=False does not match method 'dora'"):
        export_merged(adapted, "dora", loader, tokenizer, [[5]], tmp_path / "a")
    with pytest.raises(ValueError, match="at least one non-empty prompt"):
        export_merged(adapted, "lora", loader, tokenizer, [], tmp_path / "a")
    with pytest.raises(ValueError, match="must load the unquantised base"):
        export_merged(
            adapted,
            "lora",
            float_loader(tiny_model_dir, **get_method("qlora").load_options(DEVICE)),
            tokenizer,
            [[5]],
            tmp_path / "a",
        )
    (tmp_path / "taken").mkdir()
    with pytest.raises(FileExistsError):
        export_merged(adapted, "lora", loader, tokenizer, [[5]], tmp_path / "taken")
