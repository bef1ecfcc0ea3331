"""The one line the service logs once it is ready: what it serves, where, and how.

>>> from app.settings import Settings
>>> startup_summary(Settings(), ["linear", "mlp"], ["cpu"], "1 usable CPU(s)")
... # doctest: +NORMALIZE_WHITESPACE
'ready: 2 models (linear, mlp); devices cpu; CPU: 1 usable CPU(s); job store
sqlite:///./jvp-jobs.db (jobs run here); docs http://127.0.0.1:8000/docs;
API keys off'
"""

from __future__ import annotations

from sqlalchemy.engine import make_url

from app.settings import Settings


def _job_store(settings: Settings) -> str:
    try:
        url = make_url(settings.database_url).render_as_string(hide_password=True)
    except Exception:  # the store itself reports a bad URL
        url = settings.database_url
    if settings.jobs_backend == "celery":
        runs = f"jobs run on Celery workers via {make_url(settings.broker_url).host}"
    elif settings.job_runner == "local":
        runs = "jobs run here"
    else:
        runs = "jobs stored only"
    return f"{url} ({runs})"


def docs_url(settings: Settings) -> str:
    host = settings.host
    if host in ("0.0.0.0", "::", ""):  # every address: this machine's own reaches it
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{settings.port}/docs"


def startup_summary(settings: Settings, models: list[str], devices: list[str], cpu: str) -> str:
    """Models served, devices, CPU threads, job store, the docs URL, whether keys are on."""
    keys = "on" if settings.api_keys or settings.admin_keys else "off"
    if keys == "on":
        keys += " (docs public)" if settings.docs_public else " (docs need a key too)"
    return (
        f"ready: {len(models)} models ({', '.join(models)}); devices {', '.join(devices)}; "
        f"CPU: {cpu}; job store {_job_store(settings)}; docs {docs_url(settings)}; "
        f"API keys {keys}"
    )
