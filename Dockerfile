# Image of the muse workers and CLI for compose.yaml (server deployment).
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md alembic.ini ./
COPY muse ./muse
COPY muse_cli ./muse_cli
COPY indexer ./indexer
COPY retriever ./retriever
COPY ranker ./ranker
COPY migrations ./migrations
RUN pip install --no-cache-dir -e ".[bulk]"
ENV MUSE_DATA_DIR=/data
CMD ["muse", "--help"]
