"""Each benchmark's figures are printed as soon as it ends (pytest-benchmark's table and JSON come
only at the end of the session): a run cut short by a time limit keeps what it measured."""
import sys


def pytest_runtest_makereport(item, call):
    benchmark = getattr(item, "funcargs", {}).get("benchmark")
    if call.when != "call" or benchmark is None or benchmark.stats is None:  # skipped, or failed before timing
        return
    extra = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in benchmark.extra_info.items())
    print(f"[figure] {item.nodeid}: median {benchmark.stats.stats.median * 1e3:.3f} ms; {extra}",
          file=sys.__stderr__, flush=True)
