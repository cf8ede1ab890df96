"""HTTP serving: `imagine serve` (FastAPI on uvicorn). Calls pipelines, never models directly."""

from imagine.server.app import create_app
from imagine.server.service import Limits

__all__ = ["Limits", "create_app"]
