"""The published OpenAPI schema is pinned in tests/data/openapi.json: a refactor of the HTTP layer
(such as splitting it into routers) cannot change what clients see without this test saying so.

After an intended change of the API, regenerate: ``python tests/test_openapi_schema.py --write``.
"""

import json
import sys
from pathlib import Path

SNAPSHOT = Path(__file__).resolve().parent / "data" / "openapi.json"


def current_schema() -> dict:
    """The schema of an app over a tiny model (routes and models do not depend on the model)."""
    from lmm_steer.api.app import ServerSettings, create_app
    from lmm_steer.engine import Engine, EngineConfig
    from lmm_steer.models.loader import load_model
    from lmm_steer.service import SteeringService

    service = SteeringService(Engine(load_model("builtin:tiny-llama"), None, None, EngineConfig(max_batch=1)))
    return create_app(service, ServerSettings()).openapi()


def test_schema_equals_snapshot():
    schema = json.loads(json.dumps(current_schema()))  # tuples -> lists, as in the file
    want = json.loads(SNAPSHOT.read_text())
    assert schema.keys() == want.keys()
    assert sorted(schema["paths"]) == sorted(want["paths"]), "routes differ"
    for path, item in want["paths"].items():
        assert schema["paths"][path] == item, f"{path} differs"
    assert schema["components"] == want["components"]
    assert schema == want


if __name__ == "__main__" and sys.argv[1:] == ["--write"]:
    SNAPSHOT.write_text(json.dumps(current_schema(), indent=1, sort_keys=True) + "\n")
    print(f"wrote {SNAPSHOT}")
