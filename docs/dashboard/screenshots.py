"""Take the screenshots in docs/dashboard/ from a real run: `ftjobs up` in a scratch directory with
SmolLM2-135M-Instruct, a LoRA job on the shared movie-review set created through the dashboard's form (its
estimate first), then each page once the job has trained. Not a test; a few minutes on 2 CPU cores.

    python docs/dashboard/screenshots.py [--model-dir DIR] [--out DIR]
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path: put the repository root there instead.
REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import openai  # noqa: E402
from playwright.sync_api import Page, expect, sync_playwright  # noqa: E402

from bench._common import MODEL, base_model  # noqa: E402
from tests.e2e.servers import cli, create_key, free_port, process  # noqa: E402
from tests.e2e.test_dashboard import launch, sign_in  # noqa: E402
from tests.e2e.test_serving import answers  # noqa: E402
from tests.jobs_helpers import succeeded, wait_for, write_chat  # noqa: E402

SYSTEM = "Classify the sentiment of the movie review. Answer with exactly one word: positive or negative."
"""The data set's own system message."""
HYPERPARAMETERS = {"n_epochs": "2", "batch_size": "4", "lora_r": "8", "max_seq_length": "256"}


def shoot(page: Page, out: Path, name: str) -> None:
    time.sleep(1)  # let the last poll's render settle
    page.screenshot(path=str(out / f"{name}.png"), full_page=True)
    print(f"wrote {out / name}.png", flush=True)


def create_through_form(page: Page, scratch: Path, out: Path) -> str:
    page.click("nav >> text='New job'")
    page.select_option("select[name=model]", MODEL)
    page.set_input_files("input[name=training_file]", str(write_chat(scratch / "reviews-train.jsonl", 80)))
    page.set_input_files(
        "input[name=validation_file]", str(write_chat(scratch / "reviews-valid.jsonl", 20, "validation"))
    )
    page.fill("input[name=suffix]", "sentiment")
    for name, value in HYPERPARAMETERS.items():
        page.fill(f"input[name={name}]", value)
    page.click("summary >> text=More hyperparameters")
    page.fill("input[name=generation_eval_samples]", "8")
    page.click("button[name=estimate]")
    expect(page.locator(".preflight h2, .preflight .notice").first).to_be_visible(timeout=120_000)
    shoot(page, out, "create")
    page.click("button[name=create]")
    page.wait_for_url("**#/jobs/ftjob-*")
    return page.url.rsplit("/", 1)[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model-dir", type=Path, help=f"a {MODEL} directory (default: pulled into FTJOBS_DATA_DIR)"
    )
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "dashboard")
    args = parser.parse_args()
    model_dir = base_model(args.model_dir)
    with tempfile.TemporaryDirectory() as scratch_dir, sync_playwright() as playwright:
        scratch = Path(scratch_dir)
        env = {"FTJOBS_DATA_DIR": str(scratch / "data"), "FTJOBS_HEARTBEAT_SECONDS": "1"}
        cli("models", "add", MODEL, str(model_dir), env=env)
        port, inference_port = free_port(), free_port()
        up = ["up", "--port", str(port), "--inference-port", str(inference_port)]
        with process(up, env, scratch / "up.log", f"http://127.0.0.1:{port}/healthz"):
            wait_for(
                lambda: answers(f"http://127.0.0.1:{inference_port}/healthz"), 120, "the inference server"
            )
            base_url, key = f"http://127.0.0.1:{port}/", create_key(env)
            client = openai.OpenAI(base_url=f"{base_url}v1", api_key=key)
            browser = launch(playwright.chromium)
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            sign_in(page, base_url, key)

            job_id = create_through_form(page, scratch, args.out)
            job = succeeded(client, client.fine_tuning.jobs.retrieve(job_id), timeout=1800)
            expect(page.locator("h1 .status")).to_have_text("succeeded")  # the page's next poll
            shoot(page, args.out, "job")

            # A second job, cancelled, so the list shows more than one status.
            other = client.fine_tuning.jobs.create(
                model=MODEL, training_file=job.training_file, suffix="cancelled"
            )
            client.fine_tuning.jobs.cancel(other.id)
            page.click("nav >> text='Jobs'")
            expect(page.locator("table.jobs tbody tr")).to_have_count(2)
            shoot(page, args.out, "jobs")

            page.click("nav >> text='Models'")
            page.click(f".tree a:text-is('{job.fine_tuned_model}')")
            expect(page.locator(".model-detail h2", has_text="Lineage")).to_be_visible()
            shoot(page, args.out, "models")

            page.click(".model-detail >> text=Chat with it")
            page.fill("textarea[name=system]", SYSTEM)
            page.fill("textarea[name=prompt]", "a gorgeous , witty , seductive movie .")
            page.click("button[name=send]")
            expect(page.locator("button[name=send]")).to_be_enabled(timeout=120_000)
            shoot(page, args.out, "playground")
            browser.close()


if __name__ == "__main__":
    main()
