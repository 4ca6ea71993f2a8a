"""Series / volume reading under hostile inputs (an adversarial tester's findings): special files, links out of
the input folder, files that only look like DICOM by name, declared sizes the bytes cannot hold, broken NIfTI
headers and DICOMDIRs. Each must be a named skip (or one error line), fast, with no traceback."""
from __future__ import annotations

import os

import pytest

from fuselip_med.data.phi import Pseudonyms
from fuselip_med.data.skips import SkipReport
from fuselip_med.data.studies import find_series
from tests.study_helpers import ct_series

KEYS = Pseudonyms("0123456789abcdef0123456789abcdef")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _reasons(skips: SkipReport) -> dict[str, int]:
    return dict(skips.counts)


@pytest.mark.timeout(30)
def test_special_files_in_a_series_folder_are_named_not_opened(tmp_path):
    """A FIFO (opening it would block for ever) and a socket are ``not a file``, as the image unit names them."""
    import socket

    ct_series(tmp_path / "exam", n=3)
    os.mkfifo(tmp_path / "exam" / "pipe.dcm")
    server = socket.socket(socket.AF_UNIX)
    server.bind(os.fspath(tmp_path / "exam" / "sock"))
    try:
        skips = SkipReport()
        [series] = find_series(tmp_path, KEYS, skips)
    finally:
        server.close()
    assert len(series) == 3
    assert _reasons(skips) == {"not a file": 2}


@pytest.mark.timeout(30)
def test_links_out_of_the_folder_loops_dangling_links_and_zero_files_are_named(tmp_path):
    """Links are held to the input folder as the image unit holds them (``outside image root``, ``symlink loop``,
    ``missing image``); a large zero-filled ``.dcm`` is ``not a DICOM image`` without letting pydicom parse it."""
    ct_series(tmp_path / "in" / "exam", n=3)
    outside = ct_series(tmp_path / "elsewhere", n=3)  # a readable DICOM series outside the input folder
    folder = tmp_path / "in"
    (folder / "passwd.dcm").symlink_to("/etc/passwd")
    (folder / "zero.dcm").symlink_to("/dev/zero")
    (folder / "outside.dcm").symlink_to(next(iter(outside["files"].values())))
    (folder / "loop.dcm").symlink_to(folder / "loop.dcm")
    (folder / "gone.dcm").symlink_to(folder / "nothing-here")
    with open(folder / "zeros.dcm", "wb") as handle:  # sparse: 64 MiB of zeros on no disk space
        handle.truncate(64 << 20)
    skips = SkipReport()
    [series] = find_series(folder, KEYS, skips)
    assert len(series) == 3
    assert _reasons(skips) == {"outside image root": 3, "symlink loop": 1, "missing image": 1,
                               "not a DICOM image": 1}
    assert not any("passwd" in e.id or "elsewhere" in e.id or e.detail for e in skips.entries
                   if e.reason != "not a DICOM image")
