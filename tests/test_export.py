"""`fuselip-med export` on the tiny model: the ONNX graphs embed like PyTorch within the gate, a planted defect is
caught by the gate and nothing final is written, and `--runtime onnx` indexes are searched like PyTorch ones."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pydicom
import pytest
import torch
from typer.testing import CliRunner

from fuselip_med.cli import app
from fuselip_med.core.fuselip import FuseLIP, FuseLIPConfig
from fuselip_med.core.loading import load_model
from fuselip_med.core.pretrained import save_pretrained
from fuselip_med.export import onnx as export_onnx
from fuselip_med.export.gate import (
    ExportRejected,
    ExportSetupError,
    ReferenceSet,
    Tolerances,
    demo_reference,
    gated_export,
    judge,
)
from fuselip_med.export.quantize import Int8Settings, titok_block_matmuls
from fuselip_med.export.runtime import OnnxFuseLIP, export_fingerprint
from fuselip_med.search.index import open_index
from tests.search_helpers import make_folder

pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
runner = CliRunner()
REFERENCE_SIZE = 16


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny FuseLIP checkpoint and its fp32 export, published by the gate."""
    root = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    model_dir = save_pretrained(FuseLIP(FuseLIPConfig.from_size("tiny")).eval(), root / "model")
    model, _, _ = load_model(model_dir)
    reference = demo_reference(REFERENCE_SIZE)
    result = gated_export(model, root / "fp32", reference, source={"name": str(model_dir), "fingerprint": "x"})
    return root, model_dir, model, reference, result


def copying_writer(source_dir, perturb: bool):
    """A ``write_export`` that copies a finished export (fast) and, with ``perturb``, then adds noise to the TiTok
    graph's ``conv_out`` weight: the planted defect of "weights perturbed after export"."""
    import onnx
    from onnx import numpy_helper

    def write(model, directory, **_):  # what write_export writes: no gate report or card
        shutil.copytree(source_dir, directory, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("export_report.json", "README.md"))
        if perturb:
            path = directory / export_onnx.TITOK_GRAPH
            graph = onnx.load(str(path))
            for init in graph.graph.initializer:
                if "conv_out.weight" in init.name:
                    weight = numpy_helper.to_array(init)
                    noisy = weight + np.random.default_rng(0).normal(0, weight.std(), weight.shape).astype(weight.dtype)
                    init.CopyFrom(numpy_helper.from_array(noisy, init.name))
            onnx.save(graph, str(path))

    return write


def test_fp32_export_writes_graphs_tokenizer_config_report_and_card(exported):
    root, model_dir, _, _, result = exported
    out = root / "fp32"
    assert result.path == out and result.report["passed"] and not result.report["failures"]
    names = {p.name for p in out.iterdir()}
    assert {"titok.onnx", "encoder.onnx", "config.json", "bpe_simple_vocab_16e6.txt.gz", "export_report.json",
            "README.md"} <= names
    config = json.loads((out / "config.json").read_text())
    assert config["precision"] == "fp32" and config["model"]["transformer_size"] == "tiny"
    report = json.loads((out / "export_report.json").read_text())
    figures = report["figures"]
    assert figures["n_images"] >= REFERENCE_SIZE and figures["code_agreement"] >= 0.999
    assert report["fingerprint"] == export_fingerprint(out)
    card = (out / "README.md").read_text()
    assert "Quality gate: passed" in card and "code agreement" in card and f"{figures['code_agreement']:.4%}" in card
    assert not [p for p in root.iterdir() if ".tmp-" in p.name]  # the staging folder is gone


def test_export_embeds_like_pytorch_within_the_gate_for_any_batch_and_length(exported):
    root, _, model, _, _ = exported
    onnx_model = OnnxFuseLIP(root / "fp32")
    tolerance = Tolerances.for_precision("fp32")
    generator = torch.Generator().manual_seed(3)
    for batch in (1, 5):
        pixels = torch.rand(batch, 3, 256, 256, generator=generator)
        texts = ["a chest x-ray " * (1 + 7 * i) for i in range(batch)]  # lengths from 6 ids to the context cut
        assert (onnx_model.image_codes(pixels) == model.image_codes(pixels)).all()
        for inputs in ({"images": pixels}, {"texts": texts}, {"images": pixels, "texts": texts},
                       {"images": [pixels[0], None][:batch], "texts": texts[:2]}):
            got, expected = onnx_model.encode(**inputs), model.encode(**inputs)
            assert got.shape == expected.shape
            cosine = torch.nn.functional.cosine_similarity(got, expected)
            assert cosine.min() >= tolerance.min_cosine, inputs.keys()


def test_perturbed_weights_are_caught_and_nothing_final_is_written(exported, monkeypatch, tmp_path):
    root, _, model, reference, _ = exported
    monkeypatch.setattr(export_onnx, "write_export", copying_writer(root / "fp32", perturb=True))
    with pytest.raises(ExportRejected, match="code agreement .* < 99.9000%") as caught:
        gated_export(model, tmp_path / "out", reference, source={"name": "tiny", "fingerprint": "x"})
    assert "cosine min" in str(caught.value)
    assert list(tmp_path.iterdir()) == []  # neither the export nor its staging folder
    with pytest.raises(ExportRejected, match="out.rejected"):
        gated_export(model, tmp_path / "out", reference, source={"name": "tiny", "fingerprint": "x"},
                     keep_rejected=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.rejected"]
    report = json.loads((tmp_path / "out.rejected" / "export_report.json").read_text())
    assert not report["passed"] and report["figures"]["code_agreement"] < 0.999
    assert "Quality gate: FAILED" in (tmp_path / "out.rejected" / "README.md").read_text()
    from fuselip_med.export.runtime import ExportRejectedError, OnnxFuseLIP

    with pytest.raises(ExportRejectedError, match="missed its quality gate .*code agreement"):
        OnnxFuseLIP(tmp_path / "out.rejected")  # kept for inspection: embed/index build/search refuse it


def test_cli_export_exits_1_naming_the_failing_figure(exported, monkeypatch, tmp_path):
    root, model_dir, _, _, _ = exported
    monkeypatch.setattr(export_onnx, "write_export", copying_writer(root / "fp32", perturb=True))
    args = ["export", "-m", str(model_dir), "--out", str(tmp_path / "out"), "--reference-size", str(REFERENCE_SIZE)]
    result = runner.invoke(app, args)
    assert result.exit_code == 1, result.output
    assert "code agreement" in result.output and "Nothing was written" in result.output
    assert not (tmp_path / "out").exists()
    monkeypatch.setattr(export_onnx, "write_export", copying_writer(root / "fp32", perturb=False))
    result = runner.invoke(app, [*args, "--min-cosine", "0.99999"])
    assert result.exit_code == 0, result.output
    assert "gate passed" in result.output and (tmp_path / "out" / "export_report.json").is_file()
    assert json.loads((tmp_path / "out" / "export_report.json").read_text())["tolerances"]["min_cosine"] == 0.99999


def test_cli_export_refuses_bad_settings_before_work(exported, tmp_path):
    _, model_dir, _, _, _ = exported
    for extra, message, code in ((["--precision", "fp16"], "--precision", 2), (["--format", "tflite"], "--format", 2),
                                 (["--min-cosine", "2"], "--min-cosine", 1)):
        result = runner.invoke(app, ["export", "-m", str(model_dir), "--out", str(tmp_path / "o"), *extra])
        assert result.exit_code == code and message in result.output, result.output
        assert not (tmp_path / "o").exists()
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    result = runner.invoke(app, ["export", "-m", str(model_dir), "--out", str(tmp_path / "busy"),
                                 "--reference-size", "2"])
    assert result.exit_code == 1 and "not an ONNX export" in result.output
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"
    # checked before the model loads: a model that does not exist is not even looked at
    result = runner.invoke(app, ["export", "-m", str(tmp_path / "no_model"), "--out", str(tmp_path / "busy")])
    assert result.exit_code == 1 and "not an ONNX export" in result.output, result.output


def test_cli_export_of_a_model_whose_config_is_empty_is_one_line_naming_config_json(exported, tmp_path):
    """config.json `{}` names no architecture: one error line naming it (before: FuseLIP-S assumed, then a
    many-hundred-key mismatch report of the weights)."""
    _, model_dir, _, _, _ = exported
    model = tmp_path / "model"
    shutil.copytree(model_dir, model)
    (model / "config.json").write_text("{}")
    result = runner.invoke(app, ["export", "-m", str(model), "--out", str(tmp_path / "out")])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert f"{model / 'config.json'} is not a valid FuseLIPConfig: it names no architecture" in " ".join(lines)
    assert not (tmp_path / "out").exists()


def test_damaged_export_folders_are_one_error_line_naming_the_file(exported, tmp_path):
    """--runtime onnx on a damaged export: a truncated graph, a folder with only config.json, the TiTok graph
    copied over the encoder (with and without the gate's report), config.json without its fields, and a graph
    changed after the gate (its sha256 no longer the recorded one): one `error:` line naming the file, exit 1
    (before: InvalidProtobuf / FileNotFoundError / ValueError tracebacks)."""
    root, _, _, _, _ = exported
    folder = make_folder(tmp_path / "images")
    good = root / "fp32"
    assert "encoder.onnx" in json.loads((good / "export_report.json").read_text())["graphs"]
    cases = {}

    def copy(name):
        shutil.copytree(good, tmp_path / name)
        return tmp_path / name

    truncated = copy("truncated")
    (truncated / "encoder.onnx").write_bytes((good / "encoder.onnx").read_bytes()[:5000])
    (truncated / "export_report.json").unlink()  # no recorded sha256: ONNX Runtime's own refusal is named
    cases[truncated] = "encoder.onnx is not a readable ONNX graph"
    config_only = tmp_path / "config_only"
    config_only.mkdir()
    shutil.copy(good / "config.json", config_only / "config.json")
    cases[config_only] = "bpe_simple_vocab_16e6.txt.gz is missing"
    swapped = copy("swapped")
    shutil.copy(good / "titok.onnx", swapped / "encoder.onnx")
    cases[swapped] = "encoder.onnx changed since the export passed its quality gate"
    swapped_unrecorded = copy("swapped_unrecorded")
    shutil.copy(good / "titok.onnx", swapped_unrecorded / "encoder.onnx")
    (swapped_unrecorded / "export_report.json").unlink()
    cases[swapped_unrecorded] = "encoder.onnx takes pixels, not input_ids"
    empty_fields = copy("empty_fields")
    (empty_fields / "config.json").write_text(json.dumps({"format": "fuselip_med-onnx"}))
    cases[empty_fields] = "config.json is damaged"
    for export, words in cases.items():
        result = runner.invoke(app, ["embed", "--runtime", "onnx", "-m", str(export), "-i", str(folder), "-o",
                                     str(tmp_path / "e.npy")])
        lines = result.output.strip().splitlines()
        assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("error:"), result.output
        assert words in " ".join(result.output.split()), result.output
    assert not (tmp_path / "e.npy").exists()


@pytest.fixture(scope="module")
def indexes(exported):
    """The same folder indexed with PyTorch and with the ONNX export."""
    root, model_dir, _, _, _ = exported
    folder = make_folder(root / "images", patterned=True)
    for runtime, model in (("pytorch", model_dir), ("onnx", root / "fp32")):
        if runtime == "onnx":  # the same salt, so the DICOM row has the same instance key in both indexes
            (root / "index_onnx" / ".work").mkdir(parents=True, exist_ok=True)
            (root / "index_onnx" / ".work" / "salt").write_text(open_index(root / "index_pytorch").manifest["salt"])
        result = runner.invoke(app, ["index", "build", "--runtime", runtime, "--model", str(model), "--input",
                                     str(folder), "--out", str(root / f"index_{runtime}"), "--device", "cpu"])
        assert result.exit_code == 0, result.output
    return root, folder, model_dir


def _search(index, *args):
    result = runner.invoke(app, ["search", "--index", str(index), "--json", "-k", "5", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_onnx_index_records_its_runtime_and_is_searched_like_the_pytorch_index(indexes):
    root, folder, _ = indexes
    onnx_index = open_index(root / "index_onnx")
    assert onnx_index.model.runtime == "onnx" and onnx_index.model.fingerprint == export_fingerprint(root / "fp32")
    assert open_index(root / "index_pytorch").model.runtime == "pytorch"
    for query in (["--text", "a red square"], ["--image", str(folder / "green.png")],
                  ["--image", str(folder / "ct.dcm"), "--text", "the same slice"]):
        with_pytorch, with_onnx = _search(root / "index_pytorch", *query), _search(root / "index_onnx", *query)
        assert [h["id"] for h in with_onnx] == [h["id"] for h in with_pytorch], query
        assert np.allclose([h["score"] for h in with_onnx], [h["score"] for h in with_pytorch], atol=2e-3)


def test_a_query_with_another_runtime_is_refused(indexes):
    root, folder, model_dir = indexes
    result = runner.invoke(app, ["search", "--index", str(root / "index_onnx"), "--runtime", "pytorch",
                                 "--model", str(model_dir), "--text", "red"])
    assert result.exit_code == 1 and "runtime onnx" in result.output and "--runtime onnx" in result.output
    result = runner.invoke(app, ["index", "build", "--runtime", "onnx", "--model", str(root / "fp32"), "--input",
                                 str(folder), "--out", str(root / "index_pytorch"), "--device", "cpu"])
    assert result.exit_code == 1 and "--rebuild" in result.output
    result = runner.invoke(app, ["search", "--index", str(root / "index_pytorch"), "--runtime", "onnx",
                                 "--model", str(model_dir), "--text", "red"])
    assert result.exit_code == 1 and "not an ONNX export" in result.output


def test_embed_with_runtime_onnx_equals_pytorch_within_the_gate(indexes, tmp_path):
    root, folder, model_dir = indexes
    vectors = {}
    for runtime, model in (("pytorch", model_dir), ("onnx", root / "fp32")):
        out = tmp_path / f"{runtime}.npy"
        result = runner.invoke(app, ["embed", "--runtime", runtime, "-m", str(model), "-i", str(folder), "--kind",
                                     "pair", "-o", str(out), "--device", "cpu", "--num-workers", "0"])
        assert result.exit_code == 0, result.output
        vectors[runtime] = np.load(out)
    assert vectors["onnx"].shape == vectors["pytorch"].shape == (5, 64)
    assert (np.sum(vectors["onnx"] * vectors["pytorch"], axis=1) >= Tolerances.for_precision("fp32").min_cosine).all()


@pytest.mark.slow
def test_int8_of_both_graphs_breaks_tiny_codes_and_is_rejected_encoder_scope_passes(exported, tmp_path):
    """The tiny TiTok's codes flip under int8 (measured: ~16% of codes): the default int8 gate rejects it;
    with the TiTok graph kept fp32 (--int8-scope encoder) the codes are exact and the cosine bound holds. R@1 is
    left unchecked here: on 18 reference images one swapped rank of this untrained model is 5.6 points."""
    _, _, model, reference, _ = exported
    with pytest.raises(ExportRejected, match="image cosine min"):
        gated_export(model, tmp_path / "all", reference, source={"name": "tiny", "fingerprint": "x"},
                     precision="int8")
    assert not (tmp_path / "all").exists()
    result = gated_export(model, tmp_path / "encoder", reference, source={"name": "tiny", "fingerprint": "x"},
                          precision="int8", int8=Int8Settings(scope="encoder"), tolerances=Tolerances(None, 0.99, None))
    assert result.report["passed"] and result.report["figures"]["code_agreement"] == 1.0
    assert min(v["min"] for v in result.report["figures"]["cosine"].values()) >= 0.99
    assert json.loads((tmp_path / "encoder" / "config.json").read_text())["int8"]["scope"] == "encoder"


def test_calibration_folder_is_the_reference_set_and_undecodable_images_are_named(tmp_path):
    from fuselip_med.export.gate import folder_reference

    folder = make_folder(tmp_path / "calibration")
    (folder / "broken.png").write_bytes(b"not a png")
    (folder / "broken.png.txt").write_text("a broken file")
    reference = folder_reference(folder)
    assert len(reference) == 5 and tuple(reference.pixels.shape) == (5, 3, 256, 256)
    assert "a red square" in reference.texts
    # a skipped file is named by a salted key, never its path, with DICOM in the folder (ct.dcm) or without
    assert list(reference.skipped.values()) == ["corrupt image"]
    assert all(key.startswith("file-") for key in reference.skipped)
    assert len(folder_reference(folder, limit=3)) <= 3
    (folder / "ct.dcm").unlink()
    assert [key[:5] for key in folder_reference(folder).skipped] == ["file-"]


@pytest.mark.parametrize("with_dicom", [True, False], ids=["dicom-and-png", "png-only"])
def test_cli_export_writes_no_path_of_a_calibration_file(exported, monkeypatch, tmp_path, with_dicom):
    """A PACS export names folders and files after patients (PNGs saved from a viewer too): export_report.json,
    the model card and config.json name the folder the user typed and skipped files by salted keys (``im-`` for
    DICOM, ``file-`` for any other file, with or without DICOM in the set), never a path inside the folder."""
    root, model_dir, _, _, _ = exported
    monkeypatch.setattr(export_onnx, "write_export", copying_writer(root / "fp32", perturb=False))
    patient = make_folder(tmp_path / "calib" / "Doe_John")
    if with_dicom:
        other = pydicom.dcmread(patient / "ct.dcm")
        other.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.77"
        other.save_as(patient / "Doe_John_bad.dcm")
        (patient / "Doe_John_bad.dcm").write_bytes((patient / "Doe_John_bad.dcm").read_bytes()[:-300])
        (patient / "Doe_John_bad.dcm.txt").write_text("a truncated slice")
    else:
        (patient / "ct.dcm").unlink()
        (patient / "ct.dcm.txt").unlink()
    (patient / "Doe_John_broken.png").write_bytes(b"not a png")
    (patient / "Doe_John_broken.png.txt").write_text("a broken file")
    out = tmp_path / "out"
    result = runner.invoke(app, ["export", "-m", str(model_dir), "--out", str(out), "--calibration",
                                 str(tmp_path / "calib")])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "export_report.json").read_text())
    assert report["reference"]["source"] == str(tmp_path / "calib")
    assert report["reference"]["n_images"] == (5 if with_dicom else 4)
    expected = {"corrupt image": "file-", **({"truncated image": "im-"} if with_dicom else {})}
    assert {reason: key[:len(expected[reason])] for key, reason in report["reference"]["skipped"].items()} == expected
    for written in out.iterdir():
        if written.suffix in (".json", ".md"):
            assert "Doe_John" not in written.read_text(), written.name


def traced_writer(source_dir):
    """A ``write_export`` that reuses the fp32 trace in ``source_dir`` (fast); the quantization itself runs."""
    write_export = export_onnx.write_export

    def write(model, directory, **kwargs):
        return write_export(model, directory, traced=source_dir, **kwargs)

    return write


def test_static_int8_of_the_encoder_passes_and_records_its_calibration(exported, monkeypatch, tmp_path):
    root, _, model, reference, _ = exported
    monkeypatch.setattr(export_onnx, "write_export", traced_writer(root / "fp32"))
    result = gated_export(model, tmp_path / "static", reference, source={"name": "tiny", "fingerprint": "x"},
                          precision="int8", int8=Int8Settings(mode="static", scope="encoder"), calibration_size=8)
    figures = result.report["figures"]
    assert result.report["passed"] and figures["code_agreement"] == 1.0
    assert min(v["min"] for v in figures["cosine"].values()) >= 0.99
    assert result.report["calibration"]["n_images"] == 8
    int8 = json.loads((tmp_path / "static" / "config.json").read_text())["int8"]
    assert int8["mode"] == "static" and int8["format"] == "QDQ" and int8["calibration_method"] == "minmax"
    assert int8["quantized_graphs"] == ["encoder.onnx"] and int8["calibration_images"] == 8
    import onnx

    ops = {node.op_type for node in onnx.load(str(tmp_path / "static" / "encoder.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops  # QDQ: activations really are int8


def test_static_int8_calibrated_on_constant_images_is_caught(exported, monkeypatch, tmp_path):
    """The planted bad calibration: flat grey images with empty captions give activation ranges far narrower
    than real inputs', so real rows are clipped. Calibrated on the reference images the same setting passes
    (previous test); calibrated flat, every row kind drifts several times further (measured: cosine min 0.994
    against 0.999) and an R@1 rank flips, so the default gate rejects it and nothing is written."""
    root, _, model, reference, _ = exported
    monkeypatch.setattr(export_onnx, "write_export", traced_writer(root / "fp32"))
    flat = ReferenceSet(reference.ids, torch.full_like(reference.pixels, 0.5), [""] * len(reference), "flat grey")
    with pytest.raises(ExportRejected, match="R@1 change") as caught:
        gated_export(model, tmp_path / "bad", reference, source={"name": "tiny", "fingerprint": "x"},
                     precision="int8", int8=Int8Settings(mode="static", scope="encoder"), calibration=flat,
                     calibration_size=8, keep_rejected=True)
    assert "Nothing was written" in str(caught.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.rejected"]
    report = json.loads((tmp_path / "bad.rejected" / "export_report.json").read_text())
    assert report["calibration"]["source"] == "flat grey"
    assert min(v["min"] for v in report["figures"]["cosine"].values()) < 0.997
    assert judge(report["figures"], Tolerances(None, 0.998, None))  # a tighter bound names cosine


def test_titok_fp32_blocks_exclude_their_matmuls_from_int8(exported, monkeypatch, tmp_path):
    """With all of the tiny TiTok's blocks kept fp32 (scope all), only fp32 operations are left in the TiTok
    graph, so the codes are exact; a block count beyond the model is refused before any work."""
    root, _, model, reference, _ = exported
    assert len(titok_block_matmuls(root / "fp32" / "titok.onnx", 2)) == 12
    assert titok_block_matmuls(root / "fp32" / "titok.onnx", 0) == []
    monkeypatch.setattr(export_onnx, "write_export", traced_writer(root / "fp32"))
    result = gated_export(model, tmp_path / "kept", reference, source={"name": "tiny", "fingerprint": "x"},
                          precision="int8", int8=Int8Settings(titok_fp32_blocks=2),
                          tolerances=Tolerances(1.0, 0.99, None))
    assert result.report["figures"]["code_agreement"] == 1.0
    assert len(json.loads((tmp_path / "kept" / "config.json").read_text())["int8"]["titok_fp32_matmuls"]) == 12
    with pytest.raises(ExportSetupError, match="has 2 blocks"):
        gated_export(model, tmp_path / "more", reference, source={"name": "tiny", "fingerprint": "x"},
                     precision="int8", int8=Int8Settings(titok_fp32_blocks=3))


def test_cli_export_refuses_bad_int8_settings_before_work(exported, tmp_path):
    _, model_dir, _, _, _ = exported
    for extra, message in ((["--int8-mode", "qat"], "--int8-mode"),
                           (["--calibration-method", "kl"], "--calibration-method"),
                           (["--titok-fp32-blocks", "-1"], "--titok-fp32-blocks"),
                           (["--calibration-size", "0"], "--calibration-size")):
        result = runner.invoke(app, ["export", "-m", str(model_dir), "--precision", "int8", "--out",
                                     str(tmp_path / "o"), *extra])
        assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "o").exists()
