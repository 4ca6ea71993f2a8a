"""TGITTask: split by image, block layout, hard-negative groups, determinism, registry, sampler, decoding."""
import collections

import numpy as np
import pytest
from PIL import Image

from fuselip_med.core.image_preprocess import pil_to_tensor
from fuselip_med.data.adapters import BadRowError, DatasetEmptyError, ListSource, get_adapter
from fuselip_med.data.dataset import SampleDataset, SkippedSample
from fuselip_med.data.sampling import GroupedBatchSampler
from fuselip_med.data.schema import Sample, SampleSide
from fuselip_med.data.transforms.tasks import TGITTask, eval_pools, get_family, split_of
from fuselip_med.data.transforms.tgit import PAPER


def make_base(tmp_path, n=12, name="toy"):
    rng = np.random.default_rng(0)
    samples = []
    for i in range(n):
        size = (200 + 8 * i, 160 + 4 * i)
        path = tmp_path / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB").save(path)
        samples.append(Sample(id=f"s{i}", source=name, query=SampleSide(image=str(path)),
                              target=SampleSide(text=f"caption {i}")))
    return ListSource(samples, name=name)


def paths_only_base(n, name="many"):
    """A large base whose images are never decoded (layout tests only)."""
    return ListSource([Sample(id=f"id{i}", source=name, query=SampleSide(image=f"/nonexistent/{i}.png"),
                              target=SampleSide(text="c")) for i in range(n)], name=name)


def check_groups(task, decode=True):
    groups = task.groups()
    flat = [i for group in groups for i in group]
    assert flat == list(range(len(task)))  # a partition, in index order
    for group in groups:
        kinds = {task.item_kind(i) for i in group}
        assert len(kinds) == 1
        if kinds == {"identity"}:
            assert len(group) == 1
        if decode:
            samples = [task[i] for i in group]
            assert len({s.group_key for s in samples}) == 1
            assert len({s.meta["base_id"] for s in samples}) == 1
    return groups


def test_split_is_by_image_disjoint_and_seed_independent():
    base = paths_only_base(2000)
    train = TGITTask(base, split="train", seed=0)
    evals = TGITTask(base, split="eval", seed=5)
    train_ids = {base[int(b)].id for b in train._block_base}
    eval_ids = {base[int(b)].id for b in evals._block_base}
    assert not train_ids & eval_ids and len(train_ids | eval_ids) == 2000
    assert 0.07 < len(eval_ids) / 2000 < 0.13
    assert {base[int(b)].id for b in TGITTask(base, split="eval", seed=0)._block_base} == eval_ids
    assert split_of("anything", 0.0) == "train" and split_of("anything", 1.0) == "eval"


def test_identity_fraction_of_pairs_and_type_shares():
    task = TGITTask(paths_only_base(20000), split="train", seed=0, identity_fraction=0.9, eval_fraction=0.0)
    kinds = collections.Counter(task.item_kind(i) for i in range(len(task)))
    assert kinds["identity"] / len(task) == pytest.approx(0.9, abs=0.015)
    check_groups(task, decode=False)
    blocks = collections.Counter(task.item_kind(g[0]) for g in task.groups() if task.item_kind(g[0]) != "identity")
    shares = np.array([blocks[k] for k in PAPER.kinds], float)
    np.testing.assert_allclose(shares / shares.sum(), PAPER.probabilities(), atol=0.05)
    sizes = {task.item_kind(g[0]): len(g) for g in task.groups()}
    assert sizes == {"identity": 1, "randomcrop": 9, "rotate": 3, "colorjitterv2": 3, "flip": 4,
                     "colorize_grayscale": 2}
    assert task.identity_probability == pytest.approx(0.97089, abs=1e-5)


def test_train_samples_groups_and_identity(tmp_path):
    base = make_base(tmp_path, n=12)
    task = TGITTask(base, split="train", seed=1, identity_fraction=0.5, eval_fraction=0.0)
    groups = check_groups(task)
    assert len(groups) == 12
    assert {task.item_kind(g[0]) for g in groups} > {"identity"}  # identity and transformed blocks
    for group in groups:
        sample = task[group[0]]
        if sample.meta["kind"] == "identity":
            assert sample.query.text is None and sample.target.image is None
            assert sample.target.text.startswith("caption ") and sample.query.image.endswith(".png")
            assert sample.group is None
            continue
        assert sample.group == f"toy/{sample.meta['base_id']}/tgit/{sample.meta['kind']}"
        assert sample.target.text is None and sample.query.text
        assert sample.meta["preprocessed"] is True
        assert sample.query.image.size == (256, 256) and sample.query.image.mode == "RGB"
        prompts = [task[i].query.text for i in group]
        if sample.meta["kind"] != "flip":  # the training flip pairs repeat a prompt in the inverse direction
            assert len(set(prompts)) == len(prompts)


def test_same_index_same_sample(tmp_path):
    base = make_base(tmp_path, n=8)
    a = TGITTask(base, split="train", seed=3, identity_fraction=0.0, eval_fraction=0.0)
    b = TGITTask(base, split="train", seed=3, identity_fraction=0.0, eval_fraction=0.0)
    order = list(range(len(a)))
    for i, j in zip(order, reversed(order)):  # b is read in another order: caching must not matter
        a[i], b[j]
    for i in order:
        x, y = a[i], b[i]
        assert (x.id, x.query.text, x.group, x.meta["params"]) == (y.id, y.query.text, y.group, y.meta["params"])
        assert np.array_equal(np.asarray(x.query.image), np.asarray(y.query.image))
        assert np.array_equal(np.asarray(x.target.image), np.asarray(y.target.image))
    other = TGITTask(base, split="train", seed=4, identity_fraction=0.0, eval_fraction=0.0)
    assert [other.item_kind(i) for i in range(len(other))] != [a.item_kind(i) for i in order] or \
        [other[i].query.text for i in range(len(other))] != [a[i].query.text for i in order]


def test_crop_source_is_the_squashed_image(tmp_path):
    base = make_base(tmp_path, n=3)
    task = TGITTask(base, ["randomcrop"], split="eval", eval_fraction=1.0)
    sample = task[0]
    original = Image.open(base[0].query.image)
    squashed = original.resize((256, 256), Image.BICUBIC).convert("RGB")
    assert np.array_equal(np.asarray(sample.query.image), np.asarray(squashed))


def test_train_base_preprocessing_is_the_reference(tmp_path):
    base = make_base(tmp_path, n=4)

    def squashed(sample):
        return np.asarray(Image.open(base[int(sample.meta["base_id"][1:])].query.image)
                          .resize((256, 256), Image.BICUBIC).convert("RGB"))

    crops = TGITTask(base, ["randomcrop"], split="train", eval_fraction=0.0, identity_fraction=0.0)
    assert all(np.array_equal(np.asarray(crops[g[0]].query.image), squashed(crops[g[0]])) for g in crops.groups())
    rotations = TGITTask(base, ["rotate"], split="train", eval_fraction=0.0, identity_fraction=0.0)
    sources = [rotations[g[0]] for g in rotations.groups()]  # a random resized crop (scale 0.9-1.0)
    assert all(s.query.image.size == (256, 256) for s in sources)
    assert not all(np.array_equal(np.asarray(s.query.image), squashed(s)) for s in sources)


def test_eval_split_pools(tmp_path):
    base = make_base(tmp_path, n=4)
    task = TGITTask(base, split="eval", eval_fraction=1.0, seed=0)
    groups = check_groups(task)
    assert len(groups) == 4 * len(PAPER.kinds)
    expected = {"randomcrop": 9, "rotate": 18, "colorjitterv2": 10, "flip": 3, "colorize_grayscale": 2}
    for group in groups:
        samples = [task[i] for i in group]
        kind = samples[0].meta["kind"]
        assert len(group) == expected[kind] == samples[0].meta["pool_size"]
        assert [s.meta["slot"] for s in samples] == list(range(len(group)))
        assert len({s.query.text for s in samples}) == len(group)
        assert all(s.meta["split"] == "eval" for s in samples)
    reference = TGITTask(base, ["flip"], split="eval", eval_fraction=1.0, flip_eval="reference")
    assert all(len(g) == 4 for g in reference.groups())


def test_medical_task_with_hu_and_8bit_sources(tmp_path):
    rng = np.random.default_rng(0)
    hu = rng.uniform(-1000, 1500, (300, 240)).astype(np.float32)
    gray = tmp_path / "xray.png"
    Image.fromarray(rng.integers(0, 256, (180, 220), dtype=np.uint8), "L").save(gray)
    base = ListSource([Sample(id="ct", source="med", query=SampleSide(image=hu), target=SampleSide(text="axial CT")),
                       Sample(id="xr", source="med", query=SampleSide(image=str(gray)),
                              target=SampleSide(text="chest x-ray"))], "med")
    task = TGITTask(base, "tgit_med", split="eval", eval_fraction=1.0)
    groups = check_groups(task)
    assert len(groups) == 2 * 7
    for group in groups:
        samples = [task[i] for i in group]
        assert all(s.query.image.mode == "L" and s.query.image.size == (256, 256) for s in samples)
        assert len({s.query.text for s in samples}) == len(samples)
        if samples[0].meta["kind"] == "med_window":
            named = [s for s in samples if "window" in s.meta["params"]]
            assert len(named) == (5 if samples[0].meta["base_id"] == "ct" else 0)
    train = TGITTask(base, "tgit_med", split="train", eval_fraction=0.0, identity_fraction=0.0)
    check_groups(train)


def test_registry_skips_and_errors(tmp_path):
    base = make_base(tmp_path, n=3)
    task = get_adapter("tgit")(base, split="eval", eval_fraction=1.0)
    assert isinstance(task, TGITTask) and task.family.name == "tgit" and task.name == "toy+tgit"
    assert get_adapter("tgit_med")(base, split="eval", eval_fraction=1.0).family.name == "tgit_med"
    assert get_adapter("tgit")(base, kinds=["rotate"], eval_fraction=0.0).family.kinds == ("rotate",)
    with pytest.raises(ValueError, match="another family"):
        get_adapter("tgit_med")(base, kinds=["rotate"])
    with pytest.raises(ValueError, match="unknown TGIT kinds"):
        get_family(["rotate", "med_zoom"])
    with pytest.raises(ValueError, match="split"):
        TGITTask(base, split="valid")

    textonly = ListSource(list(base.samples) + [Sample(id="t", source="toy", query=SampleSide(text="q"),
                                                       target=SampleSide(text="a"))])
    lenient = TGITTask(textonly, split="eval", eval_fraction=1.0)
    assert lenient.skipped == {"no image": 1}
    with pytest.raises(BadRowError):
        TGITTask(textonly, split="eval", eval_fraction=1.0, strict=True)
    with pytest.raises(DatasetEmptyError):
        TGITTask(base, split="eval", eval_fraction=0.0)
    assert len(TGITTask(base, split="eval", eval_fraction=1.0, limit=1).groups()) == len(PAPER.kinds)


def test_hard_negatives_land_in_one_batch_through_the_sampler(tmp_path):
    base = make_base(tmp_path, n=10)
    task = TGITTask(base, split="train", seed=0, identity_fraction=0.3, eval_fraction=0.0)
    keys = [task[i].group_key for i in range(len(task))]
    sampler = GroupedBatchSampler(task.groups(), 16, seed=0)
    batch_of = {}
    for number, batch in enumerate(sampler):
        for i in batch:
            batch_of[i] = number
    assert sorted(batch_of) == list(range(len(task)))
    by_key = collections.defaultdict(set)
    for i, key in enumerate(keys):
        by_key[key].add(batch_of[i])
    assert all(len(batches) == 1 for batches in by_key.values())
    assert any(len(g) > 1 for g in task.groups())


def test_dataset_decodes_rendered_images_unchanged(tmp_path):
    base = make_base(tmp_path, n=3)
    task = TGITTask(base, "tgit_med", split="eval", eval_fraction=1.0)
    item = SampleDataset(task)[0]
    sample = task[0]
    assert item.query.text == sample.query.text and item.target.text is None
    assert item.group == sample.group
    assert torch_equal(item.query.pixels, pil_to_tensor(sample.query.image))
    assert torch_equal(item.target.pixels, pil_to_tensor(sample.target.image))

    broken = ListSource([Sample(id="gone", source="toy", query=SampleSide(image=str(tmp_path / "missing.png")),
                                target=SampleSide(text="c"))], "toy")
    skipped = SampleDataset(TGITTask(broken, split="eval", eval_fraction=1.0))[0]
    assert isinstance(skipped, SkippedSample) and skipped.reason == "missing file"


def torch_equal(a, b):
    return a.shape == b.shape and bool((a == b).all())


@pytest.mark.parametrize("family", ["tgit", "tgit_med"])
def test_eval_pools_function(tmp_path, family):
    path = make_base(tmp_path, n=1)[0].query.image
    pools = eval_pools(path, family, np.random.default_rng(0))
    again = eval_pools(path, family, np.random.default_rng(0))
    assert list(pools) == list(get_family(family).kinds)
    for kind, pool in pools.items():
        assert len({p.prompt for p in pool}) == len(pool)
        assert [p.prompt for p in pool] == [p.prompt for p in again[kind]]
        assert np.array_equal(np.asarray(pool[0].target_image), np.asarray(again[kind][0].target_image))
        assert pool[0].source_image.size == (256, 256)


def test_training_dataset_does_not_crop_rendered_pairs_again(tmp_path):
    base = make_base(tmp_path, n=4)
    task = TGITTask(base, "tgit", split="train", identity_fraction=0.0, eval_fraction=0.0)
    index = next(i for i in range(len(task)) if task[i].meta.get("preprocessed"))
    sample = task[index]
    item = SampleDataset(task, train=True)[index]
    assert torch_equal(item.target.pixels, pil_to_tensor(sample.target.image))
