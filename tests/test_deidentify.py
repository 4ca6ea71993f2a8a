"""`data deidentify`: dicognito + the Annex E pass; no planted identifier survives, UIDs are remapped
consistently (the copies still read as the same series, same order), pixel data is byte-identical."""
from __future__ import annotations

import pydicom
import pytest
from typer.testing import CliRunner

from fuselip_med.cli import app
from fuselip_med.data.phi import Pseudonyms
from fuselip_med.data.studies import find_series
from tests.study_helpers import PATIENT_ATTRIBUTES, ct_series

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def test_deidentify_removes_identifiers_and_keeps_pixels_and_series(tmp_path):
    made = ct_series(tmp_path / "in" / "Doe_John", n=4, canary="QZXCANARY")
    ct_series(tmp_path / "in" / "Doe_John" / "second", n=3, canary="QZXCANARY", study_uid=made["study"])
    (tmp_path / "in" / "notes.txt").write_text("QZXCANARY")
    result = CliRunner().invoke(app, ["data", "deidentify", str(tmp_path / "in"), str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "Wrote 7 de-identified DICOM files" in result.output and "1 not a DICOM image" in result.output
    written = sorted((tmp_path / "out").rglob("*.dcm"))
    assert len(written) == 7
    uids = {made["study"], made["series"], *(str(pydicom.dcmread(p).SOPInstanceUID) for p in made["files"].values())}
    for path in written:
        data = path.read_bytes()
        assert b"QZXCANARY" not in data and b"Doe_John" not in data and b"19230101" not in data
        assert not any(uid.encode() in data for uid in uids)
        ds = pydicom.dcmread(path)
        assert str(ds.DeidentificationMethod) == "DICOGNITO"  # PatientIdentityRemoved only with BurnedInAnnotation NO
        for keyword in PATIENT_ATTRIBUTES:
            assert "QZX" not in str(ds.get(keyword, ""))
    originals = {str(pydicom.dcmread(p).ImagePositionPatient[2]): pydicom.dcmread(p).PixelData
                 for p in made["files"].values()}
    keys = Pseudonyms.fresh()
    before = find_series(tmp_path / "in", keys)
    after = find_series(tmp_path / "out", keys)
    assert sorted(len(s) for s in after) == sorted(len(s) for s in before) == [3, 4]
    assert len({s.study_key for s in after}) == 1  # both series still one study
    four = next(s for s in after if len(s) == 4)
    assert [s.position for s in four.slices] == [0.0, 2.5, 5.0, 7.5]
    for ref in four.slices:
        assert pydicom.dcmread(ref.source).PixelData == originals[str(ref.position)]


def test_deidentify_refuses_a_non_empty_output_and_an_input_without_dicom(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text("x")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    runner = CliRunner()
    result = runner.invoke(app, ["data", "deidentify", str(tmp_path / "in"), str(tmp_path / "out")])
    assert result.exit_code == 1 and "no DICOM file to de-identify" in result.output
    result = runner.invoke(app, ["data", "deidentify", str(tmp_path / "in"), str(tmp_path / "busy")])
    assert result.exit_code == 1 and "is not empty" in result.output


def test_damaged_files_are_named_skips_and_the_rest_is_written(tmp_path):
    """A file with a DICM preamble and garbage after it was a traceback (no SOPInstanceUID); a file cut in half was
    'de-identified' and written as if whole. Both are now named skips (by key, never by path) and the whole file is
    written."""
    made = ct_series(tmp_path / "in" / "Doe_John", n=2, canary="QZXCANARY")
    whole = made["files"][0.0].read_bytes()
    (tmp_path / "in" / "Doe_John" / "cut.dcm").write_bytes(whole[: len(whole) - 200])
    (tmp_path / "in" / "Doe_John" / "junk.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"garbage" * 20)
    result = CliRunner().invoke(app, ["data", "deidentify", str(tmp_path / "in"), str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    output = " ".join(result.output.split())
    assert "Wrote 2 de-identified DICOM files" in output and "truncated image" in output
    assert "corrupt image" in output or "unreadable DICOM" in output
    assert "Doe_John" not in output and "cut.dcm" not in output and "junk.dcm" not in output
    assert len(list((tmp_path / "out").rglob("*.dcm"))) == 2
