"""The figures of a scaling fit, as PNG files: loss against compute with the compute-optimal frontier, the
IsoFLOP profiles of Approach 2, the fit against what was observed, and each run's validation loss curve.

Figures are built as matplotlib Figure objects and rendered by the Agg backend when saved, without pyplot:
no global backend switch, no display needed, and nothing left open between calls."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.cm import ScalarMappable
from matplotlib.colors import ListedColormap, LogNorm
from matplotlib.figure import Figure

from gpt.config import ConfigError
from gpt.plot import column, read_log, tokens_at
from gpt.scaling.fit import compute_optimal, predict

DPI = 120
MAX_LEGEND_ENTRIES = 8  # beyond this a colour bar says which colour is which
PALETTE = ListedColormap(colormaps["plasma"](np.linspace(0, 0.85, 256)))  # without plasma's palest yellow


def plot_fit(results: dict, fit_result: dict, out_dir: str | Path) -> list[Path]:
    """loss_vs_compute.png, isoflop.png (when Approach 2 ran) and fit_vs_observed.png in out_dir."""
    out_dir = Path(out_dir)
    written = [_loss_vs_compute(results, fit_result, out_dir / "loss_vs_compute.png")]
    if "skipped" not in fit_result["approach2"]:
        written.append(_isoflop(results, fit_result, out_dir / "isoflop.png"))
    written.append(_fit_vs_observed(results, fit_result, out_dir / "fit_vs_observed.png"))
    return written


def _save(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    return path


def _log_norm(values) -> LogNorm:
    low, high = float(np.min(values)), float(np.max(values))
    return LogNorm(low, high if high > low else low * 1.0001)  # a single value still gets a colour


def _dropped(fit_result: dict) -> np.ndarray:
    return np.array([p["index"] for p in fit_result["dropped"]], dtype=int)


def _loss_vs_compute(results: dict, fit_result: dict, path: Path) -> Path:
    N, D, loss = (np.asarray(results[k], float) for k in ("N", "D", "loss"))
    flops = np.asarray(results.get("flops", 6 * N * D), float)
    kept, dropped = np.array(fit_result["kept"], dtype=int), _dropped(fit_result)
    fig = Figure(figsize=(7, 4.8))
    ax = fig.add_subplot()
    dots = ax.scatter(flops[kept], loss[kept], c=N[kept], norm=_log_norm(N[kept]), cmap=PALETTE, s=22, label="runs")
    fig.colorbar(dots, ax=ax, label="N (parameters)")
    if dropped.size:
        ax.scatter(flops[dropped], loss[dropped], marker="x", color="red", s=40, label="left out")
    if fit_result["law"] == "L(N, D)":  # the frontier exists only where both N and D are free
        budgets = np.geomspace(flops.min(), flops.max(), 200)
        ax.plot(budgets, compute_optimal(fit_result, budgets)["loss"], color="black",
                label="compute-optimal frontier, L(N, D) at C = 6ND")
    else:  # one variable: the fitted curve through the points in order of compute
        order = kept[np.argsort(flops[kept])]
        ax.plot(flops[order], predict(fit_result, N[order], D[order]), color="black",
                label=f"fit {fit_result['law']}")
    ax.set(xscale="log", xlabel="compute (FLOPs)", ylabel="validation loss", title="Loss against compute")
    ax.legend(fontsize="small")
    return _save(fig, path)


def _isoflop(results: dict, fit_result: dict, path: Path) -> Path:
    """Left: loss against N per budget, each parabola and its minimum. Right: the minima N*(C), the power
    law through them (Approach 2) and Approach 3's N_opt(C) for comparison."""
    N, loss = np.asarray(results["N"], float), np.asarray(results["loss"], float)
    two = fit_result["approach2"]
    minima = two["minima"]
    budgets = np.array([m["C"] for m in minima])
    norm = _log_norm(budgets)
    fig = Figure(figsize=(11, 4.5))
    ax, right = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for m in minima:
        idx, colour = np.array(m["points"]), PALETTE(norm(m["C"]))
        ax.scatter(N[idx], loss[idx], color=colour, s=18, label=f"C = {m['C']:.2g}")
        x = np.linspace(min(np.log(N[idx]).min(), math.log(m["N_opt"])),
                        max(np.log(N[idx]).max(), math.log(m["N_opt"])), 100)
        ax.plot(np.exp(x), np.polyval(m["parabola"], x), color=colour, lw=1)
        ax.scatter([m["N_opt"]], [m["loss"]], color=colour, marker="*", s=120, edgecolor="black", zorder=3)
    ax.set(xscale="log", xlabel="N (parameters)", ylabel="validation loss", title="IsoFLOP profiles (★ minimum)")
    if len(minima) <= MAX_LEGEND_ENTRIES:
        ax.legend(fontsize="small")
    else:
        fig.colorbar(ScalarMappable(norm, PALETTE), ax=ax, label="compute budget C (FLOPs)")

    right.scatter(budgets, [m["N_opt"] for m in minima], color="black", zorder=3, label="N*(C), parabola minima")
    line = np.geomspace(budgets.min(), budgets.max(), 100)
    slope, intercept = np.polyfit(np.log(budgets), np.log([m["N_opt"] for m in minima]), 1)
    right.plot(line, np.exp(intercept) * line ** slope, color="black", label=f"Approach 2: N* ∝ C^{two['a']:.3f}")
    if fit_result["law"] == "L(N, D)":
        right.plot(line, compute_optimal(fit_result, line)["N_opt"], color="tab:blue", ls="--",
                   label=f"Approach 3: N_opt ∝ C^{fit_result['a']:.3f}")
    right.set(xscale="log", yscale="log", xlabel="compute budget C (FLOPs)", ylabel="compute-optimal N",
              title="Compute-optimal model size")
    right.legend(fontsize="small")
    return _save(fig, path)


def _fit_vs_observed(results: dict, fit_result: dict, path: Path) -> Path:
    N, D, loss = (np.asarray(results[k], float) for k in ("N", "D", "loss"))
    kept, dropped = np.array(fit_result["kept"], dtype=int), _dropped(fit_result)
    predicted = predict(fit_result, N, D)
    fig = Figure(figsize=(5.5, 5))
    ax = fig.add_subplot()
    ax.scatter(loss[kept], predicted[kept], s=18, label="fitted points")
    if dropped.size:
        ax.scatter(loss[dropped], predicted[dropped], marker="x", color="red", s=40, label="left out")
    ends = [min(loss.min(), predicted.min()), max(loss.max(), predicted.max())]
    ax.plot(ends, ends, color="gray", lw=1, label="y = x")
    scale = "log" if ends[1] > 10 * ends[0] else "linear"
    ax.set(xscale=scale, yscale=scale, xlabel="observed loss", ylabel=f"predicted by {fit_result['law']}",
           title="Fit against observation")
    ax.legend(fontsize="small")
    return _save(fig, path)


def _loss_curve(run_dir: Path) -> tuple[np.ndarray, np.ndarray] | None:
    """(tokens, val_loss) of a run's evaluations, from its metrics.jsonl; None when it has none."""
    try:
        log = read_log(str(run_dir))
    except ConfigError:  # no metrics.jsonl, or nothing in it yet
        return None
    steps, val_loss = column(log.evals, "val_loss")
    if not steps.size or not log.tokens_per_step:
        return None
    return tokens_at(steps, log.tokens_per_step), val_loss


def plot_loss_curves(sweep_dir: str | Path, rows: list[dict]) -> Path | None:
    """loss_curves.png in sweep_dir: each point's validation loss against tokens seen, coloured by its size,
    read from <sweep_dir>/<out_dir>/metrics.jsonl; None when no point has a metrics file."""
    sweep_dir = Path(sweep_dir)
    curves = []
    for row in rows:
        curve = _loss_curve(sweep_dir / row["out_dir"]) if row.get("out_dir") else None
        if curve is not None:
            curves.append((row.get("params_non_embedding") or row.get("params_total") or row.get("params"), curve))
    if not curves:
        return None
    sizes = [size for size, _ in curves if size]
    norm = _log_norm(sizes) if sizes else None
    fig = Figure(figsize=(7, 4.8))
    ax = fig.add_subplot()
    for size, (tokens, val_loss) in curves:
        seen = tokens > 0  # step 0 has no place on a log axis
        ax.plot(tokens[seen], val_loss[seen], lw=1, alpha=0.8, color=PALETTE(norm(size)) if size else "gray")
    if norm is not None:
        fig.colorbar(ScalarMappable(norm, PALETTE), ax=ax, label="N (parameters)")
    ax.set(xscale="log", xlabel="tokens seen", ylabel="validation loss", title=f"Loss curves of {len(curves)} runs")
    return _save(fig, sweep_dir / "loss_curves.png")
