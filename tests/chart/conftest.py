"""Fixtures for the Helm chart tests: the chart loaded with helm-python-sdk."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import helm_python as helm
import pytest

from chart_manifests import CHART_DIR, NAMESPACE, RELEASE, Manifest, parse_manifests


@pytest.fixture(scope="session")
def chart() -> Iterator[Any]:
    loaded = helm.Chart.load(CHART_DIR)
    yield loaded
    loaded.close()


@pytest.fixture(scope="session")
def render(chart: Any) -> Callable[..., list[Manifest]]:
    """Return a function that renders the chart as a first install and parses its manifests."""

    def render_values(values: dict[str, Any] | None = None) -> list[Manifest]:
        rendered = chart.render(values or {}, name=RELEASE, namespace=NAMESPACE, is_install=True)
        return parse_manifests(rendered)

    return render_values


