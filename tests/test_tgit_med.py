"""The radiology TGIT set: windows (HU and 8-bit), inversion, radiological flips/rotations/zoom, pools."""
import numpy as np
import pytest
from PIL import Image

from fuselip_med.data.images import WINDOW_PRESETS
from fuselip_med.data.transforms.tgit_med import (
    CT_WINDOWS,
    INVERT_PROMPT,
    MEDICAL,
    Downsample,
    Flip,
    Gamma,
    MedicalImage,
    NoiseBlur,
    Rotate,
    Window,
    Zoom,
    is_hu_array,
)


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(2)
    return Image.fromarray(rng.integers(0, 256, (256, 256), dtype=np.uint8), "L")


@pytest.fixture(scope="module")
def hu():
    rng = np.random.default_rng(3)
    return rng.uniform(-1100, 2000, (256, 256)).astype(np.float32)


def arr(image):
    return np.asarray(image)


def pairs_by_prompt(transform, image, seed=0):
    return {p.prompt: p for p in transform.eval_pool(image, np.random.default_rng(seed))}


def test_flips_mirror_the_array_and_name_laterality(image):
    pairs = pairs_by_prompt(Flip(), image)
    lr = pairs["flip left-right (swap the patient's left and right sides)"]
    assert np.array_equal(arr(lr.target_image), arr(image)[:, ::-1])
    assert np.array_equal(arr(pairs["flip up-down (head-foot)"].target_image), arr(image)[::-1])
    assert np.array_equal(arr(pairs["flip both left-right and up-down"].target_image), arr(image)[::-1, ::-1])
    assert all(np.array_equal(arr(p.source_image), arr(image)) for p in pairs.values())


def test_quarter_rotations_return_to_start(image):
    rotate = Rotate()
    source = rotate.prepare(image, np.random.default_rng(0))
    x = source
    for _ in range(4):
        x = rotate.prepare(rotate.apply(x, {"angle": 90, "direction": "clockwise"}).target_image, None)
    assert np.array_equal(arr(x.display), arr(image))
    cw = rotate.apply(source, {"angle": 90, "direction": "clockwise"})
    assert np.array_equal(arr(cw.target_image), np.rot90(arr(image), -1))
    back = rotate.apply(rotate.prepare(cw.target_image, None), {"angle": 90, "direction": "counter-clockwise"})
    assert np.array_equal(arr(back.target_image), arr(image))
    half = rotate.apply(source, {"angle": 180, "direction": None})
    assert half.prompt == "rotate 180 degrees"
    assert np.array_equal(arr(half.target_image), np.rot90(arr(image), 2))


def test_small_rotation_direction():
    dot = np.zeros((101, 101), np.uint8)
    dot[50, 90] = 255  # right of the centre
    rotate = Rotate()
    source = rotate.prepare(Image.fromarray(dot), None)
    cw = arr(rotate.apply(source, {"angle": 15, "direction": "clockwise"}).target_image)
    ccw = arr(rotate.apply(source, {"angle": 15, "direction": "counter-clockwise"}).target_image)
    def row(a):
        return np.average(np.arange(101), weights=a.sum(axis=1))

    assert row(cw) > 50 > row(ccw)  # clockwise moves a right-hand point down, as seen on screen


def test_zoom_right_upper_quadrant_is_the_image_top_left(image):
    pairs = pairs_by_prompt(Zoom(), image)
    ruq = pairs["zoom into the patient's right upper quadrant (top left of the image)"]
    expected = np.asarray(Image.fromarray(arr(image)[:128, :128]).resize((256, 256), Image.BICUBIC), float)
    # cv2 and Pillow bicubic differ slightly; the region must be the top-left one
    assert np.abs(arr(ruq.target_image).astype(float) - expected).mean() < 12
    for other in ("left upper", "right lower", "left lower"):
        prompt = next(p for p in pairs if other in p)
        assert np.abs(arr(pairs[prompt].target_image).astype(float) - expected).mean() > 40
    assert all("image" in p for p in pairs)  # every zoom prompt states the position on the image


def test_hu_window_maps_bounds_to_0_and_255():
    width, level = WINDOW_PRESETS["lung"]
    values = np.full((256, 256), level, np.float32)
    values[:, :64] = level - width / 2
    values[:, 64:128] = level + width / 2
    values[:, 128:160] = -3000.0  # below: clipped to 0
    values[:, 160:192] = 3000.0  # above: clipped to 255
    window = Window()
    source = MedicalImage(Image.new("L", (256, 256)), values, "bone")
    target = arr(window.apply(source, {"window": "lung"}).target_image)
    assert (target[:, :64] == 0).all() and (target[:, 64:128] == 255).all()
    assert (target[:, 128:160] == 0).all() and (target[:, 160:192] == 255).all()
    assert (target[:, 192:] == 128).all()  # the level is mid-grey


def test_hu_source_pool_names_the_other_windows(hu):
    assert is_hu_array(hu) and is_hu_array(hu.astype(np.int16)) and not is_hu_array(hu.astype(np.uint8))
    pool = Window().eval_pool(hu, np.random.default_rng(0))
    prepared = Window().prepare(hu, np.random.default_rng(0))
    assert prepared.window in CT_WINDOWS
    names = {p.params.get("window") for p in pool} - {None}
    assert names == set(CT_WINDOWS) - {prepared.window}
    assert len(pool) == Window.eval_pairs == 6
    assert sum(p.prompt == INVERT_PROMPT for p in pool) == 1
    lung = next((p for p in pool if p.params.get("window") == "lung"), None)
    if lung is not None:
        width, level = WINDOW_PRESETS["lung"]
        expected = np.rint(np.clip((hu - (level - width / 2)) / width, 0, 1) * 255).astype(np.uint8)
        assert np.array_equal(arr(lung.target_image), expected)
        assert lung.prompt == "apply the lung window"


def test_8bit_window_and_inversion(image):
    pairs = pairs_by_prompt(Window(), image)
    assert len(pairs) == 6
    mid = arr(pairs["narrow the window to the mid intensities"].target_image)
    a = arr(image).astype(np.float32)
    assert (mid[a <= 63.75] == 0).all() and (mid[a >= 191.25] == 255).all()
    inverted = pairs[INVERT_PROMPT].target_image
    assert np.array_equal(arr(inverted), 255 - arr(image))
    twice = Window().apply(Window().prepare(inverted, None), {"invert": True}).target_image
    assert np.array_equal(arr(twice), arr(image))


def test_gamma_prompts_and_direction(image):
    pairs = pairs_by_prompt(Gamma(), image)
    assert set(pairs) == {"brighten with gamma 0.5", "brighten with gamma 0.7", "darken with gamma 1.5",
                          "darken with gamma 2.0"}
    mean = arr(image).mean()
    assert arr(pairs["brighten with gamma 0.7"].target_image).mean() > mean
    assert arr(pairs["darken with gamma 1.5"].target_image).mean() < mean
    expected = np.rint((arr(image) / 255.0) ** 0.7 * 255)
    assert np.abs(arr(pairs["brighten with gamma 0.7"].target_image) - expected).max() <= 1


def test_downsample_noise_blur(image):
    pairs = pairs_by_prompt(Downsample(), image)
    assert set(pairs) == {f"downsample to {s} pixels then back" for s in (32, 64, 128)}
    for pair in pairs.values():
        assert pair.target_image.size == image.size
    stds = [arr(pairs[f"downsample to {s} pixels then back"].target_image).std() for s in (32, 64, 128)]
    assert stds[0] < stds[1] < stds[2] < arr(image).std()

    flat = Image.new("L", (256, 256), 128)
    pairs = pairs_by_prompt(NoiseBlur(), flat)
    noisy = arr(pairs["add gaussian noise sigma 0.05"].target_image).astype(float)
    assert noisy.std() == pytest.approx(0.05 * 255, rel=0.1)
    assert arr(pairs["add gaussian noise sigma 0.1"].target_image).std() > noisy.std()
    blurred = pairs_by_prompt(NoiseBlur(), image)
    assert arr(blurred["blur with sigma 2"].target_image).std() < arr(blurred["blur with sigma 1"].target_image).std()


@pytest.mark.parametrize("source", ["image", "hu"])
def test_pools_fixed_size_unique_prompts_and_deterministic(source, request):
    src = request.getfixturevalue(source)
    pools = MEDICAL.eval_pools(src, np.random.default_rng(0))
    assert set(pools) == set(MEDICAL.kinds)
    for transform in MEDICAL.transforms:
        pool = pools[transform.kind]
        assert len(pool) == transform.eval_pairs
        assert len({p.prompt for p in pool}) == len(pool), transform.kind
        assert all(p.kind == transform.kind and p.target_image.mode == "L" for p in pool)
        assert all(p.source_image is pool[0].source_image for p in pool)
    again = MEDICAL.eval_pools(src, np.random.default_rng(0))
    for kind in pools:
        for a, b in zip(pools[kind], again[kind]):
            assert a.prompt == b.prompt and a.params == b.params
            assert np.array_equal(arr(a.target_image), arr(b.target_image))


def test_training_counts_and_probabilities(image):
    for transform in MEDICAL.transforms:
        pairs = transform.variants(image, np.random.default_rng(0))
        assert len(pairs) == transform.train_pairs
        assert len({p.prompt for p in pairs}) == len(pairs)
    probs = MEDICAL.probabilities()
    assert probs.sum() == pytest.approx(1.0)
    expected = np.array([1 / t.train_pairs for t in MEDICAL.transforms])
    np.testing.assert_allclose(probs, expected / expected.sum())
    p, m = MEDICAL.identity_probability(0.9), MEDICAL.mean_pairs()
    assert p / (p + (1 - p) * m) == pytest.approx(0.9)


def test_rgb_input_becomes_grayscale():
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8), "RGB")
    pair = Flip().variants(rgb, np.random.default_rng(0))[0]
    assert pair.source_image.mode == "L" and pair.target_image.mode == "L"
