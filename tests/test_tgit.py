"""The paper's TGIT set (cc3m-aug): prompts, pixel operations, pair counts, pools and sampling arithmetic."""
import re

import numpy as np
import pytest
from PIL import Image, ImageEnhance

from fuselip_med.data.transforms.tgit import (
    CROP_LOCATIONS,
    PAPER,
    ColorizeGrayscale,
    ColorJitterV2,
    Flip,
    RandomCrop,
    Rotate,
    TGITFamily,
    paper_transforms,
)

JITTER = re.compile(
    r"^(increase|decrease) brightness by factor (\d\.\d) and (increase|decrease) contrast by factor (\d\.\d)"
    r" and (increase|decrease) saturation by factor (\d\.\d)$"
)


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(1)
    return Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8), "RGB")


def arr(image):
    return np.asarray(image)


def by_prompt(pairs):
    return {(p.prompt, p.params.get("inverse", False)): p for p in pairs}


def test_flip_pairs_mirror_the_array_in_both_directions(image):
    pairs = Flip().variants(image, np.random.default_rng(0))
    assert len(pairs) == 4
    assert sorted(p.prompt for p in pairs) == ["horizontal flip"] * 2 + ["vertical flip"] * 2
    pairs = by_prompt(pairs)
    a = arr(image)
    assert np.array_equal(arr(pairs["horizontal flip", False].target_image), a[:, ::-1])
    assert np.array_equal(arr(pairs["vertical flip", False].target_image), a[::-1])
    assert np.array_equal(arr(pairs["horizontal flip", False].source_image), a)
    # the inverse direction: flipped -> original, same prompt
    assert np.array_equal(arr(pairs["horizontal flip", True].source_image), a[:, ::-1])
    assert np.array_equal(arr(pairs["horizontal flip", True].target_image), a)
    assert np.array_equal(arr(pairs["vertical flip", True].source_image), a[::-1])


def test_flip_eval_pools(image):
    unique = Flip().eval_pool(image, np.random.default_rng(0))
    assert sorted(p.prompt for p in unique) == ["horizontal and vertical flip", "horizontal flip", "vertical flip"]
    both = next(p for p in unique if p.params["axis"] == "both")
    assert np.array_equal(arr(both.target_image), arr(image)[::-1, ::-1])
    reference = Flip(eval_mode="reference").eval_pool(image, np.random.default_rng(0))
    assert len(reference) == 4
    assert [p.params["inverse"] for p in reference] == [False, True, False, True]
    # the reference pool holds the original image twice as a candidate
    originals = [p for p in reference if np.array_equal(arr(p.target_image), arr(image))]
    assert len(originals) == 2
    with pytest.raises(ValueError):
        Flip(eval_mode="nope")


def test_rotate_quarter_turns_return_to_start(image):
    rotate = Rotate()
    x = image
    for _ in range(4):
        x = rotate.apply(x, {"angle": 90, "direction": "clockwise"}).target_image
    assert np.array_equal(arr(x), arr(image))
    cw = rotate.apply(image, {"angle": 90, "direction": "clockwise"})
    assert cw.prompt == "rotate 90 degrees clockwise"
    assert np.array_equal(arr(cw.target_image), np.rot90(arr(image), -1))  # -1 = clockwise
    back = rotate.apply(cw.target_image, {"angle": 90, "direction": "counter-clockwise"})
    assert back.prompt == "rotate 90 degrees counter-clockwise"
    assert np.array_equal(arr(back.target_image), arr(image))


def test_rotate_small_angle_is_pillow_nearest_black_fill(image):
    pair = Rotate().apply(image, {"angle": 30, "direction": "counter-clockwise"})
    expected = image.rotate(30, resample=Image.NEAREST, expand=False)
    assert np.array_equal(arr(pair.target_image), arr(expected))
    assert pair.target_image.size == (256, 256)
    assert arr(pair.target_image)[0, 0].tolist() == [0, 0, 0]


def test_rotate_draws_distinct_pairs_and_full_pool(image):
    pairs = Rotate().variants(image, np.random.default_rng(3))
    assert len(pairs) == 3 and len({p.prompt for p in pairs}) == 3
    pool = Rotate().eval_pool(image, np.random.default_rng(3))
    expected = {f"rotate {a} degrees {d}" for a in range(10, 100, 10) for d in ("clockwise", "counter-clockwise")}
    assert {p.prompt for p in pool} == expected and len(pool) == 18


def test_crop_upper_left_is_the_top_left_region_resized(image):
    pairs = {p.prompt: p for p in RandomCrop().variants(image, np.random.default_rng(0))}
    assert set(pairs) == {f"crop to {loc}" for loc in CROP_LOCATIONS}
    expected = Image.fromarray(arr(image)[:128, :128]).resize((256, 256), Image.BICUBIC)
    assert np.array_equal(arr(pairs["crop to upper left"].target_image), arr(expected))
    expected = Image.fromarray(arr(image)[64:192, 128:]).resize((256, 256), Image.BICUBIC)
    assert np.array_equal(arr(pairs["crop to center right"].target_image), arr(expected))
    assert pairs["crop to lower right"].source_image is image


def test_crop_side_on_a_non_square_image():
    wide = Image.fromarray(np.arange(300 * 200 * 3, dtype=np.uint32).reshape(200, 300, 3).astype(np.uint8))
    pair = RandomCrop().apply(wide, {"location": "lower right"})
    side = min(300 // 2, 256, 300, 200)  # 150
    expected = Image.fromarray(arr(wide)[200 - side:, 300 - side:]).resize((256, 256), Image.BICUBIC)
    assert np.array_equal(arr(pair.target_image), arr(expected))


def test_colorjitter_prompt_format_and_pixels(image):
    pairs = ColorJitterV2().variants(image, np.random.default_rng(0))
    assert len(pairs) == 3
    for pair in pairs:
        match = JITTER.match(pair.prompt)
        assert match, pair.prompt
        words, factors = match.groups()[0::2], [float(f) for f in match.groups()[1::2]]
        for word, factor in zip(words, factors):
            assert 0.3 <= factor <= 2.0 and factor != 1.0
            assert (word == "increase") == (factor > 1)
        expected = image
        for enhancer, factor in zip((ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color), factors):
            expected = enhancer(expected).enhance(factor)
        assert np.array_equal(arr(pair.target_image), arr(expected))


def test_colorjitter_factor_distribution():
    rng = np.random.default_rng(0)
    params = ColorJitterV2().sample_params(rng, None, eval=True)
    assert len(params) == 10
    factors = [f for _ in range(300) for p in ColorJitterV2().sample_params(rng, None) for f in p.values()]
    assert set(factors) <= {round(0.1 * k, 1) for k in range(3, 21)} - {1.0}
    assert 1.1 in factors and 0.3 in factors and 2.0 in factors
    assert str(2.0) == "2.0"  # printed with one decimal, like the reference


def test_colorize_grayscale_pairs_use_the_original(image):
    for seed in range(4):  # both orders
        pairs = {p.prompt: p for p in ColorizeGrayscale().variants(image, np.random.default_rng(seed))}
        gray = np.repeat(arr(image.convert("L"))[:, :, None], 3, axis=2)
        assert np.array_equal(arr(pairs["grayscale"].source_image), arr(image))
        assert np.array_equal(arr(pairs["grayscale"].target_image), gray)
        assert np.array_equal(arr(pairs["colorize"].source_image), gray)
        assert np.array_equal(arr(pairs["colorize"].target_image), arr(image))


def test_training_pair_counts(image):
    counts = {t.kind: len(t.variants(image, np.random.default_rng(0))) for t in PAPER.transforms}
    assert counts == {"randomcrop": 9, "rotate": 3, "colorjitterv2": 3, "flip": 4, "colorize_grayscale": 2}
    assert all(p.kind == t.kind for t in PAPER.transforms for p in t.variants(image, np.random.default_rng(0)))


def test_sampling_probabilities_and_identity_probability():
    assert PAPER.kinds == ("randomcrop", "rotate", "colorjitterv2", "flip", "colorize_grayscale")
    np.testing.assert_allclose(PAPER.probabilities(), [0.1176, 0.1765, 0.1765, 0.2647, 0.2647], atol=1e-4)
    assert PAPER.mean_pairs() == pytest.approx(3.7059, abs=1e-4)
    assert PAPER.identity_probability(0.9) == pytest.approx(0.97089, abs=1e-5)
    assert PAPER.identity_probability(0.971) == pytest.approx(0.99201, abs=1e-5)
    # u is the share of identity *pairs*: p / (p + (1 - p) m) = u
    p, m = PAPER.identity_probability(0.9), PAPER.mean_pairs()
    assert p / (p + (1 - p) * m) == pytest.approx(0.9)


def test_eval_pools_sizes_unique_prompts_and_determinism(image):
    pools = PAPER.eval_pools(image, np.random.default_rng(0))
    assert {k: len(v) for k, v in pools.items()} == {
        "randomcrop": 9, "rotate": 18, "colorjitterv2": 10, "flip": 3, "colorize_grayscale": 2}
    for kind, pool in pools.items():
        assert len({p.prompt for p in pool}) == len(pool), kind
        assert all(p.kind == kind for p in pool)
    again = PAPER.eval_pools(image, np.random.default_rng(0))
    for kind in pools:
        assert [p.prompt for p in pools[kind]] == [p.prompt for p in again[kind]]
        for a, b in zip(pools[kind], again[kind]):
            assert np.array_equal(arr(a.target_image), arr(b.target_image))
    other = PAPER.eval_pools(image, np.random.default_rng(1))
    assert [p.prompt for p in other["rotate"]] != [p.prompt for p in pools["rotate"]]
    reference_family = TGITFamily("tgit", paper_transforms("reference"))
    reference = reference_family.eval_pools(image, np.random.default_rng(0), ["flip"])
    assert list(reference) == ["flip"] and len(reference["flip"]) == 4


def test_variants_are_deterministic_for_a_seed(image):
    for transform in paper_transforms():
        a = transform.variants(image, np.random.default_rng(7))
        b = transform.variants(image, np.random.default_rng(7))
        assert [(p.prompt, p.params) for p in a] == [(p.prompt, p.params) for p in b]
        for x, y in zip(a, b):
            assert np.array_equal(arr(x.source_image), arr(y.source_image))
            assert np.array_equal(arr(x.target_image), arr(y.target_image))


def test_non_rgb_input_is_converted(image):
    pair = RandomCrop().variants(image.convert("L"), np.random.default_rng(0))[0]
    assert pair.source_image.mode == "RGB" and pair.target_image.mode == "RGB"


def test_family_subset_and_errors():
    rotate_only = PAPER.subset(["rotate"])
    assert rotate_only.kinds == ("rotate",) and rotate_only.probabilities().tolist() == [1.0]
    with pytest.raises(KeyError):
        PAPER.subset(["nope"])
    with pytest.raises(ValueError):
        TGITFamily("dup", (Rotate(), Rotate()))
