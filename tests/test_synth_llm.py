"""LLM caption -> QA, end to end with a tiny random Llama and a chat-template tokenizer built here: parsing,
validation, dedup and retries through a scripted logits processor; resume after an interruption and after
SIGKILL; 2 processes (accelerate launch, gloo on CPU) writing the file 1 process writes; the CLI."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fuselip_med.data.synth.common import read_jsonl
from fuselip_med.data.synth.llm import (
    PROMPT_VERSION,
    SYSTEM_PROMPT,
    LLMConfig,
    SynthError,
    build_messages,
    parse_pairs,
    synthesize_llm,
    validate_pair,
)

from . import synth_llm_helpers as helpers

REPO = Path(__file__).resolve().parents[1]
HELPER = Path(helpers.__file__)


@pytest.fixture(autouse=True)
def one_thread():
    """The tiny model's generate steps are all Python overhead: a second thread only adds contention."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory) -> Path:
    return helpers.build_tiny_llm(tmp_path_factory.mktemp("tiny_llm"))


def expected_lines(model_dir: Path) -> list[dict]:
    return [{"id": f"img{i}", "image": f"/data/img{i}.png", "caption": helpers.CAPTIONS[i], "question": q,
             "answer": a, "qtype": "llm", "generator": "llm", "model": str(model_dir),
             "prompt_version": PROMPT_VERSION} for i, q, a in helpers.EXPECTED]


def test_prompt_parsing_and_validation():
    messages = build_messages("Axial CT.", max_pairs=3)
    assert messages[0] == {"role": "system", "content": SYSTEM_PROMPT.format(max_pairs=3)}
    assert messages[-1] == {"role": "user", "content": "Caption: Axial CT."}
    assert [m["role"] for m in messages[1:-1]] == ["user", "assistant"] * 2
    assert parse_pairs("Sure!\n1) Q: What is it?\n   A: CT\nA: orphan\n- Question 2: Where?\nAnswer 2: left lobe") == [
        ("What is it?", "CT"), ("Where?", "left lobe")]
    assert parse_pairs("no pairs here") == []
    caption = "Axial CT showing a right pleural effusion without pneumothorax; possible fracture of a rib."
    assert validate_pair("What modality?", "CT", caption) is None
    assert validate_pair("Which side is the effusion on?", "Right", caption) is None
    assert validate_pair("What is excluded?", "pneumothorax", caption) == "negated or hedged finding"
    assert validate_pair("What may be broken?", "fracture", caption) == "negated or hedged finding"
    assert validate_pair("Is there an effusion?", "Yes", caption) == "yes/no answer"
    assert validate_pair("Which side?", "left", caption) == "answer not in caption"
    assert validate_pair("Which modality", "CT", caption) == "not a question"


def test_scripted_llm_end_to_end_and_resume_after_interruption(tiny_llm, tmp_path):
    out = tmp_path / "vqa.jsonl"
    report = helpers.run(tiny_llm, out)
    assert read_jsonl(out) == expected_lines(tiny_llm)
    assert report.dropped == helpers.EXPECTED_DROPPED
    assert (report.n_captions, report.n_records, report.model) == (8, 10, str(tiny_llm))
    assert not (tmp_path / "vqa.jsonl.parts").exists()
    reference = out.read_bytes()

    # a run that dies in its third chunk keeps the two finished chunks; the rerun ends with the same file
    from transformers import AutoTokenizer

    resumed = tmp_path / "resumed.jsonl"
    config = LLMConfig(model=str(tiny_llm), **helpers.CONFIG)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llm)
    crash = helpers.ScriptedOutput(tokenizer, helpers.SCRIPT, crash_on=helpers.CAPTIONS[4])
    with pytest.raises(KeyboardInterrupt):
        synthesize_llm(helpers.rows(), resumed, config, logits_processor=[crash])
    parts = tmp_path / "resumed.jsonl.parts"
    assert sorted(p.name for p in parts.iterdir()) == ["chunk-000000.json", "chunk-000001.json", "manifest.json"]
    with pytest.raises(SynthError, match="other settings"):
        synthesize_llm(helpers.rows(), resumed, LLMConfig(model=str(tiny_llm), **{**helpers.CONFIG, "seed": 1}))
    helpers.run(tiny_llm, resumed)
    assert resumed.read_bytes() == reference and not parts.exists()


def test_tokenizer_without_chat_template_is_refused(tiny_llm, tmp_path):
    import shutil

    plain = tmp_path / "plain"
    shutil.copytree(tiny_llm, plain)
    config_file = plain / "tokenizer_config.json"
    settings = json.loads(config_file.read_text())
    settings.pop("chat_template", None)
    config_file.write_text(json.dumps(settings))
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    with pytest.raises(SynthError, match="no chat template"):
        synthesize_llm(helpers.rows(), tmp_path / "x.jsonl", LLMConfig(model=str(plain), **helpers.CONFIG))


def test_cli_llm_with_the_random_model(tiny_llm, tmp_path):
    from PIL import Image

    Image.new("L", (8, 8)).save(tmp_path / "a.png")
    table = tmp_path / "captions.csv"
    table.write_text("path,caption\n" + "".join(f'a.png,"{c}"\n' for c in helpers.CAPTIONS[:3]), encoding="utf-8")
    out = tmp_path / "llm.jsonl"
    done = subprocess.run(
        [sys.executable, "-m", "fuselip_med.cli", "data", "synth-vqa", "-i", str(table), "-o", str(out), "-g", "llm",
         "--model", str(tiny_llm), "--max-new-tokens", "6", "--max-retries", "1", "--batch-size", "3"],
        capture_output=True, text=True, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    stats = json.loads((tmp_path / "llm.jsonl.stats.json").read_text())
    # six random tokens never make a "Q: ... / A: ..." pair: every caption retried once, then dropped
    assert stats["dropped"] == {"retried malformed output": 3, "malformed output (caption dropped)": 3}
    assert stats["n_records"] == 0 and stats["attempts"] == 6 and out.read_text() == ""
    assert "malformed output" in " ".join(done.stdout.split())


@pytest.mark.slow
def test_sigkill_resume_and_two_processes_write_the_one_process_file(tiny_llm, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO), env_path()])}
    reference = tmp_path / "one.jsonl"
    helpers.run(tiny_llm, reference)

    killed = tmp_path / "killed.jsonl"
    process = subprocess.Popen([sys.executable, str(HELPER), str(tiny_llm), str(killed), "--delay", "1.0"], env=env,
                               cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first_chunk = tmp_path / "killed.jsonl.parts" / "chunk-000000.json"
    deadline = time.monotonic() + 240
    while not first_chunk.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert first_chunk.exists() and process.poll() is None, process.stderr.read().decode()[-2000:]
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not killed.exists()
    done = subprocess.run([sys.executable, str(HELPER), str(tiny_llm), str(killed)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert killed.read_bytes() == reference.read_bytes()

    two = tmp_path / "two.jsonl"
    done = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
         "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(HELPER), str(tiny_llm), str(two)],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert two.read_bytes() == reference.read_bytes()


def env_path() -> str:
    return os.environ.get("PYTHONPATH", "")


@pytest.mark.parametrize("minutes", [None, 90])
def test_the_synthesis_process_group_gets_the_training_timeout(monkeypatch, minutes):
    """Under ``accelerate launch`` (2 processes) the process group synthesis creates waits ``train.dist_timeout_min``
    (60) or ``--dist-timeout-min`` at a barrier, not NCCL's 10-minute default (issue 25, fault 1)."""
    from datetime import timedelta

    import torch.distributed
    from accelerate import PartialState

    from fuselip_med.data.synth.llm import process_state

    created = []

    def record(*args, **kwargs):
        created.append(kwargs)
        raise RuntimeError("recorded")

    for name, value in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2",
                        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29999", "OMP_NUM_THREADS": "1"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(torch.distributed, "init_process_group", record)
    PartialState._reset_state()
    try:
        with pytest.raises(RuntimeError, match="recorded"):
            process_state(minutes)
    finally:
        PartialState._reset_state()
    assert created[0]["timeout"] == timedelta(minutes=minutes or 60)
