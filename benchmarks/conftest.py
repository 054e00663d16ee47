"""Each benchmark's figures are printed as soon as it ends (pytest-benchmark's table and JSON come
only at the end of the session): a run cut short by a time limit keeps what it measured."""
import sys
from pathlib import Path

TESTS_CONFTEST = Path(__file__).resolve().parent.parent / "tests" / "conftest.py"


def pytest_collection(session):
    """`pytest tests benchmarks` imports this file after tests/conftest.py under the same top-level
    name, `conftest`, which the test modules import their helpers from (`from conftest import
    CLASSES`): that name goes back to tests/conftest.py before any test module is imported."""
    for plugin in session.config.pluginmanager.get_plugins():
        if getattr(plugin, "__file__", None) and Path(plugin.__file__).resolve() == TESTS_CONFTEST:
            sys.modules["conftest"] = plugin


def pytest_runtest_makereport(item, call):
    benchmark = getattr(item, "funcargs", {}).get("benchmark")
    if call.when != "call" or benchmark is None or benchmark.stats is None:  # skipped, or failed before timing
        return
    extra = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in benchmark.extra_info.items())
    print(f"[figure] {item.nodeid}: median {benchmark.stats.stats.median * 1e3:.3f} ms; {extra}",
          file=sys.__stderr__, flush=True)
