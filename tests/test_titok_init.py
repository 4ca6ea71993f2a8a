"""The tiny TiTok's structured init: deterministic ids that follow the image's content and layout."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from fuselip_med.core.titok import TiTokConfig, TiTokTokenizer
from fuselip_med.core.titok_init import init_local_patches_


def _scene(seed: int = 0, batch: int = 1) -> torch.Tensor:
    """Smooth grey-level scenes with structure at several scales (like the demo images): (B, 3, 256, 256)."""
    g = torch.Generator().manual_seed(seed)
    coarse = F.interpolate(torch.rand(batch, 1, 8, 8, generator=g), size=256, mode="bilinear", align_corners=False)
    fine = F.interpolate(torch.rand(batch, 1, 32, 32, generator=g), size=256, mode="bilinear", align_corners=False)
    return (0.7 * coarse + 0.3 * fine).clamp(0, 1).expand(batch, 3, 256, 256).contiguous()


@pytest.fixture(scope="module")
def tiny() -> TiTokTokenizer:
    return TiTokTokenizer(TiTokConfig.tiny())


def test_tiny_preset_uses_the_structured_init_deterministically(tiny):
    assert tiny.config.init == "local_patches" and not tiny.config.is_legacy
    other = TiTokTokenizer(TiTokConfig.tiny())
    for name, value in tiny.state_dict().items():
        assert torch.equal(value, other.state_dict()[name]), name
    random = TiTokTokenizer(dataclasses.replace(TiTokConfig.tiny(), init="random"))
    assert not torch.equal(random.encoder.positional_embedding, tiny.encoder.positional_embedding)


def test_ids_follow_content_flips_and_rotations(tiny):
    image = _scene(0)
    ids = tiny.encode(torch.cat([image, image.flip(-1), image.flip(-2), image.rot90(1, (-2, -1)), _scene(1)]))
    changed = (ids[1:] != ids[0]).float().mean(dim=1)
    assert changed.min() > 0.25, changed  # every transformed or different image gets mostly other ids
    assert ids[0].unique().numel() >= 16  # and the ids spread over the codebook
    assert torch.equal(tiny.encode(image), ids[:1])


def test_random_weights_would_hide_the_flip():
    """Why the structured init exists: upstream random init gives nearly image-independent ids."""
    random = TiTokTokenizer(dataclasses.replace(TiTokConfig.tiny(), init="random"))
    image = _scene(0)
    ids = random.encode(torch.cat([image, image.flip(-1)]))
    assert (ids[1] != ids[0]).float().mean() < 0.1


def test_each_id_reads_its_own_region(tiny):
    """Changing the top-left 64x64 pixels changes ids of latents laid over that corner and nothing far away."""
    image = _scene(2)
    edited = image.clone()
    edited[..., :64, :64] = 1.0 - edited[..., :64, :64]
    before, after = tiny.encode(torch.cat([image, edited]))
    rows, cols = 8, 16  # the 128 latents on an 8 x 16 grid of 32 x 16-pixel cells, row-major
    changed = (before != after).view(rows, cols)
    assert changed[:2, :4].float().mean() > 0.5  # the cells inside the edited corner
    assert not changed[3:, :].any() and not changed[:, 6:].any()  # cells two or more cells away


def test_rejects_unknown_init_and_too_narrow_encoders():
    with pytest.raises(ValueError, match="init must be one of"):
        dataclasses.replace(TiTokConfig.tiny(), init="xavier")
    narrow = dataclasses.replace(TiTokConfig.tiny(), width=8, heads=2, init="random")
    with pytest.raises(ValueError, match="head width"):
        init_local_patches_(TiTokTokenizer(narrow))


def test_hub_config_carries_the_init_only_when_not_random():
    assert TiTokConfig.tiny().to_hub_config()["model"]["vq_model"]["init"] == "local_patches"
    assert "init" not in TiTokConfig.s128().to_hub_config()["model"]["vq_model"]
