"""Selective classification: risk-coverage curve, AURC, E-AURC, accuracy / risk at a coverage.

Inputs are 1-D: ``confidence`` (higher = more confident = accepted first; for an open-set strategy this is
``-unknown_score``) and ``correct`` (bool: the accepted prediction is right; an unknown sample is never right).
The classifier accepts the samples with confidence ≥ t for a threshold t. Definitions (Geifman & El-Yaniv 2017,
Geifman et al. 2019), with n samples sorted by descending confidence:

* coverage(k) = k/n, risk(k) = E_k / k with E_k the errors among the first k;
* AURC = (1/n) Σ_{k=1..n} risk(k);  E-AURC = AURC − AURC* where AURC* is the AURC of an oracle ordering
  (all correct samples first): with r = the number of errors, AURC* = (1/n) Σ_{k=n−r+1..n} (k − n + r)/k;
* accuracy at coverage c ∈ (0, 1]: 1 − risk(m), m = ⌈c·n⌉ (computed in exact rational arithmetic, so
  c = 0.3 with n = 10 gives m = 3); risk at coverage c = risk(m).

Ties are handled explicitly: a threshold cannot separate samples of equal confidence, so inside a tie group
the order is taken as uniformly random and E_k is its **expectation**: the errors before the group plus
(k − start)·(group errors / group size), i.e. the error count is linearly interpolated across the group.
Every value above is then independent of how the input orders tied samples. The curve
(:func:`risk_coverage_curve`) has one point per distinct confidence (the realisable thresholds), where E_k is
exact. Everything is float64 torch on the input's device; no host loop. Empty input gives NaN.

These are the reference definitions: the ``open_set`` engine reports ``aurc``, ``e_aurc`` and ``acc@cov<c>`` from
its own shared sort (``openworld.metrics.open_set._Curves.selective``), equal to these functions.
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch
from torch import Tensor

__all__ = ["risk_coverage_curve", "aurc", "e_aurc", "accuracy_at_coverage", "risk_at_coverage", "selective_metrics"]

F64 = torch.float64
NAN = float("nan")


def _prep(confidence, correct) -> tuple[Tensor, Tensor]:
    # a Python list is read as float64 directly (as_tensor would round it to float32 first)
    c = confidence if isinstance(confidence, Tensor) else torch.as_tensor(confidence, dtype=F64)
    dev = c.device
    c = c.to(F64).reshape(-1)
    ok = torch.as_tensor(correct, device=dev).reshape(-1)
    if ok.dtype != torch.bool:
        if not bool(((ok == 0) | (ok == 1)).all()):
            raise ValueError("selective: correct must be boolean (or 0/1)")
        ok = ok.bool()
    if ok.numel() != c.numel():
        raise ValueError(f"selective: confidence has {c.numel()} values, correct has {ok.numel()}")
    if not bool(torch.isfinite(c).all()):
        raise ValueError("selective: confidence must be finite (a NaN or ±inf has no place in the order)")
    return c, ok


def _expected_errors(c: Tensor, ok: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """E_k for k = 1..n (float64, tie-averaged), plus the sorted confidences and the group-end mask."""
    order = torch.argsort(c, descending=True, stable=True)
    cs, err = c[order], (~ok[order]).to(F64)
    n = cs.numel()
    is_end = torch.ones(n, dtype=torch.bool, device=c.device)
    is_end[:-1] = cs[:-1] != cs[1:]
    cum = torch.cumsum(err, 0)
    pos = torch.arange(n, device=c.device)
    # group of every position: index of its end (first end at or after it) and of its start
    ends = pos[is_end]
    g = torch.searchsorted(ends, pos)  # position i belongs to group g[i]
    end = ends[g]
    start = torch.cat([ends.new_zeros(1), ends[:-1] + 1])[g]
    before = torch.where(start > 0, cum[(start - 1).clamp(min=0)], torch.zeros_like(cum))
    group_err = cum[end] - before
    size = (end - start + 1).to(F64)
    k_in = (pos - start + 1).to(F64)  # how many of the group are among the first k = pos + 1
    return before + k_in * group_err / size, cs, is_end


def risk_coverage_curve(confidence, correct) -> tuple[Tensor, Tensor, Tensor]:
    """(coverage, risk, threshold), one point per distinct confidence in descending order: accepting
    confidence ≥ threshold covers ``coverage`` of the samples with selective risk ``risk``."""
    c, ok = _prep(confidence, correct)
    if c.numel() == 0:
        e = c.new_zeros(0)
        return e, e, e
    e_k, cs, is_end = _expected_errors(c, ok)
    k = torch.arange(1, c.numel() + 1, device=c.device, dtype=F64)
    return (k / c.numel())[is_end], (e_k / k)[is_end], cs[is_end]


def aurc(confidence, correct) -> float:
    """(1/n) Σ_k risk(k), tie-averaged (module docstring)."""
    c, ok = _prep(confidence, correct)
    if c.numel() == 0:
        return NAN
    e_k, _, _ = _expected_errors(c, ok)
    k = torch.arange(1, c.numel() + 1, device=c.device, dtype=F64)
    return float((e_k / k).mean())


def _oracle_aurc(ok: Tensor) -> Tensor:
    n = ok.numel()
    r = (~ok).sum()
    k = torch.arange(1, n + 1, device=ok.device, dtype=F64)
    return ((k - (n - r)).clamp(min=0) / k).mean()


def e_aurc(confidence, correct) -> float:
    """AURC − AURC* (the excess over an oracle that ranks every correct sample first)."""
    c, ok = _prep(confidence, correct)
    if c.numel() == 0:
        return NAN
    e_k, _, _ = _expected_errors(c, ok)
    k = torch.arange(1, c.numel() + 1, device=c.device, dtype=F64)
    return float((e_k / k).mean() - _oracle_aurc(ok))


def _m_of(coverage: float, n: int) -> int:
    cov = Fraction(str(coverage)) if isinstance(coverage, float) else Fraction(coverage)
    if not 0 < cov <= 1:
        raise ValueError(f"selective: coverage must be in (0, 1], got {coverage}")
    return max(1, math.ceil(cov * n))


def risk_at_coverage(confidence, correct, coverage: float) -> float:
    """risk(⌈c·n⌉), tie-averaged: the expected error rate of the ⌈c·n⌉ most confident samples."""
    c, ok = _prep(confidence, correct)
    if c.numel() == 0:
        return NAN
    m = _m_of(coverage, c.numel())
    e_k, _, _ = _expected_errors(c, ok)
    return float(e_k[m - 1] / m)


def accuracy_at_coverage(confidence, correct, coverage: float) -> float:
    """1 − risk(⌈c·n⌉): selective accuracy when the ⌈c·n⌉ most confident samples are accepted."""
    r = risk_at_coverage(confidence, correct, coverage)
    return 1.0 - r if not math.isnan(r) else NAN


def selective_metrics(confidence, correct, coverages=(0.5, 0.8, 0.9, 0.95)) -> dict[str, float]:
    """AURC, E-AURC and accuracy at each coverage (keys ``acc@cov<c>``), as fractions."""
    c, ok = _prep(confidence, correct)
    out = {"aurc": aurc(c, ok), "e_aurc": e_aurc(c, ok)}
    for cov in coverages:
        out[f"acc@cov{cov:g}"] = accuracy_at_coverage(c, ok, cov)
    return out
