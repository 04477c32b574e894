"""Every training method on the tiny Llama: a few real optimizer steps change exactly the parameters the
method trains, and its saved artifact reloads into the same model."""

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, LlamaForCausalLM, PreTrainedModel

from models.spec import METHODS as TRAITS
from models.spec import ResolvedHyperparameters
from worker.training import methods as methods_package
from worker.training.data import IGNORE_INDEX
from worker.training.device import bnb_4bit_config, select_device
from worker.training.loading import count_parameters, load_model
from worker.training.methods import Method, get_method, register
from worker.training.methods.bitfit import load_bitfit
from worker.training.methods.freeze import freeze_all_but_last_layers, load_freeze
from worker.training.methods.lora import apply_lora
from worker.training.methods.qlora import keep_training_layout
from worker.training.objectives.causal_lm import token_stats

DEVICE = select_device()
METHODS: list[str] = [name for name, traits in TRAITS.items() if traits.family != "features"]
"""Every method trained by gradient steps (feature_extraction fits a classifier head instead)."""
N_VIRTUAL = 4
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".ckpt"}
LINEARS = {
    "self_attn": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "mlp": ["gate_proj", "up_proj", "down_proj"],
}
ADAPTER_NAME_PARTS = {
    "lora": {"lora_A", "lora_B"},
    "dora": {"lora_A", "lora_B", "lora_magnitude_vector"},
    "qlora": {"lora_A", "lora_B"},
    "ia3": {"ia3_l"},
    "prompt_tuning": {"prompt_encoder"},
    "prefix_tuning": {"prompt_encoder"},
    "p_tuning": {"prompt_encoder"},
}
"""What names the parameters a PEFT method adds carry; every one of them trains."""


def hyperparameters(
    training_type: str = "lora", target_modules: list[str] | str = "all-linear", **overrides: int
) -> ResolvedHyperparameters:
    values = {
        "training_type": training_type,
        "n_epochs": 1,
        "batch_size": 2,
        "learning_rate_multiplier": 1.0,
        "learning_rate": 1e-2,
        "lora_r": 4,
        "lora_alpha": 8,
        "lora_dropout": 0.0,
        "lora_target_modules": target_modules,
        "max_seq_length": 32,
        "warmup_ratio": 0.0,
        "trainable_layers": 1,
        "num_virtual_tokens": N_VIRTUAL,
    }
    return ResolvedHyperparameters.model_validate({**values, **overrides})


def load_base(path: Path, method: Method) -> PreTrainedModel:
    model = load_model(str(path), DEVICE, **method.load_options(DEVICE)).eval()
    if method.name == "qlora":
        keep_training_layout(model)  # the tiny model is too narrow for bitsandbytes' CPU inference layout
    return model


def fixed_batch() -> dict[str, torch.Tensor]:
    """Two random sequences, the second right-padded as `collate` does; labels skip the first tokens."""
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, 500, (2, 12), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 9:] = 0
    labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
    labels[:, :3] = IGNORE_INDEX
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits at the input's positions (prompt methods put their virtual tokens' first)."""
    with torch.no_grad():
        output = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    return output.logits[:, -batch["input_ids"].shape[1] :]


def train(model: nn.Module, batch: dict[str, torch.Tensor], steps: int = 3) -> None:
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        loss_sum, _, n_tokens = token_stats(model, batch)
        (loss_sum / n_tokens).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()


@dataclass
class Trained:
    name: str
    model: nn.Module
    base_names: list[str]
    changed_base: set[str]
    """Base parameters whose values differ after training."""
    added: dict[str, nn.Parameter]
    """Parameters the method added to the base (adapters, prompts, new biases), by name in `model`."""
    added_unchanged: set[str]
    base_logits: torch.Tensor
    tuned_logits: torch.Tensor
    artifact: Path


@pytest.fixture(scope="module", params=METHODS)
def trained(
    request: pytest.FixtureRequest, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Trained:
    """One method prepared on the tiny base, trained three steps, and saved."""
    name: str = request.param
    method = get_method(name)
    batch = fixed_batch()
    base = load_base(tiny_model_dir, method)
    base_logits = logits(base, batch)
    before = {n: (p, p.detach().clone()) for n, p in base.named_parameters()}
    base_ids = {id(p) for p, _ in before.values()}

    torch.manual_seed(0)
    model = method.prepare(base, hyperparameters(name))
    added = {n: p for n, p in model.named_parameters() if id(p) not in base_ids}
    added_before = {n: p.detach().clone() for n, p in added.items()}
    train(model, batch)

    artifact = tmp_path_factory.mktemp(f"artifact-{name}")
    method.save(model, artifact)
    return Trained(
        name=name,
        model=model,
        base_names=list(before),
        changed_base={n for n, (p, old) in before.items() if not torch.equal(p.detach(), old)},
        added=added,
        added_unchanged={n for n, p in added.items() if torch.equal(p.detach(), added_before[n])},
        base_logits=base_logits,
        tuned_logits=logits(model, batch),
        artifact=artifact,
    )


def expected_changed_base(trained: Trained) -> set[str]:
    if trained.name == "full":
        return set(trained.base_names)
    if trained.name == "freeze":  # trainable_layers=1 of the tiny model's 2 blocks
        head = {"model.norm.weight", "lm_head.weight"}
        return {n for n in trained.base_names if n.startswith("model.layers.1.") or n in head}
    return set()  # PEFT methods and bitfit leave every base tensor as it was


def test_training_changes_exactly_the_parameters_the_method_trains(trained: Trained) -> None:
    assert trained.changed_base == expected_changed_base(trained)
    trainable = {n for n, p in trained.model.named_parameters() if p.requires_grad}
    if trained.name in ADAPTER_NAME_PARTS:
        assert trained.added and trainable == set(trained.added)
        assert all(ADAPTER_NAME_PARTS[trained.name] & set(n.split(".")) for n in trainable), trainable
    elif trained.name == "bitfit":
        assert (
            set(trained.added)
            == trainable
            == {
                f"model.layers.{i}.{block}.{linear}.bias"
                for i in range(2)
                for block, linears in LINEARS.items()
                for linear in linears
            }
        )
    else:
        assert trained.added == {}
    assert trained.added_unchanged == set()
    if trained.name == "qlora":  # and its base, unchanged down to the packed NF4 bytes, really is 4-bit
        base = trained.model.get_base_model()
        assert base.is_loaded_in_4bit
        layer = base.model.layers[0]
        for block, linears in LINEARS.items():
            for linear in linears:
                assert isinstance(getattr(getattr(layer, block), linear).base_layer, bnb.nn.Linear4bit)


def test_saved_artifact_reloads_into_the_trained_model(trained: Trained, tiny_model_dir: Path) -> None:
    files = {path.name for path in trained.artifact.rglob("*")}
    assert not {name for name in files if Path(name).suffix in PICKLE_SUFFIXES}
    method = get_method(trained.name)
    if trained.name in ADAPTER_NAME_PARTS:
        assert {"adapter_config.json", "adapter_model.safetensors"} <= files
        reloaded: nn.Module = PeftModel.from_pretrained(load_base(tiny_model_dir, method), trained.artifact)
    elif trained.name == "full":
        assert {"config.json", "model.safetensors"} <= files
        reloaded = AutoModelForCausalLM.from_pretrained(trained.artifact)
    else:
        config = json.loads((trained.artifact / "trained_tensors.json").read_text())
        trainable = sorted(n for n, p in trained.model.named_parameters() if p.requires_grad)
        assert (config["training_type"], config["tensors"]) == (trained.name, trainable)
        assert sorted(load_file(trained.artifact / "trained_tensors.safetensors")) == trainable
        loader: Callable[[PreTrainedModel, Path], PreTrainedModel] = (
            load_freeze if trained.name == "freeze" else load_bitfit
        )
        reloaded = loader(load_base(tiny_model_dir, method), trained.artifact)

    reloaded_logits = logits(reloaded.eval(), fixed_batch())
    torch.testing.assert_close(reloaded_logits, trained.tuned_logits, rtol=0, atol=1e-5)
    assert (trained.tuned_logits - trained.base_logits).abs().max() > 1e-2


def test_recipe_loss_matches_the_model_own_loss(trained: Trained) -> None:
    """token_stats scores the input's tokens even when a prompt method adds virtual ones ahead of them."""
    batch = fixed_batch()
    with torch.no_grad():
        loss_sum, _, n_tokens = token_stats(trained.model, batch)
        own = trained.model(**batch, use_cache=False).loss
    assert (loss_sum / n_tokens).item() == pytest.approx(own.item(), rel=1e-5)


def test_qlora_gradients_are_the_same_after_a_validation_pass(tiny_model_dir: Path) -> None:
    method, batch = get_method("qlora"), fixed_batch()

    def lora_gradients(validate_first: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = method.prepare(
            load_model(str(tiny_model_dir), DEVICE, **method.load_options(DEVICE)), hyperparameters()
        )
        for name, param in model.named_parameters():
            if "lora_B" in name:  # nonzero, so gradients flow back through every layer to lora_A
                nn.init.normal_(param, std=0.1)
        if validate_first:
            model.eval()
            logits(model, batch)
        model.train()
        loss_sum, _, n_tokens = token_stats(model, batch)
        (loss_sum / n_tokens).backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    plain, after_validation = lora_gradients(False), lora_gradients(True)
    assert plain.keys() == after_validation.keys()
    for name, grad in plain.items():
        torch.testing.assert_close(after_validation[name], grad, msg=name)


def test_4bit_weights_count_as_their_full_size(tiny_model_dir: Path) -> None:
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    quantized = load_base(tiny_model_dir, get_method("qlora"))
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in quantized.modules())
    n_base = count_parameters(base.parameters())
    assert n_base == sum(p.numel() for p in base.parameters())
    assert count_parameters(quantized.parameters()) == n_base


@pytest.fixture(scope="module")
def tied_model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama with its LM head tied to the input embeddings, as SmolLM2 has it."""
    config = AutoConfig.from_pretrained(tiny_model_dir, tie_word_embeddings=True)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tied")
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def test_freeze_with_a_tied_head_trains_the_shared_matrix(tied_model_dir: Path, tmp_path: Path) -> None:
    method = get_method("freeze")
    base = load_base(tied_model_dir, method)
    assert base.lm_head.weight is base.model.embed_tokens.weight
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    batch = fixed_batch()
    base_logits = logits(base, batch)

    model = method.prepare(base, hyperparameters("freeze", trainable_layers=0))
    train(model, batch)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed == {"model.embed_tokens.weight", "model.norm.weight"}
    assert model.lm_head.weight is model.model.embed_tokens.weight

    method.save(model, tmp_path)
    assert sorted(load_file(tmp_path / "trained_tensors.safetensors")) == sorted(changed)
    reloaded = load_freeze(load_base(tied_model_dir, method), tmp_path)
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    torch.testing.assert_close(logits(reloaded, batch), logits(model, batch), rtol=0, atol=1e-5)
    assert (logits(model, batch) - base_logits).abs().max() > 1e-2


def test_freeze_refuses_what_it_cannot_do(tiny_model_dir: Path) -> None:
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with pytest.raises(ValueError, match="trainable_layers=3 but LlamaForCausalLM has only 2 transformer"):
        freeze_all_but_last_layers(base, hyperparameters("freeze", trainable_layers=3))
    base.model.extra = nn.ModuleList([nn.Linear(2, 2), nn.Linear(2, 2)])  # now two lists could be the blocks
    with pytest.raises(ValueError, match="cannot tell which modules of LlamaForCausalLM are its transformer"):
        freeze_all_but_last_layers(base, hyperparameters("freeze"))


def test_loaders_refuse_another_methods_artifact(tiny_model_dir: Path, tmp_path: Path) -> None:
    method = get_method("bitfit")
    method.save(method.prepare(load_base(tiny_model_dir, method), hyperparameters("bitfit")), tmp_path)
    with pytest.raises(ValueError, match="holds a bitfit artifact, not freeze"):
        load_freeze(load_base(tiny_model_dir, method), tmp_path)


def test_registry_and_table_agree_and_refuse_unknown_or_duplicate_names() -> None:
    assert [get_method(name).name for name in METHODS] == METHODS
    modules = {path.stem for path in Path(methods_package.__file__).parent.glob("[!_]*.py")}
    assert modules == set(METHODS)  # one module per gradient-trained row, and no module without one
    assert get_method("lora").prepare is apply_lora
    for name in ("no_such_method", "../lora", "", "_tensors"):
        with pytest.raises(ValueError, match="unknown training method"):
            get_method(name)
    with pytest.raises(ValueError, match="registered twice"):
        register("lora")(apply_lora)
    with pytest.raises(ValueError, match="'sparse_lora' has no row in models.spec.METHODS"):
        register("sparse_lora")(apply_lora)


@pytest.mark.parametrize(
    ("targets", "expected"),
    [
        ("all-linear", {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
        (["q_proj", "v_proj"], {"q_proj", "v_proj"}),
    ],
)
def test_lora_trains_only_adapters_on_the_target_modules(
    tiny_model_dir: Path, targets: list[str] | str, expected: set[str]
) -> None:
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = get_method("lora").prepare(base, hyperparameters("lora", targets))

    assert isinstance(model, PeftModel)
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    assert trainable and all(".lora_A." in name or ".lora_B." in name for name in trainable)
    assert {name.split(".lora_")[0].rsplit(".", 1)[-1] for name in trainable} == expected
    config = model.peft_config["default"]
    assert (config.r, config.lora_alpha, config.task_type) == (4, 8, "CAUSAL_LM")


def test_cpu_trains_in_float32_and_4bit_config_follows_the_device() -> None:
    if torch.cuda.is_available():
        pytest.skip("CPU-only expectation")
    assert (DEVICE.device.type, DEVICE.dtype, DEVICE.needs_grad_scaling) == ("cpu", torch.float32, False)
    config = bnb_4bit_config(DEVICE)
    assert config.load_in_4bit and config.bnb_4bit_quant_type == "nf4" and config.bnb_4bit_use_double_quant
    assert config.bnb_4bit_compute_dtype == torch.float32
    options = get_method("qlora").load_options(DEVICE)
    assert options["quantization_config"].to_dict() == config.to_dict()
    assert options["device_map"] == {"": DEVICE.device}
