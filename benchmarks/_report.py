"""Reporting: the terminal table, CSV, JSON, the targets' summary and `summary.md`.

Each result row is a dict with the keys in [`COLUMNS`][]. `status` is `"ok"`, `"skipped"`
(the contender cannot run that case here; `note` says why) or `"failed"` (it raised; `note`
has the error). The targets of issues 5, 6 and 16 are evaluated here, on the measured rows only;
issue 17's on the measured rows (the time against each peer) and on deviceless tables
(`python -m benchmarks.deviceless`, whose own verdicts they summarize: [`static_targets`][]).
"""

import csv
import dataclasses
import json
import math
import statistics
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from ._ops import EQXNORM_ONLY, OPS

COLUMNS = (
    "op",
    "impl",
    "shape",
    "dtype",
    "device",
    "direction",
    "ms",
    "ms_min",
    "gbps",
    "pct_copy",
    "speedup",
    "bytes",
    "residual_bytes",
    "residual_ratio",
    "compile_s",
    "rows",
    "width",
    "status",
    "note",
)


def _case(r: dict) -> tuple:
    """A row's case and direction: rows with equal keys measured the same work."""
    return r["op"], r["shape"], r["dtype"], r["direction"]


def fill_derived(rows: list[dict]) -> None:
    """Add `pct_copy` (GB/s over the copy's on the same bytes) and `speedup` (the reference's
    time over this row's) to every measured row, in place."""
    key = _case
    copy = {key(r): r for r in rows if r["impl"] == "copy" and r["status"] == "ok"}
    reference = {key(r): r for r in rows if r["impl"] == "reference" and r["status"] == "ok"}
    for r in rows:
        if r["status"] != "ok":
            continue
        if key(r) in copy:
            r["pct_copy"] = 100 * r["gbps"] / copy[key(r)]["gbps"]
        if key(r) in reference:
            r["speedup"] = reference[key(r)]["ms"] / r["ms"]


# --- the terminal table ------------------------------------------------------------------------


def _fmt(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


def table(rows: list[dict]) -> str:
    """The measured rows, one line each, grouped by op, dtype and shape; then the skipped and
    failed contenders with their reasons (each reason once)."""
    header = ("op", "shape", "dtype", "dir", "impl", "ms", "GB/s", "%copy", "×ref", "res/x", "note")
    lines = []
    for r in rows:
        if r["status"] != "ok":
            continue
        lines.append(
            (
                r["op"],
                r["shape"],
                r["dtype"],
                r["direction"],
                r["impl"],
                _fmt(r["ms"], ".3f"),
                _fmt(r["gbps"], ".1f"),
                _fmt(r["pct_copy"], ".0f"),
                _fmt(r["speedup"], ".2f"),
                _fmt(r["residual_ratio"], ".2f"),
                r["note"],
            )
        )
    widths = [max(len(str(c)) for c in col) for col in zip(header, *lines, strict=False)]
    numeric = {5, 6, 7, 8, 9}

    def render(cells) -> str:
        out = [
            str(c).rjust(w) if i in numeric else str(c).ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "  ".join(out).rstrip()

    text = [render(header), render("-" * w for w in widths)]
    previous = None
    for cells in lines:
        group = cells[:4]
        if previous is not None and group[:3] != previous[:3]:
            text.append("")
        previous = group
        text.append(render(cells))
    text.extend(not_run(rows))
    return "\n".join(text)


def not_run(rows: list[dict]) -> list[str]:
    """`impl (ops): reason` for each distinct reason a contender was skipped or failed."""
    reasons: dict[tuple[str, str, str], list[str]] = {}
    for r in rows:
        if r["status"] != "ok":
            ops = reasons.setdefault((r["status"], r["impl"], r["note"]), [])
            if r["op"] not in ops:
                ops.append(r["op"])
    if not reasons:
        return []
    lines = ["", "Not run:"]
    for (status, impl, note), ops in reasons.items():
        lines.append(f"  {impl} [{status}] ({', '.join(ops)}): {note}")
    return lines


# --- files -------------------------------------------------------------------------------------


def write_csv(rows: list[dict], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, COLUMNS)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: _csv_value(r[k]) for k in COLUMNS})


def _csv_value(value):
    if isinstance(value, float):
        return f"{value:.6g}"
    return "" if value is None else value


def write_json(document: dict, path: Path) -> None:
    path.write_text(json.dumps(document, indent=1, default=str) + "\n")


# --- targets -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Result:
    """One target's verdict: `status` is `"MET"`, `"MISSED"`, `"TOO NOISY"` (the 95%
    confidence interval of a ratio straddles the threshold) or `"NOT MEASURED"`."""

    platform: str
    target: str
    status: str
    measured: str


def _where(rows: Iterable[dict], **match) -> list[dict]:
    out = []
    for r in rows:
        if r["status"] != "ok":
            continue
        if all(
            (r[k] in v) if isinstance(v, (tuple, list, set)) else r[k] == v
            for k, v in match.items()
        ):
            out.append(r)
    return out


def _paired(rows: list[dict], impl: str, other: str, **match) -> list[tuple[dict, dict]]:
    """`(row of impl, row of other)` for every case and direction both measured."""
    key = _case
    others = {key(r): r for r in _where(rows, impl=other, **match)}
    return [(r, others[key(r)]) for r in _where(rows, impl=impl, **match) if key(r) in others]


def _at(r: dict) -> str:
    return f"{r['shape']} {r['dtype']} {r['direction']}"


def _worst(
    candidates: list[dict], value: Callable[[dict], float], threshold: float, unit: str, low: bool
) -> tuple[str, str]:
    """The verdict on the worst candidate (lowest value when `low`, else highest)."""
    if not candidates:
        return "NOT MEASURED", "no matching rows"
    pick = min if low else max
    worst = pick(candidates, key=value)
    ok = value(worst) >= threshold if low else value(worst) <= threshold
    summary = f"worst {value(worst):.2f}{unit} at {_at(worst)} ({len(candidates)} rows)"
    return ("MET" if ok else "MISSED"), summary


# Two-sided 95% quantiles of Student's t by degrees of freedom (1.96 beyond the table).
_T95 = (12.71, 4.30, 3.18, 2.78, 2.57, 2.45, 2.36, 2.31, 2.26, 2.23, 2.20, 2.18, 2.16, 2.14, 2.13)
_T95_30 = 2.04


def _t95(df: int) -> float:
    if df <= len(_T95):
        return _T95[df - 1]
    return _T95_30 if df <= 30 else 1.96


@dataclasses.dataclass(frozen=True)
class Interval:
    """The geometric mean of a speed-up ratio over cases, with its 95% confidence interval."""

    mean: float
    low: float
    high: float
    cases: int
    rounds: int

    def verdict(self, threshold: float) -> str:
        """MET when the whole interval is at or above `threshold`, MISSED when it is below,
        else TOO NOISY."""
        if self.low >= threshold:
            return "MET"
        if self.high < threshold:
            return "MISSED"
        return "TOO NOISY"

    def text(self) -> str:
        return (
            f"{self.mean:.2f}x (95% CI {self.low:.2f}-{self.high:.2f}; {self.cases} case(s), "
            f"{self.rounds} paired rounds)"
        )


def ratio_interval(pairs: list[tuple[dict, dict]]) -> Interval | None:
    """`other / impl` time ratios over `pairs` of rows, as a geometric mean with a 95%
    confidence interval, from the samples of each round (`samples_ms`, taken in ABBA rounds, so
    sample `i` of both ran side by side): per case the mean and variance of the per-round log
    ratios; the geometric mean is the mean over cases, its standard error from the cases'
    variances, the t quantile with the pooled degrees of freedom. `None` without at least two
    rounds in every case."""
    means, variances, rounds = [], [], 0
    for r, o in pairs:
        logs = [
            math.log(b / a)
            for a, b in zip(r.get("samples_ms") or (), o.get("samples_ms") or (), strict=False)
        ]
        if len(logs) < 2:
            return None
        means.append(statistics.fmean(logs))
        variances.append(statistics.variance(logs) / len(logs))
        rounds += len(logs)
    if not means:
        return None
    k = len(means)
    centre = statistics.fmean(means)
    half = _t95(rounds - k) * math.sqrt(sum(variances)) / k
    return Interval(math.exp(centre), math.exp(centre - half), math.exp(centre + half), k, rounds)


def _ratio_target(pairs: list[tuple[dict, dict]], threshold: float) -> tuple[str, str]:
    """The verdict on the geometric mean of `other.ms / impl.ms` over `pairs`, judged by its
    confidence interval (see [`ratio_interval`][]), the worst case named."""
    if not pairs:
        return "NOT MEASURED", "no matching rows"
    interval = ratio_interval(pairs)
    ratios = [o["ms"] / r["ms"] for r, o in pairs]
    worst = min(range(len(pairs)), key=lambda i: ratios[i])
    worst_text = f"worst {ratios[worst]:.2f}x at {_at(pairs[worst][0])}"
    if interval is None:
        mean = math.exp(statistics.fmean(math.log(x) for x in ratios))
        return "TOO NOISY", f"{mean:.2f}x, fewer than 2 paired rounds for an interval; {worst_text}"
    return interval.verdict(threshold), f"{interval.text()}; {worst_text}"


def _beside(rows: list[dict], impl: str, other: str, **match) -> str:
    """`; <other> is N.NNx faster/slower` (geometric mean of the medians) when measured."""
    pairs = _paired(rows, impl, other, **match)
    if not pairs:
        return ""
    mean = math.exp(statistics.fmean(math.log(r["ms"] / o["ms"]) for r, o in pairs))
    return f"; {other} {mean:.2f}x faster" if mean >= 1 else f"; {other} {1 / mean:.2f}x slower"


def _big_rows(r: dict) -> bool:
    return r["rows"] >= 4096


def evaluate_targets(rows: list[dict], platform: str, auto: str) -> list[Result]:
    """Every target of issues 5, 6 and 16, and issue 17's against the peers
    ([`peer_targets`][]), with its verdict on `rows` (issue 17's static targets come from
    the deviceless tables: [`static_targets`][]).

    `platform` is JAX's backend (`"cpu"`, `"gpu"`, `"tpu"`); `auto` the implementation
    `impl="auto"` resolves to there. The GPU targets are judged on bfloat16 rows with at least
    4096 rows, worst case over the shapes; the CPU speed targets on the `module` rows (the
    layers under `jax.vmap`, as users call them) and the training-step blocks, by the
    confidence interval of the geometric mean over the measured shapes and dtypes (see
    [`ratio_interval`][]); residuals on the worst case.
    """
    results: list[Result] = []

    def add(target_platform: str, text: str, verdict: tuple[str, str]) -> None:
        if target_platform != platform:
            verdict = ("NOT MEASURED", f"needs a {target_platform.upper()} (this run: {platform})")
        results.append(Result(target_platform, text, *verdict))

    def pct(r):
        return r["pct_copy"]

    bf16 = dict(impl=auto, dtype="bfloat16")

    def gpu_rows(op: str, directions, lo: int, hi: int) -> list[dict]:
        rows_ = _where(rows, op=op, direction=directions, **bf16)
        return [r for r in rows_ if _big_rows(r) and lo <= r["width"] <= hi and r["pct_copy"]]

    for op in ("layer_norm", "rms_norm"):
        add(
            "gpu",
            f"{op} fwd >= 90% of copy (bf16, widths 1024-16384)",
            _worst(gpu_rows(op, "fwd", 1024, 16384), pct, 90, "%", True),
        )
        add(
            "gpu",
            f"{op} fwd+bwd >= 80% of copy (bf16, widths 1024-16384)",
            _worst(gpu_rows(op, "fwd+bwd", 1024, 16384), pct, 80, "%", True),
        )
        pairs = [
            (r, o)
            for r, o in _paired(
                rows, auto, "reference", op=op, dtype="bfloat16", direction="fwd+bwd"
            )
            if _big_rows(r) and 1024 <= r["width"] <= 16384
        ]
        add(
            "gpu",
            f"{op} fwd+bwd >= 1.5x the XLA reference (bf16, widths 1024-16384)",
            _worst(
                [dict(r, ratio=o["ms"] / r["ms"]) for r, o in pairs],
                lambda r: r["ratio"],
                1.5,
                "x",
                True,
            ),
        )
        pairs = [
            (r, o)
            for r, o in _paired(rows, auto, "liger", op=op, dtype="bfloat16")
            if _big_rows(r) and 1024 <= r["width"] <= 16384
        ]
        add(
            "gpu",
            f"{op} no slower than Liger-Kernel (bf16, widths 1024-16384, every direction)",
            _worst(
                [dict(r, ratio=o["ms"] / r["ms"]) for r, o in pairs],
                lambda r: r["ratio"],
                1.0,
                "x",
                True,
            ),
        )
        add(
            "gpu",
            f"{op} >= 75% of copy at widths 16385-262144 (bf16, fwd and fwd+bwd)",
            _worst(gpu_rows(op, ("fwd", "fwd+bwd"), 16385, 262144), pct, 75, "%", True),
        )
    for op in ("group_norm", "instance_norm"):
        candidates = [
            r
            for r in _where(rows, op=op, direction="fwd+bwd", **bf16)
            if r["pct_copy"] and _nchw_target_shape(r["shape"])
        ]
        add(
            "gpu",
            f"{op} fwd+bwd >= 75% of copy (bf16 NCHW, C 64-512, 28x28-64x64)",
            _worst(candidates, pct, 75, "%", True),
        )
    candidates = [
        r for r in _where(rows, op="batch_norm", direction="fwd+bwd", **bf16) if r["pct_copy"]
    ]
    add(
        "gpu",
        "batch_norm training step (fwd+bwd) >= 70% of copy (bf16)",
        _worst(candidates, pct, 70, "%", True),
    )
    for op in ("add_layer_norm", "add_rms_norm", "adaptive_layer_norm"):
        for unfused in ("xla-unfused", "pallas-unfused"):
            pairs = [
                (r, o)
                for r, o in _paired(
                    rows, auto, unfused, op=op, dtype="bfloat16", direction=("fwd", "fwd+bwd")
                )
                if _big_rows(r)
            ]
            add(
                "gpu",
                f"{op} >= 1.3x the unfused sequence ({unfused}; bf16, fwd and fwd+bwd)",
                _worst(
                    [dict(r, ratio=o["ms"] / r["ms"]) for r, o in pairs],
                    lambda r: r["ratio"],
                    1.3,
                    "x",
                    True,
                ),
            )
        candidates = [
            r
            for r in _where(rows, op=op, direction=("fwd", "fwd+bwd"), **bf16)
            if _big_rows(r) and r["pct_copy"]
        ]
        add(
            "gpu",
            f"{op} >= 80% of copy (bf16, fwd and fwd+bwd)",
            _worst(candidates, pct, 80, "%", True),
        )

    for r in peer_targets(rows, auto):
        add(r.platform, r.target, (r.status, r.measured))

    # The targets of issues 5, 6 and 16, set for the ops Equinox has too.
    ops_measured = list(
        dict.fromkeys(
            r["op"] for r in rows if r["direction"] != "step" and r["op"] not in EQXNORM_ONLY
        )
    )
    for op in ops_measured:
        # An FP8 output has no module row to judge (it is a functional option).
        for direction, threshold in (
            () if OPS[op].out_itemsize else (("fwd", 1.0), ("fwd+bwd", 1.2))
        ):
            status, text = _ratio_target(
                _paired(rows, "module", "eqx", op=op, direction=direction), threshold
            )
            text += _beside(rows, "module", "torch", op=op, direction=direction)
            add(
                "cpu",
                f"{op} {direction} >= {threshold}x eqx.nn (module under vmap, impl='auto')",
                (status, text),
            )
        residuals = [r for r in _where(rows, op=op, impl=auto) if r["residual_ratio"] is not None]
        add(
            "cpu",
            f"{op} residuals kept for the backward <= 1.05x the input (impl='auto')",
            _worst(residuals, lambda r: r["residual_ratio"], 1.05, "x", False),
        )
    for block in dict.fromkeys(r["op"] for r in rows if r["direction"] == "step"):
        status, text = _ratio_target(_paired(rows, "eqxnorm", "eqx", op=block), 1.1)
        text += _beside(rows, "eqxnorm", "flax", op=block)
        add("cpu", f"{block} training step >= 1.1x eqx.nn", (status, text))
    # This platform's targets first.
    return sorted(results, key=lambda r: r.platform != platform)


# --- issue 17: the peers, and the deviceless table ------------------------------------------

# Issue 17's peers, by contender name, as the summary names them.
PEERS = {
    "reference": "XLA",
    "eqx": "eqx.nn",
    "flax": "Flax",
    "torch": "PyTorch eager",
    "torch.compile": "torch.compile",
    "liger": "Liger-Kernel",
    "tokamax": "tokamax",
}
PEER_OPS = ("layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm", "group_norm", "batch_norm")


def peer_targets(rows: list[dict], auto: str) -> list[Result]:
    """Issue 17: each op's training step (fwd+bwd, bf16, at least 4096 rows or any channel
    shape) with `impl=auto` no slower than each peer that measured it: the geometric mean of
    `peer ms / eqxnorm ms` >= 1, judged by its confidence interval. A peer that measured none
    of an op's cases gives no line (the "Not run" list says why)."""
    out = []
    for op in PEER_OPS:
        for peer, name in PEERS.items():
            pairs = [
                (r, o)
                for r, o in _paired(rows, auto, peer, op=op, dtype="bfloat16", direction="fwd+bwd")
                if op in ("group_norm", "batch_norm") or _big_rows(r)
            ]
            if pairs:
                verdict = _ratio_target(pairs, 1.0)
                out.append(
                    Result("gpu", f"{op} training step no slower than {name} (bf16)", *verdict)
                )
    return out


def static_targets(table: list[dict]) -> list[Result]:
    """Issue 17's static targets judged on the H200 cases of deviceless tables (the rows of
    `python -m benchmarks.deviceless`'s `results.json`, Triton's or Mosaic GPU's) by the
    deviceless check's own verdicts (`benchmarks.deviceless.verdicts`: bytes over the ideal,
    XLA launches beside the kernels, and per kernel spills, one read of each byte, occupancy
    or Mosaic GPU's bytes in flight): one line per target (a kernel's name left out), MET
    when every case meets it, else MISSED with the cases that do not."""
    from .deviceless import verdicts

    grouped: dict[str, list[tuple[str, Any]]] = {}
    for d in table:
        if "program" not in d:  # a TPU case: compiled or not, no target of issue 17
            continue
        c = d["case"]
        case = f"{c['op']} {c['shape']} {c['dtype']} {c['direction']}"
        for v in verdicts(d):
            kernel, _, target = v.target.rpartition(": ")
            grouped.setdefault(target, []).append((f"{case} {kernel}".strip(), v))
    out = []
    for target, items in grouped.items():
        misses = [f"{where}: {v.value}" for where, v in items if not v.met]
        if misses:
            shown = "; ".join(misses[:3]) + ("; ..." if len(misses) > 3 else "")
            out.append(
                Result(
                    "deviceless", target, "MISSED", f"{len(misses)} of {len(items)} miss: {shown}"
                )
            )
        else:
            out.append(Result("deviceless", target, "MET", f"all {len(items)} met"))
    return out


def load_deviceless(paths: Iterable[Path]) -> list[dict]:
    """The rows of the deviceless tables at `paths` (their folders or `results.json` files);
    a missing table contributes none."""
    rows = []
    for path in paths:
        path = Path(path)
        path = path / "results.json" if path.is_dir() else path
        if path.exists():
            rows += json.loads(path.read_text())
    return rows


def _nchw_target_shape(shape: str) -> bool:
    sizes = [int(s) for s in shape.split("x")]
    if len(sizes) != 4:
        return False
    spatial = sizes[2] * sizes[3]
    return 64 <= sizes[1] <= 512 and 28 * 28 <= spatial <= 64 * 64


def targets_text(results: list[Result]) -> str:
    width = max(len(r.target) for r in results)
    lines = ["Targets (issues 5, 6, 16 and 17), judged on this run's measurements:"]
    for r in results:
        lines.append(f"  {r.status:<12} {r.target:<{width}}  {r.measured}")
    return "\n".join(lines)


# --- summary.md --------------------------------------------------------------------------------


def speedup_table(rows: list[dict]) -> list[str]:
    """Markdown: the geometric-mean speed-up over the XLA reference per op, direction and
    contender (over the measured shapes and dtypes)."""
    impls = list(dict.fromkeys(r["impl"] for r in rows if r["status"] == "ok"))
    groups: dict[tuple[str, str], dict[str, list[float]]] = {}
    for r in rows:
        if r["status"] == "ok" and r["speedup"]:
            cell = groups.setdefault((r["op"], r["direction"]), {})
            cell.setdefault(r["impl"], []).append(r["speedup"])
    if not groups:
        return []
    lines = [
        "| op | direction | " + " | ".join(impls) + " |",
        "|---|---|" + "---:|" * len(impls),
    ]
    for (op, direction), cell in groups.items():
        values = [
            f"{math.exp(statistics.fmean(math.log(v) for v in cell[i])):.2f}" if i in cell else ""
            for i in impls
        ]
        lines.append(f"| {op} | {direction} | " + " | ".join(values) + " |")
    return lines


def summary_markdown(document: dict, results: list[Result], plots: list[Path]) -> str:
    env = document["environment"]
    rows = document["rows"]
    machine = env["device"]
    if env["backend"] == "cpu":
        machine = f"{env['cpu']}, {env['cpu_cores']} cores"
    lines = [
        f"# eqxnorm benchmark: {env['device']}",
        "",
        f"`{document['command']}` on {env['date']} ({machine}; jax {env['jax']}, equinox "
        f"{env['equinox']}, flax {env['flax']}, torch {env['torch']}).",
        "",
        f"Medians of {document['settings']['repeats']} samples (warm-up: "
        f"{document['settings']['warmup']}). GB/s counts the bytes each direction must move (see "
        "benchmarks/README.md); %copy is against a device copy of the same bytes.",
        "",
    ]
    if document["settings"].get("interrupted"):
        lines += [f"**Incomplete run** ({document['settings']['interrupted']}).", ""]
    lines += [
        "## Targets",
        "",
        "| status | target | measured |",
        "|---|---|---|",
    ]
    lines += [f"| {r.status} | {r.target} | {r.measured} |" for r in results]
    table_lines = speedup_table(rows)
    if table_lines:
        lines += [
            "",
            "## Speed-up over the XLA reference",
            "",
            "Geometric mean of `reference ms / contender ms` over the measured shapes and "
            "dtypes (above 1: faster than the reference).",
            "",
            *table_lines,
        ]
    steps = [r for r in rows if r["status"] == "ok" and r["direction"] == "step"]
    if steps:
        lines += [
            "",
            "## Training steps",
            "",
            "One jitted step (forward, loss, gradients, SGD update) of each block, median ms.",
            "",
            "| block | shape | library | ms | note |",
            "|---|---|---|---:|---|",
        ]
        lines += [
            f"| {r['op']} | {r['shape']} | {r['impl']} | {r['ms']:.2f} | {r['note']} |"
            for r in steps
        ]
    skipped = not_run(rows)
    if skipped:
        lines += ["", "## Not run", ""] + [f"- {s.strip()}" for s in skipped[2:]]
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots]
    return "\n".join(lines) + "\n"
