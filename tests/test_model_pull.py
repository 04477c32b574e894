import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import huggingface_hub
import huggingface_hub.constants
import pytest
import torch

from worker.model_pull import BUILTIN, PullError, check_model_dir, pull


def _no_staging_left(root: Path) -> bool:
    return not any(p.name.endswith(".partial") for p in root.iterdir())


@pytest.mark.e2e
def test_pull_smollm2_converts_gguf_to_a_chat_model_and_reuses_it(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = pull("smollm2-135m-instruct", tmp_path)

    assert path == tmp_path / "smollm2-135m-instruct"
    assert _no_staging_left(tmp_path)
    assert "quantization_config" not in json.loads((path / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    assert tokenizer.chat_template
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()

    mtime = path.stat().st_mtime_ns
    start = time.monotonic()
    assert pull("smollm2-135m-instruct", tmp_path) == path
    assert time.monotonic() - start < 1.0
    assert path.stat().st_mtime_ns == mtime


@pytest.mark.e2e
def test_pull_minilm_extracts_an_embedding_model(tmp_path: Path) -> None:
    from transformers import AutoModel, AutoTokenizer

    path = pull("all-minilm-l6-v2", tmp_path)

    assert _no_staging_left(tmp_path)
    assert not (path / "README.md").exists()
    model = AutoModel.from_pretrained(path, use_safetensors=True, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    batch = tokenizer(["fine-tuning on a laptop"], return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    embedding = hidden.mean(dim=1)[0]
    assert embedding.shape == (384,)
    assert torch.isfinite(embedding).all()


def test_hub_id_without_hub_access_explains_how_to_add_a_local_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A closed local port makes the Hub unreachable even on machines that do have internet access.
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")

    with pytest.raises(PullError, match="Hub is unreachable") as err:
        pull("HuggingFaceTB/SmolLM2-135M", tmp_path)

    assert "ftjobs models add NAME PATH" in str(err.value)
    assert list(tmp_path.iterdir()) == []


def _fake_snapshot(files: list[str], calls: list[dict[str, Any]]) -> Callable[..., str]:
    def snapshot_download(repo_id: str, *, local_dir: Path, **kwargs: Any) -> str:
        calls.append({"repo_id": repo_id, **kwargs})
        local_dir.mkdir(parents=True)
        for name in files:
            (local_dir / name).write_text("{}")
        return str(local_dir)

    return snapshot_download


def test_hub_id_is_downloaded_without_pickle_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict[str, Any]] = []
    fake = _fake_snapshot(["config.json", "model.safetensors", "tokenizer.json"], calls)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)

    path = pull("org/tiny-model", tmp_path)

    assert path == tmp_path / "org--tiny-model"
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert _no_staging_left(tmp_path)
    [call] = calls
    assert call["repo_id"] == "org/tiny-model"
    assert "*.safetensors" in call["allow_patterns"]
    assert {"*.bin", "*.pt"} <= set(call["ignore_patterns"])


def test_hub_repo_without_safetensors_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(huggingface_hub, "snapshot_download", _fake_snapshot(["config.json"], []))

    with pytest.raises(PullError, match="no safetensors weights on the Hub"):
        pull("org/pickle-only", tmp_path)

    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["llama-7b", "../escape", "org/../x", "a/b/c", "org/na--me", ""])
def test_unknown_name_lists_builtins(tmp_path: Path, name: str) -> None:
    with pytest.raises(PullError, match="unknown model") as err:
        pull(name, tmp_path)

    assert all(builtin in str(err.value) for builtin in BUILTIN)
    assert list(tmp_path.iterdir()) == []


def test_existing_broken_destination_is_refused_not_overwritten(tmp_path: Path) -> None:
    dest = tmp_path / "all-minilm-l6-v2"
    dest.mkdir()
    (dest / "notes.txt").write_text("mine")

    with pytest.raises(PullError, match="exists but is not a usable model"):
        pull("all-minilm-l6-v2", tmp_path)

    assert (dest / "notes.txt").read_text() == "mine"


def _model_dir(root: Path, *files: str) -> Path:
    root.mkdir()
    for name in files:
        (root / name).write_text("{}")
    return root


def test_check_model_dir_accepts_config_and_safetensors(tmp_path: Path) -> None:
    check_model_dir(_model_dir(tmp_path / "m", "config.json", "model.safetensors"))


def test_check_model_dir_refuses_pickle_only_weights(tmp_path: Path) -> None:
    with pytest.raises(PullError, match="only has pickle weights"):
        check_model_dir(_model_dir(tmp_path / "m", "config.json", "pytorch_model.bin"))


def test_check_model_dir_refuses_missing_config(tmp_path: Path) -> None:
    with pytest.raises(PullError, match="no config.json"):
        check_model_dir(_model_dir(tmp_path / "m", "model.safetensors"))


def test_check_model_dir_refuses_missing_weights(tmp_path: Path) -> None:
    with pytest.raises(PullError, match="no \\*.safetensors"):
        check_model_dir(_model_dir(tmp_path / "m", "config.json", "tokenizer.json"))


def test_check_model_dir_refuses_missing_shard(tmp_path: Path) -> None:
    path = _model_dir(tmp_path / "m", "config.json", "model-00001-of-00002.safetensors")
    weight_map = {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))

    with pytest.raises(PullError, match="model-00002-of-00002"):
        check_model_dir(path)
