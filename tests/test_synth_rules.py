"""Rule-based caption -> QA: exact pairs for real-style radiology captions (negation, hedging, laterality,
abbreviations, lists), concept questions for every ROCOv2 modality CUI, and the `data synth-vqa` command."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fuselip_med.data.adapters.rocov2 import ROCOV2_MODALITIES
from fuselip_med.data.synth.common import answer_in_caption, normalize_text
from fuselip_med.data.synth.rules import PROJECTION_ANSWERS, REGION_ANSWERS, TEMPLATES, rules_qa

REPO = Path(__file__).resolve().parents[1]


def answers(caption: str, concepts=()) -> dict[tuple[str, str], str]:
    """(qtype, question's finding or '') -> answer, checking each question is one of its type's phrasings."""
    out = {}
    for qtype, question, answer in rules_qa(caption, concepts, key="x"):
        candidates = []  # the finding each matching phrasing implies; the shortest is the real one
        for template in TEMPLATES[qtype]:
            if "{f}" not in template:
                candidates += [""] if question == template else []
                continue
            head, tail = template.split("{f}")
            for be in ("is", "are"):
                h, t = head.format(be=be), tail.format(be=be)
                if question.startswith(h) and question.endswith(t) and len(question) > len(h) + len(t):
                    candidates.append(question[len(h):len(question) - len(t)])
        assert candidates, f"{question!r} is not a {qtype} phrasing"
        finding = min(candidates, key=len)
        assert (qtype, finding) not in out
        out[(qtype, finding)] = answer
    return out


def test_negation_lists_and_abbreviations():
    caption = "CXR showing right pleural effusion and LLL consolidation, no pneumothorax."
    assert answers(caption) == {
        ("modality", ""): "X-ray",
        ("findings", ""): "pleural effusion and consolidation",
        ("side", "pleural effusion"): "right",
        ("side", "consolidation"): "left",
    }


def test_exact_pairs_with_the_phrasing_fixed_by_the_id():
    caption = "CXR showing right pleural effusion and LLL consolidation, no pneumothorax."
    assert rules_qa(caption, ("C1306645", "C0817096", "C1999039"), key="ROCOv2_2023_train_000042") == [
        ("modality", "What imaging modality is this?", "X-ray"),
        ("region", "Which anatomical region is shown on this radiograph?", "chest"),
        ("projection", "What is the projection of this X-ray?", "AP"),
        ("findings", "What findings are shown?", "pleural effusion and consolidation"),
        ("side", "What is the laterality of the pleural effusion?", "right"),
        ("side", "On which side is the consolidation?", "left"),
    ]


def test_everything_negated_gives_only_concept_questions():
    caption = "Chest radiograph: no pleural effusion, pneumothorax or consolidation."
    assert answers(caption, ("C1306645", "C0817096", "C1996865")) == {
        ("modality", ""): "X-ray", ("region", ""): "chest", ("projection", ""): "PA"}
    assert answers("No evidence of fracture or dislocation on this knee radiograph.") == {("modality", ""): "X-ray"}
    assert answers("Abdominal CT without ascites or free air.") == {("modality", ""): "CT"}


def test_size_location_side_plane_and_arrow():
    caption = "Axial CT of the chest showing a small 5 mm nodule in the RUL (arrow)."
    assert answers(caption, ("C0040405",)) == {
        ("modality", ""): "CT", ("plane", ""): "axial", ("abnormality", ""): "nodule", ("side", "nodule"): "right",
        ("location", "nodule"): "right upper lobe", ("size", "nodule"): "5 mm", ("arrow", ""): "nodule"}


def test_mri_sequence_multi_dimension_size_and_negated_second_finding():
    caption = ("Axial T2-weighted MRI of the brain demonstrating a 3 \u00d7 4 cm mass in the left frontal lobe, "
               "without hemorrhage.")
    assert answers(caption) == {
        ("modality", ""): "MRI", ("plane", ""): "axial", ("sequence", ""): "T2-weighted",
        ("abnormality", ""): "mass", ("side", "mass"): "left", ("location", "mass"): "left frontal lobe",
        ("size", "mass"): "3 x 4 cm"}


def test_bilateral_plural_list_and_post_negation():
    caption = "Coronal contrast-enhanced CT showing bilateral pleural effusions, pericardial effusion and ascites."
    assert answers(caption) == {
        ("modality", ""): "CT", ("plane", ""): "coronal",
        ("findings", ""): "pleural effusions, pericardial effusion and ascites",
        ("side", "pleural effusions"): "bilateral"}
    assert answers("Ultrasound of the right kidney showing hydronephrosis; stones were excluded.") == {
        ("modality", ""): "ultrasound", ("abnormality", ""): "hydronephrosis"}
    assert answers("b/l hilar lymphadenopathy on Chest X-ray (PA view).") == {
        ("modality", ""): "X-ray", ("abnormality", ""): "lymphadenopathy", ("side", "lymphadenopathy"): "bilateral"}


def test_hedged_and_ambiguous_captions_give_no_uncertain_answer():
    assert answers("Possible fracture of the left femur.") == {}
    assert answers("Suspected small nodule in the left lung; CT recommended.") == {("modality", ""): "CT"}
    assert answers("PET/CT showing FDG-avid lymphadenopathy.") == {("abnormality", ""): "lymphadenopathy"}
    # a nodule said to be on both sides in two mentions: no side question, the finding stays
    assert answers("CT: nodule in the right lung and nodule in the left lung.") == {
        ("modality", ""): "CT", ("abnormality", ""): "nodule"}
    # "mass effect" is not a mass; contrast words are not findings
    assert answers("Axial FLAIR image with mass effect on the left lateral ventricle.") == {
        ("modality", ""): "MRI", ("plane", ""): "axial", ("sequence", ""): "FLAIR"}


def test_listed_locations_and_suggested_diagnoses():
    # two locations for one finding: no side, no location (neither "right" nor "right lower lobe" is the answer)
    assert answers("Chest CT showing ground-glass opacities in the right lower lobe and left upper lobe.") == {
        ("modality", ""): "CT", ("abnormality", ""): "opacities"}
    assert answers("CT showing nodules in the right and left lower lobes.") == {
        ("modality", ""): "CT", ("abnormality", ""): "nodules"}
    assert answers("Brain MRI revealed multiple lesions, suggestive of metastases.") == {
        ("modality", ""): "MRI", ("abnormality", ""): "lesions"}
    assert answers("Chest X-ray showing bilateral infiltrates.") == {
        ("modality", ""): "X-ray", ("abnormality", ""): "infiltrates", ("side", "infiltrates"): "bilateral"}


def test_arrow_before_finding_and_curly_quotes():
    caption = "Sagittal T1WI MRI; the arrow indicates a 12\u2010mm \u201cenhancing\u201d lesion of the L4 vertebra."
    got = answers(caption)
    assert got[("arrow", "")] == "lesion"
    assert got[("size", "lesion")] == "12 mm"
    assert got[("sequence", "")] == "T1-weighted"
    assert got[("plane", "")] == "sagittal"


@pytest.mark.parametrize("cui,modality", sorted(ROCOV2_MODALITIES.items()))
def test_every_rocov2_modality_cui(cui, modality):
    got = rules_qa("Figure 2 of the case.", (cui,), key="case")
    assert got == [("modality", got[0][1], modality)] and got[0][1] in TEMPLATES["modality"]
    # the manual concept wins over a caption that names a different modality
    assert answers("Follow-up after CT.", (cui,))[("modality", "")] == modality


@pytest.mark.parametrize("cui,region", sorted(REGION_ANSWERS.items()))
def test_every_xray_region_cui(cui, region):
    assert answers("Plain radiograph.", ("C1306645", cui)) == {("modality", ""): "X-ray", ("region", ""): region}


@pytest.mark.parametrize("cui,projection", sorted(PROJECTION_ANSWERS.items()))
def test_every_xray_projection_cui(cui, projection):
    assert answers("Plain film.", ("C1306645", cui))[("projection", "")] == projection


def test_phrasings_vary_across_images_and_are_stable():
    caption = "Axial CT showing a 2 cm cyst in the left kidney."
    questions = {rules_qa(caption, (), key=f"img{i}")[0][1] for i in range(40)}
    assert questions == set(TEMPLATES["modality"])
    assert rules_qa(caption, (), key="img7") == rules_qa(caption, (), key="img7")


def test_normalisation_for_answer_matching():
    assert normalize_text("  The \u201cRight\u201d  Upper\u2013Lobe. ") == "right upper-lobe"
    assert answer_in_caption("3x4 cm", "a 3 \u00d7 4 cm mass")
    assert answer_in_caption("Right upper lobe", "nodule in the right upper lobe.")
    assert not answer_in_caption("right", "nodule in the bright spot")


def write_rocov2(root: Path) -> None:
    from PIL import Image

    images = root / "train_images" / "train"
    images.mkdir(parents=True)
    rows = {"ROCOv2_2023_train_000001": ("Axial CT of the abdomen showing a 2 cm cyst in the left kidney.",
                                         "C0040405"),
            "ROCOv2_2023_train_000007": ("Chest X-ray, no acute findings.", "C1306645;C0817096;C1999039"),
            "ROCOv2_2023_train_000009": ("Figure 3.", "")}
    for image_id in rows:
        Image.new("L", (8, 8), 90).save(images / f"{image_id}.jpg")
    (root / "train_captions.csv").write_text(
        "ID,Caption\n" + "".join(f'{k},"{c}"\n' for k, (c, _) in rows.items()), encoding="utf-8")
    (root / "train_concepts_manual.csv").write_text(
        "ID,CUIs\n" + "".join(f"{k},{cuis}\n" for k, (_, cuis) in rows.items()), encoding="utf-8")


def test_synth_vqa_command_rules(tmp_path):
    from typer.testing import CliRunner

    from fuselip_med.cli import app

    write_rocov2(tmp_path / "rocov2")
    out = tmp_path / "vqa.jsonl"
    done = CliRunner().invoke(app, ["data", "synth-vqa", "--input", str(tmp_path / "rocov2"), "--out", str(out)])
    assert done.exit_code == 0, done.output
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["id"][-6:], r["qtype"], r["answer"]) for r in records] == [
        ("000001", "modality", "CT"), ("000001", "plane", "axial"), ("000001", "abnormality", "cyst"),
        ("000001", "side", "left"), ("000001", "location", "left kidney"), ("000001", "size", "2 cm"),
        ("000007", "modality", "X-ray"), ("000007", "region", "chest"), ("000007", "projection", "AP")]
    assert all(r["generator"] == "rules" and r["model"] is None and r["prompt_version"] == "rules-v2"
               and Path(r["image"]).is_file() for r in records)
    stats = json.loads((tmp_path / "vqa.jsonl.stats.json").read_text())
    assert stats["n_captions"] == 3 and stats["n_records"] == 9
    assert stats["dropped"] == {"caption without a certain question": 1, "caption not in English": 0}
    bad = subprocess.run([sys.executable, "-m", "fuselip_med.cli", "data", "synth-vqa", "--input",
                          str(tmp_path / "nothing"), "--out", str(out)], capture_output=True, text=True, cwd=REPO)
    message = " ".join(bad.stdout.split())
    assert bad.returncode == 1 and message.startswith("error: ROCOv2 path") and "does not exist" in message
    wrong = CliRunner().invoke(app, ["data", "synth-vqa", "-i", str(tmp_path / "rocov2"), "-o", "vqa.csv"])
    assert wrong.exit_code == 1 and "give a .jsonl file name" in " ".join(wrong.output.split())


@pytest.mark.parametrize(("caption", "size"), [
    ("CT showing a 5,2 cm mass in the right upper lobe.", "5,2 cm"),          # decimal comma, as written
    ("CT showing a 3&times;4 cm mass in the liver.", "3 x 4 cm"),           # HTML entity of the times sign
    ("CT showing a 3\u00d74 cm mass in the liver.", "3 x 4 cm"),
    ("Ultrasound showing a 2-3 cm cyst in the left kidney.", "2-3 cm"),    # ranges, never their upper end
    ("Ultrasound showing a 2\u20133 cm cyst in the left kidney.", "2-3 cm"),
    ("Ultrasound showing a 2 to 3 cm cyst in the left kidney.", "2 to 3 cm"),
    ("A cyst measuring 1,5 x 2 cm in the liver.", "1,5 x 2 cm"),
])
def test_sizes_are_read_as_written(caption, size):
    sizes = [answer for qtype, _, answer in rules_qa(caption) if qtype == "size"]
    assert sizes == [size]


def test_captions_not_in_english_are_skipped_and_counted(tmp_path):
    from fuselip_med.data.synth.common import CaptionRow
    from fuselip_med.data.synth.rules import synthesize_rules

    french = "Scanner thoracique en coupe axiale montrant un épanchement pleural gauche, pas de pneumothorax."
    spanish = "Tomografía computarizada que muestra un derrame pleural izquierdo sin neumotórax."
    assert rules_qa(french) == [] and rules_qa("Pas de pneumothorax.") == []
    skipped: list[str] = []
    rows = [CaptionRow("fr", None, french), CaptionRow("es", None, spanish),
            CaptionRow("en", None, "Axial CT showing a left pleural effusion.")]
    records = synthesize_rules(rows, skipped)
    assert skipped == ["fr", "es"] and {r.id for r in records} == {"en"}
