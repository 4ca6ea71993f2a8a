"""FuseLIP encoder: parameter counts, sequence layout, masking/pooling parity with an independent forward."""
import pytest
import torch

from fuselip_med.core.checkpoints import ours_to_reference
from fuselip_med.core.fuselip import EOT_ID, SOT_ID, FuseLIP, FuseLIPConfig
from tests.reference_impl import reference_embed, reference_sequences


def meta_model(size: str) -> FuseLIP:
    with torch.device("meta"):
        return FuseLIP(FuseLIPConfig.from_size(size))


@pytest.mark.parametrize(
    "size, trainable, total, keys",
    [("small", 42_111_491, 68_044_815, 265), ("base", 67_734_787, 154_351_171, 313)],
)
def test_parameter_counts_and_released_key_count(size, trainable, total, keys):
    model = meta_model(size)
    assert model.trainable_parameter_count() == trainable
    assert sum(p.numel() for p in model.parameters()) == total
    assert not any(p.requires_grad for p in model.image_tokenizer.parameters())
    assert len(ours_to_reference(model.state_dict())) == keys


def test_vocabulary_layout_of_released_sizes():
    small, base = FuseLIPConfig.from_size("small"), FuseLIPConfig.from_size("base")
    assert (small.vocab_size, base.vocab_size) == (53_505, 57_601)
    assert small.image_offset == base.image_offset == 49_409
    assert small.mask_token_id == 49_408


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = FuseLIP(FuseLIPConfig.from_size("tiny")).eval()
    with torch.no_grad():  # non-trivial norms/biases so that layout mistakes show up in the outputs
        for name, param in model.named_parameters():
            if param.requires_grad and param.ndim == 1:
                param.add_(0.05 * torch.randn_like(param))
    return model


def test_image_only_sequence_is_codes_then_sot_eot(tiny):
    codes = torch.randint(0, tiny.config.codebook_size, (2, 128))
    ids = tiny.prepare_inputs(image_ids=codes)
    assert ids.shape == (2, 130)
    assert torch.equal(ids[:, :128], codes + 49_409)
    assert ids[:, 128].tolist() == [SOT_ID] * 2 and ids[:, 129].tolist() == [EOT_ID] * 2


def test_fused_sequence_cuts_text_and_forces_eot(tiny):
    codes = torch.randint(0, tiny.config.codebook_size, (2, 128))
    long_text = " ".join(["word"] * 100)
    ids = tiny.prepare_inputs(image_ids=codes, texts=["a chest x-ray", long_text])
    rows = tiny.tokenizer(["a chest x-ray", long_text])
    assert ids.shape[1] == 180  # the long row runs to the end
    assert torch.equal(ids[0, 128:128 + 52], rows[0, :52])
    assert ids[1, 179] == EOT_ID and (ids[1] == EOT_ID).sum() == 1
    assert torch.equal(ids[1, 128:179], rows[1, :51])


def test_text_only_rows_are_tokenizer_rows_cut_to_longest(tiny):
    ids = tiny.prepare_inputs(texts=["ct", "mri of the knee"])
    rows = tiny.tokenizer(["ct", "mri of the knee"])
    assert torch.equal(ids, rows[:, : ids.shape[1]])
    assert ids.shape[1] == int((rows == EOT_ID).int().argmax(1).max()) + 1


@torch.no_grad()
def test_encode_matches_independent_reference_forward(tiny):
    state = ours_to_reference(tiny.state_dict())
    pixels = torch.rand(3, 3, 256, 256)
    codes = tiny.image_codes(pixels)
    texts = ["Axial CT of the chest!", "t2-weighted mri, 5 mm slices", "ultrasound"]
    rows = tiny.tokenizer(texts)
    heads = tiny.config.heads
    cases = {
        "image": (tiny.encode(images=pixels), reference_sequences(None, codes)),
        "text": (tiny.encode(texts=texts), reference_sequences(rows, None)),
        "fused": (tiny.encode(images=pixels, texts=texts), reference_sequences(rows, codes)),
    }
    for name, (ours, ids) in cases.items():
        ref = reference_embed(state, ids, heads)
        assert ours.shape == (3, tiny.embed_dim)
        assert torch.allclose(ours, ref, atol=2e-6), name
        assert torch.allclose(ours.norm(dim=-1), torch.ones(3), atol=1e-5)


@torch.no_grad()
def test_mixed_batch_rows_equal_their_single_encodings(tiny):
    pixels = torch.rand(2, 3, 256, 256)
    images = [pixels[0], None, pixels[1], None]
    texts = ["lung nodule", "knee radiograph", None, None]
    mixed = tiny.encode(images=images, texts=texts)
    alone = torch.cat([
        tiny.encode(images=pixels[:1], texts=["lung nodule"]),
        tiny.encode(texts=["knee radiograph"]),
        tiny.encode(images=pixels[1:]),
        tiny.encode(texts=[""]),
    ])
    assert torch.allclose(mixed, alone, atol=1e-5)
    masked = tiny.encode(images=pixels, texts=texts, image_mask=torch.tensor([True, False, True, False]))
    assert torch.allclose(masked, mixed, atol=1e-6)


@torch.no_grad()
def test_image_with_empty_text_equals_image_only(tiny):
    pixels = torch.rand(2, 3, 256, 256)
    assert torch.allclose(tiny.encode(images=pixels, texts=["", ""]), tiny.encode(images=pixels), atol=1e-5)


@torch.no_grad()
def test_reference_api_forward_dict(tiny):
    pixels = torch.rand(2, 3, 256, 256)
    rows = tiny.tokenizer(["a", "b"])
    out = tiny(pixels, rows)
    assert set(out) == {"image_features", "text_features", "logit_scale", "logit_bias"}
    assert torch.allclose(out["logit_scale"], torch.tensor(10.0))
    assert torch.allclose(tiny(pixels, rows, force_fused=True), tiny.encode(images=pixels, texts=rows))
    pair = tiny(image=(pixels, None), text=(rows, rows))
    assert torch.allclose(pair["text_features"], tiny.encode(texts=rows), atol=1e-6)


def test_image_tokenizer_stays_frozen_in_train_mode(tiny):
    tiny.train()
    assert not tiny.image_tokenizer.training
    assert all(not p.requires_grad for p in tiny.image_tokenizer.parameters())
    tiny.eval()


def test_mask_logits_are_tied_to_the_token_embedding(tiny):
    hidden = torch.randn(5, tiny.embed_dim)
    logits = tiny.mask_logits(hidden)
    assert logits.shape == (5, tiny.config.vocab_size)
    logits.sum().backward()
    assert tiny.token_embedding.weight.grad is not None
    tiny.zero_grad()


def test_mismatched_image_and_text_rows_fail_clearly(tiny):
    with pytest.raises(ValueError, match="image rows"):
        tiny.encode(images=torch.rand(2, 3, 256, 256), texts=["only one"])
