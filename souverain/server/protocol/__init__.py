"""Wire models (pydantic): what the Mistral and OpenAI APIs send and receive."""
