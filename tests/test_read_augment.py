"""Augmented and noise-aware reading (`uno_engine.read`, `ops.bridge(views=)`, `UNOConfig(read=)`).

Oracle: `reference.bridge(views=)` in float64 (dense per-view Pillow box matrices, autograd). The fp32 ops may
differ from it by at most ~2x what the fp32 reference does (plus a small atol); their gradients by 1e-5 of the
largest. Pillow itself is the oracle of the box coefficients (`Image.resize(box=)` in float mode).
"""

import dataclasses

import numpy as np
import pytest
import torch
from test_bridge import SPECS, _rand_images, assert_close_verbose
from test_step import PixelGenerator

from uno_engine import Critic, ReadAugment, UNOConfig, UNOLoss, UNOStep, ops, reference
from uno_engine.bridge_math import hash_normal
from uno_engine.read import Views, box_taps, draw_for_step, patch_in_image, view_matrices, view_tap_tables

AUG = ReadAugment(views=3, shift=3.0, scale=(0.85, 1.15), seed=1)
NOISY = ReadAugment(views=2, shift=1.5, scale=(0.9, 1.1), noise=0.15, blur=0.7, renoise=(0.05, 0.4), seed=2)
VIEW_SPECS = ["exact", "janus", "shortest-crop", "qwen2_vl", "no-clip", "vertical-first"]


def _one_view(v: Views, k: int) -> Views:
    """View k of every image of `v`, as one-view Views."""
    K = v.per_image
    rows = dict(boxes=v.boxes[k::K], alpha=v.alpha[k::K], renoise_std=v.renoise_std[k::K], keys=v.keys[k::K])
    return v._replace(per_image=1, **rows)


def _dense(start, w, count, n_in):
    V, n, K = w.shape
    d = np.zeros((V, n, n_in + K))
    for v in range(V):
        for o in range(n):
            d[v, o, start[v, o] : start[v, o] + count[v, o]] = w[v, o, : count[v, o]]
    return d[:, :, :n_in]


# ------------------------------------------------------------------------------------ the box taps
@pytest.mark.parametrize("resample", ["bicubic", "bilinear"])
@pytest.mark.parametrize(
    "n_in,n_out,box",
    [(50, 24, (3.25, 47.5)), (37, 60, (0.5, 30.75)), (101, 13, (10.0, 90.3)), (33, 33, (0, 33))],
)
def test_box_taps_match_pillow(n_in, n_out, box, resample):
    """A box inside the image: Pillow's own `resize(box=)` in float mode gives the same coefficients."""
    from PIL import Image

    x = np.random.default_rng(0).random((5, n_in)).astype(np.float32)
    mode = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}[resample]
    pil = Image.fromarray(x, mode="F").resize((n_out, 5), resample=mode, box=(box[0], 0, box[1], 5))
    start, w, count = box_taps(n_in, n_out, np.array([box[0]]), np.array([box[1]]), resample)
    ours = x.astype(np.float64) @ _dense(start, w, count, n_in)[0].T
    np.testing.assert_allclose(ours, np.asarray(pil, dtype=np.float64), atol=2e-6)


@pytest.mark.parametrize("spec_name", VIEW_SPECS)
@pytest.mark.parametrize("shape", [(37, 50), (13, 17), (70, 33)], ids=str)
def test_identity_view_is_the_processor_resize(spec_name, shape):
    """The identity box's matrices are the plain bridge's, equal in float32 (the dtype the ops use)."""
    spec = SPECS[spec_name]
    H, W = shape
    v = ReadAugment(views=2).draw(3, H, W)
    assert not v.jitter and (v.boxes == [0.0, H, 0.0, W]).all()
    wy, wx = view_matrices(spec, H, W, v)
    ry, rx = spec.resize_matrices(H, W)
    assert np.array_equal(wy.astype(np.float32), np.broadcast_to(ry.astype(np.float32), wy.shape))
    assert np.array_equal(wx.astype(np.float32), np.broadcast_to(rx.astype(np.float32), wx.shape))


@pytest.mark.parametrize("spec_name", ["janus", "shortest-crop", "exact"])
def test_tap_tables_equal_the_dense_matrices(spec_name):
    """Each view's Triton tables (forward and transposed) hold exactly its dense matrix's entries."""
    spec = SPECS[spec_name]
    H, W = 41, 29
    v = AUG.draw(2, H, W, step=4)
    wy, wx = view_matrices(spec, H, W, v)
    t = view_tap_tables(spec, H, W, v)
    for name, m, n_in in (("y", wy, H), ("x", wx, W)):
        V, n, _ = m.shape
        cnt = np.full(t[name + "s"].shape, t["K" + name.upper()])
        fwd = _dense(
            t[name + "s"].astype(np.int64),
            t["w" + name].astype(np.float64),
            np.minimum(cnt, n_in - t[name + "s"]),
            n_in,
        )
        np.testing.assert_array_equal(fwd, m.astype(np.float32).astype(np.float64))
        cnt = np.full(t["o" + name + "s"].shape, t["KT" + name.upper()])
        bwd = _dense(
            t["o" + name + "s"].astype(np.int64),
            t["w" + name + "T"].astype(np.float64),
            np.minimum(cnt, n - t["o" + name + "s"]),
            n,
        )
        np.testing.assert_array_equal(bwd, m.transpose(0, 2, 1).astype(np.float32).astype(np.float64))


def test_blur_is_the_resample_of_the_blurred_image():
    """blur folds a Gaussian (edges replicated) into each pass: the view's matrix is box @ G, G dense here."""
    spec = SPECS["exact"]
    H, W, sigma = 37, 50, 1.3
    v = ReadAugment(views=2, shift=2.0, scale=(0.9, 1.1), blur=sigma).draw(2, H, W, step=1)
    wy, wx = view_matrices(spec, H, W, v)
    by, bx = view_matrices(spec, H, W, v._replace(blur=0.0))
    for m, b, n in ((wy, by, H), (wx, bx, W)):
        R = int(np.ceil(3 * sigma))
        g = np.exp(-0.5 * (np.arange(-R, R + 1) / sigma) ** 2)
        G = np.zeros((n, n))
        for i in range(n):
            for k in range(2 * R + 1):
                G[i, min(max(i + k - R, 0), n - 1)] += g[k] / g.sum()
        np.testing.assert_allclose(m, b @ G, atol=1e-12)
        assert not np.allclose(m, b, atol=1e-3)


# ---------------------------------------------------------------------------------------- the draws
def test_draws_reproducible_and_per_global_sample():
    """Same (seed, step, global index) -> same view; a rank holding images 2..3 draws what a rank holding
    0..3 draws for them; another step or seed draws differently."""
    a = AUG.draw(4, 40, 56, step=9)
    b = AUG.draw(4, 40, 56, step=9)
    part = AUG.draw(2, 40, 56, step=9, sample_offset=2)
    assert np.array_equal(a.boxes, b.boxes) and np.array_equal(a.keys, b.keys)
    assert np.array_equal(part.boxes, a.boxes[6:]) and np.array_equal(part.keys, a.keys[6:])
    assert not np.array_equal(AUG.draw(4, 40, 56, step=10).boxes, a.boxes)
    assert not np.array_equal(dataclasses.replace(AUG, seed=7).draw(4, 40, 56, step=9).boxes, a.boxes)
    sizes = (a.boxes[:, 1] - a.boxes[:, 0]) / 40
    assert ((sizes >= 0.85) & (sizes <= 1.15)).all() and sizes.std() > 0
    centres = (a.boxes[:, 0] + a.boxes[:, 1]) / 2 - 20
    assert (np.abs(centres) <= 3.0 + 1e-12).all() and np.abs(centres).max() > 0.5


def test_renoise_schedules():
    """flow: alpha = 1 - t, std t; alphas_cumprod: sqrt(ac[t]), sqrt(1 - ac[t]); the affine map on [0, 1]."""
    v = ReadAugment(views=4, renoise=(0.2, 0.6)).draw(2, 8, 8)
    t = 1 - v.alpha
    assert ((t >= 0.2) & (t <= 0.6)).all() and np.allclose(v.renoise_std, t)
    aff = v.affine((-1.0, 1.0))
    assert np.allclose(aff[:, 1], t / 2) and np.allclose(aff[:, 2], t / 2)
    ac = torch.linspace(0.99, 0.01, 1000)
    v = ReadAugment(views=4, renoise=(100, 900), schedule=ac).draw(2, 8, 8)
    a2 = v.alpha**2
    assert ((a2 <= float(ac[100]) + 1e-6) & (a2 >= float(ac[900]) - 1e-6)).all()
    assert np.allclose(v.renoise_std**2, 1 - a2)


def test_hash_normal_statistics_and_determinism():
    keys = torch.tensor([[1, 2], [3, 4], [(1 << 32) - 1, 5]])
    e = hash_normal(keys, 100_000)
    assert torch.equal(e, hash_normal(keys, 100_000))
    assert e.mean(1).abs().max() < 0.02 and (e.std(1) - 1).abs().max() < 0.02
    assert e.abs().max() <= 6.0
    assert torch.corrcoef(e)[0, 1:].abs().max() < 0.02
    assert not torch.equal(hash_normal(keys[:1] + 1, 10), hash_normal(keys[:1], 10))


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(views=0), "views must be an int >= 1"),
        (dict(shift=-1.0), "shift must be"),
        (dict(scale=(1.2, 0.9)), "scale must be"),
        (dict(scale=(0.0, 1.0)), "scale must be"),
        (dict(noise=float("nan")), "noise must be"),
        (dict(blur=-0.5), "blur must be"),
        (dict(renoise=(0.5, 1.5)), "renoise must be"),
        (dict(renoise=(0.1, 0.2), schedule="ddpm"), "schedule must be"),
        (dict(schedule=[0.5, 1.5]), "schedule"),
        (dict(seed=-1), "seed must be"),
        (dict(shift_unit="px"), "shift_unit must be 'pixel' or 'patch'"),
        (dict(shift=float("inf"), shift_unit="patch"), "shift must be"),
    ],
)
def test_bad_read_config(kw, match):
    with pytest.raises(ValueError, match=match):
        ReadAugment(**kw)


def test_bad_views_argument():
    x = _rand_images(2, 20, 30)
    v = AUG.draw(3, 20, 30)
    with pytest.raises(ValueError, match="views were drawn for 3 images"):
        ops.bridge(x, SPECS["exact"], views=v)
    with pytest.raises(TypeError, match="views must be uno_engine.read.Views"):
        ops.bridge(x, SPECS["exact"], views=AUG)
    with pytest.raises(ValueError, match="read_step"):
        from uno_engine.read import draw_for_step

        draw_for_step(AUG, x, {"read_step": torch.tensor(3)}, 0)
    with pytest.raises(ValueError, match="ReadAugment.shift, ReadAugment.scale"):
        UNOConfig(read=AUG, view="latent")
    with pytest.raises(TypeError, match="UNOConfig.read must be"):
        UNOConfig(read=3)


# ------------------------------------------------------------------------------------ the op
def _check_views(backend, spec, x, views, clamp="clamp", what=""):
    """forward and gradient of ops.bridge(views=) against the float64 reference (2x rule / 1e-5)."""
    ref = reference.bridge(x, spec, clamp=clamp, views=views)
    x64 = x.detach().double().requires_grad_()
    ref64 = reference.bridge(x64, spec, clamp=clamp, views=views)
    g = torch.randn_like(ref)
    (g64,) = torch.autograd.grad(ref64, x64, g.double())
    out = ops.bridge(x, spec, clamp=clamp, backend=backend, views=views)
    (g_out,) = torch.autograd.grad(out, x, g)
    assert out.shape == ref.shape and out.dtype == x.dtype
    fwd_err = (ref.double() - ref64).abs().max().item()
    assert_close_verbose(out, ref64, atol=2 * fwd_err + 1e-5, rtol=0, what=f"{what} forward")
    scale = g64.abs().max().item()
    assert scale > 0
    assert_close_verbose(g_out, g64, atol=1e-5 * scale, rtol=0, what=f"{what} grad vs float64")
    return out, g_out


@pytest.mark.parametrize("read", [AUG, NOISY], ids=["aug", "noisy"])
@pytest.mark.parametrize("clamp", ["clamp", "straight_through"])
@pytest.mark.parametrize("shape", [(2, 37, 50), (1, 13, 17)], ids=str)
@pytest.mark.parametrize("spec_name", VIEW_SPECS)
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_views_match_reference(backend, spec_name, shape, clamp, read, device):
    B, H, W = shape
    x = _rand_images(B, H, W).to(device).requires_grad_()
    _check_views(backend, SPECS[spec_name], x, read.draw(B, H, W, step=3), clamp, spec_name)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_views_non_contiguous(backend, device):
    base = _rand_images(2, 41, 3 * 29).to(device)
    x = base.view(2, 3, 41, 3, 29)[..., 1, :].requires_grad_()
    assert not x.is_contiguous()
    v = NOISY.draw(2, 41, 29, step=1)
    out, g = _check_views(backend, SPECS["janus"], x, v, what="non-contiguous")
    xc = x.detach().contiguous().requires_grad_()
    out_c = ops.bridge(xc, SPECS["janus"], backend=backend, views=v)
    assert torch.equal(out, out_c)  # the strides change nothing


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_views_average_of_single_views(backend, device):
    """The K-view op is K one-view ops side by side: its rows are theirs and its gradient their sum."""
    spec = SPECS["janus"]
    x = _rand_images(2, 30, 44).to(device).requires_grad_()
    v = NOISY.draw(2, 30, 44, step=2)
    K = v.per_image
    out = ops.bridge(x, spec, backend=backend, views=v)
    g = torch.randn_like(out)
    (gx,) = torch.autograd.grad(out, x, g)
    total = torch.zeros_like(x)
    for k in range(K):
        vk = _one_view(v, k)
        ok = ops.bridge(x, spec, backend=backend, views=vk)
        assert_close_verbose(ok, out.view(2, K, *out.shape[1:])[:, k], atol=1e-6, rtol=0, what=f"view {k}")
        total += torch.autograd.grad(ok, x, g.view(2, K, *g.shape[1:])[:, k])[0]
    assert_close_verbose(gx, total, atol=1e-5 * total.abs().max().item(), rtol=0, what="grad sum")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_noise_is_reproducible_and_applied(backend, device):
    """Noise: the same views give the same values; a different key changes them; its std is as drawn."""
    spec = SPECS["exact"]
    x = torch.zeros(1, 3, 24, 40, device=device)  # mid-grey: no clip where the noise is small
    read = ReadAugment(views=2, noise=0.1)
    v = read.draw(1, 24, 40, step=5)
    a = ops.bridge(x, spec, backend=backend, views=v)
    assert torch.equal(a, ops.bridge(x, spec, backend=backend, views=v))
    clean = ops.bridge(x, spec, backend=backend)
    sd = ((a - clean) / 2).std().item()  # the output is (u - 0.5) / 0.5: u's noise is half the output's
    assert abs(sd - 0.1 / 2) < 0.005, sd  # noise 0.1 in input units (range 2) is 0.05 on u's [0, 1]
    v2 = read.draw(1, 24, 40, step=6)
    assert not torch.equal(a, ops.bridge(x, spec, backend=backend, views=v2))


# ------------------------------------------------------------------------------------- the step
def _setup(name="tiny-llava-clip"):
    from uno_engine.generators import CallableGenerator
    from uno_engine.testing.presets.critics import build_critic_model

    model, proc = build_critic_model(name)
    critic = Critic.from_hf(model, proc)
    g = PixelGenerator()
    gen = CallableGenerator(g, module=g)
    gg = torch.Generator().manual_seed(0)
    caps = torch.randint(3, critic.vocab_size - 1, (2, 6), generator=gg)
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[-1, 4:] = 0
    ref = torch.rand(2, 3, 40, 56, generator=gg) * 2 - 1
    return critic, g, gen, {"captions": caps, "caption_mask": mask, "reference_images": ref}


def _run(critic, g, gen, batch, read, backend="auto", loss_kw=None):
    g.pixels.grad = None
    torch.manual_seed(1)  # identical head init
    loss = UNOLoss(**(loss_kw or dict(caption=1.0, density=0.5, structure=0.5)))
    step = UNOStep(gen, critic, loss, UNOConfig(read=read, backend=backend))
    out = step(batch)
    out.loss.backward()
    return out.loss.detach(), g.pixels.grad.clone(), out.metrics


@pytest.mark.parametrize("critic_name", ["tiny-llava-clip", "tiny-qwen2-vl"])
def test_step_one_plain_view_is_bit_identical(critic_name):
    """read=ReadAugment(views=1) (no jitter) gives today's step: the same loss and gradient, bit for bit."""
    critic, g, gen, batch = _setup(critic_name)
    l0, g0, m0 = _run(critic, g, gen, batch, None)
    l1, g1, m1 = _run(critic, g, gen, batch, ReadAugment(views=1))
    assert torch.equal(l0, l1) and torch.equal(g0, g1)
    assert all(torch.equal(m0[k], m1[k]) for k in m0)


def test_step_views_average_the_losses(monkeypatch):
    """With K views every term is the mean over the views: the K-view step's loss and gradient equal the
    mean of K one-view steps that read those views one at a time (all captions the same length, so the
    token-mean caption CE is the view mean)."""
    import uno_engine.step as step_mod

    critic, g, gen, batch = _setup()
    batch["caption_mask"] = torch.ones_like(batch["caption_mask"])
    batch["negative_captions"] = torch.randint(
        3, critic.vocab_size - 1, (2, 2, 6), generator=torch.Generator().manual_seed(3)
    )
    kw = dict(caption=1.0, density=0.5, structure=0.5, negatives=0.3)
    read = ReadAugment(views=3, shift=2.0, scale=(0.9, 1.1), noise=0.1, seed=4)
    v = read.draw(2, 40, 56, step=0)
    K = 3
    monkeypatch.setattr(step_mod, "draw_for_step", lambda *a: v)
    lk, gk, mk = _run(critic, g, gen, batch, read, loss_kw=kw)
    losses, grads = [], []
    for k in range(K):
        vk = _one_view(v, k)
        monkeypatch.setattr(step_mod, "draw_for_step", lambda *a, vk=vk: vk)
        lo, go, _ = _run(critic, g, gen, batch, dataclasses.replace(read, views=1), loss_kw=kw)
        losses.append(lo)
        grads.append(go)
    torch.testing.assert_close(lk, torch.stack(losses).mean(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gk, torch.stack(grads).mean(0), rtol=1e-4, atol=1e-7)
    assert "negatives" in mk


def test_step_engine_equals_reference_with_views():
    critic, g, gen, batch = _setup("tiny-janus")
    batch["read_step"] = 11
    l_e, g_e, _ = _run(critic, g, gen, batch, NOISY)
    l_r, g_r, _ = _run(critic, g, gen, batch, NOISY, backend="reference")
    torch.testing.assert_close(l_e, l_r, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_e, g_r, rtol=1e-4, atol=1e-5 * g_r.abs().max().item())
    l_2, _, _ = _run(critic, g, gen, {**batch, "read_step": 12}, NOISY)
    assert not torch.equal(l_e, l_2)  # another step, other views


@pytest.mark.parametrize("use_triton", [False, True], ids=["torch", "triton"])
def test_views_opcheck(use_triton, device):
    """The registered views ops pass opcheck (schema, fake, autograd registration)."""
    from uno_engine.ops import _bridge_ops as O

    spec = SPECS["janus"]
    x = _rand_images(2, 21, 30).to(device).requires_grad_()
    v = NOISY.draw(2, 21, 30)
    plan = O.plan(spec, 21, 30, x.device, torch.float32, use_triton).id
    tabs, affine, keys = O.view_tensors(spec, 21, 30, v, (-1.0, 1.0), x.device, torch.float32, use_triton)
    args = (x, tabs, affine, keys, plan, v.per_image, -1.0, 1.0, use_triton, True, "auto")
    torch.library.opcheck(O.bridge_views_fwd.overload, args)
    out, mask = O.bridge_views_fwd.overload(*args)
    g = torch.randn_like(out)
    bargs = (g, x.detach(), mask, tabs, affine, keys, plan, v.per_image, -1.0, 1.0, use_triton, True, "auto")
    torch.library.opcheck(O.bridge_views_bwd.overload, bargs)
    (gx,) = torch.autograd.grad(out, x, g)
    x64 = x.detach().double().requires_grad_()
    (g64,) = torch.autograd.grad(reference.bridge(x64, spec, views=v), x64, g.double())
    assert_close_verbose(gx, g64, atol=1e-5 * g64.abs().max().item(), rtol=0, what="dispatcher grad")


# --------------------------------------------------------------------------------------- the default
def test_default_reading_is_one_jittered_view_in_patches():
    """UNOConfig() reads through ReadAugment.default() (one view, 0.75 patch, scale 0.85-1.15, noise 0.15)
    for the pixel view; None for the latent and representation views; read=None stays None."""
    d = ReadAugment.default()
    assert (d.views, d.shift, d.shift_unit, d.scale, d.noise) == (1, 0.75, "patch", (0.85, 1.15), 0.15)
    assert d.jitter and ReadAugment.default(views=4).views == 4
    assert UNOConfig().read == d and UNOConfig(view="pixel", read="auto").read == d
    assert UNOConfig(view="latent").read is None and UNOConfig(view="representation").read is None
    assert UNOConfig(read=None).read is None
    # an explicit pixel reading needs pixels: the latent view names the pixel-only fields, the representation
    # view takes no reading
    with pytest.raises(ValueError, match="cannot apply ReadAugment.shift, ReadAugment.scale, ReadAugment.noise"):
        UNOConfig(read=ReadAugment.default(), view="latent")
    with pytest.raises(ValueError, match="UNOConfig.read needs view='pixel' or 'latent'"):
        UNOConfig(read=ReadAugment.default(), view="representation")


@pytest.mark.parametrize(
    "critic_name,patch", [("tiny-llava-clip", (8.0, 8.0)), ("tiny-qwen2-vl", (4 * 40 / 24, 7.0))]
)
def test_patch_units_resolve_to_the_critics_patch_in_image_pixels(critic_name, patch):
    """One patch in image pixels = patch_size x image side / resized side, per axis, for 40 x 56 images:
    LLaVA-CLIP (patch 6, shortest edge 30 -> 30 x 42): 8 x 8; Qwen2-VL (the tower's patch 4, not 4 x merge
    2; smart resize -> 24 x 32): 6.67 x 7. The drawn centre offsets are a pixel-unit draw's, scaled per
    axis."""
    critic, *_ = _setup(critic_name)
    assert patch_in_image(critic.spec, critic.patch_size, 40, 56) == pytest.approx(patch, rel=1e-12)
    x = _rand_images(3, 40, 56)
    read = ReadAugment(views=2, shift=0.75, shift_unit="patch", scale=(0.9, 1.1), seed=5)
    v = draw_for_step(read, x, {"read_step": 4}, 0, critic)
    unit = dataclasses.replace(read, shift=1.0, shift_unit="pixel").draw(3, 40, 56, step=4)
    off = np.stack([v.boxes[:, :2].mean(1) - 20, v.boxes[:, 2:].mean(1) - 28], axis=1)
    off_unit = np.stack([unit.boxes[:, :2].mean(1) - 20, unit.boxes[:, 2:].mean(1) - 28], axis=1)
    np.testing.assert_allclose(off, off_unit * 0.75 * np.array(patch), rtol=1e-9, atol=1e-9)
    assert np.abs(off_unit).max() > 0.3  # not vacuous: the draws moved the boxes
    np.testing.assert_allclose(v.boxes[:, 1] - v.boxes[:, 0], unit.boxes[:, 1] - unit.boxes[:, 0], rtol=1e-12)


def test_default_step_reads_a_reproducible_jittered_view(monkeypatch):
    """The default step draws one view per image off the identity box, from (seed, step, sample): the same
    step of a fresh UNOStep draws the same views, the next step others; the loss is not the plain read's."""
    import uno_engine.step as step_mod

    critic, g, gen, batch = _setup()
    drawn = []
    def spy(*a):
        drawn.append(draw_for_step(*a))
        return drawn[-1]

    monkeypatch.setattr(step_mod, "draw_for_step", spy)
    l0, _, _ = _run(critic, g, gen, batch, "auto")
    l0_again, _, _ = _run(critic, g, gen, batch, "auto")
    l_plain, _, _ = _run(critic, g, gen, batch, None)
    assert len(drawn) == 2  # read=None draws nothing
    v = drawn[0]
    assert v.per_image == 1 and v.boxes.shape == (2, 4) and v.noise == 0.15
    identity = np.array([0.0, 40.0, 0.0, 56.0])
    assert (np.abs(v.boxes - identity).max(axis=1) > 1e-3).all()  # every image's box is jittered
    np.testing.assert_array_equal(v.boxes, drawn[1].boxes)
    np.testing.assert_array_equal(v.keys, drawn[1].keys)
    want = ReadAugment.default().draw(2, 40, 56, step=0, patch=(8.0, 8.0))  # tiny-llava-clip: 8-px patch
    np.testing.assert_array_equal(v.boxes, want.boxes)
    assert torch.equal(l0, l0_again) and not torch.equal(l0, l_plain)
    step = UNOStep(gen, critic, UNOLoss(caption=1.0))
    step(batch), step(batch)
    assert not np.array_equal(drawn[-1].boxes, drawn[-2].boxes)  # the next step draws other views


def test_bad_default_and_patch_arguments():
    x = _rand_images(2, 40, 56)
    read = ReadAugment.default()
    with pytest.raises(ValueError, match="UNOConfig.read must be 'auto', None or a ReadAugment"):
        UNOConfig(read="on")
    with pytest.raises(ValueError, match="needs `patch`"):
        read.draw(2, 40, 56)
    for bad in [(0.0, 8.0), (8.0,), (float("nan"), 1.0)]:
        with pytest.raises(ValueError, match="`patch` must be"):
            read.draw(2, 40, 56, patch=bad)
    with pytest.raises(ValueError, match="patch_size"):
        draw_for_step(read, x, {}, 0, torch.nn.Linear(2, 2))  # a reader without a patch size
    with pytest.raises(ValueError, match="patch_size must be an int >= 1"):
        patch_in_image(SPECS["exact"], 0, 40, 56)
