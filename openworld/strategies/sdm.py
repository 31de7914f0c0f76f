"""SDM: Similarity-Distance-Magnitude activation, calibration and selective classification (issue 16, item 2).

Schmaltz, "Similarity-Distance-Magnitude Universal Verification" (2025; official code ReexpressAI/sdm,
``research_code/code/sdm_model.py``). Card: ``docs/methods/sdm.md``. Here the SDM activation is put over a
trained network's final layer: the exemplar vector is the penultimate feature f, the magnitude is the
logit vector z = head(f), the support set is the labelled source training data and the calibration set is
the held-out source validation split (``session.validation``). Everything is a
:class:`~openworld.strategies.detectors.DetectorStrategy` (``sdm``), usable wherever ``unknown_score`` is.

For a point with prediction ŷ = argmax z (float32, as the official code):

* Similarity q: the number of its nearest support points, in order of squared L2 distance (faiss
  ``IndexFlatL2``), that are *correctly predicted and predicted ŷ* before the first one that is not; at most
  ``k`` (official ``maxQAvailableFromIndexer`` = 1000). Computed as the count of such points strictly closer
  than the nearest other support point (a point tied with it counts as after it).
* Distance: d₀ = the squared L2 distance to the nearest support point; per true class c, the sorted d₀ of the
  calibration points of class c with q > 0 form an empirical CDF, and
  d = min_c (1 − #{d₀' < d₀ in class c}/n_c) (a class without such points contributes 0).
* Magnitude and the activation: sdm(z)_c = (2+q)^{d·(z_c − max z)} / Σ_j (2+q)^{d·(z_j − max z)}
  (:func:`sdm_activation`; q = e − 2 gives the softmax).
* Calibration (on the labelled calibration split): per true class c the sorted sdm(z)_c of its calibration
  points form the output CDF; u_c = #{v' < sdm_c}/n_c (1 if sdm_c ≥ the largest, 0 for an empty class);
  q' = 0 if argmax sdm ≠ ŷ else q; the soft q bin b = log((2+q')^{u_ŷ}); the rescaled output
  p = (2+b)^{x − max x} / Σ with x = u·Wᵀ and W the K×K rescaler (no bias) trained on the calibration split
  with the official loss, the mean NLL of log_{2+b} p_y (``rescaler: trained``; ``identity`` takes W = I).
  A point is OOD if ⌊b⌋ ≤ 0 or argmax p ≠ ŷ. Over the non-OOD calibration points, the smallest candidate bin
  b* (ascending over their bins) such that for every class c the ⌊0.05·n⌋-th smallest p_c among class-c
  points with b ≥ b* is ≥ α (= 0.95) gives b* and the per-class thresholds t_c (official
  ``calculateOutputThresholdsAdaptive``).
* Selective decision ("index-conditional", official ``_process_rescaled_output`` without DKW bounds): a test
  point is accepted iff it is not OOD (argmax p compared with argmax sdm, as the official test path), b ≥ b*,
  a b* was found, and {c : p_c ≥ t_c} = {ŷ}.

Known-ness score s (``score``): ``region`` (default) = 2·[accepted] + p_ŷ, so accepted points rank above every
rejected one and, within each group, by p_ŷ; the default ``threshold: sdm_region`` puts τ = 2, i.e. exactly
the SDM decision. ``calibrated`` = p_ŷ, ``sdm`` = sdm(z)_ŷ (Eq. 7 alone, before calibration), ``qbin`` = b.
Any threshold rule of the detector wrapper works with any score.

Not implemented (raise or documented): the official model trains its own 1-D-CNN exemplar layer with the SDM
loss (we use the frozen network as it is); the official rescaler is trained by Adam with batch size 1, lr 1e-4,
≤ 1000 epochs with early stopping from a random init — here full-batch Adam (lr 1e-2, 500 steps) from W = I,
keeping the W of the lowest loss (deterministic, no per-sample loop); the DKW lower/upper estimates and the
iterated (J-fold) robust statistics; the generative-AI variants.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from openworld.data.views import batches
from openworld.strategies.detectors import DetectorStrategy, _detector

Q_OFFSET = 2.0  # official ``constants.q_rescale_offset``
SDM_REGION_TAU = 2.0
SCORES = ("region", "calibrated", "sdm", "qbin")
F32 = torch.float32


# --------------------------------------------------------------------------------------------------
# pure functions (tensors in, tensors out; float32 like the official code, whose saturation to exactly
# 1.0 defines the ties of the output CDF)
# --------------------------------------------------------------------------------------------------
def sdm_activation(logits: Tensor, q: Tensor, d: Tensor | None = None, log: bool = False) -> Tensor:
    """(2+q)^{d·(z − max z)} normalised over classes; ``log``: its log base (2+q), with the official ε inside
    both logs. ``q``, ``d``: [B] (one value per row). float32."""
    z = logits.to(F32)
    z = z - z.amax(dim=1, keepdim=True)
    base = Q_OFFSET + q.to(F32).reshape(-1, 1)
    e = z * d.to(F32).reshape(-1, 1) if d is not None else z
    p = base**e
    if log:
        eps = torch.finfo(F32).eps
        return (torch.log(p + eps) - torch.log(p.sum(1) + eps).unsqueeze(1)) / torch.log(base)
    return p / p.sum(1, keepdim=True)


def pairwise_sq_dist(a: Tensor, b: Tensor) -> Tensor:
    """Squared L2 distances [len(a), len(b)], float64 (what faiss ``IndexFlatL2`` returns, computed exactly)."""
    a, b = a.to(torch.float64), b.to(torch.float64)
    return ((a * a).sum(1, keepdim=True) + (b * b).sum(1)[None, :] - 2.0 * (a @ b.T)).clamp_min_(0.0)


def sdm_similarity(d2: Tensor, pred: Tensor, support_labels: Tensor, support_pred: Tensor, k: int) -> Tensor:
    """q: leading run of nearest support points with label = prediction = ``pred``, capped at ``k`` ([B] int64).
    ``d2``: [B, N] distances to the support set."""
    good = (support_labels == support_pred)[None, :] & (support_pred[None, :] == pred[:, None])
    first_bad = torch.where(good, torch.full_like(d2, math.inf), d2).amin(dim=1, keepdim=True)
    return ((d2 < first_bad) & good).sum(1).clamp(max=int(k))


def class_tables(values: Tensor, labels: Tensor, num_classes: int, keep: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Per-class sorted values as a [K, M] table padded with +inf, and the counts [K]."""
    v = values.reshape(-1)
    lab = labels.reshape(-1).long()
    if keep is not None:
        v, lab = v[keep], lab[keep]
    counts = torch.bincount(lab, minlength=num_classes)[:num_classes]
    m = max(int(counts.max()) if counts.numel() else 0, 1)
    order = torch.argsort(v, stable=True)  # by value, then a stable split by class keeps each class sorted
    order = order[torch.argsort(lab[order], stable=True)]
    vs, ls = v[order], lab[order]
    starts = torch.cumsum(counts, 0) - counts
    col = torch.arange(len(vs), device=v.device) - starts[ls]
    table = torch.full((num_classes, m), math.inf, dtype=v.dtype, device=v.device)
    table[ls, col] = vs
    return table, counts


def cdf_below(table: Tensor, counts: Tensor, values: Tensor) -> Tensor:
    """#{table_c < v}/n_c for ``values`` [K, B] (row c looked up in class c's table); 0 for an empty class."""
    idx = torch.searchsorted(table.contiguous(), values.to(table.dtype).contiguous(), side="left")
    n = counts.to(torch.float64)[:, None]
    return torch.where(n > 0, idx.to(torch.float64) / n.clamp(min=1), torch.zeros_like(n))


def distance_quantile(d0: Tensor, table: Tensor, counts: Tensor) -> Tensor:
    """d = min over classes of 1 − CDF_c(d₀) (official ``get_distance_quantiles``, min across classes), [B]."""
    k = table.shape[0]
    below = cdf_below(table, counts, d0.reshape(1, -1).expand(k, -1))
    rev = torch.where(counts[:, None] > 0, 1.0 - below, torch.zeros_like(below))
    return rev.amin(dim=0).to(F32)


def output_quantiles(sdm: Tensor, table: Tensor, counts: Tensor) -> Tensor:
    """u [B, K]: CDF of each class's calibration outputs at sdm_c, 1 at or above the largest (the official
    saturation guard), 0 for an empty class. float32."""
    vals = sdm.to(table.dtype).T.contiguous()
    u = cdf_below(table, counts, vals)
    last = table.gather(1, (counts - 1).clamp(min=0)[:, None])
    u = torch.where((counts[:, None] > 0) & (vals >= last), torch.ones_like(u), u)
    return u.T.to(F32)


def soft_qbin(u_pred: Tensor, q_prime: Tensor) -> Tensor:
    """b = log((2+q')^{u_ŷ}), float32 as the official code."""
    return torch.log((Q_OFFSET + q_prime.to(F32)) ** u_pred.to(F32))


def rescaled_output(u: Tensor, qbin: Tensor, weight: Tensor | None = None) -> Tensor:
    """p = SDM activation of the rescaler's output u·Wᵀ (W = identity if None) with q = b, no distance factor."""
    x = u.to(F32) if weight is None else u.to(F32) @ weight.to(F32).T
    return sdm_activation(x, qbin)


def train_rescaler(u: Tensor, qbin: Tensor, labels: Tensor, steps: int = 500, lr: float = 1e-2) -> Tensor:
    """W [K, K] (no bias) minimising the mean NLL of log_{2+b} p on the calibration split (the official loss),
    full-batch Adam from W = I; the W of the lowest loss is kept. Deterministic."""
    k = u.shape[1]
    w = torch.eye(k, dtype=F32, device=u.device, requires_grad=True)
    opt = torch.optim.Adam([w], lr=lr, betas=(0.9, 0.999), eps=1e-8)
    best = torch.tensor(math.inf, device=u.device)
    best_w = w.detach().clone()
    y = labels.long()
    with torch.enable_grad():
        for _ in range(int(steps)):
            opt.zero_grad()
            loss = torch.nn.functional.nll_loss(sdm_activation(u.to(F32) @ w.T, qbin, log=True), y)
            loss.backward()
            better = loss.detach() < best  # kept on the device: no host read per step
            best = torch.where(better, loss.detach(), best)
            best_w = torch.where(better, w.detach(), best_w)
            opt.step()
    return best_w


def region_thresholds(p_true: Tensor, qbin: Tensor, labels: Tensor, ok: Tensor, num_classes: int, alpha: float,
                      chunk: int = 256) -> tuple[float, Tensor, bool]:
    """(b*, t [K], found) from the non-OOD (``ok``) calibration points: the smallest candidate bin (ascending
    over their bins) at which every class's ⌊(1−α)·n⌋-th smallest p_true among its points with bin ≥ b* is
    ≥ α (official ``calculateOutputThresholdsAdaptive``). Not found: (inf, zeros, False)."""
    dev = p_true.device
    p, b, y = p_true[ok].to(torch.float64), qbin[ok].to(torch.float64), labels[ok].long()
    none = (math.inf, torch.zeros(num_classes, dtype=torch.float64, device=dev), False)
    if p.numel() == 0:
        return none
    cands = torch.unique(b)  # ascending
    frac = 1.0 - float(alpha)
    for s in range(0, len(cands), chunk):  # blocks of candidates, each block fully vectorised
        c = cands[s : s + chunk]
        inside = b[None, :] >= c[:, None]  # [C, N]
        thr = torch.zeros(len(c), num_classes, dtype=torch.float64, device=dev)
        for cls in range(num_classes):  # one vector op per class
            sel = y == cls
            if not bool(sel.any()):
                continue
            vals = torch.where(inside[:, sel], p[sel][None, :], torch.tensor(math.inf, dtype=p.dtype, device=dev))
            n = inside[:, sel].sum(1)
            srt = vals.sort(dim=1).values
            idx = torch.minimum((frac * n.to(torch.float64)).floor().long(), (n - 1).clamp(min=0))
            q = srt.gather(1, idx[:, None]).squeeze(1)
            thr[:, cls] = torch.where(n > 0, q.clamp(min=0.0), torch.zeros_like(q))
        good = (thr >= float(alpha)).all(dim=1)
        if bool(good.any()):
            i = int(good.nonzero()[0])
            return float(c[i]), thr[i], True
    return none


def sdm_fit(support_feats: Tensor, support_labels: Tensor, support_logits: Tensor, cal_feats: Tensor,
            cal_logits: Tensor, cal_labels: Tensor, num_classes: int, k: int = 1000, alpha: float = 0.95,
            rescaler: str | Tensor = "trained", rescaler_steps: int = 500, rescaler_lr: float = 1e-2) -> dict:
    """The SDM statistics: support (features, labels, predictions), the distance and output CDFs of the
    calibration split, the rescaler W (``trained``, ``identity`` or a given [K, K] tensor) and the selective
    region (b*, t). Also returns the calibration intermediates."""
    s_pred = support_logits.to(F32).argmax(1)
    y = cal_labels.long()
    z = cal_logits.to(F32)
    pred = z.argmax(1)
    d2 = pairwise_sq_dist(cal_feats, support_feats)
    q = sdm_similarity(d2, pred, support_labels.long(), s_pred, k)
    d0 = d2.amin(1)
    d_table, d_counts = class_tables(d0, y, num_classes, keep=q > 0)
    d = distance_quantile(d0, d_table, d_counts)
    sdm = sdm_activation(z, q, d)
    q_prime = torch.where(sdm.argmax(1) != pred, torch.zeros_like(q), q)
    o_table, o_counts = class_tables(sdm.gather(1, y[:, None]).squeeze(1), y, num_classes)
    u = output_quantiles(sdm, o_table, o_counts)
    b = soft_qbin(u.gather(1, pred[:, None]).squeeze(1), q_prime)
    if isinstance(rescaler, Tensor):
        w = rescaler.to(F32)
    elif rescaler == "identity":
        w = torch.eye(num_classes, dtype=F32, device=u.device)
    else:
        w = train_rescaler(u, b, y, rescaler_steps, rescaler_lr)
    p = rescaled_output(u, b, w)
    ood = (b.floor() <= 0) | (p.argmax(1) != pred)  # calibration compares with the logit prediction
    b_star, thr, found = region_thresholds(p.gather(1, y[:, None]).squeeze(1), b, y, ~ood, num_classes, alpha)
    return {
        "support_feats": support_feats.detach().to(F32),
        "support_labels": support_labels.long(),
        "support_pred": s_pred,
        "d_table": d_table,
        "d_counts": d_counts,
        "o_table": o_table,
        "o_counts": o_counts,
        "weight": w,
        "b_star": b_star,
        "thresholds": thr,
        "found": found,
        "k": int(k),
        "calibration": {"q": q, "d0": d0, "d": d, "sdm": sdm, "u": u, "qbin": b, "rescaled": p, "ood": ood},
    }


def sdm_predict(stats: dict, feats: Tensor, logits: Tensor) -> dict[str, Tensor]:
    """q, d₀, d, sdm, u, b, p and the selective decision ``accepted`` for test points (module docstring)."""
    z = logits.to(F32)
    pred = z.argmax(1)
    d2 = pairwise_sq_dist(feats, stats["support_feats"])
    q = sdm_similarity(d2, pred, stats["support_labels"], stats["support_pred"], stats["k"])
    d0 = d2.amin(1)
    d = distance_quantile(d0, stats["d_table"], stats["d_counts"])
    sdm = sdm_activation(z, q, d)
    sdm_pred = sdm.argmax(1)
    q_prime = torch.where(sdm_pred != pred, torch.zeros_like(q), q)
    u = output_quantiles(sdm, stats["o_table"], stats["o_counts"])
    b = soft_qbin(u.gather(1, pred[:, None]).squeeze(1), q_prime)
    p = rescaled_output(u, b, stats["weight"])
    flipped = p.argmax(1) != sdm_pred  # the test path compares with the sdm prediction
    b = torch.where(flipped, torch.zeros_like(b), b)
    ood = flipped | (b.floor() <= 0)
    p = p.clone()
    p_pred = p.gather(1, pred[:, None]).clamp(0.0, 1.0)
    p.scatter_(1, pred[:, None], p_pred)
    in_set = p.to(torch.float64) >= stats["thresholds"].to(p.device)[None, :]
    singleton = (in_set.sum(1) == 1) & in_set.gather(1, pred[:, None]).squeeze(1)
    accepted = (~ood) & (b.to(torch.float64) >= stats["b_star"]) & singleton & bool(stats["found"])
    return {"q": q, "d0": d0, "d": d, "sdm": sdm, "u": u, "qbin": b, "rescaled": p, "ood": ood,
            "accepted": accepted, "pred": pred}


def known_score(out: dict[str, Tensor], score: str) -> Tensor:
    """The known-ness s (higher = known) for ``score`` (module docstring), float64."""
    pred = out["pred"][:, None]
    p_pred = out["rescaled"].gather(1, pred).squeeze(1).to(torch.float64)
    if score == "region":
        return 2.0 * out["accepted"].to(torch.float64) + p_pred
    if score == "calibrated":
        return p_pred
    if score == "sdm":
        return out["sdm"].gather(1, pred).squeeze(1).to(torch.float64)
    if score == "qbin":
        return out["qbin"].to(torch.float64)
    raise ValueError(f"sdm: score must be one of {', '.join(SCORES)}, got {score!r}")


# --------------------------------------------------------------------------------------------------
# the strategy
# --------------------------------------------------------------------------------------------------
@_detector("sdm")
class SDM(DetectorStrategy):
    """SDM activation + calibration + selective region over the wrapped classifier (module docstring).
    Support = the source training data, calibration = the source validation split (required).
    ``k`` (1000): the largest q; ``alpha`` (0.95): the class-conditional target of the region;
    ``score``: ``region`` | ``calibrated`` | ``sdm`` | ``qbin``; ``threshold: sdm_region`` (default) = the
    SDM decision (τ = 2 on the ``region`` score); other rules as for every detector. ``rescaler``:
    ``trained`` (full-batch Adam, ``rescaler_steps``, ``rescaler_lr``) or ``identity``."""

    uses_features = True

    def __init__(
        self,
        base: str | None = None,
        base_params: dict | None = None,
        temperature: float = 1.0,
        threshold: Literal[
            "sdm_region", "source_quantile", "fixed", "target_otsu", "target_gmm", "ros_mean", "reject_count"
        ] = "sdm_region",
        quantile: float = 0.05,
        tau: float | None = None,
        n_r: int | None = None,
        alignment: Literal["none", "adabn"] = "none",
        head: Literal["cosine", "linear"] = "linear",
        k: int = 1000,
        alpha: float = 0.95,
        score: Literal["region", "calibrated", "sdm", "qbin"] = "region",
        rescaler: Literal["trained", "identity"] = "trained",
        rescaler_steps: int = 500,
        rescaler_lr: float = 1e-2,
    ):
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"sdm: k must be a positive integer, got {k!r}")
        if not 0 < float(alpha) < 1:
            raise ValueError(f"sdm: alpha must be in (0, 1), got {alpha}")
        if score not in SCORES:
            raise ValueError(f"sdm: score must be one of {', '.join(SCORES)}, got {score!r}")
        if rescaler not in ("trained", "identity"):
            raise ValueError(f"sdm: rescaler must be 'trained' or 'identity', got {rescaler!r}")
        if isinstance(rescaler_steps, bool) or not isinstance(rescaler_steps, int) or rescaler_steps < 1:
            raise ValueError(f"sdm: rescaler_steps must be a positive integer, got {rescaler_steps!r}")
        if threshold == "sdm_region" and score != "region":
            raise ValueError(f"sdm: threshold 'sdm_region' is the SDM decision on score 'region', not {score!r}")
        self.k, self.alpha, self.score, self.rescaler = k, alpha, score, rescaler
        self.rescaler_steps, self.rescaler_lr = rescaler_steps, rescaler_lr
        self._region = threshold == "sdm_region"
        # the wrapper's rules see a fixed τ = 2 for the SDM decision
        super().__init__(base, base_params, temperature, "fixed" if self._region else threshold, quantile,
                         SDM_REGION_TAU if self._region else tau, n_r, alignment, head)

    def get_params(self) -> dict:
        params = super().get_params()
        if self._region:
            params.update(threshold="sdm_region", tau=None)
        return params

    def tau_rule(self) -> str:
        if self._region:
            return "sdm_region: the SDM index-conditional decision (τ = 2 on s = 2·[accepted] + p̂)"
        return super().tau_rule()

    @torch.no_grad()
    def _feats_logits(self, data, with_labels: bool = True):
        fs, zs, ys = [], [], []
        for xb, yb in batches(data, self.ctx.eval_batch_size, device=self.ctx.device, num_workers=self.ctx.num_workers):
            fs.append(self._features(xb))
            zs.append(self._logits(xb))
            ys.append(yb)
        return torch.cat(fs), torch.cat(zs), torch.cat(ys)

    def _fit(self, data, classes) -> None:
        if self._validation is None or len(self._validation) == 0:
            raise ValueError("sdm: needs a labelled calibration split (session.validation, the source validation)")
        sf, sz, sy = self._feats_logits(data)
        cf, cz, cy = self._feats_logits(self._validation)
        self.stats = sdm_fit(sf, sy.to(sf.device), sz, cf, cz, cy.to(cf.device), len(classes), self.k, self.alpha,
                             self.rescaler, self.rescaler_steps, self.rescaler_lr)
        cal = self.stats.pop("calibration")
        self.info_.update(
            sdm_k=self.k,
            sdm_alpha=float(self.alpha),
            sdm_region_found=bool(self.stats["found"]),
            sdm_min_qbin=float(self.stats["b_star"]) if self.stats["found"] else None,
            sdm_cal_ood_fraction=float(cal["ood"].float().mean()),
            sdm_support_size=len(sf),
            sdm_calibration_size=len(cf),
        )

    def _score(self, x: Tensor) -> Tensor:
        return known_score(sdm_predict(self.stats, self._features(x), self._logits(x)), self.score)

    def _learn_episode(self, session) -> None:
        raise ValueError("sdm: DA-FSOS episodes are not supported (no labelled calibration split of their classes)")

    def _detector_state(self) -> dict:
        return {"stats": self.stats}

    def _load_detector_state(self, state: dict) -> None:
        dev = self.ctx.device
        self.stats = {k: v.to(dev) if isinstance(v, Tensor) else v for k, v in state["stats"].items()}
