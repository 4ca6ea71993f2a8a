"""Frozen TiTok encoder + VQ quantizer: (B, 3, 256, 256) pixels in [0, 1] -> (B, 128) int64 code ids.

Parameter names match the TiTok hub checkpoints (``yucornetto/tokenizer_titok_*``) with no prefix, so their
encoder/quantizer weights load strictly; decoder weights in those files are ignored. The forward pass follows
the upstream encoder exactly, including the "legacy" raw reshape of TiTok-S (see reference-facts.md, 1.3-1.4).
"""
from __future__ import annotations

import contextlib
import json
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fuselip_med.core.titok_init import init_local_patches_
from fuselip_med.io import atomic_write, atomic_write_text

# vit_enc_model_size -> (width, layers, heads), as in upstream TiTok.
ENCODER_SIZES = {"small": (512, 8, 8), "base": (768, 12, 12), "large": (1024, 24, 16)}
INITS = ("random", "local_patches")
CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "model.safetensors"
TORCH_WEIGHTS_NAME = "pytorch_model.bin"


@dataclass(frozen=True)
class TiTokConfig:
    """The fields that matter for encoding; everything else in a hub config.json is ignored."""

    codebook_size: int
    token_size: int
    use_l2_norm: bool
    width: int
    layers: int
    heads: int
    mlp_ratio: float = 4.0
    patch_size: int = 16
    image_size: int = 256
    num_latent_tokens: int = 128
    is_legacy: bool = True
    init: str = "random"  # weights before loading: "random" (upstream) or "local_patches" (see titok_init.py)

    def __post_init__(self) -> None:
        if self.init not in INITS:
            raise ValueError(f"TiTok init must be one of {', '.join(INITS)}, got {self.init!r}")
        if self.width % self.heads:
            raise ValueError(f"TiTok width {self.width} is not divisible by heads {self.heads}")
        if self.image_size % self.patch_size:
            raise ValueError(f"TiTok image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")

    @classmethod
    def s128(cls) -> "TiTokConfig":
        return cls(codebook_size=4096, token_size=12, use_l2_norm=True, width=512, layers=8, heads=8, is_legacy=True)

    @classmethod
    def bl128_vq8k(cls) -> "TiTokConfig":
        return cls(codebook_size=8192, token_size=64, use_l2_norm=False, width=768, layers=12, heads=12,
                   is_legacy=False)

    @classmethod
    def tiny(cls) -> "TiTokConfig":
        """A few-thousand-parameter encoder with the real input/output geometry and structured weights whose
        ids follow image content and layout (there are no released tiny weights), for tests and CPU demos."""
        return cls(codebook_size=64, token_size=8, use_l2_norm=True, width=32, layers=2, heads=2, is_legacy=False,
                   init="local_patches")

    @classmethod
    def from_name(cls, name: str) -> "TiTokConfig":
        short = _ALIASES.get(name, name)
        if short not in ("s128", "bl128_vq8k", "tiny"):
            raise ValueError(f"unknown TiTok config {name!r}; known: s128, bl128_vq8k, tiny, {', '.join(_ALIASES)}")
        return getattr(cls, short)()

    @classmethod
    def from_hub_config(cls, config: dict) -> "TiTokConfig":
        """Parse the hub config.json layout {"model": {"vq_model": {...}}, "dataset": {"preprocessing": {...}}}."""
        try:
            vq = config["model"]["vq_model"]
        except (KeyError, TypeError):
            raise ValueError("TiTok config.json has no model.vq_model section; is this a TiTok checkpoint?") from None
        mode = vq.get("quantize_mode", "vq")
        if mode != "vq":
            raise ValueError(f"TiTok config.json model.vq_model.quantize_mode is {mode!r}; only 'vq' is supported")
        if "vit_enc_width" in vq:
            width, layers, heads = vq["vit_enc_width"], vq["vit_enc_layers"], vq["vit_enc_heads"]
        else:
            size = vq.get("vit_enc_model_size")
            if size not in ENCODER_SIZES:
                raise ValueError(f"TiTok config.json model.vq_model.vit_enc_model_size is {size!r}; "
                                 f"expected one of {sorted(ENCODER_SIZES)}")
            width, layers, heads = ENCODER_SIZES[size]
        crop = (config.get("dataset") or {}).get("preprocessing", {}).get("crop_size", 256)
        return cls(
            codebook_size=int(vq["codebook_size"]), token_size=int(vq["token_size"]),
            use_l2_norm=bool(vq["use_l2_norm"]), width=int(width), layers=int(layers), heads=int(heads),
            mlp_ratio=float(vq.get("vit_enc_mlp_ratio", 4.0)), patch_size=int(vq.get("vit_enc_patch_size", 16)),
            image_size=int(crop), num_latent_tokens=int(vq["num_latent_tokens"]),
            is_legacy=bool(vq.get("is_legacy", True)), init=str(vq.get("init", "random")),
        )

    def to_hub_config(self) -> dict:
        vq = {
            "codebook_size": self.codebook_size, "token_size": self.token_size, "use_l2_norm": self.use_l2_norm,
            "vit_enc_patch_size": self.patch_size, "num_latent_tokens": self.num_latent_tokens,
            "is_legacy": self.is_legacy, "quantize_mode": "vq",
            "vit_enc_width": self.width, "vit_enc_layers": self.layers, "vit_enc_heads": self.heads,
            "vit_enc_mlp_ratio": self.mlp_ratio,
        }
        if self.init != "random":  # our own key; upstream configs never carry it
            vq["init"] = self.init
        for size, dims in ENCODER_SIZES.items():
            if dims == (self.width, self.layers, self.heads):
                vq["vit_enc_model_size"] = size
        return {"model": {"vq_model": vq}, "dataset": {"preprocessing": {"crop_size": self.image_size}}}


_HUB_IDS = {"s128": "yucornetto/tokenizer_titok_s128_imagenet",
            "bl128_vq8k": "yucornetto/tokenizer_titok_bl128_vq8k_imagenet"}
_ALIASES = {**{hub: short for short, hub in _HUB_IDS.items()}, "titok_s128": "s128", "titok_bl128_vq8k": "bl128_vq8k"}


class _Attention(nn.Module):
    """nn.MultiheadAttention's parameters and math (packed q/k/v, biases, no mask), batch-first, via SDPA."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, w = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        q, k, v = qkv.view(b, n, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, w))


@contextlib.contextmanager
def _ieee_fp32_matmuls():
    """CUDA float32 matmuls without TF32 inside the block; the caller's setting is restored after."""
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


class _Block(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float):
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.ln_1 = nn.LayerNorm(width, eps=1e-5)
        self.attn = _Attention(width, heads)
        self.ln_2 = nn.LayerNorm(width, eps=1e-5)
        self.mlp = nn.Sequential(OrderedDict(
            c_fc=nn.Linear(width, hidden), gelu=nn.GELU(), c_proj=nn.Linear(hidden, width)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class _Encoder(nn.Module):
    def __init__(self, cfg: TiTokConfig):
        super().__init__()
        w, scale = cfg.width, cfg.width ** -0.5
        grid = cfg.image_size // cfg.patch_size
        self.patch_embed = nn.Conv2d(3, w, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=True)
        self.class_embedding = nn.Parameter(scale * torch.randn(1, w))
        self.positional_embedding = nn.Parameter(scale * torch.randn(grid * grid + 1, w))
        self.latent_token_positional_embedding = nn.Parameter(scale * torch.randn(cfg.num_latent_tokens, w))
        self.ln_pre = nn.LayerNorm(w, eps=1e-5)
        self.transformer = nn.ModuleList(_Block(w, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.layers))
        self.ln_post = nn.LayerNorm(w, eps=1e-5)
        self.conv_out = nn.Conv2d(w, cfg.token_size, kernel_size=1, bias=True)


class _Quantizer(nn.Module):
    def __init__(self, cfg: TiTokConfig):
        super().__init__()
        self.embedding = nn.Embedding(cfg.codebook_size, cfg.token_size)
        nn.init.uniform_(self.embedding.weight, -1.0 / cfg.codebook_size, 1.0 / cfg.codebook_size)


def vq_indices(z: torch.Tensor, codebook: torch.Tensor, use_l2_norm: bool) -> torch.Tensor:
    """Nearest codebook row for each row of z (N, D), in fp32 with autocast off; first index on ties."""
    with torch.autocast(device_type=z.device.type, enabled=False):
        z, codebook = z.float(), codebook.float()
        if use_l2_norm:
            z, codebook = F.normalize(z, dim=-1), F.normalize(codebook, dim=-1)
        d = (z ** 2).sum(1, keepdim=True) + (codebook ** 2).sum(1) - 2 * torch.einsum("bd,dn->bn", z, codebook.T)
        return d.argmin(dim=1)


def check_pixels(pixels: torch.Tensor, image_size: int) -> None:
    """Raise ``ValueError`` unless ``pixels`` is a float (B, 3, image_size, image_size) tensor in [0, 1] (what
    ``ImagePreprocess`` gives; TiTok reads them without mean/std normalisation, reference-facts.md 1.5)."""
    s = image_size
    if not isinstance(pixels, torch.Tensor) or pixels.dim() != 4 or tuple(pixels.shape[1:]) != (3, s, s):
        got = tuple(pixels.shape) if isinstance(pixels, torch.Tensor) else type(pixels).__name__
        raise ValueError(f"TiTok expects pixels of shape (B, 3, {s}, {s}), got {got}; "
                         "prepare images with fuselip_med.core.image_preprocess.ImagePreprocess")
    if not pixels.is_floating_point():
        raise ValueError(f"TiTok expects float pixels in [0, 1], got dtype {pixels.dtype}; "
                         "prepare images with fuselip_med.core.image_preprocess.ImagePreprocess")
    if pixels.numel() == 0:
        return
    lo, hi = pixels.min().item(), pixels.max().item()
    if not (lo >= -1e-3 and hi <= 1 + 1e-3):  # also catches NaN
        raise ValueError(f"TiTok expects pixels in [0, 1] without mean/std normalisation, got min {lo:.4g}, "
                         f"max {hi:.4g}; prepare images with fuselip_med.core.image_preprocess.ImagePreprocess")


class TiTokTokenizer(nn.Module):
    """Always-frozen TiTok image tokenizer; ``encode``/``forward`` map pixels to (B, num_latent_tokens) ids."""

    def __init__(self, config: TiTokConfig):
        super().__init__()
        self.config = config
        self.encoder = _Encoder(config)
        self.latent_tokens = nn.Parameter(config.width ** -0.5 * torch.randn(config.num_latent_tokens, config.width))
        self.quantize = _Quantizer(config)
        if config.init == "local_patches":
            init_local_patches_(self)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "TiTokTokenizer":
        return super().train(False)  # frozen: never leaves eval mode

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @torch.no_grad()
    def encode_latents(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pre-quantizer code vectors, (B, token_size, num_latent_tokens)."""
        check_pixels(pixels, self.config.image_size)
        return self.latents(pixels)

    def latents(self, pixels: torch.Tensor) -> torch.Tensor:
        """``encode_latents`` without the input checks (data-dependent branches): the traceable graph that
        ``export.onnx`` exports. Pixels (B, 3, S, S) float32 in [0, 1] -> (B, token_size, num_latent_tokens)."""
        cfg, enc = self.config, self.encoder
        x = pixels.to(device=self.latent_tokens.device, dtype=self.latent_tokens.dtype)
        b, w, t = x.shape[0], cfg.width, cfg.num_latent_tokens
        x = enc.patch_embed(x).flatten(2).transpose(1, 2)  # (B, grid*grid, W), row-major patches
        # the .to(x.dtype) casts mirror upstream, so an outer fp16 autocast behaves as it did in training
        x = torch.cat([enc.class_embedding.to(x.dtype).expand(b, 1, w), x], dim=1)
        x = x + enc.positional_embedding.to(x.dtype)
        latents = self.latent_tokens.to(x.dtype) + enc.latent_token_positional_embedding.to(x.dtype)
        latents = latents.expand(b, t, w)
        x = enc.ln_pre(torch.cat([x, latents], dim=1))
        for block in enc.transformer:
            x = block(x)
        x = enc.ln_post(x[:, -t:])  # (B, T, W)
        # Legacy (TiTok-S): raw row-major reinterpretation, NOT a transpose; upstream quirk kept bit-for-bit.
        x = x.reshape(b, w, t, 1) if cfg.is_legacy else x.transpose(1, 2).unsqueeze(-1)
        return enc.conv_out(x).reshape(b, cfg.token_size, t)

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels (B, 3, S, S) float in [0, 1] -> code ids (B, num_latent_tokens) int64.

        float32 work runs with CUDA's TF32 matmuls off whatever the caller set (training turns them on), as in the
        reference inference path (reference-facts 1.7: matmul TF32 off, cuDNN TF32 at PyTorch's default): a TF32
        latent can flip a code at a near-tie, so cached, on-the-fly ``train.titok_fp32`` and inference codes
        agree. Under a bf16/fp16 autocast the flag has no effect."""
        check_pixels(pixels, self.config.image_size)
        with _ieee_fp32_matmuls():
            return self.codes(pixels)

    def codes(self, pixels: torch.Tensor) -> torch.Tensor:
        """``encode`` without the input checks: pixels (B, 3, S, S) float32 in [0, 1] -> (B, T) int64 code ids,
        the VQ argmin included (the graph ``export.onnx`` exports)."""
        z = self.latents(pixels)
        b, c, t = z.shape
        ids = vq_indices(z.transpose(1, 2).reshape(b * t, c), self.quantize.embedding.weight, self.config.use_l2_norm)
        return ids.view(b, t)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.encode(pixels)

    def load_weights(self, state_dict: dict, prefix: str = "") -> None:
        """Load our keys from ``state_dict`` (under ``prefix``), ignoring any others; missing keys are an error."""
        ours = self.state_dict()
        missing = [k for k in ours if prefix + k not in state_dict]
        if missing:
            shown = ", ".join(missing[:10]) + (f" ... ({len(missing)} in all)" if len(missing) > 10 else "")
            raise KeyError(f"TiTok weights lack {len(missing)} needed key(s) (prefix {prefix!r}): {shown}")
        self.load_state_dict({k: state_dict[prefix + k] for k in ours}, strict=True)

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, device: str | torch.device = "cpu") -> "TiTokTokenizer":
        """A local directory or a hub id (short names "s128"/"bl128_vq8k" work too) holding config.json + weights."""
        config_file, weights_file = _resolve_files(str(name_or_path))
        with open(config_file, encoding="utf-8") as f:
            config = TiTokConfig.from_hub_config(json.load(f))
        if weights_file.endswith(".safetensors"):
            from safetensors.torch import load_file
            state_dict = load_file(weights_file, device="cpu")
        else:
            state_dict = torch.load(weights_file, map_location="cpu", weights_only=True)
        model = cls(config)
        model.load_weights(state_dict)
        return model.to(device)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write config.json (hub layout) and model.safetensors, each atomically."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        config_text = json.dumps(self.config.to_hub_config(), indent=2)
        atomic_write_text(directory / CONFIG_NAME, config_text)
        atomic_write(directory / SAFETENSORS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))


def _resolve_files(name: str) -> tuple[str, str]:
    """(config.json, weights file) from a local directory or the hub; safetensors preferred over .bin."""
    if os.path.isdir(name):
        weights = [os.path.join(name, f) for f in (SAFETENSORS_NAME, TORCH_WEIGHTS_NAME)]
        found = [w for w in weights if os.path.isfile(w)]
        config = os.path.join(name, CONFIG_NAME)
        if not os.path.isfile(config) or not found:
            raise FileNotFoundError(f"TiTok directory {name} needs {CONFIG_NAME} and "
                                    f"{SAFETENSORS_NAME} or {TORCH_WEIGHTS_NAME}")
        return config, found[0]
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError

    from fuselip_med.core.network import NetworkError, hub_call

    repo_id = _HUB_IDS.get(_ALIASES.get(name, name), name)

    def download(filename: str) -> str:
        return hub_call(f"downloading {repo_id}", lambda: huggingface_hub.hf_hub_download(repo_id, filename))

    try:
        config = download(CONFIG_NAME)
        try:
            weights = download(SAFETENSORS_NAME)
        except EntryNotFoundError:
            weights = download(TORCH_WEIGHTS_NAME)
    except NetworkError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure here means "cannot find it"; say so in one sentence
        raise OSError(f"TiTok checkpoint {name!r} is not a local directory and could not be fetched from the "
                      f"Hugging Face Hub as {repo_id!r} ({type(e).__name__}: {e})") from e
    return config, weights
