"""nodes.speed: the benchmark is quick, positive, bounded, and its median is what it reports."""

from __future__ import annotations

import time

import pytest

from nodes.speed import BUDGET_S, CHUNK, SAMPLES, benchmark, measured_speed


def fake_clock(chunk_seconds):
    """A clock where every workload chunk takes the next of `chunk_seconds` (and nothing else takes time)."""
    now, durations, ticks = [0.0], iter(chunk_seconds), [0]

    def clock():
        ticks[0] += 1
        if ticks[0] > 1 and ticks[0] % 2 == 1:  # the end of a chunk: t1 after t0
            now[0] += next(durations)
        return now[0]

    return clock


def test_benchmark_is_positive_and_quick():
    start = time.perf_counter()
    speed = benchmark()
    assert speed > 0
    assert time.perf_counter() - start < 1.0  # budget 0.2 s, plus one chunk, plus a loaded CI machine


def test_reports_the_median_of_the_samples():
    durations = [0.010, 0.020, 0.001, 0.010, 0.040, 0.010, 0.005]
    assert benchmark(clock=fake_clock(durations)) == pytest.approx(CHUNK / 0.010, rel=1e-6)


def test_stops_once_the_budget_is_spent():
    clock = fake_clock([0.15] * 10)  # a slow machine: the second chunk passes the budget
    assert benchmark(clock=clock) == pytest.approx(CHUNK / 0.15, rel=1e-6)
    assert BUDGET_S <= 0.2 and SAMPLES >= 3


def test_a_stalled_clock_gives_zero_and_returns():
    assert benchmark(chunk=10, clock=lambda: 1.0) == 0.0


def test_measured_once_per_process():
    measured_speed.cache_clear()
    first = measured_speed()
    assert measured_speed() is first
    assert measured_speed.cache_info().hits >= 1
