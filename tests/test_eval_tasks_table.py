"""The evaluation task table drives the runner, the CLI help, the errors and the recipes' checks."""
import pytest
from typer.testing import CliRunner

from fuselip_med.cli import app
from fuselip_med.eval.runner import check_tasks
from fuselip_med.eval.tasks import ROLES, SUITES, TABLE, TASKS, get_task, missing_roles, runner_of
from fuselip_med.eval.tasks.context import resolve_data


def test_every_task_of_the_table_is_in_eval_help():
    result = CliRunner().invoke(app, ["eval", "--help"], terminal_width=4000, env={"COLUMNS": "4000"})
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    for task in TABLE:
        assert task.name in text, task.name
        assert task.help.split(":")[0] in text


def test_every_runner_imports_and_every_role_is_known():
    for task in TABLE:
        assert callable(runner_of(task))
        for entry in task.roles:
            assert set(entry.split("|")) <= set(ROLES), task.name
    assert set(SUITES["paper"]) <= set(TASKS)


def test_data_keys_map_to_roles():
    roles = resolve_data({"rocov2": "R", "labelled:csv": "t.csv", "mmeb": "M"})
    assert (roles["test"].adapter, roles["test"].split) == ("rocov2", "test")
    assert (roles["valid"].adapter, roles["valid"].split) == ("rocov2", "valid")
    assert (roles["labelled"].adapter, roles["labelled"].value) == ("csv", "t.csv")
    assert roles["mmeb"].adapter is None
    folder = resolve_data({"folder": "D", "test": "T"})
    assert folder["labelled"].adapter == "folder" and folder["test"].value == "T"  # explicit roles win
    assert resolve_data({"rocov2_test": "X"})["test"].adapter == "rocov2"  # the old key still works
    with pytest.raises(ValueError, match="neither a data role"):
        resolve_data({"nonsense": "x"})


def test_missing_roles_come_from_the_table():
    assert missing_roles(get_task("rocov2-concepts"), ["test"]) == ["valid"]
    assert missing_roles(get_task("tgit"), ["test"]) == []
    with pytest.raises(ValueError, match="'valid' or 'rocov2_valid'"):
        check_tasks(["rocov2-concepts"], {"rocov2_test": "x"})
    with pytest.raises(ValueError, match="needs data 'mmeb'"):
        check_tasks(["mmeb"], {"folder": "x"})


def test_cli_names_missing_roles_in_one_line(tmp_path):
    result = CliRunner().invoke(app, ["eval", "--model", "tiny", "--tasks", "zero-shot", "--data",
                                      f"mmeb={tmp_path}"])
    assert result.exit_code == 2
    assert "error:" in result.output and "'labelled'" in result.output


def test_recipes_reject_unknown_eval_tasks(tmp_path):
    from fuselip_med.recipes import RecipeError, load_recipe

    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: r\nmodel: {size: tiny}\ntrain: {steps: 1, batch_size: 2}\neval: {tasks: [nope]}\n")
    with pytest.raises(RecipeError, match="nope"):
        load_recipe(str(recipe))


def test_recipes_check_eval_data_roles(tmp_path):
    from fuselip_med.recipes import RecipeError, load_recipe

    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: r\nmodel: {size: tiny}\ntrain: {steps: 1, batch_size: 2}\n"
                      "data: {eval: [{name: rocov2, id: rocov2_test, path: x, split: valid}]}\n"
                      "eval: {tasks: [rocov2-retrieval, rocov2-concepts]}\n")
    with pytest.raises(RecipeError, match="rocov2-concepts.*valid"):
        load_recipe(str(recipe))
    recipe.write_text(recipe.read_text().replace(", rocov2-concepts", ""))
    assert load_recipe(str(recipe)).eval.tasks == ["rocov2-retrieval"]


def test_suite_data_root_maps_publisher_folders_to_roles(tmp_path):
    from fuselip_med.eval.command import choose_tasks, suite_data

    (tmp_path / "MMEB-eval").mkdir()
    (tmp_path / "cc3m").mkdir()
    (tmp_path / "cc3m" / "cc3m_validation.csv").write_text("path,caption\n")
    assert choose_tasks(None, "paper", False) == list(SUITES["paper"])
    assert choose_tasks(None, None, True) == ["zero-shot"]
    assert suite_data("paper", tmp_path, ["mmeb", "tgit", "zero-shot"]) == {
        "mmeb": str(tmp_path / "MMEB-eval"), "tgit:cc": str(tmp_path / "cc3m" / "cc3m_validation.csv")}
    with pytest.raises(ValueError, match="imagenet"):
        suite_data("paper", tmp_path, ["mmeb", "imagenet"])
    with pytest.raises(ValueError, match="unknown suite"):
        choose_tasks(None, "nope", False)


def test_data_adapter_name_opens_the_path_with_that_adapter(tmp_path, monkeypatch):
    import json

    import torch

    import fuselip_med.cli as cli
    from tests.planted import PlantedModel, solid_image

    captions = ["left lung nodule", "pleural effusion", "rib fracture"]
    for k, caption in enumerate(captions):
        solid_image(tmp_path / f"scan{k}.png", (100 + k, 0, 0))
        (tmp_path / f"scan{k}.txt").write_text(caption)
    vectors = {**{(100 + k) * 65536: torch.eye(8)[k] for k in range(3)},
               **{c: torch.eye(8)[k if k < 2 else 0] for k, c in enumerate(captions)}}  # caption 3 matches image 1
    model = PlantedModel(image_fn=vectors.__getitem__, text_fn=vectors.__getitem__, dim=8)
    monkeypatch.setattr(cli.common, "load_inference_model", lambda name, device, base=None: (model, None, None))
    out = tmp_path / "out"
    result = CliRunner().invoke(cli.app, ["eval", "-m", "planted", "--data", f"folder={tmp_path}", "--tasks",
                                          "rocov2-retrieval", "--out", str(out), "--num-workers", "0"])
    assert result.exit_code == 0, result.output
    task = json.loads((out / "metrics.json").read_text())["tasks"]["rocov2-retrieval"]
    assert task["n"] == 3 and task["metrics"]["text_to_image_R@1"] == pytest.approx(2 / 3)
