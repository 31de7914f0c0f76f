"""Prompt pools for a frozen, prefix-tuned ViT: L2P, DualPrompt and CODA-Prompt (``docs/methods/*.md``).

The three methods share one mechanism. A frozen ViT pass without prompts gives the query
``q`` (the CLS feature after the final norm, no gradient). The pool turns ``q`` into one prefix
``(keys [B, L_k, D], values [B, L_v, D])`` per prompted block. The prompted pass
(:func:`openworld.models.prompts.prefixed_vit_forward`) then uses those prefixes as extra
keys/values of the block's attention. How ``q`` picks the prefix is what differs:

* **L2P** (:class:`L2PPool`): a pool of prompts with one key each. The top-k keys by cosine to
  ``q`` are selected, and their prompts are concatenated (keys of prompt 1, keys of prompt 2, …).
  Training and inference select the same way.
* **DualPrompt** (:class:`DualPromptPool`): shared g-prompts (blocks 0–1) plus task-specific
  e-prompts (blocks 2–4). Training uses the task id's prompt ("task-id bootstrap"). Inference
  picks the top-1 key.
* **CODA-Prompt** (:class:`CodaPool`): every prompt is a weighted sum of components P_k. The
  weight is the cosine between the attended query ``q ⊙ A_k`` and the key ``K_k``. Each task owns
  pool_size / n_tasks components, which are Gram-Schmidt initialised at the start of the task.

Parameters are ``nn.ParameterDict``s keyed by the block index (``str(l)``). Their initialisation
follows the released code: U[0, 1), drawn from torch's global RNG in the released order, so a run
seeded like the released one gets the same initial values. The small pure functions below
(:func:`cosine_to_keys`, :func:`topk_keys`, :func:`key_match_loss`, :func:`pool_prefix`,
:func:`coda_weights`, :func:`coda_prefix`, :func:`ortho_penalty`, :func:`gram_schmidt`) are what the
oracle fixtures pin.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Prefix = tuple[Tensor, Tensor]
KEY_LOSSES = ("released", "per_sample")


# --------------------------------------------------------------------------------------------------
# Pure functions
# --------------------------------------------------------------------------------------------------
def uniform_prompt(*shape: int) -> nn.Parameter:
    """A prompt/key parameter of ``shape``, i.i.d. U[0, 1) from the global RNG (the released init)."""
    return nn.Parameter(torch.empty(*shape).uniform_())


def cosine_to_keys(query: Tensor, keys: Tensor) -> Tensor:
    """cos(q_b, k_j) for queries [B, Dk] and keys [P, Dk] → [B, P]."""
    return F.normalize(query, dim=1) @ F.normalize(keys, dim=1).T


def topk_keys(cos: Tensor, k: int) -> Tensor:
    """Indices [B, k] of each row's k most similar keys (most similar first)."""
    return torch.topk(cos, int(k), dim=1).indices


def key_match_loss(cos: Tensor, idx: Tensor, mode: Literal["released", "per_sample"] = "released") -> Tensor:
    """The key-matching ("pull") loss 1 − cos of the selected keys, averaged.

    ``idx`` is [B, k] (per-sample selections) or an int (one key for the whole batch: DualPrompt's
    task id). With per-sample selections:

    * ``released``: ``mean(1 − cos[:, idx])``. This indexes a [B, k] index into the columns, which
      gives a [B, B, k] tensor: every sample is pulled towards every sample's selected keys, not
      only its own.
    * ``per_sample``: ``mean_b mean_j (1 − cos[b, idx[b, j]])``. Each sample is pulled to its own
      keys only, as the papers write it. The papers sum over the k selected keys; that is a factor
      k, which the strategies' ``key_loss_weight`` can carry.
    """
    if isinstance(idx, int):
        return (1.0 - cos[:, idx]).mean()
    if mode == "released":
        return (1.0 - cos[:, idx]).mean()
    if mode == "per_sample":
        return (1.0 - cos.gather(1, idx)).mean()
    raise ValueError(f"key_loss must be one of {KEY_LOSSES}, got {mode!r}")


def pool_prefix(prompts: Tensor, idx: Tensor) -> Prefix:
    """Prefix of the prompts ``prompts[idx]`` (pool [P, L, D], idx [B, k]).

    Each selected prompt gives its first L/2 rows to the keys and its last L/2 rows to the values.
    The k prompts are concatenated in selection order: ([B, k·L/2, D], [B, k·L/2, D]).
    """
    half = prompts.shape[1] // 2
    sel = prompts[idx]  # [B, k, L, D]
    B, D = sel.shape[0], sel.shape[-1]
    return sel[:, :, :half].reshape(B, -1, D), sel[:, :, half:].reshape(B, -1, D)


def shared_prefix(prompt: Tensor, batch: int) -> Prefix:
    """Prefix of one prompt [L, D] for every sample: ([B, L/2, D], [B, L/2, D])."""
    half = prompt.shape[0] // 2
    p = prompt.expand(batch, -1, -1)
    return p[:, :half], p[:, half:]


def coda_weights(query: Tensor, attn: Tensor, keys: Tensor) -> Tensor:
    """CODA-P component weights α_{b,k} = cos(q_b ⊙ A_k, K_k): query [B, Dk], A and K [k, Dk] → [B, k]."""
    aq = query[:, None, :] * attn[None, :, :]
    return (F.normalize(aq, dim=2) * F.normalize(keys, dim=1)[None]).sum(-1)


def coda_prefix(weights: Tensor, prompts: Tensor) -> Prefix:
    """Σ_k α_{b,k} P_k (weights [B, k], components [k, L, D]), split into keys = the first L/2 rows and
    values = the last L/2 rows."""
    P = torch.einsum("bk,kld->bld", weights, prompts)
    half = prompts.shape[1] // 2
    return P[:, :half], P[:, half:]


def ortho_penalty(t: Tensor) -> Tensor:
    """mean((T Tᵀ − I)²) over the n×n Gram matrix of the rows of ``t`` [n, d]."""
    eye = torch.eye(t.shape[0], dtype=t.dtype, device=t.device)
    return ((t @ t.T - eye) ** 2).mean()


def gram_schmidt(vv: Tensor, start: int, stop: int, generator: torch.Generator | None = None) -> Tensor:
    """CODA-P's re-initialisation of the components ``start … stop−1`` of ``vv`` [n, …] (rows flattened).

    Rows ``< start`` are kept as they are. Each new row k (in order) starts as a fresh N(0, I) draw,
    one ``randn`` of the flattened row length per row, from ``generator`` or the global RNG (the
    released draw order). Its projections onto every earlier row (the kept ones included) are
    subtracted. Then the new rows are normalised to unit length. Rows ``≥ stop`` come back as zeros,
    as in the released code. The released code redraws when an earlier row has squared norm < 1e-8;
    such a row never changes, so the redraw would loop forever. Here it raises ``ValueError`` instead.
    """
    shape = vv.shape
    n = shape[0]
    if not 0 <= start <= stop <= n:
        raise ValueError(f"gram_schmidt: need 0 <= start <= stop <= {n}, got start={start}, stop={stop}")
    flat = vv.detach().reshape(n, -1)
    out = torch.zeros_like(flat)
    out[:start] = flat[:start]
    d = flat.shape[1]
    for k in range(start, stop):
        if generator is None:
            v = torch.randn(d, dtype=flat.dtype, device=flat.device)
        else:  # a generator draws on its own device; the values then move to the tensor's
            v = torch.randn(d, dtype=flat.dtype, device=generator.device, generator=generator).to(flat.device)
        if k > 0:
            prev = out[:k]
            denom = (prev * prev).sum(1)
            if bool((denom < 1e-8).any()):
                bad = torch.nonzero(denom < 1e-8).flatten().tolist()
                raise ValueError(f"gram_schmidt: earlier components {bad} have (near-)zero norm; cannot orthogonalise")
            coef = (prev @ v) / denom
            v = v - coef @ prev
        out[k] = v
    if stop > start:
        out[start:stop] = out[start:stop] / out[start:stop].norm(dim=1, keepdim=True)
    return out.reshape(shape)


def replica_chunks(batch: int, replicas: int) -> list[slice]:
    """The pieces ``nn.DataParallel`` splits a batch into over ``replicas`` devices, as row slices
    (``Tensor.chunk`` sizes: ⌈B/r⌉ each, the last one smaller, and fewer pieces when B < r)."""
    size = -(-int(batch) // max(int(replicas), 1))
    return [slice(start, min(start + size, batch)) for start in range(0, int(batch), max(size, 1))]


# --------------------------------------------------------------------------------------------------
# Pools
# --------------------------------------------------------------------------------------------------
class PromptPool(nn.Module):
    """Base: ``forward(q, train, task) -> (prefixes {block: (keys, values)}, prompt loss)``.

    ``replicas`` reproduces a released run on that many ``nn.DataParallel`` devices. Each replica
    computes the prompt loss on its piece of the batch, and the pieces' losses are summed
    (``prompt_loss.sum()`` in the released learner). ``replicas=1`` is one device.
    """

    layers: tuple[int, ...]

    def start_task(self, task: int) -> None:  # noqa: B027 — optional hook
        """Called before training on task ``task`` (0-based)."""


def _check_even(length: int, what: str) -> int:
    if int(length) < 2 or int(length) % 2:
        raise ValueError(f"{what}: must be even and >= 2 (half keys, half values), got {length}")
    return int(length)


class DualPromptPool(PromptPool):
    """DualPrompt's prompts (released layout): g-prompts [g_length, D] in ``g_layers``; in each
    ``e_layers`` block a pool of ``pool_size`` e-prompts [e_length, D] with keys [pool_size, key_dim].

    * ``task_id_bootstrap`` (released: True): training uses task t's e-prompt and the loss
      mean_b(1 − cos(q_b, k_t)). With False, training selects top-``top_k`` by cosine, as at
      inference, and uses :func:`key_match_loss` with ``key_loss``.
    * Inference: top-``top_k`` keys (top-1 for DualPrompt), over the whole pool.
    * ``shared_keys`` (released: False). In the released code every e-block has its own keys and
      selects on its own, and the loss is the mean over the e-blocks. With True there is one key
      set for all e-blocks, one selection and one loss, as the DualPrompt paper describes.
    * A block in both lists gets [e-prefix; g-prefix] (e first), as released.
    """

    def __init__(
        self,
        dim: int,
        key_dim: int | None = None,
        pool_size: int = 10,
        e_length: int = 40,
        g_length: int = 10,
        g_layers: Sequence[int] = (0, 1),
        e_layers: Sequence[int] = (2, 3, 4),
        top_k: int = 1,
        task_id_bootstrap: bool = True,
        key_loss: Literal["released", "per_sample"] = "released",
        shared_keys: bool = False,
        replicas: int = 1,
    ):
        super().__init__()
        if key_loss not in KEY_LOSSES:
            raise ValueError(f"key_loss must be one of {KEY_LOSSES}, got {key_loss!r}")
        if int(pool_size) < 1 or not 1 <= int(top_k) <= int(pool_size):
            raise ValueError(f"need pool_size >= 1 and 1 <= top_k <= pool_size, got pool_size={pool_size}, "
                             f"top_k={top_k}")
        if int(replicas) < 1:
            raise ValueError(f"replicas must be >= 1, got {replicas}")
        self.dim = int(dim)
        self.key_dim = int(key_dim or dim)
        self.pool_size = int(pool_size)
        self.e_length = _check_even(e_length, "e_length") if e_layers else int(e_length)
        self.g_length = _check_even(g_length, "g_length") if g_layers else int(g_length)
        self.g_layers = tuple(int(x) for x in g_layers)
        self.e_layers = tuple(int(x) for x in e_layers)
        self.top_k = int(top_k)
        self.task_id_bootstrap = bool(task_id_bootstrap)
        self.key_loss = key_loss
        self.shared_keys = bool(shared_keys)
        self.replicas = int(replicas)
        self.layers = tuple(sorted(set(self.g_layers) | set(self.e_layers)))
        # released init order: all g-prompts, then per e-block its prompts and then its keys
        self.g_prompts = nn.ParameterDict({str(g): uniform_prompt(self.g_length, self.dim) for g in self.g_layers})
        self.e_prompts = nn.ParameterDict()
        self.e_keys = nn.ParameterDict()
        for e in self.e_layers:
            self.e_prompts[str(e)] = uniform_prompt(self.pool_size, self.e_length, self.dim)
            if not self.shared_keys:
                self.e_keys[str(e)] = uniform_prompt(self.pool_size, self.key_dim)
        if self.shared_keys and self.e_layers:
            self.e_keys["shared"] = uniform_prompt(self.pool_size, self.key_dim)

    def _key_groups(self) -> list[tuple[str, list[int]]]:
        if self.shared_keys:
            return [("shared", list(self.e_layers))] if self.e_layers else []
        return [(str(e), [e]) for e in self.e_layers]

    def select(self, query: Tensor) -> dict[int, Tensor]:
        """Inference selection: per e-block the top-``top_k`` key indices [B, top_k]."""
        out = {}
        for group, blocks in self._key_groups():
            idx = topk_keys(cosine_to_keys(query, self.e_keys[group]), self.top_k)
            for e in blocks:
                out[e] = idx
        return out

    def forward(self, query: Tensor, train: bool = False, task: int = 0) -> tuple[dict[int, Prefix], Tensor]:
        B = len(query)
        q = query.detach()
        e_prefix: dict[int, Prefix] = {}
        loss = q.new_zeros(())
        for group, blocks in self._key_groups():
            cos = cosine_to_keys(q, self.e_keys[group])
            if train and self.task_id_bootstrap:
                if not 0 <= int(task) < self.pool_size:
                    raise ValueError(f"task-id bootstrap: task {task} has no e-prompt (pool_size {self.pool_size})")
                idx = None
                pieces = [key_match_loss(cos[rows], int(task)) for rows in replica_chunks(B, self.replicas)]
            else:
                idx = topk_keys(cos, self.top_k)
                pieces = [key_match_loss(cos[rows], idx[rows], self.key_loss)
                          for rows in replica_chunks(B, self.replicas)] if train else []
            if pieces:  # one loss per key set; a shared key set stands for all its blocks
                loss = loss + torch.stack(pieces).sum() * len(blocks)
            for e in blocks:
                p = self.e_prompts[str(e)]
                e_prefix[e] = shared_prefix(p[int(task)], B) if idx is None else pool_prefix(p, idx)
        if self.e_layers:
            loss = loss / len(self.e_layers)  # released: summed over the blocks, divided by their number
        prefixes: dict[int, Prefix] = {}
        for layer in self.layers:
            parts = []
            if layer in e_prefix:
                parts.append(e_prefix[layer])
            if layer in self.g_layers:
                parts.append(shared_prefix(self.g_prompts[str(layer)], B))
            if len(parts) == 1:
                prefixes[layer] = parts[0]
            else:
                prefixes[layer] = (torch.cat([p[0] for p in parts], 1), torch.cat([p[1] for p in parts], 1))
        return prefixes, loss


class L2PPool(DualPromptPool):
    """L2P as released ("L2P++"): a pool of ``pool_size`` prompts [length, D] with keys in each block of
    ``layers`` (released: block 0 only, or 0–4 for the "deep" variant), top-``top_k`` selection by
    cosine in training and inference, and the key-matching loss :func:`key_match_loss` (``key_loss``)."""

    def __init__(
        self,
        dim: int,
        key_dim: int | None = None,
        pool_size: int = 30,
        length: int = 20,
        top_k: int = 5,
        layers: Sequence[int] = (0,),
        key_loss: Literal["released", "per_sample"] = "released",
        replicas: int = 1,
    ):
        super().__init__(dim, key_dim, pool_size=pool_size, e_length=length, g_length=0, g_layers=(),
                         e_layers=layers, top_k=top_k, task_id_bootstrap=False, key_loss=key_loss,
                         shared_keys=False, replicas=replicas)


class CodaPool(PromptPool):
    """CODA-Prompt's decomposed prompts in ``layers`` (released: 0–4). Per block there are components
    P [pool_size, length, D], keys K and attention vectors A [pool_size, key_dim].

    Task t owns components [t·c, (t+1)·c) with c = pool_size // n_tasks. At construction (task 0)
    and in :meth:`start_task` they are re-initialised by :func:`gram_schmidt`. Training on task t
    uses components [0, (t+1)·c): the past ones are detached, so they get zero gradient. Inference
    uses all seen components. Prefix = Σ_k α_k P_k with α = :func:`coda_weights`. Loss =
    ``ortho_mu`` × (ortho(K) + ortho(A) + ortho(P flattened)) over the components in use, averaged
    over the blocks (only in training, and only when ``ortho_mu > 0``).
    """

    def __init__(
        self,
        dim: int,
        n_tasks: int,
        key_dim: int | None = None,
        pool_size: int = 100,
        length: int = 8,
        ortho_mu: float = 0.0,
        layers: Sequence[int] = (0, 1, 2, 3, 4),
        replicas: int = 1,
    ):
        super().__init__()
        if int(n_tasks) < 1 or int(pool_size) // int(n_tasks) < 1:
            raise ValueError(f"pool_size ({pool_size}) must hold at least one component per task (n_tasks {n_tasks})")
        if int(replicas) < 1:
            raise ValueError(f"replicas must be >= 1, got {replicas}")
        self.dim = int(dim)
        self.key_dim = int(key_dim or dim)
        self.n_tasks = int(n_tasks)
        self.pool_size = int(pool_size)
        self.length = _check_even(length, "length")
        self.ortho_mu = float(ortho_mu)
        self.layers = tuple(int(x) for x in layers)
        self.replicas = int(replicas)
        self.per_task = self.pool_size // self.n_tasks
        # the current task: a buffer (saved with the state) mirrored by a Python int, so that forward
        # never reads a device tensor (no host sync per batch)
        self.register_buffer("task_count", torch.zeros((), dtype=torch.long))
        self._task = 0
        self.register_load_state_dict_post_hook(_sync_task_count)
        self.prompts = nn.ParameterDict()
        self.keys = nn.ParameterDict()
        self.attn = nn.ParameterDict()
        for layer in self.layers:  # released order: U(P), U(K), U(A), then GS(P), GS(K), GS(A), per block
            p = uniform_prompt(self.pool_size, self.length, self.dim)
            k = uniform_prompt(self.pool_size, self.key_dim)
            a = uniform_prompt(self.pool_size, self.key_dim)
            with torch.no_grad():
                for t in (p, k, a):
                    t.copy_(gram_schmidt(t, 0, self.per_task))
            self.prompts[str(layer)], self.keys[str(layer)], self.attn[str(layer)] = p, k, a

    def _span(self, task: int) -> tuple[int, int]:
        return task * self.per_task, (task + 1) * self.per_task

    @torch.no_grad()
    def start_task(self, task: int, generator: torch.Generator | None = None) -> None:
        """Gram-Schmidt re-initialisation of task ``task``'s components (released ``process_task_count``:
        per block K, then A, then P). Task 0's were set at construction; calling again for the
        current task does nothing."""
        task = int(task)
        if task >= self.n_tasks:
            raise ValueError(f"CODA-P: task {task} exceeds n_tasks = {self.n_tasks} (the pool is split per task)")
        if task == self._task:
            return
        if task != self._task + 1:
            raise ValueError(f"CODA-P: tasks must come in order; at task {self._task}, asked for {task}")
        self.task_count.fill_(task)
        self._task = task
        s, f = self._span(task)
        for layer in self.layers:
            for t in (self.keys[str(layer)], self.attn[str(layer)], self.prompts[str(layer)]):
                t.copy_(gram_schmidt(t, s, f, generator))

    def components(self, layer: int, train: bool) -> tuple[Tensor, Tensor, Tensor]:
        """(K, A, P) in use at block ``layer``: training on the current task t uses [0, (t+1)·c) with
        [0, t·c) detached; inference uses [0, (t+1)·c)."""
        K, A, P = self.keys[str(layer)], self.attn[str(layer)], self.prompts[str(layer)]
        s, f = self._span(self._task)
        if train and s > 0:
            return (torch.cat([K[:s].detach(), K[s:f]]), torch.cat([A[:s].detach(), A[s:f]]),
                    torch.cat([P[:s].detach(), P[s:f]]))
        if train:
            return K[s:f], A[s:f], P[s:f]
        return K[:f], A[:f], P[:f]

    def weights(self, query: Tensor, layer: int, train: bool = False) -> Tensor:
        """α [B, components in use] at block ``layer``."""
        K, A, _ = self.components(layer, train)
        return coda_weights(query, A, K)

    def forward(self, query: Tensor, train: bool = False, task: int = 0) -> tuple[dict[int, Prefix], Tensor]:
        B = len(query)
        prefixes: dict[int, Prefix] = {}
        loss = query.new_zeros(())
        n_chunks = len(replica_chunks(B, self.replicas))
        for layer in self.layers:
            K, A, P = self.components(layer, train)
            prefixes[layer] = coda_prefix(coda_weights(query, A, K), P)
            if train and self.ortho_mu > 0:
                pen = ortho_penalty(K) + ortho_penalty(A) + ortho_penalty(P.reshape(len(P), -1))
                loss = loss + pen * self.ortho_mu * n_chunks  # every replica adds the same penalty
        if self.layers:
            loss = loss / len(self.layers)
        return prefixes, loss


def _sync_task_count(module: CodaPool, incompatible_keys) -> None:
    module._task = int(module.task_count)
