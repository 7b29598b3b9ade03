# syntax=docker/dockerfile:1
# HA Ingestor: build a wheel, install it into a virtual environment, ship only that.

FROM python:3.11-slim AS build
WORKDIR /src
RUN python -m venv /opt/venv
COPY pyproject.toml README.md constraints.txt ./
COPY src ./src
RUN /opt/venv/bin/pip install --no-cache-dir --upgrade pip \
 && /opt/venv/bin/pip install --no-cache-dir -c constraints.txt .

FROM python:3.11-slim
LABEL org.opencontainers.image.title="HA Ingestor" \
      org.opencontainers.image.description="Captures all Home Assistant activity (MQTT and the event bus) into InfluxDB" \
      org.opencontainers.image.licenses="MIT" \
      org.opencontainers.image.version="0.1.0"
RUN groupadd --system --gid 10001 ingestor \
 && useradd --system --uid 10001 --gid ingestor --home-dir /data --shell /usr/sbin/nologin ingestor \
 && mkdir -p /data/spool && chown -R ingestor:ingestor /data
COPY --from=build /opt/venv /opt/venv
ENV PATH="/opt/venv/bin:$PATH" \
    PYTHONUNBUFFERED=1 \
    HA_INGESTOR_SPOOL_DIR=/data/spool \
    HA_INGESTOR_HTTP_PORT=8000
USER 10001:10001
VOLUME ["/data"]
EXPOSE 8000
# No curl in the image: Python itself asks the liveness endpoint.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('HA_INGESTOR_HTTP_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["ha-ingestor"]
CMD ["run"]
