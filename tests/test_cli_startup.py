"""The command line starts without torch/transformers: ``--help`` of the app and of every command imports neither
(issue 24: ``fuselip-med --help`` took 4-6 s because the package's ``__init__`` imported the model code)."""
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers")

EVERY_HELP = """
import sys
import typer
from typer.testing import CliRunner
from fuselip_med.cli import app

root = typer.main.get_command(app)

def paths(command, prefix):
    yield prefix
    for name, sub in getattr(command, "commands", {}).items():
        yield from paths(sub, [*prefix, name])

runner = CliRunner()
seen = 0
for path in paths(root, []):
    result = runner.invoke(app, [*path, "--help"])
    assert result.exit_code == 0 and "Usage" in result.output, (path, result.output)
    seen += 1
print(seen, *sorted(name for name in ("torch", "transformers") if name in sys.modules))
"""


def test_help_imports_no_torch():
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "fuselip_med.cli", "--help"], cwd=REPO,
                          capture_output=True, text=True, check=True)
    imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time")}
    assert "fuselip_med.cli" in imported and "Usage" in done.stdout
    assert not imported & set(HEAVY), sorted(imported & set(HEAVY))


def test_every_command_help_imports_no_torch():
    done = subprocess.run([sys.executable, "-c", EVERY_HELP], cwd=REPO, capture_output=True, text=True, check=True)
    seen, *heavy = done.stdout.split()
    assert int(seen) >= 15 and heavy == []


def test_a_fuselip_model_loads_without_peft_or_the_baseline_towers(tmp_path):
    """``fuselip-med info`` of a FuseLIP model took 5.6 s: it imported PEFT (2.8 s) and the baselines' transformers
    CLIP tower (2.4 s), which only adapters and late-fusion baselines need."""
    import torch

    from fuselip_med.core.fuselip import FuseLIP, FuseLIPConfig
    from fuselip_med.core.pretrained import save_pretrained

    torch.manual_seed(0)
    save_pretrained(FuseLIP(FuseLIPConfig.from_size("tiny")), tmp_path / "tiny")
    check = ("import sys; from fuselip_med import load_model; from fuselip_med.model_info import info_rows; "
             f"load_model({str(tmp_path / 'tiny')!r}); info_rows({str(tmp_path / 'tiny')!r}); "
             "print(*sorted(m for m in ('peft', 'transformers', 'fuselip_med.core.late_fusion') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", check], cwd=REPO, capture_output=True, text=True, check=True)
    assert done.stdout.split() == []
