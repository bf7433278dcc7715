"""SCAFFOLD's control-variate rules (Karimireddy et al., ICML 2020), in NumPy: the one definition
the site (:mod:`dicomfl.client.scaffold`) and the coordinator (:mod:`dicomfl.server.scaffold`) use.

Notation of the paper (Algorithm 1): ``x`` the global model sent in a round, ``y_i`` site i's
model after ``K`` local SGD steps with learning rate ``eta_l``, ``c`` the server control, ``c_i``
site i's control, ``N`` the number of sites, ``S`` the sites whose updates were aggregated.

* local step: ``y <- y - eta_l * (g_i(y) - c_i + c)``
  (:func:`dicomfl.common.train.train_local` with ``TrainSettings.correction = c - c_i``);
* site control, option II: ``c_i+ = c_i - c + (x - y_i) / (K * eta_l)``
  (:func:`client_control_update`); the site sends ``delta_c_i = c_i+ - c_i``;
* server: ``x <- x + eta_g * mean(y_i - x)`` and ``c <- c + |S|/N * mean(delta_c_i)``
  (:func:`server_model_update`, :func:`server_control_update`).

``delta_c_i + c = (x - y_i) / (K * eta_l)``: the control delta is the site's model update scaled
by one positive number. :func:`control_consistency` measures how far a reply is from that form,
so the coordinator can check that a site's delta carries nothing but its update and that scalar.
Arrays are computed in float64 and returned in the reference's dtype.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

Arrays = Mapping[str, np.ndarray]


def zeros_like(reference: Arrays) -> dict[str, np.ndarray]:
    """A control variate of zeros with the reference's names, shapes and dtypes."""
    return {k: np.zeros_like(np.asarray(v)) for k, v in reference.items()}


def _f64(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


def client_control_delta(c_i: Arrays, c: Arrays, x: Arrays, y: Arrays, steps: int, lr: float) -> dict[str, np.ndarray]:
    """``delta_c_i = c_i+ - c_i = (x - y) / (K * lr) - c`` (option II), in ``x``'s dtypes.

    Raises
    ------
    ValueError
        ``steps < 1`` or ``lr <= 0`` (the update is undefined).
    """
    if steps < 1 or not lr > 0:
        raise ValueError("SCAFFOLD's control update needs K >= 1 local steps and a positive learning rate")
    scale = 1.0 / (float(steps) * float(lr))
    return {k: ((_f64(x[k]) - _f64(y[k])) * scale - _f64(c[k])).astype(np.asarray(x[k]).dtype) for k in x}


def client_control_update(c_i: Arrays, c: Arrays, x: Arrays, y: Arrays, steps: int,
                          lr: float) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """``(c_i+, delta_c_i)``: ``c_i+ = c_i - c + (x - y) / (K * lr)`` and ``delta_c_i = c_i+ - c_i``.

    ``c_i+`` is ``c_i + delta_c_i`` with the delta as sent, so the site's stored control and the
    coordinator's sum of deltas agree to the bit.
    """
    delta = client_control_delta(c_i, c, x, y, steps, lr)
    new = {k: (_f64(c_i[k]) + _f64(delta[k])).astype(np.asarray(x[k]).dtype) for k in x}
    return new, delta


def server_model_update(x: Arrays, mean_y: Arrays, eta_g: float) -> dict[str, np.ndarray]:
    """``x + eta_g * (mean_y - x)``, where ``mean_y`` is the (weighted) mean of the sites' models."""
    return {k: (_f64(x[k]) + float(eta_g) * (_f64(mean_y[k]) - _f64(x[k]))).astype(np.asarray(x[k]).dtype) for k in x}


def server_control_update(c: Arrays, deltas: Sequence[Arrays], n_sites: int) -> dict[str, np.ndarray]:
    """``c + |S|/N * mean(delta_c_i)`` = ``c + sum(delta_c_i) / N`` (unweighted, as in the paper,
    so that ``c`` stays the mean of the sites' controls).

    Raises
    ------
    ValueError
        ``n_sites`` smaller than the number of deltas (|S| <= N).
    """
    if n_sites < max(1, len(deltas)):
        raise ValueError(f"{len(deltas)} control deltas from at most {n_sites} sites")
    if not deltas:
        return {k: np.array(v, copy=True) for k, v in c.items()}
    return {k: (_f64(c[k]) + sum(_f64(d[k]) for d in deltas) / float(n_sites)).astype(np.asarray(c[k]).dtype)
            for k in c}


def control_consistency(delta: Arrays, c: Arrays, x: Arrays, y: Arrays) -> tuple[float, float]:
    """How well ``delta + c`` fits ``s * (x - y)`` for one number ``s``.

    Returns
    -------
    (s, residual) : (float, float)
        The least-squares ``s`` and ``||delta + c - s (x - y)|| / max(||delta + c||, tiny)``.
        An honest site gives ``s = 1 / (K * eta_l) > 0`` and a residual at float32 rounding
        (about 1e-6). With ``x == y`` the residual is ``||delta + c||`` itself (nothing moved,
        so the delta must be ``-c``).
    """
    uu = vu = vv = 0.0
    for k in x:
        u = _f64(x[k]) - _f64(y[k])
        v = _f64(delta[k]) + _f64(c[k])
        uu += float(np.sum(u * u))
        vu += float(np.sum(v * u))
        vv += float(np.sum(v * v))
    if uu == 0.0:
        return 0.0, math.sqrt(vv)
    s = vu / uu
    res2 = 0.0  # a second pass: vv - 2 s vu + s^2 uu would cancel catastrophically
    for k in x:
        r = _f64(delta[k]) + _f64(c[k]) - s * (_f64(x[k]) - _f64(y[k]))
        res2 += float(np.sum(r * r))
    return s, math.sqrt(res2) / max(math.sqrt(vv), 1e-30)
