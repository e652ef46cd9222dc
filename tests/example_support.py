"""Loading the example scripts (`examples/*.py`, not a package) by path for their smoke tests."""

import importlib.util
from pathlib import Path
from types import ModuleType

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load_example(name: str) -> ModuleType:
    """The module `examples/<name>.py`, executed (its `main` is not run)."""
    path = EXAMPLES / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"eqxnorm_examples_{name}", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load the example {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
