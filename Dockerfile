# One image for every service of the ORL stack (migrate, api, miner-cpu, miner-gpu, trainer,
# dashboard) and for the `orl` CLI; docker-compose.yml picks the command per service.
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
# libgl/libglib are not needed by the headless OpenCV build; libgomp is needed by faiss/torch.
RUN apt-get update && apt-get install -y --no-install-recommends libgomp1 make && rm -rf /var/lib/apt/lists/*
# Dependencies first, in their own layer: code changes do not reinstall torch.
# PyPI's Linux torch wheels carry CUDA, so the same image serves CPU-only and GPU hosts; for a
# smaller CPU-only image build with --build-arg PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG PIP_EXTRA_INDEX_URL=
COPY requirements.txt requirements-dev.txt pyproject.toml ./
RUN pip install -r requirements.txt
COPY orl ./orl
COPY services ./services
COPY migrations ./migrations
COPY alembic.ini ./
COPY dashboard ./dashboard
COPY scripts ./scripts
COPY data ./data
COPY README.md Makefile ./
RUN pip install --no-deps -e .
# Services run unprivileged; the artifacts volume is created from this folder and inherits its owner.
RUN useradd --create-home --uid 1000 orl && mkdir -p /artifacts /data && chown orl:orl /artifacts
USER orl
ENV ORL_ARTIFACTS_DIR=/artifacts ORL_DATA_ROOTS=/data
EXPOSE 8000 8501
# The API by default; compose sets each service's command, and `orl ...` runs the CLI.
CMD ["uvicorn", "services.api.main:app", "--host", "0.0.0.0", "--port", "8000"]
