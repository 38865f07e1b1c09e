"""Run the documented helm and kubectl commands as far as a machine without a cluster can.

Every ``helm install`` and ``helm upgrade`` in README.md and docs/deployment.md is
replayed in document order. Its ``--set`` flags are parsed as Helm parses them, and
an upgrade with ``--reuse-values`` adds them to the values of the install before
it. The chart is rendered with the result (values.schema.json included), and each
manifest is validated against the Kubernetes schema. Every resource that a
``kubectl`` line names must be one that the install before it renders.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest

from chart_manifests import CHART_DIR, Manifest, parse_manifests

ROOT = CHART_DIR.parents[1]
DOCS = [ROOT / "README.md", ROOT / "docs" / "deployment.md"]
CUSTOM_API_GROUPS = ("keda.sh/", "monitoring.coreos.com/")
_SHELL_BLOCK = re.compile(r"```(?:sh|bash|shell)\n(.*?)```", re.S)


def shell_commands(path: Path) -> list[str]:
    """Return the commands of a document's shell blocks, continuation lines joined and comments dropped."""
    commands: list[str] = []
    for block in _SHELL_BLOCK.findall(path.read_text()):
        pending = ""
        for line in block.splitlines():
            text = line.split(" #", 1)[0].rstrip() if not line.lstrip().startswith("#") else ""
            if text.endswith("\\"):
                pending += text[:-1] + " "
                continue
            command = (pending + text).strip()
            pending = ""
            if command:
                commands.append(command)
    return commands


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


class HelmCommand:
    """One documented ``helm`` command, parsed."""

    def __init__(self, text: str) -> None:
        words = shlex.split(text)
        self.text = text
        self.verb = words[1]
        self.namespace = "default"
        expressions: list[str] = []
        self.reuse_values = "--reuse-values" in words
        index = 2
        positional = []
        while index < len(words):
            word = words[index]
            if word in ("--namespace", "-n"):
                self.namespace = words[index + 1]
                index += 2
            elif word == "--set":
                expressions.append(words[index + 1])
                index += 2
            elif word.startswith("-"):
                index += 1
            else:
                positional.append(word)
                index += 1
        # Helm parses every --set into one map, so list items set by index in
        # separate flags end up in the same item. One joined expression does the same.
        self.values: dict[str, Any] = helm.parse_set_string(",".join(expressions)) if expressions else {}
        self.release = positional[0]
        self.chart = positional[1] if len(positional) > 1 else None


def documented_helm_commands() -> list[tuple[str, list[HelmCommand]]]:
    found = []
    for path in DOCS:
        commands = [HelmCommand(text) for text in shell_commands(path) if text.startswith("helm ")]
        found.append((path.name, commands))
    return found


def kubectl_references(path: Path) -> list[tuple[str, str, str]]:
    """Return (namespace, kind, name) of every resource a kubectl line of ``path`` names."""
    references = []
    for text in shell_commands(path):
        for command in re.findall(r"kubectl [^|)&;]*", text):
            words = shlex.split(command)
            namespace = words[words.index("--namespace") + 1] if "--namespace" in words else "default"
            if "create" in words:
                continue
            for word in words:
                match = re.fullmatch(r"(job|statefulset|deployment|service)/([\w.-]+)", word)
                if match:
                    references.append((namespace, match[1], match[2]))
            if "get" in words and "secret" in words:
                references.append((namespace, "secret", words[words.index("secret") + 1]))
    return references


def render(values: dict[str, Any], command: HelmCommand) -> list[Manifest]:
    chart = helm.Chart.load(CHART_DIR)
    try:
        rendered = chart.render(
            values,
            name=command.release,
            namespace=command.namespace,
            is_install=command.verb == "install",
            is_upgrade=command.verb == "upgrade",
        )
    finally:
        chart.close()
    return parse_manifests(rendered)


@pytest.mark.parametrize(("document", "commands"), documented_helm_commands(), ids=lambda item: str(item)[:20])
def test_documented_helm_commands_render(document: str, commands: list[HelmCommand]) -> None:
    assert commands, f"{document} documents no helm command"
    values: dict[str, Any] | None = None
    for command in commands:
        if command.verb == "uninstall":
            assert values is not None, f"{command.text!r} uninstalls a release the document never installed"
            continue
        assert command.verb in ("install", "upgrade"), command.text
        assert command.chart is not None and (ROOT / command.chart).resolve() == CHART_DIR, command.text
        if command.verb == "install":
            values = command.values
        else:
            assert command.reuse_values, f"{command.text!r}: an upgrade without --reuse-values resets every value"
            assert values is not None, f"{command.text!r} upgrades a release the document never installed"
            values = merge(values, command.values)
        for manifest in render(values, command):
            if manifest["apiVersion"].startswith(CUSTOM_API_GROUPS):
                continue
            kubernetes_validate.validate(manifest, "1.33.0", strict=True)


def test_documented_kubectl_resources_exist() -> None:
    path = ROOT / "docs" / "deployment.md"
    install = next(c for c in documented_helm_commands()[1][1] if c.verb == "install")
    manifests = render(install.values, install)
    rendered = {(m["metadata"].get("namespace", install.namespace), m["kind"].lower(), m["metadata"]["name"]) for m in manifests}
    references = kubectl_references(path)

    assert references, "docs/deployment.md names no kubectl resource"
    missing = [reference for reference in references if reference not in rendered]
    assert missing == []
    tokens = next(m for m in manifests if m["kind"] == "Secret" and m["metadata"]["name"].endswith("-tokens"))
    assert "api-token" in tokens.get("data", {}) | tokens.get("stringData", {})
