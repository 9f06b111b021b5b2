"""Study B's figures (Vyas, Bansal & Nakkiran 2022), drawn from results.json alone.

* `data_scaling_figures`: test error and test loss against n (log–log), one
  line per method, the fitted power laws over their fit sizes, network sizes
  where a seed stopped at the step cap marked;
* `data_scaling_summaries`: the same means as TensorBoard scalars (n as the step);
* `data_scaling_tables`: the Markdown tables of docs/study_b.md (means over
  seeds, seeds per size, exponents with their intervals, paired differences,
  the networks' steps and cap hits), printed by
  `python -m experiments.figures.study_b RESULTS_JSON [FIGURES_DIR]`;
* `kernel_evolution_figures`: kernel velocity (the cosine distance of Θ(t)
  and Θ(t+Δt) per step, and the relative velocity), distance from init,
  alignment and kernel regression with Θt, per width (mean over seeds, thin
  lines per seed).
"""

import os
import sys

import numpy as np

from experiments import figures


def data_scaling_figures(results, directory):
    """test_error_vs_n.png and test_loss_vs_n.png: log-log, one line per method.

    Markers: mean over seeds (error floored at half a test error); bands:
    min to max over seeds; dashed: the fitted power law over its fit sizes;
    red crosses: network sizes where some seed stopped at the step cap.
    """
    plt = figures.pyplot()
    n = np.asarray(results["n"], np.float64)
    for key, alpha_key, intercept_key, sizes_key, label in (
        ("test_error", "alpha", "intercept", "fit_sizes_error", "test error"),
        ("test_loss", "alpha_loss", "intercept_loss", "fit_sizes_loss",
         "test loss (MSE; CE for a CE network)"),
    ):
        fig, ax = plt.subplots(figsize=(5.6, 4.2))
        for index, (name, entry) in enumerate(results["methods"].items()):
            values = np.array([[np.nan if v is None else v for v in row]
                               for row in entry[key]], np.float64)
            if key == "test_error":
                values = np.maximum(values, results["error_floor"])
            ok = np.isfinite(values).any(axis=1)
            if not ok.any():
                continue
            mean = np.nanmean(values[ok], axis=1)
            color = f"C{index % 10}"
            alpha = entry[alpha_key]
            ax.plot(n[ok], mean, "o-", color=color,
                    label=f"{name} (α={alpha:.2f})" if alpha is not None else name)
            ax.fill_between(n[ok], np.nanmin(values[ok], axis=1), np.nanmax(values[ok], axis=1),
                            color=color, alpha=0.08)
            if alpha is not None:
                fit_n = np.asarray(entry[sizes_key], np.float64)
                ax.plot(fit_n, np.exp(entry[intercept_key]) * fit_n ** (-alpha), "--",
                        color=color, lw=0.8)
            capped = [any(bool(v) for v in row) for row in entry.get("hit_cap", [])]
            if any(capped):
                where = np.asarray(capped) & ok
                ax.plot(n[where], np.nanmean(values[where], axis=1), "x", color="red", ms=9,
                        label=f"{name}: some seed hit the step cap "
                              f"({entry['cap_hits']} of {entry['runs']} runs)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("training-set size n")
        ax.set_ylabel(label)
        model = results.get("settings", {}).get("model", "")
        ax.set_title(f"{results['dataset']}, {model}: {label} vs n", fontsize=10)
        ax.legend(fontsize=7)
        figures.save_figure(fig, os.path.join(directory, f"{key}_vs_n.png"))


def data_scaling_summaries(results, directory):
    """TensorBoard scalars: mean test error and loss of each method against n (as the step)."""
    import tensorflow as tf

    from experiments import cells

    with cells.summary_writer(directory) as writer, writer.as_default():
        for name, entry in results["methods"].items():
            for n, errors, losses in zip(results["n"], entry["test_error"], entry["test_loss"]):
                errors = [e for e in errors if e is not None]
                losses = [v for v in losses if v is not None]
                if errors:
                    tf.summary.scalar(f"{name}/test_error", float(np.mean(errors)), step=n)
                    tf.summary.scalar(f"{name}/test_loss", float(np.mean(losses)), step=n)


def _rows(table):
    """Per-n lists of the finite values of a [[value per seed] per n] table."""
    return [[float(v) for v in row if v is not None and np.isfinite(v)] for row in table]


def _mean(values, scale=1.0, digits=1):
    return f"{scale * np.mean(values):.{digits}f}" if values else "–"


def _alpha(value, interval, digits=3):
    if value is None:
        return "–"
    low, high = interval if interval is not None else (None, None)
    if low is None or high is None:
        return f"{value:.{digits}f}"
    return f"{value:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def _sizes(sizes):
    return f"{sizes[0]}–{sizes[-1]}" if sizes else "–"


def data_scaling_tables(results):
    """The Markdown tables of a data-scaling results.json (as in docs/study_b.md).

    Means are over the seeds with a result at that n (the number of them is
    in the "seeds per size" table); errors in %, losses as they are; α with
    its 95% bootstrap interval and the sizes of its fit; local α over the
    `local_alpha_sizes`; paired differences α_network − α_method; for the
    network, the steps of its runs and how many stopped at the cap (with the
    training examples they still misclassified).
    """
    n = results["n"]
    methods = results["methods"]
    header = " | ".join(f"n={k}" for k in n)
    lines = [f"| method | {header} | α error [95%] (fit sizes) | local α [95%] (sizes) "
             f"| α loss [95%] |", "|---|" + "---|" * (len(n) + 3)]
    for name, entry in methods.items():
        means = " | ".join(_mean(v, 100) for v in _rows(entry["test_error"]))
        fit = entry.get("fit_sizes_error") or []
        local = entry.get("local_alpha_sizes") or []
        lines.append(
            f"| {name} | {means} | {_alpha(entry['alpha'], entry['alpha_interval'])} "
            f"({_sizes(fit)}) | {_alpha(entry.get('local_alpha'), entry.get('local_alpha_interval'))}"
            f" ({_sizes(local)}) | {_alpha(entry.get('alpha_loss'), entry.get('alpha_loss_interval'))} |")
    lines += ["", f"| seeds per size | {header} |", "|---|" + "---|" * len(n)]
    for name, entry in methods.items():
        lines.append(f"| {name} | " + " | ".join(str(len(v)) if v else "–"
                                                for v in _rows(entry["test_error"])) + " |")
    lines += ["", f"| mean test loss | {header} |", "|---|" + "---|" * len(n)]
    for name, entry in methods.items():
        lines.append(f"| {name} | " + " | ".join(_mean(v, digits=4)
                                                for v in _rows(entry["test_loss"])) + " |")
    differences = results.get("exponent_differences") or {}
    if differences:
        lines += ["", "| comparison | α_network − α_method, error [95%] (sizes) | loss [95%] (sizes) |",
                  "|---|---|---|"]
        for name, entry in differences.items():
            cells = []
            for key in ("alpha", "alpha_loss"):
                d = entry.get(key) or {}
                if d.get("difference") is None:
                    cells.append("–")
                    continue
                low, high = d["interval"]
                cells.append(f"{d['difference']:+.3f} [{low:+.3f}, {high:+.3f}] "
                             f"({_sizes(d.get('sizes_used') or [])})")
            lines.append(f"| {name} | {cells[0]} | {cells[1]} |")
    network = methods.get("network")
    if network is not None and "train_steps" in network:
        lines += ["", "| network runs | runs | steps (min–max) | at the cap | training examples "
                  "misclassified at the cap |", "|---|---|---|---|---|"]
        for size, steps, capped, train_error in zip(
                n, network["train_steps"], network["hit_cap"], network["train_error"]):
            ran = [(s, bool(c), e) for s, c, e in zip(steps, capped, train_error) if s is not None]
            if not ran:
                continue
            low, high = min(s for s, _, _ in ran), max(s for s, _, _ in ran)
            at_cap = [round(e * size) for _, c, e in ran if c]
            lines.append(f"| n={size} | {len(ran)} | {low}–{high} | {len(at_cap)} | "
                         + (", ".join(str(v) for v in at_cap) if at_cap else "–") + " |")
        lines.append(f"| all | {network.get('runs')} | | {network.get('cap_hits')} | |")
    return "\n".join(lines) + "\n"


def main(argv):
    """`python -m experiments.figures.study_b RESULTS_JSON [FIGURES_DIR]`: the tables, the figures."""
    import json

    if len(argv) not in (2, 3):
        raise ValueError("Expected RESULTS_JSON [FIGURES_DIR]. Received: "
                         f"arguments={argv[1:]}")
    with open(argv[1]) as f:
        results = json.load(f)
    if len(argv) == 3:
        data_scaling_figures(results, argv[2])
    sys.stdout.write(data_scaling_tables(results))


def kernel_evolution_figures(results, directory):
    """velocity.png, distance_from_init.png, alignment.png, kernel_regression.png (per width)."""
    plt = figures.pyplot()
    widths = sorted(results["widths"].items(), key=lambda item: int(item[0]))
    per_epoch = results["steps_per_epoch"]

    def save(fig, name):
        figures.save_figure(fig, os.path.join(directory, name))

    def epoch_axis(ax):
        top = ax.secondary_xaxis("top", functions=(lambda s: s / per_epoch,
                                                   lambda e: e * per_epoch))
        top.set_xlabel("epoch")

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for index, (width, cell) in enumerate(widths):
        color = f"C{index % 10}"
        for ax, key, slope_key in ((axes[0], "velocity_relative", "velocity_relative_tail_slope"),
                                   (axes[1], "velocity", "velocity_tail_slope")):
            slope, error = cell[slope_key], cell.get(f"{slope_key}_se")
            ax.plot(cell["steps"], cell[key], "o-", ms=3, color=color,
                    label=f"width {width}" + (f" (tail slope {slope:.2f} ± {error or 0:.2f})"
                                              if slope is not None else ""))
            for seed_cell in cell.get("seeds", {}).values():  # thin: each seed
                ax.plot(seed_cell["steps"], seed_cell[key], "-", color=color, lw=0.4, alpha=0.5)
    dt = results.get("velocity_dt", 1)
    for ax, label in ((axes[0], f"relative velocity ‖Θ(t+Δt)−Θ(t)‖_F/(‖Θ(t)‖_F·Δt), Δt={dt}"),
                      (axes[1], f"kernel velocity (1−cos(Θ(t),Θ(t+Δt)))/Δt, Δt={dt}")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.axvline(widths[0][1]["tail_start_step"], color="gray", lw=0.6, ls=":")
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
        epoch_axis(ax)
    save(fig, "velocity.png")

    for key, label, log_y, name in (
        ("distance_from_init", "kernel distance from init (1−cos)", True, "distance_from_init.png"),
        ("alignment", "centred kernel-target alignment", False, "alignment.png"),
    ):
        fig, ax = plt.subplots(figsize=(5.6, 4.2))
        for index, (width, cell) in enumerate(widths):
            ax.plot(cell["steps"], cell[key], "o-", ms=3, color=f"C{index % 10}",
                    label=f"width {width}")
        ax.set_xscale("log")
        if log_y:
            ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
        epoch_axis(ax)
        save(fig, name)

    fig, ax = plt.subplots(figsize=(5.6, 4.2))
    for index, (width, cell) in enumerate(widths):
        color = f"C{index % 10}"
        ax.plot(cell["steps"], cell["kernel_regression_test_error"], "o-", ms=3, color=color,
                label=f"kernel regression with Θt, width {width}")
        ax.axhline(cell["kernel_regression_test_error_init"], color=color, lw=0.6, ls=":")
        errors = [np.nan if e is None else e for e in cell["network_test_error"]]
        ax.plot(cell["steps"], errors, "--", color=color, lw=0.8, label=f"network, width {width}")
    ax.set_xscale("log")
    ax.set_yscale("log")  # a zero error is not drawn
    ax.set_xlabel("step")
    ax.set_ylabel("test error")
    ax.set_title(f"kernel regression on {results['num_probe']} probe inputs (dotted: Θ0)",
                 fontsize=9)
    ax.legend(fontsize=6)
    epoch_axis(ax)
    save(fig, "kernel_regression.png")


if __name__ == "__main__":
    main(sys.argv)
