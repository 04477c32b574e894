"""The inference server's internal HTTP app: the API forwards validated OpenAI requests here as
`Forwarded{target, request}` and relays the answer. Errors use OpenAI's envelope (`web.errors`)."""

import asyncio
import hmac
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any, TypeVar
from urllib.parse import urlsplit

from fastapi import Depends, FastAPI, Header
from fastapi import Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool

from inference.engine import Engine, Stream
from inference.preflight import localized
from inference.preflight.bounded import bounded_estimate
from models import judge_grants
from models.errors import APIError, envelope
from models.inference import ChatCompletionRequest, ClassificationRequest, CompletionRequest, Forwarded
from models.logs import logging_config
from models.preflight import PreflightReport, PreflightRequest
from models.settings import Settings
from web.errors import install
from web.limits import BodySizeLimit

log = logging.getLogger("ftjobs.inference")
DEFAULT_PORT = 8001
FORWARDING_BYTES = 64 * 1024
Request = TypeVar("Request", bound=BaseModel)
Answer = TypeVar("Answer")
DISCONNECT_POLL_SECONDS = 0.25
"""How often a request checks that its client is still there: one that left leaves its batch."""


def parse(kind: type[Request], body: dict[str, object]) -> Request:
    """The forwarded request as its own type; invalid fields answer 400 with their name as `param`."""
    try:
        return kind.model_validate(body)
    except ValidationError as exc:
        errors = [{**error, "loc": ("body", *error["loc"])} for error in exc.errors()]
        raise RequestValidationError(errors) from exc


def sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data)}\n\n"


async def unless_client_leaves(http: HTTPRequest, work: Callable[[threading.Event], Answer]) -> Answer:
    """`work(cancelled)` in a worker thread; `cancelled` is set if the client disconnects meanwhile."""
    cancelled = threading.Event()
    task = asyncio.ensure_future(run_in_threadpool(work, cancelled))
    try:
        while not (await asyncio.wait({task}, timeout=DISCONNECT_POLL_SECONDS))[0]:
            if not cancelled.is_set() and await http.is_disconnected():
                cancelled.set()  # the work returns at its batch's next step
        return task.result()
    finally:
        cancelled.set()


def event_stream(stream: Stream, http: HTTPRequest) -> StreamingResponse:
    async def events() -> AsyncIterator[str]:
        polled = time.monotonic()
        try:
            async for chunk in iterate_in_threadpool(stream):
                yield sse(chunk)
                if time.monotonic() - polled > DISCONNECT_POLL_SECONDS:
                    polled = time.monotonic()
                    if await http.is_disconnected():
                        return
        except APIError as exc:  # the status line is long gone: report the error in the stream
            yield sse(envelope(exc.message, type=exc.type, param=exc.param, code=exc.code))
            return
        except Exception:
            log.exception("generation failed mid-stream")
            yield sse(envelope("The server had an error while generating.", type="server_error"))
            return
        finally:
            stream.cancel()  # a no-op when generation is done; stops it when the client left
        yield "data: [DONE]\n\n"

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(events(), media_type="text/event-stream", headers=headers)


def admitted(settings: Settings, authorization: str | None, body: Forwarded | None = None) -> bool:
    """Whether a request carries `settings.inference_token` (the API's), if one is set, or a judge grant
    (models/judge_grants.py) covering `body`."""
    expected = settings.inference_token
    if expected is None:
        return True
    secret = expected.get_secret_value()
    if hmac.compare_digest((authorization or "").encode(), f"Bearer {secret}".encode()):
        return True
    grant = (authorization or "").removeprefix("Bearer ")
    return body is not None and judge_grants.admits(secret, grant, body, now=time.time())


def unauthorized() -> APIError:
    return APIError(
        "This inference server answers only the ftjobs API (FTJOBS_INFERENCE_TOKEN).",
        status_code=401,
        code="invalid_api_key",
    )


def api_token(settings: Settings) -> Callable[[str | None], None]:
    """A dependency that admits only requests carrying `settings.inference_token`, if one is set."""

    def check(authorization: Annotated[str | None, Header()] = None) -> None:
        if not admitted(settings, authorization):
            raise unauthorized()

    return check


class EngineUnavailable(RuntimeError):
    """The configured engine cannot run in this environment."""


def engine_for(settings: Settings) -> Engine:
    """The engine `settings.inference_engine` names: ftjobs' own, or vLLM's (an optional install)."""
    if settings.inference_engine == "ftjobs":
        return Engine(settings)
    try:
        from inference.vllm_engine import VLLMEngine
    except ImportError as exc:
        raise EngineUnavailable(
            f"FTJOBS_INFERENCE_ENGINE=vllm needs vLLM, which is not importable here ({exc}); "
            "see docs/models.md for installing it."
        ) from exc
    return VLLMEngine(settings)


def create_app(settings: Settings, engine: Engine | None = None) -> FastAPI:
    """The app, with the engine settings name unless one is given (tests look inside theirs)."""
    engine = engine or engine_for(settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        engine.close()  # vLLM's engine processes would otherwise keep this one from exiting

    app = FastAPI(title="ftjobs inference", docs_url=None, redoc_url=None, lifespan=lifespan)
    install(app, log)
    # The API's own limit, plus room for what forwarding adds (the resolved target; the request itself is
    # re-encoded compactly): one oversized body must not cost this shared process gigabytes either.
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_json_bytes + FORWARDING_BYTES)
    app.state.engine = engine
    internal = [Depends(api_token(settings))]

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        batching = engine.batching
        return {
            "status": "ok",
            "bases_loaded": len(engine.models.bases),
            "cached": len(engine.models.cache),
            "batch_rows": batching.rows(),
            "waiting": batching.waiting,
            "abandoned_rows": batching.abandoned_rows,
        }

    @app.post("/internal/chat/completions", response_model=None)
    async def chat(
        body: Forwarded, http: HTTPRequest, authorization: Annotated[str | None, Header()] = None
    ) -> dict[str, Any] | StreamingResponse:
        if not admitted(settings, authorization, body):  # the API's token, or a job's grant for its judges
            raise unauthorized()
        request = parse(ChatCompletionRequest, body.request)
        if request.stream:
            stream = await run_in_threadpool(engine.stream_chat, body.target, request, body.organization)
            return event_stream(stream, http)
        return await unless_client_leaves(
            http, lambda cancelled: engine.chat(body.target, request, body.organization, cancelled)
        )

    @app.post("/internal/completions", response_model=None, dependencies=internal)
    async def complete(body: Forwarded, http: HTTPRequest) -> dict[str, Any] | StreamingResponse:
        request = parse(CompletionRequest, body.request)
        if request.stream:
            stream = await run_in_threadpool(engine.stream_complete, body.target, request, body.organization)
            return event_stream(stream, http)
        return await unless_client_leaves(
            http, lambda cancelled: engine.complete(body.target, request, body.organization, cancelled)
        )

    @app.post("/internal/classifications", dependencies=internal)
    async def classify(body: Forwarded) -> dict[str, Any]:
        request = parse(ClassificationRequest, body.request)
        return await run_in_threadpool(engine.classify, body.target, request)

    @app.post("/internal/preflight", dependencies=internal)
    async def preflight(body: PreflightRequest, http: HTTPRequest) -> PreflightReport:
        """The pre-flight estimate of a job request the API has checked (api/preflight), in a child process
        bounded in time and memory, and killed if the API hangs up (its client left)."""
        local = await run_in_threadpool(localized, body, engine.models.artifacts)
        return await bounded_estimate(local, settings.preflight_timeout_seconds, http.is_disconnected)

    return app


def serve(
    settings: Settings, host: str | None = None, port: int | None = None, log_level: str | None = None
) -> None:
    """Run the inference server (`ftjobs serve`) in this process, by default where `inference_url` says."""
    import uvicorn

    url = urlsplit(settings.inference_url)
    uvicorn.run(
        create_app(settings),
        host=host or url.hostname or "127.0.0.1",
        port=port or url.port or DEFAULT_PORT,
        log_config=logging_config(settings, log_level),  # FTJOBS_LOG_FORMAT, applied by uvicorn
    )
