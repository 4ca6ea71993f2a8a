"""Shared pytest setup: deterministic torch, few threads (CI has 2 cores), no network access."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Scripts that tests start in subprocesses import helpers from ``tests``: put the repository root on their path
# (a script's own folder, not the working directory, is what Python puts first).
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (_ROOT, os.environ.get("PYTHONPATH", "")) if p)

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)

pytest_plugins = ["tests.orthanc"]  # the ``orthanc`` fixture: a real Orthanc server for the DICOMweb tests


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield
