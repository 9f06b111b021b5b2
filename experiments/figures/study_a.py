"""Study A's figures (experiments.linear_vs_nonlinear), drawn from results.json alone.

`draw_all(results, directory)` writes the four PNGs of `FIGURES`; the
grouping helpers are shared with the report (experiments.report).
"""

import os

import numpy as np

from experiments.figures import pyplot, save_figure

# The models of a cell, in the order the binary trains them.
MODELS = ("network", "linearized_init", "linearized_init_difference", "linearized_final")
# The models of a cell as results.json names them, and how figures and tables label them.
LABELS = {"network": "network", "linearized_init": "linearized at θ0",
          "linearized_init_difference": "linearized at θ0, difference",
          "linearized_final": "linearized at θT, difference"}
STYLES = {"network": ("o-", "C0"), "linearized_init": ("s--", "C1"),
          "linearized_init_difference": ("v-.", "C3"), "linearized_final": ("^:", "C2")}
COLUMNS = {"network": "network", "linearized_init": "lin. θ0",
           "linearized_init_difference": "lin. θ0 diff.", "linearized_final": "lin. θT diff."}


def models_in(runs):
    """The models of `MODELS` every run has (older runs lack the θ0 difference model)."""
    return [name for name in MODELS if all(name in r["test_accuracy"] for r in runs)]


def grouped(runs):
    """{model: {(task, k): [runs over seeds]}} in a stable order."""
    groups = {}
    for run in runs:
        groups.setdefault(run["model"], {}).setdefault((run["task"], run["k"]), []).append(run)
    for model in groups:
        groups[model] = dict(sorted(groups[model].items(),
                                    key=lambda item: (item[0][0] != "eigenfunction",
                                                      item[0][1] or 0)))
    return groups


def mean(runs, get):
    """The mean over `runs` (seeds) of `get(run)`."""
    return float(np.mean([get(r) for r in runs]))


def task_name(task, k):
    """The task as tables name it: "k=5" for an eigenfunction task, else its name."""
    return f"k={k}" if task == "eigenfunction" else task


def model_panels(results):
    """(figure, [(axes, model, {(task, k): runs})]): one panel per model, side by side."""
    groups = grouped(results["runs"])
    fig, axes = pyplot().subplots(1, len(groups), figsize=(5 * len(groups), 3.6), squeeze=False)
    return fig, [(ax, model, cells) for ax, (model, cells) in zip(axes[0], groups.items())]


def figure_accuracy_vs_k(results, path):
    """Test accuracy vs eigenfunction index k: network and linearizations."""
    fig, panels = model_panels(results)
    for ax, model, cells in panels:
        eigen = [(k, runs) for (task, k), runs in cells.items() if task == "eigenfunction"]
        if eigen:
            ks = [k for k, _ in eigen]
            for name in models_in(results["runs"]):
                style, color = STYLES[name]
                ax.plot(ks, [mean(r, lambda x: x["test_accuracy"][name]) for _, r in eigen],
                        style, color=color, label=LABELS[name])
            majority = [mean(r, lambda x: max(x["base_rate"]["test"],
                                               1 - x["base_rate"]["test"])) for _, r in eigen]
            ax.plot(ks, majority, color="gray", lw=1, label="majority class")
            ax.set_xscale("log")
        for (task, _), runs in cells.items():
            if task == "binary":
                for name in models_in(runs):
                    ax.axhline(mean(runs, lambda x: x["test_accuracy"][name]), lw=0.6,
                               ls="-.", color=STYLES[name][1])
                ax.text(0.99, 0.02, "dash-dot: binary task", transform=ax.transAxes,
                        ha="right", fontsize=7)
        ax.set_xlabel("eigenfunction index k")
        ax.set_ylabel("test accuracy")
        ax.set_title(model)
        ax.legend(fontsize=7)
    save_figure(fig, path)


def figure_alignment(results, path):
    """Kernel-target alignment of the eNTK at θ0 and at θT, per task."""
    fig, panels = model_panels(results)
    for ax, model, cells in panels:
        names = [task_name(*key) for key in cells]
        positions = np.arange(len(names))
        for offset, when in ((-0.2, "init"), (0.2, "final")):
            ax.bar(positions + offset, [mean(r, lambda x: x["alignment"][when])
                                        for r in cells.values()],
                   width=0.4, label={"init": "at θ0", "final": "at θT"}[when])
        ax.set_xticks(positions, names, rotation=45, fontsize=8)
        ax.set_ylabel("kernel-target alignment")
        ax.set_title(model)
        ax.legend(fontsize=7)
    save_figure(fig, path)


def figure_projection(results, path):
    """a_j = v_jᵀ ΘT v_j in the eigenbasis of Θ0, against the eigenvalues of Θ0."""
    fig, panels = model_panels(results)
    for ax, model, cells in panels:
        first = next(iter(cells.values()))[0]
        j = np.arange(1, len(first["projection"]["init"]) + 1)
        ax.plot(j, first["projection"]["init"], color="black", lw=2, label="Θ0 (λ_j)")
        for index, ((task, k), runs) in enumerate(cells.items()):
            final = np.mean([r["projection"]["final"] for r in runs], axis=0)
            ax.plot(j, final, lw=1, color=f"C{index % 10}", label=f"ΘT, {task_name(task, k)}")
            if task == "eigenfunction" and k <= len(j):
                ax.plot([k], [final[k - 1]], "o", color=f"C{index % 10}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("j (eigenvector of Θ0 over train+test: the tasks' basis)")
        ax.set_ylabel("a_j")
        ax.set_title(model)
        ax.legend(fontsize=6)
    save_figure(fig, path)


def figure_energy(results, path):
    """Cumulative energy of the ±1 labels in the eigenbasis of Θ0."""
    fig, panels = model_panels(results)
    for ax, model, cells in panels:
        for index, ((task, k), runs) in enumerate(cells.items()):
            energy = np.asarray(runs[0]["label_energy"])
            ax.plot(np.arange(1, len(energy) + 1), np.cumsum(energy), color=f"C{index % 10}",
                    label=task_name(task, k))
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


def draw_all(results, directory):
    """Draws every figure of `FIGURES` into `directory`."""
    for name, draw in FIGURES.items():
        draw(results, os.path.join(directory, name))
