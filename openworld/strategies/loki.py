"""Loki (Roberts et al., NeurIPS 2023, "Geometry-Aware Adaptation for Pretrained Models"); ``docs/methods/loki.md``.

Loki replaces the argmax of a trained classifier by the Fréchet mean of its class probabilities over a
label metric d: with p(x) the softmax over the n classes the classifier was trained on ("observed") and
the m candidate classes of the metric space (observed ones included),

    ŷ(x) = argmin_{y < m} Σ_{i < n} p_i(x) · d(i, y)²,

so a classifier trained on a subset of the classes can predict classes it never saw in training. The
strategy returns ``logits = −Σ_i p_i d(i, y)²`` (the negative Fréchet variance, :func:`frechet_scores`), so
the runner's argmax is Loki's prediction and every accuracy metric applies unchanged.

The classifier (``base``): ``null`` (default) is the recipe's shared base model (``ctx.base_model``: encoder +
cosine head trained with the ``base:`` block on the first session's labelled data), kept frozen; a
registered strategy name (e.g. ``teen``, parameters in ``base_params``) learns as usual and its logits over
the seen classes are decoded instead (then every seen class is observed and Loki only re-decodes).

The metric (``metric``), built without any label of unlabelled or evaluation data:

* ``prototypes`` (default): d(i, j) = ‖μ̂_i − μ̂_j‖₂ between the L2-normalised class means μ̂ of the
  encoder's features (test transform) of the labelled training data, fixed when a class first appears
  (base session: all its labelled images, validation included, as TEEN/NCM; later sessions: the few
  shots). The candidates are the classes with a prototype, i.e. the seen classes;
* ``hierarchy``: the tree path length between classes from their names split at ``hierarchy_sep``
  (Omniglot ``"<alphabet>/<character>"``: 0, 2 within an alphabet, 4 across), over all K classes of the
  scenario. On a tree whose leaves are the classes, Loki never predicts an unobserved leaf (a seen leaf
  of the same subtree always has a smaller Fréchet variance), see the card.

``decode: argmax`` predicts argmax p over the observed classes with the same network: the ablation
baseline of the paper ("argmax prediction"). The expected squared label distance of a run is computed from
its stored test confusion matrices (:func:`run_esd`; :mod:`openworld.metrics.label_metric`), because the
strategy never sees evaluation labels.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from openworld.data.views import batches
from openworld.metrics.label_metric import (
    class_paths,
    euclidean_distances,
    expected_squared_distance_from_confusion,
    hierarchy_distances,
)
from openworld.registry import STRATEGIES, register_strategy
from openworld.strategies.base import Prediction, Strategy, class_means

METRICS = ("prototypes", "hierarchy")
DECODES = ("frechet", "argmax")


def frechet_scores(probs: Tensor, sq_dist: Tensor) -> Tensor:
    """Negative Fréchet variances s[b, y] = −Σ_i probs[b, i]·sq_dist[i, y] (float64).

    ``probs`` [B, n]: probabilities over the n observed classes; ``sq_dist`` [n, m]: squared distances from
    each observed class to each of the m candidates. argmax_y s is Loki's prediction.
    """
    if probs.shape[-1] != sq_dist.shape[0]:
        raise ValueError(f"frechet_scores: {probs.shape[-1]} probabilities for {sq_dist.shape[0]} metric rows")
    return -(probs.to(torch.float64) @ sq_dist.to(device=probs.device, dtype=torch.float64))


def _fingerprint(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


@register_strategy("loki")
class Loki(Strategy):
    """Fréchet-mean decoding of a trained classifier over a label metric (see the module docstring).

    Parameters
    ----------
    base : ``None`` (the shared base model, frozen) or the name of a registered strategy to decode.
    base_params : that strategy's parameters.
    metric : ``"prototypes"`` (distances between class prototypes) or ``"hierarchy"`` (tree of class names).
    decode : ``"frechet"`` (Loki) or ``"argmax"`` (the same network's argmax, the baseline).
    temperature : p = softmax(logits / temperature); 1 keeps the network's own probabilities.
    normalize : L2-normalise features before the class means and the means after (``prototypes``).
    hierarchy_sep : separator of the levels in the class names (``hierarchy``).
    """

    supports = frozenset({"fscil", "cil"})

    def __init__(
        self,
        base: str | None = None,
        base_params: dict | None = None,
        metric: Literal["prototypes", "hierarchy"] = "prototypes",
        decode: Literal["frechet", "argmax"] = "frechet",
        temperature: float = 1.0,
        normalize: bool = True,
        hierarchy_sep: str = "/",
    ):
        self.base = base
        self.base_params = dict(base_params) if base_params else {}
        self.metric = metric
        self.decode = decode
        self.temperature = temperature
        self.normalize = normalize
        self.hierarchy_sep = hierarchy_sep
        if metric not in METRICS:
            raise ValueError(f"loki: metric must be one of {', '.join(METRICS)}; got {metric!r}")
        if decode not in DECODES:
            raise ValueError(f"loki: decode must be one of {', '.join(DECODES)}; got {decode!r}")
        if not float(temperature) > 0:
            raise ValueError(f"loki: temperature must be positive, got {temperature}")
        if base == "loki":
            raise ValueError("loki: base must name the classifier strategy to decode, not loki itself")

    # -- set-up ---------------------------------------------------------------------------------------
    def setup(self, ctx) -> None:
        super().setup(ctx)
        self.net = None  # base: null — the shared base model
        self.inner: Strategy | None = None
        self.num_observed = 0  # classes the classifier's probabilities cover
        self.num_seen = 0
        self.prototypes: Tensor | None = None  # [K, d]; rows of classes without a prototype are 0
        self.has_proto: Tensor | None = None  # [K] bool
        self.tree: Tensor | None = None  # [K, K] tree path lengths of the class names, when they have levels
        self.dist: Tensor | None = None  # [K, K] the label metric (float64); only rows/cols in use are valid
        self.sq: Tensor | None = None  # [n_observed, m_candidates] squared distances
        self._key: str | None = None

    # -- learning -------------------------------------------------------------------------------------
    def learn(self, session) -> None:
        seen = list(session.classes.seen)
        if seen != list(range(len(seen))):
            raise ValueError(f"loki: needs seen classes 0..n-1 in order, got {seen[:10]}…")
        first = self.net is None and self.inner is None
        if self.base is None:
            if first:
                self.net = self.ctx.base_model(session).eval()
                for p in self.net.parameters():
                    p.requires_grad_(False)
                self.num_observed = len(seen)  # trained on the first session's classes only
                self._key = f"loki:{_fingerprint(self.net)}"
        else:
            if first:
                self.inner = STRATEGIES.get(self.base)(**self.base_params)
                self.inner.setup(self.ctx)
            self.inner.learn(session)
            self.num_observed = len(seen)
        self.num_seen = len(seen)
        k = session.classes.num_classes
        if self.prototypes is None:
            self.has_proto = torch.zeros(k, dtype=torch.bool, device=self.ctx.device)
        new = [c for c in seen if not bool(self.has_proto[c])]
        if new:  # prototypes are kept for the "prototypes" metric and for the prototype ESD of every decode
            data = session.info.get("prototype_data", session.labeled) if first else session.labeled
            feats, labels = self._features_of(data)
            if self.normalize:
                feats = F.normalize(feats, dim=1)
            means = class_means(feats, labels, new)
            if self.normalize:
                means = F.normalize(means, dim=1)
            if self.prototypes is None:
                self.prototypes = torch.zeros(k, means.shape[1], dtype=torch.float64, device=self.ctx.device)
            self.prototypes[new] = means.to(torch.float64)
            self.has_proto[new] = True
        if self.tree is None and self._has_paths(session.classes.names):  # stored for the ESD of every decode
            paths = class_paths(session.classes.names, self.hierarchy_sep, "loki: metric 'hierarchy'")
            self.tree = hierarchy_distances(paths).to(self.ctx.device)
        if self.metric == "prototypes":
            self.dist = euclidean_distances(self.prototypes)  # rows without a prototype are never used
            num_candidates = self.num_seen
        else:
            if self.tree is None:
                # raises, naming the separator
                class_paths(session.classes.names, self.hierarchy_sep, "loki: metric 'hierarchy'")
            self.dist = self.tree
            num_candidates = k
        self.sq = self.dist[: self.num_observed, :num_candidates].pow(2)

    def _has_paths(self, names) -> bool:
        return bool(names) and any(self.hierarchy_sep in str(n) for n in names)

    @torch.no_grad()
    def _features_of(self, data) -> tuple[Tensor, Tensor]:
        if self.inner is None:
            return self.ctx.extract_features(self.net.encoder, data)
        feats, ys = [], []
        for xb, yb in batches(data, self.ctx.eval_batch_size, device=self.ctx.device, num_workers=self.ctx.num_workers):
            try:
                feats.append(self.inner.encode(xb).float())
            except NotImplementedError:
                raise ValueError(
                    f"loki: the prototype metric needs features; base {self.base!r} has no encode(x)"
                ) from None
            ys.append(yb)
        return torch.cat(feats), torch.cat(ys)

    # -- prediction -----------------------------------------------------------------------------------
    def _decode(self, logits: Tensor) -> Prediction:
        logits = logits[:, : self.num_observed].to(torch.float64)
        if self.decode == "argmax":
            return Prediction(logits=logits)
        probs = torch.softmax(logits / float(self.temperature), dim=1)
        return Prediction(logits=frechet_scores(probs, self.sq))

    def feature_cache_key(self) -> str | None:
        if self.inner is not None:
            key = self.inner.feature_cache_key()
            return None if key is None else f"loki/{key}"
        return self._key

    def encode(self, x: Tensor) -> Tensor:
        if self.inner is not None:
            return self.inner.encode(x)
        with self.ctx.autocast():
            return self.net.encoder(x).float()

    @torch.no_grad()
    def predict_features(self, z: Tensor) -> Prediction:
        if self.inner is not None:
            return self._decode(self.inner.predict_features(z).logits)
        return self._decode(self.net.head(z, self.num_observed).float())

    @torch.no_grad()
    def predict(self, x: Tensor) -> Prediction:
        if self.inner is not None:
            return self._decode(self.inner.predict(x).logits)
        with self.ctx.autocast():
            logits = self.net(x, num_active=self.num_observed)
        return self._decode(logits.float())

    def begin_eval_set(self, name: str) -> None:
        if self.inner is not None:
            self.inner.begin_eval_set(name)

    def run_info(self) -> dict[str, Any]:
        return {"num_observed": self.num_observed, "num_candidates": int(self.sq.shape[1]), "metric": self.metric}

    # -- state ----------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "net": None if self.net is None else self.net.state_dict(),
            "inner": None if self.inner is None else self.inner.state_dict(),
            "num_observed": self.num_observed,
            "num_seen": self.num_seen,
            "prototypes": self.prototypes,
            "has_proto": self.has_proto,
            "dist": self.dist,
            "tree": self.tree,
            "sq": self.sq,
        }

    def load_state_dict(self, state: dict) -> None:
        dev = self.ctx.device
        if state["net"] is not None:
            self.net = self.ctx.create_classifier_net().eval()
            self.net.load_state_dict(state["net"])
            for p in self.net.parameters():
                p.requires_grad_(False)
            self._key = f"loki:{_fingerprint(self.net)}"
        if state["inner"] is not None:
            self.inner = STRATEGIES.get(self.base)(**self.base_params)
            self.inner.setup(self.ctx)
            self.inner.load_state_dict(state["inner"])
        self.num_observed, self.num_seen = int(state["num_observed"]), int(state["num_seen"])
        self.prototypes = state["prototypes"].to(dev)
        self.has_proto = state["has_proto"].to(dev)
        self.dist, self.sq = state["dist"].to(dev), state["sq"].to(dev)
        self.tree = None if state.get("tree") is None else state["tree"].to(dev)

    def restore_session(self, session) -> None:
        if self.inner is not None:
            self.inner.restore_session(session)


# --------------------------------------------------------------------------------------------------
# expected squared label distance of finished runs (the engine does not compute it)
# --------------------------------------------------------------------------------------------------
def run_esd(run_dir: str | Path, metric_from: str | Path, metric: Literal["hierarchy", "prototypes"] = "hierarchy",
            eval_set: str = "test") -> list[float]:
    """ESD per session of one finished run, from the confusion matrices of ``eval_set`` in ``results.json``.

    The label metric is read from the last checkpoint of the loki run ``metric_from`` of the same recipe and
    seed (same class order and base encoder): ``"hierarchy"`` = the tree of the class names, ``"prototypes"`` =
    the distances between its class prototypes; each session uses the block of its classes 0..n-1.
    """
    sessions = json.loads((Path(run_dir) / "results.json").read_text())["sessions"]
    ckpts = list((Path(metric_from) / "checkpoints").glob("session_*.pt"))
    if not ckpts:
        raise FileNotFoundError(f"run_esd: no checkpoint under {Path(metric_from) / 'checkpoints'}")
    last = max(ckpts, key=lambda p: int(p.stem.split("_")[1]))
    state = torch.load(last, map_location="cpu", weights_only=True)["strategy"]
    if metric == "hierarchy":
        if state.get("tree") is None:
            raise ValueError(f"run_esd: {last} holds no class hierarchy (class names without levels)")
        dist = state["tree"]
    elif metric == "prototypes":
        dist = euclidean_distances(state["prototypes"])
    else:
        raise ValueError(f"run_esd: metric must be 'hierarchy' or 'prototypes', got {metric!r}")
    out = []
    for s in sessions:
        cm = torch.tensor(s["confusion"][eval_set], dtype=torch.float64)
        n = cm.shape[0]  # fscil/cil test sets: the seen classes 0..n-1, in order
        out.append(float(expected_squared_distance_from_confusion(cm, dist[:n, :n])))
    return out
