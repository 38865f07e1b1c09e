"""The OpenAPI document: adjustments to APIFlask's output and the ``make openapi`` writer.

Run ``python -m api.spec PATH`` to write the document as YAML; a test fails
when the committed ``api/openapi.yaml`` differs from what the code generates.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import yaml  # type: ignore[import-untyped]

__all__ = ["customize_spec", "main", "render_openapi"]

_PROBLEM_CONTENT_TYPE = "application/problem+json"

_RETRY_AFTER_HEADER = {
    "description": "Seconds to wait before retrying.",
    "schema": {"type": "integer", "minimum": 1},
}
_WWW_AUTHENTICATE_HEADER = {
    "description": "The authentication scheme to use: Bearer.",
    "schema": {"type": "string"},
}


def customize_spec(spec: dict[Any, Any] | str) -> dict[Any, Any] | str:
    """Declare error bodies as problem+json and document Retry-After and WWW-Authenticate."""
    if isinstance(spec, str):
        return spec
    for path_item in spec.get("paths", {}).values():
        for operation in path_item.values():
            for status, response in operation.get("responses", {}).items():
                code = int(status)
                content = response.get("content", {})
                if code >= 400 and "application/json" in content:
                    content[_PROBLEM_CONTENT_TYPE] = content.pop("application/json")
                if code == 400:
                    content.get(_PROBLEM_CONTENT_TYPE, {}).pop("example", None)
                if code == 503:
                    response.setdefault("headers", {})["Retry-After"] = copy.deepcopy(
                        _RETRY_AFTER_HEADER
                    )
                    response.setdefault("content", {}).setdefault(
                        _PROBLEM_CONTENT_TYPE,
                        {"schema": {"$ref": "#/components/schemas/ProblemSchema"}},
                    )
                if code == 401:
                    response.setdefault("headers", {})["WWW-Authenticate"] = copy.deepcopy(
                        _WWW_AUTHENTICATE_HEADER
                    )
    return spec


def render_openapi() -> str:
    """Return the API's OpenAPI document as YAML, generated from the code."""
    from api.app import create_app

    # The URL is never connected to: generating the document runs no query.
    app = create_app("sqlite:///:memory:")
    with app.app_context():
        spec = dict(app.spec)  # type: ignore[arg-type]
    # Put the version and the info block first, as readers expect.
    ordered = {key: spec.pop(key) for key in ("openapi", "info") if key in spec}
    ordered.update(spec)
    text: str = yaml.dump(
        ordered, Dumper=_NoAliasDumper, sort_keys=False, allow_unicode=True, width=100
    )
    return text


class _NoAliasDumper(yaml.SafeDumper):  # type: ignore[misc]
    """A YAML dumper that writes repeated objects in full instead of as anchors."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def main(argv: list[str] | None = None) -> int:
    """Write the OpenAPI document to the path given as the only argument."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m api.spec PATH", file=sys.stderr)
        return 2
    Path(args[0]).write_text(render_openapi(), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
