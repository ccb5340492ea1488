# The orl library and CLI. Services (next issue) build on this image.
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
# libgl/libglib are not needed by the headless OpenCV build; libgomp is needed by faiss/torch.
RUN apt-get update && apt-get install -y --no-install-recommends libgomp1 make && rm -rf /var/lib/apt/lists/*
COPY requirements.txt requirements-dev.txt pyproject.toml ./
RUN pip install -r requirements.txt
COPY orl ./orl
COPY scripts ./scripts
COPY data ./data
COPY README.md Makefile ./
RUN pip install --no-deps -e .
ENTRYPOINT ["orl"]
CMD ["--help"]
