"""The streaming metrics engine and the cross-session History (DESIGN §4, ``specs/metrics.md`` §2).

:class:`MetricsEngine` keeps one eval set's counts on the run's device:

- ``buf``: a preallocated flat int64 buffer of length K(K+1)+1. ``cmx = buf[:K(K+1)].view(K, K+1)``
  (rows = true class; the last column counts predictions outside 0…K-1) and ``buf[K(K+1)]`` is the
  trash bin for samples whose label is -1 or out of range. Each :meth:`~MetricsEngine.update` does
  exactly one integer ``scatter_add_`` into it.
- ``aux``: int64 ``[top-k hits per k…, batches without logits, valid samples, bad logit rows, checked
  rows]``. Whenever ``logits`` are given, the rows with a valid label whose logits hold a NaN or
  ``+inf`` or only ``-inf`` entries are counted (element-wise, no sync); :meth:`~MetricsEngine.compute`
  reads that count in its one transfer and raises :class:`NonFiniteError` when it is > 0.
- ``chunk``: correct counts per consecutive chunk of ``chunk_size`` valid samples (TEEN's batch-mean
  accuracy, spec §5 compat). A sample's chunk is ``(valid samples before it) // chunk_size``, computed
  on the device from a running count, so hidden-label padding anywhere in the stream does not shift
  the chunks. The buffer is sized from the host-side sample offset (an upper bound taken from batch
  shapes) and grows by doubling on the device when needed; pass ``num_samples`` to preallocate.

Nothing in ``update`` reads a value back to the host (no ``.item()``, ``bincount``, boolean
indexing, ``nonzero`` or ``unique``). :meth:`~MetricsEngine.compute` evaluates every scalar into one
float64 device tensor and transfers it once.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from . import continual as _cl
from .classification import (
    LOGITS_DETAIL,
    NonFiniteError,
    _accuracy_t,
    _as_long_1d,
    _balanced_t,
    _class_mask,
    _harmonic_t,
    _masked_mean_t,
    _nonfinite_rows_t,
    _per_class_t,
    _support_t,
    _topk_hits_t,
    flat_confusion_index,
)

__all__ = ["ENGINES", "History", "MetricsEngine", "NonFiniteError", "create_engine", "mean_ci95", "register_engine"]

# Engine kinds by EvalSet.task. Each engine takes ``num_classes`` and ``device`` plus its own keyword
# options, and implements ``observe(logits, targets, unknown_score=None)`` (one batch, no host sync),
# ``compute() -> dict[str, float]`` (fractions), ``confusion()`` and ``per_class()`` (CPU tensors or None).
ENGINES: dict = {}


def mean_ci95(values) -> tuple[float, float]:
    """Mean and 95 % interval half-width ``1.96·std/√n`` (std with ddof = 0) of per-episode values (the
    DA-FSOS card's aggregate, §3.2)."""
    v = np.asarray(list(values), dtype=np.float64)
    if v.size == 0:
        raise ValueError("mean_ci95: no value")
    return float(v.mean()), float(1.96 * v.std(ddof=0) / np.sqrt(v.size))


def register_engine(task: str):
    def decorator(cls):
        ENGINES[task] = cls
        return cls

    return decorator


def create_engine(task: str, **kwargs):
    """The engine for an eval set's ``task`` (``"classification"``, …)."""
    if task not in ENGINES:
        raise ValueError(f"unknown metrics task {task!r}; allowed: {', '.join(sorted(ENGINES))}")
    return ENGINES[task](**kwargs)


@register_engine("classification")
class MetricsEngine:
    """Streaming, device-resident classification metrics for one evaluation set.

    Args:
        num_classes: K, the label space; labels outside 0…K-1 (e.g. -1) are ignored, predictions
            outside it count as errors.
        device: where the counts live (the run's device). Inputs are moved there.
        topk: the k of the ``top<k>`` metrics; a k >= K is skipped (it would be trivially 1).
            Top-k needs ``logits`` in every update; if any update lacks them, ``top<k>`` is NaN.
        chunk_size: chunk length of ``acc_batch_mean`` (spec §5, TEEN: 100); ``None`` disables it.
        groups: named class subsets, e.g. ``{"base": [...], "novel": [...]}``; each gives
            ``acc_<name>`` = mean per-class accuracy over its classes with support (NaN if none).
            When both ``base`` and ``novel`` are given, ``hm`` = H(acc_base, acc_novel) is reported
            too (NaN while ``novel`` is empty or has no test sample, e.g. at FSCIL session 0).
        num_samples: optional size of the eval set, to preallocate the batch-mean chunk buffer.

    Typical use::

        eng = MetricsEngine(K, device, groups={"base": base, "novel": novel})
        for x, y in loader:
            out = model(x)
            eng.update(out.argmax(1), y, logits=out)
        eng.sync()                 # no-op unless torch.distributed is initialised
        metrics = eng.compute()    # {"acc": …, "acc_balanced": …, "top5": …, "acc_base": …, …}
    """

    def __init__(
        self,
        num_classes: int,
        device: str | torch.device = "cpu",
        topk: Sequence[int] = (5,),
        chunk_size: int | None = 100,
        groups: Mapping[str, Sequence[int]] | None = None,
        num_samples: int | None = None,
    ):
        k = int(num_classes)
        if k <= 0:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        if chunk_size is not None and int(chunk_size) <= 0:
            raise ValueError(f"chunk_size must be positive or None, got {chunk_size}")
        self.num_classes = k
        self.device = torch.device(device)
        self.topk = tuple(sorted({int(kk) for kk in topk if 1 <= int(kk) < k}))
        self.chunk_size = None if chunk_size is None else int(chunk_size)
        self.groups = {str(name): tuple(int(c) for c in cls) for name, cls in (groups or {}).items()}
        for name in self.groups:
            if not name or "/" in name:
                raise ValueError(f"group name {name!r} must be non-empty and contain no '/'")
        self._has_hm = "base" in self.groups and "novel" in self.groups

        dev = self.device
        self._buf = torch.zeros(k * (k + 1) + 1, dtype=torch.int64, device=dev)
        self._ks = torch.tensor(self.topk, dtype=torch.int64, device=dev)
        self._nk = len(self.topk)
        # [hits…, no_logits, n_valid, bad logit rows, checked rows]
        self._aux = torch.zeros(self._nk + 4, dtype=torch.int64, device=dev)
        n0 = int(num_samples) if num_samples else 0
        nchunks = -(-n0 // self.chunk_size) if (self.chunk_size and n0) else 1
        self._chunk = torch.zeros(max(nchunks, 1), dtype=torch.int64, device=dev)
        if self.groups:
            self._gmask = torch.stack([_class_mask(cls, k, dev) for cls in self.groups.values()])
        else:
            self._gmask = torch.zeros(0, k, dtype=torch.float64, device=dev)
        self._offset = 0  # samples seen, from batch shapes (host int; padding included)
        self._batch_mean_ok = True
        self._reduced = False
        self.num_samples: int | None = None  # valid samples at the last compute()

    # -- accumulation ----------------------------------------------------------------------------

    def update(self, preds, targets, logits: torch.Tensor | None = None) -> None:
        """Add one batch: ``preds`` [B] class ids (or ``None`` to take ``logits.argmax(1)``),
        ``targets`` [B] labels (-1 = ignore), optional ``logits`` [B, K] for top-k. No host sync."""
        dev = self.device
        if preds is None:
            if logits is None:
                raise ValueError("update needs preds or logits")
            preds = logits.argmax(dim=1)
        p = _as_long_1d(preds, "preds", device=dev)
        y = _as_long_1d(targets, "targets", device=dev)
        if p.shape != y.shape:
            raise ValueError(f"preds and targets differ in length: {p.numel()} vs {y.numel()}")
        b = y.numel()
        k = self.num_classes

        idx = flat_confusion_index(y, p, k)
        self._buf.scatter_add_(0, idx, torch.ones_like(idx))  # the one integer scatter-add

        valid = (y >= 0) & (y < k)
        if logits is not None:
            z = logits.to(dev)
            if z.dim() != 2 or z.shape[0] != b or (self._nk and z.shape[1] != k):
                raise ValueError(f"logits must be [B, K] = [{b}, {k}], got {tuple(z.shape)}")
            if z.dtype in (torch.float16, torch.bfloat16):
                z = z.float()  # float32/float64 logits keep their dtype
            # rows with a valid label whose logits are unusable (NaN, +inf, all -inf): counted, no sync
            bad = _nonfinite_rows_t(z) & valid
            self._aux[self._nk + 2 :] += torch.stack([bad.sum(), valid.sum()])
            if self._nk:
                self._aux[: self._nk] += _topk_hits_t(z, y, self._ks)
        elif self._nk:
            self._aux[self._nk] += 1

        if self.chunk_size is not None and b:
            self._ensure_chunks(self._offset + b)
            v = valid.long()
            csum = torch.cumsum(v, dim=0)
            n_before = self._aux[self._nk + 1]
            pos = n_before + csum - 1  # index of each valid sample among all valid samples
            chunk = torch.where(valid, torch.div(pos, self.chunk_size, rounding_mode="floor"), 0)
            self._chunk.scatter_add_(0, chunk, (valid & (p == y)).long())
            self._aux[self._nk + 1] += csum[-1]
        elif b:
            self._aux[self._nk + 1] += valid.sum()
        self._offset += b
        self._reduced = False

    def _ensure_chunks(self, n_upper: int) -> None:
        need = -(-n_upper // self.chunk_size)
        if need > self._chunk.numel():
            grown = torch.zeros(max(need, 2 * self._chunk.numel()), dtype=torch.int64, device=self.device)
            grown[: self._chunk.numel()] = self._chunk
            self._chunk = grown

    # -- distributed -------------------------------------------------------------------------------

    def sync(self) -> MetricsEngine:
        """Hook for distributed evaluation; call once after the last update, before compute().

        Counts are sums, so a distributed run all-reduces the count buffers once per evaluation
        (the way torchmetrics syncs its states): see :meth:`all_reduce_`. Without an initialised
        process group this does nothing. Calling it twice without an update in between is safe.
        """
        return self.all_reduce_()

    def all_reduce_(self) -> MetricsEngine:
        """``all_reduce(SUM)`` the confusion buffer and the top-k/sample counters across ranks.

        No-op unless ``torch.distributed`` is available and initialised. The batch-mean chunks are
        not reduced: each rank sees its own sample order, so ``acc_batch_mean`` (a single-process
        compat metric) becomes NaN when the world size is > 1.
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or self._reduced:
            return self
        dist.all_reduce(self._buf, op=dist.ReduceOp.SUM)
        dist.all_reduce(self._aux, op=dist.ReduceOp.SUM)
        if dist.get_world_size() > 1:
            self._batch_mean_ok = False
        self._reduced = True
        return self

    # -- results -------------------------------------------------------------------------------------

    @property
    def _cmx(self) -> torch.Tensor:
        k = self.num_classes
        return self._buf[: k * (k + 1)].view(k, k + 1)

    def metric_names(self) -> list[str]:
        """The keys of :meth:`compute`, in order."""
        names = ["acc", "acc_balanced"] + [f"top{k}" for k in self.topk]
        if self.chunk_size is not None:
            names.append("acc_batch_mean")
        names += [f"acc_{g}" for g in self.groups]
        if self._has_hm:
            names.append("hm")
        return names

    def compute(self) -> dict[str, float]:
        """Every metric as a Python float (fractions; NaN where undefined), one host transfer."""
        cmx = self._cmx
        f64 = torch.float64
        n = cmx.sum().to(f64)
        vals = [_accuracy_t(cmx), _balanced_t(cmx)]
        if self._nk:
            missing = self._aux[self._nk] > 0
            top = self._aux[: self._nk].to(f64) / n
            vals += list(torch.where(missing, torch.full_like(top, math.nan), top).unbind())
        if self.chunk_size is not None:
            nan = torch.full((), math.nan, dtype=f64, device=self.device)
            vals.append(self._batch_mean_t() if self._batch_mean_ok else nan)
        if self.groups:
            support = (_support_t(cmx) > 0).to(f64)
            gvals = _masked_mean_t(_per_class_t(cmx).unsqueeze(0), self._gmask * support.unsqueeze(0))
            vals += list(gvals.unbind())
            if self._has_hm:
                names = list(self.groups)
                vals.append(_harmonic_t(gvals[names.index("base")], gvals[names.index("novel")]))
        vals.append(n)
        vals += list(self._nonfinite_t().unbind())
        host = torch.stack([v.to(device=self.device, dtype=f64) for v in vals]).cpu().tolist()
        self._raise_nonfinite(host.pop(-2), host.pop())
        self.num_samples = int(host.pop())
        return dict(zip(self.metric_names(), host))

    def _nonfinite_t(self) -> torch.Tensor:
        """int64 [2] on the device: (rows with unusable logits, rows checked). Append it to the values
        of the one host transfer and pass the two numbers to :meth:`_raise_nonfinite`."""
        return self._aux[self._nk + 2 : self._nk + 4]

    @staticmethod
    def _raise_nonfinite(bad: float, checked: float) -> None:
        if bad > 0:
            raise NonFiniteError("logits", int(bad), int(checked), LOGITS_DETAIL)

    def _batch_mean_t(self) -> torch.Tensor:
        n = self._aux[self._nk + 1]
        c = self.chunk_size
        start = torch.arange(self._chunk.numel(), device=self.device, dtype=torch.int64) * c
        size = (n - start).clamp(min=0, max=c)
        used = size > 0
        ratio = self._chunk.to(torch.float64) / size.clamp(min=1).to(torch.float64)
        return torch.where(used, ratio, torch.zeros_like(ratio)).sum() / used.sum().to(torch.float64)

    def confusion(self) -> torch.Tensor:
        """The confusion matrix ``cm`` [K, K] (int64, CPU; rows = true class)."""
        return self._cmx[:, : self.num_classes].cpu()

    def counts(self) -> torch.Tensor:
        """The full count matrix ``cmx`` [K, K+1] (int64, CPU; last column = out-of-range predictions)."""
        return self._cmx.cpu()

    def per_class(self) -> torch.Tensor:
        """Per-class recall (float64 [K], CPU; NaN for classes without a test sample)."""
        return _per_class_t(self._cmx).cpu()

    def observe(self, logits: torch.Tensor, targets, unknown_score: torch.Tensor | None = None) -> None:
        """The engine protocol: one batch of logits (prediction = argmax; ties to the lower id)."""
        self.update(None, targets, logits)

    def task_accuracies(self, task_classes: Sequence[Sequence[int]]) -> list[float]:
        """R[t][j] for each task's class list (sample-weighted within the task; spec §4)."""
        return _cl.task_accuracies(self.counts(), task_classes)

    def reset(self) -> None:
        """Zero every count (the non-finite row counters included); ready for the next evaluation."""
        self._buf.zero_()
        self._aux.zero_()
        self._chunk.zero_()
        self._offset = 0
        self._batch_mean_ok = True
        self._reduced = False
        self.num_samples = None


class History:
    """Per-session metric dicts of one eval set, and the running cross-session metrics.

    Args:
        kind: ``"fscil"`` (running ``pd``, ``avg``, ``last``) or ``"cil"`` (running ``aia`` from the
            pooled ``acc``, plus the accuracy-matrix metrics once rows of R are set).
        session_acc: ``"acc"`` (default) or ``"batch_mean"``: the session accuracy the FSCIL run
            metrics use (``batch_mean`` reads ``acc_batch_mean``, TEEN's numbers; spec §5).

    The accuracy matrix R (fractions) is kept with NaN above the diagonal; values measured on
    future tasks (R[t][j], j > t) go to a separate ``R_future`` and, with the initial accuracies b
    (:meth:`set_initial`), give ``fwt``.
    """

    KINDS = ("fscil", "cil")
    SESSION_ACC = ("acc", "batch_mean")

    def __init__(self, kind: str = "fscil", session_acc: str = "acc"):
        if kind not in self.KINDS:
            raise ValueError(f"kind must be one of {self.KINDS}, got {kind!r}")
        if session_acc not in self.SESSION_ACC:
            raise ValueError(f"session_acc must be one of {self.SESSION_ACC}, got {session_acc!r}")
        self.kind = kind
        self.session_acc = session_acc
        self.records: dict[int, dict[str, float]] = {}
        self._rows: dict[int, list[float]] = {}
        self._future: dict[tuple[int, int], float] = {}
        self._b: list[float] | None = None

    # -- per-session records ------------------------------------------------------------------------

    @property
    def acc_key(self) -> str:
        return "acc" if self.session_acc == "acc" else "acc_batch_mean"

    def record(self, t: int, metrics: Mapping[str, float]) -> dict[str, float]:
        """Store session t's metrics (re-recording a session replaces it); return the running values."""
        self.records[int(t)] = {str(k): float(v) for k, v in metrics.items()}
        return self.running(t)

    def _series(self, key: str, t: int) -> list[float]:
        missing = [s for s in range(t + 1) if s not in self.records or key not in self.records[s]]
        if missing:
            raise KeyError(f"History has no {key!r} for session(s) {missing}")
        return [self.records[s][key] for s in range(t + 1)]

    def session_accs(self, t: int | None = None) -> list[float]:
        """The session accuracies 0…t (``acc`` or ``acc_batch_mean`` per ``session_acc``)."""
        return self._series(self.acc_key, self._last(t))

    def _last(self, t: int | None) -> int:
        if t is not None:
            return int(t)
        if not self.records and not self._rows:
            raise ValueError("History is empty")
        return max(list(self.records) + list(self._rows))

    def running(self, t: int | None = None) -> dict[str, float]:
        """Cross-session metrics at session t (default: the latest), those defined there only."""
        t = self._last(t)
        if self.kind == "fscil":
            return _cl.fscil_run_metrics(self.session_accs(t))
        out: dict[str, float] = {}
        if all(s in self.records and "acc" in self.records[s] for s in range(t + 1)):
            out["aia"] = _cl.aia(self._series("acc", t))
        if all(s in self._rows for s in range(t + 1)):
            out.update(_cl.cil_running_metrics(self.acc_matrix(t)))
            f = self.fwt(t)
            if not math.isnan(f):
                out["fwt"] = f
        return out

    # -- accuracy matrix (CIL) ------------------------------------------------------------------------

    def set_row(self, t: int, row: Sequence[float]) -> None:
        """Set R[t][0…t]; entries beyond t (future tasks, evaluated before training on them) go to
        ``R_future``."""
        t = int(t)
        vals = [float(v) for v in row]
        if len(vals) < t + 1:
            raise ValueError(f"row {t} needs R[{t}][0…{t}] ({t + 1} values), got {len(vals)}")
        self._rows[t] = vals[: t + 1]
        for j in range(t + 1, len(vals)):
            self._future[(t, j)] = vals[j]

    def set_initial(self, b: Sequence[float]) -> None:
        """b_j: the accuracy on task j of the model at initialisation (before session 0), for FWT."""
        self._b = [float(v) for v in b]

    def acc_matrix(self, t: int | None = None) -> np.ndarray:
        """R[0…t][0…t] as float64 with NaN above the diagonal (and where a row is missing)."""
        t = self._last(t)
        r = np.full((t + 1, t + 1), np.nan)
        for s in range(t + 1):
            if s in self._rows:
                r[s, : s + 1] = self._rows[s]
        return r

    def r_future(self, t: int | None = None) -> np.ndarray:
        """The measured upper-triangle entries R[i][j], j > i (NaN where not measured), (t+1)×(t+1)."""
        t = self._last(t)
        r = np.full((t + 1, t + 1), np.nan)
        for (i, j), v in self._future.items():
            if i <= t and j <= t:
                r[i, j] = v
        return r

    def _rows_upto(self, t: int | None) -> np.ndarray:
        t = self._last(t)
        missing = [s for s in range(t + 1) if s not in self._rows]
        if missing:
            raise KeyError(f"History has no accuracy-matrix row for session(s) {missing}")
        return self.acc_matrix(t)

    def avg_acc_tasks(self, t: int | None = None) -> float:
        """A_t (mean of row t of R)."""
        return _cl.average_accuracy(self._rows_upto(t))

    def forgetting(self, t: int | None = None, variant: str = "max") -> float:
        return _cl.forgetting(self._rows_upto(t), variant)

    def bwt(self, t: int | None = None, variant: str = "default") -> float:
        return _cl.bwt(self._rows_upto(t), variant)

    def aia(self, t: int | None = None) -> float:
        """Mean pooled session accuracy 0…t (iCaRL), from the recorded ``acc``."""
        return _cl.aia(self._series("acc", self._last(t)))

    def aia_tasks(self, t: int | None = None) -> float:
        return _cl.aia_tasks(self._rows_upto(t))

    def acc_a_triangle(self, t: int | None = None) -> float:
        return _cl.acc_a_triangle(self._rows_upto(t))

    def fwt(self, t: int | None = None) -> float:
        """FWT at t from R[i−1][i] (i = 1…t) and :meth:`set_initial`; NaN if anything is missing."""
        t = self._last(t)
        if t < 1 or self._b is None or len(self._b) < t + 1:
            return math.nan
        sup = [self._future.get((i - 1, i), math.nan) for i in range(1, t + 1)]
        return _cl.fwt(sup, self._b[1 : t + 1])

    # -- persistence (resume) --------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {
            "kind": self.kind,
            "session_acc": self.session_acc,
            "records": {int(k): dict(v) for k, v in self.records.items()},
            "rows": {int(k): list(v) for k, v in self._rows.items()},
            "future": [[i, j, v] for (i, j), v in self._future.items()],
            "b": None if self._b is None else list(self._b),
        }

    def load_state_dict(self, state: Mapping) -> None:
        self.kind = state["kind"]
        self.session_acc = state["session_acc"]
        self.records = {int(k): {str(a): float(b) for a, b in v.items()} for k, v in state["records"].items()}
        self._rows = {int(k): [float(x) for x in v] for k, v in state["rows"].items()}
        self._future = {(int(i), int(j)): float(v) for i, j, v in state["future"]}
        self._b = None if state["b"] is None else [float(x) for x in state["b"]]
