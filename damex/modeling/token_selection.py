"""Which decoder tokens a MoE loss or a routing statistic counts (``moe.damex_tokens``,
``moe.balance_tokens``, ``eval.routing_tokens``; docs/design.md §3.3).

The tags come from the decoder (``TokenTags`` on every ``RoutingInfo``: matching query, DN
query, DN padding, one-to-many query); the criterion and the evaluation both select through
this module, so a mode means the same thing in training and in the routing report.
"""

from __future__ import annotations

import torch
from torch import Tensor

from damex.config import TokenSelection, choices
from damex.modeling.matcher import MatchIndices
from damex.modeling.outputs import TokenKind
from damex.moe.types import RoutingInfo

__all__ = ["TOKEN_MODES", "foreground_mask", "select_tokens"]

TOKEN_MODES = choices(TokenSelection)


def foreground_mask(
    indices: list[MatchIndices], num_queries: int, *, device: torch.device | str | None = None
) -> Tensor:
    """Matched (foreground) matching queries from the Hungarian indices.

    Taken from the matcher's query indices, not from the class targets (docs/design.md Q13: DINO's
    ``argmax(onehot) != 0`` cannot tell class 0 from background).

    Args:
        indices: per image ``(query_idx, gt_idx)``.
        num_queries: Q.
        device: device of the result.

    Returns:
        ``bool`` ``[B, Q]``.
    """
    fg = torch.zeros(len(indices), num_queries, dtype=torch.bool)
    for b, (q, _) in enumerate(indices):
        fg[b, q] = True
    return fg.to(device) if device is not None else fg


def select_tokens(info: RoutingInfo, mode: str, foreground: Tensor | None = None) -> Tensor:
    """Which routed tokens a MoE loss uses.

    Modes (docs/design.md §3.3): ``all`` every decoder token (matching, DN, DN padding,
    one-to-many: the
    official DAMEX default); ``matching_only`` the matching queries (foreground and background);
    ``foreground`` the matching queries matched by the final layer's Hungarian matching;
    ``exclude_dn`` everything but DN and DN padding tokens.

    Args:
        info: one MoE layer's routing; ``token_kind`` / ``token_query`` are needed for every mode
            but ``all``.
        mode: one of ``TOKEN_MODES``.
        foreground: ``bool`` ``[B, Q]`` (see ``foreground_mask``), needed for ``foreground``.

    Returns:
        ``bool`` ``[T]``.
    """
    if mode not in TOKEN_MODES:
        raise ValueError(f"token selection must be one of {TOKEN_MODES}, got {mode!r}")
    num_tokens = info.logits.shape[0]
    device = info.logits.device
    if mode == "all":
        return torch.ones(num_tokens, dtype=torch.bool, device=device)
    if info.token_kind is None:
        raise ValueError(f"token selection {mode!r} needs RoutingInfo.token_kind, got None")
    kind = info.token_kind.to(device)
    if mode == "matching_only":
        return kind == TokenKind.MATCHING
    if mode == "exclude_dn":
        return (kind != TokenKind.DN) & (kind != TokenKind.DN_PAD)
    # foreground
    if foreground is None or info.token_query is None:
        raise ValueError("token selection 'foreground' needs the foreground mask and token_query")
    foreground = foreground.to(device)
    matching = kind == TokenKind.MATCHING
    query = info.token_query.to(device)
    if bool(matching.any()) and int(query[matching].max()) >= foreground.shape[1]:
        raise ValueError(
            f"RoutingInfo.token_query reaches {int(query[matching].max())} but the foreground "
            f"mask has {foreground.shape[1]} queries"
        )
    image = info.token_image.to(device)
    fg = foreground[image, query.clamp(min=0)]  # [T]
    return matching & fg
