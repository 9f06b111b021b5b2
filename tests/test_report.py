"""Study A's findings (experiments/report.py) on synthetic results with known answers."""

import json

import numpy as np
import pytest
from scipy import stats as scipy_stats

from experiments import report

N_TEST = 400
KS = (1, 2, 5, 10, 50)


def _flip(values, fraction, rng):
    return np.where(rng.random(len(values)) < fraction, ~values, values)


def _run(task, k, seed, labels, correct, *, weight_distance=1.0, alignment=(0.1, 0.2)):
    """A results.json run whose models are right exactly where `correct[name]` says."""
    predictions = {name: report.pack_bits(np.where(c, labels, ~labels))
                   for name, c in correct.items()}
    return {
        "model": "mlp", "task": task, "k": k, "seed": seed,
        "test_accuracy": {name: float(np.mean(c)) for name, c in correct.items()},
        "train_accuracy": {name: 1.0 for name in correct},
        "test_predictions": predictions, "test_labels": report.pack_bits(labels),
        "num_test": len(labels),
        "alignment": {"init": alignment[0], "final": alignment[1]},
        "weight_distance": weight_distance ** 0.5, "weight_distance_squared": weight_distance,
        "relative_weight_distance": 0.1, "kernel_distance": 0.05,
        "projection": {"init": [3.0, 2.0, 1.0], "final": [3.0, 2.5, 1.0]},
        "label_energy": [0.5, 0.3, 0.2],
        "base_rate": {"train": float(np.mean(labels)), "test": float(np.mean(labels))},
        "cell": f"mlp-{task}-k{k}-seed{seed}",
    }


def _results(make_correct, *, seeds=(0, 1, 2), n=N_TEST, one_class_k1=True, seed=0):
    """Runs for KS and the binary task; `make_correct(k, rng)` gives per-model correctness."""
    rng = np.random.default_rng(seed)
    runs = []
    for k in (*KS, None):
        labels = rng.random(n) < 0.5
        if k == 1 and one_class_k1:
            labels = np.ones(n, bool)
        for s in seeds:
            task = "binary" if k is None else "eigenfunction"
            runs.append(_run(task, k, s, labels, make_correct(k, rng),
                             weight_distance=float(k or 7), alignment=(0.1, 0.1 + 0.01 * s + 0.05)))
    return {"study": "linear_vs_nonlinear", "dataset": "digits", "num_train": 1000,
            "num_test": n, "num_probe": 100,
            "variant": {"linearized_init": "full", "linearized_init_difference": "difference",
                        "linearized_final": "difference at θT"},
            "runs": runs}


def _tracking_world(k, rng):
    """The network and lin θT agree (up to 1%); lin θ0 is right far more often."""
    accuracy = 0.95 - 0.05 * np.log10(k or 10)
    network = rng.random(N_TEST) < accuracy - 0.15
    initial = network | (rng.random(N_TEST) < 0.6)
    return {"network": network, "linearized_init": initial,
            "linearized_init_difference": initial,
            "linearized_final": _flip(network, 0.01, rng)}


OPTIONS = dict(num_resamples=2000)


def test_network_and_lin_theta_t_agree_and_lin_theta0_wins_gives_reproduced():
    results = _results(_tracking_world)
    findings = report.study_a_findings(results, **OPTIONS)["models"]["mlp"]
    tracking = findings["tracking"]
    assert tracking["verdict"] == "reproduced"
    assert tracking["overall"]["interval"][1] < 0 and tracking["overall"]["p_value"] < 0.01
    assert tracking["overall"]["num_tasks"] == len(KS)  # k=1 left out, binary in.
    # Gaps by hand from the same runs: seed-mean accuracies.
    for row in tracking["tasks"]:
        task_runs = [r for r in results["runs"]
                     if (f"k={r['k']}" if r["k"] else "binary") == row["task"]]
        mean = {name: np.mean([r["test_accuracy"][name] for r in task_runs])
                for name in ("network", "linearized_final", "linearized_init_difference")}
        np.testing.assert_allclose(row["gap_final"],
                                   abs(mean["linearized_final"] - mean["network"]), atol=1e-12)
        np.testing.assert_allclose(row["gap_init"],
                                   abs(mean["linearized_init_difference"] - mean["network"]),
                                   atol=1e-12)
        np.testing.assert_allclose(row["estimate"], row["gap_final"] - row["gap_init"],
                                   atol=1e-12)
        if not row["one_class"]:
            assert row["verdict"] == "reproduced"
    # The same world: the linearization at θ0 beats the network.
    assert findings["linearization_wins"]["verdict"] == "reproduced"
    assert findings["binary"]["verdict"] == "not reproduced"  # The network lost there too.


def test_lin_theta_t_far_from_the_network_gives_not_reproduced():
    def world(k, rng):
        network = rng.random(N_TEST) < 0.8
        return {"network": network, "linearized_init": network,
                "linearized_init_difference": _flip(network, 0.01, rng),
                "linearized_final": network & (rng.random(N_TEST) < 0.6)}

    tracking = report.study_a_findings(_results(world), **OPTIONS)["models"]["mlp"]["tracking"]
    assert tracking["verdict"] == "not reproduced" and tracking["overall"]["estimate"] > 0.1


def test_few_test_examples_give_inconclusive():
    def world(k, rng):
        network = rng.random(12) < 0.7
        return {"network": network, "linearized_init": _flip(network, 0.3, rng),
                "linearized_init_difference": _flip(network, 0.3, rng),
                "linearized_final": _flip(network, 0.25, rng)}

    findings = report.study_a_findings(_results(world, n=12, seeds=(0,)), **OPTIONS)
    found = findings["models"]["mlp"]
    assert found["tracking"]["verdict"] == "inconclusive"
    assert found["binary"]["verdict"] == "inconclusive"
    assert found["binary"]["detectable_difference"] > 0.02


def test_binary_mcnemar_pools_discordant_counts_over_seeds():
    def world(k, rng):
        network = rng.random(N_TEST) < 0.9
        return {"network": network, "linearized_init": _flip(network, 0.1, rng),
                "linearized_init_difference": network, "linearized_final": network}

    results = _results(world)
    binary = report.study_a_findings(results, **OPTIONS)["models"]["mlp"]["binary"]
    a_only = b_only = 0
    for run in (r for r in results["runs"] if r["task"] == "binary"):
        labels = report.unpack_bits(run["test_labels"], N_TEST)
        net = report.unpack_bits(run["test_predictions"]["network"], N_TEST) == labels
        lin = report.unpack_bits(run["test_predictions"]["linearized_init"], N_TEST) == labels
        a_only += int(np.sum(net & ~lin))
        b_only += int(np.sum(~net & lin))
    assert (binary["a_only"], binary["b_only"], binary["n"]) == (a_only, b_only, 3 * N_TEST)
    np.testing.assert_allclose(binary["p_value"],
                               scipy_stats.binomtest(a_only, a_only + b_only).pvalue)
    # Flipping 10% of a 90%-accurate network's predictions loses ~9% and wins ~1%.
    assert a_only > 3 * b_only and binary["verdict"] == "reproduced"


def test_one_class_tasks_are_left_out_of_the_rank_and_weight_rules():
    results = _results(_tracking_world)
    # A one-class k=1 task with a huge ‖θT−θ0‖² would break a monotone trend.
    for run in results["runs"]:
        if run["k"] == 1:
            run["weight_distance_squared"] = 1e6
    found = report.study_a_findings(results, **OPTIONS)["models"]["mlp"]
    two_class = [k for k in KS if k != 1]
    assert found["rank"]["tasks"] == [f"k={k}" for k in two_class]
    assert found["weight_distance"]["tasks"] == [f"k={k}" for k in two_class]
    np.testing.assert_allclose(found["weight_distance"]["rho"],
                               scipy_stats.spearmanr(two_class, [float(k) for k in two_class])[0])
    # Four tasks: the exact permutation p cannot go below 2/4! > α.
    assert found["weight_distance"]["verdict"] == "inconclusive"
    # Network accuracy falls with k in this world: ρ from scipy on seed means.
    network_means = [np.mean([r["test_accuracy"]["network"] for r in results["runs"]
                              if r["k"] == k]) for k in two_class]
    np.testing.assert_allclose(found["rank"]["network"]["rho"],
                               scipy_stats.spearmanr(two_class, network_means)[0])


def test_holm_adjustment_by_hand():
    np.testing.assert_allclose(report._holm([0.01, 0.04, 0.03]), [0.03, 0.06, 0.06])


def test_report_writes_findings_into_results_json(tmp_path):
    results = _results(_tracking_world)
    (tmp_path / "results.json").write_text(json.dumps(results))
    path = report.write_study_a_report(str(tmp_path))
    text = open(path).read()
    assert "θT tracks the network" in text and "**reproduced**" in text
    assert "exact McNemar" in text and "paired bootstrap" in text
    stored = json.loads((tmp_path / "results.json").read_text())
    assert stored["findings"]["models"]["mlp"]["tracking"]["verdict"] == "reproduced"
    assert stored["runs"] == results["runs"]  # The contract keys are kept.
    header = next(line for line in text.splitlines() if line.startswith("| model |"))
    assert "| network | lin. θ0 | lin. θ0 diff. | lin. θT diff. |" in header
    assert "(`linearized_init_difference`)" in text


def test_pack_bits_round_trip():
    values = np.random.default_rng(0).random(1001) < 0.3
    np.testing.assert_array_equal(report.unpack_bits(report.pack_bits(values), 1001), values)
    assert len(report.pack_bits(values)) <= 4 * (1001 // 8 + 1) // 3 + 4


@pytest.mark.parametrize("alpha", [0.05, 0.01])
def test_detectable_difference_reported_matches_stats(alpha):
    from experiments import stats

    results = _results(_tracking_world, seeds=(0,))
    binary = report.study_a_findings(results, alpha=alpha, **OPTIONS)["models"]["mlp"]["binary"]
    discordance = (binary["a_only"] + binary["b_only"]) / binary["n"]
    np.testing.assert_allclose(binary["detectable_difference"],
                               stats.mcnemar_detectable_difference(binary["n"], discordance,
                                                                   alpha=alpha))


def test_tasks_without_a_theta0_gap_are_not_testable():
    """lin θ0 agrees with the network: no gap for θT to close on that task."""
    def world(k, rng):
        network = rng.random(N_TEST) < 0.9
        return {"network": network, "linearized_init": network,
                "linearized_init_difference": _flip(network, 0.005, rng),
                "linearized_final": _flip(network, 0.005, rng)}

    tracking = report.study_a_findings(_results(world), **OPTIONS)["models"]["mlp"]["tracking"]
    for row in tracking["tasks"]:
        assert row["p_value_init_vs_network"] >= 0.05
        assert row["verdict"].startswith("not testable")
    # Overall: margin = half the mean θ0 gap; the interval reaches below −margin or not.
    np.testing.assert_allclose(tracking["overall"]["margin"],
                               np.mean([r["gap_init"] for r in tracking["tasks"]
                                        if not r["one_class"]]) / 2)
