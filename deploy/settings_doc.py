"""Regenerate what is derived from service.settings.Settings (`make docs`): the settings
table of docs/operations.md, and the type of every `gateway.config` value in the Helm
chart's values.schema.json (the chart maps those values one to one onto the settings)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from service.settings import Settings, helm_key

HEAD = "| variable | default | meaning |\n|---|---|---|\n"
SCHEMA = Path("helm/resnet-serving/values.schema.json")
#: The page that documents every setting.
PAGE = Path("docs/operations.md")
#: Settings the chart sets itself, from where things are in the pod, not from gateway.config.
CHART_OWNED = frozenset(
    {
        "repository",
        "host",
        "port",
        "grpc_port",
        "backend",
        "triton_url",
        "triton_admin_key",
        # On in sidecar mode (Triton in the gateway's pod), off otherwise: the chart's layout.
        "triton_shared_memory",
        "api_keys",
        "admin_keys",
    }
)


def rows() -> str:
    out = []
    for name, f in Settings.model_fields.items():
        d = f.get_default(call_default_factory=True)
        if isinstance(d, list):
            d = ",".join(d) or "(empty)"
        if d is None:
            d = "(none)"
        out.append(f"| `RESNET_SERVE_{name.upper()}` | `{d}` | {f.description or ''} |")
    return "\n".join(out)


def _strip(node: Any) -> Any:
    # Titles are pydantic's, defaults live in values.yaml: only the type and bounds stay.
    if isinstance(node, dict):
        return {k: _strip(v) for k, v in node.items() if k not in ("title", "default")}
    if isinstance(node, list):
        return [_strip(v) for v in node]
    return node


def config_schema() -> dict[str, Any]:
    """JSON schema of the chart's ``gateway.config``: every setting but the chart's own."""
    fields = Settings.model_json_schema()["properties"]
    props = {
        helm_key(name): _strip(fields[name])
        for name in Settings.model_fields
        if name not in CHART_OWNED
    }
    return {
        "type": "object",
        "description": "The gateway's settings (RESNET_SERVE_*), one to one; null: the default.",
        "additionalProperties": False,
        "properties": {k: _nullable(v) for k, v in props.items()},
    }


def _nullable(prop: dict[str, Any]) -> dict[str, Any]:
    """null is accepted everywhere: it leaves the variable unset (the gateway's default)."""
    if "anyOf" in prop and {"type": "null"} in prop["anyOf"]:
        return prop
    description = prop.pop("description", None)
    out: dict[str, Any] = {"anyOf": [prop, {"type": "null"}]}
    if description:
        out["description"] = description
    return out


def schema_text(current: str) -> str:
    schema = json.loads(current)
    schema["properties"]["gateway"]["properties"]["config"] = config_schema()
    return json.dumps(schema, indent=2) + "\n"


def main() -> None:
    text = PAGE.read_text()
    start = text.index(HEAD) + len(HEAD)
    end = text.index("\n\n", start)
    PAGE.write_text(text[:start] + rows() + text[end:])
    SCHEMA.write_text(schema_text(SCHEMA.read_text()))


if __name__ == "__main__":
    main()
