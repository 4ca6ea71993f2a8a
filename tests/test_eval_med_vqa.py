"""Medical VQA as retrieval: VQA-RAD JSON, SLAKE JSON + imgs/, PathVQA parquet, PMC-VQA CSV, as published; planted
answers give exact accuracy and R@k."""
import io
import json

import pytest
import torch
from PIL import Image

from fuselip_med.eval.runner import run_evaluation
from tests.planted import PlantedModel, solid_image

ANSWERS = ["yes", "no", "left", "right", "brain", "ct", "2", "lung", "a", "b", "c", "d"]
# question -> the answers the planted model leans to, strongest first (one-hot answer vectors: exact ranks)
PLAN = {
    "Is there a fracture?": ["yes"], "Is this the left or right kidney?": ["right"], "Is the liver normal?": ["yes"],
    "What organ is shown?": ["brain"], "What modality is this?": ["brain", "ct"], "How many lesions?": ["brain", "ct",
                                                                                                      "yes"],
    "Which side is the mass on?": ["right"],
}


def one_hot(name):
    v = torch.zeros(32)
    v[ANSWERS.index(name.lower()) if name.lower() in ANSWERS else 31] = 1.0
    return v


def planted():
    def pair_fn(_, question):
        v = torch.zeros(32)
        for k, name in enumerate(PLAN.get(question, ["lung"])):
            v += one_hot(name) * 0.5 ** k
        return v

    return PlantedModel(text_fn=one_hot, pair_fn=pair_fn)


def vqa_rad_row(qid, image, question, answer, answer_type, qtype, phrase="test_freeform"):
    """One object of 'VQA_RAD Dataset Public.json' with every published field."""
    return {"qid": qid, "image_name": image, "image_case_url": f"https://medpix.nlm.nih.gov/case?id={qid}",
            "image_organ": "HEAD", "answer": answer, "answer_type": answer_type, "question_type": qtype,
            "question": question, "question_rephrase": "NULL", "question_relation": "NULL", "question_frame": "NULL",
            "phrase_type": phrase, "qid_linked_id": f"0{qid}", "evaluation": "not evaluated"}


def write_vqa_rad(root, extra=()):
    images = root / "VQA_RAD Image Folder"
    images.mkdir(parents=True)
    for k, name in enumerate(("synpic54610.jpg", "synpic29265.jpg", "synpic42202.jpg")):
        solid_image(images / name, (40 + k, 0, 0), fmt="PNG")
    rows = [vqa_rad_row(1, "synpic54610.jpg", "Is there a fracture?", "Yes", "CLOSED", "PRES"),
            vqa_rad_row(2, "synpic54610.jpg", "Is this the left or right kidney?", "left", "CLOSED", "POS"),
            vqa_rad_row(3, "synpic29265.jpg", "Is the liver normal?", "no", "CLOSED", "ABN"),
            vqa_rad_row(4, "synpic29265.jpg", "What organ is shown?", "brain", "OPEN", "ORGAN"),
            vqa_rad_row(5, "synpic42202.jpg", "What modality is this?", "CT", "OPEN", "MODALITY"),
            vqa_rad_row(6, "synpic42202.jpg", "How many lesions?", 2, "OPEN", "COUNT"),
            vqa_rad_row(7, "synpic54610.jpg", "Which side is the mass on?", "right", "CLOSED", "POS"),
            vqa_rad_row(8, "synpic54610.jpg", "Is there a fracture?", "Yes", "CLOSED", "PRES", phrase="freeform"),
            *extra]
    (root / "VQA_RAD Dataset Public.json").write_text(json.dumps(rows, indent=1))
    return root


def test_vqa_rad_exact_scores(tmp_path):
    root = write_vqa_rad(tmp_path / "VQA_RAD")
    out = run_evaluation(planted(), ["vqa-rad"], {"vqa_rad": str(root)}, tmp_path / "out", progress=False)
    res = out["tasks"]["vqa-rad"]
    m = res["metrics"]
    assert res["n"] == 7 and res["n_listed"] == 7 and res["pool_size"] == 7  # the train-phrase row is not listed
    assert m["closed_accuracy"] == pytest.approx(2 / 4)  # yes right, right-vs-left wrong, liver wrong, side right
    assert m["open_R@1"] == pytest.approx(1 / 3)  # ranks 0, 1, 3
    assert m["open_R@5"] == pytest.approx(1.0)
    assert res["counts"] == {"closed_accuracy": 4, "open_R@1": 3, "open_R@5": 3}
    lo, hi = res["intervals"]["closed_accuracy"]
    assert lo < 0.5 < hi
    assert res["per_question_type"]["POS"]["closed_accuracy"] == {"value": 0.5, "n": 2}
    assert res["per_question_type"]["MODALITY"]["open_R@1"] == {"value": 0.0, "n": 1}
    assert res["per_answer_type"]["open"]["open_R@5"]["value"] == 1.0


def test_vqa_rad_missing_fields_are_named_skips_and_half_rule(tmp_path):
    broken = [{**vqa_rad_row(100 + k, "synpic54610.jpg", "Is it?", "yes", "CLOSED", "PRES"), "question": None}
              for k in range(8)]
    root = write_vqa_rad(tmp_path / "VQA_RAD", extra=broken)
    with pytest.raises(ValueError, match="only 7 of the 15 rows"):
        run_evaluation(planted(), ["vqa-rad"], {"vqa_rad": str(root)}, tmp_path / "o1", progress=False)
    run_evaluation(planted(), ["vqa-rad"], {"vqa_rad": str(root)}, tmp_path / "o2", progress=False, allow_partial=True)
    lines = (tmp_path / "o2" / "skipped.csv").read_text().splitlines()
    assert len(lines) == 9 and lines[1].startswith("100,") and "missing field" in lines[1] and "question" in lines[1]


def test_slake_english_questions(tmp_path):
    root = tmp_path / "Slake1.0"
    (root / "imgs" / "xmlab102").mkdir(parents=True)
    solid_image(root / "imgs" / "xmlab102" / "source.jpg", (50, 0, 0), fmt="PNG")

    def row(qid, q, a, at, lang="en"):
        return {"img_id": 102, "img_name": "xmlab102/source.jpg", "question": q, "answer": a, "q_lang": lang,
                "location": "Lung", "modality": "CT", "answer_type": at, "base_type": "vqa",
                "content_type": "Organ", "triple": ["vhead", "_", "_"], "qid": qid}

    rows = [row(11, "What organ is shown?", "Brain", "OPEN"), row(12, "Is there a fracture?", "Yes", "CLOSED"),
            row(13, "图中是什么器官?", "脑", "OPEN", lang="zh"), row(14, "Is the liver normal?", "No", "CLOSED")]
    (root / "test.json").write_text(json.dumps(rows, ensure_ascii=False))
    res = run_evaluation(planted(), ["slake"], {"slake": str(root)}, tmp_path / "out", progress=False)["tasks"]["slake"]
    assert res["n"] == 3 and res["metrics"]["closed_accuracy"] == 0.5 and res["metrics"]["open_R@1"] == 1.0
    assert res["per_question_type"]["Organ"]["closed_accuracy"]["n"] == 2


def test_pathvqa_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    def png(rgb):
        buf = io.BytesIO()
        Image.new("RGB", (32, 32), rgb).save(buf, format="PNG")
        return buf.getvalue()

    (tmp_path / "data").mkdir()
    table = pa.table({"image": [{"bytes": png((60, 0, 0)), "path": None}, {"bytes": png((61, 0, 0)), "path": None},
                                {"bytes": None, "path": None}],
                      "question": ["Is there a fracture?", "What organ is shown?", "What is it?"],
                      "answer": ["yes", "brain", "lung"]})
    pq.write_table(table, tmp_path / "data" / "test-00000-of-00001.parquet")
    res = run_evaluation(planted(), ["pathvqa"], {"pathvqa": str(tmp_path)}, tmp_path / "out",
                         progress=False)["tasks"]["pathvqa"]
    assert res["n"] == 2 and res["metrics"] == {"closed_accuracy": 1.0, "open_R@1": 1.0, "open_R@5": 1.0}
    assert res["skipped"] == {"missing field": 1}


def pmc_vqa_folder(root, image: str, rows: list[str]) -> None:
    """PMC-VQA's layout: ``images/<image>`` (one solid image) and ``test_clean.csv`` with the official columns."""
    (root / "images").mkdir()
    solid_image(root / "images" / image, (70, 0, 0), fmt="PNG")
    header = "Figure_path,Question,Answer,Choice A,Choice B,Choice C,Choice D,Answer_label\n"
    (root / "test_clean.csv").write_text(header + "".join(rows))


def test_pmc_vqa_csv_four_choices(tmp_path):
    pmc_vqa_folder(tmp_path, "PMC1064097_F1.jpg",
                   ["PMC1064097_F1.jpg,Is there a fracture?,yes,A:no,B:yes,C:left,D:right,B\n",
                    "PMC1064097_F1.jpg,Which side is the mass on?,left,A:left,B:right,C:yes,D:no,A\n",
                    "PMC9999999_F2.jpg,What organ?,lung,A:lung,B:brain,C:yes,D:no,A\n"])
    res = run_evaluation(planted(), ["pmc-vqa"], {"pmc_vqa": str(tmp_path)}, tmp_path / "out",
                         progress=False)["tasks"]["pmc-vqa"]
    assert res["n"] == 2 and res["metrics"] == {"closed_accuracy": 0.5}  # "right" chosen over "left"
    assert res["skipped"] == {"missing image": 1}


def test_pmc_vqa_an_answer_label_that_is_not_one_letter_is_a_named_skip(tmp_path):
    """Before: `label not in "ABCD"` was a substring test, so Answer_label "CD" scored option C as the answer
    and "AB" option A (a wrong closed accuracy) instead of a skip."""
    from fuselip_med.eval.tasks.med_vqa import read_pmc_vqa

    pmc_vqa_folder(tmp_path, "F1.jpg", ["F1.jpg,Which side?,left,A:right,B:left,C:up,D:down, b \n",
                                        "F1.jpg,Which side?,up,A:right,B:left,C:up,D:down,CD\n",
                                        "F1.jpg,Which side?,right,A:right,B:left,C:up,D:down,AB\n"])
    items, skips, listed = read_pmc_vqa(tmp_path)
    assert listed == 3 and [it.answer for it in items] == ["left"]
    assert skips.by_reason() == {"missing field": 2}
