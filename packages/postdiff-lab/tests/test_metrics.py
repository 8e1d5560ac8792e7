"""Metrics on known cases, and the LPIPS regression against the reference example."""

import math
from pathlib import Path

import numpy as np
import pytest

from postdiff_lab.metrics import frechet_distance, kernel_inception_distance, lpips_distance, psnr, ssim, tensor_psnr

EXAMPLE = Path(__file__).resolve().parents[3].parent / "shared" / "data" / "lpips-example"


def test_identical_images():
    rng = np.random.default_rng(0)
    img = rng.random((32, 32, 3))
    assert psnr(img, img) == math.inf
    assert ssim(img, img) == pytest.approx(1.0)
    assert lpips_distance(img[None], img[None])[0] == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_tensor_psnr_fails_every_gate_on_an_output_with_nan_or_infinity(bad):
    """A graph that returns NaN passed the export gate once (NaN < gate is False): a non-finite output where the
    reference is finite is -inf dB; the same non-finite value in both is no error."""
    ref = np.linspace(-1.0, 1.0, 64).reshape(8, 8)
    out = ref.copy()
    out[3, 4] = bad
    assert tensor_psnr(out, ref) == -math.inf and not tensor_psnr(out, ref) >= 35.0
    assert tensor_psnr(ref, out) == -math.inf  # and the other way round
    assert tensor_psnr(out + 1e-3, out) == pytest.approx(tensor_psnr(ref + 1e-3, ref), abs=0.1)  # the rest compared


def test_psnr_known_value_and_monotone():
    a = np.zeros((8, 8))
    assert psnr(a + 0.1, a) == pytest.approx(20.0)  # MSE 0.01 -> 20 dB
    rng = np.random.default_rng(1)
    img = rng.random((32, 32))
    small, large = img + 0.01 * rng.standard_normal(img.shape), img + 0.2 * rng.standard_normal(img.shape)
    assert psnr(small, img) > psnr(large, img)
    assert ssim(small, img) > ssim(large, img)
    assert lpips_distance(large[None], img[None], resize_to=64)[0] > lpips_distance(small[None], img[None], resize_to=64)[0]


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="one shape"):
        psnr(np.zeros((4, 4)), np.zeros((4, 5)))


@pytest.mark.skipif(not EXAMPLE.is_dir(), reason="../shared/data/lpips-example is absent (it ships beside the repository, not in it)")
def test_lpips_reproduces_the_reference_example():
    from PIL import Image

    def load(name):
        return np.asarray(Image.open(EXAMPLE / name).convert("RGB"), dtype=np.float32) / 255.0

    ref, p0, p1 = load("ex_ref.png"), load("ex_p0.png"), load("ex_p1.png")
    d = lpips_distance(np.stack([p0, p1]), np.stack([ref, ref]))
    assert round(float(d[0]), 3) == 0.722
    assert round(float(d[1]), 3) == 0.138


def test_frechet_and_kid():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((2000, 8))
    b = rng.standard_normal((2000, 8))
    shifted = b + 1.0
    assert frechet_distance(a, b) < 0.1
    assert frechet_distance(a, shifted) == pytest.approx(8.0, rel=0.1)  # |mu1 - mu2|^2 = 8
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    kid_same, _ = kernel_inception_distance(a, b, subsets=5, subset_size=500)
    kid_far, _ = kernel_inception_distance(a, shifted, subsets=5, subset_size=500)
    assert abs(kid_same) < 0.05 < kid_far


def test_distribution_metrics_at_every_n_from_one():
    import math
    import warnings

    from postdiff.errors import PostDiffWarning
    from postdiff_lab.metrics import frechet_distance, kernel_inception_distance
    from postdiff_lab.metrics.distribution import too_few_note, warn_if_few

    rng = np.random.default_rng(0)
    ref = rng.normal(size=(300, 8))
    for n in (1, 2, 3, 10):
        x = rng.normal(size=(n, 8))
        fid, (kid, kid_std) = frechet_distance(x, ref), kernel_inception_distance(x, ref, subset_size=n)
        if n == 1:  # not a number, and a note that says why
            assert math.isnan(fid) and math.isnan(kid) and math.isnan(kid_std) and "at least 2 samples" in too_few_note(n)
        else:
            assert math.isfinite(fid) and math.isfinite(kid) and too_few_note(n) is None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warn_if_few(5, 128)
        warn_if_few(5, 128)  # once per process, not once per plan
        warn_if_few(128, 128)
        warn_if_few(1, 128)  # null, said in the notes: no warning on top
    assert [str(w.message)[:30] for w in caught if w.category is PostDiffWarning] == ["FID/KID on 5 samples of 128-di"]


def test_frechet_distance_with_fewer_samples_than_dimensions_is_the_sqrtm_formula():
    """The low-rank route (N < D, as Inception FID at N = 200) equals the textbook formula with scipy's sqrtm."""
    from scipy import linalg

    from postdiff_lab.metrics import frechet_distance

    rng = np.random.default_rng(3)
    mix = rng.normal(size=(64, 64))
    for n1, n2 in ((2, 5), (20, 300), (40, 12)):
        a, b = rng.normal(size=(n1, 64)) @ mix, rng.normal(size=(n2, 64)) @ mix + 0.3
        s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
        textbook = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(s1 + s2) - 2 * np.trace(linalg.sqrtm(s1 @ s2).real)
        assert frechet_distance(a, b) == pytest.approx(textbook, rel=1e-6)
