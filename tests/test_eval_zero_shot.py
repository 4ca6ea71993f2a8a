"""``eval --data folder=DIR|csv=FILE --labels labels.txt``: zero-shot classification with the user's classes."""
import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import fuselip_med.cli as cli
from fuselip_med.eval.runner import run_evaluation
from fuselip_med.eval.tasks.zero_shot import RADIOLOGY_TEMPLATES, read_labels, read_templates
from tests.planted import PlantedModel, color_id, solid_image

CLASSES = ["nodule", "effusion", "fracture"]
# image colour -> the class the planted model "sees" (the second nodule image is misread as a fracture)
IMAGES = {"nodule": [(10, 0, 0), (11, 0, 0)], "effusion": [(20, 0, 0)], "fracture": [(30, 0, 0)]}
SEEN = {(10, 0, 0): "nodule", (11, 0, 0): "fracture", (20, 0, 0): "effusion", (30, 0, 0): "fracture"}


def one_hot(k, dim=32):
    v = torch.zeros(dim)
    v[k] = 1.0
    return v


def planted():
    def text_fn(text):
        hits = [k for k, c in enumerate(CLASSES) if c in text]
        return one_hot(hits[0]) if hits else one_hot(31)

    return PlantedModel(image_fn=lambda i: one_hot(CLASSES.index(SEEN[tuple(i.to_bytes(3, "big"))])),
                        text_fn=text_fn)


def folder_per_class(root):
    for label, colours in IMAGES.items():
        (root / label).mkdir(parents=True)
        for j, rgb in enumerate(colours):
            solid_image(root / label / f"img{j}.png", rgb)
    return root


def check_metrics(task):
    m = task["metrics"]
    assert m["accuracy"] == pytest.approx(3 / 4)
    assert m["balanced_accuracy"] == pytest.approx((1 / 2 + 1 + 1) / 3)
    assert m["macro_f1"] == pytest.approx((2 / 3 + 1 + 2 / 3) / 3)
    assert m["chance_accuracy"] == pytest.approx(1 / 3)
    assert task["confusion_matrix"] == {"labels": CLASSES, "counts": [[1, 0, 1], [0, 1, 0], [0, 0, 1]]}


@pytest.fixture
def use_planted(monkeypatch):
    model = planted()
    monkeypatch.setattr(cli.common, "load_inference_model", lambda name, device, base=None: (model, None, None))
    return model


def test_folder_per_class_with_labels_file(tmp_path, use_planted):
    data = folder_per_class(tmp_path / "xrays")
    (tmp_path / "labels.txt").write_text("# my classes\nnodule\neffusion\n\nfracture\n")
    out = tmp_path / "out"
    result = CliRunner().invoke(cli.app, ["eval", "-m", "planted", "--data", f"folder={data}", "--labels",
                                          str(tmp_path / "labels.txt"), "--out", str(out), "--num-workers", "0"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "metrics.json").read_text())
    assert list(report["tasks"]) == ["zero-shot"]
    task = report["tasks"]["zero-shot"]
    check_metrics(task)
    assert task["templates"] == list(RADIOLOGY_TEMPLATES) and task["n"] == 4
    assert (out / "plots" / "zero-shot_confusion_matrix.png").is_file()


def test_csv_label_column_and_templates_file(tmp_path, use_planted):
    rows = ["path,label"]
    for label, colours in IMAGES.items():
        for j, rgb in enumerate(colours):
            rows.append(f"{solid_image(tmp_path / f'{label}{j}.png', rgb).name},{label}")
    rows.append("extra.png,pneumothorax")  # not in labels.txt: skipped and counted
    solid_image(tmp_path / "extra.png", (40, 0, 0))
    (tmp_path / "table.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "labels.txt").write_text("\n".join(CLASSES) + "\n")
    (tmp_path / "prompts.txt").write_text("a chest film with {}\n{c} on CT\n")
    out = tmp_path / "out"
    result = CliRunner().invoke(cli.app, ["eval", "-m", "planted", "--data", f"csv={tmp_path / 'table.csv'}",
                                          "--labels", str(tmp_path / "labels.txt"), "--templates",
                                          str(tmp_path / "prompts.txt"), "--out", str(out), "--num-workers", "0"])
    assert result.exit_code == 0, result.output
    task = json.loads((out / "metrics.json").read_text())["tasks"]["zero-shot"]
    check_metrics(task)
    assert task["templates"] == ["a chest film with {c}", "{c} on CT"]
    assert task["skipped"] == {"label not in --labels": 1}
    assert (task["n_listed"], task["n_evaluated"]) == (5, 4)  # the skipped row counted once


def test_classes_default_to_the_labels_found(tmp_path):
    data = folder_per_class(tmp_path / "xrays")
    out = run_evaluation(planted(), ["zero-shot"], {"folder": str(data)}, tmp_path / "o", progress=False)
    assert out["tasks"]["zero-shot"]["classes"] == sorted(CLASSES)


def test_untrained_tiny_model_is_near_chance(tmp_path):
    from fuselip_med.core.fuselip import FuseLIP, FuseLIPConfig

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    root = tmp_path / "xrays"
    for c in CLASSES:
        (root / c).mkdir(parents=True)
        for j in range(6):
            solid_image(root / c / f"{j}.png", tuple(int(x) for x in rng.integers(0, 256, 3)))
    out = run_evaluation(FuseLIP(FuseLIPConfig.from_size("tiny")).eval(), ["zero-shot"], {"folder": str(root)},
                         tmp_path / "o", progress=False, batch_size=32)
    acc = out["tasks"]["zero-shot"]["metrics"]["accuracy"]
    assert 0.0 <= acc <= 0.75  # 18 images, 3 classes: chance 1/3; a trained-looking score would be a bug


def test_label_and_template_files_are_checked(tmp_path):
    (tmp_path / "l.txt").write_text("a\nb\na\n")
    with pytest.raises(ValueError, match="more than once"):
        read_labels(tmp_path / "l.txt")
    (tmp_path / "t.txt").write_text("no placeholder\n")
    with pytest.raises(ValueError, match="no {c}"):
        read_templates(tmp_path / "t.txt")
    with pytest.raises(ValueError, match="does not exist"):
        read_labels(tmp_path / "missing.txt")
    assert color_id((1, 2, 3)) == 65536 + 2 * 256 + 3


def test_a_labels_column_scores_single_label_rows_and_names_multi_label_ones(tmp_path, use_planted):
    """The README's `labels` column (`;`-joined): one label is a class, several are a named skip pointing to the
    findings task, and no message or class name is a Python list repr."""
    rows = ["path,labels"]
    for label, colours in IMAGES.items():
        for j, rgb in enumerate(colours):
            rows.append(f"{solid_image(tmp_path / f'{label}{j}.png', rgb).name},{label}")
    rows.append(f"{solid_image(tmp_path / 'both.png', (40, 0, 0)).name},nodule;effusion")
    (tmp_path / "table.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    out = tmp_path / "out"
    for field in ("label", "labels"):
        result = CliRunner().invoke(cli.app, ["eval", "-m", "planted", "--data", f"csv={tmp_path / 'table.csv'}",
                                              "--labels", str(tmp_path / "classes.txt"), "--label-column", field,
                                              "--out", str(out), "--num-workers", "0"])
        assert result.exit_code == 0, result.output
        task = json.loads((out / "metrics.json").read_text())["tasks"]["zero-shot"]
        check_metrics(task)
        assert task["classes"] == CLASSES
        assert task["skipped"] == {"several labels (a multi-label row: the findings task scores each label)": 1}
        assert "findings task" in result.output


def test_rows_whose_image_is_missing_are_named_counted_and_held_to_the_half_rule(tmp_path, use_planted):
    """A CSV listing images that do not exist: before, the missing rows vanished (n 2 of 5 listed, skipped {} and
    an empty skipped.csv) and the accuracy looked like a full run. Now the half rule refuses the run naming them,
    and with --allow-partial every missing row is in metrics.json and skipped.csv."""
    rows = ["path,label", f"{solid_image(tmp_path / 'n.png', (10, 0, 0)).name},nodule",
            f"{solid_image(tmp_path / 'e.png', (20, 0, 0)).name},effusion",
            "gone1.png,nodule", "gone2.png,effusion", "gone3.png,fracture"]
    (tmp_path / "table.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "labels.txt").write_text("\n".join(CLASSES) + "\n")
    command = ["eval", "-m", "planted", "--data", f"csv={tmp_path / 'table.csv'}", "--labels",
               str(tmp_path / "labels.txt"), "--num-workers", "0"]
    refused = CliRunner().invoke(cli.app, [*command, "--out", str(tmp_path / "refused")])
    message = " ".join(refused.output.split())
    assert refused.exit_code == 1 and "only 2 of the 5 rows" in message and "gone1.png" in message
    partial = CliRunner().invoke(cli.app, [*command, "--out", str(tmp_path / "out"), "--allow-partial"])
    assert partial.exit_code == 0, partial.output
    task = json.loads((tmp_path / "out" / "metrics.json").read_text())["tasks"]["zero-shot"]
    assert (task["n_listed"], task["n_evaluated"], task["skipped"]) == (5, 2, {"missing image": 3})
    named = (tmp_path / "out" / "skipped.csv").read_text()
    assert all(f"gone{k}.png" in named for k in (1, 2, 3))


def test_a_task_whose_data_lacks_what_it_needs_is_one_error_line(tmp_path, use_planted):
    """`eval --data folder=DIR` (the default tasks include rocov2-modality) on captioned images without a
    modality label was a ValueError traceback; the tasks' data errors are InputErrors (still ValueErrors)."""
    (tmp_path / "imgs").mkdir()
    for k, rgb in enumerate(((10, 0, 0), (20, 0, 0))):
        solid_image(tmp_path / "imgs" / f"i{k}.png", rgb)
        (tmp_path / "imgs" / f"i{k}.png.txt").write_text("a chest radiograph")
    result = CliRunner().invoke(cli.app, ["eval", "-m", "planted", "--data", f"folder={tmp_path / 'imgs'}",
                                          "--tasks", "rocov2-modality", "--out", str(tmp_path / "out"),
                                          "--num-workers", "0"])
    assert result.exit_code == 1, result.output
    last = result.output.strip().splitlines()[-1]
    assert "Traceback" not in result.output and last.startswith("error:") and "modality label" in last
