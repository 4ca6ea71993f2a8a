"""Issue 29: VG-Crop and TGIT follow the official FuseLIP evaluation protocol (fuse_eval/eval_vg_crop.py,
fuse_eval/eval_augmented_data.py). Expected values are computed here from the rules, not read from the code."""
import json
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image, ImageChops, ImageDraw

from fuselip_med.data.adapters import get_adapter
from fuselip_med.data.transforms.tasks import eval_pools
from fuselip_med.eval.runner import run_evaluation
from fuselip_med.eval.suite import write_suite_table
from fuselip_med.eval.tgit import iter_source_pools, read_row_list
from tests.planted import PlantedModel, color_id

DIM = 32

# image_id -> (regions kept after the filters, which of them the planted model answers wrongly)
# image 2 keeps none (its one region is 8 px wide); image 3 keeps one, answered "wrongly" on purpose: a
# single-candidate query is still correct; image 5 is the file's last image, which the official loop never scores.
LAYOUT = {1: (2, {1}), 2: (0, set()), 3: (1, {0}), 4: (5, {0, 3}), 5: (2, set())}


def e(k):
    v = torch.zeros(DIM)
    v[k] = 1.0
    return v


def region_colour(image_id, k):
    return (40 * image_id, 30 * k + 20, 90)


def write_vg(root):
    (root / "images").mkdir(parents=True)
    entries = []
    for image_id, (n_kept, _) in LAYOUT.items():
        image = Image.new("RGB", (400, 300), (5 * image_id, 5, 5))
        draw = ImageDraw.Draw(image)
        regions = []
        for k in range(n_kept):
            x0, y0 = 10 + 75 * k, 10
            draw.rectangle((x0, y0, x0 + 59, y0 + 59), fill=region_colour(image_id, k))
            regions.append({"region_id": 100 * image_id + k, "image_id": image_id, "phrase": f"r{image_id}.{k}",
                            "x": x0, "y": y0, "width": 60, "height": 60})
        regions.append({"region_id": 100 * image_id + 99, "image_id": image_id, "phrase": "tiny", "x": 0,
                        "y": 200, "width": 8, "height": 8})  # w, h <= 32 px: filtered out
        image.save(root / "images" / f"{image_id}.png")
        entries.append({"id": image_id, "regions": regions})
    (root / "region_descriptions_test.json").write_text(json.dumps(entries))
    return root


def vg_model():
    slot = {}
    for image_id, (n_kept, _) in LAYOUT.items():
        for k in range(n_kept):
            slot[(image_id, k)] = len(slot)
    crops = {color_id(region_colour(i, k)): e(j) for (i, k), j in slot.items()}
    texts = {}
    for (i, k), j in slot.items():
        wrong = k in LAYOUT[i][1]
        texts[f"r{i}.{k}"] = e((j + 1) % len(slot) if wrong and LAYOUT[i][0] > 1 else j + 20 if wrong else j)
    return PlantedModel(pair_fn=lambda i, t: texts[t] if t else crops[i])


def expected(images):
    n = sum(LAYOUT[i][0] for i in images)
    correct = sum(LAYOUT[i][0] - (len(LAYOUT[i][1]) if LAYOUT[i][0] > 1 else 0) for i in images)
    return n, correct


@pytest.mark.parametrize("task, vg_images, images", [
    ("vg-crop", 100, [1, 3, 4]),  # >= 1 kept region, file order, the last image (5) never reached
    ("vg-crop", 2, [1, 3]),  # the first vg_images such images
    ("vg-crop-multi", 100, [1, 4, 5]),  # the stricter variant: >= 2 regions, the last image included
])
def test_vg_crop_image_selection_denominator_and_correct_count(tmp_path, task, vg_images, images):
    out = run_evaluation(vg_model(), [task], {"vg_crop": str(write_vg(tmp_path / "vg"))}, tmp_path / "o",
                         progress=False, vg_images=vg_images)["tasks"][task]
    n, correct = expected(images)
    assert (out["n_images"], out["n"], out["n_correct"]) == (len(images), n, correct)
    assert out["metrics"]["accuracy"] == pytest.approx(correct / n)
    assert out["n_single_region_images"] == sum(LAYOUT[i][0] == 1 for i in images)
    assert ("official" in out["protocol"]) == (task == "vg-crop")


def test_tgit_flip_pool_has_the_reference_structure():
    x = Image.fromarray(np.random.default_rng(0).integers(0, 255, (256, 256, 3), dtype=np.uint8))
    flips = {"horizontal flip": lambda im: im.transpose(Image.FLIP_LEFT_RIGHT),
             "vertical flip": lambda im: im.transpose(Image.FLIP_TOP_BOTTOM)}
    seen_orders = set()
    rng = np.random.default_rng(3)
    for _ in range(8):
        pool = eval_pools(x, "tgit", rng, flip_eval="reference")["flip"]
        assert len(pool) == 4
        first, second = pool[0].prompt, pool[2].prompt
        assert {first, second} == set(flips)
        seen_orders.add(first)

        def same(a, b):
            return ImageChops.difference(a.convert("RGB"), b.convert("RGB")).getbbox() is None

        # [first flip of x, x, second flip of x, x]; the query is x with the first flip's prompt
        assert same(pool[0].target_image, flips[first](x)) and same(pool[1].target_image, x)
        assert same(pool[2].target_image, flips[second](x)) and same(pool[3].target_image, x)
        assert same(pool[0].source_image, x)
    assert len(seen_orders) == 2  # the flips come in random order


def write_cc_csv(root, n_rows, missing):
    root.mkdir(parents=True)
    lines = ["path,caption"]
    for r in range(n_rows):
        if r not in missing:
            Image.new("RGB", (64, 64), (10 * r, 100, 50)).save(root / f"img{r}.png")
        lines.append(f"img{r}.png,caption of row {r}")
    (root / "val.csv").write_text("\n".join(lines) + "\n")
    return root / "val.csv"


def test_a_supplied_row_list_selects_exactly_those_rows_in_its_order(tmp_path):
    csv = write_cc_csv(tmp_path / "cc3m", 8, missing={2})
    source = get_adapter("cc")(str(csv), split="validation")
    assert len(source) == 7  # row 2 has no image: the positions after it are shifted
    listing = tmp_path / "rows.txt"
    listing.write_text("[6, 0, 2, 3, 7]")
    skipped = Counter()
    ids = [sid for sid, _ in iter_source_pools(source, rows=read_row_list(listing), n_images=4, skipped=skipped)]
    assert ids == ["img6", "img0", "img3"]  # the first 4 listed rows, row 2 missing and named
    assert skipped == {"listed row missing": 1}


def test_the_official_row_list_is_shipped_and_valid():
    rows = read_row_list("official")
    assert len(rows) == 1000 and len(set(rows)) == 1000 and max(rows) == 13441 and rows[:3] == [5981, 10040, 6898]
    with pytest.raises(ValueError, match="row numbers"):
        read_row_list(__file__)


def test_tgit_task_uses_the_reference_pools_and_rows_and_the_table_labels_them(tmp_path):
    csv = write_cc_csv(tmp_path / "cc3m", 6, missing=set())
    (tmp_path / "rows.txt").write_text("5\n1\n")
    model = PlantedModel()
    data = {"tgit:cc": str(csv)}
    out = run_evaluation(model, ["tgit", "tgit-unique", "vg-crop"],
                         {**data, "vg_crop": str(write_vg(tmp_path / "vg"))}, tmp_path / "o", progress=False,
                         tgit_rows=str(tmp_path / "rows.txt"))
    tgit, unique = out["tasks"]["tgit"], out["tasks"]["tgit-unique"]
    assert tgit["flip_eval"] == "reference" and unique["flip_eval"] == "unique"
    assert tgit["n_images"] == 2 and "official flip pools" in tgit["protocol"] and "rows.txt" in tgit["protocol"]
    assert "not the paper's" in unique["protocol"]
    write_suite_table(out, tmp_path / "o")
    table = json.loads((tmp_path / "o" / "paper_table.json").read_text())
    assert set(table["protocols"]) == {"VG-Crop", "TGIT"}
    md = (tmp_path / "o" / "paper_table.md").read_text()
    assert "- VG-Crop: official" in md and "- TGIT: official flip pools" in md


def test_eval_cli_reads_tgit_rows_before_any_work(tmp_path):
    from typer.testing import CliRunner

    import fuselip_med.cli as cli

    bad = tmp_path / "rows.txt"
    bad.write_text("[1, 1]")
    result = CliRunner().invoke(cli.app, ["eval", "-m", "tiny", "-t", "tgit", "-d", f"tgit:cc={tmp_path}",
                                          "--tgit-rows", str(bad)])
    assert result.exit_code == 2 and "more than once" in result.output and "Traceback" not in result.output


def test_tgit_rows_are_read_once_for_all_tasks(tmp_path, monkeypatch):
    import fuselip_med.eval.tgit as tgit

    csv = write_cc_csv(tmp_path / "cc3m", 6, missing=set())
    (tmp_path / "rows.txt").write_text("5\n1\n")
    reads = []
    real = tgit.read_row_list
    monkeypatch.setattr(tgit, "read_row_list", lambda spec: reads.append(spec) or real(spec))
    out = run_evaluation(PlantedModel(), ["tgit", "tgit-unique"], {"tgit:cc": str(csv)}, tmp_path / "o",
                         progress=False, tgit_rows=str(tmp_path / "rows.txt"))
    assert len(reads) == 1
    assert out["tasks"]["tgit"]["n_images"] == out["tasks"]["tgit-unique"]["n_images"] == 2
