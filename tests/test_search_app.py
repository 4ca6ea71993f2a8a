"""Pieces of the search page that need no browser: DICOM thumbnails through their window, GPU placement."""
from __future__ import annotations

import numpy as np
import pytest

from fuselip_med.search import index as search_index
from tests.search_helpers import write_ct

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def test_dicom_thumbnail_uses_the_files_window(tmp_path):
    from fuselip_med.search.app import thumbnail

    soft_tissue = np.asarray(thumbnail(write_ct(tmp_path / "soft.dcm", hu=40.0, size=64), size=32))
    assert soft_tissue.shape == (32, 32, 3)
    assert soft_tissue[:14].max() == 0  # air (-1000 HU) is below the 400/40 window
    assert abs(int(soft_tissue[24, 16, 0]) - 128) <= 1  # 40 HU is the window centre: mid grey
    narrow = np.asarray(thumbnail(write_ct(tmp_path / "narrow.dcm", hu=40.0, size=64, window=(80.0, 0.0)), size=32))
    assert narrow[24, 16, 0] == 255  # the same tissue above a (80, 0) window saturates


def test_indexes_move_to_gpus_when_faiss_has_them(monkeypatch):
    import faiss

    moved = []
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1)
    monkeypatch.setattr(faiss, "index_cpu_to_all_gpus", lambda index: moved.append(index) or "on gpu", raising=False)
    assert search_index._to_gpu("cpu index") == "on gpu" and moved == ["cpu index"]

    def unsupported(index):
        raise RuntimeError("no GPU version of this index")

    monkeypatch.setattr(faiss, "index_cpu_to_all_gpus", unsupported)
    assert search_index._to_gpu("hnsw") == "hnsw"
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 0)
    assert search_index._to_gpu("cpu index") == "cpu index"
