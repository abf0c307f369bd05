"""Typed model configuration: the released 7B sizes are the defaults, tiny test models override numbers only."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any

SEG_TOKEN = "<SEG>"


class ConfigError(ValueError):
    """A configuration value is missing, of the wrong type or out of range."""


@dataclass
class SegModuleConfig:
    """The query-conditioned 2.5D U-Net (SPEC §3.1). Defaults reproduce the released 75.26 M-parameter module."""

    in_slices: int = 9  # key slice ± 4, one input channel each
    image_size: int = 512  # square input side, px
    features: tuple[int, ...] = (32, 64, 128, 256, 512, 1024)  # channels per U-Net stage
    strides: tuple[int, ...] = (1, 2, 2, 2, 2, 2)
    convs_per_stage: int = 2
    query_dim: int | None = None  # LLM hidden size; None = take it from the VLM (3584 for 7B)
    image_proj_hidden: int = 1536
    query_proj_hidden: int = 1536
    d_model: int = 768
    decoder_layers: int = 6
    decoder_heads: int = 8
    decoder_ffn: int = 2048
    dropout: float = 0.1
    mask_hidden: int = 128

    @property
    def grid_size(self) -> int:
        """Side of the bottleneck token grid (16 for 512 px and total stride 32)."""
        return self.image_size // math.prod(self.strides)

    def validate(self) -> None:
        if len(self.features) != len(self.strides):
            raise ConfigError(f"seg.features ({len(self.features)} stages) and seg.strides "
                              f"({len(self.strides)}) must have the same length")
        if self.strides[0] != 1:
            raise ConfigError("seg.strides[0] must be 1 so the finest feature map has the input resolution")
        if self.image_size % math.prod(self.strides):
            raise ConfigError(f"seg.image_size {self.image_size} must be divisible by the total stride "
                              f"{math.prod(self.strides)}")
        if self.d_model % self.decoder_heads:
            raise ConfigError(f"seg.d_model {self.d_model} must be divisible by seg.decoder_heads {self.decoder_heads}")
        for name in ("in_slices", "image_size", "convs_per_stage", "image_proj_hidden", "query_proj_hidden",
                     "d_model", "decoder_layers", "decoder_heads", "decoder_ffn", "mask_hidden"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"seg.{name} must be positive, got {getattr(self, name)}")
        if self.in_slices % 2 != 1:
            raise ConfigError(f"seg.in_slices must be odd (key slice ± k), got {self.in_slices}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"seg.dropout must be in [0, 1), got {self.dropout}")


@dataclass
class LoraSettings:
    """LoRA on the language model only (the vision tower stays frozen). Released recipe: r 32, α 16, q/v."""

    r: int = 32
    alpha: int = 16
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")

    def validate(self) -> None:
        if self.r <= 0 or self.alpha <= 0:
            raise ConfigError(f"lora.r and lora.alpha must be positive, got r={self.r} alpha={self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise ConfigError("lora.target_modules must name at least one module (e.g. q_proj)")
        for name in self.target_modules:
            if not name.isidentifier():
                raise ConfigError(f"lora.target_modules entries are module names like 'q_proj', got {name!r}")


@dataclass
class LossWeights:
    """Total loss = ce·CE + dice·Dice + bce·BCE (SPEC §3.1, default 1 : 1 : 1)."""

    ce: float = 1.0
    dice: float = 1.0
    bce: float = 1.0

    def validate(self) -> None:
        for name, value in dataclasses.asdict(self).items():
            if value < 0:
                raise ConfigError(f"loss.{name} must be ≥ 0, got {value}")


TRAIN_VISION_CHOICES = ("none", "merger", "all")
VISION_ATTENTION_CHOICES = ("sdpa", "varlen")


@dataclass
class ModelConfig:
    """Everything needed to rebuild the fused model around a local Qwen2.5-VL folder."""

    base_model: str = ""  # local folder with Qwen2.5-VL-7B-Instruct in HF format
    # Released OmniAbnorm-CT folder loaded on top of the base before training; recorded so that our checkpoints,
    # which hold only trained tensors, rebuild the same starting point (the release changed every embedding row).
    released_checkpoint: str = ""
    dtype: str = "bfloat16"  # weights of the VLM: bfloat16 | float32
    image_pixels: int = 512 * 512  # VLM image budget, min = max (about 324 visual tokens)
    lora: LoraSettings | None = field(default_factory=LoraSettings)  # None = no LoRA
    # Vision tower training: none (released recipe: a pretrained tower stays frozen), merger (the patch merger that
    # maps vision features into the LLM), or all. Trained vision tensors are saved with the checkpoint.
    train_vision: str = "none"
    # Full fine-tuning: the whole language model and its output head train (with lora: None; FSDP2 in training).
    train_language_model: bool = False
    seg: SegModuleConfig = field(default_factory=SegModuleConfig)
    loss: LossWeights = field(default_factory=LossWeights)
    # Fast paths (docs/performance.md): same results as the plain path within floating-point tolerance.
    # linear_ce: the training CE is computed from the hidden states in chunks, only where a label is, so the
    # (B, L, V) logits are never built (Liger's fused kernel on CUDA when liger-kernel is installed); the forward's
    # `logits` is then None whenever labels are given.
    linear_ce: bool = False
    # vision_attention: sdpa (transformers' default: one attention call per 112-px window per image per layer) or
    # varlen (one variable-length attention call per layer for all windows of all images).
    vision_attention: str = "sdpa"
    # packed_sequences: training forwards drop the padding and run the batch's samples as one row, each attending
    # within itself only (one variable-length attention call per layer), so no token slot is spent on padding.
    packed_sequences: bool = False
    # compile_blocks: in training, each language-model decoder layer and each vision block is compiled with
    # torch.compile (regional compilation: the code between blocks stays eager), fusing the small elementwise kernels
    # (fp32 RMSNorm, rotary, casts) the profiles show between the matrix products: 17.8 samples/s on an H100
    # against 12.8 (docs/performance.md). Inference ignores it (DecodeSettings.compile_step compiles its decode step).
    compile_blocks: bool = False

    def validate(self) -> None:
        if self.dtype not in ("bfloat16", "float32", "float16"):
            raise ConfigError(f"model.dtype must be bfloat16, float16 or float32, got {self.dtype!r}")
        if self.image_pixels < 28 * 28:
            raise ConfigError(f"model.image_pixels must be at least 784 (one 28×28 merged patch), got {self.image_pixels}")
        if self.train_vision not in TRAIN_VISION_CHOICES:
            raise ConfigError(f"model.train_vision must be one of {', '.join(TRAIN_VISION_CHOICES)}, "
                              f"got {self.train_vision!r}")
        if self.train_language_model and self.lora is not None:
            raise ConfigError("model.train_language_model trains the whole language model: set model.lora: null")
        if self.vision_attention not in VISION_ATTENTION_CHOICES:
            raise ConfigError(f"model.vision_attention must be one of {', '.join(VISION_ATTENTION_CHOICES)}, "
                              f"got {self.vision_attention!r}")
        if self.lora is not None:
            self.lora.validate()
        self.seg.validate()
        self.loss.validate()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        return from_dict(cls, data, "model")


def from_dict(cls, data: Any, where: str):
    """Build dataclass `cls` from nested dicts, rejecting unknown keys and wrong types with the key's path."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping, got {type(data).__name__}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"unknown key(s) in {where}: {', '.join(unknown)} (known: {', '.join(known)})")
    hints = typing.get_type_hints(cls)
    kwargs = {name: _coerce(hints[name], value, f"{where}.{name}") for name, value in data.items()}
    obj = cls(**kwargs)
    if hasattr(obj, "validate"):
        obj.validate()
    return obj


def _coerce(tp, value, where: str):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):  # X | None
        if value is None:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(inner, value, where)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        return tuple(_coerce(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool) and not (isinstance(value, tp) and not (tp is int and isinstance(value, bool))):
        raise ConfigError(f"{where} must be {tp.__name__}, got {value!r}")
    return value
