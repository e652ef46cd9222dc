"""MkDocs hooks for the eqxnorm site.

- The committed benchmark results, `benchmarks/results/cpu/` (plots, CSV, JSON and
  `summary.md`, a page of the site), are served under `benchmarks/cpu/`, without copies in
  docs/.
- The docstrings' cross-references to Equinox (``[`equinox.nn.State`][]``) link to Equinox's
  documentation. Its inventory (`objects.inv`) would need the network at build time, which
  the strict build in CI must not, so the few names used are listed here: a new one fails
  the build until it is added.
"""

from pathlib import Path

from mkdocs.structure.files import File

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "cpu"

_EQUINOX = "https://docs.kidger.site/equinox/api/nn/"
EXTERNAL = {
    f"equinox.nn.{name}": f"{_EQUINOX}{page}/#equinox.nn.{name}"
    for name, page in {
        "State": "stateful",
        "make_with_state": "stateful",
        "inference_mode": "inference",
        "Linear": "linear",
        "Conv2d": "conv",
        "GroupNorm": "normalisation",
        "SpectralNorm": "normalisation",
    }.items()
}


def on_config(config):
    autorefs = config.plugins["autorefs"]
    for identifier, url in EXTERNAL.items():
        autorefs.register_url(identifier, url)
    return config


def on_files(files, config):
    for path in sorted(RESULTS.iterdir()):
        files.append(File.generated(config, f"benchmarks/cpu/{path.name}", abs_src_path=str(path)))
    return files
