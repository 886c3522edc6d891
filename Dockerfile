# vela-bridge:
#   docker build -t vela-bridge .
#   docker run -p 8000:8000 -e GITHUB_WEBHOOK_SECRET=... -e VELA_TOKEN=... \
#     -v vela-bridge:/var/lib/vela-bridge \
#     -v ./config.toml:/var/lib/vela-bridge/config.toml:ro vela-bridge
# (config.toml sets at least vela.url; see config.example.toml.)
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY bridge ./bridge
RUN pip install ".[postgres]" \
    && useradd --system --uid 10001 --home-dir /var/lib/vela-bridge --create-home bridge \
    && rm -rf /src

# The queue (SQLite) lives on this volume: ./vela-bridge.db relative to the work dir.
# A config.toml mounted here (or at any path given with --config) is read at start-up.
WORKDIR /var/lib/vela-bridge
VOLUME ["/var/lib/vela-bridge"]
USER bridge
EXPOSE 8000

HEALTHCHECK --interval=30s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"]

# SIGTERM finishes or releases in-flight work and exits within seconds.
STOPSIGNAL SIGTERM
ENTRYPOINT ["vela-bridge"]
CMD ["serve", "--host", "0.0.0.0"]
