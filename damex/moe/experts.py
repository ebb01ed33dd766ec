"""Batched expert FFNs: ``E`` independent ``Linear(d, h) -> act -> Dropout -> Linear(h, d)``.

The experts consume tokens already **sorted by expert** (``counts[e]`` consecutive rows per
expert, see :mod:`damex.moe.dispatch`), so no ``[T, E, C]`` dispatch tensor and no padding is
ever built: memory is ``O(N * (d + h))`` for ``N`` routed tokens, like the dense FFN.

All experts run inside one autograd function (:class:`_ExpertFFNFunction`) with a hand-written
backward. Compared with composing autograd ops per expert this avoids (a) the
``w[e]``-indexing backward, which materializes a full ``[E, h, d]`` zero gradient per expert,
and (b) gathers of per-token biases. On CPU with several intra-op threads, the rows are split
into one contiguous range per thread and each thread runs its GEMMs single-threaded: MKL
reaches ~50% of peak on the small per-expert weight-gradient GEMMs (``K = rows of one
expert``) when it splits one GEMM over threads, but ~100% per core when each core owns whole
GEMMs (measured on the 2-core dev box; see ``damex.moe.bench``).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ACTIVATIONS", "Experts", "expert_ffn"]

ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "silu")

# Below this many multiply-adds per forward GEMM pair, thread dispatch costs more than it saves.
_THREAD_MIN_MACS = 1 << 24

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


def _act_forward(name: str, a: Tensor, out: Tensor) -> None:
    if name == "gelu":
        torch._C._nn.gelu(a, approximate="none", out=out)
    elif name == "gelu_tanh":
        torch._C._nn.gelu(a, approximate="tanh", out=out)
    elif name == "relu":
        torch.clamp_min(a, 0, out=out)
    else:  # silu
        torch._C._nn.silu(a, out=out)


def _act_backward(name: str, grad: Tensor, a: Tensor) -> Tensor:
    if name == "gelu":
        return torch.ops.aten.gelu_backward(grad, a, approximate="none")
    if name == "gelu_tanh":
        return torch.ops.aten.gelu_backward(grad, a, approximate="tanh")
    if name == "relu":
        return torch.ops.aten.threshold_backward(grad, a, 0)
    return torch.ops.aten.silu_backward(grad, a)


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
    pool = _get_pool(len(parts))
    prev = torch.get_num_threads()

    def task(items: list[_Item]) -> None:
        with torch.no_grad():  # grad mode is thread-local; workers must not record graphs
            fn(items)

    torch.set_num_threads(1)
    try:
        futures = [pool.submit(task, items) for items in parts]
        for fut in futures:
            fut.result()
    finally:
        torch.set_num_threads(prev)


class _ExpertFFNFunction(torch.autograd.Function):
    """``y[rows of e] = act(x W1[e]^T + b1[e]) (* dropout mask) W2[e]^T + b2[e]`` for all e."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        x: Tensor,  # [N, d] rows sorted by expert
        w1: Tensor,  # [E, h, d]
        b1: Tensor,  # [E, h]
        w2: Tensor,  # [E, d, h]
        b2: Tensor | None,  # [E, d]
        counts: tuple[int, ...],
        activation: str,
        drop_mask: Tensor | None,  # [N, h] bool, or None
        drop_scale: float,
        threaded: bool,
    ) -> Tensor:
        n, d = x.shape
        h = w1.shape[1]
        a = x.new_empty(n, h)  # [N, h] pre-activation
        hid = x.new_empty(n, h)  # [N, h] post-activation (and dropout)
        y = x.new_empty(n, d)  # [N, d]

        def run(items: list[_Item]) -> None:
            for e, s, t, _ in items:
                torch.addmm(b1[e], x[s:t], w1[e].t(), out=a[s:t])
                _act_forward(activation, a[s:t], hid[s:t])
                if drop_mask is not None:
                    hid[s:t].mul_(drop_mask[s:t]).mul_(drop_scale)
                if b2 is None:
                    torch.mm(hid[s:t], w2[e].t(), out=y[s:t])
                else:
                    torch.addmm(b2[e], hid[s:t], w2[e].t(), out=y[s:t])

        parts = _plan_items(counts, torch.get_num_threads() if threaded else 1)
        _run_parts(parts, run, threaded)
        ctx.save_for_backward(x, w1, w2, a, hid, drop_mask)
        ctx.counts = counts
        ctx.activation = activation
        ctx.drop_scale = drop_scale
        ctx.threaded = threaded
        ctx.has_b2 = b2 is not None
        return y

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, gy: Tensor
    ) -> tuple[Tensor | None, ...]:
        x, w1, w2, a, hid, drop_mask = ctx.saved_tensors
        need_x, need_w1, need_b1, need_w2, need_b2 = ctx.needs_input_grad[:5]
        gy = gy.contiguous()
        num_experts = w1.shape[0]
        gx = torch.zeros_like(x) if need_x else None
        gw1 = torch.zeros_like(w1) if need_w1 else None
        gb1 = w1.new_zeros(num_experts, w1.shape[1]) if need_b1 else None
        gw2 = torch.zeros_like(w2) if need_w2 else None
        gb2 = w2.new_zeros(num_experts, w2.shape[1]) if (need_b2 and ctx.has_b2) else None
        # Experts split over two parts get partial weight gradients, summed afterwards.
        partials: list[tuple[int, Tensor | None, Tensor | None, Tensor | None, Tensor | None]] = []
        lock = threading.Lock()
        activation, drop_scale = ctx.activation, ctx.drop_scale

        def run(items: list[_Item]) -> None:
            for e, s, t, whole in items:
                g = gy[s:t]  # [M, d]
                pw2 = pb2 = pw1 = pb1 = None
                if gw2 is not None:
                    pw2 = torch.mm(g.t(), hid[s:t], out=gw2[e]) if whole else g.t() @ hid[s:t]
                if gb2 is not None:
                    pb2 = torch.sum(g, 0, out=gb2[e]) if whole else g.sum(0)
                gh = g @ w2[e]  # [M, h]
                if drop_mask is not None:
                    gh.mul_(drop_mask[s:t]).mul_(drop_scale)
                ga = _act_backward(activation, gh, a[s:t])  # [M, h]
                if gw1 is not None:
                    pw1 = torch.mm(ga.t(), x[s:t], out=gw1[e]) if whole else ga.t() @ x[s:t]
                if gb1 is not None:
                    pb1 = torch.sum(ga, 0, out=gb1[e]) if whole else ga.sum(0)
                if gx is not None:
                    torch.mm(ga, w1[e], out=gx[s:t])
                if not whole:
                    with lock:
                        partials.append((e, pw1, pb1, pw2, pb2))

        parts = _plan_items(ctx.counts, torch.get_num_threads() if ctx.threaded else 1)
        _run_parts(parts, run, ctx.threaded)
        for e, pw1, pb1, pw2, pb2 in partials:
            for full, part in ((gw1, pw1), (gb1, pb1), (gw2, pw2), (gb2, pb2)):
                if full is not None and part is not None:
                    full[e].add_(part)
        return gx, gw1, gb1, gw2, gb2, None, None, None, None, None


def expert_ffn(
    x: Tensor,
    counts: Sequence[int],
    w1: Tensor,
    b1: Tensor,
    w2: Tensor,
    b2: Tensor | None,
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
        w1: ``[E, h, d]`` fc1 weights (``nn.Linear`` layout per expert); b1: ``[E, h]``.
        w2: ``[E, d, h]`` fc2 weights; b2: ``[E, d]`` or None.
        activation: one of :data:`ACTIVATIONS`.
        dropout: dropout probability on the hidden activations (training only).
        training: whether dropout is active.
        threaded: CPU only: one contiguous row range per intra-op thread, each thread running
            single-threaded GEMMs. None = automatic (CPU, > 1 thread, enough work).

    Returns:
        ``[N, d]``, in ``x``'s dtype (autocast is resolved by the caller, see :class:`Experts`).
    """
    counts = tuple(int(c) for c in counts)
    if len(counts) != w1.shape[0]:
        raise ValueError(f"expert_ffn: got {len(counts)} counts for {w1.shape[0]} experts")
    if sum(counts) != x.shape[0]:
        raise ValueError(f"expert_ffn: counts sum to {sum(counts)} but x has {x.shape[0]} rows")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if threaded is None:
        macs = x.shape[0] * w1.shape[1] * w1.shape[2]
        threaded = x.device.type == "cpu" and torch.get_num_threads() > 1
        threaded = threaded and macs >= _THREAD_MIN_MACS
    elif threaded and x.device.type != "cpu":
        threaded = False
    drop_mask, drop_scale = None, 1.0
    if training and dropout > 0.0:
        # Drawn here, on the calling thread, so that results do not depend on thread timing.
        drop_mask = torch.empty(x.shape[0], w1.shape[1], device=x.device).bernoulli_(1 - dropout)
        drop_mask = drop_mask.bool()
        drop_scale = 1.0 / (1.0 - dropout)
    x = x.contiguous()
    return _ExpertFFNFunction.apply(
        x, w1, b1, w2, b2, counts, activation, drop_mask, drop_scale, bool(threaded)
    )


class Experts(nn.Module):
    """``num_experts`` independent two-layer FFNs computed together.

    Parameters (``nn.Linear`` layout per expert): ``fc1_weight [E, h, d]``, ``fc1_bias [E, h]``,
    ``fc2_weight [E, d, h]``, ``fc2_bias [E, d]`` (absent when ``fc2_bias=False``).

    Init: each expert is initialized exactly like a fresh ``nn.Linear`` pair (the dense FFN it
    replaces). The official DAMEX init, where a transformer-wide ``xavier_uniform_`` turns the
    "disabled" fc2 bias into a frozen random vector (spec §3.4 Q9), is deliberately **not**
    reproduced. Callers that re-initialize all ``ndim > 1`` parameters must skip these 3-D
    tensors (or use :meth:`reset_parameters` with ``scheme="xavier"``, which applies xavier per
    expert with the per-expert fan-in/fan-out).

    Args:
        num_experts: number of experts held by this module (local experts under expert
            parallelism).
        d_model: token width ``d``.
        hidden_dim: expert hidden width ``h``.
        activation: one of :data:`ACTIVATIONS`.
        dropout: dropout on the hidden activations.
        fc2_bias: whether fc2 has a (trainable) bias.
        cpu_threads: see ``threaded`` in :func:`expert_ffn` (None = automatic).
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
    ) -> None:
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.num_experts = num_experts
        self.d_model = d_model
        self.hidden_dim = hidden_dim
        self.activation = activation
        self.dropout = dropout
        self.cpu_threads = cpu_threads
        self.fc1_weight = nn.Parameter(torch.empty(num_experts, hidden_dim, d_model))
        self.fc1_bias = nn.Parameter(torch.empty(num_experts, hidden_dim))
        self.fc2_weight = nn.Parameter(torch.empty(num_experts, d_model, hidden_dim))
        if fc2_bias:
            self.fc2_bias: nn.Parameter | None = nn.Parameter(torch.empty(num_experts, d_model))
        else:
            self.register_parameter("fc2_bias", None)
        self.reset_parameters()

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, d_model={self.d_model}, "
            f"hidden_dim={self.hidden_dim}, activation={self.activation}, dropout={self.dropout}, "
            f"fc2_bias={self.fc2_bias is not None}"
        )

    @torch.no_grad()
    def reset_parameters(self, scheme: str = "linear") -> None:
        """Re-initialize every expert.

        Args:
            scheme: ``"linear"``: ``nn.Linear``'s default (weights and biases
                ``U(+-1/sqrt(fan_in))``); ``"xavier"``: ``xavier_uniform_`` per expert weight
                and zero biases (what the detector's transformer applies to its dense FFNs).
        """
        if scheme not in ("linear", "xavier"):
            raise ValueError(f"scheme must be 'linear' or 'xavier', got {scheme!r}")
        layers = [(self.fc1_weight, self.fc1_bias), (self.fc2_weight, self.fc2_bias)]
        for weight, bias in layers:
            fan_in = weight.shape[2]
            for e in range(self.num_experts):
                if scheme == "linear":
                    nn.init.kaiming_uniform_(weight[e], a=math.sqrt(5))
                else:
                    nn.init.xavier_uniform_(weight[e])
            if bias is not None:
                if scheme == "linear":
                    bound = 1.0 / math.sqrt(fan_in)
                    nn.init.uniform_(bias, -bound, bound)
                else:
                    nn.init.zeros_(bias)

    @torch.no_grad()
    def load_dense_(
        self, fc1: nn.Linear, fc2: nn.Linear, experts: Sequence[int] | None = None
    ) -> None:
        """Copy a dense FFN ``fc2(act(fc1(x)))`` into the given experts (default: all).

        Args:
            fc1: ``nn.Linear(d, h)``.
            fc2: ``nn.Linear(h, d)``; without a bias, the experts' fc2 bias is zeroed.
            experts: expert indices to overwrite; None = every expert ("upcycling").
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
        if fc2.bias is not None and self.fc2_bias is None:
            raise ValueError("fc2 has a bias but these experts were built with fc2_bias=False")
        for e in range(self.num_experts) if experts is None else experts:
            self.fc1_weight[e].copy_(fc1.weight)
            self.fc1_bias[e].copy_(fc1.bias)
            self.fc2_weight[e].copy_(fc2.weight)
            if self.fc2_bias is not None:
                if fc2.bias is None:
                    self.fc2_bias[e].zero_()
                else:
                    self.fc2_bias[e].copy_(fc2.bias)

    def forward(self, x: Tensor, counts: Sequence[int]) -> Tensor:
        """Apply each expert to its rows.

        Args:
            x: ``[N, d]`` rows sorted by expert.
            counts: ``E`` ints, rows per expert (summing to ``N``).

        Returns:
            ``[N, d]``; under autocast, in the autocast dtype (like ``nn.Linear``).
        """
        w1, b1, w2, b2 = self.fc1_weight, self.fc1_bias, self.fc2_weight, self.fc2_bias
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type):
            dtype = torch.get_autocast_dtype(device_type)
            x, w1, b1, w2 = x.to(dtype), w1.to(dtype), b1.to(dtype), w2.to(dtype)
            b2 = None if b2 is None else b2.to(dtype)
            with torch.autocast(device_type, enabled=False):
                return self._run(x, counts, w1, b1, w2, b2)
        if x.dtype != w1.dtype:
            raise TypeError(f"Experts: input dtype {x.dtype} != parameter dtype {w1.dtype}")
        return self._run(x, counts, w1, b1, w2, b2)

    def _run(
        self,
        x: Tensor,
        counts: Sequence[int],
        w1: Tensor,
        b1: Tensor,
        w2: Tensor,
        b2: Tensor | None,
    ) -> Tensor:
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

    def reference_forward(self, x: Tensor, expert: int) -> Tensor:
        """Expert ``expert`` on ``x [M, d]`` with plain autograd ops (tests, no dropout)."""
        act = {
            "gelu": F.gelu,
            "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
            "relu": F.relu,
            "silu": F.silu,
        }[self.activation]
        hid = act(F.linear(x, self.fc1_weight[expert], self.fc1_bias[expert]))
        b2 = None if self.fc2_bias is None else self.fc2_bias[expert]
        return F.linear(hid, self.fc2_weight[expert], b2)
