"""Series/study embeddings: shuffled-on-disk series embed to the ordered one's vector, a series vector is the
renormalised mean of its slice vectors (computed here independently), study = the same over series; the
`embed --unit` outputs carry salted keys only."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from fuselip_med.cli import app
from fuselip_med.core.fuselip import FuseLIP, FuseLIPConfig
from fuselip_med.core.pretrained import save_pretrained
from fuselip_med.data.images import decode_image
from fuselip_med.data.phi import Pseudonyms
from fuselip_med.data.studies import find_series
from fuselip_med.inference.units import UnitOptions, embed_series, pool, pool_studies
from tests.study_helpers import ct_series

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
KEYS = Pseudonyms("fedcba9876543210fedcba9876543210")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(0)
    model = FuseLIP(FuseLIPConfig.from_size("tiny")).eval()
    path = tmp_path_factory.mktemp("model") / "tiny"
    save_pretrained(model, path)
    return model, path


def test_pool_is_the_renormalised_mean_of_unit_vectors():
    vectors = np.array([[3.0, 0.0], [0.0, 0.5]])
    assert np.allclose(pool(vectors), np.array([1.0, 1.0]) / np.sqrt(2))
    with pytest.raises(ValueError, match="N >= 1"):
        pool(np.zeros((0, 2)))


def test_shuffled_series_embeds_to_the_ordered_vector_and_pools_independently(tmp_path, tiny):
    model, _ = tiny
    ordered = ct_series(tmp_path / "ordered", n=9, shuffle_seed=None, series_uid="1.2.3.1", study_uid="1.2.3")
    shutil.copytree(tmp_path / "ordered", tmp_path / "shuffled_src")
    shuffled = tmp_path / "shuffled"
    shuffled.mkdir()
    for number, path in enumerate(sorted((tmp_path / "shuffled_src").iterdir(), reverse=True)):
        shutil.move(path, shuffled / f"X{(number * 7919) % 1000:04d}")  # names unrelated to position
    options = UnitOptions(slices=4)
    [a] = embed_series(model, find_series(tmp_path / "ordered", KEYS), options, progress=False)
    [b] = embed_series(model, find_series(shuffled, KEYS), options, progress=False)
    assert a.series.key == b.series.key and a.slice_keys == b.slice_keys
    assert np.abs(a.vector - b.vector).max() <= 1e-6

    sampled = [ordered["files"][z] for z in (0.0, 7.5, 12.5, 20.0)]  # round(linspace(0, 8, 4)) * 2.5 mm
    assert a.positions == [0.0, 7.5, 12.5, 20.0]
    with torch.no_grad():
        slices = torch.nn.functional.normalize(model.encode(images=torch.stack([decode_image(p) for p in sampled])),
                                               dim=-1).numpy()
    assert np.abs(a.slice_vectors - slices).max() <= 1e-5
    mean = slices.mean(axis=0)
    assert np.abs(a.vector - mean / np.linalg.norm(mean)).max() <= 1e-5

    second = ct_series(tmp_path / "second", n=5, study_uid="1.2.3", series_uid="1.2.3.2", z0=100.0)
    assert second
    embedded = embed_series(model, find_series(tmp_path / "ordered", KEYS) + find_series(tmp_path / "second", KEYS),
                            options, progress=False)
    [study] = pool_studies(embedded)
    expect = np.mean([e.vector for e in sorted(embedded, key=lambda e: e.series.key)], axis=0)
    assert np.abs(study.vector - expect / np.linalg.norm(expect)).max() <= 1e-6


@pytest.mark.slow  # three CLI runs with a model load each (~20 s on 2 cores)
def test_embed_unit_series_and_study_outputs(tmp_path, tiny):
    _, model_path = tiny
    export = tmp_path / "export"
    ct_series(export / "one", n=6, study_uid="1.9.1", series_uid="1.9.1.1")
    ct_series(export / "two", n=4, study_uid="1.9.1", series_uid="1.9.1.2", z0=50.0)
    ct_series(export / "three", n=5, study_uid="1.9.2", series_uid="1.9.2.1")
    ct_series(export / "lonely", n=1, study_uid="1.9.2", series_uid="1.9.2.9")
    runner = CliRunner()
    out = tmp_path / "series.npy"
    result = runner.invoke(app, ["embed", "-m", str(model_path), "-i", str(export), "--unit", "series", "--slices",
                                 "3", "-o", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    ids = json.loads(out.with_suffix(".ids.json").read_text())
    assert ids["unit"] == "series" and len(ids["ids"]) == 3 and len(set(ids["studies"])) == 2
    assert np.load(out).shape[0] == 3 and np.load(tmp_path / "series.slices.npy").shape[0] == 3 + 3 + 3
    assert ids["slices"]["rows"] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    skipped = (tmp_path / "series.skipped.csv").read_text()
    assert "single-slice series" in skipped and "1.9." not in skipped
    again = runner.invoke(app, ["embed", "-m", str(model_path), "-i", str(export), "--unit", "series", "--slices",
                                "3", "-o", str(out), "--device", "cpu"])
    assert again.exit_code == 0 and json.loads(out.with_suffix(".ids.json").read_text())["ids"] == ids["ids"]

    studies = tmp_path / "studies.parquet"
    result = runner.invoke(app, ["embed", "-m", str(model_path), "-i", str(export), "--unit", "study", "--slices",
                                 "3", "--render", "multi", "-o", str(studies), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    import pyarrow.parquet as pq

    table = pq.read_table(studies)
    assert table.num_rows == 2 and sorted(len(s) for s in table.column("slice_ids").to_pylist()) == [3, 6]
    assert json.loads(table.schema.metadata[b"settings"]) == {"slices": 3,
                                                             "rendering": "multi:lung,mediastinum,bone"}

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images")
    result = runner.invoke(app, ["embed", "-m", str(model_path), "-i", str(empty), "--unit", "series", "-o",
                                 str(tmp_path / "x.npy"), "--device", "cpu"])
    assert result.exit_code == 1 and result.output.startswith(f"error: {empty}: no usable series")
