"""A measured speed: a short pure-Python benchmark, higher is faster.

The workload is a fixed loop of integer (an LCG step) and float (a multiply-add from a table)
work: CPython's interpreter speed on this CPU, which is what the daemon's own work runs at and
orders machines the way their llama.cpp speeds roughly do. The number is loop iterations per
second ("ops/s"): the median of up to `samples` timed chunks, stopping early once `budget_s`
has passed (a chunk takes ~3 ms on a 2020s desktop core, ~150 ms on a MIPS router; a slow machine
stops after one chunk rather than run long).

`measured_speed()` runs it once per process and caches the answer.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable

UNIT = "ops/s"
CHUNK = 8192
SAMPLES = 7
BUDGET_S = 0.2

_TABLE = tuple((i * 0.618033988749895) % 1.0 for i in range(256))


def workload(n: int) -> float:
    """n iterations of the fixed integer + float loop."""
    table = _TABLE
    x = 12345
    acc = 0.0
    for _ in range(n):
        x = (x * 1103515245 + 12345) & 0xFFFFFFFF
        acc = acc * 0.999 + table[x >> 24] * 1.5
    return acc


def benchmark(budget_s: float = BUDGET_S, samples: int = SAMPLES, chunk: int = CHUNK,
              clock: Callable[[], float] = time.perf_counter) -> float:
    """Median iterations per second over up to `samples` chunks within `budget_s`; 0.0 if unmeasurable."""
    rates: list[float] = []
    start = clock()
    for _ in range(samples * 4):  # bounded even if the clock stalls
        t0 = clock()
        workload(chunk)
        t1 = clock()
        if t1 > t0:
            rates.append(chunk / (t1 - t0))
        if len(rates) >= samples or (rates and t1 - start >= budget_s):
            break
    return round(_median(rates), 1) if rates else 0.0


def _median(values: list[float]) -> float:
    """statistics.median, without importing statistics (it pulls fractions and decimal: ~0.5 MB a witness holds)."""
    ordered, half = sorted(values), len(values) // 2
    return ordered[half] if len(values) % 2 else (ordered[half - 1] + ordered[half]) / 2


@functools.cache
def measured_speed() -> float:
    """`benchmark()`, run once per process."""
    return benchmark()
