import os

os.environ["HF_HUB_OFFLINE"] = "1"  # a hub miss would otherwise retry for tens of seconds
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path

import pytest
import torch

from dataset.collate import collate
from dataset.finish import BatchFinisher
from dataset.vision import VisionPreprocessor
from model.omniabnorm import build_model
from model.tiny import tiny_model_config, write_tiny_base
from tests.helpers import make_sample


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    return write_tiny_base(tmp_path_factory.mktemp("tiny") / "base", seed=0)


@pytest.fixture
def tiny(tiny_base):
    """A fresh tiny OmniAbnorm-CT (model, tokenizer, image_processor, cfg), seeded."""
    cfg = tiny_model_config(tiny_base)
    torch.manual_seed(0)
    model, tokenizer, image_processor = build_model(cfg)
    return model, tokenizer, image_processor, cfg


@pytest.fixture
def make_batch():
    def build(tokenizer, image_processor, seg_counts, seg_size: int = 64):
        samples = [make_sample(tokenizer, image_processor, n, seed=i, seg_size=seg_size)
                   for i, n in enumerate(seg_counts)]
        return BatchFinisher(VisionPreprocessor(image_processor), None, seg_size)(
            collate(samples, tokenizer.pad_token_id), "cpu")
    return build
