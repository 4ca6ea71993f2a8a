"""Every user error is one line: every command is driven with malformed inputs (unknown options and keys, wrong
types, missing files, empty queries, unknown and wrong text encodings) and must answer with exactly one `error:`
line naming the input, exit code 1 or 2, and no traceback."""
from __future__ import annotations

import pytest
import typer
import yaml
from typer.testing import CliRunner

from fuselip_med.cli import app
from tests.search_helpers import KEEP_PATHS, PlantedEncoder, make_folder


def commands(group=None, path=()):
    """The command paths of the CLI (``("index", "build")``, ...), walked from the click tree."""
    group = group or typer.main.get_command(app)
    for name, command in sorted(getattr(group, "commands", {}).items()):
        if getattr(command, "commands", None):
            yield from commands(command, (*path, name))
        else:
            yield (*path, name)


def assert_one_error_line(args: list[str], *named: str) -> str:
    result = CliRunner().invoke(app, args)
    assert result.exception is None or isinstance(result.exception, SystemExit), (args, result.exception)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code in (1, 2), (args, result.exit_code, result.output)
    assert len(lines) == 1 and lines[0].startswith("error:"), (args, result.output)
    assert "Traceback" not in result.output
    for text in named:
        assert text in lines[0], (args, lines[0])
    return lines[0]


ALL_COMMANDS = list(commands())


def test_the_walk_finds_every_command():
    assert {("embed",), ("eval",), ("index", "build"), ("search",), ("data", "synth-vqa"), ("finetune",),
            ("push",)} <= set(ALL_COMMANDS)


@pytest.mark.parametrize("command", ALL_COMMANDS, ids=" ".join)
def test_an_unknown_option_is_one_line_naming_it(command):
    assert_one_error_line([*command, "--no-such-option"], "--no-such-option")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    folder = make_folder(root / "images")
    table = root / "table.csv"
    table.write_text(f"path,caption\n{folder / 'red.png'},a red square\n", encoding="utf-8")
    latin = root / "latin1.csv"
    latin.write_bytes(f"path,caption\n{folder / 'red.png'},épanchement pleural\n".encode("latin-1"))
    from fuselip_med.search.index import IndexSettings, build_index, list_entries

    entries, _ = list_entries(folder, privacy=KEEP_PATHS)
    encoder = PlantedEncoder()
    build_index(root / "index", entries, encoder, encoder.model_id, IndexSettings(), progress=False)

    def recipe(name: str, change: dict) -> str:
        data = {"name": "bad", "model": {"size": "tiny"}, "train": {"steps": 1, "batch_size": 2},
                "data": {"train": [{"name": "folder", "path": str(folder)}]}, "output": {"dir": str(root / "run")}}
        for key, value in change.items():
            data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
        (root / name).write_text(yaml.safe_dump(data))
        return str(root / name)

    return {"root": root, "folder": folder, "table": table, "latin": latin, "index": root / "index",
            "adapter_option": recipe("adapter_option.yaml", {"data": {"train": [
                {"name": "folder", "path": str(folder), "options": {"no_such_option": 1}}]}}),
            "unknown_key": recipe("unknown_key.yaml", {"train": {"steps": 1, "no_such_key": 3}}),
            "wrong_type": recipe("wrong_type.yaml", {"train": {"steps": "many"}})}


CASES = {
    "recipe adapter option": (lambda i: ["finetune", "--recipe", i["adapter_option"]], ["no_such_option"]),
    "recipe unknown key": (lambda i: ["finetune", "--recipe", i["unknown_key"]], ["no_such_key"]),
    "recipe wrong type": (lambda i: ["finetune", "--recipe", i["wrong_type"]], ["steps"]),
    "--set unknown key": (lambda i: ["train", "--recipe", "rocov2_demo", "--set", "train.no_such_key=1"],
                          ["no_such_key"]),
    "--set wrong type": (lambda i: ["train", "--recipe", "rocov2_demo", "--set", "train.lr=fast"], ["lr"]),
    "missing recipe": (lambda i: ["finetune", "--recipe", str(i["root"] / "none.yaml")], ["none.yaml"]),
    "unknown encoding": (lambda i: ["embed", "-m", "x", "-i", str(i["table"]), "-o", str(i["root"] / "e.npy"),
                                    "--encoding", "no-such-codec"], ["no-such-codec"]),
    "wrong encoding": (lambda i: ["embed", "-m", "x", "-i", str(i["latin"]), "-o", str(i["root"] / "e.npy"),
                                  "--kind", "text"], ["latin1.csv", "non-utf8 text"]),
    "embed missing input": (lambda i: ["embed", "-m", "x", "-i", str(i["root"] / "none.csv"), "-o",
                                       str(i["root"] / "e.npy")], ["none.csv"]),
    "embed unknown kind": (lambda i: ["embed", "-m", "x", "-i", str(i["table"]), "-o", str(i["root"] / "e.npy"),
                                      "--kind", "video"], ["video"]),
    "embed missing model": (lambda i: ["embed", "-m", str(i["root"] / "no-model"), "-i", str(i["table"]), "-o",
                                       str(i["root"] / "e.npy")], ["no-model"]),
    "eval missing labels": (lambda i: ["eval", "-m", "x", "-d", f"folder={i['folder']}", "--labels",
                                       str(i["root"] / "none.txt"), "-o", str(i["root"] / "ev")], ["none.txt"]),
    "eval unknown task": (lambda i: ["eval", "-m", "x", "-t", "no-such-task", "-d", f"folder={i['folder']}",
                                     "-o", str(i["root"] / "ev")], ["no-such-task"]),
    "eval malformed data": (lambda i: ["eval", "-m", "x", "-d", "no-equals-sign", "-o", str(i["root"] / "ev")],
                            ["no-equals-sign"]),
    "search empty query": (lambda i: ["search", "--index", str(i["index"]), "--text", ""], ["--text"]),
    "search wrong type": (lambda i: ["search", "--index", str(i["index"]), "--text", "red", "-k", "many"], ["-k"]),
    "search missing index": (lambda i: ["search", "--index", str(i["root"] / "none"), "--text", "red"], ["none"]),
    "search missing image": (lambda i: ["search", "--index", str(i["index"]), "--image", str(i["root"] / "x.png")],
                             ["x.png"]),
    "index unknown type": (lambda i: ["index", "build", "-m", "x", "-i", str(i["folder"]), "-o",
                                      str(i["root"] / "idx2"), "--index-type", "tree"], ["tree"]),
    "index missing input": (lambda i: ["index", "build", "-m", "x", "-i", str(i["root"] / "none"), "-o",
                                       str(i["root"] / "idx2")], ["none"]),
    "synth unknown generator": (lambda i: ["data", "synth-vqa", "-i", str(i["table"]), "-o",
                                           str(i["root"] / "qa.jsonl"), "-g", "oracle"], ["oracle"]),
    "synth missing input": (lambda i: ["data", "synth-vqa", "-i", str(i["root"] / "none.csv"), "-o",
                                       str(i["root"] / "qa.jsonl")], ["none.csv"]),
    "info unknown size": (lambda i: ["info", "--size", "gigantic"], ["gigantic"]),
    "merge-lora missing adapter": (lambda i: ["merge-lora", str(i["root"] / "none"), "-o", str(i["root"] / "m")],
                                   ["none"]),
    "push missing folder": (lambda i: ["push", str(i["root"] / "none"), "--repo-id", "me/x"], ["none"]),
    "demo negative count": (lambda i: ["data", "demo", "-o", str(i["root"] / "demo"), "--n-train", "-5"], []),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_malformed_inputs_are_one_error_line(case, inputs):
    args, named = CASES[case]
    assert_one_error_line(args(inputs), *named)
