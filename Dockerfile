# meterproxy: docker build -t meterproxy . && docker run -p 8787:8787 -v meterproxy-data:/data \
#   -e METERPROXY_ADMIN_TOKEN=change-me meterproxy
#
# Base: python:3.11-slim-bookworm, the Python CI tests (pyproject's mypy python_version), pinned by
# the digest of its multi-arch index (Python 3.11.16, Debian 12, as of 2026-08-25). To move it,
# take the new digest from `docker buildx imagetools inspect python:3.11-slim-bookworm` and change
# it here only; tests/test_dockerfile.py checks the pin and the Python version.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm@sha256:0bee7276f83efd4a1ee05bbbf4281d95ed28e079220a9457f25a93e3f1e3c31b

# Stage 1: build the wheel and install it with its dependencies into a virtualenv.
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY meterproxy ./meterproxy
COPY pricing ./pricing
# [postgres]: the image also serves a shared PostgreSQL store (README, "Scaling out");
# [apsw]: a current SQLite for the export's child process (~40% less CPU per exported row).
RUN python -m venv /opt/meterproxy \
    && /opt/meterproxy/bin/pip install --no-compile ".[postgres,apsw]"

# Stage 2: the runtime, without the sources, pip's caches or build tools.
FROM ${PYTHON_IMAGE}
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/meterproxy/bin:$PATH \
    METERPROXY_DB=/data/meterproxy.db \
    METERPROXY_HOST=0.0.0.0 \
    METERPROXY_PORT=8787
COPY --from=build /opt/meterproxy /opt/meterproxy
RUN useradd --system --uid 10001 --home-dir /data --shell /usr/sbin/nologin meterproxy \
    && mkdir -p /data && chown meterproxy:meterproxy /data && chmod 700 /data
USER 10001
WORKDIR /data
VOLUME ["/data"]
EXPOSE 8787

# `meterproxy health` reads the port (and host) from the same settings as `serve`: a container run
# with -e METERPROXY_PORT=9000 is checked on 9000.
HEALTHCHECK --interval=15s --timeout=5s --start-period=10s --retries=3 \
    CMD ["meterproxy", "health", "--timeout", "3"]

# Without METERPROXY_ADMIN_TOKEN the proxy refuses a public bind; inside a container the
# published port is the operator's choice, so allow it and log a loud warning instead.
CMD ["meterproxy", "serve", "--allow-public-without-token"]
