"""`uvicorn app.main:create_app --factory`: the web app's entry point, kept at this name for
the command lines that start it; the app factory itself is app/api/app.py."""

from app.api.app import create_app

__all__ = ["create_app"]
