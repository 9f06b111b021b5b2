"""Kernel velocity along training: snapshot times, tail fits, the verdict rule, seed means.

The analysis of `experiments.kernel_evolution` (study B, 2 of 2), apart from
its training loop: where eNTK snapshots are taken (log-spaced times t_i and
t_i + Δt), the power-law fit of the velocity's tail (slope of log velocity
against log step over the last decade of steps, with its standard error), the
fixed rule that turns a slope into words (`velocity_verdict`), and the mean
over seeds of one width's series with the standard error of the slope over
seeds (`aggregate_seeds`).
"""

import numpy as np

_TAIL_FRACTION = 0.1


def log_spaced_steps(total_steps, num):
    """About `num` distinct integer steps from 1 to `total_steps`, log-spaced."""
    if total_steps < 1 or num < 1:
        raise ValueError(
            "Expected total_steps >= 1 and num >= 1. "
            f"Received: total_steps={total_steps}, num={num}"
        )
    return sorted({int(round(v)) for v in np.geomspace(1, total_steps, num)})


def paired_snapshot_steps(total_steps, num, dt):
    """Velocity times t_i (about `num`, log-spaced) and the snapshot steps {t_i, t_i + dt}.

    Every t_i is at least 1 and at most `total_steps` − dt, and consecutive
    times are more than `dt` apart, so no snapshot falls inside a pair and
    each velocity uses exactly the interval [t_i, t_i + dt].

    Returns:
        (times t_i, sorted snapshot steps).
    """
    if dt < 1 or total_steps <= dt:
        raise ValueError(
            "Expected 1 <= velocity_dt < total steps. "
            f"Received: velocity_dt={dt}, total_steps={total_steps}"
        )
    times = []
    for t in log_spaced_steps(total_steps - dt, num):
        if not times or t > times[-1] + dt:
            times.append(t)
    return times, sorted(set(times) | {t + dt for t in times})


def tail_slope(steps, values, start):
    """Least-squares slope of log(value) on log(step) for steps ≥ `start`, and its standard error.

    Returns:
        (slope, standard error), or (None, None) with fewer than 3 usable points.
    """
    steps, values = np.asarray(steps, np.float64), np.asarray(values, np.float64)
    keep = (steps >= start) & np.isfinite(values) & (values > 0)
    if keep.sum() < 3:
        return None, None
    x, y = np.log(steps[keep]), np.log(values[keep])
    slope, intercept = np.polyfit(x, y, 1)
    residuals = y - (slope * x + intercept)
    spread = np.sum((x - x.mean()) ** 2)
    error = np.sqrt(np.sum(residuals**2) / max(len(x) - 2, 1) / spread) if spread > 0 else np.inf
    return float(slope), float(error)


def velocity_verdict(slope, error=0.0):
    """The fixed rule turning a tail slope ± 2 standard errors into words.

    * slope + 2 s.e. < −1: decays faster than 1/t, the kernel converges;
    * −1 within slope ± 2 s.e.: decays like 1/t, the kernel moves by a similar
      amount every decade of steps (distance grows like log t);
    * otherwise, slope < −0.25: decays slower than 1/t, the kernel keeps moving;
    * slope ≥ −0.25: plateaus.
    """
    if slope is None:
        return "undetermined (fewer than 3 snapshots in the tail)"
    if slope + 2 * error < -1.0:
        return "decays faster than 1/t (the kernel converges)"
    if slope - 2 * error <= -1.0:
        return ("decays like 1/t (slope within 2 s.e. of -1): the per-step velocity goes to "
                "zero, but the kernel moves by a similar amount every decade of steps")
    if slope < -0.25:
        return "decays slower than 1/t (the kernel keeps moving)"
    return "plateaus (slope >= -0.25: does not decay)"


def summarize(cell, total_steps):
    """Adds the tail fits, the verdict and the last decade's movement to a width's series."""
    start = _TAIL_FRACTION * total_steps
    slope, error = tail_slope(cell["steps"], cell["velocity_relative"], start)
    cosine_slope, cosine_error = tail_slope(cell["steps"], cell["velocity"], start)
    steps = np.asarray(cell["steps"], np.float64)
    distance = np.asarray(cell["distance_from_init"], np.float64)
    at_start = float(np.interp(np.log(start), np.log(steps), distance))
    return dict(
        cell,
        tail_start_step=float(start),
        velocity_relative_tail_slope=slope,
        velocity_relative_tail_slope_se=error,
        velocity_tail_slope=cosine_slope,
        velocity_tail_slope_se=cosine_error,
        velocity_verdict=velocity_verdict(slope, error or 0.0),
        distance_from_init_tail_start=at_start,
        distance_from_init_growth_last_decade=float(distance[-1] - at_start),
    )


_SERIES = ("velocity", "velocity_relative", "distance_from_init", "alignment",
           "weight_distance_from_init", "ntk_trace", "kernel_regression_test_error",
           "network_test_error")


def aggregate_seeds(cells):
    """One width's series: the mean over seeds, and the verdict from the per-seed tail slopes.

    The tail slope of the relative velocity is fitted per seed (`summarize`);
    the width's slope is their mean with the standard error over seeds
    (std / √S; one seed: that seed's regression standard error), and
    `velocity_verdict` reads it.

    Args:
        cells: seed (str) → the `summarize`d series of one seed (same steps).

    Returns:
        dict with the mean series under the per-seed keys, `seeds` (the
        per-seed cells), the slopes, their standard errors and the verdict.
    """
    ordered = [cells[k] for k in sorted(cells, key=int)]
    first = ordered[0]
    out = {"steps": first["steps"], "epochs": first["epochs"],
           "velocity_dt": first.get("velocity_dt"), "seeds": dict(cells)}
    for key in _SERIES:
        values = np.array([[np.nan if v is None else v for v in c[key]] for c in ordered],
                          np.float64)
        with np.errstate(invalid="ignore"):
            means = np.nanmean(values, axis=0) if np.isfinite(values).any() else values[0]
        out[key] = [None if not np.isfinite(v) else float(v) for v in means]
    out["kernel_regression_test_error_init"] = float(np.mean(
        [c["kernel_regression_test_error_init"] for c in ordered]))
    out["final_train_loss"] = float(np.mean([c["final_train_loss"] for c in ordered]))
    for key in ("velocity_relative_tail_slope", "velocity_tail_slope"):
        slopes = [c[key] for c in ordered if c[key] is not None]
        if not slopes:
            out[key], out[f"{key}_se"] = None, None
            continue
        out[key] = float(np.mean(slopes))
        out[f"{key}_se"] = (float(np.std(slopes, ddof=1) / np.sqrt(len(slopes)))
                            if len(slopes) > 1 else ordered[0][f"{key}_se"])
        out[f"{key}_per_seed"] = [float(v) for v in slopes]
    out["velocity_verdict"] = velocity_verdict(out["velocity_relative_tail_slope"],
                                               out["velocity_relative_tail_slope_se"] or 0.0)
    out["tail_start_step"] = first["tail_start_step"]
    for key in ("distance_from_init_tail_start", "distance_from_init_growth_last_decade"):
        out[key] = float(np.mean([c[key] for c in ordered]))
    out["num_seeds"] = len(ordered)
    return out
