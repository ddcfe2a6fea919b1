"""The scaling-law fits (gpt/scaling/fit.py) on losses drawn from known laws: the intervals cover the truth
and narrow with more points, Approach 2 and single-variable laws recover their exponents, outliers are left
out and reported, and bad input is one line with exit code 2."""

import csv
import json
import math

import numpy as np
import pytest

from gpt.config import ConfigError
from gpt.scaling import fit as scaling
from gpt.scaling import report
from tests.helpers import run_command

TRUE = {"E": 1.7, "A": 400.0, "B": 1500.0, "alpha": 0.34, "beta": 0.28}
TRUE["a"] = TRUE["beta"] / (TRUE["alpha"] + TRUE["beta"])
TRUE["b"] = TRUE["alpha"] / (TRUE["alpha"] + TRUE["beta"])
RESAMPLES = 200  # enough for stable 95% percentiles, and a few seconds per fit


def true_loss(N, D):
    return TRUE["E"] + TRUE["A"] / np.asarray(N) ** TRUE["alpha"] + TRUE["B"] / np.asarray(D) ** TRUE["beta"]


def noisy(loss, sigma: float, seed: int) -> np.ndarray:
    """Multiplicative log-normal noise, the kind the Huber fit of log-residuals assumes."""
    return loss * np.exp(np.random.default_rng(seed).normal(0, sigma, np.shape(loss)))


def grid_points(sizes: int, token_counts: int, sigma: float = 0.02, seed: int = 0) -> dict:
    """Losses of the known law over a grid of N in 1e6..1e9 and D in 1e8..1e11."""
    N, D = (a.ravel() for a in np.meshgrid(np.geomspace(1e6, 1e9, sizes), np.geomspace(1e8, 1e11, token_counts)))
    return {"N": N, "D": D, "loss": noisy(true_loss(N, D), sigma, seed)}


def isoflop_points(budgets=(1e17, 1e18, 1e19, 1e20, 1e21), sizes: int = 7, sigma: float = 0.005,
                   seed: int = 0) -> dict:
    """An IsoFLOP grid: per budget C, sizes around the true optimum N_opt(C), and D = C / (6 N)."""
    optimum = scaling.compute_optimal(TRUE, np.array(budgets))["N_opt"]
    N = np.concatenate([n * np.geomspace(1 / 8, 8, sizes) for n in optimum])
    C = np.repeat(budgets, sizes)
    D = C / (6 * N)
    return {"N": N, "D": D, "flops": C, "compute_budget": C, "loss": noisy(true_loss(N, D), sigma, seed)}


def write_csv(path, rows: list[dict]):
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def as_rows(points: dict, keys=("N", "D", "loss"), columns=("params", "tokens", "loss")) -> list[dict]:
    return [{c: float(points[k][i]) for k, c in zip(keys, columns)} for i in range(len(points["loss"]))]


def test_fit_recovers_the_law_and_intervals_narrow_with_more_points():
    few = scaling.fit(grid_points(12, 10), resamples=RESAMPLES)
    many = scaling.fit(grid_points(24, 20), resamples=RESAMPLES)  # 4x the points
    for result in (few, many):
        assert result["law"] == "L(N, D)" and result["resamples"] == RESAMPLES and result["level"] == 0.95
        for name, truth in TRUE.items():
            low, high = result["ci"][name]
            assert low <= result[name] <= high, (name, result[name], low, high)
            assert low <= truth <= high, (result["n_points"], name, truth, low, high)
    for name in ("alpha", "beta"):  # about halved (1/sqrt(4)); a bootstrap of fewer points is too noisy to say
        assert np.ptp(many["ci"][name]) < 0.8 * np.ptp(few["ci"][name]), name
    assert many["n_points"] == 480


def test_a_lower_level_gives_narrower_intervals_and_the_seed_fixes_them():
    points = grid_points(6, 5)
    wide = scaling.fit(points, resamples=50, level=0.95)
    narrow = scaling.fit(points, resamples=50, level=0.5)
    again = scaling.fit(points, resamples=50, level=0.95)
    assert wide["ci"] == again["ci"]
    assert all(narrow["ci"][k][0] > wide["ci"][k][0] and narrow["ci"][k][1] < wide["ci"][k][1] for k in TRUE)


def test_compute_optimal_spends_exactly_the_budget_at_the_lowest_loss():
    points = grid_points(8, 8)
    result = scaling.fit(points, resamples=50, compute=1e21)
    optimal = result["compute_optimal"]
    assert scaling.fit_joint(points["N"], points["D"], points["loss"], resamples=50, compute=1e21)[
        "compute_optimal"] == optimal  # the function behind fit(), called directly
    assert 6 * optimal["N_opt"] * optimal["D_opt"] == pytest.approx(1e21, rel=1e-9)
    assert optimal["loss"] == pytest.approx(scaling.predict(result, optimal["N_opt"], optimal["D_opt"]))
    for factor in (0.8, 1.25):  # any other split of the same budget predicts a higher loss
        N = optimal["N_opt"] * factor
        assert scaling.predict(result, N, 1e21 / (6 * N)) > optimal["loss"]
    for key in ("N_opt", "D_opt", "loss"):
        assert optimal["ci"][key][0] <= optimal[key] <= optimal["ci"][key][1]
    # the exponents say how the split moves with C
    bigger = scaling.compute_optimal(result, 1e22)
    assert bigger["N_opt"] / optimal["N_opt"] == pytest.approx(10 ** result["a"])


def test_approach2_recovers_the_size_exponent():
    points = isoflop_points()
    result = scaling.fit(points, resamples=RESAMPLES)
    two = result["approach2"]
    assert "skipped" not in two and len(two["minima"]) == 5
    assert two["ci"]["a"][0] <= TRUE["a"] <= two["ci"]["a"][1]
    assert two["a"] == pytest.approx(TRUE["a"], abs=0.02) and two["a"] + two["b"] == pytest.approx(1)
    for m in two["minima"]:  # each parabola's minimum lies near the true optimum of its budget
        assert m["N_opt"] == pytest.approx(scaling.compute_optimal(TRUE, m["C"])["N_opt"], rel=0.15)
    # Without planned budgets the points are grouped by their FLOPs at 2 significant digits.
    unplanned = {**points, "flops": points["flops"] * np.random.default_rng(1).uniform(0.99, 1.01, len(points["N"]))}
    del unplanned["compute_budget"]
    again = scaling.fit(unplanned, resamples=20)["approach2"]
    assert len(again["minima"]) == 5 and again["a"] == pytest.approx(two["a"], abs=0.01)


def test_approach2_is_skipped_with_a_reason_when_budgets_lack_profiles():
    points = isoflop_points(budgets=(1e18, 1e19), sizes=3)
    points["compute_budget"][3:] = np.nan  # only one budget planned
    points["N"][:3] = points["N"][0]  # ... and its three points one size
    two = scaling.fit(points, resamples=10)["approach2"]
    assert "compute budgets" in two["skipped"] and "a" not in two


@pytest.mark.parametrize("varied", ["N", "D"])
def test_a_single_variable_law_is_fitted_when_only_one_of_n_and_d_varies(varied):
    x = np.geomspace(1e5, 1e10, 12)
    truth = {"E": 2.0, "A": 50.0, "alpha": 0.3}
    loss = noisy(truth["E"] + truth["A"] / x ** truth["alpha"], 0.01, seed=3)
    fixed = np.full_like(x, 1e9)
    result = scaling.fit({"N": x if varied == "N" else fixed, "D": fixed if varied == "N" else x, "loss": loss},
                         resamples=RESAMPLES)
    exponent, coefficient = ("alpha", "A") if varied == "N" else ("beta", "B")
    assert result["law"] == f"L({varied})" and result["single"]["law"] == result["law"]
    assert result[exponent] == pytest.approx(truth["alpha"], abs=0.03)
    assert result["ci"][exponent][0] <= truth["alpha"] <= result["ci"][exponent][1]
    assert result[coefficient] is not None and result["a"] is None and result["compute_optimal"] is None
    direct = scaling.fit_single(x, loss, resamples=RESAMPLES)
    assert direct["alpha"] == pytest.approx(result[exponent]) and direct["ci"]["alpha"] == result["ci"][exponent]


def test_absurd_losses_move_the_fit_until_dropped_and_are_reported():
    points = grid_points(6, 6, sigma=0.01)
    planted = [3, 17, 30]
    others = np.setdiff1d(np.arange(36), planted)
    clean = scaling.fit({k: v[others] for k, v in points.items()}, resamples=10)
    points["loss"][planted] = [40.0, 60.0, 80.0]
    spoiled = scaling.fit(points, resamples=10)
    # The Huber loss is robust by design (near least absolute deviations), yet three points still pull on it.
    assert abs(spoiled["E"] - clean["E"]) > 0.01 and abs(spoiled["alpha"] - clean["alpha"]) > 0.002
    for option in ({"drop_highest": 3}, {"drop_residual": 0.5}):
        result = scaling.fit(points, resamples=10, **option)
        assert [p["index"] for p in result["dropped"]] == planted, option
        assert [p["loss"] for p in result["dropped"]] == [40.0, 60.0, 80.0]
        assert result["kept"] == others.tolist() and result["n_points"] == 33
        for name in TRUE:  # the fit of the other points, as if the absurd ones had never been
            assert result[name] == pytest.approx(clean[name], rel=1e-5), (option, name)
            assert result["moved"][name] == [pytest.approx(spoiled[name]), result[name]]
    assert spoiled["dropped"] == [] and spoiled["moved"] == {}


def test_points_that_repeat_their_data_are_flagged_and_left_out_on_request():
    points = grid_points(6, 5)
    points["repeats_data"] = np.zeros(30, bool)
    points["repeats_data"][[0, 7]] = True
    kept = scaling.fit(points, resamples=10)
    assert [p["index"] for p in kept["flagged_repeats"]] == [0, 7] and kept["n_points"] == 30
    excluded = scaling.fit(points, resamples=10, exclude_repeated=True)
    assert excluded["n_points"] == 28 and all(p["excluded"] for p in excluded["flagged_repeats"])


def test_too_few_points_or_nothing_varying_is_refused():
    with pytest.raises(ConfigError, match="at least 5 points with at least 2 distinct N"):
        scaling.fit_joint([1e6, 2e6, 3e6, 4e6, 5e6], [1e9] * 5, [3.0] * 5)
    same = {"N": np.full(6, 1e6), "D": np.full(6, 1e9), "loss": np.linspace(3, 4, 6)}
    with pytest.raises(ConfigError, match="same N and D"):
        scaling.fit(same)
    with pytest.raises(ConfigError, match="needs at least 5 points, got 3 after leaving out outliers"):
        scaling.fit(grid_points(3, 2), drop_highest=3)


def test_a_csv_with_flops_instead_of_tokens_gives_d_as_c_over_6n(tmp_path):
    points = grid_points(5, 4)
    C = 6 * points["N"] * points["D"]
    with_flops = write_csv(tmp_path / "published.csv",
                           as_rows({**points, "C": C}, ("N", "C", "loss"), ("params", "flops", "loss")))
    results = scaling.load_results(with_flops)
    assert results["params"] == "params column" and results["out_dir"] == str(tmp_path)
    np.testing.assert_allclose(results["D"], points["D"], rtol=1e-12)
    np.testing.assert_allclose(results["flops"], C)
    with_tokens = scaling.load_results(write_csv(tmp_path / "tokens.csv", as_rows(points)))
    assert scaling.fit(results, resamples=10)["alpha"] == pytest.approx(
        scaling.fit(with_tokens, resamples=10)["alpha"], rel=1e-6)
    # A JSONL file with both keeps both: the flops it states (an attention term included) and its tokens.
    both = as_rows({**points, "C": 1.1 * C}, ("N", "D", "C", "loss"), ("params", "tokens", "flops", "loss"))
    (tmp_path / "both.jsonl").write_text("".join(json.dumps(r) + "\n" for r in both))
    results = scaling.load_results(tmp_path / "both.jsonl")
    np.testing.assert_array_equal(results["D"], points["D"])
    np.testing.assert_allclose(results["flops"], 1.1 * C)


def test_a_sweep_directory_is_read_with_the_chosen_parameter_count(tmp_path):
    points = grid_points(5, 4)
    rows = [{"name": f"p{i}", "out_dir": f"p{i}", "n_layer": 2, "n_embd": 64, "params_total": 2 * n,
             "params_non_embedding": n, "tokens": d, "flops": 6 * n * d, "compute_budget": None, "val_loss": loss,
             "repeats_data": i == 4, "epochs": 1.5 if i == 4 else 0.5}
            for i, (n, d, loss) in enumerate(zip(points["N"], points["D"], points["loss"]))]
    (tmp_path / "summary.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    results = scaling.load_results(tmp_path)
    assert results["params"] == "non_embedding" and results["sweep_dir"] == str(tmp_path)
    np.testing.assert_array_equal(results["N"], points["N"])
    assert results["name"][4] == "p4" and results["repeats_data"].tolist() == [i == 4 for i in range(20)]
    assert np.isnan(results["compute_budget"]).all()
    total = scaling.load_results(tmp_path, params="total")
    np.testing.assert_array_equal(total["N"], 2 * points["N"])
    with pytest.raises(ConfigError, match="unknown params choice 'embedding'"):
        scaling.load_results(tmp_path, params="embedding")


def test_json_prints_one_object_and_writes_fit_json_and_markdown(tmp_path, capsys):
    path = write_csv(tmp_path / "points.csv", as_rows(grid_points(6, 5)))
    code, out, err = run_command(report.main, [str(path), "--json", "--resamples=50", "--compute=1e20", "--no_plots"], capsys)
    assert code == 0, err
    result = json.loads(out, parse_constant=pytest.fail)  # the whole of stdout is one object, strict JSON
    for name in ("E", "A", "B", "alpha", "beta", "a", "b"):
        assert math.isfinite(result[name]) and len(result["ci"][name]) == 2
    assert result["resamples"] == 50 and result["compute_optimal"]["C"] == 1e20
    assert json.loads((tmp_path / "fit.json").read_text())["alpha"] == result["alpha"]
    markdown = (tmp_path / "fit.md").read_text()
    assert "| alpha" in markdown and "Approach 2" in markdown and "C = 1e+20" in markdown
    assert not list(tmp_path.glob("*.png"))


def test_plain_output_is_a_table_of_estimates_with_intervals(tmp_path, capsys):
    points = isoflop_points()
    path = write_csv(tmp_path / "iso.csv", as_rows(points, ("N", "D", "loss", "compute_budget"),
                                                   ("params", "tokens", "loss", "compute_budget")))
    code, out, err = run_command(report.main, [str(path), "--resamples=20", "--level=0.9", "--drop_highest=1", "--no_plots"], capsys)
    assert code == 0, err
    assert "90% interval" in out and "| beta" in out and "N* ∝ C^a" in out and "Points left out" in out
    assert out.strip().endswith(f"in {tmp_path}")


@pytest.mark.parametrize("content, message", [
    ("", "needs at least 5 points, got 0"),
    ("params,tokens,loss\n1e6,1e9,3.0\n", "needs at least 5 points, got 1"),
    ("params,loss\n" + "1e6,3.0\n" * 5, "lacks column(s) tokens"),
    ("params,tokens\n" + "1e6,1e9\n" * 5, "lacks column(s) loss"),
    ("params,tokens,loss\n" + "1e6,1e9,3.0\n" * 3 + "1e6,-1e9,3.0\n1e6,1e9,3.0\n", "row 4: tokens='-1e9'"),
    ("params,tokens,loss\n" + "1e6,1e9,3.0\n" * 4 + "1e6,1e9,nan\n", "row 5: loss='nan'"),
])
def test_bad_files_are_one_line_and_exit_2(tmp_path, capsys, content, message):
    (tmp_path / "bad.csv").write_text(content)
    code, out, err = run_command(report.main, [str(tmp_path / "bad.csv")], capsys)
    assert code == 2 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err


@pytest.mark.parametrize("argv, message", [
    (["--sigma=2"], "unknown flag '--sigma'; the flags are --json, --params"),
    (["--level=high"], "--level='high' is not a valid float"),
    (["--resamples=2.5"], "--resamples='2.5' is not a valid int"),
    (["--level"], "--level needs a value"),
    (["--level=1.5"], "level=1.5 must lie strictly between 0 and 1"),
    (["--params=total"], "--params=total applies to a sweep directory"),
    (["other.csv"], "one RESULTS path expected"),
])
def test_bad_flags_are_one_line_and_exit_2(tmp_path, capsys, argv, message):
    path = write_csv(tmp_path / "points.csv", as_rows(grid_points(3, 2)))
    code, _, err = run_command(report.main, [str(path), *argv], capsys)
    assert code == 2 and err.count("\n") == 1 and message in err, err


def test_missing_results_are_one_line(tmp_path, capsys):
    code, _, err = run_command(report.main, [str(tmp_path / "nowhere.csv")], capsys)
    assert code == 2 and "results not found" in err
    code, _, err = run_command(report.main, [str(tmp_path)], capsys)
    assert code == 2 and "holds no summary.jsonl" in err
