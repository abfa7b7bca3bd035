"""The demo's timing column is fair: first-call costs land on no setting, and rounds interleave the settings.

A fake clock and a fake pipeline call: each setting's first call costs 10 s (the warm-up a first call pays),
later calls cost 1 s unguided and 1.5 s guided. ``negguide.apply`` is replaced by a stand-in that records
which method is on, so no pipeline runs.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator
from typing import Any

import pytest

import negguide
from negguide import registry
from negguide.cli import demo

COST = {"none": 1.0, "alpha": 1.5, "beta": 1.5}


class FakeWorld:
    """A clock that only the fake pipeline call advances, and the method currently applied."""

    def __init__(self, drift: float = 0.0) -> None:
        self.now = 0.0
        self.current = "none"
        self.seen: set[str] = set()
        self.calls: list[tuple[str, int | None]] = []
        self.drift = drift  #: the machine slows down by this fraction per call

    def clock(self) -> float:
        return self.now

    def run(self, **override: Any) -> list[str]:
        self.calls.append((self.current, override.get("num_inference_steps")))
        first = self.current not in self.seen
        self.seen.add(self.current)
        self.now += 10.0 if first else COST[self.current] * (1 + self.drift * len(self.calls))
        return [self.current]

    @contextlib.contextmanager
    def apply(self, pipe: Any, name: str, negative_prompt: str) -> Iterator[Any]:
        self.current = name
        config = types.SimpleNamespace(model_dump=lambda: {"scale": 2.0})
        try:
            yield types.SimpleNamespace(method=types.SimpleNamespace(config=config))
        finally:
            self.current = "none"


@pytest.fixture
def world(monkeypatch: pytest.MonkeyPatch) -> FakeWorld:
    fake = FakeWorld()
    monkeypatch.setattr(negguide, "apply", fake.apply)
    monkeypatch.setattr(negguide, "list_methods", lambda: ["alpha", "beta"])
    monkeypatch.setattr(registry, "methods", lambda: {})
    monkeypatch.setattr(demo, "_mean_abs_diff", lambda a, b: 0.0)
    return fake


def _time(world: FakeWorld, rounds: int = 3) -> dict[str, dict[str, Any]]:
    results = demo._time_every_method(None, "snow", [0], 4, world.run, rounds=rounds, clock=world.clock)
    return {e["name"]: e for e in results}


def test_unguided_row_is_not_charged_the_warm_up(world: FakeWorld) -> None:
    """Every setting's first (expensive) call is an untimed one-step warm-up, the unguided one included."""
    results = _time(world)
    assert results["none"]["seconds"] == 1.0
    for name in ("alpha", "beta"):
        assert results[name]["seconds"] == 1.5
        assert results[name]["ratio"] == 1.5 and results[name]["ratio_range"] == [1.5, 1.5]
    assert world.calls[:3] == [("none", 1), ("alpha", 1), ("beta", 1)]  # the warm-up, one step each
    assert results["alpha"]["params"] == {"scale": 2.0} and results["alpha"]["status"] == "ok"


def test_rounds_interleave_with_the_order_rotated(world: FakeWorld) -> None:
    _time(world, rounds=3)
    timed = [name for name, steps in world.calls if steps is None]
    assert timed == ["none", "alpha", "beta", "alpha", "beta", "none", "beta", "none", "alpha"]


def test_ratio_is_per_round_on_a_drifting_machine(world: FakeWorld) -> None:
    """A machine that slows down during the run: the ratio is taken within each round, so it stays near 1.5,
    while a ratio of whole-run medians would be off by the drift."""
    world.drift = 0.05
    results = _time(world, rounds=3)
    assert 1.3 < results["alpha"]["ratio"] < 1.7
    lo, hi = results["alpha"]["ratio_range"]
    assert lo <= results["alpha"]["ratio"] <= hi


def test_a_failing_method_is_reported_and_left_out_of_the_rounds(world: FakeWorld) -> None:
    fail = world.apply

    @contextlib.contextmanager
    def apply(pipe: Any, name: str, negative_prompt: str) -> Iterator[Any]:
        if name == "beta":
            raise RuntimeError("beta cannot run on this model")
        with fail(pipe, name, negative_prompt) as handle:
            yield handle

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(negguide, "apply", apply)
        results = _time(world)
    assert results["beta"]["status"] == "failed" and "beta cannot run" in results["beta"]["error"]
    assert "beta" not in [name for name, _ in world.calls]
    assert results["alpha"]["ratio"] == 1.5
