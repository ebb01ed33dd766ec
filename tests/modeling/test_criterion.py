"""SetCriterion: detection losses (closed forms, perfect vs wrong, empty images, DN, one-to-many,
dense head) and MoE losses (token selection, layout invariance, gradients)."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from damex.config import Config
from damex.modeling.box_ops import generalized_box_iou
from damex.modeling.criterion import SetCriterion, _giou_loss, build_criterion
from damex.modeling.dense_head import fcos_assign
from damex.modeling.matcher import HungarianMatcher
from damex.modeling.outputs import DenseOutput, DetectorOutput, DNMeta, Prediction, TokenKind
from damex.modeling.token_selection import foreground_mask, select_tokens
from damex.moe.types import RoutingInfo
from damex.structures import Batch, Target, box_cxcywh_to_xyxy

K = 5  # classes
Q = 6  # matching queries


def _batch(targets: list[Target], expert_ids: list[int] | None = None) -> Batch:
    bsz = len(targets)
    return Batch(
        images=torch.zeros(bsz, 3, 8, 8),
        mask=torch.zeros(bsz, 8, 8, dtype=torch.bool),
        targets=targets,
        dataset_ids=torch.arange(bsz),
        expert_ids=torch.tensor(expert_ids if expert_ids is not None else [0] * bsz),
        image_ids=torch.arange(bsz),
        image_sizes=torch.tensor([[64, 64]] * bsz),
        orig_sizes=torch.tensor([[64, 64]] * bsz),
    )


def _targets() -> list[Target]:
    return [
        Target(torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.4]]), torch.tensor([1, 3])),
        Target(torch.tensor([[0.5, 0.5, 0.5, 0.5]]), torch.tensor([0])),
    ]


def _perfect(targets: list[Target], num_queries: int = Q, conf: float = 12.0) -> Prediction:
    """GT i at query i with a confident correct logit; other queries confident background."""
    bsz = len(targets)
    logits = torch.full((bsz, num_queries, K), -conf)
    boxes = torch.full((bsz, num_queries, 4), 0.5)
    boxes[..., 2:] = 0.05
    for b, t in enumerate(targets):
        n = len(t.labels)
        logits[b, torch.arange(n), t.labels] = conf
        boxes[b, :n] = t.boxes
    return Prediction(logits, boxes)


def _criterion(**kw) -> SetCriterion:
    kw.setdefault("moe_loss", "none")
    return SetCriterion(num_classes=K, matcher=HungarianMatcher(), **kw)


def _focal_ref(logits: Tensor, target: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    p = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = p * target + (1 - p) * (1 - target)
    a_t = alpha * target + (1 - alpha) * (1 - target)
    return a_t * (1 - p_t) ** gamma * ce


# ------------------------------------------------------------------------- detection
def test_perfect_predictions_vs_wrong():
    targets = _targets()
    crit = _criterion()
    good = crit(DetectorOutput(pred=_perfect(targets)), _batch(targets))
    assert good["unweighted/loss_bbox"] < 1e-6 and good["unweighted/loss_giou"] < 1e-5
    assert good["unweighted/loss_class"] < 1e-3
    wrong = _perfect(targets)
    wrong.logits = wrong.logits.roll(1, dims=-1)  # every query predicts the wrong class
    wrong.boxes = (wrong.boxes + 0.1).clamp(max=1.0)
    bad = crit(DetectorOutput(pred=wrong), _batch(targets))
    for term in ("class", "bbox", "giou"):
        assert bad[f"unweighted/loss_{term}"] > 100 * good[f"unweighted/loss_{term}"] + 1e-3


def test_class_and_box_losses_closed_form():
    torch.manual_seed(0)
    targets = _targets()
    logits = torch.randn(2, Q, K)
    boxes = torch.rand(2, Q, 4) * 0.4 + 0.3
    crit = _criterion()
    out = crit(DetectorOutput(pred=Prediction(logits, boxes)), _batch(targets))
    indices = HungarianMatcher()(logits, boxes, targets)
    onehot = torch.zeros_like(logits)
    l1 = giou = 0.0
    for b, (q, g) in enumerate(indices):
        onehot[b, q, targets[b].labels[g]] = 1
        l1 += float((boxes[b, q] - targets[b].boxes[g]).abs().sum())
        pairwise = generalized_box_iou(  # DETR: the diagonal of the pairwise matrix
            box_cxcywh_to_xyxy(boxes[b, q]), box_cxcywh_to_xyxy(targets[b].boxes[g])
        )
        giou += float((1 - pairwise.diagonal()).sum())
    num_boxes = 3.0
    # DINO: sigmoid_focal_loss(...).mean(1).sum() / num_boxes * Q
    dino = _focal_ref(logits, onehot).mean(1).sum() / num_boxes * Q
    torch.testing.assert_close(out["unweighted/loss_class"], dino)
    assert math.isclose(float(out["unweighted/loss_bbox"]), l1 / num_boxes, rel_tol=1e-5)
    assert math.isclose(float(out["unweighted/loss_giou"]), giou / num_boxes, rel_tol=1e-6)
    torch.testing.assert_close(out["loss_bbox"], 5.0 * out["unweighted/loss_bbox"])
    torch.testing.assert_close(out["loss_giou"], 2.0 * out["unweighted/loss_giou"])


def test_giou_loss_is_one_minus_diagonal_of_pairwise_giou():
    """torchvision's paired GIoU loss = 1 - diag(box_ops' pairwise GIoU), values and gradients.

    Predictions are sigmoid boxes (cxcywh in [0, 1]; a saturated logit gives w or h = 0); GT
    boxes have positive area (readers and transforms drop degenerate ones), down to one pixel.
    """
    torch.manual_seed(0)
    n = 200
    tgt = torch.rand(n, 4) * 0.5 + 0.25  # [M, 4] cxcywh
    tgt[:20, 2:] = 1e-3  # 1-pixel GT in a 1000-pixel image
    src = torch.rand(n, 4)
    src[:10] = tgt[:10] + torch.tensor([2e-4, -1e-4, 0.0, 0.0])  # near a 1-pixel GT
    src[20:40] = tgt[20:40]  # perfect predictions
    src[70:80, 0] = torch.where(tgt[70:80, 0] < 0.5, 0.95, 0.05)  # no overlap:
    src[70:80, 2] = 0.04  # x-extents disjoint from every GT (cx in [0.25, 0.75], w < 0.75)
    src[80:90] = tgt[80:90] * torch.tensor([1.0, 1.0, 0.01, 0.01])  # tiny inside its GT
    logits = torch.logit(src)
    logits[40:50, 2] = -200.0  # sigmoid underflows to 0: zero width
    logits[50:60, 3] = -200.0  # zero height
    logits[60:70, 2:] = -200.0  # zero area
    logits.requires_grad_(True)
    assert (logits.sigmoid()[40:70, 2:] == 0).sum() == 40

    got = _giou_loss(logits.sigmoid(), tgt)  # [M]
    (grad_got,) = torch.autograd.grad(got.sum(), logits)
    src_xyxy = box_cxcywh_to_xyxy(logits.sigmoid())
    pairwise = generalized_box_iou(src_xyxy, box_cxcywh_to_xyxy(tgt))  # [M, M]
    expected = 1 - pairwise.diagonal()
    (grad_expected,) = torch.autograd.grad(expected.sum(), logits)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    # at an extent of exactly 0 the box gradients differ (torchvision's intersection is 0 with no
    # gradient there, box_ops' clamp passes one), but the sigmoid's zero slope cancels both
    torch.testing.assert_close(grad_got, grad_expected, rtol=1e-5, atol=1e-6)
    # two empty boxes (unreachable with valid GT): finite, loss 1 as before
    point = torch.tensor([[0.5, 0.5, 0.0, 0.0]])
    assert _giou_loss(point, point).tolist() == [1.0]
    assert _giou_loss(torch.zeros(0, 4), torch.zeros(0, 4)).shape == (0,)


def test_empty_target_image_finite_and_zero_box_loss():
    empty = Target(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))
    torch.manual_seed(1)
    logits = torch.randn(1, Q, K, requires_grad=True)
    boxes = torch.rand(1, Q, 4, requires_grad=True)
    aux = [Prediction(torch.randn(1, Q, K), torch.rand(1, Q, 4))]
    out = _criterion()(
        DetectorOutput(pred=Prediction(logits, boxes), aux=aux, interm=aux[0]), _batch([empty])
    )
    assert all(torch.isfinite(v).all() for k, v in out.items() if k.startswith("loss"))
    for key in ("loss_bbox", "loss_giou", "loss_bbox_0", "loss_giou_interm", "loss_bbox_dn"):
        assert float(out[key].detach()) == 0.0
    assert out["loss_class"] > 0  # every query is pushed to "no object"
    out["loss"].backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    # mixed batch: the non-empty image alone gives the same box losses
    targets = [_targets()[0], empty]
    preds = _perfect(targets)
    preds.boxes[0, :2] += 0.05
    mixed = _criterion()(DetectorOutput(pred=preds), _batch(targets))
    alone = _criterion()(
        DetectorOutput(pred=Prediction(preds.logits[:1], preds.boxes[:1])), _batch(targets[:1])
    )
    torch.testing.assert_close(mixed["loss_bbox"], alone["loss_bbox"])


def test_keys_total_and_weights():
    torch.manual_seed(2)
    targets = _targets()
    pred = lambda: Prediction(torch.randn(2, Q, K), torch.rand(2, Q, 4))  # noqa: E731
    out_obj = DetectorOutput(pred=pred(), aux=[pred(), pred()], interm=pred())
    crit = _criterion(interm_weight=0.5, dn=False)
    out = crit(out_obj, _batch(targets))
    terms = {k for k in out if k.startswith("loss_")}
    expected = {
        f"loss_{t}{s}" for t in ("class", "bbox", "giou") for s in ("", "_0", "_1", "_interm")
    }
    assert terms == expected
    torch.testing.assert_close(out["loss"], sum(out[k] for k in terms))
    assert crit.weight_of("loss_giou_interm") == 2.0 * 0.5 and crit.weight_of("loss_class_1") == 1.0
    no_aux = _criterion(aux=False, dn=False)(out_obj, _batch(targets))
    assert "loss_class_0" not in no_aux and "loss_class_interm" in no_aux


def _dn_output(targets: list[Target], groups: int, pad: int) -> tuple[Prediction, DNMeta]:
    """DN queries: positives exactly at their GT, negatives / padding with garbage boxes."""
    bsz = len(targets)
    n_dn = groups * 2 * pad
    torch.manual_seed(3)
    logits = torch.randn(bsz, n_dn, K)
    boxes = torch.rand(bsz, n_dn, 4) * 0.3 + 0.1
    for b, t in enumerate(targets):
        n = len(t.labels)
        for g in range(groups):
            boxes[b, 2 * g * pad : 2 * g * pad + n] = t.boxes
    meta = DNMeta(groups, pad, torch.tensor([len(t.labels) for t in targets]))
    return Prediction(logits, boxes), meta


def test_dn_loss_uses_only_positive_pairs_and_ignores_padding():
    targets = _targets()  # 2 and 1 boxes -> pad 2; image 1 has a padding slot per half
    groups, pad = 3, 2
    dn_pred, meta = _dn_output(targets, groups, pad)
    crit = _criterion()
    base = crit(DetectorOutput(pred=_perfect(targets), dn=[dn_pred], dn_meta=meta), _batch(targets))
    assert float(base["loss_bbox_dn"]) < 1e-6 and float(base["loss_giou_dn"]) < 1e-5

    def run(mod) -> dict:
        p = Prediction(dn_pred.logits.clone(), dn_pred.boxes.clone())
        mod(p)
        return crit(DetectorOutput(pred=_perfect(targets), dn=[p], dn_meta=meta), _batch(targets))

    def neg_boxes(p):  # negatives of every group: boxes far off -> no box-loss change
        for g in range(groups):
            p.boxes[:, 2 * g * pad + pad : 2 * (g + 1) * pad] = 0.9

    def pad_logits(p):  # image 1's padding slots (slot 1 of each half)
        for g in range(groups):
            p.logits[1, [2 * g * pad + 1, 2 * g * pad + pad + 1]] = 30.0

    def neg_logits(p):
        p.logits[0, pad] = 30.0  # a negative of group 0 says "object"

    r = run(neg_boxes)
    assert float(r["loss_bbox_dn"]) < 1e-6 and float(r["loss_giou_dn"]) < 1e-5
    torch.testing.assert_close(run(pad_logits)["loss_class_dn"], base["loss_class_dn"])
    assert run(neg_logits)["loss_class_dn"] > base["loss_class_dn"] + 1.0

    def shift(p):  # every positive off by 0.01 in cx: L1 per pair 0.01, normalized by boxes * G
        for b, t in enumerate(targets):
            for g in range(groups):
                p.boxes[b, 2 * g * pad : 2 * g * pad + len(t.labels), 0] += 0.01

    torch.testing.assert_close(
        run(shift)["loss_bbox_dn"], torch.tensor(5.0 * 0.01), rtol=1e-4, atol=1e-6
    )


def test_dn_layers_keys_and_missing_dn_gives_zero_keys():
    targets = _targets()
    dn_pred, meta = _dn_output(targets, 1, 2)
    out_obj = DetectorOutput(
        pred=_perfect(targets), aux=[_perfect(targets)], dn=[dn_pred, dn_pred], dn_meta=meta
    )
    out = _criterion()(out_obj, _batch(targets))
    assert {"loss_class_dn", "loss_class_dn_0", "loss_giou_dn_0"} <= set(out)
    torch.testing.assert_close(out["loss_class_dn"], out["loss_class_dn_0"])
    none = _criterion()(
        DetectorOutput(pred=_perfect(targets), aux=[_perfect(targets)]), _batch(targets)
    )
    assert float(none["loss_class_dn"]) == 0.0 and float(none["loss_bbox_dn_0"]) == 0.0


def test_one_to_many_branch_matches_each_gt_k_times():
    targets = _targets()
    k = 2
    o2m = _perfect(targets, num_queries=8)
    for b, t in enumerate(targets):  # a second exact copy of every GT
        n = len(t.labels)
        o2m.logits[b, 4 : 4 + n] = o2m.logits[b, :n]
        o2m.boxes[b, 4 : 4 + n] = t.boxes
    crit = _criterion(one_to_many_k=k, one_to_many_weight=0.5, dn=False)
    out = crit(DetectorOutput(pred=_perfect(targets), one_to_many=[o2m]), _batch(targets))
    assert float(out["loss_bbox_o2m"]) < 1e-6 and float(out["loss_class_o2m"]) < 1e-3
    # with k=1 the duplicate is background and gets a large class loss
    one = _criterion(one_to_many_k=1, dn=False)(
        DetectorOutput(pred=_perfect(targets), one_to_many=[o2m]), _batch(targets)
    )
    assert one["loss_class_o2m"] > 1.0


# ------------------------------------------------------------------------------ dense
def test_fcos_assign_hand_made():
    # stride 8 locations on a 64x64 image (8x8 grid) and stride 16 (4x4 grid)
    pts, strides = [], []
    for s in (8, 16):
        r = torch.arange(64 // s, dtype=torch.float32) * s + s / 2
        yy, xx = torch.meshgrid(r, r, indexing="ij")
        pts.append(torch.stack((xx.flatten(), yy.flatten()), -1))
        strides.append(torch.full((len(r) ** 2,), s))
    points, strides = torch.cat(pts), torch.cat(strides)
    valid = torch.ones(len(points), dtype=torch.bool)
    # small box (fits stride 8's range, max(ltrb) <= 64) and a box overlapping it
    gt = torch.tensor([[8.0, 8.0, 24.0, 24.0], [0.0, 0.0, 40.0, 40.0]])
    assigned = fcos_assign(points, strides, valid, gt, center_radius=1.5)
    pos0 = points[assigned == 0]
    assert len(pos0) > 0
    assert ((pos0 > 8) & (pos0 < 24)).all()  # inside the small box
    # the overlap goes to the smaller box
    assert int(assigned[(points[:, 0] == 12) & (points[:, 1] == 12) & (strides == 8)]) == 0
    assert (assigned == 1).any()
    # a tiny box between locations still gets one positive (fallback)
    tiny = torch.tensor([[9.0, 9.0, 10.0, 10.0]])
    assert int((fcos_assign(points, strides, valid, tiny) == 0).sum()) == 1
    assert (fcos_assign(points, strides, valid, torch.zeros(0, 4)) == -1).all()


def _dense_output(bsz: int) -> DenseOutput:
    r = (torch.arange(8, dtype=torch.float32) + 0.5) / 8  # stride 8 on a 64 px image
    yy, xx = torch.meshgrid(r, r, indexing="ij")
    points = torch.stack((xx.flatten(), yy.flatten()), -1)  # [64, 2]
    torch.manual_seed(4)
    return DenseOutput(
        logits=torch.randn(bsz, 64, K, requires_grad=True),
        boxes=torch.rand(bsz, 64, 4) * 0.3 + 0.2,
        points=points,
        strides=torch.full((64,), 8),
        valid=torch.ones(bsz, 64, dtype=torch.bool),
    )


def test_dense_head_loss_and_empty_image():
    targets = _targets()
    dense = _dense_output(2)
    crit = _criterion(dense_weight=2.0, dn=False)
    out = crit(DetectorOutput(pred=_perfect(targets), dense=dense), _batch(targets))
    for term in ("class", "bbox", "giou"):
        assert torch.isfinite(out[f"loss_{term}_dense"]) and out[f"loss_{term}_dense"] > 0
    out["loss"].backward()
    assert dense.logits.grad.abs().sum() > 0
    empty = Target(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))
    dense1 = _dense_output(1)
    e = crit(DetectorOutput(pred=_perfect([empty]), dense=dense1), _batch([empty]))
    assert float(e["loss_bbox_dense"]) == 0.0 and float(e["loss_giou_dense"]) == 0.0
    assert torch.isfinite(e["loss_class_dense"])
    # perfect dense boxes on the positives -> zero box loss
    d2 = _dense_output(2)
    h = torch.tensor([64.0, 64.0])
    for b, t in enumerate(targets):
        from damex.structures import box_cxcywh_to_xyxy

        a = fcos_assign(d2.points * h, d2.strides, d2.valid[b], box_cxcywh_to_xyxy(t.boxes) * 64)
        d2.boxes[b, a >= 0] = t.boxes[a[a >= 0]]
    p = crit(DetectorOutput(pred=_perfect(targets), dense=d2), _batch(targets))
    assert float(p["loss_bbox_dense"]) < 1e-6


def test_label_out_of_range_raises():
    bad = [Target(torch.tensor([[0.5, 0.5, 0.1, 0.1]]), torch.tensor([K]))]
    with pytest.raises(ValueError, match="num_classes"):
        _criterion()(DetectorOutput(pred=_perfect(_targets()[:1])), _batch(bad))


def test_build_criterion_from_config():
    cfg = Config()
    crit = build_criterion(cfg, num_classes=7)
    assert crit.num_classes == 7 and crit.moe_loss == "none"  # all-dense decoder by default
    assert crit.matcher.cost_bbox == 5.0 and crit.one_to_many_weight == 0.0
    cfg = replace(
        cfg,
        model=replace(cfg.model, decoder_ffn=["moe", "dense"] * 3),
        moe=replace(cfg.moe, damex_tokens="exclude_dn"),
    )
    crit = build_criterion(cfg, num_classes=7)
    assert crit.moe_loss == "damex" and crit.damex_tokens == "exclude_dn"
    assert crit.moe_weight == pytest.approx(0.1)


# -------------------------------------------------------------------------------- MoE
E = 4


def _routing(
    bsz: int,
    num_q: int,
    num_dn: int,
    num_pad: int,
    *,
    seed: int = 0,
    query_major: bool = True,
    logits: torch.Tensor | None = None,
) -> RoutingInfo:
    """Tokens of one MoE layer: per image num_q matching, num_dn DN, num_pad DN_PAD tokens, laid
    out query-major (slot-major, as the official [NQ, B, d] flattening) or image-major."""
    kinds = [TokenKind.MATCHING] * num_q + [TokenKind.DN] * num_dn + [TokenKind.DN_PAD] * num_pad
    per_image = len(kinds)
    kind = torch.tensor(kinds).repeat(bsz, 1)  # [B, L]
    query = torch.tensor(list(range(num_q)) + [-1] * (num_dn + num_pad)).repeat(bsz, 1)
    image = torch.arange(bsz)[:, None].expand(bsz, per_image)
    if query_major:
        kind, query, image = (x.t().reshape(-1) for x in (kind, query, image))
    else:
        kind, query, image = (x.reshape(-1) for x in (kind, query, image))
    t = bsz * per_image
    if logits is None:
        logits = torch.randn(t, E, generator=torch.Generator().manual_seed(seed))
    logits = logits.clone().requires_grad_(True)
    expert = logits.argmax(-1, keepdim=True)
    return RoutingInfo(
        logits=logits,
        noisy_logits=None,
        expert=expert,
        gate=logits.softmax(-1).gather(1, expert),
        kept=torch.ones(t, 1, dtype=torch.bool),
        token_image=image.contiguous(),
        token_kind=kind.contiguous(),
        token_query=query.contiguous(),
    )


def test_select_tokens_modes():
    info = _routing(2, 3, 2, 1)
    kind = info.token_kind
    fg = torch.tensor([[True, False, False], [False, False, True]])
    assert select_tokens(info, "all").all()
    assert torch.equal(select_tokens(info, "matching_only"), kind == TokenKind.MATCHING)
    assert torch.equal(
        select_tokens(info, "exclude_dn"), (kind != TokenKind.DN) & (kind != TokenKind.DN_PAD)
    )
    sel = select_tokens(info, "foreground", fg)
    picked = {(int(i), int(q)) for i, q in zip(info.token_image[sel], info.token_query[sel])}
    assert picked == {(0, 0), (1, 2)}
    with pytest.raises(ValueError, match="foreground"):
        select_tokens(info, "foreground")


def _ce_ref(infos: list[RoutingInfo], masks: list[torch.Tensor], expert_ids: torch.Tensor):
    vals = []
    for info, m in zip(infos, masks):
        tgt = expert_ids[info.token_image]
        vals.append(F.cross_entropy(info.logits[m], tgt[m]))
    return torch.stack(vals).mean()


def test_damex_all_tokens_matches_reference_and_is_layout_invariant():
    targets = _targets()
    experts = torch.tensor([1, 3])
    batch = _batch(targets, experts.tolist())
    crit = _criterion(moe_loss="damex", damex_tokens="all", moe_weight=0.1)
    layers = [_routing(2, Q, 4, 2, seed=s) for s in (0, 1)]
    out = crit(DetectorOutput(pred=_perfect(targets), routing=layers), batch)
    ref = _ce_ref(layers, [torch.ones(len(i.logits), dtype=torch.bool) for i in layers], experts)
    torch.testing.assert_close(out["unweighted/loss_moe"], ref.detach())
    torch.testing.assert_close(out["loss_moe"], 0.1 * ref)
    # per image, with its tokens in another (permuted) order: the batch loss is their mean
    per_image = []
    for b in range(2):
        singles = []
        for info in layers:
            sel = torch.nonzero(info.token_image == b).flatten()
            perm = sel[torch.randperm(len(sel), generator=torch.Generator().manual_seed(b))]
            singles.append(
                RoutingInfo(
                    logits=info.logits.detach()[perm],
                    noisy_logits=None,
                    expert=info.expert[perm],
                    gate=info.gate.detach()[perm],
                    kept=info.kept[perm],
                    token_image=torch.zeros(len(perm), dtype=torch.long),
                    token_kind=info.token_kind[perm],
                    token_query=info.token_query[perm],
                )
            )
        t = targets[b : b + 1]
        pred = _perfect(t)
        r = crit(DetectorOutput(pred=pred, routing=singles), _batch(t, [int(experts[b])]))
        per_image.append(r["unweighted/loss_moe"])
    torch.testing.assert_close(out["unweighted/loss_moe"], torch.stack(per_image).mean())
    # image-major layout of the same tokens gives the same loss
    im_layers = []
    for info in layers:
        order = torch.argsort(info.token_image * 10_000 + torch.arange(len(info.token_image)))
        im_layers.append(
            RoutingInfo(
                logits=info.logits.detach()[order],
                noisy_logits=None,
                expert=info.expert[order],
                gate=info.gate.detach()[order],
                kept=info.kept[order],
                token_image=info.token_image[order],
                token_kind=info.token_kind[order],
                token_query=info.token_query[order],
            )
        )
    im = crit(DetectorOutput(pred=_perfect(targets), routing=im_layers), batch)
    torch.testing.assert_close(im["unweighted/loss_moe"], out["unweighted/loss_moe"])


def test_damex_foreground_selects_matched_tokens_and_gradient_flows():
    targets = _targets()
    experts = torch.tensor([2, 0])
    crit = _criterion(moe_loss="damex", damex_tokens="foreground")
    info = _routing(2, Q, 4, 2, seed=5)
    out = crit(DetectorOutput(pred=_perfect(targets), routing=[info]), _batch(targets, [2, 0]))
    # _perfect puts GT i at query i: fg = (0, 0), (0, 1), (1, 0)
    perfect = _perfect(targets)
    fg = foreground_mask(HungarianMatcher()(perfect.logits, perfect.boxes, targets), Q)
    assert torch.nonzero(fg).tolist() == [[0, 0], [0, 1], [1, 0]]
    out["loss"].backward()
    grad_rows = info.logits.grad.abs().sum(-1) > 0  # [T]
    picked = {
        (int(i), int(q)) for i, q in zip(info.token_image[grad_rows], info.token_query[grad_rows])
    }
    assert picked == {(0, 0), (0, 1), (1, 0)}
    assert (info.token_kind[grad_rows] == TokenKind.MATCHING).all()
    mask = grad_rows
    torch.testing.assert_close(
        out["unweighted/loss_moe"], _ce_ref([info], [mask], experts).detach()
    )


@pytest.mark.parametrize("mode", ["matching_only", "exclude_dn"])
def test_damex_token_modes_match_reference(mode):
    targets = _targets()
    experts = torch.tensor([1, 2])
    info = _routing(2, Q, 4, 2, seed=7)
    crit = _criterion(moe_loss="damex", damex_tokens=mode)
    out = crit(DetectorOutput(pred=_perfect(targets), routing=[info]), _batch(targets, [1, 2]))
    ref = _ce_ref([info], [select_tokens(info, mode)], experts)
    torch.testing.assert_close(out["unweighted/loss_moe"], ref.detach())


def test_damex_ignores_images_without_expert():
    targets = _targets()
    info = _routing(2, Q, 4, 2, seed=8)
    crit = _criterion(moe_loss="damex")
    out = crit(DetectorOutput(pred=_perfect(targets), routing=[info]), _batch(targets, [3, -1]))
    ref = _ce_ref([info], [info.token_image == 0], torch.tensor([3, 0]))
    torch.testing.assert_close(out["unweighted/loss_moe"], ref.detach())
    out["loss"].backward()
    assert info.logits.grad[info.token_image == 1].abs().sum() == 0


@pytest.mark.parametrize("loss", ["load_importance", "load_importance_corrected", "switch"])
def test_balance_losses_on_foreground_tokens(loss):
    from damex.moe import losses as moe_losses

    targets = _targets()
    layers = [_routing(2, Q, 4, 2, seed=s) for s in (9, 10)]
    crit = _criterion(
        moe_loss=loss, balance_tokens="foreground", moe_weight=0.1, z_loss_weight=0.01
    )
    out = crit(DetectorOutput(pred=_perfect(targets), routing=layers), _batch(targets, [-1, -1]))
    fg = torch.zeros(2, Q, dtype=torch.bool)
    fg[0, :2] = True
    fg[1, 0] = True
    masks = [select_tokens(i, "foreground", fg) for i in layers]
    if loss == "switch":
        ref = [moe_losses.switch_loss(i, token_mask=m) for i, m in zip(layers, masks)]
    else:
        variant = "tutel" if loss == "load_importance" else "corrected"
        ref = [
            moe_losses.load_importance_loss(i, token_mask=m, variant=variant, gate_noise=1.0)
            for i, m in zip(layers, masks)
        ]
    torch.testing.assert_close(out["unweighted/loss_moe"], torch.stack(ref).mean().detach())
    assert "loss_z" in out and torch.isfinite(out["loss"])
    out["loss"].backward()
    assert layers[0].logits.grad.abs().sum() > 0
