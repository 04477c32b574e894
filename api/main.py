"""The FastAPI application: OpenAI-compatible files and fine-tuning routes under /v1."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from api import errors
from api.admin.router import router as admin_router
from api.auth import Authenticate
from api.dashboard.router import mount as mount_dashboard
from api.files.router import router as files_router
from api.graders.router import router as graders_router
from api.health import router as health_router
from api.inference.router import async_inference_client, inference_client
from api.inference.router import router as inference_router
from api.jobs.router import router as jobs_router
from api.metrics import Metrics, ObserveRequests
from api.metrics import router as metrics_router
from api.middleware import RequestId
from api.preflight.router import router as preflight_router
from api.ratelimit import RateLimiter
from api.registry.router import router as models_router
from api.sweeps.router import router as sweeps_router
from api.webhooks.router import router as webhooks_router
from models.db import make_engine, make_session_factory
from models.queue import CeleryDispatcher, Dispatcher
from models.settings import Settings
from models.storage import open_store
from web.limits import BodySizeLimit


def create_app(settings: Settings, dispatcher: Dispatcher | None = None) -> FastAPI:
    """Build the app; the caller owns migrations and picks the dispatcher (Celery unless embedded)."""
    engine = make_engine(settings.resolved_database_url())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        app.state.inference.close()
        engine.dispose()  # close pooled connections at shutdown rather than whenever the engine is collected

    app = FastAPI(
        title="ftjobs",
        version="0.1.0",
        description="Self-hosted, OpenAI-compatible fine-tuning jobs.",
        lifespan=lifespan,
        docs_url="/docs" if settings.api_docs else None,
        redoc_url="/redoc" if settings.api_docs else None,
    )
    app.state.settings = settings
    app.state.engine = engine
    app.state.session_factory = make_session_factory(engine)
    app.state.store = open_store(settings)
    app.state.dispatcher = dispatcher or CeleryDispatcher(settings)
    app.state.inference = inference_client(settings)
    app.state.open_inference = lambda: async_inference_client(settings)  # for forwarding (api/inference)
    app.state.limiter = RateLimiter(settings.rate_limit_per_minute, settings.rate_limit_storage)
    app.state.metrics = Metrics(engine)

    errors.install(app)
    # Added first, so innermost: request ids and the body limit apply to its refusals too.
    app.add_middleware(Authenticate)
    uploads = {("POST", "/v1/files"): settings.max_upload_bytes}  # every other body is JSON
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_json_bytes, larger=uploads)
    app.add_middleware(ObserveRequests)  # inside RequestId, so its access lines carry the request id
    app.add_middleware(RequestId)
    app.include_router(admin_router)
    app.include_router(files_router)
    app.include_router(jobs_router)
    app.include_router(sweeps_router)
    app.include_router(preflight_router)
    app.include_router(graders_router)
    app.include_router(models_router)
    app.include_router(inference_router)
    app.include_router(webhooks_router)
    mount_dashboard(app)
    app.include_router(health_router)
    app.include_router(metrics_router)
    return app
