"""Helpers shared by every benchmark behind ``hf-flash bench``: environment record, timing, FLOP counts,
result files, printed tables, plots and progress bars.

Contract for a benchmark module ``hf_flash.bench.<name>``::

    def run(quick: bool, out_dir: str) -> dict

It calls :func:`require_cuda` first (the CLI turns :class:`BenchUnavailable` into one line and exit code 2),
times with :func:`time_ms` (median, CUDA-synchronised), writes ``<name>.json`` (``<name>_quick.json`` with
``quick``, so a quick run never overwrites committed results) through :func:`write_json` with
:func:`env_info` inside, plots with :func:`plot_panels`, and returns a dict with at least::

    {"env": env_info(), "table": {"title": str, "columns": [...], "rows": [[...], ...]},
     "summary": [[label, value], ...],      # a few headline lines for the final table of gpu_run.sh
     "files": [paths written]}

Timings are medians over repetitions (``triton.testing.do_bench`` with ``return_mode="median"``, which also
flushes the L2 cache between repetitions; CUDA events as a fallback). A case that raises (unsupported backend,
out of memory) is recorded as ``None`` with its error message, never dropped silently.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import statistics
from typing import Callable, Iterable, Sequence

import torch

__all__ = [
    "BenchUnavailable",
    "require_cuda",
    "env_info",
    "time_ms",
    "try_time",
    "attention_flops",
    "tflops",
    "ratio",
    "result_path",
    "write_json",
    "format_table",
    "plot_panels",
    "progress",
    "short_error",
]


class BenchUnavailable(RuntimeError):
    """The benchmark cannot run here (no GPU, a missing optional package). The CLI prints it as one line."""


def require_cuda(what: str) -> torch.device:
    if not torch.cuda.is_available():
        raise BenchUnavailable(f"{what} needs a CUDA GPU and torch.cuda.is_available() is False here "
                               f"(torch {torch.__version__}); the kernels only run on the CPU through Triton's "
                               "interpreter, which is far too slow to benchmark")
    return torch.device("cuda", torch.cuda.current_device())


def _version(mod_name: str) -> str | None:
    try:
        mod = __import__(mod_name)
    except Exception:  # noqa: BLE001 - a missing or broken package is recorded, not fatal
        return None
    return getattr(mod, "__version__", "unknown")


def env_info() -> dict:
    """Device, library versions and date: the record every results file carries."""
    info = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "hf_flash": _version("hf_flash"),
        "cuda": torch.version.cuda,
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        info["device"] = torch.cuda.get_device_name()
        info["device_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["sm_count"] = props.multi_processor_count
        info["capability"] = f"{props.major}.{props.minor}"
        info["cudnn"] = torch.backends.cudnn.version()
    else:
        info["device"] = "CPU"
    return info


def _time_with_events(fn: Callable[[], object], warmup: int = 5, rep: int = 20) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(rep):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def time_ms(fn: Callable[[], object], warmup_ms: int = 25, rep_ms: int = 100,
            grad_to_none: Sequence[torch.Tensor] | None = None) -> float:
    """Median wall time of ``fn()`` on the GPU in milliseconds.

    ``grad_to_none``: tensors whose ``.grad`` is reset between repetitions, so that backward timings do not
    include gradient accumulation.
    """
    try:
        from triton.testing import do_bench
    except ImportError:
        do_bench = None
    if do_bench is not None:
        return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grad_to_none,
                              return_mode="median"))

    def fn_reset():
        if grad_to_none:
            for t in grad_to_none:
                t.grad = None
        return fn()

    return _time_with_events(fn_reset)


def short_error(exc: BaseException) -> str:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {first}"[:300]


def try_time(fn: Callable[[], object], **kwargs) -> tuple[float | None, str | None]:
    """(milliseconds, None), or (None, error message) when ``fn`` raises, e.g. an SDPA backend that refuses
    the case or an out-of-memory error (the cache is emptied so the next case starts clean)."""
    try:
        return time_ms(fn, **kwargs), None
    except Exception as exc:  # noqa: BLE001 - the failure is the measurement
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
        return None, short_error(exc)


def attention_flops(batch: int, nheads: int, seqlen_q: int, seqlen_k: int, headdim: int, causal: bool = False,
                    mode: str = "fwd", window: int | None = None) -> float:
    """Matmul FLOPs of attention as FlashAttention-2's paper counts them.

    Forward: two matmuls, ``4 * b * h * s_q * s_k * d``; backward is 2.5x the forward (five matmuls of which
    one recomputes S), so forward+backward is 3.5x. ``causal`` halves the count (square case); ``window``
    (left window, causal) counts the keys a row actually sees.
    """
    if window is not None and window >= 0:
        # causal band, square case: row i sees min(i, window) + 1 keys
        w = min(window, seqlen_q - 1)
        pairs = w * (w + 1) // 2 + (seqlen_q - w) * (w + 1)
        fwd = 4.0 * batch * nheads * pairs * headdim
    else:
        fwd = 4.0 * batch * nheads * seqlen_q * seqlen_k * headdim
        if causal:
            fwd /= 2
    factor = {"fwd": 1.0, "bwd": 2.5, "fwd_bwd": 3.5}[mode]
    return fwd * factor


def tflops(flops: float, ms: float | None) -> float | None:
    if ms is None or ms <= 0:
        return None
    return flops / (ms * 1e-3) / 1e12


def ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or den == 0:
        return None
    return num / den


def result_path(out_dir: str, name: str, quick: bool, ext: str) -> str:
    """``<out_dir>/<name>.<ext>``, or ``<name>_quick.<ext>`` for quick runs."""
    os.makedirs(out_dir, exist_ok=True)
    return os.path.join(out_dir, f"{name}{'_quick' if quick else ''}.{ext}")


def _jsonable(x):
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return None
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, torch.dtype):
        return str(x).replace("torch.", "")
    return x


def write_json(obj: dict, path: str) -> str:
    """Write ``obj`` (with an ``env`` record added if missing) as indented JSON; NaN/inf become null."""
    obj = dict(obj)
    obj.setdefault("env", env_info())
    with open(path, "w") as f:
        json.dump(_jsonable(obj), f, indent=1)
        f.write("\n")
    return path


def _cell(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        if x == 0:
            return "0"
        if abs(x) >= 100:
            return f"{x:.0f}"
        if abs(x) >= 10:
            return f"{x:.1f}"
        if abs(x) >= 0.01:
            return f"{x:.2f}"
        return f"{x:.1e}"
    return str(x)


def format_table(table: dict) -> str:
    """Fixed-width text of ``{"title", "columns", "rows"}``; None prints as '-'."""
    cols = [str(c) for c in table["columns"]]
    rows = [[_cell(v) for v in r] for r in table["rows"]]
    widths = [max([len(c)] + [len(r[i]) for r in rows]) for i, c in enumerate(cols)]
    lines = []
    if table.get("title"):
        lines.append(table["title"])
    lines.append("  ".join(c.rjust(w) for c, w in zip(cols, widths)))
    lines.append("  ".join("-" * w for w in widths))
    for r in rows:
        lines.append("  ".join(v.rjust(w) for v, w in zip(r, widths)))
    return "\n".join(lines)


def plot_panels(path: str, panels: list[dict], suptitle: str = "", ncols: int = 4) -> str | None:
    """Line plots, one panel per dict ``{"title", "x", "series": {label: ys}, "xlabel", "ylabel",
    "xlog": bool, "kind": "line"|"bar"}``; None values are left out. Uses matplotlib's Agg backend (no
    display needed). Returns the path, or None when matplotlib is missing (the JSON still has the data)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    n = len(panels)
    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.4 * nrows), squeeze=False)
    for ax, panel in zip(axes.flat, panels):
        x = panel["x"]
        if panel.get("kind") == "bar":
            labels = list(panel["series"])
            width = 0.8 / max(1, len(labels))
            for k, label in enumerate(labels):
                ys = [y if y is not None else 0.0 for y in panel["series"][label]]
                ax.bar([i + k * width for i in range(len(x))], ys, width=width, label=label)
            ax.set_xticks([i + (len(labels) - 1) * width / 2 for i in range(len(x))])
            ax.set_xticklabels([str(v) for v in x], rotation=20, fontsize=7)
            if panel.get("hline") is not None:
                ax.axhline(panel["hline"], color="grey", lw=0.8, ls="--")
        else:
            for label, ys in panel["series"].items():
                pts = [(a, b) for a, b in zip(x, ys) if b is not None]
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=label)
            if panel.get("xlog"):
                ax.set_xscale("log", base=2)
                ax.set_xticks(x)
                ax.set_xticklabels([f"{v // 1024}k" if v >= 1024 else str(v) for v in x], fontsize=7)
        ax.set_title(panel.get("title", ""), fontsize=9)
        ax.set_xlabel(panel.get("xlabel", ""), fontsize=8)
        ax.set_ylabel(panel.get("ylabel", ""), fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def progress(items: Iterable, desc: str, total: int | None = None):
    """A tqdm progress bar over ``items`` (on stderr), or the items unchanged when tqdm is missing."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return items
    return tqdm(items, desc=desc, total=total, leave=False, dynamic_ncols=True)
