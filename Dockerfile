# VaBus Aggregator: `docker run IMAGE` runs the service configured by environment
# variables (see .env.example); `docker run IMAGE emulator ...` runs the VaBus emulator.
# No `# syntax=` line: BuildKit would pull that frontend from a registry; the built-in
# one handles everything below.

# Build stage: wheels for the package and its dependencies, so the runtime stage
# needs neither build tools nor the package index.
FROM python:3.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md constraints.txt ./
COPY service ./service
RUN pip wheel --wheel-dir /wheels -c constraints.txt .

FROM python:3.11-slim-bookworm
# No service settings are baked in as ENV: they would override a mounted /app/.env.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-index --find-links=/wheels /wheels/vabus_aggregator-*.whl \
    && useradd --system --uid 10001 --gid 0 --no-create-home --home-dir /app vabus \
    && mkdir -p /app/state \
    && chown -R 10001:0 /app \
    && chmod -R g=u /app
# The working directory holds the optional `.env` and the default STATE_DIR (./state).
# Group 0 owns both, group-writable: OpenShift and other clusters run the image under an
# arbitrary uid in group 0, and a new volume on /app/state takes this ownership.
# The image writes nowhere else: HOME is the tmpfs-able /tmp, bytecode comes
# precompiled with the wheels (PYTHONDONTWRITEBYTECODE), so `--read-only` works.
WORKDIR /app
USER 10001:0
VOLUME ["/app/state"]
EXPOSE 8080
# Liveness only (/healthz); readiness of the bus and outputs is /readyz. The port comes
# from the same configuration the service reads (environment, then /app/.env).
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; from service.config import load_config; urllib.request.urlopen(f'http://127.0.0.1:{load_config().http.port}/healthz', timeout=4)"]
ENTRYPOINT ["vabus-aggregator"]
CMD ["run"]
