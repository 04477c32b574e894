"""The web dashboard: static files (no build step, nothing fetched from elsewhere) that talk to the public
/v1 API with the key a person signs in with. Outside /v1, so the pages themselves need no key."""

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from starlette.responses import Response
from starlette.types import Scope

STATIC = Path(__file__).parent / "static"
ASSETS = "/dashboard"

# The key lives in the page's sessionStorage: allow scripts, styles and requests from this origin only.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; object-src 'none'; "
    "base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}

router = APIRouter(include_in_schema=False)


class _StaticFiles(StaticFiles):
    """The page is served at /dashboard/index.html too, where it works as at `/`: every file carries the
    headers, so no address of the dashboard can be framed or run scripts from elsewhere."""

    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers.update(SECURITY_HEADERS)
        return response


@router.get("/")
def index() -> FileResponse:
    return FileResponse(STATIC / "index.html", headers=SECURITY_HEADERS)


def mount(app: FastAPI) -> None:
    """Serve the page at `/` and its scripts and styles under /dashboard/."""
    app.include_router(router)
    app.mount(ASSETS, _StaticFiles(directory=STATIC), name="dashboard")
