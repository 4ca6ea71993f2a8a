"""vg_crop and vg_vqa on Visual Genome fixtures in the published json layout (regions, QAs, image folders)."""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fuselip_med.data.adapters import BadRowError, DatasetEmptyError, DatasetNotFoundError, get_adapter
from fuselip_med.data.adapters.visual_genome import (
    VGCropSource,
    VGVQASource,
    region_filters,
    split_of_image,
    suppress_overlaps,
    vg_crop,
    vg_vqa,
)
from fuselip_med.data.dataset import DecodedSample, SampleDataset, SkippedSample
from fuselip_med.data.images import DecodeOptions, load_image
from fuselip_med.data.sampling import GroupedBatchSampler


def region(region_id, image_id, phrase, x, y, w, h):
    return {"region_id": region_id, "image_id": image_id, "phrase": phrase, "x": x, "y": y, "width": w, "height": h}


REGIONS = [
    {"id": 1, "regions": [
        region(11, 1, "a big box", 0, 0, 100, 80),
        region(12, 1, "a tiny thing", 150, 10, 20, 50),  # w <= 32
        region(13, 1, "overlaps the big box", 10, 5, 100, 80),  # IoU 0.73 with region 11
        region(14, 1, "the right part", 110, 0, 90, 100),
        region(15, 1, "", 0, 0, 50, 50),  # empty phrase
        region(16, 1, "  spaced\nphrase ", 0, 60, 60, 40),  # IoU 0.13 with region 11
    ]},
    {"id": 2, "regions": [region(20 + k, 2, f"part {k}", 45 * k, 10, 40, 40) for k in range(1, 6)]},
    {"id": 4, "regions": [region(41, 4, "its image is missing", 0, 0, 50, 50)]},
    {"id": 3, "regions": [{"region_id": 31, "image_id": 3, "phrase": "bad box", "x": "a", "y": 0, "width": 5,
                           "height": 5}]},
]
QAS = [
    {"id": 1, "qas": [
        {"qa_id": 101, "image_id": 1, "question": "What colour is the box?", "answer": "Red.", "q_objects": [],
         "a_objects": []},
        {"qa_id": 102, "image_id": 1, "question": "How many dogs?", "answer": "Two dogs.."},
        {"qa_id": 103, "image_id": 1, "question": "Where?", "answer": "."},  # empty after the period goes
        {"qa_id": 104, "image_id": 1, "question": "When?", "answer": "At night."},
    ]},
    {"id": 2, "qas": [{"qa_id": 200 + k, "image_id": 2, "question": f"Question {k}?", "answer": f"answer {k}."}
                      for k in range(1, 4)]},
    {"id": 4, "qas": [{"qa_id": 401, "image_id": 4, "question": "Missing?", "answer": "Yes."}]},
    {"id": 3, "qas": [{"qa_id": 301, "image_id": 3, "question": None, "answer": "bad"}]},
]


def write_vg(root: Path) -> Path:
    """images/1.jpg, VG_100K_2/2.jpg, VG_100K/3.jpg (4 is missing), and the three json files."""
    for folder, image_id in (("images", 1), ("VG_100K_2", 2), ("VG_100K", 3)):
        (root / folder).mkdir(parents=True, exist_ok=True)
        x, y = np.meshgrid(np.arange(240), np.arange(120))
        pixels = np.stack([x, y * 2, np.full_like(x, 60 * image_id)], axis=-1).astype(np.uint8)
        Image.fromarray(pixels).save(root / folder / f"{image_id}.jpg", quality=95)
    image_data = [{"image_id": i, "url": f"https://cs.stanford.edu/people/rak248/VG_100K/{i}.jpg", "width": 240,
                   "height": 120, "coco_id": None, "flickr_id": None} for i in (1, 2, 3, 4)]
    (root / "image_data.json").write_text(json.dumps(image_data))
    (root / "region_descriptions.json").write_text(json.dumps(REGIONS))
    (root / "question_answers.json").write_text(json.dumps(QAS))
    return root


@pytest.fixture
def vg(tmp_path) -> Path:
    return write_vg(tmp_path / "visual_genome")


def ids(source):
    return [source[i].meta.get("region_id", source[i].meta.get("qa_id")) for i in range(len(source))]


def test_crop_train_keeps_every_region_in_groups_of_four(vg):
    source = get_adapter("vg_crop")(path=str(vg), split="train", test_fraction=0.0)
    assert isinstance(source, VGCropSource) and source.name == "vg_crop/train"
    assert ids(source) == [11, 12, 13, 14, 16, 21, 22, 23]  # 24, 25: the incomplete last group is dropped
    assert dict(source.skipped) == {"empty phrase": 1, "missing image": 1, "bad region": 1}
    assert dict(source.filtered) == {"incomplete group": 2}
    assert source.groups() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    first, fifth = source[0], source[4]
    assert first.query.text == "a big box" and first.target.text is None and fifth.query.text == "spaced phrase"
    assert first.query.image == str(vg / "images" / "1.jpg")
    assert source[5].query.image == str(vg / "VG_100K_2" / "2.jpg")
    assert first.group_key == source[3].group_key != fifth.group_key
    assert first.meta["box"] == (0, 0, 100, 80) and first.id == "1/11"
    for i in (0, 3, 6):  # the crop is (x, y, x + w, y + h) of the original image
        sample = source[i]
        x, y, w, h = sample.meta["box"]
        expected = load_image(sample.query.image).crop((x, y, x + w, y + h))
        assert isinstance(sample.target.image, Image.Image) and sample.target.image.size == (w, h)
        assert np.array_equal(np.asarray(sample.target.image), np.asarray(expected))
    clone = pickle.loads(pickle.dumps(source))
    assert clone[1].query.text == "a tiny thing"


def test_crop_eval_filters_small_and_overlapping_regions(vg):
    test = vg_crop(vg, split="test", test_fraction=1.0)
    assert region_filters("test") == (32.0, 0.3) and region_filters("train") == (0.0, 1.0)
    assert ids(test) == [11, 14, 16, 21, 22, 23, 24, 25]
    assert dict(test.filtered) == {"small region": 1, "overlapping region": 1}
    assert ids(vg_crop(vg, split="train", test_fraction=0.0, min_size=32, max_iou=0.3)) == ids(test)
    assert ids(vg_crop(vg, split="test", test_fraction=1.0, min_size=0, max_iou=1.0)) == [11, 12, 13, 14, 16, 21,
                                                                                          22, 23]
    boxes = np.array([[0, 0, 10, 10], [1, 1, 10, 10], [20, 0, 10, 10], [0, 0, 10, 9]], dtype=float)
    assert suppress_overlaps(boxes, 0.3) == [0, 2]


def test_hash_split_is_by_image_and_split_files_win(vg):
    assert split_of_image(1, 0.5) == "train" and split_of_image(2, 0.5) == "test"  # fixed hashes of the ids
    train, test = (vg_vqa(vg, split, test_fraction=0.5, group_size=1) for split in ("train", "test"))
    assert {train[i].meta["image_id"] for i in range(len(train))} == {1}
    assert {test[i].meta["image_id"] for i in range(len(test))} == {2}
    assert len(train) + len(test) == len(vg_vqa(vg, "all", group_size=1))
    with pytest.raises(DatasetEmptyError, match="vg_vqa split 'train'"):
        vg_vqa(vg, "train", test_fraction=1.0)
    (vg / "region_descriptions_train.json").write_text(json.dumps([REGIONS[1]]))
    assert ids(vg_crop(vg, "train", test_fraction=1.0)) == [21, 22, 23, 24]  # the reference's split file
    assert len(vg_crop(vg, "all", group_size=1)) == 10


def test_vqa_answers_lose_the_period(vg):
    source = get_adapter("vg_vqa")(path=str(vg), split="all")
    assert isinstance(source, VGVQASource) and source.name == "vg_vqa/all"
    assert ids(source) == [101, 102, 104, 201]  # 202, 203 form the incomplete last group
    assert [source[i].target.text for i in range(4)] == ["Red", "Two dogs", "At night", "answer 1"]
    assert dict(source.skipped) == {"empty answer": 1, "missing image": 1, "bad qa": 1}
    sample = source[0]
    assert sample.query.text == "What colour is the box?" and sample.target.image is None
    assert sample.query.image == str(vg / "images" / "1.jpg") and sample.id == "1/101"
    assert source.groups() == [[0, 1, 2, 3]]
    assert ids(vg_vqa(vg, "all", group_size=2)) == [101, 102, 104, 201, 202, 203]


def test_fraction_downsamples_groups_like_the_reference(vg):
    full = vg_vqa(vg, "all", group_size=1)
    half = vg_vqa(vg, "all", group_size=1, fraction=0.5)
    chosen = np.sort(np.random.default_rng(0).choice(len(full), int(0.5 * len(full)), replace=False))
    assert ids(half) == [ids(full)[i] for i in chosen] and len(half) == 3
    assert ids(vg_vqa(vg, "all", group_size=1, fraction=0.5, limit=2)) == ids(half)[:2]
    with pytest.raises(ValueError, match="fraction"):
        vg_vqa(vg, "all", fraction=0.0)


def test_sampler_keeps_groups_whole_and_decoding(vg):
    source = vg_crop(vg, "all", group_size=2)  # 10 regions -> 5 groups of 2
    groups = source.groups()
    owner = {i: g for g, members in enumerate(groups) for i in members}
    batches = list(GroupedBatchSampler(groups, 3, seed=0))
    assert sorted(i for batch in batches for i in batch) == list(range(len(source)))
    for batch in batches:
        assert {source[i].group_key for i in batch} == {f"vg_crop/all/{owner[i]}" for i in batch}
        for g in {owner[i] for i in batch}:
            assert set(groups[g]) <= set(batch)
    item = SampleDataset(source, DecodeOptions(image_size=32))[0]
    assert isinstance(item, DecodedSample) and item.query.pixels.shape == item.target.pixels.shape == (3, 32, 32)
    (vg / "images" / "1.jpg").unlink()  # a file gone after indexing is a skipped sample, not a crash
    gone = SampleDataset(source, DecodeOptions(image_size=32))[0]
    assert isinstance(gone, SkippedSample) and gone.reason == "missing file"


def test_strict_and_missing_files(vg, tmp_path):
    with pytest.raises(BadRowError, match=r"entry 0, region 4: empty phrase"):
        vg_crop(vg, "all", strict=True)
    with pytest.raises(BadRowError, match=r"entry 0, qa 2: empty answer"):
        vg_vqa(vg, "all", strict=True)
    with pytest.raises(DatasetNotFoundError, match="question_answers.json does not exist"):
        vg_vqa(tmp_path, "all")
    (tmp_path / "region_descriptions.json").write_text("[]")
    with pytest.raises(DatasetNotFoundError, match="no image folder"):
        vg_crop(tmp_path, "all")
    with pytest.raises(ValueError, match="unknown Visual Genome split 'val'"):
        vg_crop(vg, "val")


def test_boxes_beyond_the_image_are_clipped_or_skipped_not_allocated(tmp_path):
    """Region boxes from a hand-edited or hostile JSON: NaN/Infinity are bad regions at load; a width of 1e9 is cut
    at the image's edge (not a 1e9-wide black canvas); a box wholly outside the image is a named skip."""
    root = write_vg(tmp_path / "vg")
    regions = [{"id": 1, "regions": [region(1, 1, "nan box", 0, 0, float("nan"), 10),
                                     region(2, 1, "inf box", 0, 0, float("inf"), 10),
                                     region(3, 1, "huge box", 200, 100, 1e9, 1e9),
                                     region(4, 1, "outside", 5000, 0, 50, 50)]}]
    (root / "region_descriptions.json").write_text(json.dumps(regions))
    source = vg_crop(root, "all", group_size=1)
    assert dict(source.skipped) == {"bad region": 2}
    assert source[0].target.image.size == (40, 20)
    dataset = SampleDataset(source, DecodeOptions(image_size=32))
    assert isinstance(dataset[0], DecodedSample)
    skipped = dataset[1]
    assert isinstance(skipped, SkippedSample) and skipped.reason == "region outside image"
