"""`python -m benchmarks`: see benchmarks/README.md.

`python -m` puts the current directory, the repository root, first on `sys.path`; there the
source directory `kernels/` would not be found as `eqxnorm.kernels` (setuptools installs it
under that name) and a non-editable install would be shadowed by `eqxnorm/`. So the root is
dropped from `sys.path` before anything imports eqxnorm: the benchmark measures the installed
package.
"""

import os
import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [p for p in sys.path if Path(p or os.curdir).resolve() != _ROOT]
# JAX would otherwise take 75% of GPU memory up front, leaving PyTorch's contenders little.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

try:
    import eqxnorm  # noqa: F401
except ImportError as error:
    raise SystemExit(
        f"The benchmark measures the installed eqxnorm, but importing it failed ({error}). "
        f'Install it from the repository root: pip install -e ".[bench]"'
    ) from None

from benchmarks._cli import main  # noqa: E402

raise SystemExit(main())
