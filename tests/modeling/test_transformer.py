"""Transformer pieces: DropPath, FFN blocks, proposals, query selection, box refinement."""

from __future__ import annotations

import torch
from torch import nn

from damex.modeling.deform_attn import MSDeformAttn
from damex.modeling.outputs import TokenKind
from damex.modeling.position import sine_box_embedding, sine_position_embedding
from damex.modeling.transformer import (
    FFN,
    BoxHead,
    ClassHead,
    DecoderLayer,
    DeformableDecoder,
    DeformableEncoder,
    DeformableTransformer,
    EncoderLayer,
    MoEBlock,
    TokenTags,
    drop_path,
    encoder_proposals,
    encoder_reference_points,
)
from damex.moe import MoEFFN

D, H, L, K = 32, 2, 2, 5


def _decoder(num_layers: int, ffn_factory=None) -> DeformableDecoder:
    layers = [
        DecoderLayer(
            self_attn=nn.MultiheadAttention(D, H, batch_first=True),
            cross_attn=MSDeformAttn(d_model=D, n_levels=L, n_heads=H, n_points=2),
            ffn=ffn_factory() if ffn_factory else FFN(d_model=D, hidden_dim=64),
            d_model=D,
        )
        for _ in range(num_layers)
    ]
    return DeformableDecoder(
        layers=layers,
        d_model=D,
        class_head=ClassHead(d_model=D, num_classes=K),
        box_head=BoxHead(d_model=D),
    )


def _transformer(enc_layers=1, dec_layers=2, num_queries=6, o2m=0, two_stage=True):
    torch.manual_seed(0)
    enc = DeformableEncoder(
        layers=[
            EncoderLayer(d_model=D, n_heads=H, n_levels=L, n_points=2, dim_feedforward=64)
            for _ in range(enc_layers)
        ]
    )
    return DeformableTransformer(
        encoder=enc,
        decoder=_decoder(dec_layers),
        d_model=D,
        num_levels=L,
        num_queries=num_queries,
        num_classes=K,
        two_stage=two_stage,
        one_to_many_queries=o2m,
    )


def _levels(bsz=2, shapes=((6, 8), (3, 4)), valid=((6, 8), (4, 5))):
    """Random level features, image b valid on the top-left ``valid[b]`` cells of level 0."""
    srcs, masks = [], []
    for lvl, (h, w) in enumerate(shapes):
        mask = torch.ones(bsz, h, w, dtype=torch.bool)
        for b, (vh, vw) in enumerate(valid):
            s = 2**lvl
            mask[b, : -(-vh // s), : -(-vw // s)] = False
        srcs.append(torch.randn(bsz, D, h, w) * (~mask)[:, None])
        masks.append(mask)
    return srcs, masks


def test_drop_path_is_per_token_and_scaled():
    torch.manual_seed(0)
    x = torch.ones(64, 50, 4)
    y = drop_path(x, 0.5, training=True)
    vals = set(torch.unique(y).tolist())
    assert vals == {0.0, 2.0}
    assert (y == y[..., :1]).all()  # one draw per token, shared by its features
    # tokens of the same query index are dropped independently in different images
    assert not (y[:, :, 0] == y[:1, :, 0]).all()
    assert abs(y.mean().item() - 1.0) < 0.05
    assert torch.equal(drop_path(x, 0.5, training=False), x)


def test_drop_path_equals_the_hand_written_per_token_formula():
    """torchvision's stochastic_depth on [B*N, D] rows = the former per-token formula."""

    def reference(x: torch.Tensor, p: float) -> torch.Tensor:
        keep = 1.0 - p
        mask = torch.empty(x.shape[:-1] + (1,), dtype=x.dtype).bernoulli_(keep)  # [B, N, 1]
        return x * mask / keep

    x = torch.randn(3, 7, 5)  # [B, N, D]
    for p in (0.1, 0.2, 0.5, 0.9):
        torch.manual_seed(1)
        expected = reference(x, p)
        torch.manual_seed(1)
        torch.testing.assert_close(drop_path(x, p, training=True), expected, rtol=1e-6, atol=0)
    assert torch.equal(drop_path(x, 0.0, training=True), x)
    assert torch.equal(drop_path(x, 0.2, training=False), x)
    gen_state = torch.get_rng_state()
    drop_path(x, 0.2, training=False)  # eval draws nothing
    assert torch.equal(torch.get_rng_state(), gen_state)


def test_dense_ffn_is_post_norm():
    torch.manual_seed(0)
    ffn = FFN(d_model=D, hidden_dim=64)
    x = torch.randn(2, 3, D)
    y, info = ffn(x)
    expected = ffn.norm(x + ffn.linear2(torch.relu(ffn.linear1(x))))
    torch.testing.assert_close(y, expected)
    assert info is None


def test_moe_block_pre_norm_batch_major_tags():
    torch.manual_seed(0)
    # one expert, no capacity limit, no noise: the gate is 1 and y = x + Expert(LN(x))
    moe = MoEFFN(d_model=D, hidden_dim=64, num_experts=1, capacity_factor=0.0, gate_noise=0.0)
    block = MoEBlock(moe=moe, d_model=D, drop_path=0.2).eval()
    x = torch.randn(2, 3, D)
    kind = torch.tensor([[1, 0, 0], [2, 0, 0]])
    query = torch.tensor([[-1, 0, 1], [-1, 0, 1]])
    y, info = block(x, TokenTags(kind, query))
    assert info.token_image.tolist() == [0, 0, 0, 1, 1, 1]  # batch-major flattening
    assert info.token_kind.tolist() == [1, 0, 0, 2, 0, 0]
    assert info.token_query.tolist() == [-1, 0, 1, -1, 0, 1]
    expert0 = moe.experts[0]  # ExpertFFN: fc1 -> GELU -> fc2
    expected = x + expert0(block.norm(x).reshape(6, D)).view(2, 3, D)
    torch.testing.assert_close(y, expected)  # pre-norm, no norm after the residual
    # in training, DropPath zeroes whole tokens of the MoE branch independently per image
    block.train()
    torch.manual_seed(1)
    y_train, _ = block(x.repeat(8, 1, 1), None)
    branch = y_train - x.repeat(8, 1, 1)
    dropped = branch.abs().amax(-1) == 0  # [16, 3]
    assert dropped.any() and not dropped.all()
    assert not (dropped == dropped[:1]).all()


def test_encoder_reference_points_are_padding_invariant_in_pixels():
    shapes = [(6, 8), (3, 4)]
    _, masks = _levels(shapes=shapes)
    vr = torch.stack(
        [
            torch.stack(
                ((~m[:, 0, :]).sum(1) / m.shape[2], (~m[:, :, 0]).sum(1) / m.shape[1]), -1
            ).float()
            for m in masks
        ],
        1,
    )
    ref = encoder_reference_points(shapes, vr)  # [B, S, L, 2]
    assert ref.shape == (2, 48 + 12, 2, 2)
    # image 1, level-0 location (row 1, col 2): pixel centre (2.5, 1.5) at level 0
    idx = 1 * 8 + 2
    px = ref[1, idx, 0] * torch.tensor([8.0, 6.0])
    torch.testing.assert_close(px, torch.tensor([2.5, 1.5]))
    # at level 1 (valid 3x2 cells of 4x3 map... image 1 is 4x5 at level 0 -> 2x3 at level 1)
    px1 = ref[1, idx, 1] * torch.tensor([4.0, 3.0])
    torch.testing.assert_close(px1, torch.tensor([2.5 / 5 * 3, 1.5 / 4 * 2]))


def test_encoder_proposals_valid_and_values():
    shapes = [(6, 8), (3, 4)]
    _, masks = _levels(shapes=shapes)
    mask_flat = torch.cat([m.flatten(1) for m in masks], 1)
    props, valid = encoder_proposals(mask_flat, shapes)
    boxes = props.sigmoid()
    assert not (valid & mask_flat).any()  # padding never valid
    # image 1 level 0 is valid on 4 rows x 5 cols: cell (1, 2) centre (2.5 / 5, 1.5 / 4)
    torch.testing.assert_close(boxes[1, 10], torch.tensor([0.5, 1.5 / 4, 0.05, 0.05]))
    torch.testing.assert_close(boxes[0, 48, 2:], torch.tensor([0.1, 0.1]))  # level 1 size


def test_position_embedding_padding_invariant():
    mask = torch.ones(1, 7, 9, dtype=torch.bool)
    mask[0, :4, :5] = False
    pos = sine_position_embedding(mask, 8)
    alone = sine_position_embedding(torch.zeros(1, 4, 5, dtype=torch.bool), 8)
    torch.testing.assert_close(pos[..., :4, :5], alone)
    emb = sine_box_embedding(torch.tensor([[0.2, 0.4, 0.1, 0.3]]), 8)
    assert emb.shape == (1, 32)
    # (y, x, w, h) order: the first block encodes y = 0.4 (sin at freq 1 = sin(0.4 * 2pi))
    torch.testing.assert_close(emb[0, 0], torch.sin(torch.tensor(0.4 * 2 * torch.pi)))


def test_zero_init_box_head_keeps_anchors_and_look_forward_twice_gradient():
    torch.manual_seed(0)
    for num_layers, factor in ((1, 1.0), (2, 2.0), (3, 2.0)):
        dec = _decoder(num_layers)
        srcs, masks = _levels()
        memory = torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], 1)
        mask_flat = torch.cat([m.flatten(1) for m in masks], 1)
        anchors = torch.randn(2, 4, 4) * 0.5
        out = dec(
            torch.randn(2, 4, D),
            anchors,
            memory,
            [(6, 8), (3, 4)],
            torch.ones(2, L, 2),
            mask_flat,
            None,
            None,
        )
        assert len(out.boxes) == num_layers and out.logits[0].shape == (2, 4, K)
        for boxes in out.boxes:  # zero-init last box layer: every layer predicts the anchors
            torch.testing.assert_close(boxes, anchors.sigmoid())
        out.boxes[-1].sum().backward()
        s = out.boxes[-1].detach()
        expected = factor * (s * (1 - s)).sum((0, 1))
        # d box_L / d bias: its own delta + the previous layer's refinement (look forward twice)
        torch.testing.assert_close(dec.box_head.layers[-1].bias.grad, expected)


def test_two_stage_selection_excludes_padding_and_o2m_extends_matching():
    tr = _transformer(num_queries=6, o2m=4).eval()
    srcs, masks = _levels()
    with torch.no_grad():
        base = tr(srcs, masks)
        hybrid = tr(srcs, masks, one_to_many=True)
    assert base.num_one_to_many == 0 and hybrid.num_one_to_many == 4
    assert base.decoder.logits[-1].shape == (2, 6, K)
    assert hybrid.decoder.logits[-1].shape == (2, 10, K)
    # matching and one-to-many queries do not see each other: matching outputs are unchanged
    torch.testing.assert_close(hybrid.decoder.boxes[-1][:, :6], base.decoder.boxes[-1])
    torch.testing.assert_close(hybrid.decoder.logits[-1][:, :6], base.decoder.logits[-1])
    # interm = the encoder heads at the top-Q valid locations by max class logit
    mask_flat = base.memory_padding_mask
    props, valid = encoder_proposals(mask_flat, base.spatial_shapes)
    mem = tr.enc_output_norm(tr.enc_output(base.memory.masked_fill(~valid[..., None], 0)))
    logits = tr.enc_class_head(mem)
    scores = logits.amax(-1).masked_fill(~valid, float("-inf"))
    top = scores.topk(6, dim=1).indices
    for b in range(2):
        assert valid[b, top[b]].all()
        torch.testing.assert_close(base.interm.logits[b], logits[b, top[b]])
        boxes = (tr.enc_box_head(mem[b, top[b]]) + props[b, top[b]]).sigmoid()
        torch.testing.assert_close(base.interm.boxes[b], boxes)


def test_no_encoder_layers_and_learned_anchors():
    tr = _transformer(enc_layers=0, two_stage=False)
    assert tr.level_embed is None
    srcs, masks = _levels()
    out = tr(srcs, masks)
    assert out.interm is None
    torch.testing.assert_close(
        out.memory, torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], 1)
    )
    out.decoder.boxes[-1].sum().backward()
    assert tr.refpoint_embed.weight.grad is not None


def test_tags_layout_with_o2m():
    tr = _transformer(num_queries=3, o2m=2)
    moe = MoEFFN(d_model=D, hidden_dim=64, num_experts=2, capacity_factor=0.0)
    tr.decoder.layers[0].ffn = MoEBlock(moe=moe, d_model=D)
    srcs, masks = _levels()
    out = tr(srcs, masks, one_to_many=True)
    info = out.decoder.routing[0]
    row = [TokenKind.MATCHING] * 3 + [TokenKind.ONE_TO_MANY] * 2
    assert info.token_kind.tolist() == [int(k) for k in row] * 2
    assert info.token_query.tolist() == [0, 1, 2, -1, -1] * 2
    assert info.token_image.tolist() == [0] * 5 + [1] * 5


def test_encoder_proposals_are_finite_at_padded_locations():
    """Top-k may pick padded locations when an image has fewer valid ones than queries."""
    from damex.modeling.transformer import encoder_proposals

    mask = torch.zeros(2, 4, 6, dtype=torch.bool)
    mask[1, :, 3:] = True  # image 1: half of the columns are padding
    proposals, valid = encoder_proposals(mask.flatten(1), [(4, 6)])
    assert torch.isfinite(proposals).all()
    assert (
        valid[0].all() and valid[1].view(4, 6)[:, :3].all() and not valid[1].view(4, 6)[:, 3:].any()
    )


def test_encoder_grad_checkpoint_gives_the_same_output_and_gradients():
    from damex.modeling.transformer import DeformableEncoder, EncoderLayer, encoder_reference_points

    torch.manual_seed(0)
    shapes = [(6, 5), (3, 3)]
    layers = [
        EncoderLayer(d_model=16, n_heads=2, n_levels=2, n_points=2, dim_feedforward=32)
        for _ in range(2)
    ]
    encoder = DeformableEncoder(layers=layers).train()
    src = torch.randn(2, 39, 16)
    pos = torch.randn(2, 39, 16)
    ref = encoder_reference_points(shapes, torch.ones(2, 2, 2))
    results = []
    for flag in (False, True):
        encoder.grad_checkpoint = flag
        encoder.zero_grad()
        x = src.clone().requires_grad_(True)
        out = encoder(x, pos, ref, shapes, None)
        out.square().sum().backward()
        results.append((out.detach(), x.grad, [p.grad.clone() for p in encoder.parameters()]))
    (o0, gx0, gp0), (o1, gx1, gp1) = results
    torch.testing.assert_close(o1, o0)
    torch.testing.assert_close(gx1, gx0)
    for a, b in zip(gp1, gp0):
        torch.testing.assert_close(a, b)
