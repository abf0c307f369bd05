import json

import pytest
import torch

from model.config import SegModuleConfig
from model.seg_module import SegmentationModule
from model.tiny import TINY_SEG
from tests.helpers import SEG_MANIFEST, requires_shared

pytestmark = requires_shared


def released_state_dict() -> dict[str, torch.Tensor]:
    """Random tensors with the released names and shapes; alias entries share their target's values."""
    manifest = json.loads(SEG_MANIFEST.read_text())
    g = torch.Generator().manual_seed(0)
    state = {name: torch.randn(shape, generator=g) for name, shape, _ in manifest["state_dict"]
             if name not in manifest["aliases"]}
    state.update({alias: state[target] for alias, target in manifest["aliases"].items()})
    assert len(state) == manifest["num_entries"] == 272
    return state


@pytest.fixture(scope="module")
def full_size():
    torch.manual_seed(0)
    return SegmentationModule(SegModuleConfig(query_dim=3584))


def test_default_size_matches_release_parameter_count(full_size):
    manifest = json.loads(SEG_MANIFEST.read_text())
    assert sum(p.numel() for p in full_size.parameters()) == manifest["total_parameters"] == 75_261_728
    groups: dict[str, int] = {}
    for name, p in full_size.named_parameters():
        key = ".".join(name.split(".")[:2]) if name.startswith("backbone") else name.split(".")[0]
        groups[key] = groups.get(key, 0) + p.numel()
    assert groups == manifest["parameters_by_group"]


def test_released_state_dict_loads_strictly_and_every_value_lands(full_size):
    state = released_state_dict()
    result = full_size.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    own = full_size.state_dict()
    assert set(own) == set(state)
    for name, value in state.items():
        assert torch.equal(own[name], value), name


def test_released_state_dict_with_wrong_shape_is_refused(full_size):
    state = released_state_dict()
    state["query_proj.0.weight"] = torch.zeros(1536, 4096)
    with pytest.raises(RuntimeError, match="query_proj.0.weight"):
        full_size.load_state_dict(state, strict=True)


def test_decoder_layers_have_cross_attention_only(full_size):
    layer_params = {n.split(".", 3)[3] for n, _ in full_size.named_parameters() if n.startswith("transformer_decoder.layers.0.")}
    assert {p.split(".")[0] for p in layer_params} == {"multihead_attn", "linear1", "linear2", "norm2", "norm3"}


@pytest.mark.slow
def test_full_size_forward_shape(full_size):
    full_size.eval()
    with torch.no_grad():
        logits = full_size(torch.randn(1, 9, 512, 512), torch.randn(1, 3, 3584))
    assert logits.shape == (1, 3, 512, 512)


def test_tiny_forward_shapes_and_query_mask():
    torch.manual_seed(0)
    cfg = SegModuleConfig(**{**TINY_SEG.__dict__, "query_dim": 24})
    module = SegmentationModule(cfg).eval()
    slices, queries = torch.randn(2, 9, 64, 64), torch.randn(2, 3, 24)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    with torch.no_grad():
        logits = module(slices, queries, mask)
        unmasked = module(slices, queries)
    assert logits.shape == (2, 3, 64, 64)
    assert torch.equal(logits[mask], unmasked[mask])
    assert (torch.sigmoid(logits[~mask]) == 0).all()
    # Queries are independent (no self-attention): a query's mask does not depend on its neighbours.
    with torch.no_grad():
        alone = module(slices[:1], queries[:1, :1])
    torch.testing.assert_close(alone[0, 0], unmasked[0, 0], rtol=1e-5, atol=1e-5)


def test_wrong_input_shape_names_the_expected_one():
    cfg = SegModuleConfig(**{**TINY_SEG.__dict__, "query_dim": 24})
    module = SegmentationModule(cfg)
    with pytest.raises(ValueError, match=r"\(B, 9, 64, 64\)"):
        module(torch.randn(1, 5, 64, 64), torch.randn(1, 1, 24))


def test_positional_encoding_is_not_in_state_dict(full_size):
    assert "pos_embedding" not in full_size.state_dict()
    assert full_size.pos_embedding.shape == (1, 256, 768)
