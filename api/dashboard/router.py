"""The web dashboard: static files (no build step, nothing fetched from elsewhere) that talk to the public
/v1 API with the key a person signs in with. Outside /v1, so the pages themselves need no key."""

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

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


@router.get("/")
def index() -> FileResponse:
    return FileResponse(STATIC / "index.html", headers=SECURITY_HEADERS)


def mount(app: FastAPI) -> None:
    """Serve the page at `/` and its scripts and styles under /dashboard/."""
    app.include_router(router)
    app.mount(ASSETS, StaticFiles(directory=STATIC), name="dashboard")
