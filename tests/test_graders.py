"""The graders API through the real openai client: each grader type, OpenAI's response shape, 400s naming
the field, and hostile python graders scoring 0 in their sandbox while the server goes on."""

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr, TypeAdapter
from sqlalchemy.orm import Session, sessionmaker

from api.inference.router import inference_client
from graders import judging, sandbox
from graders.shapes import LabelModelGrader, ScoreModelGrader, SubGrader
from inference.app import create_app as inference_app
from models import judge_grants
from models.db import session_scope
from models.inference import Target
from models.registry import ModelRegistry
from models.settings import Settings
from tests.conftest import Tenant
from tests.tiny_model import build_tiny_bert

needs_sandbox = pytest.mark.skipif(sandbox.unavailable() is not None, reason=f"{sandbox.unavailable()}")


@pytest.fixture
def database_url(postgres_url: str) -> str:
    return postgres_url  # the graders touch the database only to authenticate and look up judge models


@pytest.fixture
def api(client: TestClient, tenant: Tenant) -> Iterator[openai.OpenAI]:
    yield openai.OpenAI(
        base_url="http://testserver/v1", api_key=tenant.key, http_client=client, max_retries=0
    )


def run(api: openai.OpenAI, grader: dict[str, Any], sample: str, item: Any = None) -> Any:
    return api.fine_tuning.alpha.graders.run(grader=grader, model_sample=sample, item=item)


def refusal(api: openai.OpenAI, grader: dict[str, Any], sample: str = "x", item: Any = None) -> Any:
    with pytest.raises(openai.BadRequestError) as caught:
        run(api, grader, sample, item)
    return caught.value.body


def string_check(operation: str, reference: str = "{{item.answer}}") -> dict[str, Any]:
    return {"type": "string_check", "name": "s", "input": "{{sample.output_text}}",
            "reference": reference, "operation": operation}  # fmt: skip


def multi(formula: str, **graders: dict[str, Any]) -> dict[str, Any]:
    return {"type": "multi", "name": "m", "calculate_output": formula, "graders": graders}


@pytest.mark.parametrize(
    ("operation", "sample", "reward"),
    [("eq", "Paris", 1.0), ("eq", "paris", 0.0), ("ne", "Rome", 1.0), ("like", "It is Paris.", 1.0),
     ("like", "It is paris.", 0.0), ("ilike", "IT IS PARIS", 1.0)],
)  # fmt: skip
def test_string_check(api: openai.OpenAI, operation: str, sample: str, reward: float) -> None:
    response = run(api, string_check(operation), sample, {"answer": "Paris"})
    assert response.reward == reward
    assert response.metadata.type == "string_check" and response.metadata.name == "s"
    assert not response.metadata.errors.python_grader_runtime_error


def test_templates_reach_into_json_samples_and_nested_items(api: openai.OpenAI) -> None:
    grader = {"type": "string_check", "name": "j", "input": "{{ sample.output_json.city }}",
              "reference": "{{item.cities.1}}", "operation": "eq"}  # fmt: skip
    assert run(api, grader, '{"city": "Lyon"}', {"cities": ["Paris", "Lyon"]}).reward == 1.0


@pytest.mark.parametrize(
    "metric", ["fuzzy_match", "bleu", "gleu", "rouge_1", "rouge_2", "rouge_5", "rouge_l"]
)
def test_text_similarity_orders_close_texts_above_far_ones(api: openai.OpenAI, metric: str) -> None:
    grader = {"type": "text_similarity", "name": "t", "evaluation_metric": metric,
              "input": "{{sample.output_text}}", "reference": "{{item.reference}}"}  # fmt: skip
    item = {"reference": "the quick brown fox jumps over the lazy dog today"}
    same = run(api, grader, item["reference"], item).reward
    close = run(api, grader, "the quick brown fox jumps over the lazy cat today", item).reward
    far = run(api, grader, "an entirely different sentence", item).reward
    assert same == pytest.approx(1.0)
    assert 0.0 <= far < close < same


@pytest.mark.parametrize("metric", ["meteor", "cosine"])
def test_metrics_without_their_data_are_refused(api: openai.OpenAI, metric: str) -> None:
    grader = {
        "type": "text_similarity",
        "name": "t",
        "evaluation_metric": metric,
        "input": "a",
        "reference": "a",
    }
    with pytest.raises(openai.BadRequestError) as caught:
        api.fine_tuning.alpha.graders.validate(grader=grader)
    assert caught.value.body["param"] == "grader.evaluation_metric"


def test_multi_combines_named_graders_with_its_formula(api: openai.OpenAI) -> None:
    grader = {"type": "multi", "name": "m", "calculate_output": "0.25 * exact + max(loose, 0.5) ** 2",
              "graders": {"exact": string_check("eq"), "loose": string_check("ilike")}}  # fmt: skip
    response = run(api, grader, "PARIS", {"answer": "Paris"})
    assert response.sub_rewards == {"exact": 0.0, "loose": 1.0}
    assert response.reward == 1.0
    assert response.metadata.type == "multi"


@pytest.mark.parametrize("formula", ["a / (a - 1)", "1e308 * 10 * a", "log(a - 1)"])
def test_a_formula_without_a_finite_value_for_a_sample_scores_0(api: openai.OpenAI, formula: str) -> None:
    response = run(api, multi(formula, a=string_check("eq")), "Paris", {"answer": "Paris"})
    assert response.sub_rewards == {"a": 1.0}
    assert response.reward == 0.0 and response.metadata.errors.formula_parse_error is True


def test_validate_returns_the_grader(api: openai.OpenAI) -> None:
    grader = string_check("eq")
    assert api.fine_tuning.alpha.graders.validate(grader=grader).grader.to_dict() == grader


def score_model(model: str, **fields: Any) -> dict[str, Any]:
    judge = [
        {"role": "system", "content": "Rate the answer."},
        {"role": "user", "content": "{{sample.output_text}}"},
    ]
    return {"type": "score_model", "name": "j", "model": model, "input": judge, **fields}


def label_model(model: str) -> dict[str, Any]:
    judge = [{"role": "user", "content": "Judge {{sample.output_text}}"}]
    return {"type": "label_model", "name": "j", "model": model, "labels": ["good", "bad"],
            "passing_labels": ["good"], "input": judge}  # fmt: skip


@pytest.mark.parametrize(
    ("grader", "param"),
    [
        (string_check("eq", "{{item.missing}}"), "grader.reference"),
        (string_check("eq", "{{ item.answer | upper }}"), "grader.reference"),
        (string_check("eq", "{{sample.output_tools}}"), "grader.reference"),
        ({**string_check("eq"), "extra": 1}, "grader.string_check.extra"),
        (multi("a + b", a=string_check("eq")), "grader.calculate_output"),
        (multi("a.__class__", a=string_check("eq")), "grader.calculate_output"),
        (multi("a +", a=string_check("eq")), "grader.calculate_output"),
        (multi("a / 0 + open('x')", a=string_check("eq")), "grader.calculate_output"),
        ({"type": "python", "name": "p", "source": "def grade(sample, item) return 1"}, "grader.source"),
        (score_model("no-such-model"), "grader.model"),
        (multi("j", j=label_model("ft:tiny-llama:other:x:1")), "grader.graders.j.model"),
    ],
)  # fmt: skip
def test_bad_graders_are_400s_naming_the_field(
    api: openai.OpenAI, grader: dict[str, Any], param: str
) -> None:
    body = refusal(api, grader, "Paris", {"answer": "Paris"})
    assert body["param"] == param, body
    assert body["message"]


@pytest.fixture
def inference(client: TestClient, settings: Settings) -> Iterator[None]:
    """A real inference server (in process) behind the API, as `ftjobs serve` would be."""
    with TestClient(inference_app(settings)) as server:
        client.app.state.inference = server  # pyright: ignore[reportAttributeAccessIssue]
        yield


def test_a_judge_model_grades_through_the_inference_server(
    api: openai.OpenAI, registered_model: str, inference: None
) -> None:
    grader = score_model(
        registered_model, range=[0, 10], sampling_params={"seed": 1, "max_completions_tokens": 4}
    )
    assert api.fine_tuning.alpha.graders.validate(grader=grader).grader
    response = run(api, multi("2 * j", j=grader), "Paris")
    usage = response.model_grader_token_usage_per_model[registered_model]
    assert usage["completion_tokens"] == 4 and usage["prompt_tokens"] > 0  # the judge answered 4 tokens
    assert response.metadata.token_usage == usage["total_tokens"]
    errors = response.metadata.errors
    assert not errors.model_grader_server_error
    # A tiny random model rarely says a number in range: either way the reward follows from its reply.
    assert response.reward == (0.0 if errors.model_grader_parse_error else 2 * response.sub_rewards["j"])


def test_an_unreachable_judge_scores_0_with_the_reason(
    api: openai.OpenAI, client: TestClient, settings: Settings, registered_model: str
) -> None:
    nowhere = settings.model_copy(update={"inference_url": "http://127.0.0.1:9"})  # nothing listens there
    client.app.state.inference = inference_client(nowhere)  # pyright: ignore[reportAttributeAccessIssue]
    response = run(api, score_model(registered_model), "Paris")
    assert response.reward == 0.0
    assert response.metadata.errors.model_grader_server_error is True
    assert "not reachable" in response.metadata.errors.model_grader_server_error_details


def test_a_judge_that_cannot_answer_in_chat_is_a_400_naming_it(
    api: openai.OpenAI, session_factory: sessionmaker[Session], tmp_path: Path
) -> None:
    with session_scope(session_factory) as session:  # an encoder: no language-model head to answer with
        ModelRegistry(session).register("tiny-bert", str(build_tiny_bert(tmp_path / "bert")), "local")
    body = refusal(api, multi("j", j=score_model("tiny-bert")))
    assert (body["param"], body["code"]) == ("grader.graders.j.model", "model_not_supported"), body


def test_a_jobs_grant_reaches_only_its_judges_for_its_organisation(
    settings: Settings, tmp_path: Path
) -> None:
    """The trainer's grant (never the inference token) admits chat completions of the job's judge targets
    for its organisation, and nothing else: not another target, organisation or route."""
    secret = "inference-secret"
    judge = Target(model="judge", base_path="/bases/tiny")
    other = Target(
        model="ft:tiny:b::x", base_path="/bases/tiny", artifact_key="jobs/x/adapter", method="lora"
    )
    grant = judge_grants.sign(secret, "org-a", [judge], expires=time.time() + 60)
    guarded = settings.model_copy(update={"inference_token": SecretStr(secret)})
    broken = {"model": "judge"}  # no messages: a 400 once admitted, before anything loads

    def post(path: str, target: Target, org: str, token: str) -> int:
        body = {"target": target.model_dump(mode="json"), "request": broken, "organization": org}
        return server.post(path, json=body, headers={"Authorization": f"Bearer {token}"}).status_code

    with TestClient(inference_app(guarded), raise_server_exceptions=False) as server:
        assert post("/internal/chat/completions", judge, "org-a", grant) == 400
        assert post("/internal/chat/completions", judge, "org-a", secret) == 400  # the API's token
        assert post("/internal/chat/completions", other, "org-a", grant) == 401
        assert post("/internal/chat/completions", judge, "org-b", grant) == 401
        assert post("/internal/completions", judge, "org-a", grant) == 401
        forged = judge_grants.sign("another-secret", "org-a", [judge, other], expires=time.time() + 60)
        assert post("/internal/chat/completions", judge, "org-a", forged) == 401
        expired = judge_grants.sign(secret, "org-a", [judge], expires=time.time() - 1)
        assert post("/internal/chat/completions", judge, "org-a", expired) == 401


@pytest.mark.parametrize(
    ("grader", "reply", "reward"),
    [
        (score_model("m"), '{"result": 0.7}', 0.7),
        (score_model("m"), "I would say 0.25.", 0.25),
        (score_model("m"), "5", None),  # outside the default range [0, 1]
        (score_model("m", range=[1, 5]), "5", 5.0),
        (score_model("m"), "no idea", None),
        (label_model("m"), "Good.", 1.0),
        (label_model("m"), '{"result": "bad"}', 0.0),
        (label_model("m"), "maybe", None),
    ],
)
def test_judge_replies_are_read_leniently_but_only_as_a_label_or_an_in_range_score(
    grader: dict[str, Any], reply: str, reward: float | None
) -> None:
    shape = TypeAdapter(SubGrader).validate_python(grader)
    assert isinstance(shape, ScoreModelGrader | LabelModelGrader)
    assert judging.reward(shape, reply) == reward


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"range": [1, 0]}, "grader.range"),
        ({"range": [0, 1, 2]}, "grader.range"),
        ({"sampling_params": {"temperature": 9}}, "grader.sampling_params.temperature"),
        ({"sampling_params": {"max_completions_tokens": 0}}, "grader.sampling_params.max_completions_tokens"),
    ],
)
def test_judge_settings_the_server_cannot_take_are_400s(
    api: openai.OpenAI, registered_model: str, fields: dict[str, Any], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        api.fine_tuning.alpha.graders.validate(grader=score_model(registered_model, **fields))
    assert caught.value.body["param"] == param


@needs_sandbox
def test_python_grader_scores_in_the_sandbox(api: openai.OpenAI) -> None:
    source = "def grade(sample, item):\n    return len(sample['output_text']) / item['n']\n"
    response = run(api, {"type": "python", "name": "p", "source": source}, "abcd", {"n": 8})
    assert response.reward == 0.5
    assert response.metadata.errors.python_grader_runtime_error is False


FORGED = b'\n{"score": "x"}\n'  # written over the runner's result line, then gone before it writes one
HOSTILE = {
    "fork bomb": ("import os\ndef grade(s, i):\n    while True:\n        os.fork()\n", "not permitted"),
    "threads": ("import threading\ndef grade(s, i):\n    threading.Thread(target=print).start()\n", "thread"),
    "shadow": ("def grade(s, i):\n    return len(open('/etc/shadow').read())\n", "No such file"),
    "data dir": ("def grade(s, i):\n    return len(open(i['path']).read())\n", "No such file"),
    "write": ("def grade(s, i):\n    open('/usr/pwned', 'w')\n", "Read-only file system"),
    "socket": ("import socket\ndef grade(s, i):\n    socket.create_connection(('127.0.0.1', 80))\n", "Errno"),
    "infinite loop": ("def grade(s, i):\n    while True:\n        pass\n", "stopped"),
    "sleep": ("import time\ndef grade(s, i):\n    time.sleep(60)\n", "was stopped"),
    "huge output": ("import os\ndef grade(s, i):\n    while True:\n        os.write(1, b'x')\n", "too large"),
    "huge memory": ("def grade(s, i):\n    return len(bytearray(8 * 1024 ** 3))\n", "MemoryError"),
    "no grade": ("x = 1\n", "no function grade"),
    "not a number": ("def grade(s, i):\n    return 'high'\n", "ValueError"),
    "infinity": ("def grade(s, i):\n    return float('inf')\n", "not a finite number"),
    "forged": (f"import os\ndef grade(s, i):\n    os.write(1, {FORGED!r})\n    os._exit(0)\n", "without"),
}  # fmt: skip


@needs_sandbox
@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_python_scores_0_with_the_reason(api: openai.OpenAI, settings: Any, name: str) -> None:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    secret = settings.data_dir / "secret.txt"
    secret.write_text("the data directory")
    source, reason = HOSTILE[name]
    response = run(api, {"type": "python", "name": "p", "source": source}, "x", {"path": str(secret)})
    assert response.reward == 0.0
    assert response.metadata.errors.python_grader_runtime_error is True
    assert reason in response.metadata.errors.python_grader_runtime_error_details
    assert not Path("/usr/pwned").exists() and secret.read_text() == "the data directory"
    assert run(api, string_check("eq"), "a", {"answer": "a"}).reward == 1.0  # the server goes on


def test_python_graders_are_refused_without_a_sandbox(
    api: openai.OpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")  # no bwrap on the PATH: the server cannot sandbox
    sandbox.unavailable.cache_clear()
    try:
        body = refusal(api, {"type": "python", "name": "p", "source": "def grade(s, i):\n    return 1\n"})
    finally:
        sandbox.unavailable.cache_clear()
    assert body["param"] == "grader.type" and "bubblewrap" in body["message"]


def test_graders_need_an_api_key(client: TestClient) -> None:
    response = client.post("/v1/fine_tuning/alpha/graders/validate", json={"grader": string_check("eq")},
                           headers={"Authorization": "Bearer wrong"})  # fmt: skip
    assert response.status_code == 401
