"""MoE auxiliary losses: pure functions of :class:`RoutingInfo` (and targets).

* :func:`damex_loss` - DAMEX (Jain et al., NeurIPS 2023; docs/design.md §3.3): cross-entropy of the
  clean
  router logits against the expert of the token's dataset, mean over tokens, mean over layers.
* :func:`load_importance_loss` - Shazeer et al. 2017 load + importance, in the tutel / Swin-MoE
  form used by the DINO-MoE baseline (docs/design.md §3.2), or a corrected form.
* :func:`switch_loss` - GShard / Switch: ``E * sum_e f_e * m_e``.
* :func:`router_z_loss` - ST-MoE (Zoph et al., 2022): ``mean_t logsumexp(z_t)^2``.
* :func:`moe_loss` - the by-name dispatcher the detector's criterion calls.
* :func:`scheduled_weight` - the MoE loss weight over training (constant, ramp or decay).

Token selection: every function takes an optional ``token_mask`` (``bool [T]``) per layer.
Which image (hence which dataset) a token comes from is read from ``info.token_image``, never
from a memory layout (the official ``repeat_interleave`` is wrong for batch > 1, docs/design.md Q2).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from damex.moe.types import RoutingInfo

__all__ = [
    "MOE_LOSSES",
    "WEIGHT_SCHEDULES",
    "damex_loss",
    "load_importance_loss",
    "moe_loss",
    "router_z_loss",
    "scheduled_weight",
    "switch_loss",
]

MOE_LOSSES = (
    "damex",
    "load_importance",
    "load_importance_corrected",
    "switch",
    "z_loss",
    "none",
)

WEIGHT_SCHEDULES = ("constant", "ramp", "decay")

_EPS = 1e-10  # tutel's epsilon in the squared coefficient of variation


def _wide(t: Tensor) -> Tensor:
    """``t`` in float32, or wider if it already is (float64 stays float64)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _zero_like_graph(t: Tensor) -> Tensor:
    """A 0 that keeps ``t``'s graph connected (DDP expects every used parameter to get a grad)."""
    return t.sum() * 0.0


def _select(info: RoutingInfo, mask: Tensor | None) -> Tensor | None:
    """Indices of the selected tokens, or None for all of them."""
    if mask is None:
        return None
    if mask.dtype != torch.bool or tuple(mask.shape) != (info.logits.shape[0],):
        raise ValueError(
            f"token mask must be bool [T={info.logits.shape[0]}], "
            f"got {mask.dtype} {tuple(mask.shape)}"
        )
    return mask.nonzero().squeeze(-1)


def _rows(t: Tensor, idx: Tensor | None) -> Tensor:
    return t if idx is None else t.index_select(0, idx)


def _cv_squared(v: Tensor) -> Tensor:
    """``Var(v) / (Mean(v)^2 + 1e-10)`` with the unbiased variance (tutel / Shazeer 2017)."""
    if v.numel() < 2:
        return v.sum() * 0.0
    return v.var() / (v.mean() ** 2 + _EPS)


def _masks(token_mask: Sequence[Tensor | None] | None, n: int) -> list[Tensor | None]:
    if token_mask is None:
        return [None] * n
    if len(token_mask) != n:
        raise ValueError(f"got {len(token_mask)} token masks for {n} routing infos")
    return list(token_mask)


def damex_loss(
    infos: Sequence[RoutingInfo],
    image_expert: Tensor,
    token_mask: Sequence[Tensor | None] | None = None,
    use_noisy: bool = False,
) -> Tensor:
    """DAMEX loss: ``mean_layers mean_{selected t} CE(z_t, image_expert[token_image[t]])``.

    Args:
        infos: one :class:`RoutingInfo` per MoE layer.
        image_expert: ``int64 [B]`` target expert of each image of the batch (the expert of
            its dataset); ``-1`` = no target (the image's tokens are ignored).
        token_mask: per layer, ``bool [T]`` tokens to use, or None (all; official DAMEX).
        use_noisy: use the noisy logits when present (official: clean).

    Returns:
        Scalar. Layers without any selected token are left out of the mean; if no layer has
        one, a graph-connected 0.
    """
    if not infos:
        raise ValueError("damex_loss needs at least one RoutingInfo")
    per_layer = []
    for info, mask in zip(infos, _masks(token_mask, len(infos))):
        logits = info.logits
        if use_noisy and info.noisy_logits is not None:
            logits = info.noisy_logits
        target = image_expert.to(info.token_image.device)[info.token_image]  # [T]
        if bool((target >= info.num_experts).any()):
            bad = int(target.max())
            raise ValueError(f"damex_loss: target expert {bad} >= num_experts {info.num_experts}")
        valid = target >= 0
        if mask is not None:
            _select(info, mask)  # validates the mask
            valid = valid & mask
        idx = valid.nonzero().squeeze(-1)
        if idx.numel() > 0:
            per_layer.append(F.cross_entropy(_wide(logits)[idx], target[idx]))
    if not per_layer:
        return sum(_zero_like_graph(i.logits) for i in infos)
    return torch.stack(per_layer).mean()


def _normal_cdf(x: Tensor, std: float) -> Tensor:
    return 0.5 * (1.0 + torch.erf(x / (std * math.sqrt(2.0))))


def load_importance_loss(
    info: RoutingInfo,
    token_mask: Tensor | None = None,
    variant: str = "tutel",
    gate_noise: float = 1.0,
    theta_from: str = "clean",
) -> Tensor:
    """Load + importance balancing loss, ``(CV^2(Importance) + CV^2(Load)) / 2``.

    ``variant="tutel"`` (tutel ``load_importance_loss``, as used by DAMEX's DINO-MoE baseline):

    * ``p = softmax(clean logits)``, ``Importance_e = sum_t p_te``;
    * ``theta_t`` = logit of token t at its k-th chosen expert (chosen by the noisy scores),
      taken from the clean logits (``theta_from="clean"``, the DAMEX repo) or the noisy ones
      (``"noisy"``, tutel's own ``l_aux``);
    * ``Load_e = sum_t Phi_sigma(p_te - theta_t)`` with ``sigma = gate_noise / E``. Note the
      quirk kept for fidelity: a *probability* minus a *logit*.

    ``variant="corrected"`` (Shazeer et al. 2017, eqs. 6-10, fixed noise std ``sigma``):

    * ``Importance_e = sum_t G_te`` where ``G`` holds the gates of the chosen experts;
    * ``Load_e = sum_t Phi_sigma(z_te - kth_excluding(H_t, k, e))``, ``z`` clean logits, ``H``
      noisy logits (clean if there is no noise): the probability that ``e`` stays in the top-k
      under a fresh noise draw on ``e``.

    Args:
        info: one layer's routing.
        token_mask: ``bool [T]`` tokens to use (DINO-MoE: matched foreground queries), or None.
        variant: ``"tutel"`` or ``"corrected"``.
        gate_noise: the router's noise scale (must be > 0: it is the CDF's scale).
        theta_from: tutel variant only: ``"clean"`` or ``"noisy"``.

    Returns:
        Scalar (graph-connected 0 with no selected token).
    """
    if variant not in ("tutel", "corrected"):
        raise ValueError(f"variant must be 'tutel' or 'corrected', got {variant!r}")
    if theta_from not in ("clean", "noisy"):
        raise ValueError(f"theta_from must be 'clean' or 'noisy', got {theta_from!r}")
    if gate_noise <= 0:
        raise ValueError(f"load_importance_loss needs gate_noise > 0, got {gate_noise}")
    idx = _select(info, token_mask)
    logits = _wide(_rows(info.logits, idx))  # [T', E]
    if logits.shape[0] == 0:
        return _zero_like_graph(info.logits)
    num_experts = logits.shape[1]
    sigma = gate_noise / num_experts
    expert = _rows(info.expert, idx)  # [T', k]
    noisy = None if info.noisy_logits is None else _wide(_rows(info.noisy_logits, idx))
    if variant == "tutel":
        probs = torch.softmax(logits, dim=-1)  # [T', E]
        importance = probs.sum(0)  # [E]
        source = noisy if (theta_from == "noisy" and noisy is not None) else logits
        theta = source.gather(1, expert[:, -1:])  # [T', 1] logit at the k-th chosen expert
        load = _normal_cdf(probs - theta, sigma).sum(0)  # [E]
    else:
        k = expert.shape[1]
        gate = _wide(_rows(info.gate, idx))  # [T', k]
        importance = torch.zeros_like(logits).scatter_add(1, expert, gate).sum(0)  # [E]
        if k >= num_experts:
            return _cv_squared(importance) / 2.0
        h = noisy if noisy is not None else logits
        top = torch.topk(h, k + 1, dim=-1).values  # [T', k+1]
        kth, next_after = top[:, k - 1 : k], top[:, k : k + 1]  # [T', 1] each
        in_topk = torch.zeros_like(h, dtype=torch.bool).scatter(1, expert, True)  # [T', E]
        threshold = torch.where(in_topk, next_after, kth)  # kth_excluding(H, k, e)
        load = _normal_cdf(logits - threshold, sigma).sum(0)  # [E]
    return (_cv_squared(importance) + _cv_squared(load)) / 2.0


def switch_loss(
    info: RoutingInfo, token_mask: Tensor | None = None, use_noisy: bool = True
) -> Tensor:
    """GShard / Switch balance loss ``E * sum_e f_e * m_e``.

    ``f_e`` = fraction of the selected tokens whose first choice is ``e``; ``m_e`` = mean router
    probability of ``e`` (softmax of the noisy logits when present and ``use_noisy``, as tutel's
    ``gshard_loss``). Equals 1 for perfectly uniform routing.
    """
    idx = _select(info, token_mask)
    logits = info.noisy_logits if (use_noisy and info.noisy_logits is not None) else info.logits
    logits = _wide(_rows(logits, idx))
    if logits.shape[0] == 0:
        return _zero_like_graph(info.logits)
    num_experts = logits.shape[1]
    probs_mean = torch.softmax(logits, dim=-1).mean(0)  # [E]
    top1 = _rows(info.expert, idx)[:, 0]
    frac = torch.bincount(top1, minlength=num_experts).to(probs_mean.dtype) / top1.numel()
    return num_experts * (frac * probs_mean).sum()


def router_z_loss(info: RoutingInfo, token_mask: Tensor | None = None) -> Tensor:
    """ST-MoE router z-loss ``mean_t logsumexp(z_t)^2`` on the clean logits."""
    idx = _select(info, token_mask)
    logits = _wide(_rows(info.logits, idx))
    if logits.shape[0] == 0:
        return _zero_like_graph(info.logits)
    return torch.logsumexp(logits, dim=-1).pow(2).mean()


def moe_loss(
    name: str,
    infos: Sequence[RoutingInfo],
    token_masks: Sequence[Tensor | None] | None = None,
    *,
    image_expert: Tensor | None = None,
    gate_noise: float = 1.0,
    use_noisy: bool = False,
) -> Tensor:
    """The MoE loss called ``name``, averaged over the MoE layers.

    Args:
        name: one of :data:`MOE_LOSSES` (``"load_importance"`` is the tutel variant).
        infos: one :class:`RoutingInfo` per MoE layer.
        token_masks: per layer ``bool [T]`` or None.
        image_expert: ``int64 [B]`` per-image target expert; required for ``"damex"``.
        gate_noise: the routers' noise scale (load/importance losses).
        use_noisy: ``"damex"`` only: supervise the noisy logits.

    Returns:
        Scalar (graph-connected 0 for ``"none"``).
    """
    if name not in MOE_LOSSES:
        raise ValueError(f"unknown MoE loss {name!r}; expected one of {MOE_LOSSES}")
    if not infos:
        raise ValueError("moe_loss needs at least one RoutingInfo")
    masks = _masks(token_masks, len(infos))
    if name == "damex":
        if image_expert is None:
            raise ValueError("moe_loss('damex') needs image_expert")
        return damex_loss(infos, image_expert, masks, use_noisy=use_noisy)
    if name == "none":
        return sum(_zero_like_graph(i.logits) for i in infos)
    values = []
    for info, mask in zip(infos, masks):
        if name == "load_importance":
            values.append(load_importance_loss(info, mask, "tutel", gate_noise))
        elif name == "load_importance_corrected":
            values.append(load_importance_loss(info, mask, "corrected", gate_noise))
        elif name == "switch":
            values.append(switch_loss(info, mask))
        else:
            values.append(router_z_loss(info, mask))
    return torch.stack(values).mean()


def scheduled_weight(
    weight: float,
    schedule: str,
    progress: float,
    *,
    ramp_frac: float = 0.25,
    final: float = 0.1,
) -> float:
    """The MoE loss weight at a point of training.

    Args:
        weight: the configured weight ``w`` (``moe.loss_weight``).
        schedule: ``"constant"`` (``w`` throughout), ``"ramp"`` (linear ``0 -> w`` over the
            first ``ramp_frac`` of training, then ``w``: the router is supervised once the
            detector has started to learn) or ``"decay"`` (linear ``w -> final`` over training:
            route early, then let the detection loss dominate).
        progress: fraction of training done, clipped to ``[0, 1]``.
        ramp_frac: ramp length as a fraction of training (``> 0``).
        final: the decay's end weight.

    Returns:
        The weight (a float >= 0).
    """
    if schedule not in WEIGHT_SCHEDULES:
        raise ValueError(f"MoE loss schedule must be one of {WEIGHT_SCHEDULES}, got {schedule!r}")
    if not ramp_frac > 0:
        raise ValueError(f"ramp_frac must be > 0, got {ramp_frac}")
    if final < 0:
        raise ValueError(f"final weight must be >= 0, got {final}")
    p = min(1.0, max(0.0, float(progress)))
    if schedule == "ramp":
        return weight * min(1.0, p / ramp_frac)
    if schedule == "decay":
        return weight + (final - weight) * p
    return weight
