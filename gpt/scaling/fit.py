"""Power laws fitted to a sweep's final losses, with bootstrap confidence intervals: how loss falls with
parameters N and tokens D, and how a compute budget C = 6·N·D is best split between them.

- Approach 3 of Hoffmann et al. 2022 ("Chinchilla"), as replicated by Besiroglu et al. 2024: the parametric
  law L(N, D) = E + A/N^alpha + B/D^beta, fitted by minimising the Huber loss (delta 1e-3) of the
  log-residuals with L-BFGS-B from a grid of starts. Its compute-optimal allocation is N_opt ∝ C^a and
  D_opt ∝ C^b with a = beta/(alpha+beta), b = alpha/(alpha+beta).
- Approach 2 (IsoFLOP profiles): per compute budget, a parabola of loss against log N whose minimum is the
  best size N*(C) at that budget; a least-squares line of log N* on log C gives the exponent directly.
- L(X) = E + A/X^alpha when the data vary only one of N and D.

Intervals are bootstrap percentiles over points resampled with replacement: the spread a different draw of
the same experiment would give, which a point estimate alone hides (Besiroglu et al. found Hoffmann's
published intervals far too narrow for 400 points). Pure numpy and scipy, so a fit needs no accelerator.
`python -m gpt.scaling fit RESULTS` is gpt/scaling/report.py's main().
"""

from __future__ import annotations

import csv
import itertools
import math
from pathlib import Path

import numpy as np
from scipy.optimize import minimize
from threadpoolctl import threadpool_limits

from gpt.config import ConfigError
from gpt.files import json_lines

HUBER_DELTA = 1e-3  # Hoffmann et al.: in log-loss units, so the fit is close to least absolute deviations
MIN_POINTS = 5  # a law of five parameters needs at least as many points
# Hoffmann et al.'s grid of starts: exponents 0..2 step 0.5, log E -1..1.5 step 0.5, log A, log B 0..25 step 5.
GRID_EXPONENTS = np.arange(0.0, 2.01, 0.5)
GRID_LOG_E = np.arange(-1.0, 1.51, 0.5)
GRID_LOG_COEF = np.arange(0.0, 25.1, 5.0)
# Besiroglu et al. run L-BFGS-B from every one of the 5,400 starts (about 30 s for 300 points here). Most lie
# far off (log A = 25 with alpha = 0.5 predicts losses of e^18) and end no better than the good ones, so the
# grid is scored in one vectorised pass and only its best starts are optimised: the same optimum in ~0.5 s.
BEST_STARTS = 64
LBFGS_OPTIONS = {"maxiter": 10_000, "ftol": 1e-15, "gtol": 1e-10}  # the Huber sum is flat near the optimum
PARAMS_CHOICES = ("non_embedding", "total")
COEFFICIENT = {"N": "A", "D": "B"}  # the names each variable's term has in L(N, D)
EXPONENT = {"N": "alpha", "D": "beta"}
TRUE_WORDS, FALSE_WORDS = ("true", "1", "yes"), ("false", "0", "no", "")


# ---------------------------------------------------------------------------------------------- loading


def load_results(path: str | Path, params: str = "non_embedding") -> dict:
    """The points of a sweep directory (its summary.jsonl) or of a CSV / JSONL file, validated.

    Returns {"source", "out_dir" (where fit outputs go), "sweep_dir" (or None), "params" (which N),
    "name", "N", "D", "flops", "loss", "compute_budget" (NaN where none), "repeats_data", "epochs" (NaN where
    unknown), "rows" (the rows as read)}. A file's D is its `tokens`, or flops / (6 N) when it has only
    `flops` (the convention of published data); its flops are 6 N D when it has only `tokens`."""
    if params not in PARAMS_CHOICES:
        raise ConfigError(f"unknown params choice {params!r}: use one of {', '.join(PARAMS_CHOICES)}")
    path = Path(path)
    if path.is_dir():
        summary = path / "summary.jsonl"
        if not summary.is_file():
            raise ConfigError(f"{path} holds no summary.jsonl: collect the sweep first (python -m gpt.scaling collect)")
        rows = _read_jsonl(summary)
        columns = {"N": f"params_{params}", "D": "tokens", "flops": "flops", "loss": "val_loss"}
        results = _points(rows, summary.name, columns, required=tuple(columns.values()))
        return {**results, "source": str(path), "out_dir": str(path), "sweep_dir": str(path), "params": params}
    if not path.is_file():
        raise ConfigError(f"results not found: {path} (a sweep directory, or a CSV or JSONL file)")
    if params != "non_embedding":
        raise ConfigError(f"--params={params} applies to a sweep directory; {path.name} has one 'params' column")
    rows = _read_csv(path) if path.suffix.lower() == ".csv" else _read_jsonl(path)
    columns = {"N": "params", "D": "tokens", "flops": "flops", "loss": "loss"}
    keys = set().union(*rows) if rows else set()
    missing = [c for c in ("params", "loss") if c not in keys] + ([] if keys & {"tokens", "flops"} else ["tokens"])
    if rows and missing:
        raise ConfigError(f"{path.name} lacks column(s) {', '.join(missing)}: "
                          "it needs params, loss, and tokens or flops")
    required = ("params", "loss", "tokens" if "tokens" in keys else "flops")
    results = _points(rows, path.name, columns, required)
    if "tokens" not in keys:
        results["D"] = results["flops"] / (6 * results["N"])
    if "flops" not in keys:
        results["flops"] = 6 * results["N"] * results["D"]
    return {**results, "source": str(path), "out_dir": str(path.parent), "sweep_dir": None, "params": "params column"}


def _read_jsonl(path: Path) -> list[dict]:
    rows = json_lines(path.read_text(), path.name)
    for number, row in rows:
        if not isinstance(row, dict):
            raise ConfigError(f"{path.name}: line {number} is not a JSON object")
    return [row for _, row in rows]


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        reader.fieldnames = [f.strip() for f in reader.fieldnames or []]
        return [{k: v.strip() for k, v in row.items() if k and v is not None} for row in reader]


def _points(rows: list[dict], source: str, columns: dict, required: tuple[str, ...]) -> dict:
    """Arrays of the rows' values; one line naming the row and column of the first bad one."""
    if len(rows) < MIN_POINTS:
        raise ConfigError(f"{source}: needs at least {MIN_POINTS} points, got {len(rows)}")
    out: dict = {k: [] for k in ("name", "N", "D", "flops", "loss", "compute_budget", "repeats_data", "epochs")}
    for i, row in enumerate(rows, 1):
        name = str(row.get("name") or f"row {i}")
        where = f"{source} row {i}" + (f" ({row['name']})" if row.get("name") else "")
        for column in required:
            if row.get(column) in (None, ""):
                raise ConfigError(f"{where} lacks {column!r} (needs {', '.join(required)})")
        out["name"].append(name)
        for key, column in [*columns.items(), ("compute_budget", "compute_budget"), ("epochs", "epochs")]:
            value = row.get(column)  # the caller derives what an optional column leaves out
            out[key].append(math.nan if value in (None, "") else _positive(value, column, where))
        out["repeats_data"].append(_flag(row.get("repeats_data"), where))
    arrays = {k: np.array(v, dtype=bool if k == "repeats_data" else float) for k, v in out.items() if k != "name"}
    return {"name": out["name"], **arrays, "rows": rows}


def _positive(value, column: str, where: str) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: {column}={value!r} is not a number") from None
    if not (math.isfinite(x) and x > 0):
        raise ConfigError(f"{where}: {column}={value!r} must be positive and finite")
    return x


def _flag(value, where: str) -> bool:
    if isinstance(value, bool) or value is None:
        return bool(value)
    if str(value).strip().lower() in TRUE_WORDS + FALSE_WORDS:
        return str(value).strip().lower() in TRUE_WORDS
    raise ConfigError(f"{where}: repeats_data={value!r} is not true or false")


# ------------------------------------------------------------------------------------- the Huber fit
# A law over K variables X_k is log L = logsumexp(c_1 - p_1 log X_1, ..., c_K - p_K log X_K, e), with
# theta = [c_1..c_K, e, p_1..p_K]: L(N, D) has theta = [log A, log B, log E, alpha, beta]. Written this way
# the prediction is positive for any theta, so L-BFGS-B needs no bounds.


def _log_terms(theta: np.ndarray, log_x: np.ndarray) -> np.ndarray:
    """[..., K+1, n] the terms of the logsumexp, for theta [..., 2K+1] and log_x [K, n]."""
    k = log_x.shape[0]
    variable = theta[..., :k, None] - theta[..., k + 1:, None] * log_x
    constant = np.broadcast_to(theta[..., k, None, None], variable.shape[:-2] + (1, log_x.shape[1]))
    return np.concatenate([variable, constant], axis=-2)


def _huber(residual: np.ndarray) -> np.ndarray:
    """Huber loss divided by delta: the optimum is unchanged, and L-BFGS-B's tolerances see residual-sized values."""
    size = np.abs(residual)
    return np.where(size <= HUBER_DELTA, residual * residual / (2 * HUBER_DELTA), size - HUBER_DELTA / 2)


def _objective(theta: np.ndarray, log_x: np.ndarray, log_loss: np.ndarray, weights: np.ndarray):
    """The weighted Huber sum and its analytic gradient in theta."""
    k = log_x.shape[0]
    terms = _log_terms(theta, log_x)
    top = terms.max(axis=0)
    scaled = np.exp(terms - top)
    total = scaled.sum(axis=0)
    residual = top + np.log(total) - log_loss
    share = scaled / total  # d(log prediction) / d(term)
    slope = weights * np.clip(residual / HUBER_DELTA, -1.0, 1.0)
    gradient = np.concatenate([share @ slope, -(share[:k] * log_x) @ slope])
    return weights @ _huber(residual), gradient


def _grid_objective(thetas: np.ndarray, log_x: np.ndarray, log_loss: np.ndarray) -> np.ndarray:
    """The unweighted Huber sum at each of many thetas [S, 2K+1], in blocks that bound the memory."""
    values = []
    for block in np.array_split(thetas, max(1, len(thetas) * log_x.size // 2_000_000)):
        terms = _log_terms(block, log_x)
        top = terms.max(axis=-2)
        predicted = top + np.log(np.exp(terms - top[..., None, :]).sum(axis=-2))
        values.append(_huber(predicted - log_loss).sum(axis=-1))
    return np.concatenate(values)


def _one_blas_thread():
    """A context that caps BLAS at one thread: L-BFGS-B's small linear algebra gains nothing from threads,
    and their spinning against other work on the machine (a sweep training beside the fit) made fits 5-9x
    slower on 2 cores."""
    return threadpool_limits(1, user_api="blas")


def _minimise(start: np.ndarray, log_x, log_loss, weights) -> tuple[np.ndarray, float]:
    with np.errstate(over="ignore", invalid="ignore"):  # a far step may overflow; L-BFGS-B then backtracks
        found = minimize(_objective, start, args=(log_x, log_loss, weights), jac=True, method="L-BFGS-B",
                         options=LBFGS_OPTIONS)
    return found.x, float(found.fun)


def _fit_theta(log_x: np.ndarray, log_loss: np.ndarray) -> np.ndarray:
    """The best optimum reached from the best BEST_STARTS points of Hoffmann's grid."""
    k = log_x.shape[0]
    axes = [GRID_LOG_COEF] * k + [GRID_LOG_E] + [GRID_EXPONENTS] * k
    grid = np.array(list(itertools.product(*axes)))
    starts = grid[np.argsort(_grid_objective(grid, log_x, log_loss))[:BEST_STARTS]]
    weights = np.ones_like(log_loss)
    return min((_minimise(s, log_x, log_loss, weights) for s in starts), key=lambda found: found[1])[0]


def _bootstrap_thetas(theta: np.ndarray, log_x, log_loss, resamples: int, seed: int) -> np.ndarray:
    """[resamples, 2K+1]: the fit of each resample of the points with replacement (as multiplicity weights),
    started from the full data's optimum, which is near each resample's (the grid search runs once)."""
    n = log_loss.size
    counts = np.random.default_rng(seed).multinomial(n, np.full(n, 1 / n), size=resamples).astype(float)
    return np.array([_minimise(theta, log_x, log_loss, w)[0] for w in counts])


def _estimates(thetas: np.ndarray, variables: tuple[str, ...]) -> dict[str, np.ndarray]:
    """{name: value(s)} of the law's parameters (and, for L(N, D), the compute-optimal exponents a, b)."""
    k = len(variables)
    with np.errstate(over="ignore"):  # a resample that ran off to a huge coefficient: inf, outside any interval
        out = {"E": np.exp(thetas[..., k])}
        out.update({COEFFICIENT[v]: np.exp(thetas[..., i]) for i, v in enumerate(variables)})
    out.update({EXPONENT[v]: thetas[..., k + 1 + i] for i, v in enumerate(variables)})
    if variables == ("N", "D"):
        with np.errstate(divide="ignore", invalid="ignore"):
            out["a"] = out["beta"] / (out["alpha"] + out["beta"])
            out["b"] = out["alpha"] / (out["alpha"] + out["beta"])
    return out


def _interval(samples: np.ndarray, level: float) -> list[float]:
    finite = samples[np.isfinite(samples)]
    if finite.size == 0:
        return [math.nan, math.nan]
    return [float(q) for q in np.quantile(finite, [(1 - level) / 2, (1 + level) / 2])]


def _check_level_resamples(level: float, resamples: int) -> None:
    if not 0 < level < 1:
        raise ConfigError(f"level={level} must lie strictly between 0 and 1 (0.95 is a 95% interval)")
    if int(resamples) != resamples or resamples < 1:
        raise ConfigError(f"resamples={resamples} must be a positive integer")


def _check_compute(compute: float | None) -> None:
    if compute is not None and not (math.isfinite(compute) and compute > 0):
        raise ConfigError(f"compute={compute} must be a positive number of FLOPs")


def _distinct(values: np.ndarray) -> int:
    return len(np.unique(np.round(np.log(values), 9)))  # D = C/(6N) differs from its twins only in rounding


def _fit_law(variables: tuple[str, ...], x: dict, loss, level: float, resamples: int, seed: int) -> dict:
    """Estimates, intervals and the bootstrap thetas of the law over `variables` (keys of x)."""
    log_x = np.log(np.stack([np.asarray(x[v], float) for v in variables]))
    log_loss = np.log(np.asarray(loss, float))
    with _one_blas_thread():
        theta = _fit_theta(log_x, log_loss)
        thetas = _bootstrap_thetas(theta, log_x, log_loss, resamples, seed) if resamples else None
    point = {k: float(v) for k, v in _estimates(theta, variables).items()}
    if not resamples:  # a point estimate only: the "before" fit that outlier removal is compared with
        return {**point, "theta": theta}
    ci = {k: _interval(v, level) for k, v in _estimates(thetas, variables).items()}
    return {**point, "ci": ci, "level": level, "resamples": resamples, "theta": theta, "thetas": thetas}


def fit_joint(N, D, loss, *, level: float = 0.95, resamples: int = 1000, seed: int = 0,
              compute: float | None = None) -> dict:
    """Approach 3: L(N, D) = E + A/N^alpha + B/D^beta with percentile intervals at `level` for E, A, B,
    alpha, beta, a and b, and for a budget `compute` its allocation (see compute_optimal)."""
    N, D, loss = (np.asarray(v, float) for v in (N, D, loss))
    if N.size < MIN_POINTS or _distinct(N) < 2 or _distinct(D) < 2:
        raise ConfigError(f"L(N, D) needs at least {MIN_POINTS} points with at least 2 distinct N and 2 distinct D; "
                          f"got {N.size} points, {_distinct(N)} distinct N, {_distinct(D)} distinct D")
    _check_level_resamples(level, resamples)
    _check_compute(compute)
    law = _fit_law(("N", "D"), {"N": N, "D": D}, loss, level, resamples, seed)
    if compute is not None:
        law["compute_optimal"] = _compute_optimal_with_ci(law, compute, level)
    return _public(law)


def fit_single(x, loss, *, level: float = 0.95, resamples: int = 1000, seed: int = 0) -> dict:
    """L(X) = E + A/X^alpha by the same Huber fit, with percentile intervals for E, A and alpha."""
    x, loss = np.asarray(x, float), np.asarray(loss, float)
    if x.size < MIN_POINTS or _distinct(x) < 3:  # E, A and alpha fit any 2 values exactly
        raise ConfigError(f"L(X) needs at least {MIN_POINTS} points with at least 3 distinct X; "
                          f"got {x.size} points, {_distinct(x)} distinct")
    _check_level_resamples(level, resamples)
    law = _fit_law(("N",), {"N": x}, loss, level, resamples, seed)
    return _public(law)


def compute_optimal(law: dict, compute) -> dict:
    """The compute-optimal N and D for a budget C = 6 N D under L(N, D), and the loss there:
    G = (alpha A / (beta B))^(1/(alpha+beta)), N_opt = G (C/6)^a, D_opt = (C/6)^b / G.
    Vectorised over the law's values (numpy arrays) and over `compute`."""
    alpha, beta, A, B = (np.asarray(law[k], float) for k in ("alpha", "beta", "A", "B"))
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        log_g = (np.log(alpha * A) - np.log(beta * B)) / (alpha + beta)
        half = np.log(np.asarray(compute, float) / 6)
        n_opt = np.exp(log_g + half * beta / (alpha + beta))
        d_opt = np.exp(half * alpha / (alpha + beta) - log_g)
        return {"N_opt": n_opt, "D_opt": d_opt, "loss": predict(law, n_opt, d_opt)}


def predict(law: dict, N, D=None):
    """The law's loss at N (and D): E + A/N^alpha (+ B/D^beta), using whichever terms the law has."""
    loss = np.asarray(law["E"], float)
    if law.get("alpha") is not None:
        loss = loss + np.asarray(law["A"]) / np.asarray(N, float) ** np.asarray(law["alpha"])
    if law.get("beta") is not None:
        loss = loss + np.asarray(law["B"]) / np.asarray(D, float) ** np.asarray(law["beta"])
    return loss


def _compute_optimal_with_ci(law: dict, compute: float, level: float) -> dict:
    point = {k: float(v) for k, v in compute_optimal(law, compute).items()}
    samples = compute_optimal(_estimates(law["thetas"], ("N", "D")), compute)
    return {"C": compute, **point, "ci": {k: _interval(v, level) for k, v in samples.items()}}


def _public(law: dict) -> dict:
    """The law without its thetas (arrays kept only to derive further intervals)."""
    return {k: v for k, v in law.items() if k not in ("theta", "thetas")}


# ----------------------------------------------------------------------------------------- Approach 2


def _budget_groups(flops: np.ndarray, compute_budget: np.ndarray) -> list[tuple[float, np.ndarray]]:
    """[(C, indices of its points)] in increasing C: by the planned compute_budget where points have one
    (points without one join no profile), else by flops rounded to 2 significant digits, C then being the
    geometric mean of the group's flops."""
    planned = np.isfinite(compute_budget).any()
    members = np.flatnonzero(np.isfinite(compute_budget)) if planned else np.arange(len(flops))
    keys = compute_budget[members] if planned else np.array([float(f"{c:.1e}") for c in flops])
    groups = []
    for key in np.unique(keys):  # sorted, and each group's geometric mean lies within its rounding bin
        idx = members[keys == key]
        groups.append((float(key) if planned else float(np.exp(np.log(flops[idx]).mean())), idx))
    return groups


def _parabola_minimum(log_n: np.ndarray, loss: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, str | None]:
    """(coefficients of loss ≈ p2 x^2 + p1 x + p0 in x = log N, why unusable or None)."""
    if _distinct(np.exp(log_n[counts > 0])) < 3:
        return np.full(3, math.nan), "fewer than 3 sizes"
    coefficients = np.polyfit(log_n, loss, 2, w=np.sqrt(counts))
    return coefficients, None if coefficients[0] > 0 else "the parabola opens downward (no minimum)"


def _optimum_line(budgets: list[float], best_log_n: list[float]) -> tuple[float, float]:
    """(a, b): slopes of log N* and log D* = log(C / (6 N*)) on log C."""
    log_c, log_n = np.log(budgets), np.array(best_log_n)
    return float(np.polyfit(log_c, log_n, 1)[0]), float(np.polyfit(log_c, log_c - np.log(6) - log_n, 1)[0])


def approach2(N, flops, loss, compute_budget=None, *, level: float = 0.95, resamples: int = 1000,
              seed: int = 0) -> dict:
    """IsoFLOP profiles: per budget a parabola of loss vs log N gives N*(C) (D* = C / (6 N*)); the slopes of
    log N* and log D* on log C are a and b. Intervals resample points within each budget group. Returns
    {"skipped": reason, ...} when fewer than 2 budgets have a parabola with a minimum."""
    N, flops, loss = (np.asarray(v, float) for v in (N, flops, loss))
    budgets = np.full(N.size, math.nan) if compute_budget is None else np.asarray(compute_budget, float)
    log_n = np.log(N)
    minima, unusable = [], []
    for C, idx in _budget_groups(flops, budgets):
        coefficients, why = _parabola_minimum(log_n[idx], loss[idx], np.ones(idx.size))
        if why:
            unusable.append({"C": C, "points": idx.tolist(), "reason": why})
            continue
        best = -coefficients[1] / (2 * coefficients[0])
        minima.append({"C": C, "N_opt": math.exp(best), "D_opt": C / (6 * math.exp(best)),
                       "loss": float(np.polyval(coefficients, best)),
                       "extrapolated": not log_n[idx].min() <= best <= log_n[idx].max(),
                       "parabola": coefficients.tolist(), "points": idx.tolist()})
    if len(minima) < 2:
        return {"skipped": f"needs at least 2 compute budgets with a parabola of >= 3 sizes and a minimum; "
                           f"got {len(minima)} of {len(minima) + len(unusable)}",
                "minima": minima, "unusable": unusable}
    a, b = _optimum_line([m["C"] for m in minima], [math.log(m["N_opt"]) for m in minima])
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(resamples):
        budgets_kept, best_kept = [], []
        for m in minima:
            idx = np.array(m["points"])
            counts = rng.multinomial(idx.size, np.full(idx.size, 1 / idx.size)).astype(float)
            coefficients, why = _parabola_minimum(log_n[idx], loss[idx], counts)
            if not why:
                budgets_kept.append(m["C"])
                best_kept.append(-coefficients[1] / (2 * coefficients[0]))
        if len(budgets_kept) >= 2:  # a resample whose parabolas do not allow a line adds nothing
            samples.append(_optimum_line(budgets_kept, best_kept))
    samples = np.array(samples).reshape(-1, 2)
    ci = {"a": _interval(samples[:, 0], level), "b": _interval(samples[:, 1], level)}
    return {"a": a, "b": b, "ci": ci, "level": level, "resamples": len(samples), "minima": minima,
            "unusable": unusable}


# ------------------------------------------------------------------------------------------ the fit


def fit(results: dict, *, level: float = 0.95, resamples: int = 1000, seed: int = 0, compute: float | None = None,
        drop_highest: int = 0, drop_residual: float | None = None, exclude_repeated: bool = False) -> dict:
    """Every fit the points allow, as one JSON-able dict: L(N, D) (Approach 3) with intervals and, given
    `compute`, its compute-optimal allocation; Approach 2; L(N) or L(D) when only one of N, D varies.

    `results` needs N, D and loss (load_results gives them); flops, compute_budget, name and repeats_data
    are optional. Outliers: drop_highest=K leaves out the K highest losses, drop_residual=R the points whose
    |log residual| under a first fit exceeds R; `dropped` lists them and `moved` each estimate before -> after.
    Points that repeated their data are listed in `flagged_repeats`, and left out if exclude_repeated."""
    _check_level_resamples(level, resamples)
    if int(drop_highest) != drop_highest or drop_highest < 0:
        raise ConfigError(f"drop_highest={drop_highest} must be a non-negative integer")
    if drop_residual is not None and not drop_residual > 0:
        raise ConfigError(f"drop_residual={drop_residual} must be positive (in log-loss units, e.g. 0.1)")
    _check_compute(compute)
    N, D, loss = (np.asarray(results[k], float) for k in ("N", "D", "loss"))
    n = N.size
    names = [f"row {i + 1}" for i in range(n)] if results.get("name") is None else list(results["name"])
    flops = np.asarray(results.get("flops", 6 * N * D), float)
    repeats = np.asarray(results.get("repeats_data", np.zeros(n, bool)), bool)
    epochs = np.asarray(results.get("epochs", np.full(n, math.nan)), float)

    def point(i: int) -> dict:
        return {"index": int(i), "name": names[i], "N": float(N[i]), "D": float(D[i]), "loss": float(loss[i])}

    flagged = [{**point(i), "epochs": float(epochs[i]), "excluded": bool(exclude_repeated)}
               for i in np.flatnonzero(repeats)]
    kept = np.flatnonzero(~repeats) if exclude_repeated else np.arange(n)
    _require_points(kept.size, "after leaving out the points that repeated their data" if exclude_repeated else "")
    x = {"N": N, "D": D}
    variables = _law_variables(N[kept], D[kept])
    dropped, before = [], None
    if drop_highest or drop_residual is not None:
        before = _fit_law(variables, {v: x[v][kept] for v in variables}, loss[kept], level, 0, seed)
        reasons = _outliers(before, N, D, loss, kept, int(drop_highest), drop_residual)
        dropped = [{**point(i), "reason": reasons[i]} for i in sorted(reasons)]
        kept = np.setdiff1d(kept, list(reasons))
        _require_points(kept.size, "after leaving out outliers")
        variables = _law_variables(N[kept], D[kept])

    if compute is not None and variables != ("N", "D"):
        raise ConfigError(f"compute={compute:g} needs L(N, D), but these points vary only {variables[0]}")
    law = _fit_law(variables, {v: x[v][kept] for v in variables}, loss[kept], level, resamples, seed)
    moved = {k: [before.get(k), law[k]] for k in _estimates(law["theta"], variables)} if before else {}
    out = {"law": f"L({', '.join(variables)})", "source": results.get("source")}
    for k in ("E", "A", "B", "alpha", "beta", "a", "b"):
        out[k] = law.get(k)
    out.update(ci=law["ci"], level=level, resamples=resamples, seed=seed, params=results.get("params"),
               n_points=int(kept.size), huber_delta=HUBER_DELTA)
    out["single"] = None if variables == ("N", "D") else {"law": out["law"], **_public(law)}
    out["compute_optimal"] = None if compute is None else _compute_optimal_with_ci(law, compute, level)
    budgets = np.asarray(results.get("compute_budget", np.full(n, math.nan)), float)
    out["approach2"] = _reindexed(approach2(N[kept], flops[kept], loss[kept], budgets[kept], level=level,
                                            resamples=resamples, seed=seed), kept)
    out.update(dropped=dropped, moved=moved, flagged_repeats=flagged, kept=kept.tolist())
    return _jsonable(out)


def _outliers(law: dict, N, D, loss, kept: np.ndarray, drop_highest: int, drop_residual: float | None) -> dict:
    """{index: why} of the kept points to leave out: the drop_highest highest losses, and those whose
    |log residual| under `law` exceeds drop_residual."""
    reasons = {int(i): "highest loss" for i in kept[np.argsort(-loss[kept], kind="stable")[:drop_highest]]}
    if drop_residual is not None:
        residual = np.log(predict(law, N[kept], D[kept]) / loss[kept])
        for i, r in zip(kept, residual):
            if abs(r) > drop_residual:
                reasons.setdefault(int(i), f"|log residual| {abs(r):.3g} > {drop_residual:g}")
    return reasons


def _law_variables(N: np.ndarray, D: np.ndarray) -> tuple[str, ...]:
    varies = [v for v, values in (("N", N), ("D", D)) if _distinct(values) >= 2]
    if not varies:
        raise ConfigError(f"all {N.size} points have the same N and D: nothing to fit a law to")
    if len(varies) == 1 and _distinct({"N": N, "D": D}[varies[0]]) < 3:  # E, A and alpha fit any 2 values
        v = varies[0]
        raise ConfigError(f"the points vary only {v}, and L({v}) needs at least 3 distinct {v}; got 2")
    return tuple(varies)


def _require_points(count: int, when: str) -> None:
    if count < MIN_POINTS:
        raise ConfigError(f"needs at least {MIN_POINTS} points, got {count}" + (f" {when}" if when else ""))


def _reindexed(result: dict, kept: np.ndarray) -> dict:
    """Approach 2's point indices, which count the kept points, as indices of all points."""
    for group in result["minima"] + result["unusable"]:
        group["points"] = kept[group["points"]].tolist()
    return result


def _jsonable(value):
    """Plain floats, lists and dicts for json, with NaN and infinities as null (strict JSON has neither)."""
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value
