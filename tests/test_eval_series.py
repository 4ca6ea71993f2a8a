"""`eval` over series in CT-RATE's layouts: NIfTI volumes (nibabel-written), multi_abnormality_labels.csv and
the reports CSV, matched by VolumeName."""
from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from fuselip_med.cli import app
from fuselip_med.core.fuselip import FuseLIP, FuseLIPConfig
from fuselip_med.core.pretrained import save_pretrained
from tests.study_helpers import nifti_volume

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def ct_rate(root):
    """Four volumes valid_{i}_a_1.nii.gz, labels for three of them plus one without a volume, reports for all."""
    volumes = root / "valid"
    volumes.mkdir(parents=True)
    names = [f"valid_{i}_a_1.nii.gz" for i in range(1, 5)]
    for seed, name in enumerate(names):
        nifti_volume(volumes / name, shape=(12, 12, 5), seed=seed)
    (root / "multi_abnormality_labels.csv").write_text(
        "VolumeName,Emphysema,Atelectasis,Lung nodule\n"
        f"{names[0]},1,0,1\n{names[1]},0,0,1\n{names[2]},1,0,0\nvalid_9_a_1.nii.gz,0,1,0\n")
    (root / "validation_reports.csv").write_text(
        "VolumeName,ClinicalInformation_EN,Technique_EN,Findings_EN,Impressions_EN\n"
        + "".join(f'{n},"cough","non-contrast CT","finding {i}","impression {i}"\n' for i, n in enumerate(names)))
    return volumes


@pytest.mark.slow  # three CLI runs with a model load each (~20 s on 2 cores)
def test_eval_series_zero_shot_and_retrieval(tmp_path):
    volumes = ct_rate(tmp_path / "ct_rate")
    torch.manual_seed(0)
    save_pretrained(FuseLIP(FuseLIPConfig.from_size("tiny")).eval(), tmp_path / "tiny")
    result = CliRunner().invoke(app, [
        "eval", "-m", str(tmp_path / "tiny"), "-t", "series-zero-shot,series-retrieval", "--device", "cpu",
        "--data", f"volumes={volumes}", "--data", f"series_labels={tmp_path / 'ct_rate/multi_abnormality_labels.csv'}",
        "--data", f"series_reports={tmp_path / 'ct_rate/validation_reports.csv'}", "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    zero_shot = metrics["tasks"]["series-zero-shot"]
    assert zero_shot["n"] == 3
    assert sorted(zero_shot["metrics"]) == ["auroc/Emphysema", "auroc/Lung nodule", "mean_auroc"]
    assert zero_shot["single_class"] == ["Atelectasis"]
    assert zero_shot["skipped"] == {"no series for this row": 1}
    assert zero_shot["metrics"]["mean_auroc"] == pytest.approx(
        (zero_shot["metrics"]["auroc/Emphysema"] + zero_shot["metrics"]["auroc/Lung nodule"]) / 2)
    retrieval = metrics["tasks"]["series-retrieval"]
    assert retrieval["n"] == 4 and 0 <= retrieval["metrics"]["series_to_report_R@1"] <= 1
    assert "ct_rate" not in (tmp_path / "out" / "metrics.json").read_text()  # no series input path written
