"""TiTok encoder + quantizer: sizes, checkpoint loading, and ids against an independent implementation of 1.3-1.4."""
import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from fuselip_med.core import titok
from fuselip_med.core.titok import TiTokConfig, TiTokTokenizer, vq_indices


def _randomize(model: TiTokTokenizer, seed: int = 0) -> TiTokTokenizer:
    """Weights that make ids depend strongly on the image and spread over the codebook."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if ".ln_" in name and name.endswith(".weight"):
            value = 1 + 0.1 * torch.randn(p.shape, generator=g)
        elif p.dim() == 1:
            value = 0.1 * torch.randn(p.shape, generator=g)
        else:
            value = torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel())
        if name == "encoder.patch_embed.weight" or name.endswith("in_proj_weight"):
            value = value * 4  # strong patch features, sharp attention: ids depend on the image
        if name.endswith("c_proj.weight"):
            value = value * 0.3
        if name == "quantize.embedding.weight":
            value = torch.randn(p.shape, generator=g)
        p.data.copy_(value)
    return model


def _tiny(**overrides) -> TiTokTokenizer:
    cfg = TiTokConfig.tiny()
    if overrides:
        cfg = TiTokConfig(**{**cfg.__dict__, **overrides})
    return _randomize(TiTokTokenizer(cfg))


def _pixels(b: int = 2, seed: int = 1) -> torch.Tensor:
    """Blocky random images plus fine noise: each image clearly different from the others."""
    g = torch.Generator().manual_seed(seed)
    coarse = F.interpolate(torch.rand(b, 3, 4, 4, generator=g), size=256, mode="nearest")
    return (0.8 * coarse + 0.2 * torch.rand(b, 3, 256, 256, generator=g)).clamp(0, 1)


def _reference_ids(sd: dict, cfg: TiTokConfig, pixels: torch.Tensor) -> torch.Tensor:
    """Straight from reference-facts 1.3/1.4: plain tensor ops on the state dict, manual softmax attention."""
    e = "encoder."
    b, w, t, h = pixels.shape[0], cfg.width, cfg.num_latent_tokens, cfg.heads
    x = F.conv2d(pixels, sd[e + "patch_embed.weight"], sd[e + "patch_embed.bias"], stride=cfg.patch_size)
    x = x.reshape(b, w, -1).permute(0, 2, 1)
    x = torch.cat([sd[e + "class_embedding"][None].repeat(b, 1, 1), x], 1) + sd[e + "positional_embedding"]
    lat = sd["latent_tokens"] + sd[e + "latent_token_positional_embedding"]
    x = torch.cat([x, lat[None].repeat(b, 1, 1)], 1)
    x = F.layer_norm(x, (w,), sd[e + "ln_pre.weight"], sd[e + "ln_pre.bias"], 1e-5)
    for i in range(cfg.layers):
        p = f"{e}transformer.{i}."
        y = F.layer_norm(x, (w,), sd[p + "ln_1.weight"], sd[p + "ln_1.bias"], 1e-5)
        q, k, v = (y @ sd[p + "attn.in_proj_weight"].T + sd[p + "attn.in_proj_bias"]).split(w, dim=-1)
        q, k, v = (z.reshape(b, -1, h, w // h).transpose(1, 2) for z in (q, k, v))
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(w // h), dim=-1) @ v
        a = a.transpose(1, 2).reshape(b, -1, w)
        x = x + a @ sd[p + "attn.out_proj.weight"].T + sd[p + "attn.out_proj.bias"]
        y = F.layer_norm(x, (w,), sd[p + "ln_2.weight"], sd[p + "ln_2.bias"], 1e-5)
        y = F.gelu(y @ sd[p + "mlp.c_fc.weight"].T + sd[p + "mlp.c_fc.bias"], approximate="none")
        x = x + y @ sd[p + "mlp.c_proj.weight"].T + sd[p + "mlp.c_proj.bias"]
    lat = F.layer_norm(x[:, 1 + (cfg.image_size // cfg.patch_size) ** 2:], (w,),
                       sd[e + "ln_post.weight"], sd[e + "ln_post.bias"], 1e-5)
    assert lat.shape == (b, t, w)
    c_idx = torch.arange(w)[:, None]
    l_idx = torch.arange(t)[None, :]
    if cfg.is_legacy:  # element [b, c, l] = latent[b, (c*T + l) // W, (c*T + l) % W]
        flat = c_idx * t + l_idx
        grid = lat[:, flat // w, flat % w]
    else:  # element [b, c, l] = latent[b, l, c]
        grid = lat[:, l_idx.expand(w, t), c_idx.expand(w, t)]
    conv_w = sd[e + "conv_out.weight"][:, :, 0, 0]
    z = torch.einsum("kc,bcl->blk", conv_w, grid) + sd[e + "conv_out.bias"]  # (B, T, token_size)
    z = z.reshape(b * t, cfg.token_size)
    cb = sd["quantize.embedding.weight"]
    if cfg.use_l2_norm:
        z, cb = F.normalize(z, dim=-1), F.normalize(cb, dim=-1)
    d = z.pow(2).sum(1, keepdim=True) + cb.pow(2).sum(1) - 2 * z @ cb.T
    return d.argmin(1).reshape(b, t)


def _write_hub_checkpoint(model: TiTokTokenizer, directory, fmt: str = "safetensors", drop: str | None = None):
    """The hub-mixin layout: full config.json, encoder + decoder + pixel_* weights."""
    directory.mkdir(parents=True, exist_ok=True)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd["decoder.positional_embedding"] = torch.randn(257, 32)
    sd["decoder.transformer.0.attn.in_proj_weight"] = torch.randn(96, 32)
    sd["pixel_quantize.embedding.weight"] = torch.randn(16, 4)
    sd["pixel_decoder.conv_in.weight"] = torch.randn(4, 4, 3, 3)
    if drop:
        del sd[drop]
    cfg = model.config.to_hub_config()
    cfg["experiment"] = {"name": "titok_tiny"}
    cfg["model"]["vq_model"].update(commitment_cost=0.25, vit_dec_model_size="small", finetune_decoder=True)
    (directory / "config.json").write_text(json.dumps(cfg))
    if fmt == "safetensors":
        save_file(sd, str(directory / "model.safetensors"))
    else:
        torch.save(sd, directory / "pytorch_model.bin")
    return directory


# ---------------------------------------------------------------- sizes and names


@pytest.mark.parametrize("cfg, params, keys, blocks", [
    (TiTokConfig.s128(), 25_933_324, 109, 8),
    (TiTokConfig.bl128_vq8k(), 86_616_384, 157, 12),
])
def test_parameter_and_key_counts(cfg, params, keys, blocks):
    with torch.device("meta"):
        model = TiTokTokenizer(cfg)
    sd = model.state_dict()
    assert model.num_parameters() == params
    assert len(sd) == keys
    assert len([k for k in sd if k.startswith("encoder.")]) == keys - 2
    assert len([k for k in sd if k.startswith("encoder.transformer.")]) == 12 * blocks
    assert not list(model.buffers())
    w = cfg.width
    expected = {
        "latent_tokens": (128, w), "encoder.class_embedding": (1, w), "encoder.positional_embedding": (257, w),
        "encoder.latent_token_positional_embedding": (128, w), "encoder.patch_embed.weight": (w, 3, 16, 16),
        "encoder.transformer.0.attn.in_proj_weight": (3 * w, w), "encoder.transformer.0.attn.in_proj_bias": (3 * w,),
        "encoder.transformer.0.attn.out_proj.weight": (w, w), "encoder.transformer.0.mlp.c_fc.weight": (4 * w, w),
        "encoder.transformer.0.mlp.c_proj.weight": (w, 4 * w), "encoder.ln_post.bias": (w,),
        "encoder.conv_out.weight": (cfg.token_size, w, 1, 1),
        "quantize.embedding.weight": (cfg.codebook_size, cfg.token_size),
    }
    for key, shape in expected.items():
        assert tuple(sd[key].shape) == shape, key


def test_attention_matches_multihead_attention():
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(64, 4)
    torch.nn.init.normal_(mha.in_proj_bias)
    ours = titok._Attention(64, 4)
    ours.load_state_dict(mha.state_dict())
    x = torch.randn(3, 50, 64)
    expected, _ = mha(x.transpose(0, 1), x.transpose(0, 1), x.transpose(0, 1), need_weights=False)
    assert (ours(x) - expected.transpose(0, 1)).abs().max() < 1e-5


# ---------------------------------------------------------------- configs


def test_presets_and_names():
    s, b = TiTokConfig.s128(), TiTokConfig.bl128_vq8k()
    assert (s.codebook_size, s.token_size, s.use_l2_norm, s.width, s.layers, s.heads, s.is_legacy) == (
        4096, 12, True, 512, 8, 8, True)
    assert (b.codebook_size, b.token_size, b.use_l2_norm, b.width, b.layers, b.heads, b.is_legacy) == (
        8192, 64, False, 768, 12, 12, False)
    assert TiTokConfig.from_name("yucornetto/tokenizer_titok_s128_imagenet") == s
    assert TiTokConfig.from_name("yucornetto/tokenizer_titok_bl128_vq8k_imagenet") == b
    assert TiTokConfig.from_name("s128") == s and TiTokConfig.from_name("bl128_vq8k") == b
    assert TiTokConfig.from_name("tiny") == TiTokConfig.tiny()
    with pytest.raises(ValueError, match="unknown TiTok config"):
        TiTokConfig.from_name("titok_xl")


def _hub_layout(**vq):
    base = {"codebook_size": 4096, "token_size": 12, "use_l2_norm": True, "commitment_cost": 0.25,
            "vit_enc_model_size": "small", "vit_dec_model_size": "small", "vit_enc_patch_size": 16,
            "vit_dec_patch_size": 16, "num_latent_tokens": 128, "finetune_decoder": True}
    base.update(vq)
    return {"experiment": {}, "model": {"vq_model": base, "generator": {}},
            "dataset": {"preprocessing": {"crop_size": 256}}}


def test_from_hub_config():
    assert TiTokConfig.from_hub_config(_hub_layout()) == TiTokConfig.s128()  # is_legacy absent -> True
    bl = _hub_layout(codebook_size=8192, token_size=64, use_l2_norm=False, vit_enc_model_size="base",
                     is_legacy=False, quantize_mode="vq")
    assert TiTokConfig.from_hub_config(bl) == TiTokConfig.bl128_vq8k()
    large = TiTokConfig.from_hub_config(_hub_layout(vit_enc_model_size="large"))
    assert (large.width, large.layers, large.heads) == (1024, 24, 16)
    with pytest.raises(ValueError, match="quantize_mode"):
        TiTokConfig.from_hub_config(_hub_layout(quantize_mode="vae"))
    with pytest.raises(ValueError, match="vit_enc_model_size"):
        TiTokConfig.from_hub_config(_hub_layout(vit_enc_model_size="huge"))
    with pytest.raises(ValueError, match="model.vq_model"):
        TiTokConfig.from_hub_config({"model": {}})


@pytest.mark.parametrize("cfg", [TiTokConfig.tiny(), TiTokConfig.s128(), TiTokConfig.bl128_vq8k()])
def test_hub_config_round_trip(cfg):
    layout = cfg.to_hub_config()
    assert layout["dataset"]["preprocessing"]["crop_size"] == 256
    assert TiTokConfig.from_hub_config(json.loads(json.dumps(layout))) == cfg
    if cfg != TiTokConfig.tiny():  # the real sizes also keep the upstream size name
        assert layout["model"]["vq_model"]["vit_enc_model_size"] in ("small", "base")


# ---------------------------------------------------------------- ids


@pytest.mark.parametrize("legacy", [True, False])
@pytest.mark.parametrize("l2", [True, False])
def test_ids_match_independent_implementation(legacy, l2):
    model = _tiny(is_legacy=legacy, use_l2_norm=l2)
    pixels = _pixels(3)
    ids = model.encode(pixels)
    sd = model.state_dict()
    expected = _reference_ids(sd, model.config, pixels)
    assert torch.equal(ids, expected)
    assert ids.unique().numel() > 20  # a non-trivial spread over the 64 codes
    assert (ids[0] != ids[1]).float().mean() > 0.05  # ids depend on the image
    # the reshape matters: the other layout gives (mostly) different ids on the same weights
    flipped = _reference_ids(sd, TiTokConfig(**{**model.config.__dict__, "is_legacy": not legacy}), pixels)
    assert (flipped == ids).float().mean() < 0.2


def test_encode_latents_layout():
    model = _tiny()
    z = model.encode_latents(_pixels(2))
    assert z.shape == (2, 8, 128) and z.dtype == torch.float32
    ids = vq_indices(z.transpose(1, 2).reshape(-1, 8), model.quantize.embedding.weight, True).view(2, 128)
    assert torch.equal(ids, model.encode(_pixels(2)))


def test_codes_shape_dtype_range_deterministic():
    model = _tiny()
    pixels = _pixels(4)
    ids = model(pixels)
    assert ids.shape == (4, 128) and ids.dtype == torch.int64
    assert ids.min() >= 0 and ids.max() < model.config.codebook_size
    assert torch.equal(ids, model.encode(pixels))
    assert torch.equal(ids[1:2], model.encode(pixels[1:2]))  # batch-independent


def test_quantizer_l2_versus_plain():
    codebook = torch.tensor([[0.9, 0.0], [10.0, 1.0]])
    z = torch.tensor([[1.0, 0.1]])
    assert vq_indices(z, codebook, use_l2_norm=False).tolist() == [0]  # plain: nearest in Euclidean terms
    assert vq_indices(z, codebook, use_l2_norm=True).tolist() == [1]  # l2: same direction as row 1
    dup = torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.0, 0.0]])
    assert vq_indices(torch.tensor([[2.0, 0.0]]), dup, use_l2_norm=False).tolist() == [1]  # first index on ties
    assert vq_indices(z.half(), codebook.half(), True).dtype == torch.int64


def test_quantizer_ignores_autocast():
    # bf16 would round both dot products to 1.0078 and pick row 0; fp32 picks the true nearest, row 1
    codebook = torch.tensor([[1.0, 0.0], [1.01, 0.0]])
    z = torch.tensor([[1.009, 0.0]])
    assert vq_indices(z, codebook, use_l2_norm=False).tolist() == [1]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert vq_indices(z, codebook, use_l2_norm=False).tolist() == [1]
        assert vq_indices(z.bfloat16(), codebook, use_l2_norm=False).dtype == torch.int64


# ---------------------------------------------------------------- loading and saving


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_load_hub_layout_by_local_path(tmp_path, fmt):
    source = _tiny()
    directory = _write_hub_checkpoint(source, tmp_path / "ckpt", fmt)
    loaded = TiTokTokenizer.from_pretrained(directory)
    assert loaded.config == source.config
    assert loaded.state_dict().keys() == source.state_dict().keys()
    for k, v in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    assert torch.equal(loaded.encode(_pixels(2)), source.encode(_pixels(2)))


def test_missing_key_is_an_error(tmp_path):
    directory = _write_hub_checkpoint(_tiny(), tmp_path / "ckpt", drop="encoder.transformer.1.mlp.c_fc.bias")
    with pytest.raises(KeyError, match=r"encoder\.transformer\.1\.mlp\.c_fc\.bias"):
        TiTokTokenizer.from_pretrained(directory)


def test_load_weights_with_prefix():
    source = _tiny()
    target = TiTokTokenizer(TiTokConfig.tiny())
    sd = {"image_tokenizer.model." + k: v for k, v in source.state_dict().items()}
    sd["token_embedding.weight"] = torch.zeros(3, 3)
    target.load_weights(sd, prefix="image_tokenizer.model.")
    assert torch.equal(target.encode(_pixels(1)), source.encode(_pixels(1)))


def test_save_pretrained_round_trip(tmp_path):
    source = _tiny(is_legacy=False, use_l2_norm=False)
    source.save_pretrained(tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json", "model.safetensors"]
    layout = json.loads((tmp_path / "out" / "config.json").read_text())
    assert layout["model"]["vq_model"]["is_legacy"] is False
    loaded = TiTokTokenizer.from_pretrained(tmp_path / "out")
    assert loaded.config == source.config
    assert torch.equal(loaded.encode(_pixels(2)), source.encode(_pixels(2)))


def test_hub_download_falls_back_to_pytorch_model_bin(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError

    directory = _write_hub_checkpoint(_tiny(), tmp_path / "hub", "bin")
    calls = []

    def fake_download(repo_id, filename, **kwargs):
        calls.append((repo_id, filename))
        path = directory / filename
        if not path.exists():
            raise EntryNotFoundError(f"{filename} not in {repo_id}")
        return str(path)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    TiTokTokenizer.from_pretrained("s128")
    assert calls == [("yucornetto/tokenizer_titok_s128_imagenet", name)
                     for name in ("config.json", "model.safetensors", "pytorch_model.bin")]


def test_unknown_checkpoint_error(tmp_path):
    with pytest.raises(OSError, match="not a local directory"):
        TiTokTokenizer.from_pretrained(str(tmp_path / "nope" / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        TiTokTokenizer.from_pretrained(tmp_path / "empty")


# ---------------------------------------------------------------- frozen and validated


def test_frozen():
    model = _tiny()
    assert not model.training
    assert all(not p.requires_grad for p in model.parameters())
    model.train()
    assert not model.training and not any(m.training for m in model.modules())
    parent = torch.nn.Sequential(model)
    parent.train()
    assert not model.training
    z = model.encode_latents(_pixels(1).requires_grad_(True))
    assert not z.requires_grad


def test_input_validation():
    model = _tiny()
    with pytest.raises(ValueError, match=r"\(B, 3, 256, 256\).*ImagePreprocess"):
        model.encode(torch.rand(1, 3, 224, 224))
    with pytest.raises(ValueError, match=r"\(B, 3, 256, 256\)"):
        model.encode(torch.rand(3, 256, 256))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        model.encode(torch.rand(1, 3, 256, 256) * 255)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        model.encode(torch.rand(1, 3, 256, 256) - 0.5)
    with pytest.raises(ValueError, match="float"):
        model.encode(torch.zeros(1, 3, 256, 256, dtype=torch.uint8))
