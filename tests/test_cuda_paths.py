"""The CUDA path (issue 25), run by benchmarks/gpu_check.sh on a lent GPU; skipped without CUDA.

bf16 embeddings against fp32 (cosine >= 0.99), a training step on CUDA against the same step on the CPU (losses
within bf16 tolerance), and the fused AdamW skip of a planted NaN gradient under fp32, bf16 and fp16 (the real
Accelerate GradScaler)."""
import importlib.util
from pathlib import Path

import pytest
import torch

from fuselip_med.core.fuselip import FuseLIP, FuseLIPConfig
from fuselip_med.core.losses import MaskingConfig
from fuselip_med.data.demo import write_demo_dataset
from fuselip_med.train.objective import EarlyFusionObjective
from tests.test_step_skip import check_planted_nan_gradient

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
REPO = Path(__file__).resolve().parents[1]
CAPTIONS = ["axial ct of the chest with a small nodule in the right upper lobe",
            "t2 weighted mri of the brain showing a hyperintense lesion", "chest x-ray without effusion",
            "ultrasound of the liver with a hypoechoic mass"]


def bench_batch(model, rows: int, shape: str):
    spec = importlib.util.spec_from_file_location("bench_train", REPO / "benchmarks" / "bench_train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.make_batch(model, rows, "cached", shape)  # the same ids on both devices (no TiTok near-ties)


def test_bf16_embeddings_match_fp32():
    torch.manual_seed(0)
    model = FuseLIP(FuseLIPConfig.from_size("small")).cuda().eval()
    pixels = torch.rand(4, 3, 256, 256, device="cuda")
    with torch.no_grad():
        exact = model.encode(images=pixels, texts=CAPTIONS).float()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            mixed = model.encode(images=pixels, texts=CAPTIONS).float()
        texts_exact = model.encode(texts=CAPTIONS).float()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            texts_mixed = model.encode(texts=CAPTIONS).float()
    assert torch.nn.functional.cosine_similarity(exact, mixed).min() >= 0.99
    assert torch.nn.functional.cosine_similarity(texts_exact, texts_mixed).min() >= 0.99


def test_a_cuda_training_step_matches_the_cpu_step():
    torch.manual_seed(0)
    model = FuseLIP(FuseLIPConfig.from_size("small"))
    batch = bench_batch(model, 16, "paired")
    losses = {}
    for device, dtype in (("cpu", None), ("cuda", torch.bfloat16)):
        objective = EarlyFusionObjective(model.to(device), MaskingConfig.for_model(model.config)).train()
        inputs = objective.prepare(batch, 0).to(device)
        with torch.autocast(device, dtype=dtype or torch.float32, enabled=dtype is not None):
            out = objective(inputs)
        losses[device] = [float(out.total), float(out.contrastive), float(out.mmm)]
    assert losses["cuda"] == pytest.approx(losses["cpu"], rel=2e-2)


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_fused_adamw_skips_a_planted_nan_gradient_on_cuda(tmp_path, precision, capsys):
    demo = write_demo_dataset(tmp_path / "rocov2", n_train=24, n_valid=4, n_test=4, n_dicom=0)
    check_planted_nan_gradient(tmp_path, demo, precision, capsys, emulate_cuda_fp16=False)
