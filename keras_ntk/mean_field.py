"""Mean-field quantities of deep fully connected networks at initialization.

For a deep network with weight variance σw², bias variance σb² and
activation φ (Poole et al. 2016; Schoenholz et al. 2017; Xiao, Pennington and
Schoenholz 2020), the pre-activation variance follows the map
q ↦ σw² E[φ(√q z)²] + σb² to its fixed point q*, and the correlation of two
inputs follows c ↦ (σw² E[φ(u)φ(v)] + σb²)/q* (u, v of variance q* and
correlation c) to its stable fixed point c*. The slopes of that map,

    χ1 = σw² E[φ'(z)²]          (at c = 1),
    χc* = σw² E[φ'(u)φ'(v)]     (at c = c*),

separate the ordered phase (χ1 < 1, c* = 1) from the chaotic phase
(χ1 > 1, c* < 1) and set the depth scales of the infinite-width NTK:

    ξ1 = −1/log χ1                 (ordered: κ(Θ) grows like 1/(l χ1^l),
                                    trainability is lost after a few ξ1),
    ξ* = −1/(log χc* − log χ1)     (chaotic: the mean predictor P(Θ)Y falls
                                    like l (χc*/χ1)^l, generalization is lost
                                    after a few ξ*).

Both diverge on the critical line χ1 = 1. ReLU has no chaotic phase:
χ1 = σw²/2 and q* is infinite for σw² ≥ 2.

The functions take plain floats and return floats; they are cheap (at most
a few thousand scalar iterations).
"""

import math
import numbers

ACTIVATIONS = ("relu", "erf")


def _check(activation, sigma_w2, sigma_b2):
    if activation not in ACTIVATIONS:
        raise ValueError(
            f"Expected `activation` 'relu' or 'erf'. Received: activation={activation!r}"
        )
    for name, value in (("sigma_w2", sigma_w2), ("sigma_b2", sigma_b2)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (
                math.isfinite(value) and value >= 0):
            raise ValueError(
                f"Expected `{name}` to be a finite non-negative float. Received: {name}={value!r}"
            )


def _second_moment(activation, q):
    """E[φ(z)²] for z ~ N(0, q)."""
    if activation == "relu":
        return q / 2.0
    return 2.0 / math.pi * math.asin(2.0 * q / (1.0 + 2.0 * q))


def q_star(activation, sigma_w2, sigma_b2, *, tol=1e-13, max_iterations=100000):
    """Fixed point q* of the variance map q ↦ σw² E[φ(√q z)²] + σb².

    q* is the pre-activation variance of a very deep network at
    initialization. ReLU: q* = σb²/(1 − σw²/2) for σw² < 2; for σw² ≥ 2 the
    variance grows with depth (returns inf). Erf: iteration from q = 1.

    Args:
        activation: "relu" or "erf".
        sigma_w2: σw², the weight variance.
        sigma_b2: σb², the bias variance.
        tol: absolute tolerance of the iteration (Erf).
        max_iterations: iteration limit (Erf).

    Returns:
        q* as a float (`inf` when the variance diverges).

    Example:

    ```python
    keras_ntk.mean_field.q_star("relu", 1.5, 0.05)  # 0.2
    ```
    """
    _check(activation, sigma_w2, sigma_b2)
    if activation == "relu":
        return sigma_b2 / (1.0 - sigma_w2 / 2.0) if sigma_w2 < 2.0 else math.inf
    q = 1.0
    for _ in range(max_iterations):
        new = sigma_w2 * _second_moment("erf", q) + sigma_b2
        if abs(new - q) < tol:
            return new
        q = new
    return q


def correlation_map(activation, sigma_w2, sigma_b2, c):
    """One layer of the correlation map at q = q*: c ↦ (σw² E[φ(u)φ(v)] + σb²)/q*.

    Args:
        activation: "relu" or "erf".
        sigma_w2, sigma_b2: σw², σb².
        c: the correlation of the two inputs' pre-activations, in [−1, 1].

    Returns:
        The correlation one layer deeper (nan where q* is infinite).
    """
    q = q_star(activation, sigma_w2, sigma_b2)
    if q == math.inf:
        return math.nan
    return _correlation_map(activation, sigma_w2, sigma_b2, q, c)


def _correlation_map(activation, sigma_w2, sigma_b2, q, c):
    if activation == "relu":
        theta = math.acos(max(-1.0, min(1.0, c)))
        expectation = q / (2 * math.pi) * (math.sin(theta) + (math.pi - theta) * c)
    else:
        expectation = 2.0 / math.pi * math.asin(2.0 * q * c / (1.0 + 2.0 * q))
    return (sigma_w2 * expectation + sigma_b2) / q


def chi1(activation, sigma_w2, sigma_b2):
    """χ1 = σw² E[φ'(z)²], z ~ N(0, q*): the order (< 1) / chaos (> 1) parameter.

    ReLU: χ1 = σw²/2. Erf: χ1 = σw² · 4/(π √(1 + 4 q*)).

    Args:
        activation: "relu" or "erf".
        sigma_w2, sigma_b2: σw², σb².

    Returns:
        χ1 as a float.

    Example:

    ```python
    keras_ntk.mean_field.chi1("relu", 2.0, 0.05)  # 1.0: the critical line
    ```
    """
    _check(activation, sigma_w2, sigma_b2)
    if activation == "relu":
        return sigma_w2 / 2.0
    q = q_star(activation, sigma_w2, sigma_b2)
    return sigma_w2 * 4.0 / (math.pi * math.sqrt(1.0 + 4.0 * q))


def c_star(activation, sigma_w2, sigma_b2, *, tol=1e-13, max_iterations=100000):
    """Stable fixed point c* of the correlation map at q = q*.

    Ordered phase (χ1 ≤ 1): c* = 1, all inputs become perfectly correlated
    with depth. Chaotic phase (χ1 > 1): c* < 1, found by iterating the map
    from c = 0.

    Args:
        activation: "relu" or "erf".
        sigma_w2, sigma_b2: σw², σb².
        tol: absolute tolerance of the iteration.
        max_iterations: iteration limit.

    Returns:
        c* as a float (nan where q* is infinite).

    Example:

    ```python
    keras_ntk.mean_field.c_star("erf", 4.0, 0.05)  # < 1: chaotic
    ```
    """
    q = q_star(activation, sigma_w2, sigma_b2)
    if q == math.inf:
        return math.nan
    if chi1(activation, sigma_w2, sigma_b2) <= 1.0:
        return 1.0
    c = 0.0
    for _ in range(max_iterations):
        new = _correlation_map(activation, sigma_w2, sigma_b2, q, c)
        if abs(new - c) < tol:
            return new
        c = new
    return c


def chi_c_star(activation, sigma_w2, sigma_b2):
    """χc* = σw² E[φ'(u)φ'(v)] at (q*, c*): the slope of the correlation map at c*.

    Equal to χ1 in the ordered phase (c* = 1), below it in the chaotic phase.
    ξc* = −1/log χc* is the depth over which the correlation of two inputs
    approaches c*.

    Args:
        activation: "relu" or "erf".
        sigma_w2, sigma_b2: σw², σb².

    Returns:
        χc* as a float (nan where q* is infinite).

    Example:

    ```python
    keras_ntk.mean_field.chi_c_star("erf", 4.0, 0.05)
    ```
    """
    q = q_star(activation, sigma_w2, sigma_b2)
    c = c_star(activation, sigma_w2, sigma_b2)
    if math.isnan(c):
        return math.nan
    if activation == "relu":
        theta = math.acos(max(-1.0, min(1.0, c)))
        return sigma_w2 * (math.pi - theta) / (2 * math.pi)
    d = (1.0 + 2.0 * q) ** 2 - 4.0 * (q * c) ** 2
    return sigma_w2 * 4.0 / math.pi / math.sqrt(d)


def xi_1(activation, sigma_w2, sigma_b2):
    """ξ1 = −1/log χ1: the depth scale of trainability in the ordered phase.

    Args:
        activation: "relu" or "erf".
        sigma_w2, sigma_b2: σw², σb².

    Returns:
        ξ1 for χ1 < 1; inf for χ1 ≥ 1 (no such loss of trainability).

    Example:

    ```python
    keras_ntk.mean_field.xi_1("relu", 1.0, 0.05)  # 1/log 2
    ```
    """
    chi = chi1(activation, sigma_w2, sigma_b2)
    if chi >= 1.0:
        return math.inf
    if chi <= 0.0:
        return 0.0
    return -1.0 / math.log(chi)


def xi_star(activation, sigma_w2, sigma_b2):
    """ξ* = −1/(log χc* − log χ1): the depth scale of generalization in the chaotic phase.

    The mean predictor P(Θ)Y of the infinite NTK decays like l (χc*/χ1)^l
    (Xiao et al. 2020, and neural-tangents' notebook for the paper), so its
    data dependence is lost after a few ξ*. −1/log χc* alone (the depth
    scale of the correlation map) is a different, longer scale.

    Args:
        activation: "relu" or "erf".
        sigma_w2, sigma_b2: σw², σb².

    Returns:
        ξ* for χ1 > 1; inf in the ordered phase and on the critical line
        (the mean predictor stays data dependent); nan where q* is infinite.

    Example:

    ```python
    keras_ntk.mean_field.xi_star("erf", 3.0, 0.05)  # about 2.2
    ```
    """
    chi = chi1(activation, sigma_w2, sigma_b2)
    chi_c = chi_c_star(activation, sigma_w2, sigma_b2)
    if math.isnan(chi_c):
        return math.nan
    if chi <= 1.0 or chi_c >= chi:
        return math.inf
    return -1.0 / (math.log(chi_c) - math.log(chi))


def xi_c_star(activation, sigma_w2, sigma_b2):
    """ξc* = −1/log χc*: the depth over which correlations approach c*.

    Returns:
        ξc* for χc* < 1; inf otherwise; nan where q* is infinite.
    """
    chi_c = chi_c_star(activation, sigma_w2, sigma_b2)
    if math.isnan(chi_c):
        return math.nan
    if chi_c >= 1.0:
        return math.inf
    return -1.0 / math.log(chi_c)


def critical_sigma_w2(activation, sigma_b2, *, tol=1e-12):
    """σw² on the order-to-chaos line χ1 = 1 at a given σb².

    ReLU: 2 (for every σb²). Erf: found by bisection (χ1 grows with σw²).

    Args:
        activation: "relu" or "erf".
        sigma_b2: σb².
        tol: width of the final bisection interval.

    Returns:
        The critical σw² as a float.

    Example:

    ```python
    keras_ntk.mean_field.critical_sigma_w2("erf", 0.18)  # about 1.76
    ```
    """
    _check(activation, 1.0, sigma_b2)
    if activation == "relu":
        return 2.0
    low, high = 1e-6, 1.0
    while chi1(activation, high, sigma_b2) < 1.0:
        low, high = high, 2.0 * high
    while high - low > tol:
        middle = 0.5 * (low + high)
        if chi1(activation, middle, sigma_b2) < 1.0:
            low = middle
        else:
            high = middle
    return 0.5 * (low + high)
