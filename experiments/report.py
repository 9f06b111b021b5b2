"""results.json writing, figures (matplotlib PNG) and report.md of the studies.

`write_json_atomic` (from `experiments.cells`) is how every binary writes
results.json: to a temporary file next to it, then a rename, so readers
never see half a file.

Study A's report (`write_study_a_report`) draws four figures from
results.json alone and writes report.md: a table of accuracies, alignments
and distances, and for each finding of the paper (as we read it) whether
this run reproduces it, judged by a named paired test over the same test
examples (experiments/stats.py: exact McNemar, paired bootstrap; seeds
aggregated as seeds) and a fixed rule, "inconclusive" where the test lacks
power (`study_a_findings`; also stored in results.json under `findings`).
The θT finding uses the tracking rule |acc(lin θT) − acc(net)| <
|acc(lin θ0) − acc(net)| with the difference models at θT and θ0. It can be
re-run on a finished directory: `python -m experiments.report --output_dir=DIR`.
Per-example test predictions are stored bit-packed (`pack_bits`).
"""

import base64
import json
import math
import os

import numpy as np

from experiments.cells import write_json_atomic  # noqa: F401 (one atomic writer, shared)
from experiments.figures import pyplot, save_figure  # noqa: F401 (shared by the studies)
from experiments.figures.study_a import (COLUMNS, LABELS, MODELS, draw_all, grouped, mean,
                                         models_in, task_name)


def pack_bits(values):
    """A boolean vector as a compact string: `numpy.packbits`, then base64."""
    return base64.b64encode(np.packbits(np.asarray(values, dtype=bool))).decode("ascii")


def unpack_bits(text, size):
    """The inverse of `pack_bits`: (size,) booleans."""
    packed = np.frombuffer(base64.b64decode(text), dtype=np.uint8)
    return np.unpackbits(packed, count=size).astype(bool)


def study_a_results(dataset, linearized_init_mode, init_seed, recipe):
    """Study A's results.json before its cells: the models' definitions and the recipe.

    `recipe`: epochs, batch_size, learning_rate, momentum, drop_remainder.
    The binary fills in num_train, num_test, num_probe, eigen and runs.
    """
    return {
        "study": "linear_vs_nonlinear",
        "dataset": dataset,
        "variant": {
            "linearized_init": f"{linearized_init_mode}: "
            + ("f(θ0) + " if linearized_init_mode == "full" else "")
            + "J(θ0)(θ−θ0), trained from θ0",
            "linearized_init_difference": "difference: J(θ0)(θ−θ0), trained from θ0 with the "
            "same recipe and data order (the baseline of the θT tracking rule)",
            "linearized_final": "difference: J(θT)(θ−θT), trained from θT with the same "
            "recipe and data order, BatchNorm statistics reset to their values at θ0",
        },
        "recipe": {"epochs": recipe["epochs"], "batch_size": recipe["batch_size"],
                   "learning_rate": recipe["learning_rate"], "momentum": recipe["momentum"],
                   "schedule": "linear decay to 0", "drop_remainder": recipe["drop_remainder"],
                   "loss": "sigmoid cross-entropy"},
        "num_train": None, "num_test": None, "num_probe": None,
        "init_seed": init_seed,
        "eigen": {},
        "runs": [],
    }


def study_a_record(cell, cell_id, stages, train_y, test_y, linearized_init_mode):
    """One run of study A's results.json from its cell's stages (the four fits, the kernels).

    `cell` is (model, task, k, seed); `stages` maps each of `MODELS` to its
    scores (train/test accuracy, bit-packed test predictions) and "kernels"
    to the kernel measurements (`experiments.entk`).
    """
    model_name, task, k, seed = cell
    kernels = stages["kernels"]
    return {
        "model": model_name,
        "task": task,
        "k": None if k is None else int(k),
        "seed": int(seed),
        "test_accuracy": {name: stages[name]["test"] for name in MODELS},
        "train_accuracy": {name: stages[name]["train"] for name in MODELS},
        # Per-example test predictions 1[logit > 0], bit-packed: the paired tests.
        "test_predictions": {name: stages[name]["test_predictions"] for name in MODELS},
        "test_labels": pack_bits(test_y > 0.5),
        "num_test": int(len(test_y)),
        "alignment": kernels["alignment"],
        "alignment_centered": kernels["alignment_centered"],
        "weight_distance": kernels["weight_distance"],
        "weight_distance_squared": kernels["weight_distance_squared"],
        "relative_weight_distance": kernels["relative_weight_distance"],
        "weight_distance_linearized_init": stages["linearized_init"]["weight_distance"],
        "kernel_distance": kernels["kernel_distance"],
        "projection": kernels["projection"],
        "projection_basis": "eigenvectors of the eNTK at θ0 over train+test (the tasks' basis)",
        "label_energy": kernels["label_energy"],
        "kernel_trace": kernels["trace"],
        "base_rate": {"train": float(np.mean(train_y)), "test": float(np.mean(test_y))},
        "variant": {
            "linearized_init": linearized_init_mode,
            "linearized_init_difference": "difference",
            "linearized_final": "difference_bn_init_statistics",
        },
        "cell": cell_id,
    }


def read_json(path):
    import tensorflow as tf

    with tf.io.gfile.GFile(path) as f:
        return json.load(f)


def _spearman(x, y):
    """Spearman's ρ (average ranks for ties); nan when undefined."""
    from scipy import stats

    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    rx, ry = stats.rankdata(x), stats.rankdata(y)
    return float(np.corrcoef(rx, ry)[0, 1])


def _holm(p_values):
    """Holm–Bonferroni adjusted p-values (family-wise error over the list)."""
    p = np.asarray(p_values, np.float64)
    order = np.argsort(p)
    adjusted = np.empty_like(p)
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (len(p) - rank) * p[index]))
        adjusted[index] = running
    return [float(a) for a in adjusted]


def _is_one_class(runs):
    rates = [r["base_rate"][split] for r in runs for split in ("train", "test")]
    return any(rate in (0.0, 1.0) for rate in rates)


def _correct(runs, names):
    """(seeds, models, n) per-example correctness of `names`, or None without predictions."""
    if not all("test_predictions" in r and "test_labels" in r for r in runs):
        return None
    rows = []
    for run in sorted(runs, key=lambda r: r["seed"]):
        labels = unpack_bits(run["test_labels"], run["num_test"])
        rows.append([unpack_bits(run["test_predictions"][name], run["num_test"]) == labels
                     for name in names])
    return np.asarray(rows)


def _rounded(value, digits=4):
    return None if value is None or not np.isfinite(value) else round(float(value), digits)


def _paired_outcome(correct_a, correct_b, options):
    from experiments import stats

    return stats.compare_paired(list(correct_a), list(correct_b), alpha=options["alpha"],
                                power=options["power"], margin=options["margin"])


def _bootstrap(correct, statistic, options):
    from experiments import stats

    result = stats.paired_bootstrap(correct, statistic, num_resamples=options["num_resamples"],
                                    confidence=1 - options["alpha"], seed=options["seed"])
    return {"estimate": result.estimate, "interval": result.interval, "p_value": result.p_value,
            "num_resamples": result.num_resamples}


def _signed_verdict(estimate, interval, p_value, alpha, margin, *, want_negative):
    """reproduced / not reproduced / inconclusive for a bootstrap statistic.

    Significant (p < α) in the wanted direction: reproduced; significant the
    other way: not reproduced. Not significant: not reproduced when the
    interval excludes an effect of `margin` in the wanted direction (the test
    had the power to see it), else inconclusive.
    """
    sign = -1 if want_negative else 1
    if p_value < alpha:
        return "reproduced" if sign * estimate > 0 else "not reproduced"
    reach = interval[0] if want_negative else interval[1]
    return "not reproduced" if sign * reach < margin else "inconclusive"


def _rank_finding(eigen, options):
    """Accuracy falls with k for the network and the linearization at θ0."""
    ks = [k for k, _ in eigen]
    names = ("network", "linearized_init")
    correct = [_correct(runs, names) for _, runs in eigen]
    finding = {"claim": "test accuracy on eigenfunction tasks falls as k grows, for the network "
                        "and its linearization at θ0 alike",
               "tasks": [f"k={k}" for k in ks],
               "test": "Spearman ρ(k, mean accuracy over seeds); paired bootstrap over test "
                       "examples (the same resampled examples for every task, seed and model)",
               "rule": "reproduced when ρ < −0.5 and the interval lies below 0 for both models; "
                       "not reproduced when ρ ≥ −0.5 with an interval above −0.5 for either; "
                       "else inconclusive"}
    if any(c is None for c in correct) or len({c.shape for c in correct}) != 1:
        for index, name in enumerate(names):
            finding[name] = {"rho": _spearman(ks, [mean(r, lambda x, n=name: x["test_accuracy"][n])
                                                  for _, r in eigen])}
        finding["verdict"] = "not tested (no per-example predictions)"
        return finding
    # (seeds, tasks·models, n): tasks share the test inputs, so examples pair up.
    stacked = np.concatenate(correct, axis=1)
    verdicts = []
    for index, name in enumerate(names):
        def statistic(accuracies, index=index):
            per_task = accuracies.mean(axis=0).reshape(len(ks), len(names))[:, index]
            return _spearman(ks, per_task)

        result = _bootstrap(stacked, statistic, options)
        # ρ = 0 is the null of the p-value; the rule needs ρ < −0.5.
        finding[name] = {"rho": result["estimate"], "interval": result["interval"],
                         "p_value": result["p_value"]}
        if result["estimate"] < -0.5 and result["interval"][1] < 0:
            verdicts.append("reproduced")
        elif result["estimate"] >= -0.5 and result["interval"][0] > -0.5:
            verdicts.append("not reproduced")
        else:
            verdicts.append("inconclusive")
    finding["verdict"] = ("reproduced" if verdicts == ["reproduced"] * 2 else
                          "not reproduced" if "not reproduced" in verdicts else "inconclusive")
    return finding


def _weight_distance_finding(eigen, options):
    from scipy import stats

    ks = [k for k, _ in eigen]
    distances = [mean(r, lambda x: x["weight_distance_squared"]) for _, r in eigen]
    rho = _spearman(ks, distances)
    p_value = float("nan")
    if np.isfinite(rho):
        test = stats.permutation_test((np.asarray(ks, float),), lambda x: _spearman(x, distances),
                                      permutation_type="pairings", n_resamples=9999,
                                      random_state=options["seed"])
        p_value = float(test.pvalue)
    # The exact permutation test of m tasks cannot go below 2/m!.
    no_power = 2 / math.factorial(len(ks)) >= options["alpha"]
    if not np.isfinite(rho):
        verdict = "not tested"
    elif no_power:
        verdict = "inconclusive"
    elif p_value < options["alpha"]:
        verdict = "reproduced" if rho > 0 else "not reproduced"
    else:
        verdict = "inconclusive" if rho > 0.5 else "not reproduced"
    return {"claim": "the weights move further (‖θT−θ0‖²) on harder tasks (larger k)",
            "tasks": [f"k={k}" for k in ks], "rho": rho, "p_value": p_value,
            "test": "Spearman ρ(k, mean ‖θT−θ0‖² over seeds), two-sided permutation test over "
                    "the pairings (exact when the tasks allow)",
            "rule": "reproduced when p < α and ρ > 0; not significant with ρ > 0.5, or too "
                    "few tasks for p < α: inconclusive; otherwise not reproduced",
            "verdict": verdict}


def _linearization_wins_finding(eigen, options):
    rows, p_values = [], []
    for k, runs in eigen:
        correct = _correct(runs, ("linearized_init", "network"))
        if correct is None:
            return {"verdict": "not tested (no per-example predictions)"}
        outcome = _paired_outcome(correct[:, 0], correct[:, 1], options)
        rows.append({"task": f"k={k}", "outcome": {"a": "linearization", "b": "network"}.get(
            outcome["outcome"], outcome["outcome"]), **_compact(outcome)})
        p_values.append(outcome["p_value"])
    holm = _holm(p_values)
    for row, adjusted in zip(rows, holm):
        row["p_value_holm"] = adjusted
    wins = [r for r in rows
            if r["outcome"] == "linearization" and r["p_value_holm"] < options["alpha"]]
    undecided = [r for r in rows if r["outcome"] == "inconclusive"]
    verdict = ("reproduced" if wins else "inconclusive" if undecided else "not reproduced")
    return {"claim": "networks do not always beat their linearization at θ0: on some "
                     "eigenfunction tasks the linearization generalizes better",
            "test": "exact McNemar per task (lin. θ0 vs network), discordant counts summed over "
                    "seeds; Holm–Bonferroni over the tasks",
            "rule": "reproduced when the linearization wins at least one task with Holm-adjusted "
                    "p < α; no win and some task without power: inconclusive",
            "tasks": rows, "verdict": verdict}


def _compact(outcome):
    keys = ("p_value", "p_values_per_seed", "difference", "a_only", "b_only", "n",
            "seeds_agreeing", "num_seeds", "detectable_difference")
    return {key: outcome[key] for key in keys}


def _binary_finding(runs, options):
    correct = _correct(runs, ("network", "linearized_init"))
    base = {"claim": "on the binary task (CIFAR2-like) the network beats its linearization at θ0",
            "test": "exact McNemar (network vs lin. θ0), discordant counts summed over seeds",
            "rule": "reproduced when the network wins with p < α; tie with power to see "
                    f"{options['margin']:.0%}: not reproduced; without power: inconclusive"}
    if correct is None:
        return dict(base, verdict="not tested (no per-example predictions)")
    outcome = _paired_outcome(correct[:, 0], correct[:, 1], options)
    verdict = {"a": "reproduced", "b": "not reproduced", "tie": "not reproduced",
               "inconclusive": "inconclusive"}[outcome["outcome"]]
    return dict(base, outcome={"a": "network", "b": "linearization"}.get(
        outcome["outcome"], outcome["outcome"]), verdict=verdict, **_compact(outcome))


def _alignment_finding(cells, options):
    from experiments import stats

    two_class = [(key, runs) for key, runs in cells.items() if not _is_one_class(runs)]
    changes = [mean(r, lambda x: x["alignment"]["final"] - x["alignment"]["init"])
               for _, r in two_class]
    rises = int(sum(c > 0 for c in changes))
    falls = int(sum(c < 0 for c in changes))
    p_value = stats.binomial_two_sided_half(rises, rises + falls)
    if not two_class:
        verdict = "not tested"
    elif p_value < options["alpha"]:
        verdict = "reproduced" if rises > falls else "not reproduced"
    elif rises > falls or stats.binomial_two_sided_half(0, rises + falls) >= options["alpha"]:
        verdict = "inconclusive"  # Most rise, or too few tasks for p < α at all.
    else:
        verdict = "not reproduced"
    return {"claim": "training rotates the eNTK towards the task: kernel-target alignment grows",
            "test": "exact sign test over two-class tasks of the seed-mean change in alignment "
                    "(probe kernels, not test examples)",
            "rule": "reproduced when most tasks rise with sign-test p < α; most fall with "
                    "p < α: not reproduced; otherwise, or with too few tasks for p < α: "
                    "inconclusive",
            "rises": rises, "falls": falls, "num_tasks": len(two_class), "p_value": p_value,
            "verdict": verdict}


def _tracking_finding(cells, options):
    """|acc(lin θT) − acc(net)| < |acc(lin θ0, difference) − acc(net)|, paired bootstrap."""
    from experiments import stats

    names = ("network", "linearized_final", "linearized_init_difference")
    alpha = options["alpha"]
    base = {"claim": "the linearization at the trained weights θT explains the network: its "
                     "accuracy tracks the network's, also where the network loses to the "
                     "linearization at θ0",
            "statistic": "|acc(lin θT) − acc(net)| − |acc(lin θ0) − acc(net)|, difference models "
                         "at θT and θ0 trained on the same data order, accuracies averaged over "
                         "seeds (negative: θT tracks the network more closely)",
            "test": "paired bootstrap over test examples (the same resampled examples for every "
                    "seed and model), percentile interval, two-sided p for 0",
            "rule": "reproduced when the estimate is below 0 with p < α; above 0 with p < α: not "
                    "reproduced. Not significant: not reproduced when the interval excludes "
                    "removing half of the θ0 gap (the claim predicts θT removes it), else "
                    "inconclusive. Per task, when lin. θ0 does not differ from the network "
                    "(exact McNemar p ≥ α) there is no gap to remove: not testable. Overall: "
                    "the mean over two-class tasks, margin half their mean θ0 gap"}
    rows, correct_all, gaps_init = [], [], []
    for (task, k), runs in cells.items():
        correct = _correct(runs, names)
        if correct is None:
            return dict(base, verdict="not tested (no per-example predictions)")
        result = _bootstrap(correct, stats.gap_difference, options)
        accuracies = correct.mean(axis=2).mean(axis=0)
        gap_init = float(abs(accuracies[2] - accuracies[0]))
        init_vs_network = _paired_outcome(correct[:, 2], correct[:, 0], options)
        if result["p_value"] >= alpha and init_vs_network["p_value"] >= alpha:
            verdict = "not testable (lin. θ0 does not differ from the network)"
        else:
            verdict = _signed_verdict(result["estimate"], result["interval"], result["p_value"],
                                      alpha, gap_init / 2, want_negative=True)
        one_class = _is_one_class(runs)
        rows.append({"task": task_name(task, k), "one_class": one_class,
                     "gap_final": float(abs(accuracies[1] - accuracies[0])),
                     "gap_init": gap_init, **result,
                     "p_value_init_vs_network": init_vs_network["p_value"],
                     "verdict": verdict})
        if not one_class:
            correct_all.append(correct)
            gaps_init.append(gap_init)
    overall = None
    if correct_all and len({c.shape for c in correct_all}) == 1:
        stacked = np.concatenate(correct_all, axis=1)
        num_tasks = len(correct_all)

        def mean_gap_difference(accuracies):
            per_task = accuracies.reshape(accuracies.shape[0], num_tasks, len(names))
            return float(np.mean([stats.gap_difference(per_task[:, t]) for t in range(num_tasks)]))

        overall = _bootstrap(stacked, mean_gap_difference, options)
        overall["num_tasks"] = num_tasks
        overall["margin"] = float(np.mean(gaps_init) / 2)
        overall["verdict"] = _signed_verdict(overall["estimate"], overall["interval"],
                                             overall["p_value"], alpha, overall["margin"],
                                             want_negative=True)
    return dict(base, tasks=rows, overall=overall,
                verdict=overall["verdict"] if overall else "not tested")


def study_a_findings(results, *, alpha=0.05, power=0.8, margin=0.02, num_resamples=10000,
                     seed=0):
    """The paper's findings judged on `results` by paired tests, seeds as seeds.

    Args:
        results: study A's results dictionary (runs with per-example test
            predictions, `report.pack_bits`).
        alpha: level of every test (and 1 − α the confidence of intervals).
        power, margin: a non-significant comparison is a tie (or "not
            reproduced") only when the test had `power` to detect a difference
            of `margin`; otherwise it is inconclusive.
        num_resamples, seed: of the paired bootstraps.

    Returns:
        {"options": {...}, "models": {model: {finding name: {claim, test, rule,
        numbers, verdict}}}}, JSON-serializable.
    """
    options = {"alpha": alpha, "power": power, "margin": margin,
               "num_resamples": num_resamples, "seed": seed}
    models = {}
    for model, cells in grouped(results["runs"]).items():
        eigen = [(k, r) for (task, k), r in cells.items() if task == "eigenfunction"]
        two_class_eigen = [(k, r) for k, r in eigen if not _is_one_class(r)]
        findings = {}
        if len(two_class_eigen) >= 3:
            findings["rank"] = _rank_finding(two_class_eigen, options)
            findings["weight_distance"] = _weight_distance_finding(two_class_eigen, options)
        if eigen:
            findings["linearization_wins"] = _linearization_wins_finding(eigen, options)
        binary = [r for (task, _), r in cells.items() if task == "binary"]
        if binary:
            findings["binary"] = _binary_finding(binary[0], options)
        findings["alignment"] = _alignment_finding(cells, options)
        findings["tracking"] = _tracking_finding(cells, options)
        models[model] = findings
    return json.loads(json.dumps({"options": options, "models": models}, default=float))


def _p(value):
    return "n/a" if value is None or not np.isfinite(value) else (
        f"{value:.2g}" if value >= 1e-4 else "<1e-4")


def _interval(interval):
    return f"[{interval[0]:+.3f}, {interval[1]:+.3f}]"


def _finding_lines(findings):
    """report.md lines for `study_a_findings(...)`."""
    options = findings["options"]
    lines = []
    for model, found in findings["models"].items():
        lines.append(f"### {model}")
        lines.append("")
        if "rank" in found:
            f = found["rank"]
            numbers = "; ".join(
                f"{LABELS[name]}: ρ = {f[name]['rho']:.2f}"
                + (f", interval {_interval(f[name]['interval'])}" if "interval" in f[name] else "")
                for name in ("network", "linearized_init"))
            lines.append(f"- **Rank** — paper: {f['claim']}. Here ({len(f['tasks'])} two-class "
                         f"tasks; one-class tasks left out): {numbers}. Test: {f['test']}. "
                         f"Rule: {f['rule']}. **{f['verdict']}**.")
            f = found["weight_distance"]
            lines.append(f"- **‖θT−θ0‖²** — paper: {f['claim']}. Here: ρ = {f['rho']:.2f}, "
                         f"p = {_p(f['p_value'])}. Test: {f['test']}. Rule: {f['rule']}. "
                         f"**{f['verdict']}**.")
        if "linearization_wins" in found:
            f = found["linearization_wins"]
            if "tasks" in f:
                per_task = ", ".join(
                    f"{r['task']}: {r['outcome']} (Δ = {r['difference']:+.3f}, "
                    f"p = {_p(r['p_value'])}, Holm {_p(r['p_value_holm'])})" for r in f["tasks"])
                lines.append(f"- **Linearization at θ0 vs network** — paper: {f['claim']}. Here "
                             f"(Δ = acc(lin. θ0) − acc(network)): {per_task}. Test: {f['test']}. "
                             f"Rule: {f['rule']}. **{f['verdict']}**.")
            else:
                lines.append(f"- **Linearization at θ0 vs network**: **{f['verdict']}**.")
        if "binary" in found:
            f = found["binary"]
            detail = (f"{f['outcome']} (acc(network) − acc(lin. θ0) = {f['difference']:+.3f}, "
                      f"p = {_p(f['p_value'])}, per seed "
                      + ", ".join(_p(p) for p in f["p_values_per_seed"])
                      + f"; detectable at {options['power']:.0%} power: "
                      f"{f['detectable_difference']:.3f})") if "outcome" in f else ""
            lines.append(f"- **Binary task** — paper: {f['claim']}. Here: {detail}. Test: "
                         f"{f['test']}. Rule: {f['rule']}. **{f['verdict']}**.")
        f = found["alignment"]
        lines.append(f"- **Alignment** — paper: {f['claim']}. Here: rose on {f['rises']} and "
                     f"fell on {f['falls']} of {f['num_tasks']} two-class tasks, "
                     f"p = {_p(f['p_value'])}. "
                     f"Test: {f['test']}. Rule: {f['rule']}. **{f['verdict']}**.")
        f = found["tracking"]
        if "tasks" in f:
            per_task = ", ".join(
                f"{r['task']}{' (one class)' if r['one_class'] else ''}: "
                f"{r['gap_final']:.3f} vs {r['gap_init']:.3f}, "
                f"{r['estimate']:+.3f} {_interval(r['interval'])}, p = {_p(r['p_value'])}: "
                f"{r['verdict']}" for r in f["tasks"])
            overall = f["overall"]
            overall_text = (f"overall (mean over {overall['num_tasks']} two-class tasks): "
                            f"{overall['estimate']:+.3f} {_interval(overall['interval'])}, "
                            f"p = {_p(overall['p_value'])}, margin {overall['margin']:.3f}"
                            if overall else "no overall test")
            lines.append(f"- **θT tracks the network** — paper: {f['claim']}. Statistic: "
                         f"{f['statistic']}. Here, per task (gap at θT vs gap at θ0, "
                         f"difference, {1 - options['alpha']:.0%} interval, p): {per_task}; "
                         f"{overall_text}. Test: {f['test']}. Rule: {f['rule']}. "
                         f"**{f['verdict']}**.")
        else:
            lines.append(f"- **θT tracks the network**: **{f['verdict']}**.")
        lines.append("")
    return lines


def write_study_a_report(output_dir, results=None):
    """Draws study A's figures and writes `output_dir/report.md`.

    Args:
        output_dir: the run's directory; results.json is read from it when
            `results` is None.
        results: the results dictionary.

    Returns:
        The path of report.md.
    """
    import tensorflow as tf

    if results is None:
        results = read_json(os.path.join(output_dir, "results.json"))
    if not results["runs"]:
        return None
    draw_all(results, os.path.join(output_dir, "figures"))
    recipe = results.get("recipe", {})
    models = models_in(results["runs"])
    lines = [
        "# Study A: what can linearized neural networks actually say about generalization?",
        "",
        f"Dataset `{results['dataset']}`: {results.get('num_train')} training and "
        f"{results.get('num_test')} test examples; kernels compared on "
        f"{results.get('num_probe')} training inputs. Recipe: "
        + ", ".join(f"{k} {v}" for k, v in recipe.items()) + ".",
        "",
        "Variants (`variant` in results.json):",
        "",
        *[f"- {LABELS[name]} (`{name}`): {text}" for name, text in results["variant"].items()
          if name in LABELS],
        "",
        "Accuracies are on the test set (each cell: mean over seeds "
        f"{sorted({r['seed'] for r in results['runs']})}; one test example = "
        f"{100 / max(results.get('num_test') or 1, 1):.2f}%). Base rate: the fraction of "
        "label-1 test examples (an eigenfunction task can be nearly one-class).",
        "",
        "| model | task | base rate | "
        + " | ".join(COLUMNS[n] for n in models)
        + " | align θ0 | align θT | kernel dist. | ‖θT−θ0‖² | ‖θT−θ0‖/‖θ0‖ |",
        "|---|---|---|" + "---|" * len(models) + "---|---|---|---|---|",
    ]
    for model, cells in grouped(results["runs"]).items():
        for (task, k), runs in cells.items():
            def m(get, runs=runs):
                return mean(runs, get)

            lines.append(
                f"| {model} | {task_name(task, k)} | {m(lambda x: x['base_rate']['test']):.2f} | "
                + " | ".join(f"{m(lambda x, n=n: x['test_accuracy'][n]):.3f}" for n in models)
                + f" | {m(lambda x: x['alignment']['init']):.3f}"
                f" | {m(lambda x: x['alignment']['final']):.3f}"
                f" | {m(lambda x: x['kernel_distance']):.3f}"
                f" | {m(lambda x: x['weight_distance_squared']):.3g}"
                f" | {m(lambda x: x['relative_weight_distance']):.3f} |"
            )
    lines += ["", "## Figures", ""]
    captions = {
        "accuracy_vs_k.png": "Test accuracy vs eigenfunction index k (gray: majority class).",
        "alignment.png": "Kernel-target alignment (±1 labels) of the eNTK at θ0 and θT.",
        "projection.png": "a_j = v_jᵀ ΘT v_j in the eigenbasis of Θ0 over train+test, the "
                          "eigenvectors the tasks are built from (dots: j = k).",
        "energy.png": "Cumulative energy of each task's labels in the eigenbasis of Θ0.",
    }
    for name, caption in captions.items():
        lines += [f"![{caption}](figures/{name})", "", caption, ""]
    findings = study_a_findings(results)
    options = findings["options"]
    lines += ["## Comparison with the paper's findings", "",
              "Each finding is the paper's claim as we read it (Ortiz-Jiménez et al., 2021), "
              "then what this run shows, judged by a named paired test and a fixed rule "
              f"(α = {options['alpha']}; a non-significant comparison of two models counts as a "
              f"tie or as \"not reproduced\" only when the exact McNemar test had "
              f"{options['power']:.0%} power to see a difference of {options['margin']:.0%}, and "
              "a non-significant tracking result only when its interval excludes removing half "
              "of the θ0 gap; otherwise it is **inconclusive**). Seeds "
              "are aggregated as seeds: accuracies per seed, averaged over seeds; test examples "
              f"are resampled in {options['num_resamples']} bootstrap resamples. One-class tasks "
              "are reported in the table but left out of the rank, ‖θT−θ0‖², alignment and "
              "overall tracking rules. Each finding states its test and rule below; the same "
              "numbers are in results.json under `findings`.",
              ""]
    lines += _finding_lines(findings)
    results["findings"] = findings
    write_json_atomic(os.path.join(output_dir, "results.json"), results)
    path = os.path.join(output_dir, "report.md")
    with tf.io.gfile.GFile(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def main(argv):
    from absl import flags

    del argv
    write_study_a_report(flags.FLAGS.output_dir)


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_string("output_dir", None, "A finished study A run directory.")
    app.run(main)
