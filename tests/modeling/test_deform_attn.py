"""Multi-scale deformable attention against a naive float64 reference written from the formula."""

from __future__ import annotations

import math

import pytest
import torch

from damex.modeling.deform_attn import MSDeformAttn, ms_deform_attn

SHAPES = [(5, 7), (3, 4), (2, 2)]


def _naive_bilinear(img: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """img [C, H, W]; (x, y) normalized in [0, 1] (align_corners=False); zeros outside."""
    _, height, width = img.shape
    px = x * width - 0.5  # pixel centres sit at integer coordinates
    py = y * height - 0.5
    x0 = math.floor(px.item())
    y0 = math.floor(py.item())
    out = torch.zeros(img.shape[0], dtype=img.dtype)
    for yy in (y0, y0 + 1):
        for xx in (x0, x0 + 1):
            wx = 1 - (px - xx).abs()
            wy = 1 - (py - yy).abs()
            if 0 <= xx < width and 0 <= yy < height:
                out = out + wx * wy * img[:, yy, xx]
    return out


def _naive_ms_deform_attn(value, shapes, locations, weights):
    bsz, _, heads, head_dim = value.shape
    _, nq, _, levels, points, _ = locations.shape
    starts = [0]
    for h, w in shapes[:-1]:
        starts.append(starts[-1] + h * w)
    rows = []
    for b in range(bsz):
        per_q = []
        for q in range(nq):
            per_h = []
            for h in range(heads):
                acc = torch.zeros(head_dim, dtype=value.dtype)
                for lvl, (hl, wl) in enumerate(shapes):
                    img = value[b, starts[lvl] : starts[lvl] + hl * wl, h].t().reshape(-1, hl, wl)
                    for p in range(points):
                        x, y = locations[b, q, h, lvl, p]
                        acc = acc + weights[b, q, h, lvl, p] * _naive_bilinear(img, x, y)
                per_h.append(acc)
            per_q.append(torch.cat(per_h))
        rows.append(torch.stack(per_q))
    return torch.stack(rows)


def _random_inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    bsz, nq, heads, head_dim, points = 2, 3, 2, 4, 2
    s = sum(h * w for h, w in SHAPES)
    value = torch.randn(bsz, s, heads, head_dim, generator=g, dtype=torch.float64)
    # include locations outside [0, 1] to exercise zero padding
    loc = torch.rand(bsz, nq, heads, len(SHAPES), points, 2, generator=g, dtype=torch.float64)
    loc = loc * 1.3 - 0.15
    w = torch.rand(bsz, nq, heads, len(SHAPES), points, generator=g, dtype=torch.float64)
    w = w / w.sum((-1, -2), keepdim=True)
    return value, loc, w


@pytest.mark.parametrize("impl", ["grid_sample", "sparse"])
def test_forward_and_gradients_match_naive_reference(impl):
    value, loc, w = _random_inputs()
    starts = torch.tensor([0, 35, 47])
    tensors = [t.clone().requires_grad_(True) for t in (value, loc, w)]
    naive = [t.clone().requires_grad_(True) for t in (value, loc, w)]
    out = ms_deform_attn(
        tensors[0], torch.tensor(SHAPES), starts, tensors[1], tensors[2], impl=impl
    )
    ref = _naive_ms_deform_attn(naive[0], SHAPES, naive[1], naive[2])
    assert out.shape == (2, 3, 8)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    upstream = torch.randn_like(out)
    (out * upstream).sum().backward()
    (ref * upstream).sum().backward()
    for name, a, b in zip(("value", "locations", "weights"), tensors, naive):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("impl", ["grid_sample", "sparse"])
def test_float32_matches_float64(impl):
    value, loc, w = _random_inputs(1)
    out64 = ms_deform_attn(value, SHAPES, None, loc, w, impl=impl)
    out32 = ms_deform_attn(value.float(), SHAPES, None, loc.float(), w.float(), impl=impl)
    torch.testing.assert_close(out32.double(), out64, atol=1e-5, rtol=1e-5)


def _hard_locations(shapes, bsz, nq, heads, points, g, dtype):
    """Random points (a third outside the map), points exactly on the map's edges (0 and 1),
    a quarter pixel outside them, and, on power-of-two maps (where ``loc * size`` is exact and
    both implementations see the same side of bilinear's kink), exactly on pixel centres."""
    loc = torch.rand(bsz, nq, heads, len(shapes), points, 2, generator=g, dtype=dtype)
    loc = loc * 1.6 - 0.3
    sizes = torch.tensor([[w, h] for h, w in shapes], dtype=dtype)[:, None]  # [L, 1, 2] (x, y)
    special = torch.tensor([0.0, 1.0, -0.25, 1.25], dtype=dtype)
    edges = special[torch.randint(0, 4, loc.shape, generator=g)]
    edges = torch.where(edges < 0, edges / sizes, edges)
    edges = torch.where(edges > 1, 1 + (edges - 1) / sizes, edges)
    centres = (torch.randint(-1, 9, loc.shape, generator=g).to(dtype) + 0.5) / sizes
    pow2 = all(h & (h - 1) == 0 and w & (w - 1) == 0 for h, w in shapes)
    pick = torch.randint(0, 3 if pow2 else 2, loc.shape, generator=g)
    loc = torch.where(pick == 1, edges, loc)
    return torch.where(pick == 2, centres, loc)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    "shapes",
    [[(5, 7), (3, 4), (2, 2)], [(9, 13), (5, 7), (3, 4), (1, 2)], [(8, 4), (4, 2), (1, 1)]],
)
def test_sparse_equals_grid_sample_forward_and_gradients(shapes, dtype):
    g = torch.Generator().manual_seed(len(shapes))
    bsz, nq, heads, head_dim, points = 2, 11, 3, 5, 4
    s = sum(h * w for h, w in shapes)
    value = torch.randn(bsz, s, heads, head_dim, generator=g, dtype=dtype)
    loc = _hard_locations(shapes, bsz, nq, heads, points, g, dtype)
    w = torch.rand(bsz, nq, heads, len(shapes), points, generator=g, dtype=dtype)
    upstream = torch.randn(bsz, nq, heads * head_dim, generator=g, dtype=dtype)
    results = {}
    for impl in ("grid_sample", "sparse"):
        inputs = [t.clone().requires_grad_(True) for t in (value, loc, w)]
        out = ms_deform_attn(inputs[0], shapes, None, inputs[1], inputs[2], impl=impl)
        grads = torch.autograd.grad(out, inputs, upstream)
        results[impl] = (out, *grads)
    for name, a, b in zip(
        ("output", "value", "locations", "weights"), results["grid_sample"], results["sparse"]
    ):
        # location gradients scale with the map size (d pixel / d loc = W_l)
        scale = 20.0 if name == "locations" else 1.0
        torch.testing.assert_close(b, a, atol=1e-5 * scale, rtol=1e-5, msg=name)


def test_sparse_without_grad_equals_with_grad():
    value, loc, w = _random_inputs(2)
    with torch.no_grad():
        fast = ms_deform_attn(value, SHAPES, None, loc, w, impl="sparse")
    graph = ms_deform_attn(value.requires_grad_(True), SHAPES, None, loc, w, impl="sparse")
    assert graph.requires_grad
    torch.testing.assert_close(fast, graph.detach(), atol=0, rtol=0)


def test_auto_picks_sparse_on_cpu_and_rejects_unknown_impl():
    value, loc, w = _random_inputs(3)
    prev = torch.get_num_threads()
    try:
        for threads in (1, 2):  # the choice does not depend on the thread count
            torch.set_num_threads(threads)
            auto = ms_deform_attn(value, SHAPES, None, loc, w)
            chosen = ms_deform_attn(value, SHAPES, None, loc, w, impl="sparse")
            torch.testing.assert_close(auto, chosen, atol=0, rtol=0)
    finally:
        torch.set_num_threads(prev)
    # no sparse kernel for bf16 on CPU: the reference runs (and sparse refuses it)
    half = [t.to(torch.bfloat16) for t in (value, loc, w)]
    auto = ms_deform_attn(half[0], SHAPES, None, half[1], half[2])
    chosen = ms_deform_attn(half[0], SHAPES, None, half[1], half[2], impl="grid_sample")
    torch.testing.assert_close(auto, chosen, atol=0, rtol=0)
    with pytest.raises(ValueError, match="float32 or float64"):
        ms_deform_attn(half[0], SHAPES, None, half[1], half[2], impl="sparse")
    with pytest.raises(ValueError, match="impl"):
        ms_deform_attn(value, SHAPES, None, loc, w, impl="cuda_kernel")
    with pytest.raises(ValueError, match="impl"):
        MSDeformAttn(d_model=8, n_levels=1, n_heads=2, n_points=1, impl="fast")


def test_sparse_survives_non_finite_locations():
    """A diverging run can produce NaN / inf sampling locations: they must neither index
    outside the value matrix nor poison the other points (grid_sample samples them as 0)."""
    value, loc, w = _random_inputs(4)
    loc = loc.clone()
    loc[0, 0, 0, 0, 0] = float("nan")
    loc[0, 1, 1, 1, 1, 0] = float("inf")
    loc[1, 2, 0, 2, 0, 1] = -float("inf")
    out = ms_deform_attn(value, SHAPES, None, loc, w, impl="sparse")
    keep = torch.ones(loc.shape[:-1], dtype=torch.bool)
    keep[0, 0, 0, 0, 0] = keep[0, 1, 1, 1, 1] = keep[1, 2, 0, 2, 0] = False
    expected = ms_deform_attn(value, SHAPES, None, loc.nan_to_num(0.5), w * keep, impl="sparse")
    torch.testing.assert_close(out, expected)


def test_sparse_batch_rows_are_independent():
    """Each image's output depends on its own values only (the padded matrix keeps images
    apart: a corner never reads a neighbouring image's or level's row)."""
    value, loc, w = _random_inputs(5)
    loc = loc * 1.6 - 0.3  # many points beyond the border
    full = ms_deform_attn(value, SHAPES, None, loc, w, impl="sparse")
    for b in range(value.shape[0]):
        alone = ms_deform_attn(value[b : b + 1], SHAPES, None, loc[b : b + 1], w[b : b + 1])
        torch.testing.assert_close(full[b : b + 1], alone, atol=1e-12, rtol=0)


def test_rejects_inconsistent_shapes():
    value, loc, w = _random_inputs()
    with pytest.raises(ValueError, match="spatial_shapes"):
        ms_deform_attn(value, [(5, 7), (3, 4)], None, loc, w)
    with pytest.raises(ValueError, match="level_start_index"):
        ms_deform_attn(value, SHAPES, [0, 30, 47], loc, w)


def _module_and_inputs(ref_dim: int):
    torch.manual_seed(0)
    attn = MSDeformAttn(d_model=16, n_levels=len(SHAPES), n_heads=2, n_points=3)
    with torch.no_grad():  # non-trivial parameters
        for p in attn.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    s = sum(h * w for h, w in SHAPES)
    query = torch.randn(2, 4, 16)
    value_in = torch.randn(2, s, 16)
    ref = torch.rand(2, 4, len(SHAPES), ref_dim) * 0.5 + 0.25
    return attn, query, value_in, ref


def test_module_box_references_scale_offsets_by_box_size():
    attn, query, value_in, ref = _module_and_inputs(4)
    out = attn(query, ref, value_in, SHAPES)
    # the same result from the core with hand-computed locations
    offsets = attn.sampling_offsets(query).view(2, 4, 2, 3, 3, 2)
    weights = attn.attention_weights(query).view(2, 4, 2, 9).softmax(-1).view(2, 4, 2, 3, 3)
    loc = ref[:, :, None, :, None, :2] + offsets / 3 * ref[:, :, None, :, None, 2:] * 0.5
    value = attn.value_proj(value_in).view(2, -1, 2, 8)
    expected = attn.output_proj(ms_deform_attn(value, SHAPES, None, loc, weights))
    torch.testing.assert_close(out, expected)


def test_module_point_references_normalize_offsets_by_level_size():
    attn, query, value_in, ref = _module_and_inputs(2)
    out = attn(query, ref, value_in, SHAPES)
    offsets = attn.sampling_offsets(query).view(2, 4, 2, 3, 3, 2)
    weights = attn.attention_weights(query).view(2, 4, 2, 9).softmax(-1).view(2, 4, 2, 3, 3)
    norm = torch.tensor([[w, h] for h, w in SHAPES], dtype=torch.float32)
    loc = ref[:, :, None, :, None, :] + offsets / norm[None, None, None, :, None]
    value = attn.value_proj(value_in).view(2, -1, 2, 8)
    expected = attn.output_proj(ms_deform_attn(value, SHAPES, None, loc, weights))
    torch.testing.assert_close(out, expected)


def test_padded_values_do_not_contribute():
    attn, query, value_in, ref = _module_and_inputs(2)
    mask = torch.zeros(2, value_in.shape[1], dtype=torch.bool)
    mask[1, 10:20] = True
    out = attn(query, ref, value_in, SHAPES, padding_mask=mask)
    garbage = value_in.clone()
    garbage[1, 10:20] = 1e3
    out2 = attn(query, ref, garbage, SHAPES, padding_mask=mask)
    torch.testing.assert_close(out, out2)


def test_init_offsets_form_directional_grid():
    attn = MSDeformAttn(d_model=32, n_levels=2, n_heads=4, n_points=2)
    bias = attn.sampling_offsets.bias.view(4, 2, 2, 2)
    # head 0 points along +x, head 1 along +y; point p is (p + 1) steps out
    torch.testing.assert_close(bias[0, 0, 1], torch.tensor([2.0, 0.0]))
    torch.testing.assert_close(bias[1, 1, 0], torch.tensor([0.0, 1.0]), atol=1e-6, rtol=0)
    assert attn.attention_weights.weight.abs().sum() == 0
    assert attn.sampling_offsets.weight.abs().sum() == 0


def test_sparse_core_ignores_autocast():
    """Under bf16 autocast the module passes float32 values; the sparse products (which have
    no bf16 kernel) must run in float32 in the forward and in a backward called inside autocast."""
    value, loc, w = (t.float() for t in _random_inputs(6))
    plain = [t.clone().requires_grad_(True) for t in (value, loc, w)]
    cast = [t.clone().requires_grad_(True) for t in (value, loc, w)]
    ref = ms_deform_attn(plain[0], SHAPES, None, plain[1], plain[2], impl="sparse")
    ref.sum().backward()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ms_deform_attn(cast[0], SHAPES, None, cast[1], cast[2], impl="sparse")
        out.sum().backward()
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    for a, b in zip(cast, plain):
        torch.testing.assert_close(a.grad, b.grad, atol=0, rtol=0)


def test_auto_traces_the_reference_under_torch_compile(monkeypatch):
    """Inductor cannot trace sparse CSR tensors: while compiling, ``auto`` is grid_sample."""
    value, loc, w = (t.float() for t in _random_inputs(7))
    sparse = ms_deform_attn(value, SHAPES, None, loc, w, impl="sparse")
    reference = ms_deform_attn(value, SHAPES, None, loc, w, impl="grid_sample")
    assert not torch.equal(sparse, reference)  # float32 rounding tells them apart
    assert torch.equal(ms_deform_attn(value, SHAPES, None, loc, w), sparse)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert torch.equal(ms_deform_attn(value, SHAPES, None, loc, w), reference)
