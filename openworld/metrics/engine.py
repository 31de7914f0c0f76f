"""The streaming metrics engine and the cross-session History (DESIGN §4, ``specs/metrics.md`` §2).

:class:`MetricsEngine` keeps one eval set's counts on the run's device:

- ``buf``: a preallocated flat int64 buffer of ``(K+2)²`` cells, row ``clamp(y, -1, K) + 1``, column
  ``clamp(p, -1, K) + 1``, so the flat index of a sample is ``p' + (K+2)·y' + (K+3)`` (two
  clamps and two adds, no comparison or ``where``). Rows 0 and K+1 collect the samples whose label is
  -1 or out of range (ignored); columns 0 and K+1 both count predictions outside 0…K-1 and are folded
  into one "outside" column when the counts are read, so ``cmx`` (rows = true class, last column =
  outside predictions) is the ``[K, K+1]`` view ``buf[1:K+1, 1:]``. Each
  :meth:`~MetricsEngine.update` does exactly one integer ``scatter_add_`` into it (the source is a
  preallocated ones vector).
- ``hist``: int64 ``[4, R]`` counts by (row state, rank of the true class), R = K when top-k is asked
  (else 1), plus one flag. Row state: 0 valid label and usable logits, 1 ignored label, 2 valid label
  with unusable logits (a NaN or ``+inf`` entry, or only ``-inf`` entries: ``amax`` of the row is not
  finite), 3 ignored label with unusable logits. Batches with ``logits`` add one ``scatter_add_``
  into it; the top-k hits, the bad-row and checked-row counts are read from it at compute time
  (:meth:`~MetricsEngine.compute` raises :class:`NonFiniteError` when a valid row had unusable
  logits). The last cell is set once a batch without logits arrives (top-k is then NaN).
- ``segment`` and ``ends`` (only with ``chunk_size``): ``acc_batch_mean`` needs TEEN's chunks of
  ``chunk_size`` VALID samples (spec §5 compat). ``update`` writes each sample's flat index into a
  preallocated segment (the ``out=`` of the op that computes it, so it costs no extra op); when the
  segment is full (and at compute time) it is folded: a table lookup (on the CPU for K > 510 the
  same by arithmetic, as the table would miss the cache) packs (valid, correct) into one integer,
  one cumulative sum (offset by a carry) gives both running counts, and ``searchsorted`` finds the
  sample that closes each chunk; ``ends[j]`` keeps the running correct count there. A sample's
  chunk is thus ``(valid samples before it) // chunk_size``, so hidden-label
  padding anywhere in the stream does not shift the chunks. On the CPU the fold runs in numpy on
  the same memory (32 Ki samples, in cache); on a device it runs as torch ops with a device carry
  (no sync). Memory: the segment plus 8 bytes per chunk; at most 2³⁰ samples per evaluation.

Nothing in ``update`` reads a value back to the host (no ``.item()``, ``bincount``, boolean
indexing, ``nonzero`` or ``unique``), and an int64 1-D input already on the engine's device is used
as is (no conversion op). :meth:`~MetricsEngine.compute` evaluates every scalar into one float64
device tensor and transfers it once.
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
    _as_long_1d,
    _class_mask,
    _diag_t,
    _harmonic_t,
    _masked_mean_t,
    _per_class_t,
    _support_t,
)
from .label_metric import check_label_metric

_PACK = 1 << 30  # acc_batch_mean packs the running (valid, correct) counts as valid·2³⁰ + correct
_MAX_SAMPLES = _PACK  # so the correct count never reaches the valid bits
# samples kept before they are folded into the chunk counts: a CPU segment stays in L2, a GPU one
# amortises the fold's ~15 launches
_SEGMENT = {"cpu": 1 << 15}
_SEGMENT_DEFAULT = 1 << 20
_TRIANGLE_MAX = 2048  # up to this K the "column < label" masks are rows of a cached K×K table (≤ 4 MiB)
# cells of the CPU fold's lookup table (int32, K <= 510: 1 MiB); measured inside the engine, its random
# lookups beat decoding the flat index by arithmetic at K = 400 and lose at K = 1000 (cache misses)
_SMALL_TABLE = 1 << 18

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
        label_metric: optional [K, K] distances between classes (``openworld.metrics.label_metric``): adds
            ``esd`` = mean over samples of d(ŷ, y)² (Roberts et al. 2023) and ``esd_<group>`` over the
            samples of each group's classes (lower is better; NaN without a sample, or when a prediction
            falls outside 0…K-1, where no distance is defined). Read from the counts at compute().

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
        label_metric=None,
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
        s = k + 2  # row/column stride of the count buffer
        self._buf = torch.zeros(s * s, dtype=torch.int64, device=dev)
        self._nk = len(self.topk)
        self._ks_idx = torch.tensor([kk - 1 for kk in self.topk], dtype=torch.int64, device=dev)
        # rank histogram: [4 row states, R ranks] + the "a batch had no logits" flag (module docstring)
        self._rr = k if self._nk else 1
        self._hist = torch.zeros(4 * self._rr + 1, dtype=torch.int64, device=dev)
        # row-state offset by clamped label: 2R valid, 3R ignored (the label -1 wraps to the last cell);
        # adding -2R·(logits usable) then gives states 0…3
        state = torch.full((k + 1,), 2 * self._rr, dtype=torch.int64, device=dev)
        state[k] = 3 * self._rr
        self._state = state
        self._cls = torch.arange(k, dtype=torch.int64, device=dev).unsqueeze(0)
        self._tri: torch.Tensor | None = None  # [K, K] bool "column < row", built on the first logits batch
        self._inf: dict[torch.dtype, torch.Tensor] = {}
        self._no_logits = False  # host mirror of the hist flag: set it once, not per batch
        self._ones = torch.ones(0, dtype=torch.int64, device=dev)  # scatter source, grown to the largest batch
        self._seg = torch.empty(0, dtype=torch.int64, device=dev)  # flat indices not yet folded into chunks
        self._seg_n = 0
        self._seg_views: dict[tuple[int, int], torch.Tensor] = {}
        self._ends = torch.zeros(0, dtype=torch.int64, device=dev)
        self._host_fold = dev.type == "cpu"  # fold with numpy on the same memory (tests force the torch fold)
        self._fold_tmp: dict[str, np.ndarray] | None = None
        self._fold_run_t: torch.Tensor | None = None  # torch view of _fold_tmp["run"] (the cumsum's out)
        self._packtab: torch.Tensor | None = None
        if self.chunk_size is not None:
            n0 = int(num_samples) if num_samples else 0
            self._seg = torch.empty(_SEGMENT.get(dev.type, _SEGMENT_DEFAULT), dtype=torch.int64, device=dev)
            self._ends = torch.zeros(n0 // self.chunk_size + 2, dtype=torch.int64, device=dev)
            self._arange = torch.arange(self._seg.numel() // self.chunk_size + 2, device=dev)
        self._carry: int | torch.Tensor = 0 if self._host_fold else torch.zeros((), dtype=torch.int64, device=dev)
        if self.groups:
            self._gmask = torch.stack([_class_mask(cls, k, dev) for cls in self.groups.values()])
        else:
            self._gmask = torch.zeros(0, k, dtype=torch.float64, device=dev)
        self._d2: torch.Tensor | None = None
        if label_metric is not None:
            d = check_label_metric(label_metric, k)
            self._d2 = d.pow(2).to(dev)
        self._fast_dev = self.device  # device of inputs that need no move (set from the first moved input)
        self._offset = 0  # samples seen, from batch shapes (host int; padding included)
        self._batch_mean_ok = True
        self._reduced = False
        self.num_samples: int | None = None  # valid samples at the last compute()

    # -- accumulation ----------------------------------------------------------------------------

    def _ids(self, x, name: str) -> torch.Tensor:
        """``x`` as a 1-D int64 tensor on the engine's device; returned as is when it already is one."""
        if type(x) is torch.Tensor and x.dtype is torch.int64 and x.dim() == 1 and x.device == self._fast_dev:
            return x
        t = _as_long_1d(x, name, device=self.device)
        self._fast_dev = t.device  # e.g. cuda:0 for an engine made with "cuda"
        return t

    def update(self, preds, targets, logits: torch.Tensor | None = None) -> None:
        """Add one batch: ``preds`` [B] class ids (or ``None`` to take ``logits.argmax(1)``),
        ``targets`` [B] labels (-1 = ignore), optional ``logits`` [B, K] for top-k. No host sync."""
        if preds is None:
            if logits is None:
                raise ValueError("update needs preds or logits")
            preds = logits.argmax(dim=1)
        p = self._ids(preds, "preds")
        y = self._ids(targets, "targets")
        if p.shape != y.shape:
            raise ValueError(f"preds and targets differ in length: {p.numel()} vs {y.numel()}")
        b = y.shape[0]
        k = self.num_classes
        z = None
        if logits is not None:
            z = logits if logits.device == self._fast_dev else logits.to(self.device)
            if z.dim() != 2 or z.shape[0] != b or (self._nk and z.shape[1] != k):
                raise ValueError(f"logits must be [B, K] = [{b}, {k}], got {tuple(z.shape)}")
        elif self._nk and not self._no_logits:
            self._hist[-1:].fill_(1)  # top-k undefined from now on
            self._no_logits = True
        self._reduced = False
        if not b:
            return

        yc = torch.clamp(y, -1, k)
        j = torch.add(torch.clamp(p, -1, k), yc, alpha=k + 2)
        if self.chunk_size is not None:
            if self._seg_n + b > self._seg.numel():
                self._make_room(b)
            if self._offset + b > _MAX_SAMPLES:
                raise ValueError(f"acc_batch_mean supports at most 2**30 samples per evaluation, got "
                                 f"{self._offset + b}; use chunk_size=None for longer streams")
            o = self._seg_n
            idx = self._seg_views.get((o, b))
            if idx is None:  # batch sizes repeat, so the views do: no slice op per call
                if len(self._seg_views) > 256:
                    self._seg_views.clear()
                idx = self._seg_views[(o, b)] = self._seg[o : o + b]
            torch.add(j, k + 3, out=idx)  # the flat index, kept for acc_batch_mean
            self._seg_n = o + b
        else:
            idx = j.add_(k + 3)
        if b > self._ones.numel():
            self._ones = torch.ones(max(b, 2 * self._ones.numel()), dtype=torch.int64, device=self.device)
        self._buf.scatter_add_(0, idx, self._ones)  # the one integer scatter-add (src may be longer)
        if z is not None:
            self._count_logits(z, yc)
        self._offset += b

    def _count_logits(self, z: torch.Tensor, yc: torch.Tensor) -> None:
        """One scatter-add into ``hist`` at (row state, rank of the true class); see the module docstring.

        The rank follows spec §2.2 (``#{c: z_c > z_y} + #{c < y: z_c == z_y}``, ties to the lower id)
        in one comparison pass: ``z_c >= t_c`` with ``t_c = z_y`` left of the label and the next float
        above ``z_y`` from the label on (exact; ``-inf`` labels included, NaN/+inf rows are bad anyway).
        """
        r = self._rr
        if z.dtype in (torch.float16, torch.bfloat16):
            z = z.float()  # float32/float64 logits keep their dtype
        if z.shape[1]:
            usable = torch.isfinite(z.amax(dim=1))  # NaN, +inf and "all -inf" all give a non-finite max
        else:
            usable = torch.zeros(z.shape[0], dtype=torch.bool, device=z.device)  # no finite class score
        code = torch.take(self._state, yc)
        if self._nk:
            yg = torch.clamp(yc, 0, self.num_classes - 1)
            zy = z.gather(1, yg.unsqueeze(1))
            thr = torch.where(self._left_of(yg), zy, torch.nextafter(zy, self._posinf(z.dtype)))
            code = torch.add(code, (z >= thr).sum(dim=1, dtype=torch.int32))  # int32 counts: a cheaper reduction
        code = torch.add(code, usable, alpha=-2 * r)
        self._hist.scatter_add_(0, code, self._ones)

    def _left_of(self, yg: torch.Tensor) -> torch.Tensor:
        """Bool [B, K]: column c < label; rows of a cached triangle while it is small (a copy, no compare)."""
        k = self.num_classes
        if k > _TRIANGLE_MAX:
            return self._cls < yg.unsqueeze(1)
        if self._tri is None:
            self._tri = self._cls < self._cls.reshape(k, 1)
        return self._tri.index_select(0, yg)

    def _posinf(self, dtype: torch.dtype) -> torch.Tensor:
        t = self._inf.get(dtype)
        if t is None:
            t = self._inf[dtype] = torch.full((), math.inf, dtype=dtype, device=self.device)
        return t

    def _make_room(self, b: int) -> None:
        """Fold the pending segment into the chunk counts; widen the segment for a batch longer than it."""
        self._fold()
        if b > self._seg.numel():
            self._seg = torch.empty(b, dtype=torch.int64, device=self.device)
            self._seg_views.clear()
            self._fold_tmp = None
            self._arange = torch.arange(b // self.chunk_size + 2, device=self.device)

    def _fold(self) -> None:
        """Add the segment's samples to ``ends``: per chunk, the running correct count at its last sample.

        A cumulative sum of the packed (valid, correct) flags, offset by the carry of all earlier
        samples, is monotone in the valid count, so ``searchsorted`` finds the sample that closes each
        chunk. Chunks still open get the running count so far and are overwritten by the segment that
        closes them; ``hits[j] = ends[j] - ends[j-1]``.
        """
        m, c = self._seg_n, self.chunk_size
        if not m:
            return
        need = self._offset // c + 2  # host bound on the chunks touched so far
        if need > self._ends.numel():
            grown = torch.zeros(max(need, 2 * self._ends.numel()), dtype=torch.int64, device=self.device)
            grown[: self._ends.numel()] = self._ends
            self._ends = grown
        if self._host_fold:  # CPU: numpy on the same memory, the carry is a host int
            ends = self._ends.numpy()
            run = self._host_run(self._seg[:m].numpy())
            carry = self._carry
            j = np.arange((carry >> 30) // c, ((carry + int(run[-1])) >> 30) // c + 1)
            e = np.searchsorted(run, (j + 1) * (c * _PACK) - carry)
            ends[j] = (run[np.minimum(e, m - 1)] + carry) & (_PACK - 1)
            self._carry = carry + int(run[-1])
        else:  # device: the same steps with a device carry, no host sync
            run = torch.cumsum(torch.take(self._pack_table(), self._seg[:m]), 0, dtype=torch.int64)
            carry = self._carry
            j = self._arange[: m // c + 2] + torch.div(carry >> 30, c, rounding_mode="floor")
            e = torch.searchsorted(run, (j + 1) * (c * _PACK) - carry).clamp_(max=m - 1)
            self._ends.scatter_(0, j, (torch.take(run, e) + carry) & (_PACK - 1))
            self._carry = carry + run[-1]
        self._seg_n = 0

    def _pack_table(self) -> torch.Tensor:
        """int32 [(K+2)²]: flat index -> valid·2³⁰ + correct (built on first use)."""
        if self._packtab is None:
            k = self.num_classes
            r = torch.arange(k + 2, device=self.device)
            valid = ((r >= 1) & (r <= k)).unsqueeze(1)
            self._packtab = (valid.int() * _PACK + (valid & (r.unsqueeze(1) == r)).int()).flatten()
        return self._packtab

    def _host_run(self, seg: np.ndarray) -> np.ndarray:
        """Running packed (valid, correct) counts of one CPU segment, into preallocated arrays.

        A table lookup while the table is at most ``_SMALL_TABLE`` cells; for a larger K the same
        flags by arithmetic on the flat index. The running sum is torch's ``cumsum`` on the same
        memory: numpy's integer ``cumsum`` is not vectorised and costs about three times as much.
        """
        m, k = seg.size, self.num_classes
        cap = self._seg.numel()
        if self._fold_tmp is None or self._fold_tmp["run"].size < m:  # allocated once: no page faults per fold
            self._fold_tmp = {"run": np.empty(cap, np.int64), "a": np.empty(cap, np.int64),
                              "t32": np.empty(cap, np.int32), "v": np.empty(cap, bool), "c": np.empty(cap, bool)}
            self._fold_run_t = torch.from_numpy(self._fold_tmp["run"])
        t = {name: arr[:m] for name, arr in self._fold_tmp.items()}
        run_t = self._fold_run_t[:m]
        if (k + 2) ** 2 <= _SMALL_TABLE:
            flags = torch.from_numpy(np.take(self._pack_table().numpy(), seg, out=t["t32"]))
            torch.cumsum(flags, 0, dtype=torch.int64, out=run_t)
            return t["run"]
        a = np.subtract(seg, k + 2, out=t["a"])  # valid rows 1…K: 0 <= a < K(K+2)
        v = np.less(a.view(np.uint64), k * (k + 2), out=t["v"])
        c = np.equal(np.remainder(a, k + 3, out=t["run"]), 1, out=t["c"])  # the diagonal: a ≡ 1 (mod K+3)
        np.logical_and(c, v, out=c)
        w = np.multiply(v, _PACK, out=a)
        np.add(w, c, out=w)
        torch.cumsum(torch.from_numpy(w), 0, out=run_t)
        return t["run"]

    # -- distributed -------------------------------------------------------------------------------

    def sync(self) -> MetricsEngine:
        """Hook for distributed evaluation; call once after the last update, before compute().

        Counts are sums, so a distributed run all-reduces the count buffers once per evaluation
        (the way torchmetrics syncs its states): see :meth:`all_reduce_`. Without an initialised
        process group this does nothing. Calling it twice without an update in between is safe.
        """
        return self.all_reduce_()

    def all_reduce_(self) -> MetricsEngine:
        """``all_reduce(SUM)`` the confusion buffer and the rank histogram across ranks.

        No-op unless ``torch.distributed`` is available and initialised. The per-sample stream is
        not reduced: each rank sees its own sample order, so ``acc_batch_mean`` (a single-process
        compat metric) becomes NaN when the world size is > 1.
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or self._reduced:
            return self
        dist.all_reduce(self._buf, op=dist.ReduceOp.SUM)
        dist.all_reduce(self._hist, op=dist.ReduceOp.SUM)
        if dist.get_world_size() > 1:
            self._batch_mean_ok = False
        self._reduced = True
        return self

    # -- results -------------------------------------------------------------------------------------

    @property
    def _cmx(self) -> torch.Tensor:
        """The ``[K, K+1]`` count view of ``buf`` (rows = true class, last column = outside predictions)."""
        k = self.num_classes
        rows = self._buf.view(k + 2, k + 2)[1 : k + 1]
        rows[:, k + 1] += rows[:, 0]  # predictions < 0 join those > K-1 (O(K), at read time only)
        rows[:, 0] = 0
        return rows[:, 1:]

    def _logit_counts_t(self) -> torch.Tensor:
        """int64 [nk + 2] on the device: top-k hits per k, rows with unusable logits, rows checked."""
        h = self._hist[:-1].view(4, self._rr)
        cum = (h[0] + h[2]).cumsum(0)  # valid rows by rank (unusable rows count as checked)
        return torch.cat([cum[self._ks_idx], h[2].sum().reshape(1), cum[-1:]])

    @property
    def _aux(self) -> torch.Tensor:
        """``[top-k hits…, a batch had no logits (0/1), bad logit rows, checked rows]`` (int64, device)."""
        c = self._logit_counts_t()
        return torch.cat([c[: self._nk], self._hist[-1:], c[self._nk :]])

    def metric_names(self) -> list[str]:
        """The keys of :meth:`compute`, in order."""
        names = ["acc", "acc_balanced"] + [f"top{k}" for k in self.topk]
        if self.chunk_size is not None:
            names.append("acc_batch_mean")
        names += [f"acc_{g}" for g in self.groups]
        if self._has_hm:
            names.append("hm")
        if self._d2 is not None:
            names += ["esd"] + [f"esd_{g}" for g in self.groups]
        return names

    def compute(self) -> dict[str, float]:
        """Every metric as a Python float (fractions; NaN where undefined), one host transfer."""
        cmx = self._cmx
        f64 = torch.float64
        support = _support_t(cmx)  # the one pass over the K×(K+1) counts
        diag = _diag_t(cmx)
        n = support.sum()
        per_class = diag / support
        present = (support > 0).to(f64)
        vals = [diag.sum() / n, _masked_mean_t(per_class, present)]
        counts = self._logit_counts_t()
        if self._nk:
            top = counts[: self._nk].to(f64) / n
            vals += list(torch.where(self._hist[-1] > 0, torch.full_like(top, math.nan), top).unbind())
        if self.chunk_size is not None:
            nan = torch.full((), math.nan, dtype=f64, device=self.device)
            vals.append(self._batch_mean_t() if self._batch_mean_ok else nan)
        if self.groups:
            gvals = _masked_mean_t(per_class.unsqueeze(0), self._gmask * present.unsqueeze(0))
            vals += list(gvals.unbind())
            if self._has_hm:
                names = list(self.groups)
                vals.append(_harmonic_t(gvals[names.index("base")], gvals[names.index("novel")]))
        if self._d2 is not None:
            vals += list(self._esd_t(cmx, support).unbind())
        vals.append(n)
        vals += list(counts[self._nk :].unbind())
        host = torch.stack([v.to(device=self.device, dtype=f64) for v in vals]).cpu().tolist()
        self._raise_nonfinite(host.pop(-2), host.pop())
        self.num_samples = int(host.pop())
        return dict(zip(self.metric_names(), host))

    def _esd_t(self, cmx: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
        """[1 + G] float64: ESD over all samples, then over each group's rows (NaN: no sample, or a row
        with an out-of-range prediction, which has no distance)."""
        f64 = torch.float64
        k = self.num_classes
        sq = (cmx[:, :k].to(f64) * self._d2).sum(1)  # per true class: Σ_ŷ C[y, ŷ]·d(y, ŷ)²
        outside = (cmx[:, k] > 0).to(f64)
        sup = support.to(f64)
        rows = torch.cat([torch.ones(1, k, dtype=f64, device=sq.device), (self._gmask > 0).to(f64)])
        num, den, bad = rows @ sq, rows @ sup, rows @ outside
        nan = torch.full_like(num, math.nan)
        return torch.where((den > 0) & (bad == 0), num / den.clamp(min=1), nan)

    def _nonfinite_t(self) -> torch.Tensor:
        """int64 [2] on the device: (rows with unusable logits, rows checked). Append it to the values
        of the one host transfer and pass the two numbers to :meth:`_raise_nonfinite`."""
        return self._logit_counts_t()[self._nk :]

    @staticmethod
    def _raise_nonfinite(bad: float, checked: float) -> None:
        if bad > 0:
            raise NonFiniteError("logits", int(bad), int(checked), LOGITS_DETAIL)

    def _batch_mean_t(self) -> torch.Tensor:
        """``acc_batch_mean`` from the chunk ends (0-d float64; NaN without a valid sample)."""
        f64 = torch.float64
        self._fold()
        c, dev = self.chunk_size, self.device
        nch = -(-self._offset // c)
        if not nch:
            return torch.full((), math.nan, dtype=f64, device=dev)
        carry = torch.as_tensor(self._carry, dtype=torch.int64, device=dev)
        hits = torch.diff(self._ends[:nch], prepend=self._ends.new_zeros(1))
        size = ((carry >> 30) - torch.arange(nch, device=dev, dtype=torch.int64) * c).clamp(min=0, max=c)
        used = size > 0
        ratio = hits.to(f64) / size.clamp(min=1).to(f64)
        return torch.where(used, ratio, torch.zeros_like(ratio)).sum() / used.sum().to(f64)

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
        self._hist.zero_()
        self._ends.zero_()
        self._seg_n = 0
        self._carry = 0 if self._host_fold else torch.zeros((), dtype=torch.int64, device=self.device)
        self._no_logits = False
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
