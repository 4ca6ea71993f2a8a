"""One registry finds dataset adapters and the tasks built on them (TGIT), in any interpreter."""
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_get_adapter_tgit_in_a_fresh_interpreter():
    code = (
        "import sys\n"
        "from fuselip_med.data.adapters import available_adapters, get_adapter\n"
        "assert 'fuselip_med.data.transforms.tasks' not in sys.modules\n"
        "factories = [get_adapter(name) for name in ('tgit', 'tgit_med', 'rocov2', 'folder')]\n"
        "print(' '.join(f.__module__ for f in factories))\n"
        "print(','.join(available_adapters()))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    modules, names = done.stdout.split("\n")[:2]
    assert modules.split() == ["fuselip_med.data.transforms.tasks"] * 2 + ["fuselip_med.data.adapters.rocov2",
                                                                            "fuselip_med.data.adapters.folder"]
    assert {"tgit", "tgit_med", "rocov2", "folder", "csv", "cc"} <= set(names.split(","))


def test_a_tgit_task_builds_on_a_base_from_the_registry(tmp_path):
    from PIL import Image

    from fuselip_med.data.adapters import get_adapter

    for i in range(4):
        Image.new("RGB", (32, 32), (40 * i, 80, 120)).save(tmp_path / f"img{i}.png")
        (tmp_path / f"img{i}.txt").write_text(f"an image number {i}")
    base = get_adapter("folder")(str(tmp_path), split="train")
    task = get_adapter("tgit")(base, split="train")
    assert len(base) == 4 and type(task).__name__ == "TGITTask" and task.family.name == "tgit"
    assert len(task) >= 1 and task[0].target.text is not None
