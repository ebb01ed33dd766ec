"""Sparse upcycling: start an MoE detector from a trained dense detector's checkpoint.

Komatsuzaki et al., "Sparse Upcycling: Training Mixture-of-Experts from Dense Checkpoints"
(ICLR 2023): every expert of an MoE layer is initialised as a copy of the dense FFN it replaces,
the router is new, and training continues. Here, with ``moe.upcycle_from: PATH`` a fresh MoE
run (DAMEX or DINO-MoE) loads a dense run's checkpoint before its first iteration, so "train
dense for a fraction of the budget, then continue with DAMEX" is two chained runs.

What is copied:

* every parameter / buffer whose name and shape match (backbone, encoder, attention, heads,
  norms - including the MoE block's ``norm``, which has the dense FFN's ``norm`` name);
* each MoE block's dense FFN (``linear1``/``linear2`` of the same decoder layer) into every
  routed expert, plus an optional Gaussian perturbation of the routed experts' weights
  (``noise`` x the weight's std, a fresh draw per expert so they can diverge);
* with a shared expert, the dense FFN's output is split in half: the shared expert and every
  routed expert get ``fc1`` as is and ``fc2`` (weight and bias) halved, so that
  ``Shared(x) + 1 * Expert(x)`` still equals ``FFN(x)``.

The router keeps its fresh init. Right after the switch (no noise) the MoE detector computes the
same outputs as the dense one when the MoE block is laid out like the dense FFN: post-norm
(``moe.norm=post``), the same activation, combine weight 1 (``moe.unit_gate``), no token
dropping (``moe.capacity_factor=0``) and no DropPath at eval. :func:`upcycle_` reports whether
that holds (``exact``); other layouts still start from the dense weights, just not exactly.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from damex.engine.checkpoint import load_checkpoint
from damex.errors import CheckpointError
from damex.modeling.transformer import MoEBlock

__all__ = ["UpcycleReport", "upcycle_", "upcycle_from_checkpoint"]

logger = logging.getLogger(__name__)


@dataclass
class UpcycleReport:
    """What :func:`upcycle_` did.

    Attributes:
        copied: parameters / buffers copied by name.
        upcycled_layers: prefixes of the MoE blocks filled from a dense FFN.
        fresh: model entries left at their init (the routers).
        exact: every upcycled block computes the dense FFN's function at init (see module doc).
        reasons: why not exact, one line per block and cause.
    """

    copied: int = 0
    upcycled_layers: list[str] = field(default_factory=list)
    fresh: list[str] = field(default_factory=list)
    exact: bool = True
    reasons: list[str] = field(default_factory=list)


def _moe_blocks(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if isinstance(m, MoEBlock)}


def _activation_name(ffn_act: object) -> str | None:
    """The name of a dense FFN's activation callable (``F.relu`` -> ``relu``)."""
    name = getattr(ffn_act, "__name__", None) or type(ffn_act).__name__
    return {"relu": "relu", "ReLU": "relu", "gelu": "gelu", "GELU": "gelu"}.get(name)


@dataclass(frozen=True)
class _DenseFFN:
    """One decoder layer's dense FFN from the dense state dict.

    Attributes:
        w1, b1: ``linear1`` ``[H, D]`` / ``[H]``.
        w2, b2: ``linear2`` ``[D, H]`` / ``[D]`` (``b2`` None when the dense FFN has no bias).
        keys: the state-dict keys these came from.
    """

    w1: Tensor
    b1: Tensor
    w2: Tensor
    b2: Tensor | None
    keys: tuple[str, ...]


def _dense_ffn(
    prefix: str, moe: nn.Module, state: Mapping[str, Tensor], problems: list[str]
) -> _DenseFFN | None:
    """The dense FFN of MoE block ``prefix``, or None (a line added to ``problems``)."""
    keys = {n: f"{prefix}.{n}" for n in ("linear1.weight", "linear1.bias", "linear2.weight")}
    absent = [k for k in keys.values() if k not in state]
    if absent:
        problems.append(f"no dense FFN for MoE block {prefix} (missing {absent})")
        return None
    w1, b1, w2 = (state[keys[n]] for n in ("linear1.weight", "linear1.bias", "linear2.weight"))
    b2 = state.get(f"{prefix}.linear2.bias")
    expected = (moe.hidden_dim, moe.d_model)
    if tuple(w1.shape) != expected or tuple(w2.shape) != expected[::-1]:
        problems.append(
            f"{prefix}: dense FFN is {tuple(w1.shape)}/{tuple(w2.shape)}, the experts are "
            f"{expected}/{expected[::-1]} (model.dim_feedforward and d_model must match)"
        )
        return None
    used = tuple(keys.values()) + ((f"{prefix}.linear2.bias",) if b2 is not None else ())
    return _DenseFFN(w1=w1, b1=b1, w2=w2, b2=b2, keys=used)


def _copy_dense_ffn(moe: nn.Module, dense: _DenseFFN) -> None:
    """Every held routed expert (and the shared one) := the dense FFN; ``fc2`` halved if shared."""
    shared = getattr(moe, "shared", None)
    split = 0.5 if shared is not None else 1.0
    targets = [moe.experts[i] for i in range(moe.experts.num_experts)]
    for ffn in targets + ([shared] if shared is not None else []):
        ffn.fc1.weight.copy_(dense.w1)
        ffn.fc1.bias.copy_(dense.b1)
        ffn.fc2.weight.copy_(dense.w2 * split)
        if ffn.fc2.bias is not None:
            if dense.b2 is None:
                ffn.fc2.bias.zero_()
            else:
                ffn.fc2.bias.copy_(dense.b2 * split)


def _perturb_experts(moe: nn.Module, noise: float, generator: torch.Generator | None) -> None:
    """Add ``noise`` x std Gaussian noise to the routed experts' weights, a draw per expert.

    Drawn for every global expert id, applied to the held ones: an expert-parallel shard gets
    the same noise as the single-process model's experts.
    """
    targets = [moe.experts[i] for i in range(moe.experts.num_experts)]
    held = dict(zip(moe.experts.expert_ids, targets, strict=True))
    for e in range(moe.num_experts):
        for kind in ("fc1", "fc2"):
            like = getattr(targets[0], kind).weight
            draw = torch.randn(like.shape, generator=generator, dtype=like.dtype)
            if e in held:
                p = getattr(held[e], kind).weight
                p.add_(draw * (noise * float(p.std())))


def _inexact_reasons(block: nn.Module, dense_activation: str, noise: float) -> list[str]:
    """Why the upcycled block does not compute ``LN(x + FFN(x))`` at init (empty: it does)."""
    moe = block.moe
    reasons = []
    if block.norm_position != "post":
        reasons.append("pre-norm MoE block (moe.norm=pre) vs the dense post-norm FFN")
    if moe.experts.activation != dense_activation:
        reasons.append(
            f"expert activation {moe.experts.activation} vs the dense {dense_activation}"
        )
    if not getattr(moe, "unit_gate", False):
        reasons.append("combine weight = router probability (moe.unit_gate=false)")
    if moe.capacity_factor != 0:
        reasons.append(f"capacity_factor {moe.capacity_factor} may drop tokens")
    if noise > 0:
        reasons.append(f"noise {noise}")
    return reasons


def _check_rest_fits(
    state: Mapping[str, Tensor],
    own: Mapping[str, Tensor],
    consumed: set[str],
    moe_prefixes: tuple[str, ...],
    source: str,
) -> None:
    """Raise ``CheckpointError`` unless every non-FFN dense entry matches the MoE model's.

    Entries only the MoE model has (experts, shared expert, routers) may be absent.
    """
    unexpected, shape = [], []
    for key, value in state.items():
        if key in consumed:
            continue
        if key not in own:
            unexpected.append(key)
        elif tuple(value.shape) != tuple(own[key].shape):
            shape.append(f"{key}: dense {tuple(value.shape)} vs MoE {tuple(own[key].shape)}")
    missing = [
        k
        for k in own
        if k not in state
        and not (k.startswith(moe_prefixes) and (".moe.experts." in k or ".moe.shared." in k))
        and not (k.startswith(moe_prefixes) and ".moe.router." in k)
    ]
    if unexpected or shape or missing:
        parts = []
        if shape:
            parts.append(f"shape mismatches {shape}")
        if unexpected:
            parts.append(f"keys the MoE model does not have {unexpected[:20]}")
        if missing:
            parts.append(f"MoE model entries the dense checkpoint lacks {missing[:20]}")
        raise CheckpointError(
            f"upcycling {source}: the dense checkpoint does not fit the MoE model apart from the "
            f"FFNs (same backbone, widths, heads, accelerators?): {'; '.join(parts)}"
        )


@torch.no_grad()
def upcycle_(
    model: nn.Module,
    dense_state: Mapping[str, Tensor],
    *,
    noise: float = 0.0,
    generator: torch.Generator | None = None,
    dense_activation: str = "relu",
    source: str = "<state dict>",
) -> UpcycleReport:
    """Fill ``model`` (with MoE blocks) from a dense model's state dict, in place.

    Args:
        model: the MoE detector (unwrapped).
        dense_state: the dense detector's ``state_dict`` (a ``module.`` prefix is stripped).
        noise: std of the Gaussian perturbation of each routed expert's weights, relative to
            the dense weight's std (0 = exact copies; Komatsuzaki et al. use none by default).
        generator: RNG for the noise.
        dense_activation: the dense FFNs' activation (DINO: ``relu``), for the exactness check.
        source: the checkpoint path, for messages.

    Returns:
        An :class:`UpcycleReport`.

    Raises:
        CheckpointError: the model has no MoE block; the dense state lacks an MoE layer's FFN,
            or has keys / shapes the MoE model cannot take (all listed).
    """
    if noise < 0:
        raise ValueError(f"upcycle noise must be >= 0, got {noise}")
    state = dict(dense_state)
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    blocks = _moe_blocks(model)
    if not blocks:
        raise CheckpointError(
            f"upcycling {source}: the model has no MoE decoder layer (model.decoder_ffn has no "
            "'moe' entry), nothing to upcycle"
        )
    own = model.state_dict()
    report = UpcycleReport()
    consumed: set[str] = set()
    problems: list[str] = []
    for prefix, block in blocks.items():
        moe = block.moe
        dense = _dense_ffn(prefix, moe, state, problems)
        if dense is None:
            continue
        consumed.update(dense.keys)
        _copy_dense_ffn(moe, dense)
        if noise > 0:  # routed experts only; a fresh draw per expert
            _perturb_experts(moe, noise, generator)
        report.upcycled_layers.append(prefix)
        report.fresh.append(f"{prefix}.moe.router")
        reasons = _inexact_reasons(block, dense_activation, noise)
        if reasons:
            report.exact = False
            report.reasons += [f"{prefix}: {r}" for r in reasons]
    if problems:
        raise CheckpointError(f"upcycling {source}: " + "; ".join(problems))
    _check_rest_fits(state, own, consumed, tuple(f"{p}." for p in blocks), source)
    for key, value in state.items():
        if key not in consumed:
            own[key].copy_(value)
            report.copied += 1
    return report


def upcycle_from_checkpoint(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    noise: float = 0.0,
    seed: int = 0,
    dense_activation: str = "relu",
) -> UpcycleReport:
    """:func:`upcycle_` from a dense run's checkpoint file (``last.pth`` / ``best.pth``).

    The checkpoint is read with ``weights_only=True``; its ``model`` entry is the dense
    detector's state dict. ``seed`` seeds the noise.
    """
    state = load_checkpoint(Path(path), required_keys=("model",))
    gen = torch.Generator().manual_seed(seed)
    report = upcycle_(
        model,
        state["model"],
        noise=noise,
        generator=gen,
        dense_activation=dense_activation,
        source=str(path),
    )
    logger.info(
        "upcycled %s from %s: %d entries copied, routers fresh%s",
        ", ".join(report.upcycled_layers),
        path,
        report.copied,
        "" if report.exact else f" (not exact: {'; '.join(report.reasons)})",
    )
    return report
