"""The cc3m_vqa adapter on a CSV in the reference layout (path,question,answer; keep_default_na=False)."""
from __future__ import annotations

import io
import pickle
from pathlib import Path

import pytest
from PIL import Image

from fuselip_med.data.adapters import BadRowError, DatasetEmptyError, DatasetNotFoundError, get_adapter
from fuselip_med.data.adapters.vqa import VQASource, cc3m_vqa


def write_vqa(root: Path) -> Path:
    images = root / "images"
    images.mkdir(parents=True)
    for n in (1, 2, 3):
        buffer = io.BytesIO()
        Image.new("RGB", (16, 16), (40 * n, 0, 0)).save(buffer, format="JPEG")
        (images / f"{n:09d}.jpg").write_bytes(buffer.getvalue())
    rows = [
        "path,question,answer",
        'images/000000001.jpg,"What is shown, mostly?",A red square.',
        "images/000000001.jpg,Is there a dog?,None",  # "None" stays text
        "images/000000002.jpg,What does the sign say?,NA",  # "NA" stays text
        "images/000000002.jpg,What colour is the car?,",  # empty answer
        "images/000000003.jpg,,blue",  # empty question
        "images/000000009.jpg,Where is it?,nowhere",  # image missing
        f"{images / '000000003.jpg'},Absolute path?,null",
    ]
    table = root / "cc3m_vqa.csv"
    table.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return table


def test_question_image_to_answer_text(tmp_path):
    table = write_vqa(tmp_path / "cc3m_vqa")
    source = get_adapter("cc3m_vqa")(path=str(table), split="train")
    assert isinstance(source, VQASource) and source.name == "cc3m_vqa/train"
    assert [source[i].target.text for i in range(len(source))] == ["A red square.", "None", "NA", "null"]
    assert dict(source.skipped) == {"empty answer": 1, "empty question": 1, "missing image": 1}
    sample = source[0]
    assert sample.query.text == "What is shown, mostly?" and sample.target.image is None
    assert sample.query.image == str(table.parent / "images" / "000000001.jpg")
    assert sample.source == "cc3m_vqa" and sample.id == "000000001/1"
    assert source[1].id == "000000001/2" and source[3].query.image.endswith("000000003.jpg")
    assert source.groups() == [[0], [1], [2], [3]]
    assert [s.target.text for s in (cc3m_vqa(table, limit=2)[i] for i in range(2))] == ["A red square.", "None"]
    clone = pickle.loads(pickle.dumps(source))
    assert clone[2].target.text == "NA"


def test_strict_and_errors(tmp_path):
    table = write_vqa(tmp_path / "cc3m_vqa")
    with pytest.raises(BadRowError, match=r"cc3m_vqa.csv, row 4: empty answer"):
        cc3m_vqa(table, strict=True)
    with pytest.raises(DatasetNotFoundError, match="path,question,answer"):
        cc3m_vqa(tmp_path / "missing.csv")
    wrong = tmp_path / "wrong.csv"
    wrong.write_text("path,question\nx.jpg,why?\n")
    with pytest.raises(DatasetEmptyError, match=r"\['answer'\]"):
        cc3m_vqa(wrong)
    with pytest.raises(ValueError, match="limit must be >= 0"):
        cc3m_vqa(table, limit=-1)
    unchecked = cc3m_vqa(table, check_files=False)
    assert len(unchecked) == 5 and "missing image" not in unchecked.skipped
