# meterproxy: docker build -t meterproxy . && docker run -p 8787:8787 -v meterproxy-data:/data \
#   -e METERPROXY_ADMIN_TOKEN=change-me meterproxy
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    METERPROXY_DB=/data/meterproxy.db \
    METERPROXY_HOST=0.0.0.0 \
    METERPROXY_PORT=8787

WORKDIR /app
COPY pyproject.toml README.md ./
COPY meterproxy ./meterproxy
COPY pricing ./pricing
RUN pip install . && rm -rf /root/.cache

RUN useradd --system --uid 10001 --home-dir /data --shell /usr/sbin/nologin meterproxy \
    && mkdir -p /data && chown meterproxy:meterproxy /data && chmod 700 /data
USER meterproxy
VOLUME ["/data"]
EXPOSE 8787

HEALTHCHECK --interval=15s --timeout=3s --start-period=5s --retries=3 \
    CMD ["python", "-c", "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8787/healthz', timeout=2).status == 200 else 1)"]

# Without METERPROXY_ADMIN_TOKEN the proxy refuses a public bind; inside a container the
# published port is the operator's choice, so allow it and log a loud warning instead.
CMD ["meterproxy", "serve", "--allow-public-without-token"]
