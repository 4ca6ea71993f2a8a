"""``findings``: planted embeddings give exactly known AUROC / AP / thresholds; CheXpert's CSV as published."""
import itertools
import json
import math

import numpy as np
import pytest
import torch

from fuselip_med.eval.findings import (
    apply_policy,
    choose_threshold,
    findings_metrics,
    pairwise_scores,
    parse_label,
    read_prompts,
)
from fuselip_med.eval.intervals import bootstrap_counts, weighted_aurocs
from fuselip_med.eval.runner import run_evaluation
from tests.radiology_fixtures import ScaledPlanted, write_chexpert

DIM = 32
FINDINGS = ["Cardiomegaly", "Edema"]
PROMPTS = {"Cardiomegaly": ("big heart", "normal heart"), "Edema": ("wet lungs", "dry lungs")}
AXIS = {"big heart": 0, "normal heart": 1, "wet lungs": 2, "dry lungs": 3}

# image number -> planted direction (before normalisation)
TEST_VECS = {0: [0.9, 0.1, 0.2, 0.8], 1: [0.7, 0.3, 0.6, 0.4], 2: [0.4, 0.6, 0.1, 0.9], 3: [0.2, 0.8, 0.7, 0.3],
             4: [0.6, 0.4, 0.5, 0.5], 5: [0.1, 0.9, 0.9, 0.1], 6: [0.5, 0.5, 0.3, 0.7], 7: [0.8, 0.2, 0.4, 0.6]}
TEST_LAB = {0: ("1.0", "0.0"), 1: ("1.0", "1.0"), 2: ("0.0", "0.0"), 3: ("0.0", "1.0"), 4: ("1.0", "-1.0"),
            5: ("0.0", "1.0"), 6: ("", "-1.0"), 7: ("0.0", "0.0")}
VALID_VECS = {10: [0.8, 0.2, 0.3, 0.7], 11: [0.3, 0.7, 0.8, 0.2], 12: [0.55, 0.45, 0.45, 0.55],
              13: [0.45, 0.55, 0.6, 0.4], 14: [0.65, 0.35, 0.2, 0.8]}
VALID_LAB = {10: ("1.0", "0.0"), 11: ("0.0", "1.0"), 12: ("1.0", "1.0"), 13: ("0.0", "0.0"), 14: ("0.0", "-1.0")}


def vec(values):
    v = torch.zeros(DIM)
    v[:4] = torch.tensor(values)
    return v


def planted():
    vecs = {**TEST_VECS, **VALID_VECS}

    def text_fn(text):
        v = torch.zeros(DIM)
        v[AXIS.get(text, 31)] = 1.0
        return v

    return ScaledPlanted(image_fn=lambda i: vec(vecs[i - 1000]), text_fn=text_fn, t=10.0, b=-5.0)


def prompt_file(tmp_path):
    lines = ["findings:"] + [f"  {f}:\n    positive: [{p!r}]\n    negative: [{n!r}]" for f, (p, n) in PROMPTS.items()]
    path = tmp_path / "prompts.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def rows(vecs, labs):
    return [{"n": n, "Cardiomegaly": labs[n][0], "Edema": labs[n][1]} for n in vecs]


def expected_scores(vecs):
    """The formula written out independently: sigmoid(t cos + b), contrasted p+ / (p+ + p-)."""
    sig = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    out = []
    for values in vecs.values():
        x = np.array(values) / np.linalg.norm(values)
        row = []
        for j in range(2):
            pp, pn = sig(10 * x[2 * j] - 5), sig(10 * x[2 * j + 1] - 5)
            row.append(pp / (pp + pn))
        out.append(row)
    return np.array(out)


def mann_whitney(y, s):
    pos, neg = [v for v, t in zip(s, y) if t], [v for v, t in zip(s, y) if not t]
    wins = sum(1.0 if p > q else 0.5 if p == q else 0.0 for p, q in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def average_precision(y, s):
    order = np.argsort(-np.asarray(s), kind="stable")
    hits, total = 0, 0.0
    for rank, i in enumerate(order, 1):
        if y[i]:
            hits += 1
            total += hits / rank
    return total / sum(y)


def youden(y, s):
    best, thr = -2, None
    for t in sorted(set(s), reverse=True):
        pred = np.asarray(s) >= t
        tpr = (pred & np.asarray(y)).sum() / sum(y)
        fpr = (pred & ~np.asarray(y)).sum() / (len(y) - sum(y))
        if tpr - fpr > best:
            best, thr = tpr - fpr, t
    return thr


@pytest.mark.parametrize("uncertain", ["ignore", "positive", "negative"])
def test_findings_task_scores_exactly(tmp_path, uncertain):
    test_csv = write_chexpert(tmp_path, "test", rows(TEST_VECS, TEST_LAB))
    valid_csv = write_chexpert(tmp_path, "valid", rows(VALID_VECS, VALID_LAB), patient0=64700)
    out = run_evaluation(planted(), ["findings"], {"findings": test_csv, "findings_valid": valid_csv},
                         tmp_path / "out", labels=FINDINGS, prompts=prompt_file(tmp_path), uncertain=uncertain,
                         n_boot=200, progress=False)
    res = out["tasks"]["findings"]
    assert res["uncertain"] == uncertain and res["blank"] == "negative" and res["threshold_role"] == "findings_valid"
    scores, v_scores = expected_scores(TEST_VECS), expected_scores(VALID_VECS)
    unc_value = {"positive": True, "negative": False}
    for j, name in enumerate(FINDINGS):
        labels = [TEST_LAB[n][j] for n in TEST_VECS]
        keep = [i for i, v in enumerate(labels) if v != "-1.0" or uncertain != "ignore"]
        y = [labels[i] == "1.0" or (labels[i] == "-1.0" and unc_value.get(uncertain, False)) for i in keep]
        s = [scores[i, j] for i in keep]
        entry = res["per_finding"][name]
        assert entry["n_scored"] == len(keep) and entry["n_positive"] == sum(y)
        assert entry["n_uncertain"] == labels.count("-1.0")
        assert entry["AUROC"] == pytest.approx(mann_whitney(y, s))
        assert entry["AP"] == pytest.approx(average_precision(y, s))
        v_labels = [VALID_LAB[n][j] for n in VALID_VECS]
        v_keep = [i for i, v in enumerate(v_labels) if v != "-1.0" or uncertain != "ignore"]
        v_y = [v_labels[i] == "1.0" or (v_labels[i] == "-1.0" and unc_value.get(uncertain, False)) for i in v_keep]
        thr = youden(v_y, [v_scores[i, j] for i in v_keep])
        assert entry["threshold"] == pytest.approx(thr)  # chosen on the validation rows ...
        pred = np.asarray(s) >= thr  # ... applied unchanged to the test rows
        yt = np.asarray(y)
        assert entry["sensitivity"] == pytest.approx((pred & yt).sum() / yt.sum())
        assert entry["specificity"] == pytest.approx((~pred & ~yt).sum() / (~yt).sum())
        assert entry["AUROC_ci"][0] <= entry["AUROC"] <= entry["AUROC_ci"][1]
    assert res["metrics"]["macro_AUROC"] == pytest.approx(np.mean([res["per_finding"][f]["AUROC"] for f in FINDINGS]))
    assert res["rows"]["count"] == 8
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert saved["tasks"]["findings"]["uncertain"] == uncertain


def test_uncertain_policy_changes_counts_as_documented():
    labels = np.array([[1.0, -1.0], [0.0, np.nan], [-1.0, 1.0]])
    truth, scored = apply_policy(labels, "ignore")
    assert scored.tolist() == [[True, False], [True, True], [False, True]]
    assert truth.tolist() == [[True, False], [False, False], [False, True]]
    assert apply_policy(labels, "positive")[0].sum() == 4 and apply_policy(labels, "positive")[1].all()
    assert apply_policy(labels, "negative")[0].sum() == 2


def test_threshold_never_sees_test_rows():
    """The same test scores with two validation sets: the thresholds follow the validation rows only."""
    scores = np.array([[0.1], [0.4], [0.6], [0.9]])
    labels = np.array([[0.0], [1.0], [0.0], [1.0]])
    a = findings_metrics(["x"], scores, labels, np.array([[0.2], [0.3]]), np.array([[0.0], [1.0]]), n_boot=10)
    b = findings_metrics(["x"], scores, labels, np.array([[0.7], [0.8]]), np.array([[0.0], [1.0]]), n_boot=10)
    assert a["per_finding"]["x"]["threshold"] == pytest.approx(0.3)
    assert b["per_finding"]["x"]["threshold"] == pytest.approx(0.8)
    assert a["per_finding"]["x"]["sensitivity"] == 1.0 and b["per_finding"]["x"]["sensitivity"] == 0.5


def test_max_f1_threshold():
    y = np.array([0, 1, 1, 0, 1], dtype=bool)
    s = np.array([0.1, 0.2, 0.5, 0.6, 0.9])
    best = max(sorted(set(s)), key=lambda t: (2 * ((s >= t) & y).sum() / ((s >= t).sum() + y.sum()), -t))
    assert choose_threshold(y, s, "max-f1") == pytest.approx(best)


def test_vectorised_bootstrap_equals_sklearn_on_each_resample():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(3)
    y = rng.random(60) < 0.3
    s = np.round(rng.random(60), 1)  # ties
    counts = next(bootstrap_counts(60, 20, seed=5))
    got = weighted_aurocs(y, s, counts)
    for b in range(20):
        idx = np.repeat(np.arange(60), counts[b])
        want = roc_auc_score(y[idx], s[idx]) if 0 < y[idx].sum() < len(idx) else np.nan
        assert got[b] == pytest.approx(want, nan_ok=True)


def test_pairwise_scores_formula():
    img = np.array([[1.0, 0.0]])
    out = pairwise_scores(img, np.array([[1.0, 0.0]]), np.array([[0.0, 1.0]]), 10.0, -10.0)
    pp, pn = 1 / (1 + math.exp(0)), 1 / (1 + math.exp(10))
    assert out[0, 0] == pytest.approx(pp / (pp + pn))


def test_labels_column_and_bad_values_are_named_skips(tmp_path):
    (tmp_path / "imgs").mkdir()
    from tests.planted import solid_image
    from tests.radiology_fixtures import rgb_of

    for n in range(4):
        solid_image(tmp_path / "imgs" / f"{n}.png", rgb_of(n))
    (tmp_path / "t.csv").write_text("path,labels\nimgs/0.png,Cardiomegaly;Edema\nimgs/1.png,Edema\n"
                                    "imgs/2.png,\nimgs/9.png,Edema\n")
    from fuselip_med.eval.tasks.findings import read_findings_table

    table = read_findings_table(tmp_path / "t.csv")
    assert table.names == ["Cardiomegaly", "Edema"] and table.labels.tolist() == [[1, 1], [0, 1], [0, 0]]
    assert [e.reason for e in table.skipped.entries] == ["missing image"]
    rows_ = [{"n": 0, "Edema": "1.0"}, {"n": 1, "Edema": "yes"}, {"n": 2, "Edema": "2"}, {"n": 3, "Edema": "0.0"}]
    chex = read_findings_table(write_chexpert(tmp_path, "valid", rows_), ["Edema"])
    assert [e.reason for e in chex.skipped.entries] == ["unexpected label value"] * 2
    assert "'yes'" in chex.skipped.entries[0].detail
    with pytest.raises(ValueError):
        parse_label("maybe")


def test_half_rule_and_skipped_csv(tmp_path):
    bad = [{"n": n, "Cardiomegaly": "x", "Edema": "0.0"} for n in range(3)] + [
        {"n": 3, "Cardiomegaly": "1.0", "Edema": "0.0"}]
    test_csv = write_chexpert(tmp_path, "test", bad)
    valid_csv = write_chexpert(tmp_path, "valid", rows(VALID_VECS, VALID_LAB), patient0=64700)
    data = {"findings": test_csv, "findings_valid": valid_csv}
    with pytest.raises(ValueError, match="only 1 of the 4 rows"):
        run_evaluation(planted(), ["findings"], data, tmp_path / "o1", labels=FINDINGS, progress=False)
    run_evaluation(planted(), ["findings"], data, tmp_path / "o2", labels=FINDINGS, progress=False,
                   allow_partial=True, n_boot=10)
    skipped = (tmp_path / "o2" / "skipped.csv").read_text().splitlines()
    assert len(skipped) == 4 and all("unexpected label value" in line for line in skipped[1:])


def test_prompt_file_layout_errors(tmp_path):
    from fuselip_med.eval.findings import PromptFileError

    (tmp_path / "p.yaml").write_text("findings:\n  Edema:\n    positive: [edema]\n")
    with pytest.raises(PromptFileError, match="findings.Edema"):
        read_prompts(tmp_path / "p.yaml")
    default, own = read_prompts(None)
    assert "Pleural Effusion" in own and all("{c}" in t for t in default.positive)


def test_vindr_cxr_tables(tmp_path):
    """VinDr-CXR annotations/image_labels_{train,test}.csv: image_id (+ rad_id in train, one row per radiologist)
    and 0/1 finding columns; images <split>/<image_id>.dicom beside annotations/."""
    from fuselip_med.eval.tasks.findings import read_findings_table
    from tests.test_images import write_ct

    (tmp_path / "annotations").mkdir()
    for split in ("train", "test"):
        (tmp_path / split).mkdir()
    ids = ["000434271f63a053c4128a0ba6352c7f", "00053190460d56c53cc3e57321387478"]
    for split in ("train", "test"):
        for iid in ids:
            write_ct(tmp_path / split / f"{iid}.dicom", np.zeros((8, 8), dtype=np.int16))
    cols = "Aortic enlargement,Atelectasis,Cardiomegaly,No finding"
    (tmp_path / "annotations" / "image_labels_train.csv").write_text(
        f"image_id,rad_id,{cols}\n{ids[0]},R1,0,0,1,0\n{ids[0]},R2,0,1,0,0\n{ids[0]},R3,0,0,0,0\n"
        f"{ids[1]},R8,0,0,0,1\n")
    (tmp_path / "annotations" / "image_labels_test.csv").write_text(
        f"image_id,{cols}\n{ids[0]},0,1,1,0\n{ids[1]},0,0,0,1\n")
    train = read_findings_table(tmp_path / "annotations" / "image_labels_train.csv")
    assert train.names == ["Aortic enlargement", "Atelectasis", "Cardiomegaly", "No finding"]
    assert train.ids == ids and train.n_listed == 2  # three radiologists' rows are one image
    assert train.labels.tolist() == [[0, 1, 1, 0], [0, 0, 0, 1]]
    assert all(p.parent.name == "train" and p.suffix == ".dicom" for p in train.images)
    test = read_findings_table(tmp_path / "annotations" / "image_labels_test.csv")
    assert all(p.parent.name == "test" for p in test.images) and test.labels.tolist() == [[0, 1, 1, 0], [0, 0, 0, 1]]
