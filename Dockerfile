# The project image: the pinned stack + this package; used by the Ray nodes and the pipeline worker.
FROM python:3.11-slim
WORKDIR /app
ENV PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0 PREFECT_SERVER_ANALYTICS_ENABLED=false
COPY requirements.txt pyproject.toml README.md ./
RUN pip install --no-cache-dir -r requirements.txt
COPY reals ./reals
COPY storage ./storage
COPY pipelines ./pipelines
COPY flows ./flows
COPY configs ./configs
RUN pip install --no-cache-dir --no-deps -e .
CMD ["reals", "--help"]
