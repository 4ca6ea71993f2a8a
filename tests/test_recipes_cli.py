"""Recipe schema errors and overrides, and the fuselip-med CLI as a user runs it."""
import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from fuselip_med.cli import app
from fuselip_med.core.fuselip import FuseLIP, FuseLIPConfig
from fuselip_med.core.pretrained import save_pretrained
from fuselip_med.recipes import RecipeError, apply_overrides, load_recipe, shipped_recipes

runner = CliRunner()

MINIMAL = """
name: mini
model: {size: tiny}
train: {steps: 2, batch_size: 4}
"""


def write(tmp_path, text, name="r.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_unknown_key_is_named_with_the_file(tmp_path):
    path = write(tmp_path, MINIMAL.replace("steps: 2", "steps: 2, lrr: 0.1"))
    with pytest.raises(RecipeError) as error:
        load_recipe(str(path))
    message = str(error.value)
    assert "\n" not in message and str(path) in message and "unknown key 'train.lrr'" in message


def test_wrong_type_is_named_with_the_file(tmp_path):
    path = write(tmp_path, MINIMAL.replace("batch_size: 4", "batch_size: lots"))
    with pytest.raises(RecipeError) as error:
        load_recipe(str(path))
    message = str(error.value)
    assert "\n" not in message and str(path) in message and "'train.batch_size'" in message and "lots" in message


def test_cli_reports_recipe_errors_in_one_line(tmp_path):
    path = write(tmp_path, MINIMAL.replace("size: tiny", "size: tiny, colour: blue"))
    result = runner.invoke(app, ["finetune", "--recipe", str(path)])
    assert result.exit_code == 2
    assert "unknown key 'model.colour'" in " ".join(result.output.split())


def test_overrides_set_nested_keys_and_list_items(tmp_path):
    path = write(tmp_path, MINIMAL + "data:\n  train:\n    - {name: rocov2, path: a}\n")
    recipe = load_recipe(str(path), ["train.lr=3e-4", "data.train.0.path=b", "model.lora.enabled=true"], size="small")
    assert recipe.train.lr == 3e-4 and recipe.data.train[0].path == "b" and recipe.model.lora.enabled
    assert recipe.model.size == "small"
    with pytest.raises(RecipeError, match="not an index"):
        apply_overrides({"data": {"train": []}}, ["data.train.3.path=x"])
    with pytest.raises(RecipeError, match="key=value"):
        apply_overrides({}, ["train.lr"])


def test_shipped_recipes_load_and_fill_the_size():
    assert {"rocov2", "rocov2_lora", "rocov2_demo"} <= set(shipped_recipes())
    small, base = load_recipe("rocov2", size="small"), load_recipe("rocov2", size="base")
    assert small.model.init == "chs20/FuseLIP-S-CC3M-MM" and base.model.init == "chs20/FuseLIP-B-CC3M-MM"
    assert str(base.run_dir()) == "runs/rocov2_base"
    assert load_recipe("rocov2_lora").model.lora.enabled
    with pytest.raises(RecipeError, match="No recipe named"):
        load_recipe("nope")


def test_every_command_has_help():
    for command in (["--help"], ["info", "--help"], ["finetune", "--help"], ["train", "--help"], ["eval", "--help"],
                    ["embed", "--help"], ["merge-lora", "--help"], ["data", "demo", "--help"]):
        result = runner.invoke(app, command)
        assert result.exit_code == 0, command
        assert "Usage" in result.output


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("model") / "tiny"
    save_pretrained(FuseLIP(FuseLIPConfig.from_size("tiny")), directory)
    return directory


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "demo"
    result = runner.invoke(app, ["data", "demo", "--out", str(out), "--n-train", "8", "--n-valid", "8",
                                 "--n-test", "12",
                                 "--n-dicom", "1"])
    assert result.exit_code == 0, result.output
    return out


def test_info_shows_a_saved_model(tiny_model_dir):
    result = runner.invoke(app, ["info", str(tiny_model_dir)])
    assert result.exit_code == 0
    assert "safetensors" in result.output and "3,331,651" in result.output


def test_eval_writes_metrics_report_and_plots(tmp_path, tiny_model_dir, demo):
    out = tmp_path / "eval"
    result = runner.invoke(app, ["eval", "--model", str(tiny_model_dir), "--data", f"rocov2={demo}", "--tasks",
                                 "rocov2-retrieval,rocov2-modality", "--out", str(out), "--pool-size", "5",
                                 "--n-pools", "2", "--num-workers", "0"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["tasks"]["rocov2-retrieval"]["pool_size"] == 5
    assert (out / "report.md").exists() and list((out / "plots").glob("*.png"))


def test_eval_rejects_bad_data_argument(tiny_model_dir):
    result = runner.invoke(app, ["eval", "--model", str(tiny_model_dir), "--data", "rocov2"])
    assert result.exit_code == 2 and "KEY=PATH" in result.output


def test_embed_images_from_a_csv(tmp_path, tiny_model_dir, demo):
    images = sorted((demo / "test_images").rglob("*.jpg"))[:5]
    csv = tmp_path / "mine.csv"
    csv.write_text("path,caption\n" + "".join(f"{p},case {i}\n" for i, p in enumerate(images)) + "missing.png,gone\n")
    out = tmp_path / "emb.npy"
    result = runner.invoke(app, ["embed", "--model", str(tiny_model_dir), "--input", str(csv), "--out", str(out),
                                 "--num-workers", "0", "--image-root", str(demo)])
    assert result.exit_code == 0, result.output
    matrix = np.load(out)
    ids = json.loads(out.with_suffix(".ids.json").read_text())["ids"]
    assert matrix.shape == (5, 64) and len(ids) == 5
    assert np.allclose(np.linalg.norm(matrix, axis=1), 1.0, atol=1e-5)
    assert "1 missing image (e.g. missing.png)" in " ".join(result.output.split())


def test_embed_texts_to_parquet(tmp_path, tiny_model_dir, demo):
    import pyarrow.parquet as pq

    images = sorted((demo / "test_images").rglob("*.jpg"))[:3]
    csv = tmp_path / "mine.csv"
    csv.write_text("path,caption\n" + "".join(f"{p},report {i}\n" for i, p in enumerate(images)))
    out = tmp_path / "emb.parquet"
    result = runner.invoke(app, ["embed", "-m", str(tiny_model_dir), "-i", str(csv), "-o", str(out), "--kind", "text"])
    assert result.exit_code == 0, result.output
    table = pq.read_table(out)
    assert table.num_rows == 3 and table.column("text").to_pylist() == ["report 0", "report 1", "report 2"]


def test_pyproject_lists_every_subpackage():
    from pathlib import Path

    tomllib = pytest.importorskip("tomllib")

    root = Path(__file__).resolve().parents[1]
    listed = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(root).parts) for p in (root / "fuselip_med").rglob("__init__.py")}
    assert found <= listed, f"add {sorted(found - listed)} to [tool.setuptools] packages"


def test_bare_resume_means_latest():
    from fuselip_med.cli import with_resume_value

    assert with_resume_value(["finetune", "--resume"]) == ["finetune", "--resume", "latest"]
    assert with_resume_value(["finetune", "--resume", "--set", "a=1"]) == [
        "finetune", "--resume", "latest", "--set", "a=1"]
    assert with_resume_value(["finetune", "--resume", "runs/x"]) == ["finetune", "--resume", "runs/x"]


def test_setting_steps_replaces_the_recipes_epochs_and_the_reverse(tmp_path):
    recipe = load_recipe("rocov2_lora", ["train.steps=3"])
    assert recipe.train.steps == 3 and recipe.train.epochs is None
    path = write(tmp_path, MINIMAL)
    recipe = load_recipe(str(path), ["train.epochs=2.5"])
    assert recipe.train.epochs == 2.5 and recipe.train.steps is None
    with pytest.raises(RecipeError, match="exactly one of train.steps or train.epochs"):
        load_recipe(str(path), ["train.epochs=2", "train.steps=4"])
    recipe = load_recipe(str(path), ["train.epochs=2", "train.steps=null"])
    assert recipe.train.epochs == 2 and recipe.train.steps is None


def test_finetune_shipped_recipe_with_steps_override_runs_that_many_steps(tmp_path, demo):
    from fuselip_med.core.checkpoints import export_reference

    torch.manual_seed(0)
    export_reference(FuseLIP(FuseLIPConfig.from_size("tiny")).eval(), tmp_path / "released")
    run_dir = tmp_path / "run"
    settings = [f"model.init={tmp_path / 'released'}", f"data.root={demo}", "train.steps=3", "train.batch_size=4",
                "train.warmup_steps=1", "train.precision=fp32", "train.log_every=1", "data.num_workers=0",
                "eval.at_start=false", "eval.at_end=false", "logging.trackers=[jsonl]", "logging.progress=false",
                f"output.dir={run_dir}"]
    result = runner.invoke(app, ["finetune", "--recipe", "rocov2_lora", "--size", "tiny",
                                 *[arg for s in settings for arg in ("--set", s)]])
    assert result.exit_code == 0, result.output
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
             if "train/loss" in line]
    assert steps == [1, 2, 3]


def test_a_data_root_that_no_path_uses_is_named_not_silently_ignored(caplog):
    """`finetune --recipe rocov2_demo --set data.root=/data` trained on the built-in demo and ignored the root
    without a word. Now a warning names it (not an error: the Docker entrypoint sets data.root for any recipe)."""
    import logging

    from fuselip_med.recipes import find_recipe, load_recipe

    with caplog.at_level(logging.WARNING, logger="fuselip_med.recipes"):
        load_recipe(find_recipe("rocov2_demo"), overrides=["data.root=/data"])
        assert any("data.root '/data' has no effect" in r.getMessage() for r in caplog.records)
        caplog.clear()
        load_recipe(find_recipe("rocov2"), overrides=["data.root=/data"])  # a recipe whose paths use the root
        assert caplog.records == []


def test_an_empty_eval_task_list_is_refused_before_training(tmp_path):
    """Before: `--set eval.tasks=[]` loaded, trained every step, then failed at the final evaluation with
    "unknown evaluation task(s) []" (no final/ model written)."""
    from fuselip_med.errors import UsageError
    from fuselip_med.eval.runner import check_tasks

    with pytest.raises(RecipeError, match="eval.tasks is empty"):
        load_recipe("rocov2_demo", ["eval.tasks=[]"])
    with pytest.raises(UsageError, match="no evaluation task given"):
        check_tasks([], {})


@pytest.mark.parametrize("command", ["radcrepe", "export", "embed-series"])
def test_an_output_under_a_file_is_one_line_before_work(command, tmp_path, tiny_model_dir, demo):
    """Before: `data radcrepe` (NotADirectoryError), `export` (FileExistsError) and `embed --unit series` wrote
    only after the work and died with a traceback when --out could not be created."""
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    (tmp_path / "series").mkdir()
    args = {"radcrepe": ["data", "radcrepe", "--input", str(demo), "--out", str(blocker / "rc")],
            "export": ["export", "-m", str(tiny_model_dir), "--out", str(blocker / "ex")],
            "embed-series": ["embed", "-m", str(tiny_model_dir), "-i", str(tmp_path / "series"), "--unit", "series",
                             "-o", str(blocker / "e.npy")]}[command]
    result = runner.invoke(app, args)
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1 and "cannot write to" in lines[0], result.output


def test_radcrepe_bad_limit_and_split_are_one_line(tmp_path, demo):
    """Before: `data radcrepe --limit -1` (or 0) wrote five empty JSON files as if done, and `--split nosuch`
    was a ValueError traceback from the ROCOv2 adapter (the Visual Genome adapter's alike)."""
    from fuselip_med.data.adapters.visual_genome import check_split
    from fuselip_med.errors import UserError

    for extra, code, message in ((["--limit", "-1"], 2, "--limit -1: give 1 or more"),
                                 (["--limit", "0"], 2, "--limit 0: give 1 or more"),
                                 (["--split", "nosuch"], 1, "unknown ROCOv2 split 'nosuch'")):
        out = tmp_path / f"rc{extra[1]}"
        result = runner.invoke(app, ["data", "radcrepe", "--input", str(demo), "--out", str(out), *extra])
        lines = result.output.strip().splitlines()
        assert result.exit_code == code and len(lines) == 1 and message in lines[0], result.output
        assert not list(out.glob("*.json"))
    with pytest.raises(UserError, match="unknown Visual Genome split"):
        check_split("nosuch")
