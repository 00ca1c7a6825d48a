"""One APIRouter per resource, as vLLM splits its OpenAI server by endpoint; ``create_app`` includes
them all. Routes reach the service, settings and metrics through ``deps``."""
