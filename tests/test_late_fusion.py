"""SigLIP-SF / SigLIP-MLF baselines: Table 2 parameter counts, fusion arithmetic, encode surface, save/load."""
import re

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from fuselip_med import load_model
from fuselip_med.cli import app
from fuselip_med.core.configs import config_for, config_from_dict
from fuselip_med.core.hub import CheckpointError
from fuselip_med.core.late_fusion import LateFusion, LateFusionConfig, score_fusion
from fuselip_med.core.loading import build_model
from fuselip_med.core.models import parameter_counts
from fuselip_med.core.pretrained import save_pretrained

# Exact counts of the official code (its ViT-{S,B}-16-256-180-mask configurations and MagicLens fusion; totals with
# logit scale and bias); the paper's Table 2 (millions) is their rounding to 0.1 M.
EXPECTED = {
    ("siglip_sf", "small"): {"image": 21_836_544, "text": 40_483_584, "fusion": 0, "trainable": 62_320_130},
    ("siglip_sf", "base"): {"image": 86_238_720, "text": 63_480_832, "fusion": 0, "trainable": 149_719_554},
    ("siglip_mlf", "small"): {"image": 21_836_544, "text": 40_483_584, "fusion": 7_690_368, "trainable": 70_010_498},
    ("siglip_mlf", "base"): {"image": 86_238_720, "text": 63_480_832, "fusion": 13_661_696, "trainable": 163_381_250},
}
TABLE_2 = {  # millions: image, text, fusion, trainable total
    ("siglip_sf", "small"): (21.8, 40.5, 0.0, 62.3), ("siglip_sf", "base"): (86.2, 63.5, 0.0, 149.7),
    ("siglip_mlf", "small"): (21.8, 40.5, 7.7, 70.0), ("siglip_mlf", "base"): (86.2, 63.5, 13.7, 163.4),
}


def meta_model(arch: str, size: str) -> LateFusion:
    with torch.device("meta"):
        return LateFusion(LateFusionConfig.from_size(arch, size))


@pytest.mark.parametrize("arch,size", sorted(EXPECTED))
def test_parameter_counts_are_the_papers_table_2(arch, size):
    counts = parameter_counts(meta_model(arch, size))
    assert {k: counts[k] for k in EXPECTED[arch, size]} == EXPECTED[arch, size]
    assert counts["total"] == counts["trainable"] == counts["image"] + counts["text"] + counts["fusion"] + 2
    image, text, fusion, trainable = TABLE_2[arch, size]
    rounded = [round(counts[k] / 1e6, 1) for k in ("image", "text", "fusion", "trainable")]
    assert rounded == [image, text, fusion, trainable]


def test_info_prints_exact_counts_without_a_checkpoint():
    runner = CliRunner()
    result = runner.invoke(app, ["info", "--arch", "siglip_mlf", "--size", "small"])
    assert result.exit_code == 0, result.output
    for part, value in (("image", 21_836_544), ("text", 40_483_584), ("fusion", 7_690_368),
                        ("trainable", 70_010_498), ("total", 70_010_498)):
        assert re.search(rf"parameters: {part}\b.*\b{value:,}\b", result.output), (part, result.output)
    fuselip = runner.invoke(app, ["info", "--arch", "fuselip", "--size", "tiny"])
    assert fuselip.exit_code == 0, fuselip.output
    counts = parameter_counts(build_model("tiny"))
    assert re.search(rf"parameters: trainable\b.*\b{counts['trainable']:,}\b", fuselip.output), fuselip.output
    bad = runner.invoke(app, ["info", "--arch", "siglip_xx", "--size", "small"])
    assert bad.exit_code != 0 and "error:" in bad.output and "siglip_xx" in bad.output


def test_score_fusion_on_hand_built_tower_outputs():
    image = torch.tensor([[3.0, 0.0], [0.0, 2.0], [1.0, 1.0], [5.0, 5.0]])
    text = torch.tensor([[0.0, 4.0], [0.0, -7.0], [2.0, 0.0], [-1.0, 0.0]])
    has_image = torch.tensor([True, True, False, True])
    has_text = torch.tensor([True, False, True, True])
    out = score_fusion(image, text, has_image, has_text)
    s = 2**-0.5
    expected = torch.tensor([[s, s], [0.0, 1.0], [1.0, 0.0], F.normalize(torch.tensor([s - 1.0, s]), dim=0).tolist()])
    assert torch.allclose(out, expected, atol=1e-6)


def test_sf_model_rows_follow_the_rule_and_mixed_batches_equal_single_rows():
    torch.manual_seed(0)
    model = LateFusion(LateFusionConfig.from_size("siglip_sf", "tiny")).eval()
    pixels = torch.rand(2, 3, 256, 256)
    texts = ["ct of the chest", "mri of the knee"]
    with torch.no_grad():
        u = model.image_tower(pixels)
        v = model.embed_texts(model.tokenize_text(texts))
        fused = model.encode(images=pixels, texts=texts)
        assert torch.allclose(fused, F.normalize(F.normalize(u, dim=-1) + F.normalize(v, dim=-1), dim=-1), atol=1e-6)
        assert torch.allclose(model.encode(images=pixels), F.normalize(u, dim=-1), atol=1e-6)
        assert torch.allclose(model.encode(texts=texts), F.normalize(v, dim=-1), atol=1e-6)
        # mixed batch: image+text, text only, image only (list with None and "" / None text)
        mixed = model.encode(images=[pixels[0], None, pixels[1]], texts=[texts[0], texts[1], None])
        assert torch.allclose(mixed, torch.stack([fused[0], F.normalize(v[1], dim=-1), F.normalize(u[1], dim=-1)]),
                              atol=1e-5)
        # tokenizer rows: an empty row ([sot, eot]) is "no text"
        rows = model.tokenize_text([texts[0], ""])
        assert torch.allclose(model.encode(images=pixels, texts=rows)[1], F.normalize(u[1], dim=-1), atol=1e-6)
        assert torch.allclose(mixed.norm(dim=-1), torch.ones(3), atol=1e-5)
    with pytest.raises(ValueError, match="pixels"):
        model.encode(image_ids=torch.zeros(1, 128, dtype=torch.long))


def test_mlf_uses_a_zero_image_embedding_for_rows_without_an_image():
    torch.manual_seed(1)
    model = LateFusion(LateFusionConfig.from_size("siglip_mlf", "tiny")).eval()
    texts = ["x-ray of the hand", "ultrasound of the liver"]
    pixels = torch.rand(1, 3, 256, 256)
    with torch.no_grad():
        v = model.embed_texts(model.tokenize_text(texts))
        expected = F.normalize(model.fusion(torch.zeros_like(v), v), dim=-1)
        assert torch.allclose(model.encode(texts=texts), expected, atol=1e-6)
        mixed = model.encode(images=[None, pixels[0]], texts=texts)
        assert torch.allclose(mixed[0], expected[0], atol=1e-5)
        with_image = F.normalize(model.fusion(model.image_tower(pixels), v[1:]), dim=-1)
        assert torch.allclose(mixed[1], with_image[0], atol=1e-5)
        assert not torch.allclose(mixed[1], expected[1], atol=1e-3)
        # image-only rows: the text token is the empty text's embedding
        empty = model.embed_texts(model.tokenize_text([""]))
        image_only = F.normalize(model.fusion(model.image_tower(pixels), empty), dim=-1)
        assert torch.allclose(model.encode(images=pixels), image_only, atol=1e-6)


def test_save_and_load_reproduce_outputs_through_the_registry(tmp_path):
    torch.manual_seed(2)
    pixels = torch.rand(2, 3, 256, 256)
    texts = ["pet of the brain", None]
    for arch in ("siglip_sf", "siglip_mlf"):
        model = build_model("tiny", arch=arch).eval()
        save_pretrained(model, tmp_path / arch)
        loaded, preprocess, tokenizer = load_model(tmp_path / arch)
        assert isinstance(loaded, LateFusion) and loaded.config == model.config
        assert preprocess.image_size == 256 and tokenizer.context_length == 180
        hub = LateFusion.from_pretrained(tmp_path / arch).eval()
        with torch.no_grad():
            reference = model.encode(images=pixels, texts=texts)
            assert torch.allclose(loaded.encode(images=pixels, texts=texts), reference, atol=1e-6)
            assert torch.allclose(hub.encode(images=pixels, texts=texts), reference, atol=1e-6)
    with pytest.raises(CheckpointError, match="siglip_sf checkpoint but model.arch is fuselip"):
        build_model("tiny", init=tmp_path / "siglip_sf", arch="fuselip")
    assert config_from_dict(config_for("siglip_mlf", "base").to_dict()) == config_for("siglip_mlf", "base")
    with pytest.raises(ValueError, match="unknown keys"):
        config_from_dict({"arch": "siglip_sf", "widht": 3})


def test_lora_pattern_selects_every_attention_and_mlp_linear_and_nothing_else():
    model = LateFusion(LateFusionConfig.from_size("siglip_mlf", "tiny"))
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    pattern = model.lora_target_pattern(["q_proj", "k_proj", "v_proj", "out_proj", "c_fc", "c_proj"])
    untouched = sorted(n for n in linears if not re.fullmatch(pattern, n))
    assert untouched == ["image_tower.proj", "text_tower.text_projection"]
    only_fc = [n for n in linears if re.fullmatch(model.lora_target_pattern(["c_fc"]), n)]
    assert len(only_fc) == 6 and all(n.endswith(("mlp.fc1", "mlp.c_fc")) for n in only_fc)
    with pytest.raises(ValueError, match="not understood"):
        model.lora_target_pattern(["query"])


def test_weight_decay_groups_of_a_baseline():
    from fuselip_med.train.optim import parameter_groups

    model = LateFusion(LateFusionConfig.from_size("siglip_sf", "tiny"))
    names = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay = ({names[id(p)] for p in group["params"]} for group in parameter_groups(model, 0.1))
    assert {"image_tower.vit.embeddings.class_embedding", "image_tower.vit.embeddings.position_embedding.weight",
            "text_tower.token_embedding.weight", "text_tower.positional_embedding", "logit_scale"} <= no_decay
    assert {"image_tower.vit.embeddings.patch_embedding.weight", "image_tower.proj.weight",
            "image_tower.vit.encoder.layers.0.self_attn.q_proj.weight", "text_tower.text_projection.weight"} <= decay
    assert not any("layernorm" in n or n.endswith(".bias") for n in decay)
