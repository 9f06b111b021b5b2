"""Figures of study C (experiments.trainability), drawn from its results.json alone.

Re-draw a finished run: `python -m experiments.figures.study_c RUN_DIR` writes
RUN_DIR/figures/*.png.
"""

import json
import os
import sys

import numpy as np

from experiments.figures import pyplot, save_figure

# The paper's overlay: 8 depth scales (neural-tangents' notebook, `depth_scaling = 8.`).
DEPTH_SCALING = 8.0


def _edges(values):
    v = np.asarray(values, np.float64)
    if len(v) == 1:
        return np.array([v[0] - 0.5, v[0] + 0.5])
    mid = (v[1:] + v[:-1]) / 2
    return np.concatenate([[2 * v[0] - mid[0]], mid, [2 * v[-1] - mid[-1]]])


def depth_scale_lines(diagram, points=200):
    """(σw², 8ξ1) on the ordered side and (σw², 8ξ*) on the chaotic side, fine grids."""
    from keras_ntk import mean_field

    sigma = np.asarray(diagram["sigma_w2"], np.float64)
    critical = diagram["critical_sigma_w2"]
    activation, sigma_b2 = diagram["activation"], diagram["sigma_b2"]
    fine = np.linspace(sigma.min(), sigma.max(), points)
    ordered = fine[fine < critical]
    chaotic = fine[fine > critical]
    xi_1 = [DEPTH_SCALING * mean_field.xi_1(activation, s, sigma_b2) for s in ordered]
    xi_star = [DEPTH_SCALING * mean_field.xi_star(activation, s, sigma_b2) for s in chaotic]
    return (ordered, np.asarray(xi_1)), (chaotic, np.asarray(xi_star))


def _heatmap(ax, diagram, values, **style):
    """values[σ][depth] as a (σw², depth) heat map with χ1 = 1 and the 8ξ lines."""
    sigma, depth = diagram["sigma_w2"], diagram["depth"]
    mesh = ax.pcolormesh(_edges(sigma), _edges(depth), np.asarray(values, np.float64).T,
                         shading="flat", **style)
    top = _edges(depth)[-1]
    critical = diagram["critical_sigma_w2"]
    if min(sigma) <= critical <= max(sigma):
        ax.axvline(critical, color="white", lw=1.2, ls=":", label="χ1 = 1")
    (s1, x1), (s2, x2) = depth_scale_lines(diagram)
    ax.plot(s1, np.minimum(x1, top), "w--", lw=2, label="8ξ1")
    ax.plot(s2, np.minimum(x2, top), color="cyan", ls="--", lw=2, label="8ξ*")
    ax.set_xlim(_edges(sigma)[0], _edges(sigma)[-1])
    ax.set_ylim(_edges(depth)[0], top)
    ax.set_xlabel("σw²")
    return mesh


def figure_condition(diagram, path):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    kappa = np.log10(np.asarray(diagram["condition_number"], np.float64))
    mesh = _heatmap(ax, diagram, kappa, cmap="viridis")
    fig.colorbar(mesh, ax=ax, label="log10 κ(Θ(X, X)) (≈15.7: float64 bound)")
    ax.set_ylabel("depth l (hidden layers)")
    ax.set_title(f"FCN {diagram['activation']}, σb²={diagram['sigma_b2']:g}: condition number",
                 fontsize=9)
    ax.legend(fontsize=7, loc="upper right")
    save_figure(fig, path)


def figure_trainability(diagram, path):
    """Training loss at each t (gradient flow), relative to the loss at t = 0."""
    plt = pyplot()
    gd = diagram["gd_mse"]
    loss = np.asarray(gd["train_loss"], np.float64)  # σ × depth × t
    initial = np.asarray(gd["initial_train_loss"], np.float64)[..., None]
    ratio = np.log10(np.maximum(loss / initial, 1e-12))
    times = gd["times"]
    fig, axes = plt.subplots(1, len(times), figsize=(3.3 * len(times), 3.4), sharey=True,
                             squeeze=False)
    for k, (t, ax) in enumerate(zip(times, axes[0])):
        mesh = _heatmap(ax, diagram, ratio[:, :, k], vmin=-6, vmax=0, cmap="magma_r")
        ax.set_title(f"t = {t:g}", fontsize=9)
    axes[0][0].set_ylabel("depth l")
    axes[0][0].legend(fontsize=6, loc="upper right")
    fig.colorbar(mesh, ax=list(axes[0]), label="log10 train loss(t) / loss(0)")
    fig.suptitle(f"Trainability: FCN {diagram['activation']}, σb²={diagram['sigma_b2']:g}, "
                 f"gradient flow at η = {gd['learning_rate_fraction']:g}·2nO/λmax, raw one-hot "
                 "targets", fontsize=10)
    save_figure(fig, path)


def figure_generalization(diagram, path):
    """Mean-predictor test accuracy (raw targets) and its spread (centred targets)."""
    plt = pyplot()
    mp = diagram["mean_predictor"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    mesh = _heatmap(axes[0], diagram, mp["test_accuracy"], vmin=0, vmax=1, cmap="magma")
    fig.colorbar(mesh, ax=axes[0], label="test accuracy")
    axes[0].set_title("mean predictor P(Θ)Y, raw one-hot targets", fontsize=9)
    axes[0].set_ylabel("depth l")
    axes[0].legend(fontsize=6, loc="upper right")
    ratio = np.log10(np.maximum(np.asarray(mp["spread_to_nngp_scale"], np.float64), 1e-30))
    mesh = _heatmap(axes[1], diagram, ratio, vmin=-12, vmax=0, cmap="viridis")
    fig.colorbar(mesh, ax=axes[1], label="log10 rms spread of P(Θ)Yc / NNGP scale")
    axes[1].set_title("spread of P(Θ)Yc over test inputs (training-mean-centred targets)\n"
                      "relative to the NNGP output scale √K(x, x)", fontsize=9)
    fig.suptitle(f"Generalization: FCN {diagram['activation']}, σb²={diagram['sigma_b2']:g}",
                 fontsize=10)
    save_figure(fig, path)


def figure_spread(diagram, path, curves=6):
    """The spread against depth in the chaotic phase, and the fitted e-fold lengths vs ξ*."""
    plt = pyplot()
    mp = diagram["mean_predictor"]
    depth = np.asarray(diagram["depth"])
    chaotic = [i for i, x in enumerate(diagram["xi_star"]) if x is not None]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    if chaotic:
        shown = [chaotic[int(j)] for j in np.linspace(0, len(chaotic) - 1,
                                                      min(curves, len(chaotic)))]
        cmap = plt.get_cmap("plasma")
        for n, i in enumerate(shown):
            color = cmap(n / max(len(shown) - 1, 1))
            spread = np.asarray([np.nan if v is None else v for v in mp["test_output_spread"][i]])
            axes[0].semilogy(depth, spread, "o-", ms=3, color=color,
                             label=f"σw²={diagram['sigma_w2'][i]:.2f}, ξ*={diagram['xi_star'][i]:.1f}")
            used = mp["spread_efold_depths"][i]
            fit = mp["spread_efold_length"][i]
            if fit and used:
                anchor = spread[list(depth).index(used[-1])]
                d = np.asarray([used[0], used[-1]], np.float64)
                axes[0].semilogy(d, anchor * np.exp(-(d - d[-1]) / diagram["xi_star"][i]),
                                 "k--", lw=1)
        xi = np.asarray([diagram["xi_star"][i] for i in chaotic])
        fits = np.asarray([np.nan if mp["spread_efold_length"][i] is None
                           else mp["spread_efold_length"][i] for i in chaotic])
        axes[1].plot(xi, fits, "o", label="fitted e-fold length of the spread")
        line = np.array([np.nanmin(xi), np.nanmax(xi)])
        axes[1].plot(line, line, "k-", lw=1, label="= ξ*")
        axes[1].fill_between(line, 0.75 * line, 1.25 * line, color="gray", alpha=0.2,
                             label="±25%")
    axes[0].set_xlabel("depth l")
    axes[0].set_ylabel("‖F* − mean F*‖ / ‖Yc* − mean Yc*‖ (test)")
    axes[0].set_title("chaotic phase: spread of P(Θ)Yc (dashed: slope e^(−l/ξ*) over the fit "
                      "window)", fontsize=8)
    axes[1].set_xlabel("ξ* = −1/(log χc* − log χ1)")
    axes[1].set_ylabel("e-fold length over the deepest depths above float64 noise")
    if chaotic:
        axes[0].legend(fontsize=6)
        axes[1].legend(fontsize=7)
    else:
        axes[0].set_title("no chaotic σw² on this grid", fontsize=8)
    save_figure(fig, path)


def figure_architectures(architectures, setup, path):
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, entry in architectures.items():
        eig = np.asarray(entry["eigenvalues"][-1])
        axes[0].loglog(np.arange(1, len(eig) + 1), np.maximum(eig / eig[0], 1e-18), label=name)
        axes[1].plot(entry["depth"], entry["test_accuracy_by_depth"], "o-", label=name)
    axes[0].set_xlabel("index i")
    axes[0].set_ylabel("λ_i / λ_max")
    axes[0].set_title(f"NTK spectra, depth {list(architectures.values())[0]['depth'][-1]} "
                      f"({setup['activation']}, σw²={setup['sigma_w2']:g})", fontsize=9)
    axes[1].set_xlabel("depth")
    axes[1].set_ylabel("kernel-regression test accuracy")
    axes[1].set_title(f"{setup['num_train']} train / {setup['num_test']} test", fontsize=9)
    for ax in axes:
        ax.legend(fontsize=8)
    save_figure(fig, path)


def figure_finite_width(finite, path):
    plt = pyplot()
    widths = [w["width"] for w in finite["widths"]]
    fig, ax = plt.subplots(figsize=(5.5, 4))
    series = (("centred_relative_error_mean", "one net, centred f_T − f_0"),
              ("ensemble_centred_relative_error", "ensemble mean, centred"),
              ("ensemble_raw_relative_error", "ensemble mean, raw f_T"),
              ("single_raw_relative_error_mean", "one net, raw f_T"))
    for key, label in series:
        ax.loglog(widths, [w[key] for w in finite["widths"]], "o-", label=label)
    ref = finite["widths"][0]["centred_relative_error_mean"]
    ax.loglog(widths, [ref * (widths[0] / w) ** 0.5 for w in widths], "k:", label="∝ width^−1/2")
    ax.set_xlabel("width")
    ax.set_ylabel("‖f − μ_T‖ / ‖μ_T‖ (test)")
    ax.set_title(f"finite vs infinite, {finite['activation']} depth {finite['depth']}, "
                 f"T = {finite['steps']} GD steps", fontsize=9)
    ax.legend(fontsize=7)
    save_figure(fig, path)


def draw_figures(results, directory):
    """All PNG figures of a study C results dictionary into `directory`."""
    for diagram in results.get("phase_diagram", []):
        activation = diagram["activation"]
        figure_condition(diagram, os.path.join(directory, f"condition_{activation}.png"))
        figure_trainability(diagram, os.path.join(directory, f"trainability_{activation}.png"))
        figure_generalization(diagram,
                              os.path.join(directory, f"generalization_{activation}.png"))
        figure_spread(diagram, os.path.join(directory, f"spread_{activation}.png"))
    if results.get("architectures"):
        figure_architectures(results["architectures"], results["architecture_setup"],
                             os.path.join(directory, "architectures.png"))
    if results.get("finite_width"):
        figure_finite_width(results["finite_width"], os.path.join(directory, "finite_width.png"))


if __name__ == "__main__":
    run_dir = sys.argv[1]
    with open(os.path.join(run_dir, "results.json")) as f:
        draw_figures(json.load(f), os.path.join(run_dir, "figures"))
