"""The `ftjobs` command. Local commands (base models, keys) on a data directory; the API's commands as a user
runs them, against one real `ftjobs up` with a tiny model: upload with a progress bar, a job created,
followed to success and inspected, its model downloaded and asked, a second job paused, resumed and
cancelled, the admin, webhook and pre-flight routes, and the errors (one line on stderr, exit code 1, an
empty stdout under --json)."""

import json
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from safetensors import safe_open
from typer.testing import CliRunner, Result

from cli.main import app
from tests.e2e.servers import cli, create_key, free_port, process
from tests.jobs_helpers import wait_for, write_chat

runner = CliRunner()


def test_models_add_and_list(tmp_path: Path, tiny_model_dir: Path) -> None:
    data = ["--data-dir", str(tmp_path)]
    added = runner.invoke(app, ["models", "add", "tiny", str(tiny_model_dir), *data])
    assert added.exit_code == 0, added.output
    listed = runner.invoke(app, ["models", "list", *data])
    assert listed.output.strip() == f"tiny\t{tiny_model_dir.resolve()}"


def test_models_add_refuses_bad_input(tmp_path: Path, tiny_model_dir: Path) -> None:
    data = ["--data-dir", str(tmp_path)]
    not_a_model = runner.invoke(app, ["models", "add", "x", str(tmp_path), *data])
    assert not_a_model.exit_code == 2 and "config.json" in not_a_model.output
    bad_name = runner.invoke(app, ["models", "add", "a:b", str(tiny_model_dir), *data])
    assert bad_name.exit_code == 2 and "invalid model name" in bad_name.output


def test_models_pull_unknown_name(tmp_path: Path) -> None:
    result = runner.invoke(app, ["models", "pull", "no-such-model", "--data-dir", str(tmp_path)])
    assert result.exit_code == 2 and "smollm2-135m-instruct" in result.output


def test_keys_create_list_and_revoke(tmp_path: Path) -> None:
    data = ["--data-dir", str(tmp_path)]
    created = runner.invoke(app, ["keys", "create", "--org", "acme", "--name", "ci", *data])
    assert created.exit_code == 0, created.output
    key = created.stdout.strip()  # the key alone on stdout, for KEY=$(ftjobs keys create ...)
    assert key.startswith("sk-ftj-") and "\n" not in key
    key_id = key.removeprefix("sk-ftj-").split("-")[0]
    listed = runner.invoke(app, ["keys", "list", "--org", "acme", *data]).stdout
    assert listed.startswith(f"{key_id}\tacme\tci\tsk-ftj-") and key not in listed
    assert runner.invoke(app, ["keys", "revoke", key_id, *data]).exit_code == 0
    revoked = runner.invoke(app, ["keys", "list", *data]).stdout.split("\t")
    assert revoked[-1].strip() != "-"  # revoked_at
    admin = runner.invoke(app, ["keys", "create", "--admin", *data]).stdout.strip()
    assert admin.startswith("sk-ftjadmin-")
    for bad in (["keys", "create", *data], ["keys", "create", "--org", "Bad Name", *data]):
        assert runner.invoke(app, bad).exit_code == 2
    assert runner.invoke(app, ["keys", "revoke", "nope", *data]).exit_code == 2


# The API's commands, against a real server.

ADMIN_KEY = "sk-ftjadmin-cli-test-9fQ2xL7vKp3RtZ8mWc4NbJ6h"  # FTJOBS_ADMIN_KEY must look random
FAST = ["-p", "n_epochs=1", "-p", "batch_size=4", "--hyperparameters", '{"max_seq_length": 512}']


@dataclass
class Server:
    base_url: str
    key: str
    inference_health: str
    tmp: Path

    def env(self, **extra: str | None) -> dict[str, str | None]:
        # Variables of the machine running the tests must not leak in: these decide where and as whom.
        return {
            "FTJOBS_BASE_URL": self.base_url,
            "OPENAI_BASE_URL": None,
            "OPENAI_API_KEY": self.key,
            "FTJOBS_API_KEY": None,
            "FTJOBS_ADMIN_KEY": None,
            "TTY_COMPATIBLE": None,
            "FORCE_COLOR": None,
            **extra,
        }

    def run(self, *args: str, code: int = 0, input: str | None = None, **env: str | None) -> Result:
        """`ftjobs ARGS` as a user runs it: the exit code is `code`, and nothing escaped as a traceback."""
        result = runner.invoke(app, list(args), env=self.env(**env), input=input)
        assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
        assert result.exit_code == code, (result.stdout, result.stderr)
        return result

    def json(self, *args: str, **env: str | None) -> dict:  # type: ignore[type-arg]
        return json.loads(self.run(*args, "--json", **env).stdout)  # one document, nothing else


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("cli")
    env = {
        "FTJOBS_DATA_DIR": str(tmp / "data"),
        "FTJOBS_HEARTBEAT_SECONDS": "0.5",
        "FTJOBS_ADMIN_KEY": ADMIN_KEY,
    }
    cli("models", "add", "tiny-llama", str(tiny_model_dir), env=env)
    port, inference_port = free_port(), free_port()
    up = ["up", "--port", str(port), "--inference-port", str(inference_port)]
    with process(up, env, tmp / "up.log", f"http://127.0.0.1:{port}/healthz"):
        yield Server(
            f"http://127.0.0.1:{port}/v1", create_key(env), f"http://127.0.0.1:{inference_port}/healthz", tmp
        )


@pytest.fixture(scope="module")
def training_file(server: Server) -> str:
    file: dict = server.json("files", "upload", str(write_chat(server.tmp / "train.jsonl", 12)))  # type: ignore[type-arg]
    return str(file["id"])


@pytest.mark.e2e
def test_a_job_from_upload_to_chat(server: Server, training_file: str) -> None:
    # An upload streams through a progress bar on stderr (drawn when stderr is a terminal); stdout has
    # the file's JSON alone.
    valid = write_chat(server.tmp / "valid.jsonl", 4, "validation")
    uploaded = server.run("files", "upload", str(valid), "--json", TTY_COMPATIBLE="1")
    assert json.loads(uploaded.stdout)["bytes"] == valid.stat().st_size
    size = re.search(r"(\d+\.\d)/\1 kB", uploaded.stderr)  # the bar's last frame: all bytes sent
    assert "valid.jsonl" in uploaded.stderr and size, uploaded.stderr
    assert "valid.jsonl" not in server.run("files", "upload", str(valid)).stderr  # no terminal, no bar
    validation_file = json.loads(uploaded.stdout)["id"]
    listed = server.run("files", "list", "--purpose", "fine-tune").stdout.splitlines()
    assert listed[0].split() == ["id", "purpose", "bytes", "filename", "created_at", "status"]
    assert any(line.startswith(validation_file) for line in listed)

    files = ["--training-file", training_file, "--validation-file", validation_file]
    options = ["--suffix", "cli", "--seed", "3", "--metadata", "via=cli", *FAST]
    created = server.json("jobs", "create", "--model", "tiny-llama", *files, *options)
    assert created["status"] == "validating_files" and created["metadata"] == {"via": "cli"}
    assert created["method"]["supervised"]["hyperparameters"]["max_seq_length"] == 512
    job_id = created["id"]

    # Followed to the end: the events on stderr (as lines: no terminal), the job's JSON on stdout, exit 0.
    followed = server.run("jobs", "follow", job_id, "--poll", "0.5", "--json")
    job = json.loads(followed.stdout)
    assert job["status"] == "succeeded" and job["fine_tuned_model"].startswith("ft:tiny-llama:local:cli:")
    assert "Step 3/3: training loss=" in followed.stderr
    assert followed.stderr.rstrip().endswith("[info] The job has successfully completed")
    again = server.run("jobs", "follow", job_id)  # a finished job: its history, then its status
    assert again.stdout == f"{job_id}: succeeded {job['fine_tuned_model']}\n"
    assert "Fine-tuning job started" in again.stderr

    # --json is exactly the API's document.
    headers = {"Authorization": f"Bearer {server.key}"}
    assert (
        server.json("jobs", "get", job_id)
        == httpx.get(f"{server.base_url}/fine_tuning/jobs/{job_id}", headers=headers).json()
    )
    assert [j["id"] for j in server.json("jobs", "list", "--metadata", "via=cli")["data"]] == [job_id]
    assert server.json("jobs", "list", "--metadata", "via=nothing")["data"] == []
    assert [j["id"] for j in server.json("jobs", "list", "--status", "succeeded")["data"]] == [job_id]
    assert server.json("jobs", "list", "--status", "running")["data"] == []
    assert re.search(r"^status +succeeded$", server.run("jobs", "get", job_id).stdout, re.MULTILINE)
    events = server.run("jobs", "events", job_id, "--limit", "3").stdout.splitlines()
    assert events[-1].endswith("The job has successfully completed")  # oldest first for people
    assert server.json("jobs", "events", job_id, "--limit", "1")["data"][0]["message"] == (
        "The job has successfully completed"  # newest first, as the API lists them
    )
    checkpoint = server.json("jobs", "checkpoints", job_id)["data"][0]
    assert checkpoint["fine_tuned_model_checkpoint"] == f"{job['fine_tuned_model']}:ckpt-step-3"
    table = server.run("jobs", "checkpoints", job_id).stdout.splitlines()
    assert table[0].split() == [
        "step_number",
        "fine_tuned_model_checkpoint",
        "train_loss",
        "valid_loss",
        "full_valid_loss",
    ]
    results = server.tmp / "results.csv"
    assert server.run("files", "content", job["result_files"][0], "-o", str(results)).stdout == f"{results}\n"
    assert results.read_text().startswith("step,train_loss")
    assert server.run("files", "content", job["result_files"][0]).stdout == results.read_text()

    # The model: listed, shown, downloaded as an archive of safetensors.
    model = job["fine_tuned_model"]
    assert {m["id"] for m in server.json("models", "available")["data"]} >= {"tiny-llama", model}
    assert server.json("models", "get", model)["base_model"] == "tiny-llama"
    archive = Path(
        server.run("models", "download", model, "-o", str(server.tmp / "model.tar.gz")).stdout.strip()
    )
    with tarfile.open(archive) as tar:
        tar.extractall(server.tmp / "unpacked", filter="data")
    (weights,) = (server.tmp / "unpacked").glob("*/adapter_model.safetensors")
    with safe_open(str(weights), "np") as tensors:
        assert any("lora_A" in name for name in tensors.keys())  # noqa: SIM118 (safe_open is no dict)

    # Asked: the streamed text is the whole answer's, and a message can come from stdin.
    wait_for(lambda: _answers(server.inference_health), 120, "the inference server")
    question = [
        "chat",
        model,
        "Is this review positive or negative? A moving film.",
        "--max-tokens",
        "6",
        "--temperature",
        "0",
    ]
    answer = server.json(*question, "--no-stream")
    text = answer["choices"][0]["message"]["content"]
    assert answer["object"] == "chat.completion" and answer["model"] == model
    assert server.run(*question).stdout == f"{text}\n"
    piped = server.run("chat", model, "--max-tokens", "2", input="Hello?")
    assert piped.stdout.strip()
    assert server.json("complete", model, "The film was", "--max-tokens", "3")["object"] == "text_completion"
    refused = server.run("classify", model, "great", code=1)  # a language model does not classify
    assert refused.stderr.startswith("error 400 model_not_supported:") and not refused.stdout

    assert server.json("models", "delete", model)["deleted"] is True
    gone = server.run("models", "get", model, "--json", code=1)
    assert gone.stdout == "" and gone.stderr.startswith("error 404 not_found:")


@pytest.mark.e2e
def test_pause_resume_cancel_and_preflight(server: Server, training_file: str) -> None:
    job = ["--model", "tiny-llama", "--training-file", training_file, *FAST]
    estimate = server.json("jobs", "preflight", *job)  # the same options make the same body
    assert estimate["object"] == "fine_tuning.preflight" and estimate["training_file"]["n_examples"] == 12
    assert estimate["hyperparameters"]["n_epochs"] == 1
    job_id = server.json("jobs", "create", *job)["id"]
    assert server.json("jobs", "pause", job_id)["status"] == "paused"
    assert server.json("jobs", "resume", job_id)["status"] == "queued"
    assert server.json("jobs", "cancel", job_id)["status"] == "cancelled"
    followed = server.run("jobs", "follow", job_id, "--json", code=3)  # ended without succeeding
    assert json.loads(followed.stdout)["status"] == "cancelled"
    assert "Fine-tuning job cancelled" in followed.stderr


@pytest.mark.e2e
def test_admin_and_webhooks(server: Server) -> None:
    admin = {"FTJOBS_ADMIN_KEY": ADMIN_KEY}
    org = server.json("admin", "orgs", "create", "cli-team", **admin)
    assert org["name"] in server.run("admin", "orgs", "list", **admin).stdout
    policy = ("--weight", "2", "--cap", "cpu=1", "--cap", "*=4", "--budget", "10")
    set_policy = server.json("admin", "orgs", "set-policy", "cli-team", *policy, **admin)
    assert (set_policy["share_weight"], set_policy["device_caps"], set_policy["monthly_device_hours"]) == (
        2.0,
        {"cpu": 1, "*": 4},
        10.0,
    )
    cleared = server.json("admin", "orgs", "set-policy", "cli-team", "--cap", "none", **admin)
    assert cleared["device_caps"] is None and cleared["share_weight"] == 2.0
    created = server.run("admin", "keys", "create", "cli-team", "--name", "ci", **admin)
    key = created.stdout.strip()  # the key alone on stdout, by the organisation's name
    assert key.startswith("sk-ftj-") and "not shown again" in created.stderr
    assert server.json("files", "list", OPENAI_API_KEY=key)["data"] == []  # it works, and sees its own
    (listed,) = server.json("admin", "keys", "list", org["id"], **admin)["data"]
    assert server.json("admin", "keys", "revoke", listed["id"], **admin)["revoked_at"]
    revoked = server.run("files", "list", OPENAI_API_KEY=key, code=1)
    assert revoked.stderr.startswith("error 401 invalid_api_key:")
    assert server.run("admin", "orgs", "list", code=1).stderr.startswith("error 403 permission_denied:")

    endpoint = server.json(
        "webhooks", "create", "https://example.com/hook", "--event", "fine_tuning.job.failed"
    )
    assert endpoint["signing_secret"].startswith("whsec_")
    assert server.json("webhooks", "get", endpoint["id"])["event_types"] == ["fine_tuning.job.failed"]
    assert server.json("webhooks", "update", endpoint["id"], "--name", "ops")["name"] == "ops"
    assert [e["id"] for e in server.json("webhooks", "list")["data"]] == [endpoint["id"]]
    assert server.json("webhooks", "deliveries", endpoint["id"])["data"] == []
    assert "fine_tuning.job.succeeded" in server.run("webhooks", "event-types").stdout.splitlines()
    assert server.json("webhooks", "delete", endpoint["id"])["deleted"] is True


@pytest.mark.e2e
def test_errors_are_one_line_on_stderr(server: Server) -> None:
    missing = server.run("files", "get", "file-nope", "--json", code=1)
    assert missing.stdout == ""
    assert missing.stderr == "error 404 not_found: No such file: 'file-nope' (param: file_id)\n"
    too_many = server.run(
        "jobs", "create", "--model", "tiny-llama", "--training-file", "f", "-p", "n_epochs=99", code=1
    )
    assert "(param: method.supervised.hyperparameters.n_epochs)" in too_many.stderr
    nowhere = server.run("jobs", "list", FTJOBS_BASE_URL=f"http://127.0.0.1:{free_port()}/v1", code=1)
    assert nowhere.stderr.startswith("error: no answer from http://127.0.0.1:")
    assert "OPENAI_API_KEY" in server.run("jobs", "list", OPENAI_API_KEY=None, code=2).stderr
    assert "KEY=VALUE" in server.run("jobs", "list", "--metadata", "novalue", code=2).stderr
    assert (
        "expected an object"
        in server.run(
            "jobs", "create", "--model", "m", "--training-file", "f", "--hyperparameters", "[]", code=2
        ).stderr
    )
    # A reinforcement job's grader comes from a file, sent as OpenAI's shape (the API checks it).
    rft = ["jobs", "create", "--model", "tiny-llama", "--training-file", "f", "--method", "reinforcement"]
    assert "--grader" in server.run(*rft, code=2).stderr
    grader = server.tmp / "grader.json"
    grader.write_text(json.dumps({"type": "string_check", "name": "exact", "input": "{{sample.output_text}}",
                                  "reference": "{{item.label}}", "operation": "nope"}))  # fmt: skip
    refused = server.run(*rft, "--grader", str(grader), code=1).stderr
    assert refused.startswith("error 400") and "(param: method.reinforcement.grader" in refused, refused
    assert "cannot read it" in server.run(*rft, "--grader", str(server.tmp / "none.json"), code=2).stderr


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.mark.e2e
def test_a_sweep_in_ftjobs_up(server: Server, training_file: str) -> None:
    """`ftjobs up` drives sweeps: its one trial runs and the reconciler's tick finishes the sweep."""
    valid = server.json("files", "upload", str(write_chat(server.tmp / "valid.jsonl", 4, "validation")))["id"]
    hyper = {"n_epochs": 1, "batch_size": 4, "max_seq_length": 512}
    base = {
        "model": "tiny-llama",
        "training_file": training_file,
        "validation_file": valid,
        "method": {"type": "supervised", "supervised": {"hyperparameters": hyper}},
    }
    body = server.tmp / "sweep-job.json"
    body.write_text(json.dumps(base))
    sweep = ["sweeps", "create", "--job", str(body), "--max-trials", "1"]
    bad = server.run(*sweep, "--search-space", '{"lora_rx": [4]}', code=1)
    assert "(param: search_space.lora_rx)" in bad.stderr
    created = server.json(*sweep, "--search-space", '{"lora_r": [4, 8]}')
    [trial] = created["trials"]
    server.run("jobs", "follow", trial["job_id"], "--json")
    wait_for(lambda: server.json("sweeps", "get", created["id"])["status"] != "running", 60, "the sweep")
    done = server.json("sweeps", "get", created["id"])
    assert done["status"] == "succeeded" and done["best"]["job_id"] == trial["job_id"]
    assert server.json("sweeps", "list")["data"][0]["id"] == created["id"]
