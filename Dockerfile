# The JVP service on a CUDA-enabled PyTorch base (falls back to the CPU without a GPU).
# The base already holds torch (Python 3.11), which satisfies pyproject's torch>=2.4,
# so pip installs only the web stack (and Celery with its Redis client).
# One image, two roles: `jvp-service serve` (the default command: the HTTP API) and
# `jvp-service worker` (a Celery worker for batch jobs; docker-compose.yml runs both, and
# gives the worker its own healthcheck, `jvp-service worker-ping`).
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    JVP_HOST=0.0.0.0 \
    JVP_PORT=8000

WORKDIR /srv
COPY pyproject.toml README.md ./
COPY app ./app
RUN pip install --no-cache-dir . \
    && useradd --create-home --uid 10001 jvp

USER jvp
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)" || exit 1
CMD ["jvp-service", "serve"]
