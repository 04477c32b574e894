"""The inference server's internal HTTP app: the API forwards validated OpenAI requests here as
`Forwarded{target, request}` and relays the answer. Errors use OpenAI's envelope (`web.errors`)."""

import hmac
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any, TypeVar
from urllib.parse import urlsplit

from fastapi import Depends, FastAPI, Header
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool

from inference.engine import Engine, Stream
from inference.preflight import estimate
from models.errors import APIError, envelope
from models.inference import ChatCompletionRequest, ClassificationRequest, CompletionRequest, Forwarded
from models.logs import logging_config
from models.preflight import PreflightReport, PreflightRequest
from models.settings import Settings
from models.spec import DataError
from web.errors import install

log = logging.getLogger("ftjobs.inference")
DEFAULT_PORT = 8001
Request = TypeVar("Request", bound=BaseModel)


def parse(kind: type[Request], body: dict[str, object]) -> Request:
    """The forwarded request as its own type; invalid fields answer 400 with their name as `param`."""
    try:
        return kind.model_validate(body)
    except ValidationError as exc:
        errors = [{**error, "loc": ("body", *error["loc"])} for error in exc.errors()]
        raise RequestValidationError(errors) from exc


def sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data)}\n\n"


def event_stream(stream: Stream) -> StreamingResponse:
    async def events() -> AsyncIterator[str]:
        try:
            async for chunk in iterate_in_threadpool(stream):
                yield sse(chunk)
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


def api_token(settings: Settings) -> Callable[[str | None], None]:
    """A dependency that admits only requests carrying `settings.inference_token`, if one is set."""
    expected = settings.inference_token
    wanted = f"Bearer {expected.get_secret_value()}".encode() if expected else b""

    def check(authorization: Annotated[str | None, Header()] = None) -> None:
        if expected is not None and not hmac.compare_digest((authorization or "").encode(), wanted):
            raise APIError(
                "This inference server answers only the ftjobs API (FTJOBS_INFERENCE_TOKEN).",
                status_code=401,
                code="invalid_api_key",
            )

    return check


def create_app(settings: Settings, engine: Engine | None = None) -> FastAPI:
    """The app, with its own `Engine` unless one is given (tests look inside theirs)."""
    engine = engine or Engine(settings)
    app = FastAPI(title="ftjobs inference", docs_url=None, redoc_url=None)
    install(app, log)
    app.state.engine = engine
    internal = [Depends(api_token(settings))]

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        return {"status": "ok", "bases_loaded": len(engine.models.bases), "cached": len(engine.models.cache)}

    @app.post("/internal/chat/completions", response_model=None, dependencies=internal)
    async def chat(body: Forwarded) -> dict[str, Any] | StreamingResponse:
        request = parse(ChatCompletionRequest, body.request)
        if request.stream:
            return event_stream(await run_in_threadpool(engine.stream_chat, body.target, request))
        return await run_in_threadpool(engine.chat, body.target, request)

    @app.post("/internal/completions", response_model=None, dependencies=internal)
    async def complete(body: Forwarded) -> dict[str, Any] | StreamingResponse:
        request = parse(CompletionRequest, body.request)
        if request.stream:
            return event_stream(await run_in_threadpool(engine.stream_complete, body.target, request))
        return await run_in_threadpool(engine.complete, body.target, request)

    @app.post("/internal/classifications", dependencies=internal)
    async def classify(body: Forwarded) -> dict[str, Any]:
        request = parse(ClassificationRequest, body.request)
        return await run_in_threadpool(engine.classify, body.target, request)

    @app.post("/internal/preflight", dependencies=internal)
    async def preflight(body: PreflightRequest) -> PreflightReport:
        """The pre-flight estimate of a job request the API has checked (api/preflight)."""
        try:
            return await run_in_threadpool(estimate, body)
        except DataError as error:  # what the job would fail on: the request's fault, as at job creation
            raise APIError(error.message, param=error.param, code=error.code) from error

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
