"""AdamW parameter groups and the warmup + cosine schedule."""
import math

import pytest

from fuselip_med.core.fuselip import FuseLIP, FuseLIPConfig
from fuselip_med.train.optim import WarmupCosine, build_optimizer, parameter_groups


def names_in(model, group):
    ids = {id(p) for p in group["params"]}
    return {name for name, p in model.named_parameters() if id(p) in ids}


def test_no_decay_on_biases_norms_embeddings_and_logit_params():
    model = FuseLIP(FuseLIPConfig.from_size("tiny"))
    decay, no_decay = (names_in(model, g) for g in parameter_groups(model, 0.1))
    assert decay and no_decay and not decay & no_decay
    assert {"logit_scale", "logit_bias", "token_embedding.weight", "positional_embedding",
            "mask_prediction_head.bias", "ln_final.weight", "transformer.resblocks.0.attn.q_proj.bias"} <= no_decay
    assert {"transformer.resblocks.0.attn.q_proj.weight", "transformer.resblocks.1.mlp.c_fc.weight",
            "mask_prediction_head.dense.weight"} <= decay
    assert not any(name.startswith("image_tokenizer") for name in decay | no_decay)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert decay | no_decay == trainable


def test_reference_pretraining_decays_embeddings():
    model = FuseLIP(FuseLIPConfig.from_size("tiny"))
    decay = names_in(model, parameter_groups(model, 1.0, decay_embeddings=True)[0])
    assert {"token_embedding.weight", "positional_embedding"} <= decay


def test_optimizer_hyperparameters():
    model = FuseLIP(FuseLIPConfig.from_size("tiny"))
    optimizer = build_optimizer(model, 1e-3, 0.5)
    assert optimizer.defaults["betas"] == (0.9, 0.98) and optimizer.defaults["eps"] == 1e-8
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.5, 0.0]


def test_warmup_then_cosine_to_min_lr():
    schedule = WarmupCosine(peak=1e-3, warmup=10, total=110)
    assert schedule(0) == pytest.approx(1e-4)
    assert schedule(9) == pytest.approx(1e-3)
    assert schedule(60) == pytest.approx(0.5e-3)
    assert schedule(110) == pytest.approx(0.0, abs=1e-12)
    assert schedule(35) == pytest.approx(0.5 * (1 + math.cos(math.pi * 25 / 100)) * 1e-3)
    assert WarmupCosine(1e-3, 0, 10, min_lr=1e-5)(10) == pytest.approx(1e-5)
