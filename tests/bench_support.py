"""Importing the `benchmarks` package (not installed) from the checkout in the tests."""

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def load_benchmarks():
    """Import the `benchmarks` package from the checkout without putting the repository root
    on `sys.path` (where `eqxnorm/` and `kernels/` would shadow the installed package)."""
    if "benchmarks" not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            "benchmarks",
            ROOT / "benchmarks" / "__init__.py",
            submodule_search_locations=[str(ROOT / "benchmarks")],
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules["benchmarks"] = module
        spec.loader.exec_module(module)
    return sys.modules["benchmarks"]
