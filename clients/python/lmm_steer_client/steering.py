"""A builder for the ``steering`` object the server accepts; invalid input never leaves the client."""

from __future__ import annotations

import math

MODES = ("clamp", "add", "scale", "transfer")
SCOPES = ("all", "prompt", "generated", "image")
SEMANTICS = ("delta", "paper")
WHEN_ON = ("prompt", "text")


class Steering:
    """``Steering().clamp(1234, 50).add(77, -3).scope("generated")`` -> the request's ``steering``."""

    def __init__(self) -> None:
        self._features: list[dict] = []
        self._concepts: list[dict] = []
        self._scope: str | None = None
        self._semantics: str | None = None
        self._preset: str | None = None

    def _edit(self, feature: int, value: float, mode: str, source: int | None = None,
              where: int | None = None, when: int | None = None, when_on: str = "prompt") -> Steering:
        for name, fid in (("feature", feature), ("source", source), ("where", where), ("when", when)):
            if fid is not None and (isinstance(fid, bool) or not isinstance(fid, int) or fid < 0):
                raise ValueError(f"{name} id must be a non-negative integer, got {fid!r}")
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ValueError(f"value for feature {feature} must be a finite number, got {value!r}")
        if when_on not in WHEN_ON or (when_on != "prompt" and when is None):
            raise ValueError(f"when_on must be one of {WHEN_ON} and 'text' needs a when feature, got {when_on!r}")
        key = (where, when, when_on if when is not None else "prompt")
        same = [(f.get("where"), f.get("when"), f.get("when_on", "prompt")) for f in self._features if f["id"] == feature]
        if same and (key in same or (None, None, "prompt") in [*same, key]):
            # as the server: a feature is edited again only with another gate or condition
            raise ValueError(f"feature {feature} is already set")
        edit = {"id": feature, "value": float(value), "mode": mode}
        if source is not None:
            edit["source"] = source
        if where is not None:
            edit["where"] = where
        if when is not None:
            edit["when"] = when
        if when_on != "prompt":
            edit["when_on"] = when_on
        self._features.append(edit)
        return self

    # ``where``: a gate feature; the edit then acts only at positions where that feature fires.
    # ``when``: a condition feature; the edit then acts on a request only if that feature fires
    # somewhere in its prompt (e.g. a feature of colour questions); ``when_on="text"`` reads it on
    # the prompt's text alone, not the image's tokens. A feature may be edited again with another
    # gate or condition (e.g. one per named object).
    def clamp(self, feature: int, value: float, where: int | None = None, when: int | None = None,
              when_on: str = "prompt") -> Steering:
        return self._edit(feature, value, "clamp", where=where, when=when, when_on=when_on)

    def add(self, feature: int, value: float, where: int | None = None, when: int | None = None,
            when_on: str = "prompt") -> Steering:
        return self._edit(feature, value, "add", where=where, when=when, when_on=when_on)

    def scale(self, feature: int, value: float, where: int | None = None, when: int | None = None,
              when_on: str = "prompt") -> Steering:
        return self._edit(feature, value, "scale", where=where, when=when, when_on=when_on)

    def ablate(self, feature: int, where: int | None = None, when: int | None = None,
               when_on: str = "prompt") -> Steering:
        return self._edit(feature, 0.0, "clamp", where=where, when=when, when_on=when_on)

    def transfer(self, feature: int, value: float, source: int, where: int | None = None,
                 when: int | None = None, when_on: str = "prompt") -> Steering:
        """Write ``value`` times ``source``'s activation along ``feature``'s direction, wherever
        ``source`` fires (and nowhere else)."""
        if source is None or source == feature:
            raise ValueError(f"a transfer needs another feature as its source, got {source!r}")
        return self._edit(feature, value, "transfer", source, where, when, when_on)

    def swap(self, source: int, feature: int, value: float = 1.0) -> Steering:
        """Where ``source`` fires, the model reads ``feature`` instead: ``source`` ablated, and
        ``value`` times its activation transferred to ``feature``."""
        return self.ablate(source).transfer(feature, value, source)

    def concept(self, text: str, strength: float = 1.0, max_features: int = 1) -> Steering:
        """Steer toward a concept named in words (negative strength: away from it); the server
        picks the features and their calibrated values, and echoes them in the response."""
        if not isinstance(text, str) or not text.strip() or len(text) > 200:
            raise ValueError(f"concept must be 1-200 characters of text, got {text!r}")
        if isinstance(strength, bool) or not isinstance(strength, int | float) or not -4 <= strength <= 4:
            raise ValueError(f"strength must be a number in [-4, 4], got {strength!r}")
        if isinstance(max_features, bool) or not isinstance(max_features, int) or not 1 <= max_features <= 8:
            raise ValueError(f"max_features must be an integer in [1, 8], got {max_features!r}")
        self._concepts.append({"text": text, "strength": float(strength), "max_features": max_features})
        return self

    def scope(self, scope: str) -> Steering:
        if scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
        self._scope = scope
        return self

    def semantics(self, semantics: str) -> Steering:
        if semantics not in SEMANTICS:
            raise ValueError(f"semantics must be one of {SEMANTICS}, got {semantics!r}")
        self._semantics = semantics
        return self

    def preset(self, name: str) -> Steering:
        """Start from a preset the server loaded (``GET /v1/models`` lists them); this steering's own
        edits apply on top: an edit of the same feature replaces the preset's."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"preset must be a name, got {name!r}")
        self._preset = name
        return self

    def to_dict(self) -> dict:
        out: dict = {"features": [dict(f) for f in self._features]}
        if self._concepts:
            out["concepts"] = [dict(c) for c in self._concepts]
        if self._scope is not None:
            out["scope"] = self._scope
        # left out unless chosen, so that a preset's own semantics stands (the server's default is delta)
        if self._semantics is not None:
            out["semantics"] = self._semantics
        if self._preset is not None:
            out["preset"] = self._preset
        return out

    @classmethod
    def from_clamps(cls, clamps: dict[int, float]) -> Steering:
        s = cls()
        for feature, value in clamps.items():
            s.clamp(int(feature), value)
        return s
