"""ASGI entry point for `ftjobs api` / `uvicorn api.asgi:app` (distributed mode, settings from env)."""

from api.main import create_app
from models.settings import get_settings

app = create_app(get_settings())
