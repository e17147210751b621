# syntax=docker/dockerfile:1
# The gateway image: one image for every role (`gateway run | api | worker | sandbox`).
#
#   docker build -t whatsapp-send-gateway .
#   docker run -p 8080:8080 whatsapp-send-gateway          # `gateway run`, embedded Redis in /data
#   docker run whatsapp-send-gateway worker --help
#
# Stage 1 builds wheels of the project and of every dependency; stage 2 installs them offline
# into a clean python:3.11-slim, so no compiler, pip cache or source tree reaches the image.

ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
WORKDIR /src
# Only what the wheel is made of, so editing tests or dashboards does not rebuild it.
# `README.md*` rather than `README.md`: the wheel's long description is optional, the build not.
COPY pyproject.toml README.md* ./
COPY gateway ./gateway
RUN pip wheel --wheel-dir /wheels .

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="whatsapp-send-gateway" \
      org.opencontainers.image.description="High-throughput outbound send gateway for WhatsApp Business messages"
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    GATEWAY_DATA_DIR=/data \
    GATEWAY_HOST=0.0.0.0 \
    GATEWAY_PORT=8080

# A fixed numeric uid/gid, so orchestrators that insist on runAsNonRoot can check it.
RUN groupadd --system --gid 10001 gateway \
    && useradd --system --uid 10001 --gid gateway --home-dir /data --no-create-home \
        --shell /usr/sbin/nologin gateway \
    && mkdir -p /data \
    && chown gateway:gateway /data

# The wheels are bind-mounted from the build stage, not copied: they never become a layer.
# Versions are pinned by the build stage (offline install from its wheels only).
# hadolint ignore=DL3013
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-index --find-links=/wheels whatsapp-send-gateway \
    && gateway --version

# Generated keys, the embedded Redis (AOF) and the metrics files live here.
VOLUME ["/data"]
WORKDIR /data
USER 10001:10001

EXPOSE 8080
# No curl in slim images: python's urllib does the probe (a non-2xx answer raises, exit 1).
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('GATEWAY_PORT', '8080'), timeout=2)"]

ENTRYPOINT ["gateway"]
CMD ["run"]
