"""The `volumes` training adapter (CT-RATE layout: NIfTI + reports CSV) and the `ct_rate_demo` recipe on CPU,
on volumes the test writes."""
from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from fuselip_med.cli import app
from fuselip_med.data.adapters import get_adapter
from fuselip_med.data.adapters.volumes import write_volume_demo

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def test_volumes_adapter_pairs_sampled_slices_with_reports(tmp_path):
    folder = write_volume_demo(tmp_path / "ct", n=4, shape=(16, 16, 6))
    with open(folder / "reports.csv", "a") as handle:
        handle.write("missing_1_a_1.nii.gz,gone,gone\n")
    source = get_adapter("volumes")(str(folder), slices=3, rendering="multi")
    assert len(source) == 4 * 3 and [len(g) for g in source.groups()] == [3, 3, 3, 3]
    sample = source[0]
    assert sample.target.text == "A solid pulmonary nodule is seen. Lung nodule."
    assert sample.group == "volumes/demo_0_a_1.nii.gz" and sample.id == "demo_0_a_1.nii.gz#0"
    assert isinstance(sample.query.image, np.ndarray) and sample.query.image.shape == (16, 16, 3)
    assert dict(source.skipped) == {"no series": 1}


def test_ct_rate_demo_recipe_trains_on_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("FUSELIP_MED_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["finetune", "--recipe", "ct_rate_demo", "--set", "train.steps=2",
                                      "--set", "checkpoint.every_steps=2"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "cache" / "demo_ct_rate" / "reports.csv").is_file()
    metrics = (tmp_path / "runs" / "ct_rate_demo" / "metrics.jsonl").read_text()
    lines = [json.loads(line) for line in metrics.splitlines()]
    assert any("train/loss" in line for line in lines)
