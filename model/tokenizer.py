"""Tokenizer set-up shared by the 7B and the tiny models."""

from __future__ import annotations

from model.config import SEG_TOKEN


def add_seg_token(tokenizer) -> int:
    """Add `<SEG>` as an additional special token (as the release did) and return its id.

    Idempotent: a tokenizer that already has `<SEG>` (the released `extended_tokenizer/`) is left unchanged.
    """
    if SEG_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [SEG_TOKEN]})
    return tokenizer.convert_tokens_to_ids(SEG_TOKEN)
