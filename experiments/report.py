"""results.json writing, figures (matplotlib PNG) and report.md of the studies.

`write_json_atomic` is how every binary writes results.json: to a temporary
file next to it, then a rename, so readers never see half a file.

Study A's report (`write_study_a_report`) draws four figures from
results.json alone and writes report.md: a table of accuracies, alignments
and distances, and for each qualitative finding of the paper (as we read
it) whether this run reproduces it, decided by fixed rules written below
(two binomial standard errors of the test accuracy count as a tie). It can
be re-run on a finished directory: `python -m experiments.report --output_dir=DIR`.
"""

import base64
import json
import os
import uuid

import numpy as np

_MODELS = ("network", "linearized_init", "linearized_final")
_LABELS = {"network": "network", "linearized_init": "linearized at θ0",
           "linearized_final": "linearized at θT"}


def write_json_atomic(path, obj):
    """Writes `obj` as JSON to `path` via a temporary file and a rename."""
    import tensorflow as tf

    directory = os.path.dirname(path)
    if directory:
        tf.io.gfile.makedirs(directory)
    temporary = f"{path}.tmp-{uuid.uuid4().hex}"
    with tf.io.gfile.GFile(temporary, "w") as f:
        json.dump(obj, f, indent=1)
    tf.io.gfile.rename(temporary, path, overwrite=True)


def pack_bits(values):
    """A boolean vector as a compact string: `numpy.packbits`, then base64."""
    return base64.b64encode(np.packbits(np.asarray(values, dtype=bool))).decode("ascii")


def unpack_bits(text, size):
    """The inverse of `pack_bits`: (size,) booleans."""
    packed = np.frombuffer(base64.b64decode(text), dtype=np.uint8)
    return np.unpackbits(packed, count=size).astype(bool)


def read_json(path):
    import tensorflow as tf

    with tf.io.gfile.GFile(path) as f:
        return json.load(f)


def pyplot():
    """matplotlib.pyplot with the non-interactive Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path):
    """Writes `fig` as a PNG to `path` (local or gs://), creating its directory, and closes it."""
    import tensorflow as tf

    tf.io.gfile.makedirs(os.path.dirname(path))
    with tf.io.gfile.GFile(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110, bbox_inches="tight")
    pyplot().close(fig)


def _grouped(runs):
    """{model: {(task, k): [runs over seeds]}} in a stable order."""
    groups = {}
    for run in runs:
        groups.setdefault(run["model"], {}).setdefault((run["task"], run["k"]), []).append(run)
    for model in groups:
        groups[model] = dict(sorted(groups[model].items(),
                                    key=lambda item: (item[0][0] != "eigenfunction",
                                                      item[0][1] or 0)))
    return groups


def _mean(runs, get):
    return float(np.mean([get(r) for r in runs]))


def _task_name(task, k):
    return f"k={k}" if task == "eigenfunction" else task


def figure_accuracy_vs_k(results, path):
    """Test accuracy vs eigenfunction index k: network and linearizations."""
    plt = pyplot()
    groups = _grouped(results["runs"])
    fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 3.6), squeeze=False)
    for ax, (model, cells) in zip(axes[0], groups.items()):
        eigen = [(k, runs) for (task, k), runs in cells.items() if task == "eigenfunction"]
        if eigen:
            ks = [k for k, _ in eigen]
            for name, style in zip(_MODELS, ("o-", "s--", "^:")):
                ax.plot(ks, [_mean(r, lambda x: x["test_accuracy"][name]) for _, r in eigen],
                        style, label=_LABELS[name])
            majority = [_mean(r, lambda x: max(x["base_rate"]["test"],
                                               1 - x["base_rate"]["test"])) for _, r in eigen]
            ax.plot(ks, majority, color="gray", lw=1, label="majority class")
            ax.set_xscale("log")
        for (task, _), runs in cells.items():
            if task == "binary":
                for name, marker in zip(_MODELS, ("o", "s", "^")):
                    ax.axhline(_mean(runs, lambda x: x["test_accuracy"][name]), lw=0.6,
                               ls="-.", color={"o": "C0", "s": "C1", "^": "C2"}[marker])
                ax.text(0.99, 0.02, "dash-dot: binary task", transform=ax.transAxes,
                        ha="right", fontsize=7)
        ax.set_xlabel("eigenfunction index k")
        ax.set_ylabel("test accuracy")
        ax.set_title(model)
        ax.legend(fontsize=7)
    save_figure(fig, path)


def figure_alignment(results, path):
    """Kernel-target alignment of the eNTK at θ0 and at θT, per task."""
    plt = pyplot()
    groups = _grouped(results["runs"])
    fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 3.6), squeeze=False)
    for ax, (model, cells) in zip(axes[0], groups.items()):
        names = [_task_name(*key) for key in cells]
        positions = np.arange(len(names))
        for offset, when in ((-0.2, "init"), (0.2, "final")):
            ax.bar(positions + offset, [_mean(r, lambda x: x["alignment"][when])
                                        for r in cells.values()],
                   width=0.4, label={"init": "at θ0", "final": "at θT"}[when])
        ax.set_xticks(positions, names, rotation=45, fontsize=8)
        ax.set_ylabel("kernel-target alignment")
        ax.set_title(model)
        ax.legend(fontsize=7)
    save_figure(fig, path)


def figure_projection(results, path):
    """a_j = v_jᵀ ΘT v_j in the eigenbasis of Θ0, against the eigenvalues of Θ0."""
    plt = pyplot()
    groups = _grouped(results["runs"])
    fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 3.6), squeeze=False)
    for ax, (model, cells) in zip(axes[0], groups.items()):
        first = next(iter(cells.values()))[0]
        j = np.arange(1, len(first["projection"]["init"]) + 1)
        ax.plot(j, first["projection"]["init"], color="black", lw=2, label="Θ0 (λ_j)")
        for index, ((task, k), runs) in enumerate(cells.items()):
            final = np.mean([r["projection"]["final"] for r in runs], axis=0)
            ax.plot(j, final, lw=1, color=f"C{index % 10}", label=f"ΘT, {_task_name(task, k)}")
            if task == "eigenfunction" and k <= len(j):
                ax.plot([k], [final[k - 1]], "o", color=f"C{index % 10}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("j (eigenvector of Θ0 on the probe set)")
        ax.set_ylabel("a_j")
        ax.set_title(model)
        ax.legend(fontsize=6)
    save_figure(fig, path)


def figure_energy(results, path):
    """Cumulative energy of the ±1 labels in the eigenbasis of Θ0."""
    plt = pyplot()
    groups = _grouped(results["runs"])
    fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 3.6), squeeze=False)
    for ax, (model, cells) in zip(axes[0], groups.items()):
        for index, ((task, k), runs) in enumerate(cells.items()):
            energy = np.asarray(runs[0]["label_energy"])
            ax.plot(np.arange(1, len(energy) + 1), np.cumsum(energy), color=f"C{index % 10}",
                    label=_task_name(task, k))
        ax.set_xscale("log")
        ax.set_xlabel("number of leading eigenvectors of Θ0")
        ax.set_ylabel("cumulative label energy")
        ax.set_title(model)
        ax.legend(fontsize=6)
    save_figure(fig, path)


FIGURES = {
    "accuracy_vs_k.png": figure_accuracy_vs_k,
    "alignment.png": figure_alignment,
    "projection.png": figure_projection,
    "energy.png": figure_energy,
}


def _spearman(x, y):
    from scipy import stats

    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(stats.spearmanr(x, y)[0])


def _standard_error(accuracy, n):
    return float(np.sqrt(max(accuracy * (1 - accuracy), 1e-12) / n))


def _findings(results):
    """Plain-words comparisons with the paper, decided by fixed rules."""
    runs = results["runs"]
    n_test = results.get("num_test") or 1
    lines = []
    groups = _grouped(runs)
    for model, cells in groups.items():
        eigen = [(k, r) for (task, k), r in cells.items() if task == "eigenfunction"]
        binary = [r for (task, _), r in cells.items() if task == "binary"]
        lines.append(f"**{model}**")
        if len(eigen) >= 3:
            ks = [k for k, _ in eigen]
            rho = {name: _spearman(ks, [_mean(r, lambda x: x["test_accuracy"][name])
                                        for _, r in eigen]) for name in _MODELS}
            verdict = ("reproduced" if rho["network"] < -0.5 and rho["linearized_init"] < -0.5
                       else "not reproduced")
            lines.append(
                f"- Paper: accuracy on eigenfunction tasks falls as k grows, for networks and "
                f"their linearizations alike (the linearization ranks task difficulty). Here: "
                f"Spearman(k, accuracy) = {rho['network']:.2f} (network), "
                f"{rho['linearized_init']:.2f} (linearized at θ0), "
                f"{rho['linearized_final']:.2f} (linearized at θT): **{verdict}** "
                f"(rule: both below −0.5)."
            )
            wd = _spearman(ks, [_mean(r, lambda x: x["weight_distance_squared"]) for _, r in eigen])
            lines.append(
                f"- Paper: the weights move further (‖θT−θ0‖²) on harder tasks (larger k). Here: "
                f"Spearman(k, ‖θT−θ0‖²) = {wd:.2f}: "
                f"**{'reproduced' if wd > 0.5 else 'not reproduced'}** (rule: above 0.5)."
            )

        def compare(cell_runs, a, b):
            acc_a = _mean(cell_runs, lambda x: x["test_accuracy"][a])
            acc_b = _mean(cell_runs, lambda x: x["test_accuracy"][b])
            tie = 2 * _standard_error(max(acc_a, acc_b), n_test * len(cell_runs))
            return 1 if acc_a - acc_b > tie else (-1 if acc_b - acc_a > tie else 0)

        if eigen:
            outcome = [compare(r, "network", "linearized_init") for _, r in eigen]
            lines.append(
                f"- Paper: networks do not always beat their linearization at θ0; on "
                f"eigenfunction tasks the linearization often wins. Here, over "
                f"{len(outcome)} eigenfunction tasks: network better on "
                f"{outcome.count(1)}, linearization better on {outcome.count(-1)}, tie "
                f"(within 2 standard errors) on {outcome.count(0)}: **"
                + ("reproduced" if outcome.count(-1) else
                   "inconclusive" if not outcome.count(1) else "not reproduced")
                + "** (rule: the linearization wins at least once; only ties: inconclusive)."
            )
        if binary:
            outcome = compare(binary[0], "network", "linearized_init")
            lines.append(
                "- Paper: on the binary CIFAR2-like task the network beats its linearization "
                f"at θ0. Here: network {_mean(binary[0], lambda x: x['test_accuracy']['network']):.3f}"
                f" vs {_mean(binary[0], lambda x: x['test_accuracy']['linearized_init']):.3f}: **"
                + {1: "reproduced", 0: "tie (not reproduced)", -1: "not reproduced"}[outcome] + "**."
            )
        all_cells = list(cells.values())
        # One-class tasks (e.g. k = 1) have alignment yᵀΘy/(‖Θ‖‖y‖²) with a
        # constant y: not a test of rotation towards a task.
        two_class = [r for r in all_cells if 0 < r[0]["base_rate"]["train"] < 1]
        rises = sum(_mean(r, lambda x: x["alignment"]["final"] - x["alignment"]["init"]) > 0
                    for r in two_class)
        lines.append(
            f"- Paper: training rotates the eNTK towards the task (kernel-target alignment "
            f"grows). Here: alignment grew on {rises} of {len(two_class)} two-class tasks "
            f"(one-class tasks left out): **"
            + ("not tested" if not two_class else
               "reproduced" if rises == len(two_class) else
               "partly reproduced" if rises else "not reproduced") + "**."
        )
        outcome = [compare(r, "linearized_final", "linearized_init") for r in all_cells]
        lines.append(
            f"- Paper: the linearization at the trained weights θT generalizes better than the "
            f"one at θ0 (the kernel learned during training carries the network's advantage). "
            f"Here: at θT better on {outcome.count(1)}, worse on {outcome.count(-1)}, tie on "
            f"{outcome.count(0)} of {len(outcome)} tasks: **"
            + ("reproduced" if outcome.count(1) > outcome.count(-1) else "not reproduced")
            + "** (rule: more wins than losses)."
        )
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
    for name, draw in FIGURES.items():
        draw(results, os.path.join(output_dir, "figures", name))
    recipe = results.get("recipe", {})
    lines = [
        "# Study A: what can linearized neural networks actually say about generalization?",
        "",
        f"Dataset `{results['dataset']}`: {results.get('num_train')} training and "
        f"{results.get('num_test')} test examples; kernels compared on "
        f"{results.get('num_probe')} training inputs. Recipe: "
        + ", ".join(f"{k} {v}" for k, v in recipe.items()) + ".",
        "",
        "Variants: linearized at θ0 = " + results["variant"]["linearized_init"]
        + "; linearized at θT = " + results["variant"]["linearized_final"] + ".",
        "",
        "Accuracies are on the test set (each cell: mean over seeds "
        f"{sorted({r['seed'] for r in results['runs']})}; one test example = "
        f"{100 / max(results.get('num_test') or 1, 1):.2f}%). Base rate: the fraction of "
        "label-1 test examples (an eigenfunction task can be nearly one-class).",
        "",
        "| model | task | base rate | network | lin. θ0 | lin. θT | align θ0 | align θT "
        "| kernel dist. | ‖θT−θ0‖² | ‖θT−θ0‖/‖θ0‖ |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for model, cells in _grouped(results["runs"]).items():
        for (task, k), runs in cells.items():
            def m(get, runs=runs):
                return _mean(runs, get)

            lines.append(
                f"| {model} | {_task_name(task, k)} | {m(lambda x: x['base_rate']['test']):.2f} | "
                + " | ".join(f"{m(lambda x, n=n: x['test_accuracy'][n]):.3f}" for n in _MODELS)
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
        "projection.png": "a_j = v_jᵀ ΘT v_j in the eigenbasis of Θ0 (dots: j = k).",
        "energy.png": "Cumulative energy of each task's labels in the eigenbasis of Θ0.",
    }
    for name, caption in captions.items():
        lines += [f"![{caption}](figures/{name})", "", caption, ""]
    lines += ["## Comparison with the paper's findings", "",
              "Each finding is the paper's claim as we read it (Ortiz-Jiménez et al., 2021), "
              "then what this run shows, judged by the stated rule. Nothing was tuned to make a "
              "finding appear; a small dataset, few seeds and short training can hide effects.",
              ""]
    lines += _findings(results)
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
