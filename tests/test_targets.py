"""Density / structure targets (torch, C++ uno_engine._C, numpy fallback) against a float64 oracle written
from the definition, and caption packing."""

import warnings

import numpy as np
import pytest
import torch

from uno_engine import _ext, targets

needs_ext = pytest.mark.skipif(not _ext.BUILT, reason=f"uno_engine._C not built ({_ext.ERROR})")
KINDS = ["density", "structure"]


def oracle(img_u8: np.ndarray, grid, kind: str) -> np.ndarray:
    """float64, straight from the definition in uno_engine.targets (explicit cell loops)."""
    gh, gw = (grid, grid) if isinstance(grid, int) else grid
    f = img_u8.astype(np.float64) / 255.0
    y = 0.299 * f[..., 0] + 0.587 * f[..., 1] + 0.114 * f[..., 2]
    H, W = y.shape
    yp = np.pad(y, 1, mode="edge")
    if kind == "density":
        v = (yp[1:-1, 2:] - yp[1:-1, 1:-1]) ** 2 + (yp[2:, 1:-1] - yp[1:-1, 1:-1]) ** 2
    else:
        k = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], dtype=np.float64) / 8
        gx = sum(k[i, j] * yp[i : i + H, j : j + W] for i in range(3) for j in range(3))
        gy = sum(k.T[i, j] * yp[i : i + H, j : j + W] for i in range(3) for j in range(3))
        v = np.sqrt(gx**2 + gy**2)
    out = np.empty(gh * gw)
    for a in range(gh):
        for b in range(gw):
            out[a * gw + b] = v[a * H // gh : (a + 1) * H // gh, b * W // gw : (b + 1) * W // gw].mean()
    return out


def to_float_images(img_u8: np.ndarray, device="cpu") -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(img_u8))
    t = t[None] if t.dim() == 3 else t
    return (t.permute(0, 3, 1, 2).float() / 127.5 - 1.0).to(device)


def textured(h, w, seed=0, b=None):
    rng = np.random.default_rng(seed)
    shape = (h, w, 3) if b is None else (b, h, w, 3)
    smooth = np.cumsum(rng.integers(-3, 4, shape), axis=-2) % 256
    noise = rng.integers(0, 256, shape)
    mix = np.where(rng.random(shape[:-1] + (1,)) < 0.3, noise, smooth)
    return mix.astype(np.uint8)


def assert_close_1e5(actual, expected, name):
    actual = np.asarray(actual, dtype=np.float64)
    err = np.abs(actual - expected)
    if err.max() > 1e-5:
        i = int(err.argmax())
        raise AssertionError(
            f"{name}: max err {err.max():.3g} at cell {i}: got {actual.flat[i]}, want {expected.flat[i]}"
        )


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "hw, grid",
    [((37, 53), (5, 7)), ((64, 64), 8), ((33, 20), (33, 20)), ((9, 1007), 1), ((100, 77), (27, 3))],
)
def test_all_versions_match_oracle(kind, hw, grid, device):
    img = textured(*hw, seed=hw[0])
    want = oracle(img, grid, kind)
    fn = getattr(targets, f"{kind}_targets")
    got_torch = fn(to_float_images(img, device), grid)
    assert got_torch.shape == (1, want.size) and got_torch.dtype == torch.float32
    assert_close_1e5(got_torch[0].cpu().numpy(), want, "torch")
    assert_close_1e5(fn(img, grid, impl="python"), want, "numpy")
    if _ext.BUILT:
        got_cpp = fn(img, grid, impl="cpp", num_threads=2)
        assert got_cpp.shape == (want.size,) and got_cpp.dtype == np.float32
        assert_close_1e5(got_cpp, want, "cpp")


@needs_ext
@pytest.mark.parametrize("kind", KINDS)
def test_cpp_equals_torch_1024(kind):
    """The target size: a 1024x1024 image on the SigLIP-384 grid (27 x 27), one thread, within 1e-5."""
    img = textured(1024, 1024, seed=3)
    fn = getattr(targets, f"{kind}_targets")
    cpp = fn(img, 27, impl="cpp", num_threads=1)
    ref = fn(to_float_images(img), 27)[0].numpy()
    assert_close_1e5(cpp, ref.astype(np.float64), "cpp vs torch")
    assert_close_1e5(fn(img, 27, impl="python"), ref.astype(np.float64), "numpy vs torch")


@needs_ext
@pytest.mark.parametrize("kind", KINDS)
def test_cpp_batched_strided_and_threads(kind):
    imgs = textured(45, 31, seed=5, b=3)
    fn = getattr(targets, f"{kind}_targets")
    batched = fn(imgs, (4, 3), impl="cpp", num_threads=2)
    assert batched.shape == (3, 12)
    for i in range(3):
        np.testing.assert_array_equal(batched[i], fn(imgs[i], (4, 3), impl="cpp", num_threads=1))
    strided = imgs[0, ::-1, ::2]  # negative and non-unit strides: copied to contiguous first
    assert_close_1e5(
        fn(strided, (4, 3), impl="cpp"), oracle(np.ascontiguousarray(strided), (4, 3), kind), "strided"
    )
    torch_batched = fn(to_float_images(imgs), (4, 3)).numpy()
    assert_close_1e5(batched, torch_batched.astype(np.float64), "batched vs torch")


def test_known_values_step_edge():
    """Left half black, right half white: the forward difference is 1 on the last black column; the Sobel/8
    magnitude is 1/2 on the two columns around the edge."""
    img = np.zeros((8, 16, 3), dtype=np.uint8)
    img[:, 8:] = 255
    for impl in ["python"] + (["cpp"] if _ext.BUILT else []):
        np.testing.assert_allclose(targets.density_targets(img, (1, 2), impl=impl), [1 / 8, 0.0], atol=1e-6)
        np.testing.assert_allclose(
            targets.structure_targets(img, (1, 2), impl=impl), [0.5 / 8, 0.5 / 8], atol=1e-6
        )
    t = to_float_images(img)
    torch.testing.assert_close(targets.density_targets(t, (1, 2)), torch.tensor([[1 / 8, 0.0]]))
    torch.testing.assert_close(targets.structure_targets(t, (1, 2)), torch.tensor([[0.5 / 8, 0.5 / 8]]))


@pytest.mark.parametrize("impl", ["python", pytest.param("cpp", marks=needs_ext)])
@pytest.mark.parametrize("kind", KINDS)
def test_bad_inputs_uint8(impl, kind):
    fn = getattr(targets, f"{kind}_targets")
    with pytest.raises(TypeError, match="image must be a uint8"):
        fn(np.zeros((8, 8, 3), dtype=np.float32), 2, impl=impl)
    with pytest.raises(ValueError, match=r"grid \(9, 2\) is larger than the image"):
        fn(np.zeros((8, 8, 3), dtype=np.uint8), (9, 2), impl=impl)
    with pytest.raises(ValueError, match="HWC"):
        fn(np.zeros((3, 8, 8), dtype=np.uint8), 2, impl=impl)
    with pytest.raises(TypeError, match="grid"):
        fn(np.zeros((8, 8, 3), dtype=np.uint8), "2", impl=impl)


@needs_ext
def test_extension_checks_directly():
    C = _ext.require("test")
    with pytest.raises(TypeError, match="uint8"):
        C.density_targets(np.zeros((8, 8, 3), dtype=np.float64), 2)
    with pytest.raises(ValueError, match="larger than the image"):
        C.structure_targets(np.zeros((4, 8, 3), dtype=np.uint8), (5, 1))
    with pytest.raises(ValueError, match="prompt_lens"):
        C.pack_captions([[1, 2]], [3])


def test_bad_inputs_torch():
    with pytest.raises(TypeError, match="images must be a floating tensor"):
        targets.density_targets(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), 2)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        targets.structure_targets(torch.zeros(1, 8, 8, 3), 2)
    with pytest.raises(ValueError, match="larger than the image"):
        targets.structure_targets(torch.zeros(1, 3, 8, 8), (8, 9))


def test_torch_version_keeps_device_and_dtype_and_no_grad():
    x = (torch.rand(2, 3, 20, 24, dtype=torch.float64) * 2 - 1).requires_grad_()
    out = targets.density_targets(x, (4, 6))
    assert out.dtype == torch.float32 and out.shape == (2, 24) and not out.requires_grad
    half = targets.structure_targets(x.detach().to(torch.bfloat16), 4)
    assert half.dtype == torch.float32


def test_fallback_warns_once(monkeypatch):
    monkeypatch.setattr(_ext, "_C", None)
    monkeypatch.setattr(_ext, "ERROR", ImportError("not built (test)"))
    monkeypatch.setattr(_ext, "_warned", False)
    img = textured(12, 12)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        a = targets.density_targets(img, 3)
        b = targets.structure_targets(img, 3)
        targets.pack_captions([[1, 2, 3]])
    fallback = [w for w in rec if issubclass(w.category, _ext.ExtensionFallbackWarning)]
    assert len(fallback) == 1 and "not built (test)" in str(fallback[0].message)
    assert_close_1e5(a, oracle(img, 3, "density"), "fallback density")
    assert_close_1e5(b, oracle(img, 3, "structure"), "fallback structure")
    with pytest.raises(ImportError, match="pip install"):
        targets.density_targets(img, 3, impl="cpp")
    assert _ext.status()["built"] in (True, False)


# ------------------------------------------------------------------------------------------ caption packing
@pytest.mark.parametrize("impl", ["python", pytest.param("cpp", marks=needs_ext)])
def test_pack_captions(impl):
    ids, am, labels = targets.pack_captions(
        [[5, 6, 7, 8], [9], []], prompt_lens=[2, 0, 0], pad_id=1, ignore_index=-100, impl=impl
    )
    assert ids.dtype == am.dtype == labels.dtype == torch.int64 and ids.shape == (3, 4)
    assert ids.tolist() == [[5, 6, 7, 8], [9, 1, 1, 1], [1, 1, 1, 1]]
    assert am.tolist() == [[1, 1, 1, 1], [1, 0, 0, 0], [0, 0, 0, 0]]
    assert labels.tolist() == [[-100, -100, 7, 8], [9, -100, -100, -100], [-100] * 4]
    ids, am, labels = targets.pack_captions([[5, 6, 7, 8], np.array([3, 4])], max_len=3, impl=impl)
    assert ids.tolist() == [[5, 6, 7], [3, 4, 0]] and labels.tolist() == [[5, 6, 7], [3, 4, -100]]
    ids, _, _ = targets.pack_captions([], impl=impl)
    assert ids.shape == (0, 0)


@needs_ext
def test_pack_captions_cpp_equals_python_random():
    rng = np.random.default_rng(0)
    lists = [rng.integers(0, 50000, rng.integers(0, 40)).tolist() for _ in range(33)]
    pls = [int(rng.integers(0, len(t) + 1)) for t in lists]
    for max_len in (None, 17):
        a = targets.pack_captions(lists, prompt_lens=pls, max_len=max_len, impl="cpp")
        b = targets.pack_captions(lists, prompt_lens=pls, max_len=max_len, impl="python")
        for x, y in zip(a, b, strict=False):
            assert torch.equal(x, y)


@pytest.mark.parametrize("impl", ["python", pytest.param("cpp", marks=needs_ext)])
def test_pack_captions_bad_inputs(impl):
    with pytest.raises(ValueError, match="prompt_lens has 1 entries"):
        targets.pack_captions([[1], [2]], prompt_lens=[0], impl=impl)
    with pytest.raises(ValueError, match=r"prompt_lens\[0\] = 3"):
        targets.pack_captions([[1, 2]], prompt_lens=[3], impl=impl)
    with pytest.raises(ValueError, match="max_len"):
        targets.pack_captions([[1, 2]], max_len=-1, impl=impl)
    with pytest.raises(TypeError, match="token_lists"):
        targets.pack_captions([None], impl=impl)
