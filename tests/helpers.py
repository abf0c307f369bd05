"""Paths and sample builders shared by the tests."""

from pathlib import Path

import numpy as np
import pytest
import torch

from dataset.collate import Sample
from dataset.conversation import Turn, encode
from dataset.vision import VisionPreprocessor

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
FIXTURE = SHARED / "fixtures" / "official_format_tiny"
SEG_MANIFEST = SHARED / "reference" / "official_seg_model_state_dict.json"
# The compatibility data lives in ../shared/ beside the repository (.ci/run refuses to start without it).
requires_shared = pytest.mark.skipif(not (FIXTURE.is_dir() and SEG_MANIFEST.is_file()),
                                     reason="../shared/ compatibility data not present")


def make_sample(tokenizer, image_processor, n_seg: int, seed: int, seg_size: int = 64, slices: int = 9) -> Sample:
    """A grounding-style sample with `n_seg` <SEG> tokens in the answer and one target mask per <SEG>."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 255, (seg_size, seg_size, 3), dtype=np.uint8)
    codes, grid = VisionPreprocessor(image_processor).encode([image])
    merge = image_processor.merge_size ** 2
    answer = " ".join(["Findings: <SEG>"] * n_seg) if n_seg else "I don't see any abnormalities on the image."
    conv = encode(tokenizer, [Turn("user", "Please localize all the abnormalities on this CT image.", images=1),
                              Turn("assistant", answer)],
                  image_tokens=[int(grid[0].prod()) // merge])
    masks = torch.zeros(n_seg, seg_size, seg_size)
    for k in range(n_seg):
        y, x = rng.integers(0, seg_size - 12, 2)
        masks[k, y:y + 10, x:x + 10] = 1
    return Sample(conv, codes, grid,
                  torch.randn(slices, seg_size, seg_size), masks)
