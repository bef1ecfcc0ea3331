"""The `jvp-service` command."""

from __future__ import annotations

import argparse
import logging
import os

import uvicorn

from app.settings import Settings


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="jvp-service", description="The JVP service.")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="Serve the HTTP API (settings from JVP_* variables).")
    serve.add_argument("--host", help="Address to bind (default JVP_HOST or 127.0.0.1).")
    serve.add_argument("--port", type=int, help="Port to bind (default JVP_PORT or 8000).")
    serve.add_argument("--log-level", default=os.environ.get("JVP_LOG_LEVEL", "info"))
    args = parser.parse_args(argv)

    if args.command == "serve":
        settings = Settings()
        logging.basicConfig(
            level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )
        uvicorn.run(
            "app.main:create_app",
            factory=True,
            host=args.host or settings.host,
            port=args.port or settings.port,
            log_level=args.log_level,
        )


if __name__ == "__main__":
    main()
