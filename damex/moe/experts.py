"""Batched expert FFNs: ``E`` independent ``Linear(d, h) -> act -> Dropout -> Linear(h, d)``.

The experts consume tokens already **sorted by expert** (``counts[e]`` consecutive rows per
expert, see :mod:`damex.moe.dispatch`), so no ``[T, E, C]`` dispatch tensor and no padding is
ever built: memory is ``O(N * (d + h))`` for ``N`` routed tokens, like the dense FFN.

All experts run inside one autograd function (:class:`_ExpertFFNFunction`) over grouped
contiguous slices, with a hand-written backward: no per-token bias gathers, no zero-filled
``[E, ...]`` gradients, no concatenations. Each expert is an ordinary ``nn.Linear`` pair
(:class:`ExpertFFN`), so its parameters and gradients are separate ``[h, d]`` tensors (a stacked
``[E, h, d]`` gradient of >= 32 MiB is a fresh, page-faulting ``mmap`` on every CPU backward).

Only public PyTorch ops run (``nn.functional`` activations; their derivatives from each
activation's own one-node autograd graph, built in the forward and run in the backward).

CPU threading (automatic, ``threaded=None``; ``False`` turns it off): when the per-expert GEMMs
are small, the rows are split into one contiguous range per intra-op thread and each thread
runs whole GEMMs single-threaded on a small worker pool. MKL reaches only ~50% of peak on the
small per-expert weight-gradient GEMMs when it splits one GEMM over 2 threads, but ~100% of a
core when each core owns whole GEMMs, and on a busy machine one OpenMP barrier per small op
stalls whenever another process holds a core. The price: ``torch.set_num_threads(1)`` during
the call is **process-wide** (other Python threads of the process run single-threaded
meanwhile; the count is restored before the call returns). ``python -m damex.moe.bench
--threaded`` measures what it buys (README, Benchmarks): it is the one remaining trick.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ACTIVATIONS", "ExpertFFN", "Experts", "expert_ffn"]

ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "silu")

# Automatic CPU threading (measured on the 2-core dev box, d=256, h=2048): below this many
# multiply-adds per GEMM, thread dispatch costs more than it saves; above this many rows per
# expert, MKL's own multi-threaded GEMMs are as fast (and per-thread buffers of that size get
# page-faulted again on every call by glibc's worker-thread arenas).
_THREAD_MIN_MACS = 1 << 24
_THREAD_MAX_ROWS_PER_EXPERT = 512

_pool_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_pool_size = 0


def _get_pool(num_workers: int) -> ThreadPoolExecutor:
    """A lazily created worker pool (cache only; it holds no state between calls)."""
    global _pool, _pool_size
    with _pool_lock:
        if _pool is None or _pool_size != num_workers:
            if _pool is not None:
                _pool.shutdown(wait=True)
            _pool = ThreadPoolExecutor(max_workers=num_workers, thread_name_prefix="damex-moe")
            _pool_size = num_workers
        return _pool


_ACT_FNS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": F.gelu,
    "gelu_tanh": functools.partial(F.gelu, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}


def _act_forward(name: str, a: Tensor, record: bool) -> tuple[Tensor, Tensor | None]:
    """``act(a)``, and (``record``, non-ReLU) the activation's own one-node autograd graph for
    the backward: its derivative then runs on the saved input without recomputing the forward
    (public ops; an erf-GELU pass over ``[N, h]`` is ~1 ms per million elements here). ``a``
    must be a fresh tensor without history (it becomes the graph's leaf)."""
    if not record or name == "relu":
        return _ACT_FNS[name](a), None
    with torch.enable_grad():
        out = _ACT_FNS[name](a.requires_grad_(True))
    return out.detach(), out


def _act_backward(name: str, grad: Tensor, a: Tensor, graph: Tensor | None) -> Tensor:
    """``grad * act'(a)``: ReLU's mask, otherwise the graph :func:`_act_forward` recorded."""
    if name == "relu":
        return grad * (a > 0)
    assert graph is not None  # a backward runs only when the forward recorded
    # retained: the outer graph may be run again (retain_graph=True, gradcheck); the node holds
    # only ``a``, which the caller keeps anyway
    (out,) = torch.autograd.grad(graph, a, grad, retain_graph=True)
    return out


# A work item: (expert, first row, end row, whether this item holds all rows of the expert).
_Item = tuple[int, int, int, bool]


def _plan_items(counts: Sequence[int], num_parts: int) -> list[list[_Item]]:
    """Split the expert-sorted rows ``[0, N)`` into ``num_parts`` equal contiguous ranges.

    Each range becomes a list of per-expert items; at most ``num_parts - 1`` experts straddle
    two ranges (their weight gradients are then summed from partial results).
    """
    total = sum(counts)
    bounds = [round(total * i / num_parts) for i in range(num_parts + 1)]
    starts = [0]
    for c in counts:
        starts.append(starts[-1] + c)
    parts: list[list[_Item]] = []
    for p in range(num_parts):
        lo, hi = bounds[p], bounds[p + 1]
        items: list[_Item] = []
        for e, c in enumerate(counts):
            s, t = max(starts[e], lo), min(starts[e] + c, hi)
            if s < t:
                items.append((e, s, t, s == starts[e] and t == starts[e] + c))
        parts.append(items)
    return parts


def _run_parts(parts: list[list[_Item]], fn: Callable[[list[_Item]], None], threaded: bool) -> None:
    """Run ``fn`` on every part: on the worker pool with single-threaded ops, or inline."""
    if not threaded or len(parts) == 1:
        for items in parts:
            fn(items)
        return
    pool = _get_pool(len(parts) - 1)
    prev = torch.get_num_threads()
    # grad and inference mode are thread-local: workers must not record graphs, and under
    # inference_mode they must write into the caller's inference tensors in that mode too
    inference = torch.is_inference_mode_enabled()

    def task(items: list[_Item]) -> None:
        with torch.inference_mode() if inference else torch.no_grad():
            fn(items)

    # The thread count is process-wide: every GEMM below runs single-threaded, one part per
    # core (the calling thread takes the first part).
    torch.set_num_threads(1)
    try:
        futures = [pool.submit(task, items) for items in parts[1:]]
        try:
            task(parts[0])
        finally:
            for fut in futures:
                fut.result()
    finally:
        torch.set_num_threads(prev)


@dataclass(frozen=True)
class _Meta:
    counts: tuple[int, ...]
    activation: str
    drop_scale: float
    threaded: bool
    has_b2: bool
    record: bool  # a backward will run: keep each activation's autograd graph


class _ExpertFFNFunction(torch.autograd.Function):
    """``y[rows of e] = act(x W1[e]^T + b1[e]) (* dropout mask) W2[e]^T + b2[e]`` for all e.

    The parameters arrive as ``E`` separate tensors per kind (``w1 * E, b1 * E, w2 * E[, b2 *
    E]``). Activations are allocated per (expert, part) item and the weight gradients per
    expert: with glibc, a single CPU allocation >= 32 MiB is a fresh ``mmap`` every time and
    its first touch page-faults (~12 ms for 32 MiB here), which a stacked ``[E, h, d]``
    gradient hits on every backward for ``E = 16``.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        x: Tensor,  # [N, d] rows sorted by expert
        drop_mask: Tensor | None,  # [N, h] bool, or None
        meta: _Meta,
        *params: Tensor,
    ) -> Tensor:
        num_experts = len(meta.counts)
        w1, b1 = params[:num_experts], params[num_experts : 2 * num_experts]
        w2 = params[2 * num_experts : 3 * num_experts]
        b2 = params[3 * num_experts :] if meta.has_b2 else None
        y = x.new_empty(x.shape[0], w2[0].shape[0])  # [N, d]
        parts = _plan_items(meta.counts, torch.get_num_threads() if meta.threaded else 1)
        flat = [item for items in parts for item in items]
        index = {item: i for i, item in enumerate(flat)}
        acts: list[Tensor | None] = [None] * (2 * len(flat))  # per item: pre-act, post-act
        graphs: list[Tensor | None] = [None] * len(flat)  # per item: the activation's graph

        def run(items: list[_Item]) -> None:
            for item in items:
                e, s, t, _ = item
                a = torch.addmm(b1[e], x[s:t], w1[e].t())  # [M, h]
                hid, graphs[index[item]] = _act_forward(meta.activation, a, meta.record)
                if drop_mask is not None:
                    # out of place: ``hid`` may share its storage with the saved graph
                    hid = hid.mul(drop_mask[s:t]).mul_(meta.drop_scale)
                if b2 is None:
                    torch.mm(hid, w2[e].t(), out=y[s:t])
                else:
                    torch.addmm(b2[e], hid, w2[e].t(), out=y[s:t])
                i = index[item]
                acts[2 * i], acts[2 * i + 1] = a, hid

        _run_parts(parts, run, meta.threaded)
        ctx.save_for_backward(x, drop_mask, *params, *acts)
        ctx.meta = meta
        ctx.parts = parts
        ctx.graphs = graphs
        return y

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, gy: Tensor
    ) -> tuple[Tensor | None, ...]:
        meta: _Meta = ctx.meta
        parts: list[list[_Item]] = ctx.parts
        num_experts = len(meta.counts)
        saved = ctx.saved_tensors
        x, drop_mask = saved[0], saved[1]
        num_params = (4 if meta.has_b2 else 3) * num_experts
        params, acts = saved[2 : 2 + num_params], saved[2 + num_params :]
        w1, w2 = params[:num_experts], params[2 * num_experts : 3 * num_experts]
        needs = ctx.needs_input_grad[3:]
        need_w1, need_b1 = needs[0], needs[num_experts]
        need_w2 = needs[2 * num_experts]
        need_b2 = meta.has_b2 and needs[3 * num_experts]
        gy = gy.contiguous()
        gx = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        # grads[kind][e]: kinds w1, b1, w2, b2; partial results of split experts are summed.
        grads: list[list[Tensor | None]] = [[None] * num_experts for _ in range(4)]
        partials: list[tuple[int, list[Tensor | None]]] = []
        lock = threading.Lock()
        flat = [item for items in parts for item in items]
        index = {item: i for i, item in enumerate(flat)}

        def run(items: list[_Item]) -> None:
            for item in items:
                e, s, t, whole = item
                i = index[item]
                a, hid = acts[2 * i], acts[2 * i + 1]
                g = gy[s:t]  # [M, d]
                out: list[Tensor | None] = [None] * 4
                if need_w2:
                    out[2] = g.t() @ hid  # [d, h]
                if need_b2:
                    out[3] = g.sum(0)
                gh = g @ w2[e]  # [M, h]
                if drop_mask is not None:
                    gh.mul_(drop_mask[s:t]).mul_(meta.drop_scale)
                ga = _act_backward(meta.activation, gh, a, ctx.graphs[i])  # [M, h]
                if need_w1:
                    out[0] = ga.t() @ x[s:t]  # [h, d]
                if need_b1:
                    out[1] = ga.sum(0)
                if gx is not None:
                    torch.mm(ga, w1[e], out=gx[s:t])
                if whole:
                    for kind in range(4):
                        grads[kind][e] = out[kind]
                else:
                    with lock:
                        partials.append((e, out))

        _run_parts(parts, run, meta.threaded)
        for e, out in sorted(partials, key=lambda p: p[0]):
            for kind in range(4):
                part = out[kind]
                if part is not None:
                    prev = grads[kind][e]
                    grads[kind][e] = part if prev is None else prev + part
        # Experts that received no rows: zero gradients (as autograd would give).
        wants = (need_w1, need_b1, need_w2, need_b2)
        for kind, want in enumerate(wants):
            for e in range(num_experts):
                if want and grads[kind][e] is None:
                    grads[kind][e] = torch.zeros_like(params[kind * num_experts + e])
        flat_grads = [g for kind in range(4 if meta.has_b2 else 3) for g in grads[kind]]
        return (gx, None, None, *flat_grads)


def expert_ffn(
    x: Tensor,
    counts: Sequence[int],
    w1: Sequence[Tensor],
    b1: Sequence[Tensor],
    w2: Sequence[Tensor],
    b2: Sequence[Tensor] | None,
    *,
    activation: str = "gelu",
    dropout: float = 0.0,
    training: bool = False,
    threaded: bool | None = None,
) -> Tensor:
    """Apply expert ``e`` to its ``counts[e]`` consecutive rows of ``x``, for every expert.

    Args:
        x: ``[N, d]`` rows sorted by expert, ``N == sum(counts)``.
        counts: ``E`` non-negative ints.
        w1: ``E`` fc1 weights ``[h, d]`` (``nn.Linear`` layout); b1: ``E`` biases ``[h]``.
        w2: ``E`` fc2 weights ``[d, h]``; b2: ``E`` biases ``[d]``, or None.
        activation: one of :data:`ACTIVATIONS`.
        dropout: dropout probability on the hidden activations (training only).
        training: whether dropout is active.
        threaded: CPU only: one contiguous row range per intra-op thread, each thread running
            single-threaded GEMMs; sets the process-wide thread count to 1 during the call
            (module docstring). None = automatic (CPU, > 1 thread, enough work, at most 512
            rows per expert on average); False = plain ops on the calling thread only.

    Returns:
        ``[N, d]``, in ``x``'s dtype (autocast is resolved by the caller, see :class:`Experts`).
    """
    counts = tuple(int(c) for c in counts)
    num_experts = len(w1)
    if not (len(counts) == len(b1) == len(w2) == num_experts) or (
        b2 is not None and len(b2) != num_experts
    ):
        raise ValueError(
            f"expert_ffn: got {len(counts)} counts and {num_experts}/{len(b1)}/{len(w2)}"
            f"/{'-' if b2 is None else len(b2)} tensors for w1/b1/w2/b2"
        )
    if sum(counts) != x.shape[0]:
        raise ValueError(f"expert_ffn: counts sum to {sum(counts)} but x has {x.shape[0]} rows")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    hidden = w1[0].shape[0]
    if threaded is None:
        macs = x.shape[0] * hidden * x.shape[1]
        rows_per_expert = x.shape[0] / max(1, sum(c > 0 for c in counts))
        threaded = macs >= _THREAD_MIN_MACS and rows_per_expert <= _THREAD_MAX_ROWS_PER_EXPERT
    # a worker pool and a process-wide thread count cannot be traced (torch.compile)
    threaded = (
        bool(threaded)
        and x.device.type == "cpu"
        and torch.get_num_threads() > 1
        and not torch.compiler.is_compiling()
    )
    drop_mask, drop_scale = None, 1.0
    if training and dropout > 0.0:
        # Drawn here, on the calling thread, so that results do not depend on thread timing.
        drop_mask = torch.empty(x.shape[0], hidden, device=x.device).bernoulli_(1 - dropout)
        drop_mask = drop_mask.bool()
        drop_scale = 1.0 / (1.0 - dropout)
    params = [*w1, *b1, *w2, *(b2 if b2 is not None else [])]
    record = torch.is_grad_enabled() and any(t.requires_grad for t in (x, *params))
    meta = _Meta(counts, activation, drop_scale, bool(threaded), b2 is not None, record)
    return _ExpertFFNFunction.apply(x.contiguous(), drop_mask, meta, *params)


class ExpertFFN(nn.Module):
    """One expert: ``fc2(Dropout(act(fc1(x))))``, the dense FFN's layout and init.

    Args:
        d_model: ``d``.
        hidden_dim: ``h``.
        activation: one of :data:`ACTIVATIONS`.
        dropout: dropout on the hidden activations.
        fc2_bias: whether fc2 has a bias.
    """

    def __init__(
        self,
        *,
        d_model: int,
        hidden_dim: int,
        activation: str = "gelu",
        dropout: float = 0.0,
        fc2_bias: bool = True,
    ) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_model, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, d_model, bias=fc2_bias)
        self.activation = activation
        self.dropout = dropout

    def forward(self, x: Tensor) -> Tensor:
        """Reference path with plain autograd ops: ``[M, d] -> [M, d]``."""
        act = {
            "gelu": F.gelu,
            "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
            "relu": F.relu,
            "silu": F.silu,
        }[self.activation]
        hid = F.dropout(act(self.fc1(x)), self.dropout, self.training)
        return self.fc2(hid)


class Experts(nn.Module):
    """Independent two-layer FFN experts computed together by :func:`expert_ffn`.

    Each expert is an :class:`ExpertFFN` (``nn.Linear`` pair) in ``self.ffn``, a ``ModuleDict``
    keyed by the **global** expert id, so parameter names are ``ffn.<id>.fc1.weight`` etc. and
    the shards of an expert-parallel layer (``first_expert > 0``) never clash: merging the
    shards' state dicts gives the single-process state dict.

    Init: every expert is initialized exactly like a fresh dense FFN (``nn.Linear`` defaults).
    The official DAMEX init, where a transformer-wide ``xavier_uniform_`` turns the "disabled"
    fc2 bias into a frozen random vector (docs/design.md §3.4 Q9), is deliberately **not**
    reproduced;
    ``reset_parameters("xavier")`` gives the DINO dense-FFN init (xavier weights, zero biases).

    Args:
        num_experts: experts held by this module.
        d_model: token width ``d``.
        hidden_dim: expert hidden width ``h``.
        activation: one of :data:`ACTIVATIONS`.
        dropout: dropout on the hidden activations.
        fc2_bias: whether fc2 has a (trainable) bias.
        cpu_threads: see ``threaded`` in :func:`expert_ffn` (None = automatic).
        first_expert: global id of the first expert held here.
    """

    def __init__(
        self,
        *,
        num_experts: int,
        d_model: int,
        hidden_dim: int,
        activation: str = "gelu",
        dropout: float = 0.0,
        fc2_bias: bool = True,
        cpu_threads: bool | None = None,
        first_expert: int = 0,
    ) -> None:
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.d_model = d_model
        self.hidden_dim = hidden_dim
        self.activation = activation
        self.dropout = dropout
        self.has_fc2_bias = fc2_bias
        self.cpu_threads = cpu_threads
        self.ffn = nn.ModuleDict(
            {
                str(first_expert + i): ExpertFFN(
                    d_model=d_model,
                    hidden_dim=hidden_dim,
                    activation=activation,
                    dropout=dropout,
                    fc2_bias=fc2_bias,
                )
                for i in range(num_experts)
            }
        )

    @property
    def num_experts(self) -> int:
        return len(self.ffn)

    @property
    def expert_ids(self) -> list[int]:
        """Global ids of the experts held here, in order."""
        return [int(k) for k in self.ffn]

    def __getitem__(self, index: int) -> ExpertFFN:
        """The ``index``-th expert held here (local position, not global id)."""
        return list(self.ffn.values())[index]  # type: ignore[return-value]

    def keep_(self, expert_ids: Sequence[int]) -> None:
        """Drop every expert whose global id is not in ``expert_ids`` (expert-parallel shards)."""
        keep = {str(int(e)) for e in expert_ids}
        missing = sorted(int(e) for e in keep - set(self.ffn))
        if missing:
            raise ValueError(f"experts {missing} not held here (held: {self.expert_ids})")
        for key in list(self.ffn):
            if key not in keep:
                del self.ffn[key]

    def extra_repr(self) -> str:
        return (
            f"experts={self.expert_ids}, d_model={self.d_model}, hidden_dim={self.hidden_dim}, "
            f"activation={self.activation}, dropout={self.dropout}"
        )

    @torch.no_grad()
    def reset_parameters(self, scheme: str = "linear") -> None:
        """Re-initialize every expert.

        Args:
            scheme: ``"linear"``: ``nn.Linear``'s default; ``"xavier"``: ``xavier_uniform_``
                weights and zero biases (DINO's init of its dense FFNs).
        """
        if scheme not in ("linear", "xavier"):
            raise ValueError(f"scheme must be 'linear' or 'xavier', got {scheme!r}")
        for expert in self.ffn.values():
            for layer in (expert.fc1, expert.fc2):
                if scheme == "linear":
                    layer.reset_parameters()
                else:
                    nn.init.xavier_uniform_(layer.weight)
                    if layer.bias is not None:
                        nn.init.zeros_(layer.bias)

    @torch.no_grad()
    def zero_output_(self) -> None:
        """Zero every expert's fc2 weight and bias: each expert then outputs 0 (and its fc1
        gets gradients once fc2 has moved away from 0)."""
        for expert in self.ffn.values():
            nn.init.zeros_(expert.fc2.weight)
            if expert.fc2.bias is not None:
                nn.init.zeros_(expert.fc2.bias)

    @torch.no_grad()
    def load_dense_(
        self, fc1: nn.Linear, fc2: nn.Linear, experts: Sequence[int] | None = None
    ) -> None:
        """Copy a dense FFN ``fc2(act(fc1(x)))`` into the given experts (default: all).

        Args:
            fc1: ``nn.Linear(d, h)`` with bias.
            fc2: ``nn.Linear(h, d)``; without a bias, the experts' fc2 bias is zeroed.
            experts: local positions of the experts to overwrite; None = all ("upcycling").
        """
        if tuple(fc1.weight.shape) != (self.hidden_dim, self.d_model):
            raise ValueError(
                f"fc1 weight must be [{self.hidden_dim}, {self.d_model}], "
                f"got {tuple(fc1.weight.shape)}"
            )
        if tuple(fc2.weight.shape) != (self.d_model, self.hidden_dim):
            raise ValueError(
                f"fc2 weight must be [{self.d_model}, {self.hidden_dim}], "
                f"got {tuple(fc2.weight.shape)}"
            )
        if fc1.bias is None:
            raise ValueError("fc1 must have a bias (the experts' fc1 always has one)")
        if fc2.bias is not None and not self.has_fc2_bias:
            raise ValueError("fc2 has a bias but these experts were built with fc2_bias=False")
        for i in range(self.num_experts) if experts is None else experts:
            expert = self[i]
            expert.fc1.weight.copy_(fc1.weight)
            expert.fc1.bias.copy_(fc1.bias)
            expert.fc2.weight.copy_(fc2.weight)
            if expert.fc2.bias is not None:
                if fc2.bias is None:
                    expert.fc2.bias.zero_()
                else:
                    expert.fc2.bias.copy_(fc2.bias)

    def forward(self, x: Tensor, counts: Sequence[int]) -> Tensor:
        """Apply each expert to its rows.

        Args:
            x: ``[N, d]`` rows sorted by expert (local order).
            counts: ``num_experts`` ints, rows per expert (summing to ``N``).

        Returns:
            ``[N, d]``; under autocast, in the autocast dtype (like ``nn.Linear``).
        """
        experts = list(self.ffn.values())
        w1 = [e.fc1.weight for e in experts]
        b1 = [e.fc1.bias for e in experts]
        w2 = [e.fc2.weight for e in experts]
        b2 = [e.fc2.bias for e in experts] if self.has_fc2_bias else None
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type):
            dtype = torch.get_autocast_dtype(device_type)
            cast = lambda ts: None if ts is None else [t.to(dtype) for t in ts]  # noqa: E731
            x, w1, b1, w2, b2 = x.to(dtype), cast(w1), cast(b1), cast(w2), cast(b2)
            with torch.autocast(device_type, enabled=False):
                return self._run(x, counts, w1, b1, w2, b2)
        if x.dtype != w1[0].dtype:
            raise TypeError(f"Experts: input dtype {x.dtype} != parameter dtype {w1[0].dtype}")
        return self._run(x, counts, w1, b1, w2, b2)

    def _run(
        self,
        x: Tensor,
        counts: Sequence[int],
        w1: list[Tensor],
        b1: list[Tensor],
        w2: list[Tensor],
        b2: list[Tensor] | None,
    ) -> Tensor:
        if len(counts) != self.num_experts:
            raise ValueError(f"Experts: got {len(counts)} counts for {self.num_experts} experts")
        return expert_ffn(
            x,
            counts,
            w1,
            b1,
            w2,
            b2,
            activation=self.activation,
            dropout=self.dropout,
            training=self.training,
            threaded=self.cpu_threads,
        )
