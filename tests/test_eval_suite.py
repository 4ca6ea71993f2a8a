"""The paper suite: each benchmark read from a fixture in its publisher's format, scored by a model with planted
embeddings (exact expected values), and the whole suite through ``eval --suite paper --data-root``."""
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image, ImageDraw
from typer.testing import CliRunner

import fuselip_med.cli as cli
from fuselip_med.eval.runner import run_evaluation
from fuselip_med.eval.suite import PAPER_COLUMNS
from fuselip_med.eval.tasks.mmeb import clean_text
from tests.planted import PlantedModel, solid_image

DIM = 32


def e(k, scale=1.0):
    v = torch.zeros(DIM)
    v[k] = scale
    return v


# ------------------------------------------------------------------------------------------------- MMEB
IMAGENET_INST = "<|image_1|>\nRepresent the given image for classification"


def write_mmeb(root):
    """ImageNet-1K (parquet, 3 queries) and VisDial (jsonl, 2 text queries) in the MMEB-eval layout."""
    (root / "ImageNet-1K").mkdir(parents=True)
    (root / "eval_images" / "ImageNet-1K").mkdir(parents=True)
    for k in range(3):
        solid_image(root / "eval_images" / "ImageNet-1K" / f"q{k}.png", (50 + k, 0, 0))
    rows = {"qry_text": [IMAGENET_INST] * 3,
            "qry_img_path": [f"ImageNet-1K/q{k}.png" for k in range(3)],
            "tgt_text": [["cat, house cat", "dog", "bird"], ["dog", "cat, house cat", "bird"],
                         ["bird", "cat, house cat", "dog"]],
            "tgt_img_path": [["", "", ""]] * 3}
    pq.write_table(pa.table(rows), root / "ImageNet-1K" / "test-00000-of-00001.parquet")
    (root / "eval_images" / "VisDial").mkdir(parents=True)
    for k in range(3):
        solid_image(root / "eval_images" / "VisDial" / f"t{k}.png", (60 + k, 0, 0))
    with open(root / "VisDial.jsonl", "w") as f:
        for q, order in (("a dialogue about image zero", [0, 1, 2]), ("a dialogue about image one", [1, 2, 0])):
            f.write(json.dumps({"qry_text": f"Represent the given dialogue about an image, which is used for image "
                                            f"retrieval: {q}", "qry_img_path": "",
                                "tgt_text": ["<|image_1|>\nRepresent the given image."] * 3,
                                "tgt_img_path": [f"VisDial/t{k}.png" for k in order]}) + "\n")
    return root


def mmeb_model():
    # ImageNet queries: image 50 -> cat (right), 51 -> bird (wrong, the answer is dog), 52 -> bird (right)
    images = {50 * 65536: e(0), 51 * 65536: e(2), 52 * 65536: e(2), 60 * 65536: e(5), 61 * 65536: e(6),
              62 * 65536: e(7)}
    names = {"a photo of a cat": e(0), "a photo of a dog": e(1), "a photo of a bird": e(2),
             "a dialogue about image zero": e(5), "a dialogue about image one": e(7)}  # query 2 wrong

    def pair(i, t):
        assert t == "", t  # FuseLIP has no chat prompt: the instruction is removed
        return images[i]

    return PlantedModel(image_fn=lambda i: images[i], text_fn=lambda t: names[t], pair_fn=pair)


def test_mmeb_precision_at_1_and_categories(tmp_path):
    root = write_mmeb(tmp_path / "MMEB-eval")
    out = run_evaluation(mmeb_model(), ["mmeb"], {"mmeb": str(root)}, tmp_path / "o", progress=False)
    task = out["tasks"]["mmeb"]
    assert task["per_subset"]["ImageNet-1K"]["precision_at_1"] == pytest.approx(2 / 3)
    assert task["per_subset"]["VisDial"]["precision_at_1"] == pytest.approx(1 / 2)
    assert task["metrics"] == pytest.approx({"Classification": 2 / 3, "Retrieval": 1 / 2, "Overall": 7 / 12})
    assert task["n"] == 5 and "Grounding" not in task["metrics"] and len(task["missing_subsets"]) == 34


def test_mmeb_instructions_are_removed_as_the_paper_does():
    assert clean_text(IMAGENET_INST, "ImageNet-1K", candidate=False) == ""
    assert clean_text("cat, house cat", "ImageNet-1K", candidate=True) == "a photo of a cat"
    assert clean_text("Canada", "Country211", candidate=True) == "this is in the country of Canada"
    hateful = ("<|image_1|>\nRepresent the given image for binary classification to determine whether it "
               "constitutes hateful speech or not")
    assert clean_text(hateful, "HatefulMemes", candidate=False) == "Is this image hateful?"


# ------------------------------------------------------------------------------------------------- ImageNet
def write_imagenet(root):
    for wnid, k in (("n01440764", 0), ("n01443537", 1), ("n01440764", 2)):
        (root / "val" / wnid).mkdir(parents=True, exist_ok=True)
        solid_image(root / "val" / wnid / f"ILSVRC2012_val_{k}.png", (70 + k, 0, 0))
    return root


def imagenet_model():
    images = {70 * 65536: e(0), 71 * 65536: e(0) * 0.9 + e(1) * 0.1, 72 * 65536: e(0)}

    def text(t):
        return e(0) if "tench" in t else e(1) if "goldfish" in t else e(31)

    return PlantedModel(image_fn=lambda i: images[i], text_fn=text)


def test_imagenet_top1_top5_with_80_templates(tmp_path):
    from fuselip_med.eval.tasks.imagenet import imagenet_classes, imagenet_templates

    assert len(imagenet_classes()) == 1000 and len(imagenet_templates()) == 80
    out = run_evaluation(imagenet_model(), ["imagenet"], {"imagenet": str(write_imagenet(tmp_path / "imagenet"))},
                         tmp_path / "o", progress=False, batch_size=512)
    task = out["tasks"]["imagenet"]
    assert task["metrics"] == pytest.approx({"top1": 2 / 3, "top5": 1.0}) and task["n"] == 3


# ------------------------------------------------------------------------------------------------- SugarCrepe
def write_sugarcrepe(root, subsets=("add_obj", "swap_att")):
    (root / "val2017").mkdir(parents=True)
    solid_image(root / "val2017" / "000000000139.jpg", (90, 0, 0))
    for subset in subsets:
        entries = {"0": {"filename": "000000000139.jpg", "caption": "good one", "negative_caption": "bad one"},
                   "1": {"filename": "000000000139.jpg", "caption": "bad two", "negative_caption": "good two"}}
        if subset in ("add_obj", "add_ent"):
            entries["2"] = {"filename": "000000000139.jpg", "caption": "good three", "negative_caption": "bad three"}
        (root / f"{subset}.json").write_text(json.dumps(entries))
    return root


def sugarcrepe_model():
    def image(i):
        if abs((i >> 16) - 90) > 3:  # the JPEG's colour, give or take compression
            raise KeyError(i)
        return e(0)

    def text(t):
        if not t.startswith(("good", "bad")):
            raise KeyError(t)
        return e(0) if t.startswith("good") else e(1)

    return PlantedModel(image_fn=image, text_fn=text)


def test_sugarcrepe_positive_must_outscore_negative(tmp_path):
    out = run_evaluation(sugarcrepe_model(), ["sugarcrepe"], {"sugarcrepe": str(write_sugarcrepe(tmp_path / "sc"))},
                         tmp_path / "o", progress=False)
    m = out["tasks"]["sugarcrepe"]["metrics"]
    assert m["add_obj_accuracy"] == pytest.approx(2 / 3) and m["swap_att_accuracy"] == pytest.approx(1 / 2)
    assert m["mean_accuracy"] == pytest.approx(7 / 12)


# ------------------------------------------------------------------------------------------------- OI tasks
BOXES = [(10, 10, 60, 60, (200, 0, 0)), (100, 10, 150, 60, (0, 200, 0)), (10, 100, 60, 150, (0, 0, 200))]


def write_oi(root):
    """Two images with coloured boxes and an OI-Crop task file (3 samples) in the released format."""
    (root / "test").mkdir(parents=True)
    for name in ("aaa.jpg", "bbb.jpg"):
        image = Image.new("RGB", (200, 170), (5, 5, 5))
        draw = ImageDraw.Draw(image)
        for x0, y0, x1, y1, rgb in BOXES:
            draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=rgb if name == "aaa.jpg" else tuple(c // 2 for c in rgb))
        image.save(root / "test" / name.replace(".jpg", ".png"), format="PNG")

    def box(image, k):
        x0, y0, x1, y1, _ = BOXES[k]
        return {"ImageID": image, "LabelName": f"L{k}", "bbox": {"XMin": x0, "XMax": x1, "YMin": y0, "YMax": y1}}

    data = [{"query_img": "aaa.png", "query_target": f"object {k}",
             "retrieval_samples": [box("aaa.png", k)] + [box("aaa.png", j) for j in range(3) if j != k]
             + [box("bbb.png", k)]} for k in range(3)]
    (root / "oi-crop.json").write_text(json.dumps({"meta": {"subset": "test", "length": 3}, "data": data}))
    pos = {"Thing": [dict(data[0], query_target="The thing on the left", label="Thing")]}
    (root / "oi-pos.json").write_text(json.dumps({"meta": {"subset": "test", "length": 1}, "data": pos}))
    return root


def oi_model():
    crops = {200 * 65536: e(0), 200 * 256: e(1), 200: e(2), 100 * 65536: e(10), 100 * 256: e(11), 100: e(12)}
    texts = {"object 0": e(0), "object 1": e(2), "object 2": e(2), "The thing on the left": e(0)}  # 'object 1' wrong
    return PlantedModel(pair_fn=lambda i, t: texts[t] if t else crops[i])


def test_oi_crop_and_pos_accuracy(tmp_path):
    root = write_oi(tmp_path / "open_images")
    out = run_evaluation(oi_model(), ["oi-crop", "oi-pos"], {"oi_crop": str(root / "oi-crop.json"),
                                                             "oi_pos": str(root / "oi-pos.json")},
                         tmp_path / "o", progress=False)
    assert out["tasks"]["oi-crop"]["metrics"]["accuracy"] == pytest.approx(2 / 3)
    assert out["tasks"]["oi-crop"]["n_candidates"] == [4]
    assert out["tasks"]["oi-pos"]["metrics"]["accuracy"] == 1.0


# ------------------------------------------------------------------------------------------------- VG-Crop
def write_vg(root):
    (root / "images").mkdir(parents=True)
    entries = []
    for image_id in (1, 2):
        image = Image.new("RGB", (200, 170), (5, 5, 5))
        draw = ImageDraw.Draw(image)
        regions = []
        for k, (x0, y0, x1, y1, rgb) in enumerate(BOXES):
            draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=rgb if image_id == 1 else tuple(c // 2 for c in rgb))
            regions.append({"region_id": 10 * image_id + k, "image_id": image_id, "phrase": f"region {image_id} {k}",
                            "x": x0, "y": y0, "width": x1 - x0, "height": y1 - y0})
        regions.append({"region_id": 99, "image_id": image_id, "phrase": "tiny", "x": 0, "y": 0, "width": 8,
                        "height": 8})  # w, h <= 32 px: filtered out
        image.save(root / "images" / f"{image_id}.png", format="PNG")
        entries.append({"id": image_id, "regions": regions})
    (root / "region_descriptions_test.json").write_text(json.dumps(entries))
    return root


def vg_model():
    crops = {200 * 65536: e(0), 200 * 256: e(1), 200: e(2), 100 * 65536: e(3), 100 * 256: e(4), 100: e(5)}
    texts = {"region 1 0": e(0), "region 1 1": e(1), "region 1 2": e(1), "region 2 0": e(3), "region 2 1": e(4),
             "region 2 2": e(5)}  # one of six wrong
    return PlantedModel(pair_fn=lambda i, t: texts[t] if t else crops[i])


def test_vg_crop_accuracy(tmp_path):
    data = {"vg_crop": str(write_vg(tmp_path / "visual_genome"))}
    out = run_evaluation(vg_model(), ["vg-crop", "vg-crop-multi"], data, tmp_path / "o", progress=False)["tasks"]
    multi, official = out["vg-crop-multi"], out["vg-crop"]
    assert multi["metrics"]["accuracy"] == pytest.approx(5 / 6) and multi["n_images"] == 2 and multi["n"] == 6
    # the official loop never scores the file's last image: image 1 only, one of its three queries wrong
    assert official["metrics"]["accuracy"] == pytest.approx(2 / 3) and official["n_images"] == 1


# ------------------------------------------------------------------------------------------------- the suite
def test_paper_suite_through_the_cli(tmp_path, monkeypatch):
    root = tmp_path / "bench"
    write_mmeb(root / "MMEB-eval")
    write_imagenet(root / "imagenet")
    write_vg(root / "visual_genome")
    write_oi(root / "open_images")
    write_sugarcrepe(root / "sugarcrepe")
    models = [mmeb_model(), sugarcrepe_model(), vg_model(), oi_model(), imagenet_model()]  # imagenet: catch-all

    def dispatch(kind):
        def fn(*args):
            for m in models:
                try:
                    return getattr(m, kind)(*args)
                except (KeyError, AssertionError):
                    continue
            return e(31)
        return fn

    model = PlantedModel(image_fn=dispatch("image_fn"), text_fn=dispatch("text_fn"), pair_fn=dispatch("pair_fn"))
    monkeypatch.setattr(cli.common, "load_inference_model", lambda name, device, base=None: (model, None, None))
    out = tmp_path / "out"
    tasks = "mmeb,imagenet,vg-crop,oi-crop,oi-pos,sugarcrepe"
    result = CliRunner().invoke(cli.app, ["eval", "-m", "planted", "--suite", "paper", "--data-root", str(root),
                                          "--tasks", tasks, "--out", str(out), "--num-workers", "0"])
    assert result.exit_code == 0, result.output
    table = json.loads((out / "paper_table.json").read_text())["columns"]
    assert list(table) == list(PAPER_COLUMNS)
    assert table["MMEB Classification"] == pytest.approx(66.67) and table["VG-Crop"] == pytest.approx(66.67)
    assert table["TGIT"] is None and table["SugarCrepe"] == pytest.approx(58.33)
    assert (out / "paper_table.md").read_text().startswith("| model | MMEB Classification (1/10) |")
    assert "SugarCrepe (2/7)" in (out / "paper_table.md").read_text()
    assert (out / "plots" / "paper_table.png").is_file()
    missing = CliRunner().invoke(cli.app, ["eval", "-m", "planted", "--suite", "paper", "--data-root", str(root)])
    assert missing.exit_code == 2 and "tgit" in missing.output and "--tasks" in missing.output


def test_top1_positions_both_paths_match_brute_force():
    from fuselip_med.eval.scoring import pad_candidates, top1_positions

    g = torch.Generator().manual_seed(0)
    targets = torch.nn.functional.normalize(torch.randn(400, 8, generator=g), dim=1)
    queries = torch.nn.functional.normalize(torch.randn(40, 8, generator=g), dim=1)
    for width in (3, 10):  # 40 x 3 candidates from 400 -> gather path; 40 x 10 -> matmul path
        lists = [torch.randperm(400, generator=g)[:width - q % 2].tolist() for q in range(40)]  # ragged
        ids, valid = pad_candidates(lists)
        expected = [int(torch.argmax(targets[c] @ queries[q])) for q, c in enumerate(lists)]
        assert top1_positions(queries, targets, ids, valid, chunk=16).tolist() == expected
    tie = torch.tensor([[1.0, 0.0]])
    assert top1_positions(tie, torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.0, 0.0]]),
                          torch.tensor([[0, 1, 2]])).tolist() == [1]  # ties: the first position wins


def test_untrained_tiny_model_scores_near_chance_on_the_benchmarks(tmp_path):
    from fuselip_med.core.fuselip import FuseLIP, FuseLIPConfig

    torch.manual_seed(0)
    model = FuseLIP(FuseLIPConfig.from_size("tiny")).eval()
    root = tmp_path / "bench"
    data = {"mmeb": str(write_mmeb(root / "MMEB-eval")), "sugarcrepe": str(write_sugarcrepe(root / "sc")),
            "oi_crop": str(write_oi(root / "oi") / "oi-crop.json"), "vg_crop": str(write_vg(root / "vg"))}
    out = run_evaluation(model, ["mmeb", "sugarcrepe", "oi-crop", "vg-crop"], data, tmp_path / "o", progress=False,
                         batch_size=32)["tasks"]
    scores = [out["mmeb"]["metrics"]["Overall"], out["sugarcrepe"]["metrics"]["mean_accuracy"],
              out["oi-crop"]["metrics"]["accuracy"], out["vg-crop"]["metrics"]["accuracy"]]
    chance = [(1 / 3 + 1 / 3) / 2, 1 / 2, 1 / 4, 1 / 3]
    assert all(0.0 <= s <= 1.0 for s in scores)
    assert abs(sum(scores) / 4 - sum(chance) / 4) < 0.35  # the mean over tiny fixtures stays near chance


def test_mmeb_query_with_an_undecodable_image_is_skipped_and_named(tmp_path):
    root = write_mmeb(tmp_path / "MMEB-eval")
    (root / "eval_images" / "NIGHTS").mkdir()
    (root / "eval_images" / "NIGHTS" / "broken.png").write_bytes(b"not a png")
    solid_image(root / "eval_images" / "NIGHTS" / "q.png", (50, 0, 0))
    (root / "NIGHTS.jsonl").write_text(json.dumps({
        "qry_text": "<|image_1|>\nFind a day-to-day image that looks similar to the provided image.",
        "qry_img_path": "NIGHTS/q.png", "tgt_text": ["", ""],
        "tgt_img_path": ["NIGHTS/broken.png", "NIGHTS/q.png"]}) + "\n")
    out = run_evaluation(mmeb_model(), ["mmeb"], {"mmeb": str(root)}, tmp_path / "o", progress=False)
    task = out["tasks"]["mmeb"]
    assert task["per_subset"]["NIGHTS"]["n"] == 0 and sum(task["per_subset"]["NIGHTS"]["skipped"].values()) == 1
    assert task["metrics"]["Retrieval"] == pytest.approx(1 / 2)  # NIGHTS had nothing to score


FIRST_RELEASE = ("add_ent", "add_att", "replace_ent", "replace_att", "replace_rel", "swap_ent", "swap_att")


def test_sugarcrepe_first_release_file_names_are_scored_as_all_seven_subsets(tmp_path):
    root = write_sugarcrepe(tmp_path / "sc", FIRST_RELEASE)
    task = run_evaluation(sugarcrepe_model(), ["sugarcrepe"], {"sugarcrepe": str(root)}, tmp_path / "o",
                          progress=False)["tasks"]["sugarcrepe"]
    assert task["coverage"]["mean_accuracy"] == [7, 7] and not task["missing_subsets"]
    assert task["metrics"]["add_obj_accuracy"] == pytest.approx(2 / 3)
    assert json.loads((tmp_path / "o" / "paper_table.json").read_text())["labels"]["SugarCrepe"] == "SugarCrepe"


def test_a_mean_over_fewer_subsets_is_labelled_and_the_missing_ones_named(tmp_path):
    from fuselip_med.eval.suite import write_suite_table

    root = write_sugarcrepe(tmp_path / "sc", ("add_obj", "swap_att", "replace_att", "replace_rel"))
    report = run_evaluation(sugarcrepe_model(), ["sugarcrepe"], {"sugarcrepe": str(root)}, tmp_path / "o",
                            progress=False)
    write_suite_table(report, tmp_path / "o")
    table = json.loads((tmp_path / "o" / "paper_table.json").read_text())
    assert table["labels"]["SugarCrepe"] == "SugarCrepe (4/7)"
    assert set(table["missing_subsets"]["sugarcrepe"]) == {"replace_obj", "swap_obj", "add_att"}
    assert "no replace_obj.json (nor replace_ent.json)" in table["missing_subsets"]["sugarcrepe"]["replace_obj"]
    markdown = (tmp_path / "o" / "paper_table.md").read_text()
    assert "| SugarCrepe (4/7) |" in markdown and "sugarcrepe left out add_att: no add_att.json" in markdown


def test_an_mmeb_subset_missing_a_column_is_named_not_silently_dropped(tmp_path):
    root = write_mmeb(tmp_path / "MMEB-eval")
    (root / "N24News").mkdir()
    pq.write_table(pa.table({"qry_text": ["a headline"], "qry_img_path": [""], "tgt_text": [["news", "sport"]]}),
                   root / "N24News" / "test-00000-of-00001.parquet")  # no tgt_img_path column
    task = run_evaluation(mmeb_model(), ["mmeb"], {"mmeb": str(root)}, tmp_path / "o",
                          progress=False)["tasks"]["mmeb"]
    assert task["missing_subsets"]["N24News"] == "column tgt_img_path missing"
    assert task["coverage"]["Classification"] == [1, 10] and task["metrics"]["Classification"] == pytest.approx(2 / 3)
    labels = json.loads((tmp_path / "o" / "paper_table.json").read_text())["labels"]
    assert labels["MMEB Classification"] == "MMEB Classification (1/10)"
