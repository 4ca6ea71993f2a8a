"""The Key Object Selection of search hits (search/kos.py), without a server: which study holds it, and that its
evidence lists every referenced instance across studies (PS3.3 C.17.6.2), in the file highdicom writes."""
from __future__ import annotations

import pydicom
import pytest
from pydicom.data import get_testdata_file

from fuselip_med.search.kos import similar_cases_kos, write_kos
from tests.dicom_series import write_series


def referenced(document) -> tuple[set[str], set[str]]:
    content = {item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for item in document.ContentSequence
               if "ReferencedSOPSequence" in item}
    evidence = {sop.ReferencedSOPInstanceUID for study in document.CurrentRequestedProcedureEvidenceSequence
                for series in study.ReferencedSeriesSequence for sop in series.ReferencedSOPSequence}
    return content, evidence


def test_kos_of_hits_from_three_studies_in_the_query_study(tmp_path):
    ct, mr = write_series(tmp_path / "ct", "CT", 2, seed=1), write_series(tmp_path / "mr", "MR", 1, seed=2)
    hits = [ct[0], mr[0], get_testdata_file("CT_small.dcm")]
    document = similar_cases_kos(hits, "image q.dcm + effusion", query_image=ct[1])
    path = write_kos(document, tmp_path / "kos.dcm")
    written = pydicom.dcmread(path)
    uids = {pydicom.dcmread(h).SOPInstanceUID for h in hits}
    assert referenced(written) == (uids, uids)
    assert len(written.CurrentRequestedProcedureEvidenceSequence) == 3
    assert written.StudyInstanceUID == pydicom.dcmread(ct[1]).StudyInstanceUID and written.Modality == "KO"
    assert [item.ValueType for item in written.ContentSequence[:1]] == ["TEXT"]
    image_items = [item.ValueType for item in written.ContentSequence[1:]]
    assert image_items == ["IMAGE", "IMAGE", "IMAGE"]


def test_a_text_query_files_the_kos_in_the_top_hits_study(tmp_path):
    hits = [get_testdata_file("MR_small.dcm"), *write_series(tmp_path / "ct", "CT", 1)]
    document = similar_cases_kos(hits, "pleural effusion")
    top = pydicom.dcmread(hits[0])
    assert document.StudyInstanceUID == top.StudyInstanceUID and document.PatientID == top.PatientID
    assert document.ContentSequence[0].TextValue == "Similar cases: pleural effusion"


def test_a_failed_stow_says_nothing_was_stored_not_that_fetched_instances_are_kept(tmp_path):
    """STOW-RS to a server that does not answer ended with the fetch advice "(instances already fetched are kept)",
    which says nothing about the Key Object Selection that was not stored."""
    from fuselip_med.data.adapters.dicomweb import DicomwebError, DicomwebOptions, open_server
    from fuselip_med.search.kos import similar_cases_kos, stow_kos
    from tests.orthanc import free_port

    document = similar_cases_kos([get_testdata_file("CT_small.dcm")], "effusion")
    server = open_server(f"http://127.0.0.1:{free_port()}/dicom-web", DicomwebOptions(cache="", retries=1))
    with pytest.raises(DicomwebError) as raised:
        stow_kos(document, server)
    assert "nothing was stored" in str(raised.value) and "fetched" not in str(raised.value)
