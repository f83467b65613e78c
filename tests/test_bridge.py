"""Bridge: BridgeSpec, reference.bridge, ops.bridge (torch and Triton paths, two-pass and fused kernels).

Parity is measured against the HF processors' PIL path on a uint8 "photograph" made here (1/f-spectrum
texture,
smooth gradients, hard-edged shapes, a blown-out highlight); the bridge gets the same image as float.
"""

import dataclasses

import numpy as np
import pytest
import torch

from uno_engine import ops, reference
from uno_engine.bridge_spec import BridgeSpec, pil_resize_matrix


def _transformers():
    import transformers

    return transformers


def _processor(family: str, **kw):
    """The PIL ("slow") processor of a family; transformers < 5.x-with-backends names it without 'Pil'."""
    T = _transformers()
    names = {
        "siglip": "SiglipImageProcessor",
        "clip": "CLIPImageProcessor",
        "janus": "JanusImageProcessor",
        "qwen2_vl": "Qwen2VLImageProcessor",
        "llava": "LlavaImageProcessor",
    }
    cls = getattr(T, names[family] + "Pil", None) or getattr(T, names[family])
    return cls(**kw)


def photo(H: int, W: int, seed: int) -> np.ndarray:
    """A photograph-like uint8 (H, W, 3) image."""
    rng = np.random.default_rng(seed)
    fy, fx = np.fft.fftfreq(H)[:, None], np.fft.fftfreq(W)[None, :]
    f = np.sqrt(fy**2 + fx**2)
    f[0, 0] = 1.0

    def pink(alpha):
        n = np.real(np.fft.ifft2(np.fft.fft2(rng.standard_normal((H, W))) / f**alpha))
        return n / n.std()

    base = pink(1.1)
    img = np.stack([0.7 * base + 0.5 * pink(1.2) for _ in range(3)], -1)
    img = 0.5 + 0.12 * img
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float64)
    img += 0.25 * (yy / H - 0.5)[..., None] * rng.uniform(-1, 1, 3) + 0.2 * (xx / W - 0.5)[
        ..., None
    ] * rng.uniform(-1, 1, 3)
    for _ in range(6):
        cy, cx, r = rng.uniform(0, H), rng.uniform(0, W), rng.uniform(0.05, 0.3) * min(H, W)
        m = (
            ((yy - cy) ** 2 + (xx - cx) ** 2 < r * r)
            if rng.random() < 0.5
            else ((abs(yy - cy) < r) & (abs(xx - cx) < 0.6 * r))
        )
        img[m] = 0.3 * img[m] + 0.7 * rng.uniform(0, 1, 3)
    img[: H // 8 + 1, : W // 5 + 1] *= 1.8  # a blown-out highlight (saturates at 255)
    return np.clip(np.round(img * 255), 0, 255).astype(np.uint8)


def to_input(img: np.ndarray, input_range=(-1.0, 1.0)) -> torch.Tensor:
    lo, hi = input_range
    x = torch.from_numpy(img).permute(2, 0, 1)[None].to(torch.float64) / 255.0
    return (x * (hi - lo) + lo).float()


def assert_close_verbose(got, exp, atol, rtol, what=""):
    got, exp = got.double(), exp.double()
    err = (got - exp).abs()
    tol = atol + rtol * exp.abs()
    if not bool((err <= tol).all()):
        idx = torch.nonzero(err > tol)[:5].tolist()
        worst = torch.unravel_index(torch.argmax(err - tol), err.shape)
        worst = tuple(int(i) for i in worst)
        raise AssertionError(
            f"{what}: {int((err > tol).sum())} mismatches; worst at {worst}: got {got[worst]:.8g}, "
            f"expected {exp[worst]:.8g}; first bad indices {idx}"
        )


# ------------------------------------------------------------------------------------------- weights
@pytest.mark.parametrize("resample", ["bicubic", "bilinear"])
@pytest.mark.parametrize("n_in,n_out", [(37, 224), (300, 64), (64, 30), (33, 33), (1007, 37), (5, 1)])
def test_weights_match_pillow_float_mode(n_in, n_out, resample):
    from PIL import Image

    rng = np.random.default_rng(0)
    x = rng.random((7, n_in)).astype(np.float32)
    mode = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}[resample]
    pil = np.array(Image.fromarray(x, mode="F").resize((n_out, 7), resample=mode), dtype=np.float64)
    ours = x.astype(np.float64) @ pil_resize_matrix(n_in, n_out, resample).T
    np.testing.assert_allclose(ours, pil, atol=2e-6)


@pytest.mark.parametrize(
    "H,W,h,w",
    [
        (300, 211, 224, 224),
        (211, 300, 224, 224),
        (106, 105, 43, 78),
        (64, 81, 25, 56),
        (97, 131, 224, 224),
        (114, 24, 80, 23),
    ],
)
def test_pass_order_matches_installed_pillow(H, W, h, w):
    """Pillow's uint8 path rounds and clips after each pass; the order `spec.vertical_first` picks must be the
    one the installed Pillow runs (emulated here with our weights: exact up to a rounding tie)."""
    from PIL import Image

    im = photo(H, W, seed=H + W)
    pil = np.array(Image.fromarray(im).resize((w, h), Image.BICUBIC)).astype(np.float64)
    spec = BridgeSpec(resize="exact", size=(h, w))
    wy, wx = pil_resize_matrix(H, h), pil_resize_matrix(W, w)
    rnd = lambda a: np.clip(np.floor(a + 0.5), 0, 255)  # noqa: E731
    x = im.astype(np.float64)
    if spec.vertical_first(H, W):
        emu = rnd(np.einsum("ywc,ow->yoc", rnd(np.einsum("hwc,yh->ywc", x, wy)), wx))
    else:
        emu = rnd(np.einsum("hoc,yh->yoc", rnd(np.einsum("hwc,ow->hoc", x, wx)), wy))
    assert np.abs(emu - pil).max() <= 1.0


# --------------------------------------------------------------------------------- from_image_processor
def test_from_image_processor_fields():
    s = BridgeSpec.from_image_processor(_processor("siglip"))
    assert (s.resize, s.size, s.resample, s.layout, s.image_mean) == (
        "exact",
        (224, 224),
        "bicubic",
        "nchw",
        (0.5,) * 3,
    )
    c = BridgeSpec.from_image_processor(_processor("clip"))
    assert (c.resize, c.shortest_edge, c.crop_size) == ("shortest_edge", 224, (224, 224))
    assert c.image_mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    j = BridgeSpec.from_image_processor(_processor("janus"))
    assert (j.resize, j.size, j.pad_to_square, j.background_color, j.min_size) == (
        "longest_edge",
        (384, 384),
        True,
        (122, 116, 104),
        14,
    )
    q = BridgeSpec.from_image_processor(_processor("qwen2_vl"))
    assert (q.resize, q.layout, q.patch_size, q.merge_size, q.temporal_patch_size) == (
        "smart",
        "qwen2_vl",
        14,
        2,
        2,
    )
    assert (q.min_pixels, q.max_pixels) == (56 * 56, 28 * 28 * 1280)
    b = BridgeSpec.from_image_processor(_processor("siglip", resample=2))
    assert b.resample == "bilinear"
    assert j.output_size(300, 200) == (384, 384) and j.resized_size(300, 200) == (384, 256)
    assert c.output_size(100, 57) == (224, 224) and c.resized_size(100, 57) == (392, 224)


def test_from_image_processor_rejects():
    with pytest.raises(TypeError, match="not an HF image processor"):
        BridgeSpec.from_image_processor(object())
    with pytest.raises(ValueError, match="do_pad"):
        BridgeSpec.from_image_processor(_processor("llava", do_pad=True))
    with pytest.raises(ValueError, match="resample"):
        BridgeSpec.from_image_processor(_processor("siglip", resample=0))


# ------------------------------------------------------------------------------------ parity with HF
PARITY_CASES = [
    # family, processor kwargs, input sizes (H, W): up- and downscaling, non-square
    ("siglip", {}, [(97, 131), (300, 211), (640, 480)]),
    ("siglip", {"size": {"height": 96, "width": 160}, "resample": 2}, [(150, 97), (61, 333)]),
    ("clip", {}, [(97, 131), (300, 211), (512, 700)]),
    ("llava", {}, [(181, 120)]),
    ("janus", {}, [(97, 131), (500, 333), (1024, 768)]),
    (
        "qwen2_vl",
        {"min_pixels": 28 * 28 * 4, "max_pixels": 28 * 28 * 64},
        [(97, 131), (300, 211), (640, 480), (50, 30)],
    ),
]


def _hf(proc, img, **kw):
    out = proc(images=img, return_tensors="pt", **kw)
    return out["pixel_values"].double(), out.get("image_grid_thw")


@pytest.mark.parametrize(
    "family,kw,sizes", PARITY_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(PARITY_CASES)]
)
def test_parity_with_hf_processor(family, kw, sizes):
    """Before normalization: mean |d| <= 0.5/255, max |d| <= 6/255; after it, that bound / std."""
    proc = _processor(family, **kw)
    spec = BridgeSpec.from_image_processor(proc)
    raw = dataclasses.replace(spec, do_normalize=False)
    for H, W in sizes:
        img = photo(H, W, seed=H * 1000 + W)
        exp, grid = _hf(proc, img, do_normalize=False)
        x = to_input(img)
        got = reference.bridge(x, raw).double()
        assert got.shape == exp.shape, (family, H, W, got.shape, exp.shape)
        d = (got - exp).abs() * 255
        print(
            f"{family} {kw} {(H, W)} -> {tuple(got.shape)}: "
            f"mean |d| {d.mean():.3f}/255, max |d| {d.max():.3f}/255"
        )
        assert d.mean() <= 0.5 and d.max() <= 6.0, (family, H, W, float(d.mean()), float(d.max()))
        if grid is not None:
            torch.testing.assert_close(spec.image_grid_thw(1, H, W), grid.long())
        exp_n, _ = _hf(proc, img)
        got_n = reference.bridge(x, spec).double()
        std_min = min(spec.image_std)
        assert (got_n - exp_n).abs().max() <= 6.0 / 255 / std_min + 1e-6


@pytest.mark.parametrize(
    "family,kw,size",
    [
        ("siglip", {"size": {"height": 40, "width": 56}}, (77, 45)),
        ("clip", {"size": {"shortest_edge": 36}, "crop_size": {"height": 32, "width": 32}}, (50, 81)),
        ("janus", {"size": {"height": 40, "width": 40}, "min_size": 4}, (29, 70)),
        ("qwen2_vl", {"min_pixels": 28 * 28 * 2, "max_pixels": 28 * 28 * 4}, (41, 90)),
    ],
)
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_op_parity_with_hf_processor(family, kw, size, backend, device):
    proc = _processor(family, **kw)
    spec = BridgeSpec.from_image_processor(proc)
    img = photo(*size, seed=7)
    exp, _ = _hf(proc, img)
    x = to_input(img, (0.0, 1.0)).to(device)
    got = ops.bridge(x, spec, input_range=(0.0, 1.0), backend=backend).double().cpu()
    std = torch.tensor(spec.image_std, dtype=torch.float64)
    if spec.layout == "nchw":
        d = ((got - exp) * std.view(1, 3, 1, 1)).abs() * 255
    else:
        T, p = spec.temporal_patch_size, spec.patch_size
        d = ((got - exp).view(got.shape[0], 3, -1) * std.view(1, 3, 1)).abs() * 255
        assert got.shape[1] == 3 * T * p * p
    assert d.mean() <= 0.5 and d.max() <= 6.0, (float(d.mean()), float(d.max()))


# --------------------------------------------------------------------------------- op vs reference
SPECS = {
    "exact": BridgeSpec(resize="exact", size=(24, 37)),
    "exact-bilinear": BridgeSpec(resize="exact", size=(33, 17), resample="bilinear"),
    "shortest-crop": BridgeSpec(
        resize="shortest_edge",
        shortest_edge=21,
        crop_size=(19, 21),
        image_mean=(0.48, 0.45, 0.4),
        image_std=(0.26, 0.26, 0.27),
    ),
    "crop-pads": BridgeSpec(resize="exact", size=(17, 40), crop_size=(24, 24)),
    "janus": BridgeSpec(
        resize="longest_edge",
        size=(36, 36),
        min_size=4,
        pad_to_square=True,
        background_color=(122, 116, 104),
        image_mean=(0.48, 0.45, 0.4),
        image_std=(0.26, 0.26, 0.27),
    ),
    "qwen2_vl": BridgeSpec(
        resize="smart",
        min_pixels=8 * 8 * 4,
        max_pixels=8 * 8 * 30,
        patch_size=4,
        merge_size=2,
        temporal_patch_size=2,
        layout="qwen2_vl",
    ),
    "no-clip": BridgeSpec(resize="exact", size=(40, 23), clip_each_pass=False, do_normalize=False),
    "vertical-first": BridgeSpec(resize="exact", size=(30, 41), pass_order="vertical_first"),
    "qwen-vertical-first": BridgeSpec(
        resize="smart",
        min_pixels=8 * 8 * 4,
        max_pixels=8 * 8 * 30,
        patch_size=4,
        merge_size=2,
        temporal_patch_size=2,
        layout="qwen2_vl",
        pass_order="vertical_first",
    ),
    "janus-vertical-first": BridgeSpec(
        resize="longest_edge",
        size=(36, 36),
        min_size=4,
        pad_to_square=True,
        background_color=(122, 116, 104),
        pass_order="vertical_first",
    ),
}
SHAPES = [(2, 37, 50), (1, 13, 17), (1, 70, 33)]


def _rand_images(B, H, W, dtype=torch.float32, lo=-1.25, hi=1.25):
    return (torch.rand(B, 3, H, W, dtype=torch.float64) * (hi - lo) + lo).to(dtype)


@pytest.mark.parametrize("clamp", ["clamp", "straight_through"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("spec_name", list(SPECS))
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_op_matches_reference(backend, spec_name, shape, clamp, device):
    spec = SPECS[spec_name]
    B, H, W = shape
    x = _rand_images(B, H, W).to(device).requires_grad_()
    ref = reference.bridge(x, spec, clamp=clamp)
    g = torch.randn_like(ref)
    (g_ref,) = torch.autograd.grad(ref, x, g)
    # float64 ground truth: the fp32 op may differ from it by ~2x what the fp32 reference does
    x64 = x.detach().double().requires_grad_()
    ref64 = reference.bridge(x64, spec, clamp=clamp)
    (g64,) = torch.autograd.grad(ref64, x64, g.double())
    out = ops.bridge(x, spec, clamp=clamp, backend=backend)
    (g_out,) = torch.autograd.grad(out, x, g)
    assert out.shape == ref.shape and out.dtype == x.dtype
    fwd_err = (ref.double() - ref64).abs().max().item()
    assert_close_verbose(out, ref64, atol=2 * fwd_err + 1e-5, rtol=0, what="forward")
    # gradient: equal to autograd through the reference within 1e-5 relative
    scale = g_ref.abs().max().item()
    assert scale > 0
    assert_close_verbose(g_out, g_ref, atol=1e-5 * scale, rtol=0, what="grad vs reference")
    assert_close_verbose(g_out, g64, atol=1e-5 * scale, rtol=0, what="grad vs float64")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_non_contiguous_and_fp16(backend, device):
    spec = SPECS["janus"]
    base = _rand_images(1, 41, 3 * 29).to(device)
    x = base.view(1, 3, 41, 3, 29)[..., 1, :]  # strided view: (1, 3, 41, 29), stride_w = 1, stride_h = 87
    assert not x.is_contiguous()
    # the truth: the float64 reference on a contiguous copy of the same pixels (its own memory, not x's view)
    x64 = x.detach().contiguous().double().requires_grad_()
    assert x64.is_contiguous() and x64.data_ptr() != base.data_ptr()
    ref = reference.bridge(x64, spec)
    xg = x.detach().requires_grad_()  # the strided view itself is the leaf: its gradient has x's strides
    out = ops.bridge(xg, spec, backend=backend)
    assert_close_verbose(out, ref, atol=1e-5, rtol=0, what="non-contiguous")
    g = torch.randn(out.shape, dtype=torch.float64, device=out.device)
    (g_out,) = torch.autograd.grad(out, xg, g.float())
    (g_ref,) = torch.autograd.grad(ref, x64, g)
    assert g_out.shape == x.shape
    assert_close_verbose(g_out, g_ref, atol=1e-5 * g_ref.abs().max().item(), rtol=0, what="non-contiguous grad")
    x16 = x.half().requires_grad_()
    out16 = ops.bridge(x16, spec, backend=backend)
    assert out16.dtype == torch.float16
    ref16 = reference.bridge(x16.double(), spec)
    err_torch16 = (ref16.half().double() - ref16).abs().max().item()
    assert_close_verbose(out16, ref16, atol=2 * err_torch16 + 1e-3, rtol=0, what="fp16")
    g = torch.randn(out16.shape, dtype=torch.float64)
    (g16,) = torch.autograd.grad(out16, x16, g.half().to(device))
    x64 = x16.detach().double().requires_grad_()
    (g64,) = torch.autograd.grad(reference.bridge(x64, spec), x64, g.to(device))
    assert g16.dtype == torch.float16
    # fp32 accumulation, one fp16 rounding of the result: the rounding of the fp16 grad, plus the fp16 grad_out
    scale = g64.abs().max().item()
    assert_close_verbose(g16, g64, atol=2e-3 * scale, rtol=1e-3, what="fp16 grad")


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("clamp", ["clamp", "straight_through"])
def test_clamp_policy(clamp, backend, device):
    spec = SPECS["exact"]
    x = _rand_images(1, 20, 30, lo=-3.0, hi=3.0).to(device).requires_grad_()
    # the forward clamps out-of-range values under both policies
    torch.testing.assert_close(reference.bridge(x, spec, clamp=clamp), reference.bridge(x.clamp(-1, 1), spec))
    out = ops.bridge(x, spec, clamp=clamp, backend=backend)
    g = torch.randn_like(out)
    (gx,) = torch.autograd.grad(out, x, g)
    x64 = x.detach().double().requires_grad_()
    (g64,) = torch.autograd.grad(reference.bridge(x64, spec, clamp=clamp), x64, g.double())
    assert_close_verbose(gx, g64, atol=1e-5 * g64.abs().max().item(), rtol=0, what=clamp)
    far = x.detach().abs() > 1.0
    if clamp == "clamp":
        assert (gx[far] == 0).all()
    else:  # straight-through: the gradient at a clamped pixel is the one it would have unclamped
        (g_lin,) = torch.autograd.grad(reference.bridge(x64, spec, clamp="straight_through"), x64, g.double())
        assert (g_lin[far] != 0).float().mean() > 0.9


@pytest.mark.parametrize("spec_name", ["janus", "vertical-first"])
def test_clamp_flags_per_plane(spec_name, device):
    """The Triton backward reads the images only in planes where the forward saw a clamped pixel (per-plane
    flags): planes in range and out of range in one batch, and values exactly at the bounds (gradient
    passes there, as torch.clamp)."""
    spec = SPECS[spec_name]
    x = _rand_images(2, 37, 50, lo=-0.9, hi=0.9)
    x[1, 2, 5:9, 7:30] = 1.7  # one plane with clamped pixels
    # at the bound: not clamped (isolated pixels: a whole row at 1.0 would put the first pass exactly on its
    # clip bound, where the mask depends on the summation order)
    x[0, 1, 3, ::4] = 1.0
    x[0, 0, ::4, 4] = -1.0
    x = x.to(device).requires_grad_()
    out = ops.bridge(x, spec, backend="triton")
    ref = reference.bridge(x, spec)
    g = torch.randn_like(ref)
    (g_out,) = torch.autograd.grad(out, x, g)
    (g_ref,) = torch.autograd.grad(ref, x, g)
    assert (g_out[1, 2, 5:9, 7:30] == 0).all()
    assert (g_out[0, 1, 3, :] != 0).any()
    scale = g_ref.abs().max().item()
    assert_close_verbose(g_out, g_ref, atol=1e-5 * scale, rtol=0, what="grad with per-plane flags")


def test_block_settings_reach_the_launcher(device, monkeypatch):
    """UNO_BRIDGE_BLOCKS (read by the op, `uno_engine._env`) reaches the two-pass launcher as `blocks`; the
    launcher checks what it gets; the default depends on the device."""
    from uno_engine.kernels import bridge_two_pass as tp

    seen = []
    real = tp.block_settings
    monkeypatch.setattr(
        tp, "block_settings", lambda ax, dev, blocks=None: seen.append(blocks) or real(ax, dev, blocks)
    )
    spec = SPECS["exact"]
    x = _rand_images(1, 20, 30).to(device)
    monkeypatch.setenv("UNO_BRIDGE_BLOCKS", "8,16,4/4,32,2")
    out = ops.bridge(x, spec, backend="triton")
    assert seen == [((8, 16, 4), (4, 32, 2))] * 2
    assert_close_verbose(out, reference.bridge(x.double(), spec), atol=1e-5, rtol=0, what="blocks 8x16/4x32")
    assert real(0, torch.device("cuda"), None) == tp.DEFAULT_BLOCKS
    assert real(1, torch.device("cpu"), None) == tp.INTERPRETER_BLOCKS
    monkeypatch.setenv("UNO_BRIDGE_BLOCKS", "8,128")
    with pytest.raises(ValueError, match="UNO_BRIDGE_BLOCKS"):
        ops.bridge(x, spec, backend="triton")
    with pytest.raises(ValueError, match="blocks: BLOCK_R and BLOCK_C must be powers of two"):
        tp.check_blocks(((6, 16, 4), (4, 32, 2)))
    with pytest.raises(ValueError, match="blocks: num_warps"):
        tp.check_blocks(((8, 16, 3), (4, 32, 2)))


def test_backward_deterministic_triton(device):
    spec = SPECS["janus"]
    x = _rand_images(2, 45, 67).to(device).requires_grad_()
    out = ops.bridge(x, spec, backend="triton")
    g = torch.randn_like(out)
    (g1,) = torch.autograd.grad(out, x, g, retain_graph=True)
    (g2,) = torch.autograd.grad(out, x, g)
    assert torch.equal(g1, g2)


def test_gradcheck_float64():
    spec = dataclasses.replace(SPECS["janus"], size=(6, 6))
    x = _rand_images(1, 5, 9, torch.float64, lo=-0.8, hi=0.8).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: reference.bridge(t, spec), (x,))
    assert torch.autograd.gradcheck(lambda t: ops.bridge(t, spec, backend="torch"), (x,))
    q = dataclasses.replace(SPECS["qwen2_vl"], min_pixels=8 * 8, max_pixels=8 * 8 * 2)
    assert torch.autograd.gradcheck(lambda t: ops.bridge(t, q, backend="torch"), (x,))
    assert torch.autograd.gradcheck(lambda t: reference.bridge(t, q, clamp="straight_through"), (x,))


# ------------------------------------------------------------------------------------- patch embed
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_patch_embed(backend, device):
    spec = SPECS["janus"]
    x = _rand_images(2, 40, 29).to(device).requires_grad_()
    w = torch.randn(8, 3, 6, 6, device=device) * 0.1
    b = torch.randn(8, device=device)
    ref = reference.bridge(x, spec, patch_embed=(w, b))
    assert ref.shape == (2, 36, 8)
    out = ops.bridge(x, spec, patch_embed=(w, b), backend=backend)
    tol = 1e-5 if x.device.type == "cpu" else 2e-3  # cuDNN convolutions may run in TF32
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)
    g = torch.randn_like(ref)
    (g_ref,) = torch.autograd.grad(ref, x, g)
    (g_out,) = torch.autograd.grad(out, x, g)
    torch.testing.assert_close(g_out, g_ref, atol=tol * g_ref.abs().max().item(), rtol=0)
    # a trainable weight gets its gradient (the normalized image is kept in that case): as the reference's
    w2 = w.clone().requires_grad_()
    (gw,) = torch.autograd.grad(ops.bridge(x, spec, patch_embed=(w2, None), backend=backend), w2, g)
    w3 = w.clone().requires_grad_()
    (gw_ref,) = torch.autograd.grad(reference.bridge(x, spec, patch_embed=(w3, None)), w3, g)
    torch.testing.assert_close(gw, gw_ref, atol=tol * gw_ref.abs().max().item(), rtol=0)


# ------------------------------------------------------------------------------------- bad inputs
_IMG = (1, 3, 20, 20)
BAD_INPUTS = [
    # (id, images, kwargs, error class, message that names the argument)
    ("rank-3", torch.rand(3, 20, 20), {}, ValueError, r"images must have shape \(B, 3, H, W\)"),
    ("rank-5", torch.rand(1, 1, 3, 20, 20), {}, ValueError, r"images must have shape \(B, 3, H, W\)"),
    ("4-channels", torch.rand(1, 4, 20, 20), {}, ValueError, "3 RGB channels"),
    ("uint8", torch.randint(0, 255, _IMG, dtype=torch.uint8), {}, TypeError, "images must be float"),
    ("int64", torch.ones(_IMG, dtype=torch.int64), {}, TypeError, "images must be float"),
    ("complex", torch.ones(_IMG, dtype=torch.complex64), {}, TypeError, "images must be float"),
    ("list", [[0.0]], {}, TypeError, "images must be a torch.Tensor"),
    ("empty-batch", torch.rand(0, 3, 20, 20), {}, ValueError, "images must be non-empty"),
    ("empty-width", torch.rand(1, 3, 20, 0), {}, ValueError, "images must be non-empty"),
    (
        "spec-dict",
        torch.rand(_IMG),
        {"spec": {"size": 224}},
        TypeError,
        "spec must be a uno_engine.BridgeSpec",
    ),
    ("range-reversed", torch.rand(_IMG), {"input_range": (1.0, -1.0)}, ValueError, "input_range"),
    ("range-empty", torch.rand(_IMG), {"input_range": (1.0, 1.0)}, ValueError, "input_range"),
    ("range-inf", torch.rand(_IMG), {"input_range": (-1.0, float("inf"))}, ValueError, "input_range"),
    ("range-nan", torch.rand(_IMG), {"input_range": (float("nan"), 1.0)}, ValueError, "input_range"),
    ("range-3", torch.rand(_IMG), {"input_range": (0.0, 0.5, 1.0)}, ValueError, "input_range"),
    ("range-none", torch.rand(_IMG), {"input_range": None}, ValueError, "input_range"),
    ("clamp", torch.rand(_IMG), {"clamp": "wrap"}, ValueError, "clamp must be one of"),
    ("kernel", torch.rand(_IMG), {"kernel": "fast"}, ValueError, "kernel must be one of"),
    ("kernel-env-name", torch.rand(_IMG), {"kernel": "fused_loads"}, ValueError, "kernel must be one of"),
    ("backend", torch.rand(_IMG), {"backend": "cuda"}, ValueError, "backend must be one of"),
    (
        "patch-embed-layout",
        torch.rand(_IMG),
        {"spec": "qwen2_vl", "patch_embed": (torch.randn(4, 3, 4, 4), None)},
        ValueError,
        "patch_embed needs a spec with layout 'nchw'",
    ),
    (
        "patch-embed-shape",
        torch.rand(_IMG),
        {"patch_embed": (torch.randn(4, 4, 4, 4), None)},
        ValueError,
        r"patch_embed weight must be \(D, 3, p, p\)",
    ),
    (
        "patch-embed-device",
        torch.rand(_IMG),
        {"patch_embed": (torch.randn(4, 3, 4, 4, device="meta"), None)},
        ValueError,
        "patch_embed must be on the images' device",
    ),
]


@pytest.mark.parametrize("backend", ["torch", "triton", "auto"])
@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_inputs(case, backend):
    """Every bad argument: the same error class and message, naming the argument, on every backend (checked
    before the backend is chosen)."""
    _, images, kw, exc, msg = case
    kw = dict(kw)
    spec = kw.pop("spec", SPECS["exact"])
    spec = SPECS[spec] if isinstance(spec, str) else spec
    kw.setdefault("backend", backend)
    with pytest.raises(exc, match=msg):
        ops.bridge(images, spec, **kw)


def test_bad_spec_layouts():
    with pytest.raises(ValueError, match="layout='qwen2_vl' needs resize='smart'"):
        BridgeSpec(
            resize="exact",
            size=(28, 28),
            patch_size=14,
            merge_size=2,
            temporal_patch_size=2,
            layout="qwen2_vl",
        )
    with pytest.raises(ValueError, match="needs patch_size"):
        BridgeSpec(resize="smart", min_pixels=4, max_pixels=8, layout="qwen2_vl")
    with pytest.raises(ValueError, match="layout must be one of"):
        BridgeSpec(resize="exact", size=(28, 28), layout="nhwc")


def test_triton_backend_names_what_it_cannot_take(monkeypatch):
    """backend='triton' with inputs it cannot take: RuntimeError with every reason; 'auto' runs torch."""
    x = _rand_images(1, 20, 20, torch.float64)
    with pytest.raises(
        RuntimeError, match="backend='triton' cannot run: .*float64 images run on the torch path"
    ):
        ops.bridge(x, SPECS["exact"], backend="triton")
    assert_close_verbose(ops.bridge(x, SPECS["exact"]), reference.bridge(x, SPECS["exact"]), 1e-12, 0)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match=r"inputs are on \['cpu'\]"):
        ops.bridge(x.float(), SPECS["exact"], backend="triton")


@pytest.mark.parametrize("spec_name", ["janus", "qwen2_vl", "vertical-first"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_non_finite_pixels(spec_name, backend, device):
    """A NaN pixel is never turned into a finite value: every output whose taps read it is NaN (Triton: those;
    torch: its whole plane, through the dense matmuls), other image planes stay exact, and its own gradient is
    zero; +-Inf clamps to the bound of input_range like any out-of-range value. The same on both backends."""
    spec = SPECS[spec_name]
    B, H, W = 2, 37, 50
    x = _rand_images(B, H, W, lo=-0.9, hi=0.9)
    x[0, 1, 11, 17] = float("nan")
    x[1, 0, 3, 40] = float("inf")
    x[1, 2, 30, 2] = float("-inf")
    x = x.to(device).requires_grad_()
    out = ops.bridge(x, spec, backend=backend)
    # which outputs read pixel (11, 17) of plane (0, 1): perturb it in the reference
    x_clean = x.detach().clone()
    x_clean[0, 1, 11, 17] = 0.0
    x_clean[1, 0, 3, 40], x_clean[1, 2, 30, 2] = 1.5, -1.5  # +-Inf: out of range like these
    ref = reference.bridge(x_clean.double(), spec)
    x_poke = x_clean.clone()
    x_poke[0, 1, 11, 17] = 0.5
    reads = reference.bridge(x_poke.double(), spec) != ref
    assert reads.any()
    nan = torch.isnan(out)
    assert nan[reads].all(), "an output that reads the NaN pixel came out finite"
    # the NaN stays in its image plane: the outputs a NaN plane (0, 1) reaches in the dense reference
    x_plane = x_clean.clone()
    x_plane[0, 1] = float("nan")
    in_plane = torch.isnan(reference.bridge(x_plane.double(), spec))
    assert not nan[~in_plane].any()
    assert_close_verbose(out[~in_plane], ref[~in_plane], atol=1e-5, rtol=0, what="outside the NaN plane")
    g = torch.randn(out.shape, dtype=out.dtype, device=device)
    (gx,) = torch.autograd.grad(out, x, g)
    assert gx[0, 1, 11, 17] == 0 and gx[1, 0, 3, 40] == 0 and gx[1, 2, 30, 2] == 0
    # the gradient outside the NaN image is exact (per-image independence)
    x64 = x_clean.double().requires_grad_()
    (g64,) = torch.autograd.grad(reference.bridge(x64, spec), x64, g.double())
    assert_close_verbose(gx[1], g64[1], atol=1e-5 * g64.abs().max().item(), rtol=0, what="grad, image 1")


# ------------------------------------------------------------------------------------- a real op
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_compiles_without_graph_break(backend, device):
    """fullgraph compile (the registered ops as graph nodes, their registered autograd): the gradient of the
    float64 reference."""
    spec = SPECS["qwen2_vl"]
    x = _rand_images(1, 23, 37).to(device).requires_grad_()
    ops.bridge(x, spec, backend=backend)  # builds the cached per-size constants outside the compiled region
    fn = torch.compile(
        lambda t: ops.bridge(t, spec, backend=backend).square().sum(), backend="aot_eager", fullgraph=True
    )
    fn(x).backward()
    x64 = x.detach().double().requires_grad_()
    reference.bridge(x64, spec).square().sum().backward()
    assert_close_verbose(x.grad, x64.grad, atol=1e-5 * x64.grad.abs().max().item(), rtol=0, what="compiled")


@pytest.mark.parametrize("use_triton", [False, True], ids=["torch", "triton"])
def test_opcheck(use_triton, device):
    """The registered ops pass opcheck (schema, fake, autograd registration), and called through the
    dispatcher (torch's custom-op autograd, not the eager fast path) they give the float64 reference's values
    and gradient."""
    from uno_engine.ops._bridge_ops import bridge_bwd as _bridge_bwd, bridge_fwd as _bridge_fwd, plan as _plan

    spec = SPECS["janus"]
    x = _rand_images(1, 21, 30).to(device).requires_grad_()
    plan = _plan(spec, 21, 30, x.device, torch.float32, use_triton).id
    args = (x, plan, -1.0, 1.0, use_triton, True, "auto")
    torch.library.opcheck(_bridge_fwd.overload, args)
    out, mask = _bridge_fwd.overload(*args)
    g = torch.randn_like(out)
    torch.library.opcheck(
        _bridge_bwd.overload, (g, x.detach(), mask, plan, -1.0, 1.0, use_triton, True, "auto")
    )
    x64 = x.detach().double().requires_grad_()
    ref64 = reference.bridge(x64, spec)
    fwd_err = (reference.bridge(x.detach(), spec).double() - ref64).abs().max().item()
    assert_close_verbose(out, ref64, atol=2 * fwd_err + 1e-5, rtol=0, what="dispatcher forward")
    (gx,) = torch.autograd.grad(out, x, g)
    (g64,) = torch.autograd.grad(ref64, x64, g.double())
    assert_close_verbose(gx, g64, atol=1e-5 * g64.abs().max().item(), rtol=0, what="dispatcher grad")


@pytest.mark.gpu
@pytest.mark.parametrize("spec_name", ["janus", "qwen2_vl", "shortest-crop"])
def test_bf16_cuda(spec_name):
    spec = SPECS[spec_name]
    x = _rand_images(2, 77, 101).cuda().bfloat16().requires_grad_()
    out = ops.bridge(x, spec, backend="triton")
    ref = reference.bridge(x.double(), spec)
    err_bf16 = (ref.bfloat16().double() - ref).abs().max().item()
    assert_close_verbose(out, ref, atol=2 * err_bf16 + 1e-3, rtol=0, what="bf16")
    g = torch.randn_like(out)
    (g_out,) = torch.autograd.grad(out, x, g)
    (g_ref,) = torch.autograd.grad(reference.bridge(x.float(), spec), x, g.float())
    assert (g_out.float() - g_ref.float()).abs().max() <= 2e-2 * g_ref.float().abs().max()


# ------------------------------------------------------------------ kernel choice: two-pass and fused kernels
def test_kernel_choice_explained(monkeypatch):
    from uno_engine.ops.bridge import explain_kernel_choice

    for name in ("UNO_BRIDGE_FORWARD", "UNO_BRIDGE_BACKWARD"):
        monkeypatch.delenv(name, raising=False)
    auto = ops.bridge.explain_kernel_choice()
    assert (auto["forward"], auto["backward"]) == ("two_pass", "two_pass")
    assert "not run on a GPU" in auto["why"]
    fused = explain_kernel_choice("fused")
    assert (fused["forward"], fused["backward"]) == ("fused", "fused") and fused["why"] == "kernel='fused'"
    monkeypatch.setenv("UNO_BRIDGE_BACKWARD", "fused")
    over = explain_kernel_choice("two_pass")
    assert (over["forward"], over["backward"]) == ("two_pass", "fused")
    assert "UNO_BRIDGE_BACKWARD=fused overrides the backward" in over["why"]
    with pytest.raises(ValueError, match="kernel must be one of"):
        explain_kernel_choice("fused_loads")


FUSED_SHAPES = [*SHAPES, (1, 96, 80)]
FUSED_MODES = [  # (kernel=, UNO_BRIDGE_FORWARD, UNO_BRIDGE_BACKWARD): per-direction choices via the overrides
    ("fused", None, None),
    ("two_pass", "fused_loads", None),
    ("two_pass", None, "fused"),
]
# every spec with two shapes and two modes, rotating (each shape 5 times, each mode 6-7 times): a sixth of the
# full product, for CI time (each case runs both kernels in both directions in the interpreter)
FUSED_CASES = [
    (name, FUSED_SHAPES[(i + k) % len(FUSED_SHAPES)], FUSED_MODES[(i + k) % len(FUSED_MODES)])
    for i, name in enumerate(SPECS)
    for k in (0, 2)
]


@pytest.mark.parametrize(
    "spec_name,shape,mode",
    FUSED_CASES,
    ids=[f"{n}-{s}-{'-'.join(str(v) for v in m)}" for n, s, m in FUSED_CASES],
)
def test_fused_kernels_equal_two_pass(spec_name, shape, mode, device, monkeypatch):
    """The fused kernels run the same taps in the same order as the two passes: the same forward, bit for bit,
    side outputs (clip masks, clamp flags) that give the same backward, and the same backward, bit for bit;
    on tiles small enough that every case spans several programs with halo rows and columns, with clamped
    pixels."""
    from uno_engine.kernels import bridge as kb

    spec = SPECS[spec_name]
    B, H, W = shape
    x = _rand_images(B, H, W).to(device).requires_grad_()
    monkeypatch.setenv("UNO_BRIDGE_FUSED_TILE", "16,32,4")
    monkeypatch.setenv("UNO_BRIDGE_FUSED_BWD_TILE", "8,16,4")
    for name in ("UNO_BRIDGE_FORWARD", "UNO_BRIDGE_BACKWARD"):
        monkeypatch.delenv(name, raising=False)
    real = kb.fused_plan
    kernel, env_fwd, env_bwd = mode
    results = {}
    for run in ("two_pass", "fused"):
        if run == "fused":
            for name, v in (("UNO_BRIDGE_FORWARD", env_fwd), ("UNO_BRIDGE_BACKWARD", env_bwd)):
                if v is not None:
                    monkeypatch.setenv(name, v)
        plans = []

        def spy(*a, plans=plans, **k):
            plans.append((k.get("backward", False), real(*a, **k)))
            return plans[-1][1]

        monkeypatch.setattr(kb, "fused_plan", spy)
        k = "two_pass" if run == "two_pass" else kernel
        out = ops.bridge(x, spec, backend="triton", kernel=k)
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(device)
        (gx,) = torch.autograd.grad(out, x, g)
        with torch.no_grad():
            out_ng = ops.bridge(x, spec, backend="triton", kernel=k)
        monkeypatch.setattr(kb, "fused_plan", real)
        fwd_fused = run == "fused" and (kernel == "fused" or env_fwd is not None)
        bwd_fused = run == "fused" and (kernel == "fused" or env_bwd is not None)
        # each fused kernel asked for ran (a plan, not None), the forward's twice (with and without masks)
        expected = [False, False] * fwd_fused + [True] * bwd_fused  # (is backward)
        assert sorted(bw for bw, _ in plans) == sorted(expected)
        assert all(plan is not None for _, plan in plans)
        results[run] = (out, gx, out_ng)
    for a, b_ in zip(results["two_pass"], results["fused"], strict=True):
        assert torch.equal(a, b_)
    ref64 = reference.bridge(x.detach().double(), spec)
    fwd_err = (reference.bridge(x.detach(), spec).double() - ref64).abs().max().item()
    assert_close_verbose(results["fused"][0], ref64, atol=2 * fwd_err + 1e-5, rtol=0, what="fused forward")


def test_fused_kernels_straight_through_grad_non_contiguous_fp16(device):
    spec = SPECS["janus"]
    base = _rand_images(2, 41, 3 * 29).to(device)
    x = base.view(2, 3, 41, 3, 29)[..., 1, :].requires_grad_()  # strided, no copy
    assert not x.is_contiguous()
    for clamp in ("straight_through", "clamp"):
        out = ops.bridge(x, spec, clamp=clamp, backend="triton", kernel="fused")
        ref = reference.bridge(x, spec, clamp=clamp)
        g = torch.randn_like(ref)
        (g_out,) = torch.autograd.grad(out, x, g)
        (g_ref,) = torch.autograd.grad(ref, x, g)
        assert_close_verbose(out, reference.bridge(x.detach().double(), spec), atol=1e-5, rtol=0, what="fwd")
        assert_close_verbose(g_out, g_ref, atol=1e-5 * g_ref.abs().max().item(), rtol=0, what=clamp)
    x16 = x.detach().half().requires_grad_()
    out16 = ops.bridge(x16, spec, backend="triton", kernel="fused")
    (g16,) = torch.autograd.grad(out16, x16, torch.ones_like(out16))
    out16b = ops.bridge(x16, spec, backend="triton", kernel="two_pass")
    assert torch.equal(out16, out16b)
    assert torch.equal(g16, torch.autograd.grad(out16b, x16, torch.ones_like(out16b))[0])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fused_non_finite_pixels_match_two_pass(backend, device):
    """NaN / Inf pixels: the fused kernels give the two passes' values bit for bit (NaN where they have NaN);
    the torch backend ignores kernel=."""
    spec = SPECS["janus"]
    x = _rand_images(1, 37, 50)
    x[0, 1, 11, 17] = float("nan")
    x[0, 2, 3, 40] = float("inf")
    x = x.to(device)
    a = ops.bridge(x, spec, backend=backend, kernel="two_pass")
    b = ops.bridge(x, spec, backend=backend, kernel="fused")
    assert torch.isnan(a).any()
    assert torch.equal(torch.isnan(a), torch.isnan(b))
    assert torch.equal(torch.nan_to_num(a), torch.nan_to_num(b))


def test_fused_kernels_fall_back_and_bad_settings(device, monkeypatch):
    from uno_engine.kernels import bridge as kb

    # Janus-like 1024 -> 384 rows: K = 11 taps, starts 8/3 apart
    spec = BridgeSpec(resize="exact", size=(384, 384))
    tab = kb.tap_tables(*(np.asarray(m) for m in spec.resize_matrices(1024, 1024)))
    assert tab["KY"] == 11 and tab["SY16"] == 51 and tab["SY32"] == 94  # (n - 1) * 8/3 + 11, rounded
    assert kb.fused_tiles(tab, "Y", 384, 64, 8) == (16, 64)  # 32 rows would need a 128-row band
    assert kb.fused_tiles(tab, "Y", 384, 16, 8) == (8, 32)  # widened to hold 8 rows
    assert kb.fused_tiles(tab, "TY", 1024, 32, 8) == (64, 32)  # backward: 64 image rows read 28 canvas rows
    assert kb.fused_tiles(tab, "Y", 5, 64, 8) == (8, 32)  # never longer than the axis rounded up
    # a 100x downscale needs a band past MAX_FUSED_BAND (256 x 256 source pixels): the two passes run instead
    spec = BridgeSpec(resize="exact", size=(1, 1))
    x = _rand_images(1, 130, 130).to(device)  # K = 130 taps: a 256 x 256 band
    tab = kb.tap_tables(*(np.asarray(m) for m in spec.resize_matrices(130, 130)))
    assert kb.fused_plan(tab, (1, 1)) is None
    out = ops.bridge(x, spec, backend="triton", kernel="fused")
    assert_close_verbose(out, reference.bridge(x.double(), spec), 1e-5, 0)
    # bad tiles: named by the environment variable (the op's override) or by the launcher's argument
    spec = BridgeSpec(resize="exact", size=(8, 8))
    x = _rand_images(1, 20, 20).to(device).requires_grad_()
    for name in ("UNO_BRIDGE_FUSED_TILE", "UNO_BRIDGE_FUSED_BWD_TILE"):
        bwd = name == "UNO_BRIDGE_FUSED_BWD_TILE"
        if bwd:  # the two-pass forward (cheaper in the interpreter), the fused backward
            monkeypatch.setenv("UNO_BRIDGE_BACKWARD", "fused")
        for value, msg in (("48,128,4", "powers of two"), ("64,128", "'KH,KW,W'"), ("64,128,3", "num_warps")):
            monkeypatch.setenv(name, value)
            with pytest.raises(ValueError, match=f"{name}={value!r}.*{msg}"):
                ops.bridge(x, spec, backend="triton", kernel="two_pass" if bwd else "fused").sum().backward()
        monkeypatch.delenv(name)
    monkeypatch.delenv("UNO_BRIDGE_BACKWARD")
    with pytest.raises(ValueError, match="fused_tile: KH and KW must be powers of two"):
        kb.check_tile((48, 128, 4))
    with pytest.raises(ValueError, match="fused_tile: num_warps"):
        kb.check_tile((64, 128, 3))
    for name in ("UNO_BRIDGE_FORWARD", "UNO_BRIDGE_BACKWARD"):
        monkeypatch.setenv(name, "fast")
        with pytest.raises(ValueError, match=name):
            ops.bridge(x, spec, backend="triton").sum().backward()
        monkeypatch.delenv(name)
    with pytest.raises(ValueError, match="bridge_forward: kernel must be one of"):
        kb.bridge_forward(
            x.detach(), tab, torch.zeros(3, 3), (2, 2), (0, 2, 0, 2), (-1.0, 1.0),
            clip_each_pass=True, store_mask=False, qwen=None, out_dtype=torch.float32, kernel="auto",
        )  # fmt: skip


def test_config_bridge_kernel_reaches_the_op(monkeypatch):
    """UNOConfig.bridge_kernel -> UNOStep -> Critic.prepare(bridge_kernel=) -> ops.bridge(kernel=)."""
    import uno_engine.ops
    from uno_engine import Critic, UNOConfig, UNOLoss, UNOStep
    from uno_engine.generators import CallableGenerator
    from uno_engine.testing.presets.critics import build_critic_model

    model, processor = build_critic_model("tiny-llava-siglip")
    critic = Critic.from_hf(model, processor)
    seen = []
    real = uno_engine.ops.bridge
    monkeypatch.setattr(
        uno_engine.ops, "bridge", lambda *a, **k: seen.append(k.get("kernel")) or real(*a, **k)
    )
    images = _rand_images(1, 40, 56)
    critic.prepare(images, bridge_kernel="fused")
    assert seen == ["fused"]
    pixels = torch.nn.Parameter(images.clone())
    step = UNOStep(
        CallableGenerator(lambda batch: pixels, module=None),
        critic,
        UNOLoss(caption=1.0),
        UNOConfig(bridge_kernel="two_pass", check_inputs=False, read=None),
    )
    step({"captions": torch.randint(3, critic.vocab_size - 1, (1, 4))})
    assert seen[1:] == ["two_pass"]
    with pytest.raises(ValueError, match="bridge_kernel"):
        UNOConfig(bridge_kernel="fused_loads")
