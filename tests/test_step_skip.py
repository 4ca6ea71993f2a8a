"""One skip decision per step (issue 25, fault 4): a non-finite gradient with a finite loss is skipped and
counted under fp32, bf16 and fp16 (the GradScaler's own found-inf must not overwrite it), and the SigLIP
logits are float32 under autocast."""
import pytest
import torch

from fuselip_med.core.losses import sigmoid_loss
from fuselip_med.data.demo import write_demo_dataset
from fuselip_med.recipes import recipe_from_dict
from fuselip_med.train.trainer import Trainer
from tests.test_trainer import recipe_dict

PLANTED_STEP = 2  # the optimizer step (0-based) whose gradient gets a NaN


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    return write_demo_dataset(tmp_path_factory.mktemp("demo") / "rocov2", n_train=24, n_valid=4, n_test=4, n_dicom=0)


def cpu_grad_scaler(trainer: Trainer) -> None:
    """What Accelerate sets up for fp16 on CUDA (a GradScaler and fp16 autocast), on the CPU."""
    acc = trainer.accelerator
    acc.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    acc.native_amp = True


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_nan_gradient_with_finite_loss_is_skipped_and_counted(tmp_path, demo_data, precision, capsys):
    check_planted_nan_gradient(tmp_path, demo_data, precision, capsys, emulate_cuda_fp16=not torch.cuda.is_available())


def check_planted_nan_gradient(tmp_path, demo_data, precision, capsys, emulate_cuda_fp16: bool) -> None:
    """Train 4 steps with a NaN planted in one step's gradient (the loss stays finite): that step, and only
    that one, leaves the weights untouched, is counted and reported. ``emulate_cuda_fp16``: on a CPU, fp16
    gets the GradScaler that Accelerate gives CUDA."""
    recipe = recipe_from_dict(recipe_dict(tmp_path / "run", demo_data, train={
        "steps": 4, "precision": precision, "max_bad_steps": 3}, checkpoint={"every_steps": None}))
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)  # each precision gets its own Accelerator in this process
    trainer = Trainer(recipe)
    if precision == "fp16" and emulate_cuda_fp16:
        cpu_grad_scaler(trainer)
    trainer.setup()
    bias = trainer.base_model.logit_bias
    bias.register_hook(lambda grad: grad * float("nan") if trainer.step == PLANTED_STEP else grad)
    trainer.iterator, trainer.started = iter(trainer.data.loader), 0.0
    snapshots = []
    with trainer.out.progress() as trainer.bar:
        trainer.bar_task = trainer.bar.add_task("train", total=4, loss=0.0, lr=0.0, rate=0.0)
        for _ in range(4):
            before = {n: p.detach().clone() for n, p in trainer.base_model.named_parameters() if p.requires_grad}
            trainer.train_step()
            snapshots.append(all(torch.equal(before[n], p) for n, p in trainer.base_model.named_parameters()
                                 if p.requires_grad))
            trainer.log()
    assert snapshots == [False, False, True, False]  # only the planted step left the weights untouched
    assert all(torch.isfinite(p).all() for p in trainer.base_model.parameters())
    assert trainer.bad_steps_total == 1
    assert len(trainer.losses) == 3
    assert f"step {PLANTED_STEP + 1}: non-finite" in capsys.readouterr().out


def test_siglip_logits_are_float32_under_autocast():
    torch.manual_seed(0)
    left = torch.nn.functional.normalize(torch.randn(16, 64), dim=-1)
    right = torch.nn.functional.normalize(torch.randn(16, 64), dim=-1)
    scale, bias = torch.tensor(4.6), torch.tensor(-10.0)
    exact = sigmoid_loss(left, right, scale, bias, distributed=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = sigmoid_loss(left, right, scale, bias, distributed=False)
    assert mixed.dtype == torch.float32
    assert mixed.item() == pytest.approx(exact.item(), rel=1e-6)
