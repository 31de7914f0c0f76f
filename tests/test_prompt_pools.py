"""L2P, DualPrompt and CODA-Prompt (docs/methods/{l2p,dualprompt,coda_prompt}.md).

The oracle fixtures in tests/fixtures/<method>/ were produced by the OFFICIAL prompt modules and
ViT (the OVOR release, a fork of CODA-Prompt). See each fixture directory's README.md. The tests
here compare our pools, the prefix attention and the whole prompted ViT pass with them (atol
1e-6). They also test the pools' properties, the strategies on a tiny two-task stream, and the
state round trip.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from timm.models.vision_transformer import Attention

from openworld.data.views import TensorData
from openworld.models.prompt_pools import (
    CodaPool,
    DualPromptPool,
    L2PPool,
    coda_weights,
    cosine_to_keys,
    gram_schmidt,
    key_match_loss,
    ortho_penalty,
    pool_prefix,
    replica_chunks,
)
from openworld.models.prompts import prefix_attention, prefixed_vit_forward, unwrap_vit, vit_backbone
from openworld.scenarios.base import ClassInfo, Session
from openworld.strategies.base import RunContext, TrainConfig
from openworld.strategies.coda_prompt import CodaPrompt
from openworld.strategies.dualprompt import DualPrompt
from openworld.strategies.l2p import L2P

FIX = Path(__file__).parent / "fixtures"
ATOL = 1e-6


def _load(method: str, name: str) -> dict:
    return json.loads((FIX / method / f"{name}.json").read_text())


def T(x) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float32)


def close(a, b, atol=ATOL) -> bool:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return a.shape == b.shape and torch.allclose(a, b, atol=atol, rtol=0)


# official parameter names → ours
def _our_name(official: str) -> str:
    kind, _, layer = official.rpartition("_")
    return {"g_p": "g_prompts", "e_p": "e_prompts", "e_k": "e_keys"}[kind] + "." + layer


def _coda_name(official: str) -> str:
    kind, _, layer = official.rpartition("_")
    return {"e_p": "prompts", "e_k": "keys", "e_a": "attn"}[kind] + "." + layer


# --------------------------------------------------------------------------------------------------
# Oracle fixtures — L2P
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["shallow", "deep"])
def test_l2p_matches_official(variant):
    fx = _load("l2p", "functions")
    rec = fx[variant]
    torch.manual_seed(0)  # the released init order: per block its prompts, then its keys, U[0, 1)
    pool = L2PPool(fx["D"], fx["D"], pool_size=fx["pool"], length=fx["length"], top_k=rec["top_k"],
                   layers=rec["e_layers"])
    ours = dict(pool.named_parameters())
    if variant == "shallow":
        assert all(close(ours[_our_name(n)], v) for n, v in rec["params"].items())
    else:
        sums = {n: float(p.detach().double().sum()) for n, p in ours.items()}
        assert all(abs(sums[_our_name(n)] - s) < 1e-4 for n, s in rec["param_sums"].items())
    q = T(fx["query"])
    prefixes, loss = pool(q, train=True)
    eval_prefixes, eval_loss = pool(q, train=False)
    assert float(eval_loss) == 0.0
    sel = pool.select(q)
    for layer, r in rec["layers"].items():
        layer = int(layer)
        cos = cosine_to_keys(q, pool.e_keys[str(layer)])
        assert close(cos, r["cos"])
        assert sel[layer].tolist() == r["idx"] == r["idx_eval"]
        assert close(key_match_loss(cos, sel[layer]), r["loss"])
        assert r["eval_equals_train"]
        assert torch.equal(prefixes[layer][0], eval_prefixes[layer][0])
        if "Ek" in r:
            assert close(prefixes[layer][0], r["Ek"]) and close(prefixes[layer][1], r["Ev"])
            k, half = rec["top_k"], fx["length"] // 2
            assert prefixes[layer][0].shape == (fx["B"], k * half, fx["D"])
    # the released ViT sums the blocks' losses and divides by their number
    assert close(loss, sum(r["loss"] for r in rec["layers"].values()) / len(rec["layers"]))


def test_l2p_released_key_loss_is_cross_sample():
    fx = _load("l2p", "functions")
    r = fx["shallow"]["layers"]["0"]
    cos, idx = T(r["cos"]), torch.tensor(r["idx"])
    assert fx["indexed_shape"] == [fx["B"], fx["B"], 5] == list(cos[:, idx].shape)
    released = key_match_loss(cos, idx, "released")
    per_sample = key_match_loss(cos, idx, "per_sample")
    assert close(released, r["loss"])
    # per sample: each row only with its own selections; released: every row with every row's selections
    manual = sum(1 - cos[b, j] for b in range(fx["B"]) for j in idx[b].tolist()) / idx.numel()
    assert close(per_sample, manual) and not close(per_sample, released, atol=1e-3)
    cross = sum(1 - cos[b, j] for b in range(fx["B"]) for j in idx.flatten().tolist()) / (fx["B"] * idx.numel())
    assert close(released, cross)
    # the CODA-Prompt release sums the same [B, B, k] tensor instead of averaging it
    assert fx["coda_release_loss"] == pytest.approx(r["loss"] * fx["B"] * idx.numel(), rel=1e-5)
    with pytest.raises(ValueError, match="key_loss must be one of"):
        key_match_loss(cos, idx, "paper")


def test_attention_matches_official():
    fx = _load("l2p", "attention")
    x = T(fx["x"])
    attn = Attention(x.shape[-1], num_heads=fx["heads"], qkv_bias=True)
    attn.load_state_dict({k: T(v) for k, v in fx["weights"].items()})
    with torch.no_grad():
        out = prefix_attention(attn, x, (T(fx["pk"]), T(fx["pv"])))
    assert close(out, fx["out"])


# --------------------------------------------------------------------------------------------------
# Oracle fixtures — DualPrompt
# --------------------------------------------------------------------------------------------------
def _dual_pool(fx, **kw) -> DualPromptPool:
    torch.manual_seed(fx["init_seed"])
    return DualPromptPool(fx["D"], fx["D"], pool_size=fx["pool"], e_length=fx["e_length"], g_length=fx["g_length"],
                          g_layers=fx["g_layers"], e_layers=fx["e_layers"], **kw)


def test_dualprompt_matches_official():
    fx = _load("dualprompt", "functions")
    pool = _dual_pool(fx)
    ours = dict(pool.named_parameters())
    assert all(close(ours[_our_name(n)], v) for n, v in fx["params"].items())  # released init order
    q, task = T(fx["query"]), fx["task"]
    pre_train, loss = pool(q, train=True, task=task)
    pre_eval, _ = pool(q, train=False, task=task)
    sel = pool.select(q)
    for layer, r in fx["bootstrap"]["layers"].items():
        layer = int(layer)
        assert close(pre_train[layer][0], r["Pk_train"]) and close(pre_train[layer][1], r["Pv_train"])
        assert close(pre_eval[layer][0], r["Pk_eval"]) and close(pre_eval[layer][1], r["Pv_eval"])
        if "idx_eval" in r:
            assert sel[layer].tolist() == r["idx_eval"]
            assert close(cosine_to_keys(q, pool.e_keys[str(layer)]), r["cos"])
            # training: the task's key, whatever the query matches
            assert close(key_match_loss(cosine_to_keys(q, pool.e_keys[str(layer)]), task), r["loss"])
    e_losses = [fx["bootstrap"]["layers"][str(e)]["loss"] for e in fx["e_layers"]]
    assert close(loss, sum(e_losses) / len(e_losses))
    # the released non-bootstrap branch: top-1 in training with the [B, B, 1] loss
    nb = _dual_pool(fx, task_id_bootstrap=False)
    _, nb_loss = nb(q, train=True, task=task)
    nb_fx = fx["no_bootstrap"]["layers"]
    assert all(nb.select(q)[int(e)].tolist() == r["idx_train"] for e, r in nb_fx.items())
    assert close(nb_loss, sum(r["loss"] for r in nb_fx.values()) / len(nb_fx))
    # the CODA-Prompt release sums the bootstrap key loss over the batch (OVOR: mean)
    assert fx["coda_release_loss_block2"] == pytest.approx(fx["bootstrap"]["layers"]["2"]["loss"] * fx["B"], rel=1e-5)


def test_dualprompt_task_id_in_training_top1_at_inference():
    torch.manual_seed(0)
    pool = DualPromptPool(8, 8, pool_size=3, e_length=4, g_length=2, g_layers=(0,), e_layers=(1, 2))
    with torch.no_grad():
        for keys in pool.e_keys.values():
            keys.copy_(torch.eye(3, 8))  # key j = e_j
    q = torch.zeros(4, 8)
    q[:, 2] = 1.0  # every query matches key 2
    train, _ = pool(q, train=True, task=0)
    infer, _ = pool(q, train=False, task=0)
    for e in (1, 2):
        p = pool.e_prompts[str(e)]
        assert torch.equal(train[e][0], p[0, :2].expand(4, -1, -1))  # task 0's prompt in training
        assert torch.equal(infer[e][0], p[2, :2].expand(4, -1, -1))  # the top-1 key's prompt at inference
        assert infer[e][0].shape == (4, 2, 8) and infer[e][1].shape == (4, 2, 8)
    assert train[0][0].shape == (4, 1, 8) and torch.equal(train[0][0], infer[0][0])  # g-prompt
    with pytest.raises(ValueError, match="task 3 has no e-prompt"):
        pool(q, train=True, task=3)


def test_dualprompt_shared_keys_select_once():
    torch.manual_seed(0)
    pool = DualPromptPool(8, 8, pool_size=4, e_length=4, g_length=2, shared_keys=True)
    assert list(pool.e_keys) == ["shared"]
    q = torch.randn(6, 8)
    sel = pool.select(q)
    assert all(torch.equal(sel[e], sel[2]) for e in (3, 4))
    _, loss = pool(q, train=True, task=1)
    assert close(loss, key_match_loss(cosine_to_keys(q, pool.e_keys["shared"]), 1))


# --------------------------------------------------------------------------------------------------
# Oracle fixtures — CODA-Prompt
# --------------------------------------------------------------------------------------------------
def _coda_pool(fx, mu=None) -> CodaPool:
    torch.manual_seed(fx["init_seed"])
    return CodaPool(fx["D"], fx["n_tasks"], fx["D"], pool_size=fx["pool"], length=fx["length"],
                    ortho_mu=fx["ortho_mu"] if mu is None else mu, layers=fx["e_layers"])


def _perturb(pool):
    with torch.no_grad():
        for p in pool.parameters():
            p.mul_(1.5).add_(0.05)


def test_coda_prompt_matches_official():
    fx = _load("coda_prompt", "functions")
    pool = _coda_pool(fx)
    ours = dict(pool.named_parameters())
    # construction: U[0,1) then Gram-Schmidt of task 0's slice, reproduced draw for draw
    assert all(close(ours[_coda_name(n)], v) for n, v in fx["init"].items())
    torch.manual_seed(fx["task1_seed"])
    pool.start_task(1)
    assert all(close(ours[_coda_name(n)], v) for n, v in fx["task1"].items())
    _perturb(pool)
    q = T(fx["query"])
    pre_train, loss = pool(q, train=True, task=1)
    pre_eval, eval_loss = pool(q, train=False, task=1)
    assert float(eval_loss) == 0.0
    for layer, r in fx["layers"].items():
        layer = int(layer)
        assert close(pool.weights(q, layer, train=True), r["aq_k_train"])
        assert close(pool.weights(q, layer, train=False), r["aq_k_eval"])
        if "Ek_train" in r:
            assert close(pre_train[layer][0], r["Ek_train"]) and close(pre_train[layer][1], r["Ev_train"])
            assert close(pre_eval[layer][0], r["Ek_eval"]) and close(pre_eval[layer][1], r["Ev_eval"])
            assert pre_eval[layer][0].shape == (fx["B"], fx["length"] // 2, fx["D"])
    assert close(loss, sum(r["loss"] for r in fx["layers"].values()) / len(fx["layers"]))
    assert close(ortho_penalty(T(fx["ortho"]["t"])), fx["ortho"]["penalty"], atol=1e-5)


def test_coda_weights_formula():
    torch.manual_seed(0)
    q, A, K = torch.randn(3, 5), torch.randn(4, 5), torch.randn(4, 5)
    ref = torch.stack([torch.stack([torch.cosine_similarity(q[b] * A[k], K[k], dim=0) for k in range(4)])
                       for b in range(3)])
    assert close(coda_weights(q, A, K), ref)


def test_gram_schmidt_properties():
    gen = torch.Generator().manual_seed(0)
    # 2 past components of a [pool, L, D] tensor, orthonormal (as Gram-Schmidt left them). The released
    # projection is classical Gram-Schmidt, one projection per earlier row, so it makes new rows
    # orthogonal to old ones only when those are orthogonal to each other (see the card).
    old = torch.linalg.qr(torch.randn(12, 2, generator=gen)).Q.T.reshape(2, 3, 4)
    vv = torch.cat([old, torch.rand(4, 3, 4, generator=gen)])
    out = gram_schmidt(vv, 2, 4, torch.Generator().manual_seed(1))
    assert torch.equal(out[:2], old)  # old slice unchanged
    assert torch.equal(out[4:], torch.zeros(2, 3, 4))  # later components zero, as released
    new = out[2:4].reshape(2, -1)
    assert close(new @ new.T, torch.eye(2))  # orthonormal new rows
    assert close(new @ old.reshape(2, -1).T, torch.zeros(2, 2))  # orthogonal to the old ones
    assert torch.equal(out, gram_schmidt(vv, 2, 4, torch.Generator().manual_seed(1)))  # seeded: reproducible
    with pytest.raises(ValueError, match="near-"):
        gram_schmidt(torch.zeros(3, 4), 1, 2)
    with pytest.raises(ValueError, match="start <= stop"):
        gram_schmidt(vv, 3, 2)


def test_coda_past_components_get_no_gradient():
    torch.manual_seed(0)
    pool = CodaPool(8, n_tasks=3, pool_size=6, length=4, layers=(0, 1), ortho_mu=0.1)
    pool.start_task(1)
    q = torch.randn(5, 8)
    prefixes, loss = pool(q, train=True, task=1)
    (sum(p[0].sum() + p[1].pow(2).sum() for p in prefixes.values()) + loss).backward()
    for params in (pool.keys, pool.attn, pool.prompts):
        for p in params.values():
            g = p.grad.reshape(6, -1)
            assert torch.equal(g[:2], torch.zeros_like(g[:2]))  # task 0's components: detached
            assert bool((g[2:4].abs().sum(1) > 0).all())  # task 1's: trained
            assert torch.equal(g[4:], torch.zeros_like(g[4:]))  # future: unused
    # inference uses every seen component
    assert pool.weights(q, 0, train=False).shape == (5, 4) and pool.weights(q, 0, train=True).shape == (5, 4)
    pool.start_task(2)
    fresh = CodaPool(8, n_tasks=3, pool_size=6, length=4, layers=(0, 1))
    fresh.load_state_dict(pool.state_dict())  # the current task comes back with the state
    assert fresh._task == 2 and fresh.weights(q, 0).shape == (5, 6)
    with pytest.raises(ValueError, match="in order"):
        pool.start_task(1)  # going back
    with pytest.raises(ValueError, match="exceeds n_tasks"):
        pool.start_task(3)
    with pytest.raises(ValueError, match="at least one component per task"):
        CodaPool(8, n_tasks=10, pool_size=5)


def test_replica_chunks_and_summed_losses():
    rows = torch.arange(5)
    expected = [[0, 1], [2, 3], [4]]
    assert [rows[c].tolist() for c in replica_chunks(5, 4)] == [t.tolist() for t in rows.chunk(4)] == expected
    assert [c.stop - c.start for c in replica_chunks(128, 4)] == [32, 32, 32, 32]
    assert replica_chunks(7, 1) == [slice(0, 7)]
    torch.manual_seed(0)
    one = L2PPool(8, 8, pool_size=6, length=4, top_k=2)
    torch.manual_seed(0)
    four = L2PPool(8, 8, pool_size=6, length=4, top_k=2, replicas=4)
    q = torch.randn(8, 8)
    _, l1 = one(q, train=True)
    _, l4 = four(q, train=True)
    cos = cosine_to_keys(q, one.e_keys["0"])
    idx = one.select(q)[0]
    assert close(l1, key_match_loss(cos, idx))
    assert close(l4, sum(key_match_loss(cos[r], idx[r]) for r in replica_chunks(8, 4)))


# --------------------------------------------------------------------------------------------------
# Oracle fixtures — the whole prompted ViT pass (official vit.py + zoo.py vs timm + ours)
# --------------------------------------------------------------------------------------------------
def _fixture_vit(fx) -> torch.nn.Module:
    cfg = fx["vit"]
    vit = unwrap_vit(vit_backbone(img_size=cfg["img_size"], patch_size=cfg["patch_size"], embed_dim=cfg["embed_dim"],
                                  depth=cfg["depth"], num_heads=cfg["num_heads"], in_channels=cfg["in_chans"]))
    sd = vit.state_dict()
    assert sorted(sd) == fx["param_names"]
    g = torch.Generator().manual_seed(fx["weight_seed"])  # the generator's fill, by sorted name
    with torch.no_grad():
        for n in fx["param_names"]:
            v = 0.2 * torch.randn(sd[n].shape, generator=g)
            if n.endswith(("norm.weight", "norm1.weight", "norm2.weight")):
                v += 1.0
            sd[n].copy_(v)
    return vit.eval()


def _check_e2e(fx, pool, task, rec=None):
    rec = rec or fx
    vit = _fixture_vit(fx)
    x = T(fx["x"])
    names = {n: float(p.detach().double().sum()) for n, p in pool.named_parameters()}
    conv = _coda_name if isinstance(pool, CodaPool) else _our_name
    assert all(abs(names[conv(n)] - s) < 1e-4 for n, s in rec["param_sums"].items())
    with torch.no_grad():
        q = prefixed_vit_forward(vit, x, None)
        assert close(q, rec["query"])
        pre, loss = pool(q, train=True, task=task)
        assert close(prefixed_vit_forward(vit, x, pre.get), rec["feat_train"])
        assert close(loss.reshape(1), rec["loss"])
        pre, _ = pool(q, train=False, task=task)
        assert close(prefixed_vit_forward(vit, x, pre.get), rec["feat_eval"])


@pytest.mark.parametrize("variant", ["shallow", "deep"])
def test_e2e_l2p(variant):
    fx = _load("l2p", "e2e")
    rec = fx[variant]
    torch.manual_seed(rec["init_seed"])
    pool = L2PPool(16, 16, pool_size=6, length=4, top_k=5, layers=(0, 1, 2, 3, 4) if variant == "deep" else (0,))
    _check_e2e(fx, pool, 0, rec)


def test_e2e_dualprompt():
    fx = _load("dualprompt", "e2e")
    torch.manual_seed(fx["init_seed"])
    pool = DualPromptPool(16, 16, pool_size=6, e_length=6, g_length=4)
    _check_e2e(fx, pool, fx["task"])


def test_e2e_coda_prompt():
    fx = _load("coda_prompt", "e2e")
    torch.manual_seed(fx["init_seed"])
    pool = CodaPool(16, 3, 16, pool_size=6, length=4, ortho_mu=fx["ortho_mu"])
    torch.manual_seed(fx["task1_seed"])
    pool.start_task(1)
    _perturb(pool)
    _check_e2e(fx, pool, 1)


# --------------------------------------------------------------------------------------------------
# Strategies on a tiny two-task stream
# --------------------------------------------------------------------------------------------------
BACKBONE = {"name": "vit", "img_size": 8, "patch_size": 4, "embed_dim": 16, "depth": 5, "num_heads": 2}
TINY = {
    "l2p": dict(pool_size=6, length=4, top_k=2),
    "dualprompt": dict(pool_size=2, e_length=4, g_length=2),
    "coda_prompt": dict(pool_size=8, length=4),
}
CLASSES = {"l2p": L2P, "dualprompt": DualPrompt, "coda_prompt": CodaPrompt}


def _ctx(seed=0):
    return RunContext(device=torch.device("cpu"), seed=seed,
                      scenario={"kind": "cil", "num_classes": 4, "input_shape": (1, 8, 8), "num_sessions": 2},
                      backbone=BACKBONE, base=TrainConfig(), progress=False)


def _data(t, n_per_class, seed):
    """Task t: classes 2t, 2t+1, each a fixed random 8×8 pattern plus noise."""
    proto = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(7))
    gen = torch.Generator().manual_seed(seed)
    y = torch.tensor([2 * t, 2 * t + 1]).repeat_interleave(n_per_class)
    return 2 * proto[y] + 0.2 * torch.randn(len(y), 1, 8, 8, generator=gen), y


def _session(t, n_per_class=40):
    x, y = _data(t, n_per_class, 100 + t)
    info = ClassInfo(num_classes=4, seen=tuple(range(2 * t + 2)), new=(2 * t, 2 * t + 1))
    return Session(index=t, name=f"task_{t}", classes=info, labeled=TensorData(x, y))


@pytest.fixture(scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is faster and keeps the file's time bounded
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pretrained_vit(one_thread):
    """The tiny ViT pre-trained (200 steps, CE) on 16 other random patterns: class-disjoint from the
    stream, as the methods assume a pre-trained backbone. A random-init ViT's query is almost the
    same for every input, so no key could tell the tasks apart."""
    torch.manual_seed(0)
    vit = unwrap_vit(_ctx().create_backbone())
    head = torch.nn.Linear(16, 16)
    opt = torch.optim.Adam(list(vit.parameters()) + list(head.parameters()), lr=3e-3)
    g = torch.Generator().manual_seed(11)
    protos = 2 * torch.rand(16, 1, 8, 8, generator=g)
    for _ in range(200):
        y = torch.randint(0, 16, (32,), generator=g)
        x = protos[y] + 0.2 * torch.randn(32, 1, 8, 8, generator=g)
        loss = torch.nn.functional.cross_entropy(head(prefixed_vit_forward(vit, x)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {k: v.detach().clone() for k, v in vit.state_dict().items()}


def _strategy(name, vit_state=None, **kw):
    params = dict(TINY[name], epochs=4, batch_size=16, lr=3e-2)
    params.update(kw)
    s = CLASSES[name](**params)
    ctx = _ctx()
    s.setup(ctx)
    if vit_state is not None:
        s.vit.load_state_dict(vit_state)
    return s, ctx


def _learn(s, ctx, t):
    ctx.start_session(t)
    s.learn(_session(t))


@pytest.mark.parametrize("name", ["l2p", "dualprompt", "coda_prompt"])
def test_strategy_two_tasks(name, pretrained_vit):
    s, ctx = _strategy(name, pretrained_vit)
    for t in (0, 1):
        _learn(s, ctx, t)
    assert all(torch.equal(v, pretrained_vit[k]) for k, v in s.vit.state_dict().items())  # backbone frozen
    cil, til = [], []
    for t in (0, 1):
        x, y = _data(t, 25, 200 + t)
        logits = s.predict(x).logits
        assert logits.shape == (len(y), 4)
        cil.append(float((logits.argmax(1) == y).float().mean()))
        til.append(float((logits[:, 2 * t : 2 * t + 2].argmax(1) + 2 * t == y).float().mean()))
    # chance is 0.25 over the 4 seen classes; the first task is not completely forgotten, and within
    # each task its classes are still told apart. (Margins checked over 4 pre-training seeds.)
    assert sum(cil) / 2 > 0.5 and cil[0] > 0.2 and min(til) > 0.85, (cil, til)
    if name == "dualprompt":  # the query picks the task's own e-prompt for most test samples, in every e-block
        rates = [float((idx[:, 0] == t).float().mean()) for t in (0, 1)
                 for idx in s.pool.select(s.query(_data(t, 25, 200 + t)[0])).values()]
        assert min(rates) > 0.5 and sum(rates) / len(rates) > 0.7, rates
    if name == "l2p":  # the two tasks' test samples select (mostly) different prompts
        top = [s.pool.select(s.query(_data(t, 25, 200 + t)[0]))[0] for t in (0, 1)]
        hist = [torch.bincount(i.flatten(), minlength=6).float() / i.numel() for i in top]
        assert float((hist[0] - hist[1]).abs().sum()) > 0.5, hist


@pytest.mark.parametrize("name", ["l2p", "dualprompt", "coda_prompt"])
def test_state_round_trip_and_resume(name, one_thread):
    a, ctx_a = _strategy(name, epochs=1)
    _learn(a, ctx_a, 0)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    b, ctx_b = _strategy(name, epochs=1)
    b.load_state_dict(state)
    x = _data(0, 5, 300)[0]
    assert torch.equal(a.predict(x).logits, b.predict(x).logits)
    for s, ctx in ((a, ctx_a), (b, ctx_b)):  # resuming at task 1 = the uninterrupted run
        _learn(s, ctx, 1)
    assert torch.equal(a.predict(x).logits, b.predict(x).logits)
    assert all(torch.equal(v, b.pool.state_dict()[k]) for k, v in a.pool.state_dict().items())


@pytest.mark.parametrize(
    "name, kw, match",
    [
        ("l2p", {"key_loss": "paper"}, r"l2p.key_loss: must be one of released, per_sample, got 'paper'"),
        ("l2p", {"epochs": 0}, r"l2p.epochs: must be an integer >= 1, got 0"),
        ("l2p", {"lr_offset": "lag"}, r"lr_offset: must be 'released' or 'nominal'"),
        ("dualprompt", {"pool_size": 1}, r"task-id bootstrap needs one e-prompt per task"),
        ("coda_prompt", {"pool_size": 1}, r"at least one component per task"),
        ("coda_prompt", {"ortho_mu": -1.0}, r"ortho_mu: must be >= 0"),
    ],
)
def test_settings_are_validated(name, kw, match):
    with pytest.raises(ValueError, match=match):
        _strategy(name, **kw)


def test_pool_prefix_layout():
    prompts = torch.arange(3 * 4 * 2, dtype=torch.float32).reshape(3, 4, 2)
    k, v = pool_prefix(prompts, torch.tensor([[2, 0]]))
    assert torch.equal(k[0], torch.cat([prompts[2, :2], prompts[0, :2]]))
    assert torch.equal(v[0], torch.cat([prompts[2, 2:], prompts[0, 2:]]))
