"""OmniAbnorm-CT: Qwen2.5-VL (transformers, unmodified) + `<SEG>` queries + the 2.5D segmentation module.

The VLM sees the key slice only. For every `<SEG>` input token, the LLM's last-layer hidden state (after the final
norm) becomes one segmentation query; the segmentation module turns each query into a (H, W) mask over the 9-slice
stack. Training loss = w_ce·CE(assistant tokens) + w_dice·Dice + w_bce·BCE over the valid queries.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import Tensor, nn
from transformers import AttentionInterface, AutoTokenizer, Qwen2_5_VLForConditionalGeneration
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from model.config import ConfigError, ModelConfig
from model.losses import linear_cross_entropy, masked_seg_losses, shifted_cross_entropy
from model.seg_module import SegmentationModule
from model.tokenizer import add_seg_token
from model.trainable_rows import EmbeddingWithTrainableRows, LinearWithTrainableRows

try:  # torch's FlashAttention kernel for packed sequences (CUDA, fp16/bf16)
    from torch.nn.attention.varlen import varlen_attn
except ImportError:
    varlen_attn = None


@dataclass
class OmniAbnormOutput:
    loss: Tensor  # weighted total
    ce_loss: Tensor
    dice_loss: Tensor
    bce_loss: Tensor
    logits: Tensor | None  # (B, L, V); None when `config.linear_ce` computed the CE from the hidden states
    mask_logits: Tensor | None  # (B, N, H, W), None when the batch has no <SEG> or no slices
    query_mask: Tensor  # (B, N) bool: which query slots hold a <SEG>


def gather_seg_queries(hidden: Tensor, input_ids: Tensor, seg_token_id: int) -> tuple[Tensor, Tensor]:
    """hidden (B, L, D), input_ids (B, L) → queries (B, N, D), query_mask (B, N).

    Query slot k of sample b is the k-th `<SEG>` input position of b; N is the largest count in the batch
    (0 when no sample has one), and samples with fewer `<SEG>` have padded slots with query_mask False.
    """
    is_seg = input_ids == seg_token_id
    counts = is_seg.sum(dim=1)
    n = int(counts.max()) if counts.numel() else 0
    queries = hidden.new_zeros(hidden.shape[0], n, hidden.shape[-1])
    query_mask = torch.arange(n, device=hidden.device)[None, :] < counts[:, None]
    if n:
        batch_idx, pos = is_seg.nonzero(as_tuple=True)
        slot = (is_seg.cumsum(dim=1) - 1)[batch_idx, pos]
        queries = queries.index_put((batch_idx, slot), hidden[batch_idx, pos])
    return queries, query_mask


_VARLEN_PARAMS = frozenset(inspect.signature(varlen_attn).parameters) if varlen_attn is not None else frozenset()


def _causal_kernel_kwargs() -> dict | None:
    """How this torch's varlen kernel is told to be causal (torch ≥ 2.10: a (-1, 0) window; before: is_causal), or
    None when it cannot be."""
    if "window_size" in _VARLEN_PARAMS:
        return {"window_size": (-1, 0)}
    return {"is_causal": True} if "is_causal" in _VARLEN_PARAMS else None


def attention_within_sequences(query: Tensor, key: Tensor, value: Tensor, cu_seq_lens: Tensor, longest: int,
                               scaling: float, causal: bool) -> Tensor:
    """Attention of packed sequences, each within itself: sequence s spans tokens cu_seq_lens[s]:cu_seq_lens[s + 1].

    query (1, Hq, T, d), key and value (1, Hkv, T, d) with Hq a multiple of Hkv (grouped-query attention) →
    (1, T, Hq, d), the layout of transformers' attention functions. CUDA in fp16/bf16 at the default scale: torch's
    FlashAttention varlen kernel. Otherwise: the sequences padded to the longest and one SDPA call with a key-padding
    (and causal) mask.
    """
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # (T, heads, d)
    if k.shape[1] != q.shape[1]:  # each KV head serves a group of query heads
        k, v = (x.repeat_interleave(q.shape[1] // x.shape[1], dim=1) for x in (k, v))
    kernel_kwargs = _causal_kernel_kwargs() if causal else {}
    if (varlen_attn is not None and kernel_kwargs is not None and q.is_cuda
            and q.dtype in (torch.float16, torch.bfloat16) and math.isclose(scaling, q.shape[-1] ** -0.5)):
        cu = cu_seq_lens.to(torch.int32)
        q, k, v = (x.contiguous() for x in (q, k, v))
        return varlen_attn(q, k, v, cu, cu, longest, longest, **kernel_kwargs)[None]
    lengths = cu_seq_lens.diff()
    n = lengths.numel()
    seq = torch.repeat_interleave(torch.arange(n, device=q.device), lengths)  # (T,) sequence of each token
    pos = torch.arange(q.shape[0], device=q.device) - cu_seq_lens[:-1].long()[seq]  # (T,) place within its sequence

    def padded(x: Tensor) -> Tensor:  # (T, heads, d) → (n, heads, longest, d)
        return x.new_zeros(n, longest, *x.shape[1:]).index_put((seq, pos), x).transpose(1, 2)

    slots = torch.arange(longest, device=q.device)
    allowed = (slots[None, :] < lengths[:, None])[:, None, :]  # (n, 1, longest) keys that exist
    if causal:
        allowed = allowed & (slots[None, :] <= slots[:, None])[None]  # (n, longest, longest) and not in the future
    out = F.scaled_dot_product_attention(padded(q), padded(k), padded(v), attn_mask=allowed[:, None], scale=scaling)
    return out.transpose(1, 2)[seq, pos][None]


# "flash" in the name sends transformers' Qwen2.5-VL vision attention down its packed branch (cu_seqlens of all
# windows or images in one call) instead of its loop of one SDPA call per window.
VARLEN_ATTENTION = "omniabnorm_flash_varlen"


def varlen_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                     scaling: float, dropout: float = 0.0, cu_seq_lens_q: Tensor | None = None,
                     max_length_q: int | None = None, is_causal: bool = False, **kwargs) -> tuple[Tensor, None]:
    """Qwen2.5-VL's vision attention: non-causal, within each window or image of the packed patches, all in one
    call (`attention_within_sequences`)."""
    if dropout or is_causal or attention_mask is not None:
        raise ValueError("varlen_attention is non-causal, unmasked and without dropout: Qwen2.5-VL's vision attention")
    longest = int(max_length_q) if max_length_q is not None else int(cu_seq_lens_q.diff().max())
    return attention_within_sequences(query, key, value, cu_seq_lens_q, longest, scaling, causal=False), None


AttentionInterface.register(VARLEN_ATTENTION, varlen_attention)

# The language model's attention under `model.packed_sequences`: causal within each packed sample when the forward
# passes `cu_seq_lens_q` (the packed training forward), transformers' SDPA with its usual masks otherwise.
PACKED_ATTENTION = "omniabnorm_packed"


def packed_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                     scaling: float, dropout: float = 0.0, cu_seq_lens_q: Tensor | None = None,
                     max_length_q: int | None = None, **kwargs) -> tuple[Tensor, None]:
    if cu_seq_lens_q is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    if dropout or attention_mask is not None:
        raise ValueError("packed sequences take no attention mask and no attention dropout")
    return attention_within_sequences(query, key, value, cu_seq_lens_q, int(max_length_q), scaling, causal=True), None


AttentionInterface.register(PACKED_ATTENTION, packed_attention)
AttentionMaskInterface.register(PACKED_ATTENTION, sdpa_mask)


# The language model's attention in the static loop's decode step (inference/decoding.py).
DECODE_ATTENTION = "omniabnorm_decode"


def decode_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                     scaling: float, dropout: float = 0.0, **kwargs) -> tuple[Tensor, None]:
    """One query per row over a cache with a key mask: query (B, Hq, 1, d), key and value (B, Hkv, S, d) → (B, 1,
    Hq, d). Each KV head's group of query heads attends as one (B, Hkv, Hq / Hkv, d) query, as transformers does
    eagerly (its `pack_gqa`), also under torch.compile, where transformers repeats every key and value head instead
    (a (B, Hq, S, d) copy of the cache per layer and step: 7× the cache read at Qwen2.5-VL-7B's 28 / 4 heads).
    Anything else goes to transformers' SDPA."""
    batch, heads, length, dim = query.shape
    groups = heads // key.shape[1]
    if length != 1 or groups == 1 or dropout:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    grouped = query.reshape(batch, key.shape[1], groups, dim)
    out = F.scaled_dot_product_attention(grouped, key, value, attn_mask=attention_mask, scale=scaling)
    return out.reshape(batch, heads, 1, dim).transpose(1, 2), None


AttentionInterface.register(DECODE_ATTENTION, decode_attention)


def set_vision_attention(vlm: Qwen2_5_VLForConditionalGeneration, kind: str) -> None:
    """Vision tower attention: "sdpa" (transformers' loop over windows) or "varlen" (`varlen_attention`). The
    language model keeps its own implementation."""
    vlm.model.visual.config._attn_implementation = VARLEN_ATTENTION if kind == "varlen" else "sdpa"


def set_packed_sequences(model: OmniAbnormCT, packed: bool) -> None:
    """Training forwards with padding dropped (`config.packed_sequences`) or padded; inference is padded either way."""
    model.config.packed_sequences = packed
    model.vlm.model.language_model.config._attn_implementation = PACKED_ATTENTION if packed else "sdpa"


def compiled_calls(modules: list[nn.Module]) -> list:
    """The torch.compile'd call of each module, what `nn.Module.compile` would install, made once: installing them
    (`use_calls`) is then an attribute write per module, where `nn.Module.compile` costs milliseconds per call.
    Lazy: each compiles on its first call; sequence lengths that change between calls make the second shape compile
    once more with dynamic sizes, then no more."""
    # Dynamo specialises a decoder layer's graph on its index (its KV-cache slot), so a decode step compiles one graph
    # per layer. At torch's default of 8 graphs per code object, the remaining layers would run eagerly without a
    # word; 4 per module leaves room for dynamic shapes and the vision blocks as well.
    limit = 4 * len(modules)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, limit)
    torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit, limit)
    return [torch.compile(module._call_impl) for module in modules]


def use_calls(modules: list[nn.Module], calls: list) -> list:
    """Make each module run calls[i] (one of `compiled_calls`, or None: eagerly) in place: parameter names, hooks and
    wrappers stay as they are. → the calls they had before."""
    previous = [module._compiled_call_impl for module in modules]
    for module, call in zip(modules, calls, strict=True):
        module._compiled_call_impl = call  # nn.Module's own slot for it; torch has no public way back to eager
    return previous


@contextlib.contextmanager
def calls_in_use(modules: list[nn.Module], calls: list):
    """Inside the body each module runs calls[i] (`use_calls`), after it what it ran before."""
    previous = use_calls(modules, calls)
    try:
        yield
    finally:
        use_calls(modules, previous)


def compile_blocks(vlm: Qwen2_5_VLForConditionalGeneration, compiled: bool = True) -> None:
    """Compile each language-model decoder layer and each vision block in place (regional compilation), or with
    `compiled=False` run them eagerly again."""
    blocks = [*vlm.model.language_model.layers, *vlm.model.visual.blocks]
    use_calls(blocks, compiled_calls(blocks) if compiled else [None] * len(blocks))


class OmniAbnormCT(nn.Module):
    def __init__(self, vlm: Qwen2_5_VLForConditionalGeneration, seg_module: SegmentationModule,
                 seg_token_id: int, config: ModelConfig):
        super().__init__()
        self.vlm = vlm
        self.seg_module = seg_module
        self.seg_token_id = seg_token_id
        self.config = config
        if config.vision_attention == "varlen":
            set_vision_attention(vlm, "varlen")
        if config.packed_sequences:
            set_packed_sequences(self, True)

    def forward(
        self,
        input_ids: Tensor,  # (B, L)
        attention_mask: Tensor,  # (B, L)
        mm_token_type_ids: Tensor,  # (B, L): 0 text, 1 image; without it Qwen2.5-VL silently drops 3D positions
        labels: Tensor | None = None,  # (B, L), −100 outside assistant spans
        pixel_values: Tensor | None = None,  # (patches, C·T·P·P) from the image processor
        image_grid_thw: Tensor | None = None,  # (images, 3)
        seg_slices: Tensor | None = None,  # (B, S, H, W) z-scored 2.5D stacks
        seg_masks: Tensor | None = None,  # (B, N, H, W) binary targets, one per <SEG> in order
        seg_target_mask: Tensor | None = None,  # (B, N) bool: which target slots are real
    ) -> OmniAbnormOutput:
        hidden = self.hidden_states(input_ids, attention_mask, mm_token_type_ids, pixel_values, image_grid_thw)
        zero = hidden.new_zeros((), dtype=torch.float32)
        if self.config.linear_ce and labels is not None:
            logits, ce = None, linear_cross_entropy(hidden, self.vlm.lm_head, labels)
        else:
            logits = self.vlm.lm_head(hidden)
            ce = shifted_cross_entropy(logits, labels) if labels is not None else zero

        queries, query_mask = gather_seg_queries(hidden, input_ids, self.seg_token_id)
        mask_logits, dice, bce = None, zero, zero
        if seg_slices is not None and query_mask.shape[1] > 0:
            mask_logits = self.seg_module(seg_slices, queries, query_mask)
            if seg_masks is not None:
                self._check_targets(query_mask, seg_masks, seg_target_mask)
                n = query_mask.shape[1]
                dice, bce = masked_seg_losses(mask_logits, seg_masks[:, :n], query_mask)

        w = self.config.loss
        total = w.ce * ce + w.dice * dice + w.bce * bce
        return OmniAbnormOutput(total, ce.detach(), dice.detach(), bce.detach(), logits, mask_logits, query_mask)

    def hidden_states(self, input_ids: Tensor, attention_mask: Tensor, mm_token_type_ids: Tensor,
                      pixel_values: Tensor | None, image_grid_thw: Tensor | None) -> Tensor:
        """(B, L, D) last-layer hidden states after the final norm (zeros at padding when packed).

        With `config.packed_sequences` the padding is dropped: the B samples run as one row of T = Σ lengths tokens,
        each attending within itself (cu_seq_lens), with the 3D rope positions it has in the padded batch.
        """
        if not self.config.packed_sequences:
            return self.vlm.model(
                input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                image_grid_thw=image_grid_thw, mm_token_type_ids=mm_token_type_ids, use_cache=False,
            ).last_hidden_state
        keep = attention_mask.bool()  # (B, L)
        positions, _ = self.vlm.model.get_rope_index(input_ids, mm_token_type_ids, image_grid_thw=image_grid_thw,
                                                     attention_mask=attention_mask)  # (3, B, L)
        lengths = keep.sum(dim=1)
        cu = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)  # (B + 1,)
        longest = int(lengths.max())
        # The vision tower runs on its own first: the packing arguments below are for the language model only.
        images = None if pixel_values is None else {
            "image": self.vlm.model.get_image_features(pixel_values, image_grid_thw, return_dict=True)}
        packed = self.vlm.model(
            input_ids=input_ids[keep][None], position_ids=positions[:, keep][:, None],
            mm_token_type_ids=mm_token_type_ids[keep][None], mm_encoder_outputs=images, use_cache=False,
            cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest, max_length_k=longest,
        ).last_hidden_state  # (1, T, D)
        hidden = packed.new_zeros(*input_ids.shape, packed.shape[-1])
        hidden[keep] = packed[0]
        return hidden

    @torch.no_grad()
    def seg_queries(
        self,
        input_ids: Tensor,  # (B, L) prompt + generated tokens; padding anywhere, marked by attention_mask
        attention_mask: Tensor,  # (B, L)
        mm_token_type_ids: Tensor,  # (B, L)
        pixel_values: Tensor | None = None,
        image_grid_thw: Tensor | None = None,
        mm_encoder_outputs: dict | None = None,  # instead of pixel_values: transformers' already-encoded images
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Inference: the segmentation queries of finished sequences, as training computes them.

        One forward over the whole sequences (3D rope positions recomputed from the attention mask, so left and
        right padding are both fine). Returns queries (B, N, D) — the last-layer hidden state after the final norm
        at each `<SEG>` input position —, query_mask (B, N), and seg_probability (B, N) float32: the probability the
        model gave `<SEG>` at the step that emitted it (softmax of the logits one position earlier).
        """
        hidden = self.vlm.model(
            input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
            image_grid_thw=image_grid_thw, mm_token_type_ids=mm_token_type_ids, use_cache=False,
            mm_encoder_outputs=mm_encoder_outputs,
        ).last_hidden_state
        return self.seg_outputs(hidden, input_ids)

    def seg_outputs(self, hidden: Tensor, ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """hidden (B, L, D): last-layer states after the final norm at the positions of ids (B, L) → queries (B, N, D)
        (the state at each `<SEG>`), query_mask (B, N), and seg_probability (B, N) float32, the probability the model
        gave `<SEG>` at the step that emitted it: the softmax of the logits of the state one position earlier (a
        `<SEG>` at position 0 has none and must not occur)."""
        queries, query_mask = gather_seg_queries(hidden, ids, self.seg_token_id)
        before, _ = gather_seg_queries(hidden[:, :-1], ids[:, 1:], self.seg_token_id)
        seg_probability = self.vlm.lm_head(before).float().softmax(dim=-1)[..., self.seg_token_id]
        return queries, query_mask, seg_probability * query_mask

    @staticmethod
    def _check_targets(query_mask: Tensor, seg_masks: Tensor, seg_target_mask: Tensor | None) -> None:
        """Each sample needs exactly one target mask per `<SEG>` it contains; a mismatch is a data bug."""
        if seg_target_mask is None:
            seg_target_mask = torch.ones(seg_masks.shape[:2], dtype=torch.bool, device=seg_masks.device)
        have, want = seg_target_mask.sum(1), query_mask.sum(1)
        if seg_masks.shape[1] < query_mask.shape[1] or not torch.equal(have, want):
            raise ValueError(f"<SEG> tokens per sample {want.tolist()} do not match target masks per sample "
                             f"{have.tolist()}: every <SEG> in the conversation needs its own mask")


def lora_target_regex(module_names: tuple[str, ...]) -> str:
    """LoRA on the language model only: Qwen2.5-VL's vision blocks also have `gate_proj`/`up_proj`/`down_proj`."""
    names = "|".join(re.escape(n) for n in module_names)
    return rf"model\.language_model\.layers\.\d+\.(?:self_attn|mlp)\.(?:{names})"


def lora_layers(vlm: nn.Module) -> list[BaseTunerLayer]:
    """The LoRA-adapted layers (peft tuner layers) of a model."""
    return [m for m in vlm.modules() if isinstance(m, BaseTunerLayer)]


def merge_lora(vlm: nn.Module) -> None:
    """Add each LoRA update B·A·scale into its base weight, for inference: the decode step then runs one matrix
    product per adapted projection instead of three plus a scale and an add (bf16: the sum is rounded once)."""
    for layer in lora_layers(vlm):
        layer.merge()


def fully_trained_modules(vlm: Qwen2_5_VLForConditionalGeneration, cfg: ModelConfig) -> list[nn.Module]:
    """VLM modules trained in full (besides LoRA and the `<SEG>` rows): the vision part `cfg.train_vision` names and,
    with `cfg.train_language_model`, the language model and the output head."""
    visual = vlm.model.visual
    modules = {"none": [], "merger": [visual.merger], "all": [visual]}[cfg.train_vision]
    if cfg.train_language_model:
        modules += [vlm.model.language_model, vlm.lm_head]
    return modules


def build_image_processor(base_model: str | Path, image_pixels: int) -> Qwen2VLImageProcessorPil:
    """The base model's image processor with the fixed budget min = max = `image_pixels` (SPEC §4.3)."""
    return Qwen2VLImageProcessorPil.from_pretrained(
        str(base_model), size={"shortest_edge": image_pixels, "longest_edge": image_pixels},
    )


def build_model(cfg: ModelConfig, tokenizer=None) -> tuple[OmniAbnormCT, object, Qwen2VLImageProcessorPil]:
    """Load the base VLM from `cfg.base_model`, add `<SEG>`, LoRA and the segmentation module.

    Trainable after this call: LoRA tensors, the `<SEG>` row of the embedding and of the output head, the whole
    segmentation module, and what `cfg.train_vision` / `cfg.train_language_model` name. Everything else is frozen.
    """
    cfg.validate()
    base = Path(cfg.base_model)
    if not (base / "config.json").is_file():
        raise ConfigError(f"base model folder {str(base)!r} has no config.json: point model.base_model at a local "
                          "Qwen2.5-VL-7B-Instruct folder in Hugging Face format")
    vlm = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(base), dtype=getattr(torch, cfg.dtype))
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(str(base))
    seg_token_id = add_seg_token(tokenizer)
    if vlm.get_input_embeddings().weight.shape[0] != len(tokenizer):
        vlm.resize_token_embeddings(len(tokenizer))
    vlm.requires_grad_(False)
    if cfg.lora is not None:
        vlm.add_adapter(LoraConfig(
            r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout, bias="none",
            target_modules=lora_target_regex(cfg.lora.target_modules),
        ))
    vlm.set_input_embeddings(EmbeddingWithTrainableRows.wrap(vlm.get_input_embeddings(), [seg_token_id]))
    vlm.set_output_embeddings(LinearWithTrainableRows.wrap(vlm.get_output_embeddings(), [seg_token_id]))
    for module in fully_trained_modules(vlm, cfg):
        module.requires_grad_(True)

    hidden = vlm.config.text_config.hidden_size
    if cfg.seg.query_dim not in (None, hidden):
        raise ConfigError(f"seg.query_dim {cfg.seg.query_dim} differs from the VLM hidden size {hidden}")
    seg_module = SegmentationModule(dataclasses.replace(cfg.seg, query_dim=hidden))
    image_processor = build_image_processor(base, cfg.image_pixels)
    return OmniAbnormCT(vlm, seg_module, seg_token_id, cfg), tokenizer, image_processor
