"""The OI-Crop/OI-Pos builder keeps and drops exactly the boxes its rules say, on a synthetic annotation set."""
import csv
import json
import subprocess
import sys
from pathlib import Path

from PIL import Image

from fuselip_med.eval.oi_build import Box, OIRules, decoys_for, filter_boxes

HEADER = ["ImageID", "Source", "LabelName", "Confidence", "XMin", "XMax", "YMin", "YMax", "IsOccluded",
          "IsTruncated", "IsGroupOf", "IsDepiction", "IsInside"]
W, H = 1000, 800


def row(image, label, x0, x1, y0, y1, group="0", depiction="0", inside="0"):
    return [image, "xclick", label, "1", x0 / W, x1 / W, y0 / H, y1 / H, "0", "0", group, depiction, inside]


def write_set(root: Path) -> Path:
    images = root / "test"
    images.mkdir(parents=True)
    rows = [
        # image "aaa": five labels, each once, apart from each other -> kept
        row("aaa", "/m/cat", 10, 110, 10, 110), row("aaa", "/m/dog", 200, 300, 10, 110),
        row("aaa", "/m/car", 400, 500, 10, 110), row("aaa", "/m/cup", 600, 700, 10, 110),
        row("aaa", "/m/hat", 800, 900, 10, 110),
        # dropped: too small, too elongated, a group box, a depiction, and two boxes overlapping by IoU 0.81
        row("aaa", "/m/pen", 10, 50, 300, 340), row("aaa", "/m/bat", 200, 600, 300, 380),
        row("aaa", "/m/cat", 10, 200, 500, 700, group="1"), row("aaa", "/m/dog", 300, 500, 500, 700, depiction="1"),
        row("aaa", "/m/box", 600, 800, 500, 700), row("aaa", "/m/box", 610, 800, 510, 700),
    ]
    rows += [row(f"b{k}", "/m/cat", 100, 300, 100, 300) for k in range(5)]  # the cat in five other images
    # image "pos": two dogs, left and right, with free space beside them
    rows += [row("pos", "/m/dog", 300, 400, 300, 400), row("pos", "/m/dog", 600, 800, 200, 400)]
    with open(root / "boxes.csv", "w", newline="") as f:
        csv.writer(f).writerows([HEADER] + rows)
    with open(root / "classes.csv", "w", newline="") as f:
        csv.writer(f).writerows([[f"/m/{n}", n.capitalize()] for n in
                                 ("cat", "dog", "car", "cup", "hat", "pen", "bat", "box")])
    for name in ["aaa", "pos"] + [f"b{k}" for k in range(5)]:
        Image.new("RGB", (W, H), (10, 10, 10)).save(images / f"{name}.jpg")
    return root


def test_filter_keeps_and_drops_exactly_by_the_rules(tmp_path):
    from fuselip_med.eval.oi_build import read_boxes

    root = write_set(tmp_path)
    boxes, skipped = read_boxes(root / "boxes.csv", {n: (W, H) for n in ["aaa", "pos"] + [f"b{k}" for k in range(5)]})
    kept, dropped = filter_boxes(boxes, OIRules())
    assert not skipped
    aaa = [(b.label, b.x0) for b in kept if b.image == "aaa"]
    assert aaa == [("/m/cat", 10), ("/m/dog", 200), ("/m/car", 400), ("/m/cup", 600), ("/m/hat", 800)]
    reasons = {(b.label, round(b.x0)): why for b, why in dropped.items()}
    assert reasons == {("/m/pen", 10): "small", ("/m/bat", 200): "aspect", ("/m/cat", 10): "group/depiction/inside",
                       ("/m/dog", 300): "group/depiction/inside", ("/m/box", 600): "overlap",
                       ("/m/box", 610): "overlap"}
    assert len(kept) == 5 + 5 + 2


def test_builder_writes_the_released_format_and_counts(tmp_path):
    root = write_set(tmp_path)
    script = Path(__file__).resolve().parent.parent / "data_tools" / "build_oi_tasks.py"
    done = subprocess.run([sys.executable, str(script), "--boxes", str(root / "boxes.csv"), "--classes",
                           str(root / "classes.csv"), "--images", str(root / "test"), "--out", str(root)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    counts = json.loads(done.stdout)
    assert counts["kept"] == 12 and counts["oi_crop_samples"] == 1 and counts["oi_pos_samples"] == 1
    crop = json.loads((root / "oi-crop.json").read_text())
    assert crop["meta"]["subset"] == "test" and crop["meta"]["iou_thresh"] == 0.6
    (sample,) = crop["data"]
    assert (sample["query_img"], sample["query_target"]) == ("aaa.jpg", "Cat")
    cands = sample["retrieval_samples"]
    assert len(cands) == 10 and cands[0]["bbox"] == {"XMin": 10.0, "XMax": 110.0, "YMin": 10.0, "YMax": 110.0}
    assert [c["ImageID"] for c in cands[1:5]] == ["aaa.jpg"] * 4 and {c["LabelName"] for c in cands[1:5]} == {
        "Dog", "Car", "Cup", "Hat"}
    assert sorted(c["ImageID"] for c in cands[5:]) == [f"b{k}.jpg" for k in range(5)]
    pos = json.loads((root / "oi-pos.json").read_text())["data"]
    (dog,) = pos["Dog"]
    assert dog["query_target"] in ("The dog on the left", "The dog on the right")
    boxes = [c["bbox"] for c in dog["retrieval_samples"]]
    # left dog (300..400): 290 px free on its left -> a 290 px square centred on y = 350
    # right dog (600..800): 190 px free on its right -> a 190 px square centred on y = 300
    assert boxes[2:] == [{"XMin": 0, "XMax": 290, "YMin": 205, "YMax": 495},
                         {"XMin": 810, "XMax": 1000, "YMin": 205, "YMax": 395}]
    left_named = dog["query_target"].endswith("left")
    assert boxes[0]["XMin"] == (300.0 if left_named else 600.0)


def test_decoy_falls_back_to_above_and_avoids_instances():
    rules = OIRules()
    near_border = Box("x", "d", 5, 300, 200, 500)
    other = Box("x", "d", 600, 100, 700, 200)
    decoy = decoys_for(near_border, "left", [near_border, other], (1000, 800), rules)
    assert (decoy.x0, decoy.y0, decoy.x1, decoy.y1) == (0, 0, 290, 290)  # no room on the left: above it
    blocked = Box("x", "d", 0, 0, 1000, 290)
    assert decoys_for(Box("x", "d", 5, 300, 200, 790), "left", [blocked], (1000, 800), rules) is None
