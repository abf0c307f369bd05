"""Query-conditioned 2.5D U-Net segmentation module (SPEC §3.1).

Data flow, for B samples with N queries each:

    slices (B, S, H, W) ──U-Net encoder──▶ 6 feature maps ──avg-pool to the G×G bottleneck grid──▶
        concat (B, ΣC, G, G) ──MLP──▶ image tokens (B, G·G, d)            (+ fixed 2D sinusoid on keys)
    queries (B, N, Dq) ──MLP──▶ (B, N, d) ──cross-attention decoder over image tokens──▶ (B, N, d)
        ──MLP──▶ mask embeddings (B, N, C0) · finest decoder feature map (B, C0, H, W) ──▶ logits (B, N, H, W)

Parameter names match the released checkpoint (`backbone.encoder.*`, `backbone.decoder.{stages,transpconvs}.*`,
`projection_layer.*`, `transformer_decoder.*`, `query_proj.*`, `mask_embed_proj.*`) so its state dict loads with
`strict=True` and no renaming. The U-Net blocks come from `dynamic-network-architectures`; the pixel decoder is
rebuilt here from its `StackedConvBlocks` because the released module has no segmentation output layers.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from dynamic_network_architectures.building_blocks.plain_conv_encoder import PlainConvEncoder
from dynamic_network_architectures.building_blocks.simple_conv_blocks import StackedConvBlocks
from dynamic_network_architectures.initialization.weight_init import InitWeights_He
from positional_encodings.torch_encodings import PositionalEncoding2D
from torch import Tensor, nn

from model.config import SegModuleConfig

_NORM_KWARGS = {"eps": 1e-5, "affine": True}


class PixelDecoder(nn.Module):
    """U-Net decoder without segmentation heads: returns the finest feature map (B, features[0], H, W)."""

    def __init__(self, features: tuple[int, ...], strides: tuple[int, ...], convs_per_stage: int):
        super().__init__()
        self.transpconvs = nn.ModuleList()
        self.stages = nn.ModuleList()
        # Coarsest first: stage s upsamples features[-s] to the resolution of skip features[-(s+1)].
        for s in range(1, len(features)):
            below, skip, stride = features[-s], features[-(s + 1)], strides[-s]
            self.transpconvs.append(nn.ConvTranspose2d(below, skip, stride, stride, bias=True))
            self.stages.append(StackedConvBlocks(
                convs_per_stage, nn.Conv2d, 2 * skip, skip, 3, 1, conv_bias=True,
                norm_op=nn.InstanceNorm2d, norm_op_kwargs=_NORM_KWARGS, nonlin=nn.LeakyReLU,
            ))

    def forward(self, skips: list[Tensor]) -> Tensor:
        x = skips[-1]
        for i, (up, stage) in enumerate(zip(self.transpconvs, self.stages)):
            x = stage(torch.cat((up(x), skips[-(i + 2)]), dim=1))
        return x


class UNetBackbone(nn.Module):
    """2D PlainConvUNet: 3×3 convs with bias, InstanceNorm (affine), LeakyReLU(0.01)."""

    def __init__(self, cfg: SegModuleConfig):
        super().__init__()
        n = len(cfg.features)
        self.encoder = PlainConvEncoder(
            cfg.in_slices, n, list(cfg.features), nn.Conv2d, 3, list(cfg.strides), cfg.convs_per_stage,
            conv_bias=True, norm_op=nn.InstanceNorm2d, norm_op_kwargs=_NORM_KWARGS,
            nonlin=nn.LeakyReLU, return_skips=True,
        )
        self.decoder = PixelDecoder(cfg.features, cfg.strides, cfg.convs_per_stage)

    def forward(self, x: Tensor) -> tuple[list[Tensor], Tensor]:
        skips = self.encoder(x)
        return skips, self.decoder(skips)


class CrossAttentionDecoderLayer(nn.Module):
    """Pre-norm DETR decoder layer with cross-attention only: queries never attend to each other."""

    def __init__(self, d_model: int, heads: int, ffn: int, dropout: float):
        super().__init__()
        self.multihead_attn = nn.MultiheadAttention(d_model, heads, dropout=dropout, batch_first=True)
        self.linear1 = nn.Linear(d_model, ffn)
        self.linear2 = nn.Linear(ffn, d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, queries: Tensor, memory: Tensor, memory_pos: Tensor) -> Tensor:
        """queries (B, N, d), memory (B, T, d), memory_pos (1, T, d) added to keys only."""
        attended, _ = self.multihead_attn(self.norm2(queries), memory + memory_pos, memory, need_weights=False)
        queries = queries + self.dropout(attended)
        ffn = self.linear2(self.dropout(F.relu(self.linear1(self.norm3(queries)))))
        return queries + self.dropout(ffn)


class QueryDecoder(nn.Module):
    def __init__(self, cfg: SegModuleConfig):
        super().__init__()
        self.layers = nn.ModuleList(
            CrossAttentionDecoderLayer(cfg.d_model, cfg.decoder_heads, cfg.decoder_ffn, cfg.dropout)
            for _ in range(cfg.decoder_layers)
        )
        self.norm = nn.LayerNorm(cfg.d_model)

    def forward(self, queries: Tensor, memory: Tensor, memory_pos: Tensor) -> Tensor:
        for layer in self.layers:
            queries = layer(queries, memory, memory_pos)
        return self.norm(queries)


def _mlp(dims: tuple[int, ...]) -> nn.Sequential:
    """Linear → GELU after every linear (indices 0, 2, … are the linears, as in the release)."""
    layers: list[nn.Module] = []
    for d_in, d_out in itertools.pairwise(dims):
        layers += [nn.Linear(d_in, d_out), nn.GELU()]
    return nn.Sequential(*layers)


class SegmentationModule(nn.Module):
    def __init__(self, cfg: SegModuleConfig):
        super().__init__()
        if cfg.query_dim is None:
            raise ValueError("SegModuleConfig.query_dim must be set (the LLM hidden size) before building the module")
        cfg.validate()
        self.config = cfg
        self.backbone = UNetBackbone(cfg)
        self.backbone.apply(InitWeights_He(1e-2))
        self.projection_layer = _mlp((sum(cfg.features), cfg.image_proj_hidden, cfg.d_model))
        self.transformer_decoder = QueryDecoder(cfg)
        self.query_proj = _mlp((cfg.query_dim, cfg.query_proj_hidden, cfg.d_model))
        self.mask_embed_proj = _mlp((cfg.d_model, cfg.mask_hidden, cfg.features[0]))
        # Fixed sinusoid on the G×G grid, flattened row-major like the image tokens; not part of the state dict.
        g = cfg.grid_size
        pos = PositionalEncoding2D(cfg.d_model)(torch.zeros(1, g, g, cfg.d_model)).reshape(1, g * g, cfg.d_model)
        self.register_buffer("pos_embedding", pos, persistent=False)

    def encode_image(self, slices: Tensor) -> tuple[Tensor, Tensor]:
        """slices (B, S, H, W) z-scored → image tokens (B, G·G, d) and pixel features (B, C0, H, W).

        Computed once per image; `decode_queries` can then run any number of query sets against it.
        """
        cfg = self.config
        if slices.ndim != 4 or slices.shape[1] != cfg.in_slices or slices.shape[-2:] != (cfg.image_size,) * 2:
            raise ValueError(f"segmentation input must be (B, {cfg.in_slices}, {cfg.image_size}, "
                             f"{cfg.image_size}), got {tuple(slices.shape)}")
        skips, pixel_features = self.backbone(slices)
        g = cfg.grid_size
        pooled = torch.cat([F.adaptive_avg_pool2d(s, g) for s in skips], dim=1)  # (B, ΣC, G, G)
        tokens = self.projection_layer(pooled.flatten(2).transpose(1, 2))  # (B, G·G, d)
        return tokens, pixel_features

    def decode_queries(self, tokens: Tensor, pixel_features: Tensor, queries: Tensor,
                       query_mask: Tensor | None = None) -> Tensor:
        """queries (B, N, Dq) → mask logits (B, N, H, W); padded queries (query_mask False) give −∞-like logits."""
        q = self.query_proj(queries.to(tokens.dtype))
        q = self.transformer_decoder(q, tokens, self.pos_embedding.to(tokens.dtype))
        mask_embedding = self.mask_embed_proj(q)  # (B, N, C0)
        logits = torch.einsum("bchw,bnc->bnhw", pixel_features, mask_embedding)
        if query_mask is not None:
            logits = logits.masked_fill(~query_mask.bool()[:, :, None, None], torch.finfo(logits.dtype).min)
        return logits

    def forward(self, slices: Tensor, queries: Tensor, query_mask: Tensor | None = None) -> Tensor:
        tokens, pixel_features = self.encode_image(slices)
        return self.decode_queries(tokens, pixel_features, queries, query_mask)
