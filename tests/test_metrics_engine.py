"""MetricsEngine and History: streaming vectors (metrics.md §11 A, B, C, J), no-sync update, equivalences."""

import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from openworld.metrics import (
    History,
    MetricsEngine,
    confusion_counts,
    fscil_session_metrics,
    target_rank,
    topk_accuracy,
)

TOL = 1e-6
Y_A = [0, 0, 0, 0, 0, 1, 1, 1, 2, 2, 3, 3]
P_A = [0, 0, 0, 1, 2, 1, 1, 0, 2, 3, 3, 3]
CM_A = [[3, 1, 1, 0, 0], [1, 2, 0, 0, 0], [0, 0, 1, 1, 0], [0, 0, 0, 2, 0], [0, 0, 0, 0, 0]]
Y_B = [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 4, 4]
P_B = [0, 0, 0, 3, 1, 1, 1, 1, 2, 2, 0, 4, 3, 3, 0, 4, 2]
R_C = [[90], [80, 85], [70, 87, 88], [92, 60, 80, 86]]
T = torch.tensor


def test_vector_a_streaming():
    eng = MetricsEngine(5)
    eng.update(T(P_A[:7]), T(Y_A[:7]))
    eng.update(T(P_A[7:]), T(Y_A[7:]))
    assert eng.confusion().tolist() == CM_A
    m = eng.compute()
    assert "top5" not in m  # K <= 5: skipped
    assert m["acc"] == pytest.approx(0.666667, abs=TOL)
    assert m["acc_balanced"] == pytest.approx(0.691667, abs=TOL)
    pc = eng.per_class()
    np.testing.assert_allclose(pc[:4].numpy(), [0.6, 0.666667, 0.5, 1.0], atol=TOL)
    assert math.isnan(pc[4])
    assert eng.num_samples == 12

    before = eng.counts().clone()
    eng.update(T([3, 0, 4]), T([-1, -1, -1]))  # hidden labels: no change
    assert torch.equal(eng.counts(), before)
    eng.update(T([-1]), T([0]))  # (y=0, p=-1): an error
    m = eng.compute()
    assert m["acc"] == pytest.approx(8 / 13, abs=TOL)
    assert eng.per_class()[0] == pytest.approx(0.5, abs=TOL)
    assert eng.counts()[0, 5] == 1 and eng.confusion().shape == (5, 5)


def test_vector_a_topk_streaming():
    s = T([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3], [0.2, 0.3, 0.5], [0.4, 0.35, 0.25], [0.3, 0.3, 0.4]])
    y = T([1, 1, 0, 2, 2])
    eng = MetricsEngine(3, topk=(1, 2, 5))  # 5 >= K: skipped
    eng.update(None, y[:2], logits=s[:2])  # preds from argmax
    eng.update(s[2:].argmax(1), y[2:], logits=s[2:])
    m = eng.compute()
    assert m["top1"] == pytest.approx(0.4, abs=TOL) and m["top2"] == pytest.approx(0.6, abs=TOL)
    assert m["acc"] == pytest.approx(m["top1"], abs=1e-12)
    assert "top5" not in m
    eng.update(T([0]), T([0]))  # a batch without logits: top-k undefined
    assert math.isnan(eng.compute()["top2"])
    eng.reset()
    eng.update(None, y, logits=s.half())
    assert eng.compute()["top2"] == pytest.approx(0.6, abs=TOL)
    with pytest.raises(ValueError):
        eng.update(None, y, logits=s[:, :2])


def test_vector_b_engine():
    eng = MetricsEngine(5, chunk_size=5, groups={"base": [0, 1, 2], "novel": [3, 4]})
    for lo, hi in ((0, 3), (3, 11), (11, 17)):
        eng.update(T(P_B[lo:hi]), T(Y_B[lo:hi]))
    m = eng.compute()
    assert list(m) == ["acc", "acc_balanced", "acc_batch_mean", "acc_base", "acc_novel", "hm"]
    assert m["acc"] == pytest.approx(0.705882, abs=TOL)
    assert m["acc_base"] == pytest.approx(0.75, abs=TOL)
    assert m["acc_novel"] == pytest.approx(0.583333, abs=TOL)
    assert m["hm"] == pytest.approx(0.65625, abs=TOL)
    assert m["acc_batch_mean"] == pytest.approx(0.675, abs=TOL)
    ref = fscil_session_metrics(confusion_counts(Y_B, P_B, 5), 3, [3, 4])
    for k, v in ref.items():
        assert m[k] == pytest.approx(v, abs=1e-12)


def test_vector_b_batch_mean_ignores_padding():
    eng = MetricsEngine(5, chunk_size=5, num_samples=3)  # small hint: the chunk buffer grows
    y = Y_B[:6] + [-1, -1, -1] + Y_B[6:]
    p = P_B[:6] + [0, 1, 2] + P_B[6:]
    for i in range(0, len(y), 4):
        eng.update(T(p[i : i + 4]), T(y[i : i + 4]))
    assert eng.compute()["acc_batch_mean"] == pytest.approx(0.675, abs=TOL)


def test_t6_engine_batch_mean_vs_sample():
    # 250 samples in chunks of 100, 100, 50 with 90, 80, 10 correct
    y = torch.zeros(250, dtype=torch.long)
    p = torch.ones(250, dtype=torch.long)
    for start, n_ok in ((0, 90), (100, 80), (200, 10)):
        p[start : start + n_ok] = 0
    eng = MetricsEngine(3)
    for i in range(0, 250, 64):
        eng.update(p[i : i + 64], y[i : i + 64])
    m = eng.compute()
    assert 100 * m["acc_batch_mean"] == pytest.approx(63.3333, abs=1e-4)
    assert 100 * m["acc"] == pytest.approx(72.0, abs=TOL)


def test_groups_session_zero_and_chunk_off():
    eng = MetricsEngine(4, chunk_size=None, groups={"base": [0, 1], "novel": []})
    eng.update(T([0, 1, 1, 2]), T([0, 0, 1, 1]))
    m = eng.compute()
    assert "acc_batch_mean" not in m
    assert m["acc_base"] == pytest.approx(0.5)  # recalls 1/2 and 1/2
    assert math.isnan(m["acc_novel"]) and math.isnan(m["hm"])
    eng2 = MetricsEngine(4, groups={"seen": [0, 1]})
    eng2.update(T([0]), T([0]))
    assert "hm" not in eng2.compute()
    with pytest.raises(ValueError):
        MetricsEngine(4, groups={"base": [4]})


def test_empty_engine_is_nan_and_reset():
    eng = MetricsEngine(10, groups={"base": [0], "novel": [1]})
    m = eng.compute()
    assert list(m) == eng.metric_names()
    assert all(math.isnan(v) for v in m.values())
    eng.update(T([1, 2]), T([1, 2]), logits=torch.eye(10)[[1, 2]])
    assert eng.compute()["acc"] == 1.0
    eng.reset()
    assert eng.confusion().sum() == 0 and math.isnan(eng.compute()["acc"]) and eng.num_samples == 0


def test_input_validation():
    eng = MetricsEngine(3)
    with pytest.raises(ValueError):
        eng.update(T([0, 1]), T([0]))
    with pytest.raises(TypeError):
        eng.update(T([0.0]), T([0]))
    with pytest.raises(ValueError):
        eng.update(None, T([0]))
    with pytest.raises(ValueError):
        MetricsEngine(0)
    eng.update(np.array([0, 2]), [0, 1])  # numpy / lists accepted
    assert eng.compute()["acc"] == 0.5


class _OpRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket.__name__))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("chunk", [100, None])
def test_update_has_no_host_sync_ops(chunk):
    """update: one scatter-add into the confusion buffer (+1 into the rank histogram when logits are
    given; the batch-mean chunks cost no scatter in update), no sync-prone op."""
    eng = MetricsEngine(20, topk=(5,), chunk_size=chunk, groups={"base": [0, 1], "novel": [2]})
    z = torch.randn(64, 20)
    y = torch.randint(-1, 20, (64,))
    with _OpRecorder() as rec:
        eng.update(z.argmax(1), y, logits=z)
    forbidden = {"_local_scalar_dense", "item", "bincount", "nonzero", "unique", "_unique2", "masked_select",
                 "index", "equal", "is_nonzero", "tolist"}
    assert not forbidden & set(rec.ops), rec.ops
    assert rec.ops.count("scatter_add_") == 2
    with _OpRecorder() as rec:
        eng.update(z.argmax(1), y)
    assert rec.ops.count("scatter_add_") == 1


@pytest.mark.parametrize("chunk", [100, None])
def test_update_preds_only_op_budget(chunk, monkeypatch):
    """An int64 1-D batch on the engine's device: five ops (two clamps, the index, one scatter-add),
    no conversion, copy or allocation of a ones vector (steady state: the segment views are cached)."""
    from openworld.metrics import engine as engine_mod

    monkeypatch.setitem(engine_mod._SEGMENT, "cpu", 192)
    eng = MetricsEngine(20, topk=(5,), chunk_size=chunk)
    y, p = torch.randint(-1, 20, (64,)), torch.randint(-2, 22, (64,))
    for _ in range(4):  # the ones vector, a view per segment third, one fold (numpy, once per segment)
        eng.update(p, y)
    with _OpRecorder() as rec:
        eng.update(p, y)
    assert len(rec.ops) == 5 and rec.ops.count("clamp") == 2 and rec.ops[-1] == "scatter_add_", rec.ops
    assert not {"_to_copy", "copy_", "ones", "ones_like", "empty", "slice"} & set(rec.ops), rec.ops
    assert eng.counts().sum() == 5 * int(((y >= 0) & (y < 20)).sum())


def _engines_both_folds(monkeypatch, seg, **kw):
    """Two CPU engines that differ only in the fold: numpy (the CPU path) and torch (the device path)."""
    from openworld.metrics import engine as engine_mod

    monkeypatch.setitem(engine_mod._SEGMENT, "cpu", seg)
    host = MetricsEngine(**kw)
    dev = MetricsEngine(**kw)
    dev._host_fold = False
    dev.reset()  # a device-side carry
    return host, dev


def test_batch_mean_across_folds_exact(monkeypatch):
    """Chunks of 3 valid samples crossing segment (4) and batch (3) boundaries, padding anywhere."""
    y = [0, -1, 1, 1, -1, -1, 2, 0, 0, 1]
    p = [0, 5, 1, 0, 0, 0, 2, 0, 1, 1]
    # valid samples: ✓ ✓ ✗ | ✓ ✓ ✗ | ✓  ->  (2/3 + 2/3 + 1) / 3
    for eng in _engines_both_folds(monkeypatch, 4, num_classes=3, topk=(), chunk_size=3):
        for i in range(0, len(y), 3):
            eng.update(T(p[i : i + 3]), T(y[i : i + 3]))
        m = eng.compute()
        assert m["acc_batch_mean"] == pytest.approx(7 / 9, abs=1e-12)
        assert m["acc"] == pytest.approx(5 / 7, abs=1e-12) and eng.num_samples == 7
        eng.update(T([2, 2]), T([2, 0]))  # compute() folded what was pending; the stream goes on: ✓ ✓ ✗
        assert eng.compute()["acc_batch_mean"] == pytest.approx(2 / 3, abs=1e-12)


@settings(max_examples=30, deadline=None)
@given(
    k=st.integers(1, 9),
    sizes=st.lists(st.integers(0, 40), min_size=1, max_size=12),
    chunk=st.integers(1, 9),
    seg=st.integers(1, 24),
    arithmetic=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_host_and_device_fold_agree(k, sizes, chunk, seg, arithmetic, seed):
    """The numpy fold (lookup table or arithmetic decode) and the torch fold give identical counts and
    metrics for any batch sizes, segment size (batches longer than a segment included) and padding."""
    from openworld.metrics import engine as engine_mod

    with pytest.MonkeyPatch.context() as mp:
        if arithmetic:
            mp.setattr(engine_mod, "_SMALL_TABLE", 0)
        host, dev = _engines_both_folds(mp, seg, num_classes=k, topk=(), chunk_size=chunk)
        g = torch.Generator().manual_seed(seed)
        for b in sizes:
            y = torch.randint(-2, k + 2, (b,), generator=g)
            p = torch.where(torch.rand(b, generator=g) < 0.5, y, torch.randint(-2, k + 2, (b,), generator=g))
            host.update(p, y)
            dev.update(p, y)
        a, d = host.compute(), dev.compute()
    assert torch.equal(host.counts(), dev.counts())
    assert list(a) == list(d)
    assert all((math.isnan(a[key]) and math.isnan(d[key])) or a[key] == d[key] for key in a), (a, d)
    # and both equal the per-sample definition
    ys, ps = [], []
    g = torch.Generator().manual_seed(seed)
    for b in sizes:
        y = torch.randint(-2, k + 2, (b,), generator=g)
        ps += torch.where(torch.rand(b, generator=g) < 0.5, y, torch.randint(-2, k + 2, (b,), generator=g)).tolist()
        ys += y.tolist()
    flags = [int(yi == pi) for yi, pi in zip(ys, ps) if 0 <= yi < k]
    if flags:
        chunks = [flags[i : i + chunk] for i in range(0, len(flags), chunk)]
        assert a["acc_batch_mean"] == pytest.approx(sum(sum(c) / len(c) for c in chunks) / len(chunks), abs=1e-12)
    else:
        assert math.isnan(a["acc_batch_mean"])


def test_topk_ties_and_masked_labels_exact():
    """Rank = #{z_c > z_y} + #{c < y: z_c == z_y}, also when the label's own logit is -inf."""
    ninf = -math.inf
    z = T([[ninf, ninf, 0.0, ninf],  # y=1: 1 above + 1 tied lower -> rank 2
           [1.0, 1.0, 1.0, 0.0],  # y=2: 2 tied lower -> rank 2
           [1.0, 1.0, 1.0, 0.0],  # y=0: rank 0
           [0.5, 2.0, 2.0, 3.0],  # y=2: 1 above + 1 tied lower -> rank 2
           [0.0, 0.0, 0.0, 0.0]])  # y=-1: ignored
    y = T([1, 2, 0, 2, -1])
    for dtype in (torch.float32, torch.float64, torch.float16):
        eng = MetricsEngine(4, topk=(1, 2, 3), chunk_size=None)
        eng.update(None, y, logits=z.to(dtype))
        m = eng.compute()
        assert (m["top1"], m["top2"], m["top3"]) == (0.25, 0.25, 1.0), dtype
        assert m["acc"] == 0.25 and eng.num_samples == 4
    assert target_rank(z[:4], y[:4]).tolist() == [2, 2, 0, 2]  # the one-shot definition agrees


def test_inputs_of_other_dtypes_and_devices_are_converted():
    eng = MetricsEngine(5, topk=(), chunk_size=2)
    eng.update(T(P_A, dtype=torch.int32), T(Y_A, dtype=torch.int16))
    ref = MetricsEngine(5, topk=(), chunk_size=2)
    ref.update(T(P_A), T(Y_A))
    assert torch.equal(eng.counts(), ref.counts()) and eng.compute() == ref.compute()
    assert eng.confusion().tolist() == CM_A


def test_batch_mean_sample_limit(monkeypatch):
    from openworld.metrics import engine as engine_mod

    monkeypatch.setattr(engine_mod, "_MAX_SAMPLES", 10)
    monkeypatch.setitem(engine_mod._SEGMENT, "cpu", 4)
    eng = MetricsEngine(3, topk=())
    eng.update(T([0, 1, 2, 0]), T([0, 1, 2, 0]))
    with pytest.raises(ValueError, match="chunk_size=None"):
        for _ in range(3):
            eng.update(T([0, 1, 2, 0]), T([0, 1, 2, 0]))
    eng_off = MetricsEngine(3, topk=(), chunk_size=None)  # no per-sample stream: no limit
    for _ in range(4):
        eng_off.update(T([0, 1, 2, 0]), T([0, 1, 2, 0]))
    assert eng_off.compute()["acc"] == 1.0


def _one_shot(k, y, p, z, groups, chunk):
    eng = MetricsEngine(k, topk=(1, 3), chunk_size=chunk, groups=groups)
    eng.update(p, y, logits=z)
    return eng


@settings(max_examples=40, deadline=None)
@given(
    k=st.integers(2, 12),
    n=st.integers(0, 120),
    chunk=st.integers(1, 17),
    n_cuts=st.integers(0, 6),
    n_pad=st.integers(0, 20),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_streamed_equals_one_shot(k, n, chunk, n_cuts, n_pad, seed):
    """§11 J: random batch splits and random y=-1 padding give the one-shot values (batch mean included)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, k, (n,), generator=g)
    z = torch.randint(0, 4, (n, k), generator=g).float()  # ties on purpose
    p = torch.where(torch.rand(n, generator=g) < 0.2, torch.randint(-1, k + 2, (n,), generator=g), z.argmax(1))
    groups = {"base": list(range(k // 2)), "novel": list(range(k // 2, k))}
    ref = _one_shot(k, y, p, z, groups, chunk)
    ref_m = ref.compute()

    # insert padding rows (label -1, arbitrary prediction/logits) at random positions
    pos = torch.randint(0, n + 1, (n_pad,), generator=g).sort().values.tolist()
    ys, ps, zs = list(y.tolist()), list(p.tolist()), z.tolist()
    for j, at in enumerate(pos):
        ys.insert(at + j, -1)
        ps.insert(at + j, int(torch.randint(-1, k, (1,), generator=g)))
        zs.insert(at + j, [0.0] * k)
    yy, pp, zz = T(ys, dtype=torch.long), T(ps, dtype=torch.long), T(zs).reshape(-1, k)
    cuts = sorted(torch.randint(0, len(ys) + 1, (n_cuts,), generator=g).tolist())
    eng = MetricsEngine(k, topk=(1, 3), chunk_size=chunk, groups=groups, num_samples=1)
    for lo, hi in zip([0] + cuts, cuts + [len(ys)]):
        eng.update(pp[lo:hi], yy[lo:hi], logits=zz[lo:hi])
    m = eng.compute()
    assert torch.equal(eng.counts(), ref.counts())
    assert list(m) == list(ref_m)
    for key in m:
        assert (math.isnan(m[key]) and math.isnan(ref_m[key])) or m[key] == pytest.approx(ref_m[key], abs=1e-12), key
    assert eng.num_samples == n


def test_engine_matches_sklearn_and_torchmetrics():
    from sklearn.metrics import balanced_accuracy_score, confusion_matrix, top_k_accuracy_score
    from torchmetrics.classification import MulticlassConfusionMatrix

    rng = np.random.default_rng(3)
    k, n = 40, 5000
    z = torch.from_numpy(rng.standard_normal((n, k)))
    y = torch.from_numpy(rng.integers(0, k, n))
    y[y == 7] = -1  # one absent class and some hidden labels
    p = torch.where(torch.from_numpy(rng.random(n)) < 0.5, y.clamp(min=0), z.argmax(1))
    eng = MetricsEngine(k, topk=(5,))
    tm = MulticlassConfusionMatrix(num_classes=k, ignore_index=-1)
    for i in range(0, n, 777):
        eng.update(p[i : i + 777], y[i : i + 777], logits=z[i : i + 777])
        tm.update(p[i : i + 777], y[i : i + 777])
    keep = (y >= 0).numpy()
    yk, pk = y.numpy()[keep], p.numpy()[keep]
    assert torch.equal(eng.confusion(), tm.compute().long())
    assert np.array_equal(eng.confusion().numpy(), confusion_matrix(yk, pk, labels=np.arange(k)))
    m = eng.compute()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert m["acc_balanced"] == pytest.approx(balanced_accuracy_score(yk, pk), abs=1e-12)
    assert m["top5"] == pytest.approx(
        top_k_accuracy_score(yk, z.numpy()[keep], k=5, labels=np.arange(k)), abs=1e-12)


def test_sync_is_noop_without_process_group():
    eng = MetricsEngine(3)
    eng.update(T([0, 1]), T([0, 0]))
    before = eng.counts().clone()
    assert eng.sync() is eng
    assert torch.equal(eng.counts(), before)


def test_all_reduce_single_process_group(tmp_path):
    import torch.distributed as dist

    if not dist.is_available() or dist.is_initialized():
        pytest.skip("torch.distributed unavailable or already initialised")
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        eng = MetricsEngine(5, chunk_size=5)
        eng.update(T(P_B), T(Y_B))
        ref = eng.compute()
        eng.sync()
        eng.sync()  # idempotent until the next update
        assert eng.compute() == ref
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_and_never_syncs_in_update():
    g = torch.Generator().manual_seed(0)
    k, n = 50, 4000
    z = torch.randn(n, k, generator=g)
    y = torch.randint(-1, k, (n,), generator=g)
    p = torch.where(torch.rand(n, generator=g) < 0.1, -1, z.argmax(1))
    groups = {"base": list(range(30)), "novel": list(range(30, 50))}
    cpu = MetricsEngine(k, "cpu", groups=groups)
    gpu = MetricsEngine(k, "cuda", groups=groups, num_samples=100)
    zc, yc, pc = z.cuda(), y.cuda(), p.cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for i in range(0, n, 512):
            gpu.update(pc[i : i + 512], yc[i : i + 512], logits=zc[i : i + 512])
    finally:
        torch.cuda.set_sync_debug_mode(0)
    for i in range(0, n, 512):
        cpu.update(p[i : i + 512], y[i : i + 512], logits=z[i : i + 512])
    mc, mg = cpu.compute(), gpu.compute()
    assert torch.equal(cpu.confusion(), gpu.confusion())
    for key in mc:
        assert mg[key] == pytest.approx(mc[key], abs=1e-6), key


# -- History ------------------------------------------------------------------------------------------


def test_history_fscil_vector_b():
    h = History("fscil")
    accs = [0.80, 0.75, 0.705882]
    run = {}
    for t, a in enumerate(accs):
        run = h.record(t, {"acc": a, "acc_batch_mean": a - 0.01})
        if t == 0:
            assert run == {"pd": 0.0, "avg": 0.8, "last": 0.8}
    assert run["pd"] == pytest.approx(0.094118, abs=TOL)
    assert run["avg"] == pytest.approx(0.751961, abs=TOL)
    assert run["last"] == pytest.approx(0.705882, abs=TOL)
    assert h.running(1)["avg"] == pytest.approx(0.775)
    hb = History("fscil", session_acc="batch_mean")
    for t, a in enumerate(accs):
        run_b = hb.record(t, {"acc": a, "acc_batch_mean": a - 0.01})
    assert run_b["avg"] == pytest.approx(0.751961 - 0.01, abs=TOL)
    with pytest.raises(KeyError):
        History("fscil", session_acc="batch_mean").record(0, {"acc": 0.5})
    with pytest.raises(ValueError):
        History("gcd")


def test_history_t5_teen_mini():
    teen = [73.53, 70.55, 66.37, 63.23, 60.53, 57.95, 55.24, 53.44, 52.08]
    h = History()
    for t, a in enumerate(teen):
        run = h.record(t, {"acc": a / 100})
    assert 100 * run["avg"] == pytest.approx(61.4356, abs=1e-4)
    assert 100 * run["pd"] == pytest.approx(21.45, abs=TOL)
    assert 100 * run["last"] == pytest.approx(52.08, abs=TOL)


def test_history_cil_vector_c():
    n = [100, 100, 50, 50]
    pooled = [90, 82.5, 80.4, 78.3333333333]
    expected_a = [90, 82.5, 81.6667, 79.5]
    expected_f = [None, 10.0, 9.0, 11.0]
    h = History("cil")
    future = {0: 12, 1: 15, 2: 11}
    h.set_initial([10, 10, 10, 10])
    for t, row in enumerate(R_C):
        h.set_row(t, row + ([future[t]] if t in future else []))
        run = h.record(t, {"acc": sum(r * m for r, m in zip(row, n)) / sum(n[: t + 1])})
        assert run["avg_acc_tasks"] == pytest.approx(expected_a[t], abs=1e-4)
        if expected_f[t] is None:
            assert "forgetting" not in run and "bwt" not in run and "fwt" not in run
        else:
            assert run["forgetting"] == pytest.approx(expected_f[t], abs=TOL)
    assert h.session_accs() == pytest.approx(pooled)
    assert run["aia"] == pytest.approx(82.8083, abs=1e-4)
    assert run["aia_tasks"] == pytest.approx(83.4167, abs=1e-4)
    assert run["acc_A_triangle"] == pytest.approx(81.8, abs=TOL)
    assert run["forgetting_mammoth"] == pytest.approx(11.6667, abs=1e-4)
    assert run["forgetting_first_last"] == pytest.approx(10.3333, abs=1e-4)
    assert run["bwt"] == pytest.approx(-10.3333, abs=1e-4)
    assert run["bwt_all_pairs"] == pytest.approx(-9.8333, abs=1e-4)
    assert run["fwt"] == pytest.approx(2.6667, abs=1e-4)
    assert h.forgetting(2) == pytest.approx(9.0) and h.forgetting(variant="mammoth") == pytest.approx(35 / 3)
    assert h.bwt(variant="all_pairs") == pytest.approx(-59 / 6)
    assert h.avg_acc_tasks(1) == 82.5 and h.aia(1) == pytest.approx(86.25)
    assert h.aia_tasks() == pytest.approx(83.4167, abs=1e-4) and h.acc_a_triangle() == pytest.approx(81.8)
    r = h.acc_matrix()
    assert r.shape == (4, 4) and np.isnan(r[0, 1]) and r[3, 0] == 92
    assert h.r_future()[1, 2] == 15

    h2 = History("cil")
    h2.load_state_dict(h.state_dict())
    assert h2.running() == run


def test_history_from_engine_rows():
    """R rows straight from a session's engine (sample-weighted within each task)."""
    eng = MetricsEngine(4)
    eng.update(T([0, 1, 1, 2, 0, 2, 3]), T([0, 0, 1, 2, 2, 2, 3]))
    h = History("cil")
    h.set_row(0, eng.task_accuracies([[0, 1]]))
    h.set_row(1, eng.task_accuracies([[0, 1], [2, 3]]))
    assert h.acc_matrix()[1].tolist() == pytest.approx([2 / 3, 3 / 4])


def test_metrics_package_imports_only_torch_numpy_scipy():
    """DESIGN §2: openworld.metrics knows nothing of the rest of openworld."""
    import ast
    import sys
    from pathlib import Path

    import openworld.metrics as pkg

    # third-party: the numeric stack only; the standard library is fine; nothing from openworld.
    allowed = {"torch", "numpy", "scipy", "torchmetrics"} | set(sys.stdlib_module_names)
    for path in Path(pkg.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                roots = {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: inside openworld.metrics
                    continue
                roots = {(node.module or "").split(".")[0]}
            else:
                continue
            assert roots <= allowed, f"{path.name} imports {roots - allowed}"


def test_mean_ci95_exact():
    from openworld.metrics import mean_ci95

    mean, half = mean_ci95([60.0, 70.0, 80.0, 90.0])
    assert mean == 75.0 and half == pytest.approx(1.96 * 125**0.5 / 2, abs=1e-12)  # std (ddof 0) = √125
    assert mean_ci95([5.0]) == (5.0, 0.0)
    with pytest.raises(ValueError, match="no value"):
        mean_ci95([])


def test_update_keeps_float64_logits_for_topk():
    """Logits 1e-12 apart: distinct in float64, tied (→ lower id wins) if down-cast to float32."""
    z = torch.tensor([[1.0, 1.0 + 1e-12, 0.0], [1.0 + 1e-12, 1.0, 0.0]], dtype=torch.float64)
    eng = MetricsEngine(3, topk=(1,), chunk_size=None)
    eng.update(None, T([1, 0]), logits=z)
    m = eng.compute()
    assert m["top1"] == 1.0 and m["acc"] == 1.0
    assert eng.compute()["top1"] == topk_accuracy(z, T([1, 0]), 1) == 1.0
    assert topk_accuracy(z.float(), T([1, 0]), 1) == 0.5  # what a float32 cast would have given


def test_reset_clears_every_counter():
    eng = MetricsEngine(4, topk=(2,), chunk_size=3, groups={"base": [0, 1], "novel": [2, 3]})
    g = torch.Generator().manual_seed(0)
    z = torch.randn(20, 4, generator=g)
    y = torch.randint(-1, 4, (20,), generator=g)
    eng.update(None, y, logits=z)
    eng.update(T([0]), T([0]))  # a batch without logits: top-k NaN
    eng.compute()
    eng.reset()
    z2 = torch.randn(9, 4, generator=g)
    y2 = torch.randint(0, 4, (9,), generator=g)
    eng.update(None, y2, logits=z2)
    fresh = MetricsEngine(4, topk=(2,), chunk_size=3, groups={"base": [0, 1], "novel": [2, 3]})
    fresh.update(None, y2, logits=z2)
    a, b = eng.compute(), fresh.compute()
    assert list(a) == list(b)
    assert all((math.isnan(a[k]) and math.isnan(b[k])) or a[k] == b[k] for k in a)
    assert torch.equal(eng.counts(), fresh.counts()) and eng.num_samples == fresh.num_samples == 9
