"""Qwen2.5-VL chat encoding with assistant-only labels (SPEC §4.4).

The text is rendered exactly as Qwen2.5-VL's chat template does it and the whole string is tokenised at once (no
per-segment tokenisation, so BPE merges match the released training), with one image placeholder per image that is
then repeated to the number of visual tokens the image takes (the ids of the fully expanded text). Labels cover
every assistant reply from after `<|im_start|>assistant\\n` up to and including its `<|im_end|>`; everything else
is −100.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

SYSTEM_PROMPT = "You are a helpful medical assistant."
IGNORE_INDEX = -100
Role = Literal["system", "user", "assistant", "tool"]


@dataclass
class Turn:
    role: Role
    text: str
    images: int = 0  # images placed before the text (user or tool turns)


@dataclass
class EncodedConversation:
    input_ids: Tensor  # (L,)
    labels: Tensor  # (L,)
    mm_token_type_ids: Tensor  # (L,) 1 at image tokens


def render(turns: Sequence[Turn], image_tokens: Sequence[int], add_generation_prompt: bool = False
           ) -> tuple[str, list[tuple[int, int]]]:
    """Chat text and the character spans (start, end) of the supervised assistant replies.

    `image_tokens[i]` is the number of `<|image_pad|>` tokens of the i-th image in order of appearance.
    """
    if sum(t.images for t in turns) != len(image_tokens):
        raise ValueError(f"conversation has {sum(t.images for t in turns)} image slot(s) but "
                         f"{len(image_tokens)} image(s) were given")
    parts: list[str] = []
    spans: list[tuple[int, int]] = []
    length = 0
    images = iter(image_tokens)

    def emit(text: str) -> None:
        nonlocal length
        parts.append(text)
        length += len(text)

    if not turns or turns[0].role != "system":
        turns = [Turn("system", SYSTEM_PROMPT), *turns]
    for turn in turns:
        emit(f"<|im_start|>{turn.role}\n")
        if turn.role == "assistant":
            start = length
            emit(f"{turn.text}<|im_end|>")
            spans.append((start, length))
            emit("\n")
            continue
        for _ in range(turn.images):
            emit("<|vision_start|>" + "<|image_pad|>" * next(images) + "<|vision_end|>")
        emit(f"{turn.text}<|im_end|>\n")
    if add_generation_prompt:
        emit("<|im_start|>assistant\n")
    return "".join(parts), spans


def encode(tokenizer, turns: Sequence[Turn], image_tokens: Sequence[int] = (), image_token_id: int | None = None,
           add_generation_prompt: bool = False) -> EncodedConversation:
    # Tokenised with one <|image_pad|> per image, each then repeated to its count: the pad is a special token, split
    # out before BPE, so the text around it tokenises the same, and 2 × 324 pads no longer cost a millisecond.
    text, spans = render(turns, [1] * len(image_tokens), add_generation_prompt)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = torch.tensor(enc["input_ids"], dtype=torch.long)
    starts = torch.tensor([start for start, _ in enc["offset_mapping"]], dtype=torch.long)
    supervised = torch.zeros_like(input_ids, dtype=torch.bool)
    for lo, hi in spans:
        supervised |= (starts >= lo) & (starts < hi)
    labels = torch.where(supervised, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    if image_token_id is None:
        image_token_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    is_image = input_ids == image_token_id
    if int(is_image.sum()) != len(image_tokens):
        raise ValueError(f"tokenised text holds {int(is_image.sum())} image placeholders, expected "
                         f"{len(image_tokens)} (one per image)")
    repeats = torch.ones_like(input_ids)
    repeats[is_image] = torch.tensor(list(image_tokens), dtype=torch.long)
    input_ids, labels = input_ids.repeat_interleave(repeats), labels.repeat_interleave(repeats)
    return EncodedConversation(input_ids, labels, (input_ids == image_token_id).long())
