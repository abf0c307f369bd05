"""Tiny OmniAbnorm-CT for tests and the demo: same classes and code path as 7B, other numbers (SPEC §10).

`write_tiny_base(dir)` writes a seeded tiny Qwen2.5-VL in Hugging Face format (weights, an offline-trained
byte-level BPE tokenizer with Qwen2.5's special tokens in Qwen's order, the image processor config);
`build_tiny(dir)` then loads it through `build_model`, exactly as a real Qwen2.5-VL-7B-Instruct folder is loaded.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from model.config import LoraSettings, ModelConfig, SegModuleConfig

# Qwen2.5's added tokens in Qwen's id order (151643…151664); the last eight are not special.
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)
QWEN_PLAIN_ADDED_TOKENS = (
    "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>",
)

# Training text for the tiny BPE: chat roles and radiology vocabulary, so reports take few tokens.
_CORPUS = """system user assistant tool You are a helpful medical assistant.
Please localize all the abnormalities on this CT image and describe the findings.
What are the main findings indicated by the red box in the image? Findings 1: Findings 2: Findings 3:
I don't see any abnormalities on the image. I don't see any relevant abnormalities on the image.
Please use precise medical terminology, maintain the concise reporting style used in formal radiology reports.
A round hypodense lesion in the liver. A hyperdense mass in the left kidney. An irregular nodule in the right lung.
A low-density cyst in the spleen. A calcified lesion in the pancreas. Enlarged lymph node near the aorta.
hypodense hyperdense isodense lesion mass nodule cyst tumor metastasis liver kidney lung spleen pancreas bone
left right upper lower anterior posterior medial lateral small large round oval irregular well-defined mm cm
axial coronal sagittal slice contrast enhancement fluid fat calcification effusion fracture"""

TINY_SEG = SegModuleConfig(
    in_slices=9, image_size=64, features=(8, 16, 32, 64), strides=(1, 2, 2, 2), convs_per_stage=1,
    image_proj_hidden=48, query_proj_hidden=48, d_model=32, decoder_layers=2, decoder_heads=4,
    decoder_ffn=64, dropout=0.0, mask_hidden=16,
)


LM_HEAD_SCALE = 10.0  # see write_tiny_base
# Attention heads of 32 dims in both towers (the 7B model's are 128 and 80). Language model: Qwen's rope theta (1e6);
# multimodal rope turns text and image positions together only in the lowest frequencies (the height and width
# sections), and text-to-image attention that must not depend on how far a word is from the image needs those nearly
# still: with theta 10 or 1e4 every frequency turns and the reports stopped reading the image (docs/training.md).
# Vision tower: it has no absolute position, so a patch learns where it sits in the body from its neighbours, which
# its 2D rope resolves with 4 frequencies per axis at 32 dims (1 to 0.001 rad per patch; 16 dims give 2), and with
# attention over the whole image in both blocks.
TINY_ROPE_THETA = 1e6


def _train_tokenizer(vocab_size: int = 600) -> PreTrainedTokenizerFast:
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tk.train_from_iterator(_CORPUS.split("\n") * 4, trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  padding_side="right", clean_up_tokenization_spaces=False)
    tok.add_special_tokens({"additional_special_tokens": list(QWEN_SPECIAL_TOKENS)})
    tok.add_tokens(list(QWEN_PLAIN_ADDED_TOKENS))
    return tok


def tiny_vlm_config(tokenizer) -> Qwen2_5_VLConfig:
    """Hidden 64, 2 layers, 2 heads / 1 KV (head_dim 32, mrope 4+6+6 = 16), vision depth 2 width 32 with 1 head."""
    ids = tokenizer.convert_tokens_to_ids
    vocab = -(-len(tokenizer) // 64) * 64  # padded like Qwen's 152064
    return Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=4096, rms_norm_eps=1e-6, tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "rope_theta": TINY_ROPE_THETA, "mrope_section": [4, 6, 6]},
            bos_token_id=None, eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<|endoftext|>"),
        ),
        vision_config=dict(
            depth=2, hidden_size=32, intermediate_size=64, num_heads=1, out_hidden_size=64, patch_size=14,
            spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[0, 1],
            tokens_per_second=2,
        ),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=False,
    )


def write_tiny_base(out_dir: str | Path, seed: int = 0) -> Path:
    """Write a seeded tiny Qwen2.5-VL base folder (HF layout). Deterministic for a given seed."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _train_tokenizer()
    torch.manual_seed(seed)
    vlm = Qwen2_5_VLForConditionalGeneration(tiny_vlm_config(tokenizer))
    # A pretrained LM's logits span several units; a fresh 0.02-std head on 64 dims gives about ±1, which caps what
    # LoRA (with the head frozen, as in the released recipe) can learn near ln(vocab). Scale the head like a trained one.
    with torch.no_grad():
        vlm.lm_head.weight.mul_(LM_HEAD_SCALE)
    vlm.save_pretrained(out)
    tokenizer.save_pretrained(out)
    Qwen2VLImageProcessorPil(patch_size=14, merge_size=2, temporal_patch_size=2).save_pretrained(out)
    return out


def tiny_model_config(base_dir: str | Path, **overrides) -> ModelConfig:
    """ModelConfig for a tiny base: fp32, 56×56 VLM image (4 visual tokens), 64-px 9-slice seg input."""
    cfg = ModelConfig(base_model=str(base_dir), dtype="float32", image_pixels=56 * 56,
                      lora=LoraSettings(r=4, alpha=8, dropout=0.0), seg=dataclasses.replace(TINY_SEG))
    return dataclasses.replace(cfg, **overrides)


def build_tiny(work_dir: str | Path, seed: int = 0, **overrides):
    """One call: tiny base on disk → (OmniAbnormCT, tokenizer with <SEG>, image processor, ModelConfig)."""
    from model.omniabnorm import build_model

    base = write_tiny_base(Path(work_dir) / "tiny_base", seed=seed)
    cfg = tiny_model_config(base, **overrides)
    torch.manual_seed(seed)
    model, tokenizer, image_processor = build_model(cfg)
    return model, tokenizer, image_processor, cfg
