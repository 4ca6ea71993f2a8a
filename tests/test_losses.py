"""Sigmoid loss (single and 2-process gloo) and masked multimodal modelling."""
import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from fuselip_med.core.fuselip import FuseLIPConfig
from fuselip_med.core.losses import MaskingConfig, mask_seed, mask_tokens, masked_token_loss, sigmoid_loss
from tests.dist_helpers import spawn_gloo


def direct_sigmoid_loss(left, right, log_scale, bias):
    left, right = left.double(), right.double()
    n = left.shape[0]
    total = 0.0
    for i in range(n):
        for j in range(right.shape[0]):
            z = 1.0 if i == j else -1.0
            logit = math.exp(float(log_scale)) * float(left[i] @ right[j]) + float(bias)
            total += -math.log(1.0 / (1.0 + math.exp(-z * logit)))
    return total / n


def test_sigmoid_loss_equals_direct_float64_computation():
    torch.manual_seed(0)
    left = F.normalize(torch.randn(7, 16), dim=-1)
    right = F.normalize(torch.randn(7, 16), dim=-1)
    scale, bias = torch.tensor(math.log(10.0)), torch.tensor(-10.0)
    ours = sigmoid_loss(left.double(), right.double(), scale.double(), bias.double())
    assert abs(float(ours) - direct_sigmoid_loss(left, right, scale, bias)) < 1e-9
    trained = sigmoid_loss(left, right, torch.tensor(3.0), torch.tensor(-2.0))
    assert abs(float(trained) - direct_sigmoid_loss(left, right, 3.0, -2.0)) < 1e-4


def _setup(n=8, dim=6, features=5):
    generator = torch.Generator().manual_seed(0)
    x_left = torch.randn(n, dim, generator=generator)
    x_right = torch.randn(n, dim, generator=generator)
    weight = torch.randn(features, dim, generator=generator)
    return x_left, x_right, weight


def _loss_and_grads(x_left, x_right, weight, distributed):
    weight = weight.clone().requires_grad_(True)
    log_scale = torch.tensor(math.log(10.0), requires_grad=True)
    bias = torch.tensor(-3.0, requires_grad=True)
    left = F.normalize(x_left @ weight.T, dim=-1)
    right = F.normalize(x_right @ weight.T, dim=-1)
    loss = sigmoid_loss(left, right, log_scale, bias, distributed=distributed)
    loss.backward()
    return loss.detach(), [weight.grad, log_scale.grad, bias.grad]


def _worker(rank, out_path, first_rank_rows):
    world = 2
    x_left, x_right, weight = _setup()
    rows = slice(0, first_rank_rows) if rank == 0 else slice(first_rank_rows, x_left.shape[0])
    loss, grads = _loss_and_grads(x_left[rows], x_right[rows], weight, distributed=True)
    for tensor in [loss, *grads]:  # what DDP does: average over ranks
        dist.all_reduce(tensor)
        tensor /= world
    if rank == 0:
        torch.save({"loss": loss, "grads": grads}, out_path)


@pytest.mark.parametrize("first_rank_rows", [4, 3])  # equal shares, and whole groups of unequal size
def test_two_process_gloo_equals_single_process_global_batch(tmp_path, first_rank_rows):
    out = tmp_path / "dist.pt"
    spawn_gloo(_worker, str(out), first_rank_rows)
    result = torch.load(out, weights_only=True)
    loss, grads = _loss_and_grads(*_setup(), distributed=False)
    assert torch.allclose(result["loss"], loss, atol=1e-6)
    for got, want in zip(result["grads"], grads):
        assert torch.allclose(got, want, atol=1e-6)


def test_masking_never_touches_special_ids_and_masks_about_ten_percent():
    config = FuseLIPConfig.from_size("small")
    masking = MaskingConfig.for_model(config)
    assert masking.never_mask == (0, 49407, 49408, 49409)
    generator = torch.Generator().manual_seed(0)
    codes = torch.randint(0, config.codebook_size, (256, 128), generator=generator) + 49409
    text = torch.randint(1, 49406, (256, 48), generator=generator)
    specials = torch.tensor([[49406, 49407, 0, 49408]]).expand(256, 4)
    ids = torch.cat([codes, specials, text], dim=1)
    masked, labels = mask_tokens(ids, masking, generator)
    chosen = labels != -100
    assert torch.equal(masked[chosen], torch.full_like(masked[chosen], 49408))
    assert torch.equal(masked[~chosen], ids[~chosen])
    assert torch.equal(labels[chosen], ids[chosen])
    for special in (49407, 0, 49408, 49409):
        assert not chosen[ids == special].any()
    maskable = ~torch.isin(ids, torch.tensor(masking.never_mask))
    fraction = chosen.sum().item() / maskable.sum().item()
    assert 0.09 < fraction < 0.11
    assert chosen[ids == 49406].any()  # sot is maskable


def test_rank_blocks_of_a_global_batch_mask_exactly_as_one_process():
    masking = MaskingConfig(probability=0.3)
    ids = torch.randint(1, 49406, (10, 20), generator=torch.Generator().manual_seed(1))
    whole, whole_labels = mask_tokens(ids[:, :12], masking, torch.Generator().manual_seed(mask_seed(5, 3, 1)),
                                      context_length=20)
    for start, stop in ((0, 4), (4, 10)):  # ranks of unequal size, shorter sequences than the context
        part, labels = mask_tokens(ids[start:stop, :12], masking, torch.Generator().manual_seed(mask_seed(5, 3, 1)),
                                   row_offset=start, global_rows=10, context_length=20)
        assert torch.equal(part, whole[start:stop]) and torch.equal(labels, whole_labels[start:stop])
    assert mask_seed(5, 3, 0) != mask_seed(5, 3, 1) != mask_seed(5, 4, 1)


def test_mmm_loss_is_the_mean_cross_entropy_split_over_ranks_and_zero_when_nothing_is_masked():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(12, 100, generator=generator, requires_grad=True)
    labels = torch.randint(0, 100, (12,), generator=generator)
    loss = masked_token_loss(logits, labels, 12)
    assert torch.isfinite(loss) and loss > 0
    assert torch.allclose(loss, F.cross_entropy(logits, labels))
    halves = [masked_token_loss(logits[rows], labels[rows], torch.tensor(12), world=2)
              for rows in (slice(0, 5), slice(5, 12))]
    assert torch.allclose((halves[0] + halves[1]) / 2, loss)  # the ranks' mean is the global token mean
    none = masked_token_loss(logits[:0], labels[:0], torch.tensor(0))
    assert none.item() == 0.0 and none.requires_grad
