"""``eval --check-leakage``: exact copies, a re-encoded JPEG, a resized copy, an embedding twin and same-article
pairs are found, and nothing else; --exclude-leaked scores the test tasks again without them."""
import csv
import shutil

import numpy as np
from PIL import Image
from typer.testing import CliRunner

import fuselip_med.cli as cli
from fuselip_med.eval.leakage import article_id, hamming_pairs
from fuselip_med.eval.runner import run_evaluation
from tests.planted import PlantedModel, unit


def smooth(seed, centre):
    """A 64x64 smooth random picture (an 8x8 random grid, bicubic) with a flat 32x32 centre of colour ``centre``
    (what the planted model sees, in steps of 32 levels: JPEG's few levels of change keep the embedding)."""
    grid = np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(grid).resize((64, 64), Image.BICUBIC)).copy()
    img[16:48, 16:48] = centre
    return Image.fromarray(img)


def rocov2_split(root, split, images, captions):
    """Official ROCOv2 layout: <split>_captions.csv (ID,Caption) + <split>_images/<split>/<ID>.jpg."""
    folder = root / f"{split}_images" / split
    folder.mkdir(parents=True, exist_ok=True)
    ids = []
    for k, write in enumerate(images):
        iid = f"ROCOv2_2023_{split}_{k + 1:06d}"
        write(folder / f"{iid}.jpg")
        ids.append(iid)
    with open(root / f"{split}_captions.csv", "w", newline="") as f:
        csv.writer(f).writerows([["ID", "Caption"], *zip(ids, captions)])
    for name in (f"{split}_concepts.csv", f"{split}_concepts_manual.csv"):
        (root / name).write_text("ID,CUIs\n" + "".join(f"{i},C0040405\n" for i in ids))
    return ids


def build(root):
    tests = [smooth(k, (32 * k + 16, 48, 80)) for k in range(5)]
    test_ids = rocov2_split(root, "test", [lambda p, im=im: im.save(p, quality=95) for im in tests],
                            [f"CT image number {k}." for k in range(5)])
    test_dir = root / "test_images" / "test"

    def copy_of(k):
        return lambda p: shutil.copyfile(test_dir / f"{test_ids[k]}.jpg", p)

    def reencoded(k):
        return lambda p: Image.open(test_dir / f"{test_ids[k]}.jpg").save(p, quality=60)

    def resized(k):
        return lambda p: Image.open(test_dir / f"{test_ids[k]}.jpg").resize((48, 48), Image.BILINEAR).save(p,
                                                                                                          quality=90)

    def twin_of(k):  # another picture whose (planted) embedding equals test k's
        return lambda p: smooth(100 + k, (32 * k + 16, 48, 80)).save(p, quality=95)

    others = [lambda p, s=s: smooth(s, (208, 208, 16)).save(p, quality=95) for s in range(200, 204)]
    rocov2_split(root, "train", [copy_of(0), reencoded(1), resized(2), twin_of(3), *others],
                 [f"train caption {k}." for k in range(8)])
    return test_ids


def bucket_model():
    return PlantedModel(image_fn=lambda i: unit(f"image:{(i >> 16) // 32},{((i >> 8) & 255) // 32},{(i & 255) // 32}"))


def test_leakage_finds_exactly_the_planted_pairs(tmp_path):
    root = tmp_path / "ROCOv2"
    test_ids = build(root)
    out = run_evaluation(bucket_model(), ["leakage", "rocov2-retrieval"], {"rocov2": str(root), "train": str(root)},
                         tmp_path / "out", progress=False, exclude_leaked=True, pool_size=None)
    rows = list(csv.DictReader(open(tmp_path / "out" / "leakage.csv")))
    found = {(r["test_id"][-1], r["train_id"][-1], r["kind"]) for r in rows}
    assert found == {("1", "1", "exact"), ("1", "1", "phash"), ("2", "2", "phash"), ("3", "3", "phash"),
                     ("1", "1", "embedding"), ("2", "2", "embedding"), ("3", "3", "embedding"),
                     ("4", "4", "embedding")}
    res = out["tasks"]["leakage"]
    assert res["metrics"]["exact_test_items"] == 1 and res["metrics"]["phash_test_items"] == 3
    assert res["metrics"]["embedding_test_items"] == 4 and res["metrics"]["leaked_test_items"] == 4
    assert res["leaked_ids"] == test_ids[:4] and res["thresholds"]["phash_max_hamming_bits"] == 8
    again = out["tasks"]["rocov2-retrieval (leaked excluded)"]
    assert out["tasks"]["rocov2-retrieval"]["n"] == 5 and again["n"] == 1 and again["excluded_leaked"] == 4


def test_same_article_pairs_from_pmc_file_names(tmp_path):
    (tmp_path / "figs").mkdir()
    for k, name in enumerate(("PMC1064097_F1.jpg", "PMC2000001_F2.jpg", "PMC1064097_F3.jpg", "PMC3000003_F1.jpg")):
        smooth(k, (16, 16 + 32 * k, 16)).save(tmp_path / "figs" / name, quality=95)
    (tmp_path / "test.csv").write_text("path,caption\nfigs/PMC1064097_F1.jpg,a CT\nfigs/PMC2000001_F2.jpg,an MRI\n")
    (tmp_path / "train.csv").write_text("path,caption\nfigs/PMC1064097_F3.jpg,a CT\nfigs/PMC3000003_F1.jpg,X-ray\n")
    out = run_evaluation(bucket_model(), ["leakage"], {"test:csv": str(tmp_path / "test.csv"),
                                                        "train:csv": str(tmp_path / "train.csv")},
                         tmp_path / "out", progress=False)
    rows = list(csv.DictReader(open(tmp_path / "out" / "leakage.csv")))
    assert [(r["kind"], r["value"]) for r in rows] == [("same_article", "PMC1064097")]
    assert out["tasks"]["leakage"]["metrics"]["same_article_test_items"] == 1


def test_article_id_and_hamming():
    assert article_id("x", "/data/PMC1064097_F1.jpg", {}) == "PMC1064097"
    assert article_id("ROCOv2_2023_test_000001", "/data/ROCOv2_2023_test_000001.jpg", {}) is None
    assert article_id("x", None, {"pmcid": "pmc42000"}) == "PMC42000"
    assert hamming_pairs([0b1011, 0], [0b0011, 0b1111_0000], 1) == [(0, 0, 1)]
    assert hamming_pairs([0b1011, 0], [0b0011, 0b1111_0000], 4) == [(0, 0, 1), (1, 0, 2), (1, 1, 4)]


def test_cli_check_leakage(tmp_path, monkeypatch):
    root = tmp_path / "ROCOv2"
    build(root)
    monkeypatch.setattr(cli.common, "load_inference_model", lambda *a, **k: (bucket_model(), None, None))
    result = CliRunner().invoke(cli.app, ["eval", "-m", "x", "-t", "rocov2-retrieval", "-d", f"rocov2={root}",
                                          "--check-leakage", str(root), "--exclude-leaked", "-o", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    import json

    tasks = json.loads((tmp_path / "o" / "metrics.json").read_text())["tasks"]
    assert set(tasks) == {"rocov2-retrieval", "leakage", "rocov2-retrieval (leaked excluded)"}
