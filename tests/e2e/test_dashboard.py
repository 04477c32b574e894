"""The web dashboard in a real browser: Debian's chromium driven by Playwright, against a real `ftjobs up`
with a tiny model. Sign in, create a job through the form (an invalid value first), watch its curve grow,
cancel it; then a model's lineage, its download and the playground."""

import tarfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from playwright.sync_api import Browser, BrowserType, Page, expect, sync_playwright

from tests.conftest import _unavailable
from tests.e2e.servers import cli, create_key, free_port, process
from tests.e2e.test_serving import answers
from tests.jobs_helpers import succeeded, wait_for, write_chat

pytestmark = pytest.mark.e2e

CHROMIUM = Path("/usr/bin/chromium")
LAUNCH_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
"""Debian's chromium as is (Playwright's own browser builds are downloads), with nothing reaching outside."""

N_EPOCHS = '.field[data-param="method.supervised.hyperparameters.n_epochs"]'
TRAIN_LOSS = '.series[data-series="train_loss"] path'
POINTS_AT_LEAST = f"""(least) => {{
  const path = document.querySelector('{TRAIN_LOSS}');
  return (path ? path.getAttribute("d").split("L").length : 0) >= least;
}}"""
"""A function, not an expression: the page's Content-Security-Policy forbids evaluating strings."""


def launch(chromium: BrowserType) -> Browser:
    if not CHROMIUM.exists():
        _unavailable("Chromium", FileNotFoundError(f"{CHROMIUM}: apt-get install chromium (.ci/run does)"))
    return chromium.launch(executable_path=str(CHROMIUM), args=LAUNCH_ARGS)


def sign_in(page: Page, base_url: str, key: str) -> None:
    page.goto(base_url)
    page.fill("input[name=key]", key)
    page.click("form.signin button[type=submit]")
    expect(page.locator("nav")).to_be_visible()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[tuple[str, str]]:
    """One `ftjobs up` with the tiny model registered, and an organisation's key."""
    root = tmp_path_factory.mktemp("dashboard")
    env = {"FTJOBS_DATA_DIR": str(root / "data"), "FTJOBS_HEARTBEAT_SECONDS": "0.5"}
    cli("models", "add", "tiny-llama", str(tiny_model_dir), env=env)
    port, inference_port = free_port(), free_port()
    up = ["up", "--port", str(port), "--inference-port", str(inference_port)]
    with process(up, env, root / "up.log", f"http://127.0.0.1:{port}/healthz"):
        # The estimate and the playground need the inference server, which starts beside the API.
        wait_for(lambda: answers(f"http://127.0.0.1:{inference_port}/healthz"), 120, "the inference server")
        yield f"http://127.0.0.1:{port}/", create_key(env)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        browser = launch(playwright.chromium)
        yield browser
        browser.close()


@pytest.fixture
def page(browser: Browser, server: tuple[str, str]) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    page = context.new_page()
    errors: list[str] = []
    elsewhere: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("request", lambda r: r.url.startswith((server[0], "blob:", "data:")) or elsewhere.append(r.url))
    yield page
    context.close()
    assert errors == [], errors  # no uncaught exception in the page's scripts
    assert elsewhere == [], elsewhere  # nothing fetched from another origin


@pytest.fixture
def client(server: tuple[str, str]) -> openai.OpenAI:
    base_url, key = server
    return openai.OpenAI(base_url=f"{base_url}v1", api_key=key, max_retries=0)


def test_create_watch_and_cancel(
    server: tuple[str, str], page: Page, client: openai.OpenAI, tmp_path: Path
) -> None:
    base_url, key = server
    assert "default-src 'self'" in httpx.get(base_url).headers["content-security-policy"]
    page.goto(base_url)
    page.fill("input[name=key]", "sk-ftj-not-a-key")
    page.click("form.signin button[type=submit]")
    expect(page.locator("form.signin .error")).to_contain_text("Incorrect or revoked API key")
    sign_in(page, base_url, key)

    page.click("nav >> text='New job'")
    page.select_option("select[name=model]", "tiny-llama")
    page.set_input_files("input[name=training_file]", str(write_chat(tmp_path / "train.jsonl", 12)))
    page.fill("input[name=n_epochs]", "0")
    page.fill("input[name=batch_size]", "1")
    page.click("button[name=create]")
    # The API's 400, next to the field its `param` names; the file was uploaded once and is kept.
    expect(page.locator(f"{N_EPOCHS} .field-error")).to_contain_text("n_epochs")
    assert [f.filename for f in client.files.list().data] == ["train.jsonl"]

    page.fill("input[name=n_epochs]", "50")  # long enough to be cancelled while it trains
    page.click("button[name=estimate]")
    expect(page.locator(".preflight mark").first).to_be_visible(timeout=60_000)  # the trained tokens
    page.click("button[name=create]")
    page.wait_for_url("**#/jobs/ftjob-*")
    job_id = page.url.rsplit("/", 1)[1]
    assert client.files.list().data[0].id == client.fine_tuning.jobs.retrieve(job_id).training_file

    # The curve gains points while the page polls the job's events.
    page.wait_for_function(POINTS_AT_LEAST, arg=2, timeout=120_000)
    seen = len((page.get_attribute(TRAIN_LOSS, "d") or "").split("L"))
    page.wait_for_function(POINTS_AT_LEAST, arg=seen + 1, timeout=60_000)

    page.click("button[name=cancel]")
    expect(page.locator("h1 .status")).to_have_text("cancelled", timeout=30_000)
    expect(page.locator("button[name=cancel]")).to_have_count(0)
    assert client.fine_tuning.jobs.retrieve(job_id).status == "cancelled"

    # The jobs list filters by status through the API.
    page.click("nav >> text='Jobs'")
    page.select_option("select[name=status]", "running")
    expect(page.locator("main")).to_contain_text("No job matches.")
    page.select_option("select[name=status]", "cancelled")
    expect(page.locator("table.jobs a", has_text=job_id)).to_be_visible()


def test_lineage_download_and_playground(
    server: tuple[str, str], page: Page, client: openai.OpenAI, tmp_path: Path
) -> None:
    base_url, key = server
    with open(write_chat(tmp_path / "train.jsonl", 12), "rb") as train:
        training_file = client.files.create(file=train, purpose="fine-tune")
    job = client.fine_tuning.jobs.create(
        model="tiny-llama",
        training_file=training_file.id,
        suffix="ui",
        method={
            "type": "supervised",
            "supervised": {"hyperparameters": {"n_epochs": 1, "batch_size": 4, "lora_r": 4}},  # type: ignore[typeddict-unknown-key]
        },
    )
    tuned = succeeded(client, job).fine_tuned_model
    assert tuned
    sign_in(page, base_url, key)

    page.click("nav >> text='Models'")
    page.click(f".tree a:text-is('{tuned}')")
    expect(page.locator(".model-detail h2", has_text="Lineage")).to_be_visible()
    expect(page.locator(".model-detail")).to_contain_text(training_file.id)
    with page.expect_download() as download:
        page.click("button[name=download-adapter]")
    with tarfile.open(download.value.path()) as archive:
        assert any(name.endswith("/adapter_model.safetensors") for name in archive.getnames())

    page.click(".model-detail >> text=Chat with it")
    expect(page.locator("select[name=model]")).to_have_value(tuned)
    page.fill("textarea[name=prompt]", "What is the capital of France?")
    page.click("button[name=send]")
    expect(page.locator("button[name=send]")).to_be_enabled(timeout=60_000)
    # Streamed token by token, the answer is the one the API gives unstreamed (greedy: the same text).
    expected = client.chat.completions.create(
        model=tuned,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        temperature=0,
        max_tokens=128,
    )
    expect(page.locator(".message.assistant")).to_have_text(expected.choices[0].message.content or "")
