"""FILIP dual encoder: a timm ViT for images and a causal Transformer (timm blocks) for text.

Both towers return every token projected to a shared `embed_dim` space and L2-normalised, plus a
pooled global feature (image class token, text end-of-text token) for the CLIP baseline.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from pipeline.configtools import ranged

IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class ModelConfig:
    """Sizes of both towers. `preset()` gives the paper's sizes; any field can be overridden."""

    # Ranges: checked when a train config is loaded (filip/config.py, which also checks that the
    # heads divide the widths and the patch the image); the same bounds as a checkpoint's
    # (filip/checkpoint.py SIZE_LIMITS), so a config that loads gives a checkpoint that loads.
    embed_dim: int = ranged(256, "[1, 16384]")
    image_size: int = ranged(224, "[1, 8192]")
    patch_size: int = ranged(32, "[1, 8192]")
    vision_width: int = ranged(768, "[1, 16384]")
    vision_layers: int = ranged(12, "[1, 256]")
    vision_heads: int = ranged(12, "[1, 1024]")
    vocab_size: int = ranged(32000, "[4, 4000000]")
    context_length: int = ranged(77, "[3, 16384]")  # start and end tokens and one more
    text_width: int = ranged(512, "[1, 16384]")
    text_layers: int = ranged(12, "[1, 256]")
    text_heads: int = ranged(8, "[1, 1024]")
    mlp_ratio: float = ranged(4.0, "(0, 64]")
    # Whether the text start/end tokens take part in late interaction (padding never does).
    count_special_tokens: bool = False
    grad_checkpointing: bool = False
    # The log of the initial logit scale; the scale itself is clamped at 100 = exp(4.605...).
    init_logit_scale: float = ranged(math.log(1 / 0.07), "[0, 4.6052]")

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "ModelConfig":
        presets: dict[str, dict[str, Any]] = {
            # Small enough to train a hundred steps on two CPU cores in seconds.
            "tiny": dict(image_size=64, patch_size=16, vision_width=64, vision_layers=2,
                         vision_heads=2, text_width=64, text_layers=2, text_heads=2,
                         vocab_size=1000),
            "base": dict(image_size=224, patch_size=32, vision_width=768, vision_layers=12,
                         vision_heads=12, text_width=512, text_layers=12, text_heads=8),
            "base16": dict(image_size=224, patch_size=16, vision_width=768, vision_layers=12,
                           vision_heads=12, text_width=512, text_layers=12, text_heads=8),
            "large": dict(image_size=224, patch_size=14, vision_width=1024, vision_layers=24,
                          vision_heads=16, text_width=768, text_layers=12, text_heads=12),
        }
        if name not in presets:
            raise ValueError(f"unknown model preset {name!r}; choose from {sorted(presets)}")
        known = {f.name for f in fields(cls)}
        unknown = set(overrides) - known
        if unknown:
            raise ValueError(f"unknown ModelConfig fields {sorted(unknown)}")
        return replace(cls(**presets[name]), **overrides)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class ImageFeatures(NamedTuple):
    tokens: torch.Tensor  # [B, P, D] patch tokens, L2-normalised, class token excluded
    pooled: torch.Tensor  # [B, D] class token, L2-normalised


class TextFeatures(NamedTuple):
    tokens: torch.Tensor  # [B, L, D] L2-normalised
    mask: torch.Tensor  # [B, L] bool: positions that take part in late interaction
    pooled: torch.Tensor  # [B, D] end-of-text token, L2-normalised


class TextTransformer(nn.Module):
    """Causal Transformer over token ids, CLIP style (pre-norm timm blocks, learned positions)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        from timm.models.vision_transformer import Block

        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.text_width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, cfg.text_width))
        self.blocks = nn.ModuleList(
            Block(cfg.text_width, cfg.text_heads, mlp_ratio=cfg.mlp_ratio, qkv_bias=True)
            for _ in range(cfg.text_layers)
        )
        self.ln_final = nn.LayerNorm(cfg.text_width)
        self.grad_checkpointing = cfg.grad_checkpointing
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.token_embedding(ids) + self.positional_embedding[: ids.shape[1]]
        # A causal mask alone keeps padding out: padding only ever follows the end-of-text token,
        # so no real token can attend to it, and padded outputs are masked in the loss.
        for block in self.blocks:
            if self.grad_checkpointing and self.training:
                x = checkpoint(block, x, None, True, use_reentrant=False)
            else:
                x = block(x, is_causal=True)
        return self.ln_final(x)


class FilipModel(nn.Module):
    """FILIP dual encoder with a learnable temperature (logit scale initialised to 1/0.07)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        from timm.models.vision_transformer import VisionTransformer

        if cfg.image_size % cfg.patch_size:
            raise ValueError(f"image_size {cfg.image_size} not divisible by patch_size {cfg.patch_size}")
        self.cfg = cfg
        # pre_norm as in CLIP's ViT; num_classes=0 keeps timm's head out so we get all tokens.
        self.visual = VisionTransformer(
            img_size=cfg.image_size, patch_size=cfg.patch_size, embed_dim=cfg.vision_width,
            depth=cfg.vision_layers, num_heads=cfg.vision_heads, mlp_ratio=cfg.mlp_ratio,
            num_classes=0, global_pool="token", class_token=True, pre_norm=True,
        )
        self.visual.set_grad_checkpointing(cfg.grad_checkpointing)
        self.text = TextTransformer(cfg)
        # One projection per tower, shared by all tokens of that tower (as the paper does).
        self.image_projection = nn.Linear(cfg.vision_width, cfg.embed_dim, bias=False)
        self.text_projection = nn.Linear(cfg.text_width, cfg.embed_dim, bias=False)
        nn.init.normal_(self.image_projection.weight, std=cfg.vision_width ** -0.5)
        nn.init.normal_(self.text_projection.weight, std=cfg.text_width ** -0.5)
        self.logit_scale = nn.Parameter(torch.tensor(float(cfg.init_logit_scale)))

    @property
    def grid_size(self) -> tuple[int, int]:
        side = self.cfg.image_size // self.cfg.patch_size
        return side, side

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.visual.set_grad_checkpointing(enable)
        self.text.grad_checkpointing = enable

    def encode_image(self, images: torch.Tensor) -> ImageFeatures:
        x = self.visual.forward_features(images)  # [B, 1 + P, W], final norm applied
        x = F.normalize(self.image_projection(x), dim=-1)
        return ImageFeatures(tokens=x[:, 1:], pooled=x[:, 0])

    def encode_text(self, ids: torch.Tensor, mask: torch.Tensor) -> TextFeatures:
        mask = mask.bool()
        x = F.normalize(self.text_projection(self.text(ids)), dim=-1)
        lengths = mask.sum(dim=1)
        if bool((lengths == 0).any()):
            raise ValueError("every text needs at least one token (the tokenizer adds start/end)")
        rows = torch.arange(ids.shape[0], device=ids.device)
        eot = lengths - 1  # the tokenizer writes [start, pieces..., end, pad...]
        pooled = x[rows, eot]
        interact = mask.clone()
        if not self.cfg.count_special_tokens:
            interact[:, 0] = False
            interact[rows, eot] = False
            # An empty caption has only start/end: keep its end token so it still has a score.
            empty = ~interact.any(dim=1)
            interact[rows[empty], eot[empty]] = True
        return TextFeatures(tokens=x, mask=interact, pooled=pooled)

    def forward(self, images: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> dict[str, Any]:
        image = self.encode_image(images)
        text = self.encode_text(ids, mask)
        return {
            "image_tokens": image.tokens, "image_pooled": image.pooled,
            "text_tokens": text.tokens, "text_mask": text.mask, "text_pooled": text.pooled,
            "image": image, "text": text,
            # Not clamped here: a clamp on the output zeroes the gradient past the cap and can
            # freeze the temperature. The trainer clamps the parameter after each optimizer step.
            "logit_scale": self.logit_scale.exp(),
        }

    def no_weight_decay_names(self) -> set[str]:
        """Parameter names exempt from weight decay: biases, norms, embeddings, temperature."""
        names: set[str] = set()
        for name, param in self.named_parameters():
            # The patch embedding is a convolution (a real weight), so it keeps its decay.
            is_embedding = name.endswith(("pos_embed", "cls_token", "positional_embedding",
                                          "token_embedding.weight"))
            if param.ndim < 2 or is_embedding or name == "logit_scale":
                names.add(name)
        return names
