"""The training step's fast paths (issue 25, fault 5): TF32 for float32 work on CUDA, sequences padded to a
multiple of 8 (exactly), DataLoader workers that persist across epochs."""
import importlib.util
from pathlib import Path

import torch

from fuselip_med.core.fuselip import FuseLIP, FuseLIPConfig
from fuselip_med.core.losses import MaskingConfig
from fuselip_med.data.demo import write_demo_dataset
from fuselip_med.recipes import recipe_from_dict
from fuselip_med.train.objective import EarlyFusionObjective
from fuselip_med.vocab import EOT_TOKEN_ID
from tests.test_trainer import recipe_dict

REPO = Path(__file__).resolve().parents[1]


def bench_train():
    """benchmarks/bench_train.py as a module (its batch builder)."""
    spec = importlib.util.spec_from_file_location("bench_train", REPO / "benchmarks" / "bench_train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_training_turns_tf32_on(tmp_path, monkeypatch):
    from accelerate.state import AcceleratorState

    from fuselip_med.train.trainer import Trainer

    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    AcceleratorState._reset_state(True)
    Trainer(recipe_from_dict(recipe_dict(tmp_path / "run", tmp_path / "data")))
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32


def test_sequences_are_padded_to_a_multiple_of_8_without_changing_the_embeddings():
    torch.manual_seed(0)
    make_batch = bench_train().make_batch
    model = FuseLIP(FuseLIPConfig.from_size("tiny")).eval()
    objective = EarlyFusionObjective(model, MaskingConfig.for_model(model.config))
    for shape in ("paired", "caption"):
        inputs = objective.prepare(make_batch(model, 4, "cached", shape), 0)
        for side in (inputs.query, inputs.target):
            length = side.ids.shape[1]
            assert length % 8 == 0 or length == model.config.context_length
            eot = int((side.ids == EOT_TOKEN_ID).int().argmax(1).max()) + 1  # the length before padding
            with torch.no_grad():
                padded = model.encode_ids(side.ids).embeddings
                cut = model.encode_ids(side.ids[:, :eot]).embeddings
            assert torch.allclose(padded, cut, atol=1e-5)


def test_train_loader_workers_persist_across_epochs(tmp_path):
    from fuselip_med.core.text_tokenizer import TextTokenizer
    from fuselip_med.train.data import build_train_data

    data_dir = write_demo_dataset(tmp_path / "rocov2", n_train=16, n_valid=0, n_test=0, n_dicom=0)
    recipe = recipe_from_dict(recipe_dict(tmp_path / "run", data_dir, data={"num_workers": 1}))
    data = build_train_data(recipe, TextTokenizer())
    assert data.loader.persistent_workers
    first = [batch.query.pixels.clone() for batch in data.loader]
    data.set_epoch(1)
    second = [batch.query.pixels.clone() for batch in data.loader]
    assert len(first) == len(second) == 2 and not torch.equal(first[0], second[0])
