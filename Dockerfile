# syntax=docker/dockerfile:1
#
# ecoworker image: one asyncio worker process per container.
#
#   docker build -t ecoworker:0.1.0 .
#   docker run --rm -v ecoworker-wal:/var/lib/ecoeco/wal \
#     -e RABBITMQ_URL=amqp://... -e POSTGRES_DSN=postgresql://... ecoworker:0.1.0 --queue storage
#
# The journal (SQLite in WAL mode) lives in /var/lib/ecoeco/wal: give every
# container its own persistent volume there. Tasks acked from the broker live
# only in that journal until they are finished and shipped to PostgreSQL, so
# losing the volume loses work.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------- builder
FROM ${PYTHON_IMAGE} AS builder

# uv installs exactly what uv.lock pins into /opt/venv (compiled to bytecode,
# so the read-only runtime never needs to write .pyc files).
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    UV_PROJECT_ENVIRONMENT=/opt/venv \
    UV_PYTHON=/usr/local/bin/python3.11 \
    UV_PYTHON_DOWNLOADS=never \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy

RUN pip install --no-cache-dir "uv==0.13.9"

WORKDIR /src

# Dependencies first: this layer is rebuilt only when the lock file changes.
COPY pyproject.toml uv.lock README.md ./
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --frozen --no-dev --no-install-project --no-editable

# Then the project itself, as a regular (non-editable) install in /opt/venv.
COPY ecoworker ./ecoworker
COPY handlers ./handlers
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --frozen --no-dev --no-editable \
    && /opt/venv/bin/ecoworker --help > /dev/null

# ---------------------------------------------------------------- runtime
FROM ${PYTHON_IMAGE} AS runtime

LABEL org.opencontainers.image.title="ecoworker" \
      org.opencontainers.image.description="Durable asyncio task worker: RabbitMQ in, SQLite WAL journal, PostgreSQL out" \
      org.opencontainers.image.licenses="MIT"

# tesseract for the local OCR engine (extract_text_from_image).
# Not version-pinned on purpose: bookworm's security updates must flow into
# every rebuild, and a pinned Debian version disappears from the mirror when
# it is superseded, which would break the build.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends tesseract-ocr tesseract-ocr-eng \
    && rm -rf /var/lib/apt/lists/*

# A fixed, numeric, non-root uid/gid (10001) so Kubernetes' runAsNonRoot can
# verify it and fsGroup/volume ownership line up. The journal directory is
# created and owned by it, so a fresh named volume inherits that ownership.
RUN groupadd --system --gid 10001 ecoworker \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin ecoworker \
    && mkdir -p /var/lib/ecoeco/wal /var/lib/ecoeco/uploads \
    && chown ecoworker:ecoworker /var/lib/ecoeco/wal

COPY --from=builder /opt/venv /opt/venv

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    WAL_DB_PATH=/var/lib/ecoeco/wal/ecoworker.db \
    ECOWORKER_METRICS_PORT=9100

USER 10001:10001
WORKDIR /var/lib/ecoeco

VOLUME ["/var/lib/ecoeco/wal"]

# /metrics, /healthz, /readyz
EXPOSE 9100

# SIGTERM starts the graceful stop (finish in-flight tasks within
# ECOWORKER_GRACE_PERIOD, flush results, checkpoint the journal); give the
# container more time than that before SIGKILL (docker stop -t 60).
STOPSIGNAL SIGTERM

# /healthz answers while the event loop runs (slim images have no curl).
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:9100/healthz', timeout=3)"]

ENTRYPOINT ["ecoworker"]
CMD ["--queue", "storage"]
