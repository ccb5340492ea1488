"""The REST API (FastAPI): ``uvicorn services.api.main:app``. Reads the database, never the miner."""
