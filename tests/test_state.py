"""Which names a loader reads as state, and which it changes (so they stay out of the key)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from cachedload.state import LoaderState


def _state_of(body: str, **values: Any) -> LoaderState:
    namespace: dict[str, Any] = {"np": np, **values}
    exec(f"def load(k):\n    {body}\n", namespace)
    return LoaderState(namespace["load"])


@pytest.mark.parametrize(
    "body",
    [
        "X.append(k)",
        "X.setdefault(k, 1)",
        "X[k] = 1",
        "X[k] += 1",
        "X[k][0] = 1",
        "X[k:] = [1]",
        "del X[k]",
        "X.attr.update({k: 1})",
        "global X; X = k",
        "global X; X += 1",
    ],
)
def test_a_name_the_loader_changes_is_not_state(body: str) -> None:
    state = _state_of(body, X={"a": [0]})
    assert "global X" not in state.values()


@pytest.mark.parametrize(
    "body",
    [
        "return X[k]",
        "return X.get(k)",
        "return len(X) + k",
        "return [x for x in X if x == k]",
        "return (lambda: X)()",
        "return {'a': X}[k]",
    ],
)
def test_a_name_the_loader_only_reads_is_state(body: str) -> None:
    state = _state_of(body, X={"a": 1})
    assert "global X" in state.values()


@pytest.mark.parametrize(
    "value",
    [2, 2.5, "s", b"b", None, True, (1, "a"), [1, 2], {"a": (1,)}, {1}, frozenset({2}),
     np.arange(3), np.float32(1)],
)  # fmt: skip
def test_plain_data_is_state_and_other_values_are_not(value: object) -> None:
    assert "global X" in _state_of("return X", X=value).values()
    assert "global X" not in _state_of("return X", X=object()).values()
    assert "global np" not in _state_of("return np.zeros(X)", X=value).values()
