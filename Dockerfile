# The JVP service. One image, two roles: `jvp-service serve` (the default command: the HTTP
# API) and `jvp-service worker` (a Celery worker for batch jobs; docker-compose.yml runs both
# and gives the worker its own healthcheck, `jvp-service worker-ping`).
#
#   docker build -t jvp-service .                                  # CUDA torch (GPU or CPU hosts)
#   docker build --build-arg TORCH_VARIANT=cpu -t jvp-service:cpu .  # CPU-only torch, smaller
#
# torch is the version the tests run on, named once in torch-version.txt (the Makefile reads
# the same file), so a model exported with the torch `make run` installs loads here too.
FROM python:3.11-slim-bookworm

# cuda: PyPI's torch wheel, which carries its CUDA libraries (it computes on the CPU too, on a
# host without a GPU); cpu: the CPU-only wheel from PyTorch's CPU index.
ARG TORCH_VARIANT=cuda
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    JVP_HOST=0.0.0.0 \
    JVP_PORT=8000 \
    JVP_DATABASE_URL=sqlite:////data/jvp-jobs.db

WORKDIR /srv

# Dependency layers first: they rebuild only when torch-version.txt or pyproject.toml
# change, not on a code change.
COPY torch-version.txt ./
RUN case "$TORCH_VARIANT" in \
        cpu) index="--index-url $TORCH_CPU_INDEX" ;; \
        cuda) index="" ;; \
        *) echo "TORCH_VARIANT must be cpu or cuda, not $TORCH_VARIANT" >&2; exit 1 ;; \
    esac \
    && pip install $index "torch==$(cat torch-version.txt)"
COPY pyproject.toml ./
# The project's other dependencies, read from pyproject.toml (torch is already there).
RUN python -c "import tomllib; deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; print('\n'.join(deps))" > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt "setuptools>=77" \
    && rm /tmp/requirements.txt

# The job store's default home, writable by the service's user (NOTE [job store preflight]
# in app/preflight.py): a volume, so jobs outlive the container.
RUN useradd --uid 10001 --no-create-home --home-dir /data jvp \
    && mkdir -p /data \
    && chown jvp:jvp /data
VOLUME ["/data"]

# The code: the only layer a code change rebuilds.
COPY README.md ./
COPY app ./app
RUN pip install --no-deps --no-build-isolation . && rm -rf build

USER 10001
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)" || exit 1
CMD ["jvp-service", "serve"]
