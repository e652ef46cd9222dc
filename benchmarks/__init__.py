"""eqxnorm's benchmarks: `python -m benchmarks --help` (see benchmarks/README.md).

Not part of the installed package: run from a checkout, with eqxnorm installed
(`pip install -e ".[bench]"`).
"""
