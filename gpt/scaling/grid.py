"""A sweep's grid: a TOML file in configs/ -> the list of points, each an ordinary training run.

    [sweep]
    shapes = [{n_layer = 2, n_embd = 64, n_head = 2}, ...]   # explicit model shapes, or the depth rule:
    depths = [1, 2, 3]        #   n_embd = aspect * depth, n_head = n_embd / head_dim
    aspect = 64
    head_dim = 32
    tokens = [2e5, 4e5]       # token budgets (every shape x every budget), or IsoFLOP budgets:
    flops = [1e12, 3e12]      #   tokens = C / (6 N + 12 n_layer n_embd block_size), N non-embedding
    schedule = "cosine"       # or "wsd": per shape one run to its largest budget, the others branched off it
    cooldown_frac = 0.2       # wsd: the decaying fraction of each point's steps
    warmup_frac = 0.1         # warmup_iters = warmup_frac x the grid's smallest run (the same for all points)
    preset = ""               # a preset every point starts from (configs/ name or path)

    [train]                   # any train.py key, for every point (a shape's own keys override these)
    batch_size = 16

The rule for what the grid leaves open: learning rate, batch, context and the rest come from the preset and
[train] and are the same at every point; a shape may set its own (say, learning_rate) beside n_layer;
warmup is one step count for the whole grid (warmup_frac of the smallest point's steps), so the runs of one
shape differ only in length; the schedule decays to min_lr (learning_rate / 10) at each point's last step.
Tokens are rounded to whole optimizer steps.
"""

from __future__ import annotations

import copy
import dataclasses
import sys
from pathlib import Path

from gpt.config import CONFIGS_DIR, Config, ConfigError, apply_layers, cooldown_start, load_preset, validate
from gpt.model import attention_flops_per_token, counts_of
from gpt.plan import n_params

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

SWEEP_KEYS = {"shapes", "depths", "aspect", "head_dim", "tokens", "flops", "schedule", "cooldown_frac",
              "warmup_frac", "preset"}
SHAPE_KEYS = ("n_layer", "n_embd", "n_head")
# Keys the sweep sets per point, with where to say what is meant instead.
RESERVED = {"out_dir": "the sweep directory holds one per point", "init_from": "the sweep sets it",
            "max_iters": "budgets set it", "lr_decay_iters": "each point decays to its last step",
            "warmup_iters": "use warmup_frac in [sweep]", "schedule": "use schedule in [sweep]",
            "cooldown_frac": "use cooldown_frac in [sweep]", "save_steps": "the WSD plan sets it",
            "reset_optimizer": "a WSD branch continues its long run's optimizer",
            "dry_run": "plan a point with train.py and its flags"}


@dataclasses.dataclass
class Point:
    """One run of the sweep: train.py [preset] --key=value for each of flags (out_dir and init_from are the
    sweep's to add). branch_of: the name of the wsd run this one continues from step branch_step, else None."""
    name: str
    preset: str
    flags: dict
    steps: int
    tokens: int
    compute_budget: float | None
    mode: str  # cosine | wsd | wsd-branch
    branch_of: str | None = None
    branch_step: int = 0
    save_steps: tuple[int, ...] = ()


def counts(cfg: Config) -> dict[str, int]:
    """Parameter counts of cfg's model as Kaplan et al. and Hoffmann et al. count them: total (the tied LM
    head once, no vocabulary padding) and non-embedding (without token and position embeddings)."""
    count = counts_of(cfg.model, n_params(cfg.model))
    return {"params_total": count["total"], "params_non_embedding": count["non_embedding"]}


def flops(cfg: Config, tokens: int) -> dict[str, float]:
    """Training FLOPs of `tokens` tokens: 6·N·D with N non-embedding (Kaplan's C), and attention's scores
    and weighted sum, 12·n_layer·n_embd·block_size per token (PaLM's appendix B), stated apart."""
    dense = 6.0 * counts(cfg)["params_non_embedding"] * tokens
    attention = float(attention_flops_per_token(cfg.model)) * tokens
    return {"flops_6nd": dense, "flops_attention": attention, "flops": dense + attention}


def _number_list(table: dict, key: str) -> list[float]:
    values = table[key]
    if not isinstance(values, list) or not values or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in values):
        raise ConfigError(f"grid: {key}={values!r} must be a non-empty list of positive numbers")
    return sorted(float(v) for v in values)


def _fraction(sweep: dict, key: str, default: float) -> float:
    value = sweep.get(key, default)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value <= 1:
        raise ConfigError(f"grid: {key}={value!r} must be a number in [0, 1]")
    return float(value)


def _shapes(sweep: dict) -> list[dict]:
    if ("shapes" in sweep) == ("depths" in sweep):
        raise ConfigError("grid: give either shapes (explicit n_layer/n_embd/n_head) or depths (the width rule)")
    if "shapes" in sweep:
        shapes = sweep["shapes"]
        if not isinstance(shapes, list) or not shapes or not all(isinstance(s, dict) for s in shapes):
            raise ConfigError("grid: shapes must be a non-empty list of tables like {n_layer = 2, n_embd = 64, n_head = 2}")
        for s in shapes:
            missing = [k for k in SHAPE_KEYS if k not in s]
            if missing:
                raise ConfigError(f"grid: the shape {s} lacks {', '.join(missing)}")
        return shapes
    aspect, head_dim = sweep.get("aspect", 64), sweep.get("head_dim", 64)
    for key, value in (("aspect", aspect), ("head_dim", head_dim)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"grid: {key}={value!r} must be a positive integer")
    out = []
    for depth in sweep["depths"]:
        width = aspect * depth
        if not isinstance(depth, int) or depth < 1 or width % head_dim:
            raise ConfigError(f"grid: depth {depth!r} gives n_embd={width}, which head_dim={head_dim} does not divide")
        out.append({"n_layer": depth, "n_embd": width, "n_head": width // head_dim})
    return out


def load_grid(path: str, schedule: str | None = None) -> tuple[dict, dict, list[Point]]:
    """(the [sweep] table, the [train] table, the points) of a grid file, its schedule replaced if given;
    one-line ConfigError for anything wrong in it, including any key train.py would refuse."""
    file = Path(path)
    if not file.is_file():
        candidate = Path(str(CONFIGS_DIR / f"{path.removesuffix('.toml')}.toml"))
        if not candidate.is_file():
            raise ConfigError(f"grid {path!r}: no such file (give a .toml path or a name in configs/)")
        file = candidate
    try:
        grid = tomllib.loads(file.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"grid {file}: {e}") from None
    unknown = set(grid) - {"sweep", "train"}
    if unknown or "sweep" not in grid:
        raise ConfigError(f"grid {file}: needs a [sweep] table (and may have [train]); unknown: {sorted(unknown)}")
    sweep, train = grid["sweep"], grid.get("train", {})
    unknown = set(sweep) - SWEEP_KEYS
    if unknown:
        raise ConfigError(f"grid {file}: unknown [sweep] key(s) {sorted(unknown)}: use {', '.join(sorted(SWEEP_KEYS))}")
    if ("tokens" in sweep) == ("flops" in sweep):
        raise ConfigError(f"grid {file}: give either tokens (budgets per shape) or flops (IsoFLOP budgets)")
    if schedule is not None:
        sweep["schedule"] = schedule
    if not isinstance(sweep.get("preset", ""), str):
        raise ConfigError(f"grid {file}: preset={sweep['preset']!r} must be a preset name or a .toml path")
    for where, table in [("[train]", train), *((f"shape {s}", s) for s in sweep.get("shapes", [])
                                                 if isinstance(s, dict))]:
        for key in set(table) & set(RESERVED):
            raise ConfigError(f"grid {file}: {where} may not set {key}: {RESERVED[key]}")
    return sweep, train, plan_points(sweep, train)


def _point_config(sweep: dict, train: dict, shape: dict) -> Config:
    layers = [("preset " + sweep["preset"], load_preset(sweep["preset"]))] if sweep.get("preset") else []
    return apply_layers(Config(), [*layers, ("grid [train]", train), (f"grid shape {shape}", shape)])


def plan_points(sweep: dict, train: dict) -> list[Point]:
    schedule = sweep.get("schedule", "cosine")
    if schedule not in ("cosine", "wsd"):
        raise ConfigError(f"grid: schedule={schedule!r}: use cosine or wsd")
    cooldown, warmup_frac = _fraction(sweep, "cooldown_frac", 0.2), _fraction(sweep, "warmup_frac", 0.1)
    budgets_key = "tokens" if "tokens" in sweep else "flops"
    budgets = _number_list(sweep, budgets_key)
    planned = []  # (shape, cfg, steps, budget C or None)
    for shape in _shapes(sweep):
        cfg = _point_config(sweep, train, shape)
        if cfg.model.vocab_size == 0:
            from gpt.tokenizer import get_tokenizer

            cfg.model.vocab_size = get_tokenizer(cfg.data.tokenizer).vocab_size
        per_token = flops(cfg, 1)["flops"]
        for budget in budgets:
            tokens = budget if budgets_key == "tokens" else budget / per_token
            steps = max(1, round(tokens / cfg.tokens_per_step))
            planned.append((shape, cfg, steps, None if budgets_key == "tokens" else budget))
    warmup = int(warmup_frac * min(p[2] for p in planned))
    points: dict[str, Point] = {}
    for shape, cfg, steps, budget in planned:
        name = f"L{shape['n_layer']}-D{shape['n_embd']}-H{shape['n_head']}-S{steps}"
        if name in points:
            raise ConfigError(f"grid: two points would both be {name} (the same shape and step count): spread "
                              "the budgets, or drop the repeated shape")
        flags = {**train, **shape, "max_iters": steps, "warmup_iters": warmup, "schedule": schedule,
                 "cooldown_frac": cooldown, "lr_decay_iters": steps}
        validate(apply_layers(copy.deepcopy(cfg), [(f"grid point {name}", flags)]))  # fails before any point runs
        points[name] = Point(name, sweep.get("preset", ""), flags, steps, steps * cfg.tokens_per_step, budget, schedule)
    return _branch(list(points.values())) if schedule == "wsd" else list(points.values())


def _branch(points: list[Point]) -> list[Point]:
    """WSD: per shape the longest run trains in full and saves a checkpoint where each shorter run's
    cooldown starts; the shorter runs continue from there (init_from=TRUNK@STEP) for their cooldown only."""
    by_shape: dict[tuple, list[Point]] = {}
    for p in points:
        by_shape.setdefault(tuple(p.flags[k] for k in SHAPE_KEYS), []).append(p)
    for runs in by_shape.values():
        trunk = max(runs, key=lambda p: p.steps)
        for p in runs:
            start = cooldown_start(p.flags["cooldown_frac"], p.steps)
            if p is not trunk and 0 < start < p.steps:  # else no checkpoint to branch from, or no cooldown: alone
                p.mode, p.branch_of, p.branch_step = "wsd-branch", trunk.name, start
        trunk.save_steps = tuple(sorted({p.branch_step for p in runs if p.branch_of}))
        if trunk.save_steps:
            trunk.flags["save_steps"] = ",".join(map(str, trunk.save_steps))
    return points
