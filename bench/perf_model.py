"""The model bench/perf_bench.py measures: Qwen2.5-VL-7B-Instruct's architecture or the tiny test model, random
weights, built by the project's own `build_model` (LoRA, `<SEG>` rows, segmentation module) from a base folder
that holds a config.json, a tokenizer and an image processor but no weights: `from_pretrained` creates the weights
on the device instead of reading them (speed does not depend on weight values; SPEC §8).

The 7B numbers are those of Qwen2.5-VL-7B-Instruct's config.json (transformers' Qwen2_5_VLConfig defaults are not:
its text defaults are the 72B model's and its vision width is 3584 instead of 1280).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import torch
from tokenizers import Tokenizer
from transformers import AutoConfig, PreTrainedTokenizerFast, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from model.config import ModelConfig
from model.omniabnorm import OmniAbnormCT, build_model
from model.tiny import QWEN_PLAIN_ADDED_TOKENS, QWEN_SPECIAL_TOKENS, tiny_model_config, write_tiny_base

QWEN_BPE_ENTRIES = 151_643  # Qwen2.5's byte-level BPE vocabulary; its 22 added tokens follow (151643…151664)

QWEN25_VL_7B_TEXT = dict(
    vocab_size=152_064, hidden_size=3584, intermediate_size=18_944, num_hidden_layers=28, num_attention_heads=28,
    num_key_value_heads=4, hidden_act="silu", max_position_embeddings=128_000, rms_norm_eps=1e-6,
    rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [16, 24, 24]},
    use_sliding_window=False, sliding_window=32_768, max_window_layers=28, tie_word_embeddings=False,
)
QWEN25_VL_7B_VISION = dict(
    depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584, hidden_act="silu",
    in_channels=3, patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
    fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2,
)


def qwen_sized_tokenizer(tiny_base: Path) -> PreTrainedTokenizerFast:
    """The tiny base's byte-level BPE (its merges and its few hundred entries, trained on radiology text) padded with
    filler entries that no text encodes to up to Qwen2.5's 151,643, then Qwen's 22 added tokens at Qwen's ids.

    Its length is Qwen's (151,665), so `<SEG>` gets id 151,665 and the resized embedding the released 151,666 rows.
    Texts take more tokens than with Qwen's merges (prompts and reports, not the image tokens; docs/performance.md).
    """
    data = json.loads((tiny_base / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    if sorted(vocab.values()) != list(range(len(vocab))):
        raise ValueError(f"{tiny_base}/tokenizer.json: BPE ids are not 0..{len(vocab) - 1}")
    vocab.update({f"<filler_{i}>": i for i in range(len(vocab), QWEN_BPE_ENTRIES)})
    added = (*QWEN_SPECIAL_TOKENS, *QWEN_PLAIN_ADDED_TOKENS)
    data["added_tokens"] = [{"id": QWEN_BPE_ENTRIES + k, "content": token, "single_word": False, "lstrip": False,
                             "rstrip": False, "normalized": False, "special": token in QWEN_SPECIAL_TOKENS}
                            for k, token in enumerate(added)]
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(data)), eos_token="<|im_end|>",
                                        pad_token="<|endoftext|>", padding_side="right",
                                        clean_up_tokenization_spaces=False)
    tokenizer.add_special_tokens({"additional_special_tokens": list(QWEN_SPECIAL_TOKENS)})
    return tokenizer


def write_base(folder: Path, size: str) -> Path:
    """A base-model folder: the tiny one (model/tiny.py) or the 7B architecture without weights."""
    if size == "tiny":
        return write_tiny_base(folder)
    tokenizer = qwen_sized_tokenizer(write_tiny_base(folder.parent / "tokenizer_source"))
    ids = tokenizer.convert_tokens_to_ids
    config = Qwen2_5_VLConfig(
        text_config={**QWEN25_VL_7B_TEXT, "bos_token_id": ids("<|endoftext|>"), "eos_token_id": ids("<|im_end|>"),
                     "pad_token_id": ids("<|endoftext|>")},
        vision_config=QWEN25_VL_7B_VISION,
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=False,
    )
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    Qwen2VLImageProcessorPil(patch_size=14, merge_size=2, temporal_patch_size=2).save_pretrained(folder)
    return folder


@contextlib.contextmanager
def random_weights(device: torch.device) -> Iterator[None]:
    """Within: Qwen2_5_VLForConditionalGeneration.from_pretrained(folder, dtype=…) builds the folder's architecture
    with freshly initialised weights directly on `device` and reads no weight file."""
    def create(folder, dtype=None, **kwargs):
        with torch.device(device):
            return Qwen2_5_VLForConditionalGeneration._from_config(AutoConfig.from_pretrained(folder), dtype=dtype)

    with mock.patch.object(Qwen2_5_VLForConditionalGeneration, "from_pretrained", create):
        yield


def build(size: str, work: Path, device: torch.device) -> tuple[OmniAbnormCT, object, object, ModelConfig]:
    """size "7b" (released recipe: bf16 VLM, LoRA r 32 / α 16 on q_proj and v_proj, 75 M-parameter segmentation
    module, 512 × 512 pixel budget) or "tiny" (model/tiny.py) → (model on `device`, tokenizer, image processor,
    its ModelConfig)."""
    base = write_base(work / "base", size)
    cfg = tiny_model_config(base) if size == "tiny" else ModelConfig(base_model=str(base))
    torch.manual_seed(0)
    with random_weights(device):
        model, tokenizer, image_processor = build_model(cfg)
    return model.to(device), tokenizer, image_processor, cfg
