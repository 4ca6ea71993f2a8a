"""fuselip_med.io: atomic file and directory writes leave the old or the new version, never a half-written one;
fuselip_med.progress: bars only on a terminal and not when quiet."""
import io
import json
import logging
import os

import pytest
from rich.console import Console

from fuselip_med import io as atomic_io
from fuselip_med.progress import progress_bar


def listing(folder):
    return sorted(p.name for p in folder.iterdir())


def test_atomic_file_writes_replace_and_leave_no_temporaries(tmp_path):
    target = tmp_path / "sub" / "data.bin"
    assert atomic_io.atomic_write_bytes(target, b"one") == target and target.read_bytes() == b"one"
    atomic_io.atomic_write_text(target, "zwei ü")
    assert target.read_bytes() == "zwei ü".encode("utf-8")
    atomic_io.atomic_write_json(tmp_path / "m.json", {"a": [1, 2]}, indent=None)
    assert (tmp_path / "m.json").read_text() == '{"a": [1, 2]}'
    assert listing(target.parent) == ["data.bin"]


def test_a_failing_writer_keeps_the_old_file(tmp_path):
    target = tmp_path / "model.safetensors"
    target.write_bytes(b"old")

    def dies_half_way(tmp):
        tmp.write_bytes(b"ne")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_io.atomic_write(target, dies_half_way)
    assert target.read_bytes() == b"old" and listing(tmp_path) == ["model.safetensors"]
    with pytest.raises(TypeError):
        atomic_io.atomic_write_json(target, {"not": object()})
    assert target.read_bytes() == b"old" and listing(tmp_path) == ["model.safetensors"]


def test_atomic_directory_replaces_the_whole_directory_or_nothing(tmp_path):
    target = tmp_path / "final"
    with atomic_io.atomic_directory(target) as tmp:
        (tmp / "a.txt").write_text("first")
        assert not target.exists()
    with atomic_io.atomic_directory(target) as tmp:
        (tmp / "b.txt").write_text("second")
    assert listing(target) == ["b.txt"]
    with pytest.raises(RuntimeError):
        with atomic_io.atomic_directory(target) as tmp:
            (tmp / "c.txt").write_text("broken")
            raise RuntimeError("interrupted")
    assert listing(target) == ["b.txt"] and listing(tmp_path) == ["final"]


def test_a_failed_swap_puts_the_old_directory_back(tmp_path, monkeypatch):
    target = tmp_path / "final"
    target.mkdir()
    (target / "old.txt").write_text("old")
    real_replace = os.replace
    calls = []

    def second_replace_fails(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:
            raise OSError("cross-device")
        real_replace(src, dst)

    monkeypatch.setattr(atomic_io.os, "replace", second_replace_fails)
    with pytest.raises(OSError, match="cross-device"):
        with atomic_io.atomic_directory(target) as tmp:
            (tmp / "new.txt").write_text("new")
    assert listing(target) == ["old.txt"] and listing(tmp_path) == ["final"]


def test_remove_temp_files_clears_what_a_killed_writer_left(tmp_path):
    (tmp_path / ".img.png.tmp-abc123").write_bytes(b"half")
    (tmp_path / "img2.png.tmp-4242").write_bytes(b"half")
    (tmp_path / "img.png").write_bytes(b"whole")
    (tmp_path / ".dir.tmp-x").mkdir()
    assert atomic_io.remove_temp_files(tmp_path) == 2
    assert listing(tmp_path) == [".dir.tmp-x", "img.png"]


def run_bar(console):
    with progress_bar(4, "embedding", unit="image", console=console) as bar:
        bar.advance(3)
        bar.set(4)
        assert bar.completed == 4


def test_progress_is_silent_when_not_a_terminal_or_quiet(monkeypatch):
    piped = io.StringIO()
    run_bar(Console(file=piped, force_terminal=False))
    assert piped.getvalue() == ""
    terminal = io.StringIO()
    run_bar(Console(file=terminal, force_terminal=True, width=100))
    assert "embedding" in terminal.getvalue() and "4/4" in terminal.getvalue()
    monkeypatch.setattr(logging.getLogger("fuselip_med"), "level", logging.WARNING)
    quiet = io.StringIO()
    run_bar(Console(file=quiet, force_terminal=True, width=100))
    assert quiet.getvalue() == ""


def test_json_is_written_as_given(tmp_path):
    atomic_io.atomic_write_json(tmp_path / "x.json", {"b": 1, "a": float("nan")}, sort_keys=True)
    assert (tmp_path / "x.json").read_text() == '{\n  "a": NaN,\n  "b": 1\n}'
    assert json.loads((tmp_path / "x.json").read_text())["b"] == 1
