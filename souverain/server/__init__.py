"""The platform's HTTP API (FastAPI): Mistral- and OpenAI-compatible."""
