# droptune worker / MLflow server image (docker-compose.yml builds it once for every service).
#
#   docker build -t droptune:local .
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 ...
#
# Stage 1, the CUDA-capable torch base: on Linux x86_64 the torch wheel from PyPI is a CUDA build
# (its CUDA runtime, cuDNN and NCCL come as nvidia-* wheels), so a slim Python image is enough:
# the host's NVIDIA driver reaches the container through the NVIDIA Container Toolkit
# (`deploy.resources.reservations.devices` in docker-compose.yml). Pick another CUDA build with
# TORCH_INDEX_URL.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS torch
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN pip install "torch==${TORCH_VERSION}" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}

# Stage 2: droptune and its dependencies at the exact versions it was tested with
# (docker/requirements.lock, written by docker/make_lock.py), then `pip check`.
FROM torch AS droptune
WORKDIR /app
COPY docker/requirements.lock docker/requirements.lock
RUN pip install -r docker/requirements.lock
COPY pyproject.toml README.md ./
COPY droptune droptune
RUN pip install --no-deps . && pip check

# Non-root user. /mlartifacts and /app/runs exist (owned by it) so that the named volumes
# mounted there start with that ownership.
RUN useradd --create-home --uid 10001 --user-group droptune \
    && mkdir -p /mlartifacts /app/runs /home/droptune/.cache/droptune \
    && chown -R droptune:droptune /mlartifacts /app/runs /home/droptune/.cache
COPY --chown=droptune:droptune studies studies
COPY --chown=droptune:droptune examples examples
COPY --chmod=0755 docker/worker.sh /usr/local/bin/droptune-worker
USER droptune
ENV DROPTUNE_CACHE_DIR=/home/droptune/.cache/droptune \
    MPLCONFIGDIR=/tmp/matplotlib
ENTRYPOINT ["droptune"]
CMD ["--help"]
