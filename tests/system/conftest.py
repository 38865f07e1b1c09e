"""Fixtures of the end-to-end tests."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from system_stack import Stack


@pytest.fixture
def make_stack(tmp_path: Path) -> Iterator[Callable[..., Stack]]:
    """Factory of started stacks; each is stopped at teardown, with every process it started."""
    stacks: list[Stack] = []

    def factory(**kwargs: object) -> Stack:
        kwargs.setdefault("data_dir", tmp_path / f"stack{len(stacks)}")
        stack = Stack(**kwargs)  # type: ignore[arg-type]
        stacks.append(stack)
        stack.start()
        return stack

    yield factory
    for stack in stacks:
        stack.stop()
