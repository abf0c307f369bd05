"""The released checkpoint layout (transformers 4.49 / peft 0.10) loads exactly: proven on the tiny fixture."""

import shutil

import pytest
import torch
from safetensors.torch import load_file

from model.checkpoint import CheckpointError, load_released, released_key_to_module_name
from model.config import ModelConfig
from model.tiny import TINY_SEG
from tests.helpers import FIXTURE, requires_shared
from tests.test_seg_module import released_state_dict

BASE = FIXTURE / "base_model"

pytestmark = requires_shared


def fixture_config(checkpoint=FIXTURE, seg=TINY_SEG) -> ModelConfig:
    return ModelConfig(base_model=str(BASE), released_checkpoint=str(checkpoint), dtype="float32", seg=seg)


@pytest.fixture(scope="module")
def released():
    return load_released(fixture_config(), require_seg_module=False)


def test_key_remapping_from_transformers_449():
    assert released_key_to_module_name("base_model.model.model.layers.3.self_attn.v_proj.lora_B.weight") == \
        "model.language_model.layers.3.self_attn.v_proj.lora_B.default.weight"
    assert released_key_to_module_name("model.embed_tokens.weight") == "model.language_model.embed_tokens.weight"
    assert released_key_to_module_name("lm_head.weight") == "lm_head.weight"
    assert released_key_to_module_name("visual.blocks.0.attn.qkv.weight") == "model.visual.blocks.0.attn.qkv.weight"
    assert released_key_to_module_name("model.language_model.norm.weight") == "model.language_model.norm.weight"


def test_every_lora_tensor_lands_exactly(released):
    model, _, _ = released
    adapter = load_file(FIXTURE / "adapter_model.safetensors")
    assert len(adapter) == 8
    params = dict(model.vlm.named_parameters())
    lora_params = {n for n in params if ".lora_" in n}
    assert len(lora_params) == len(adapter)
    for key, value in adapter.items():
        name = released_key_to_module_name(key)
        assert torch.equal(params[name].detach(), value.float()), key
    # Spot values from the fixture's README.
    q_a = params["model.language_model.layers.0.self_attn.q_proj.lora_A.default.weight"]
    assert q_a[0, :4].tolist() == [-0.0274658203125, -0.06884765625, -0.08056640625, 0.0194091796875]
    v_b = params["model.language_model.layers.1.self_attn.v_proj.lora_B.default.weight"]
    assert v_b[0, :4].tolist() == [-0.017333984375, 0.048583984375, -0.119140625, -0.0279541015625]
    assert model.config.lora.r == 32 and model.config.lora.alpha == 16


def test_embedding_and_head_rows_land_and_seg_rows_are_trainable(released):
    model, _, _ = released
    bundle = torch.load(FIXTURE / "seg_model_lm_head_embed_tokens.pt", map_location="cpu", weights_only=True)
    emb, head = model.vlm.get_input_embeddings(), model.vlm.get_output_embeddings()
    assert torch.equal(emb.weight, bundle["embed_tokens_state_dict"]["model.embed_tokens.weight"].float())
    assert torch.equal(head.weight, bundle["lm_head_state_dict"]["lm_head.weight"].float())
    assert emb.trainable_rows[0, :4].tolist() == [-0.0047607421875, -0.01708984375, -0.012939453125,
                                                  -0.022705078125]
    assert head.trainable_rows[0, :4].tolist() == [-0.006103515625, -0.007080078125, 0.018798828125,
                                                   -0.0167236328125]
    assert torch.equal(emb(torch.tensor([298]))[0], emb.weight[298])


def test_tokenizer_has_seg_at_release_id(released):
    model, tokenizer, _ = released
    assert len(tokenizer) == 299
    assert model.seg_token_id == tokenizer.convert_tokens_to_ids("<SEG>") == 298
    assert tokenizer.tokenize("a<SEG>b") == ["a", "<SEG>", "b"]
    assert model.vlm.get_input_embeddings().weight.shape[0] == 299


def test_released_model_runs_forward(released, make_batch):
    model, tokenizer, image_processor = released
    batch = make_batch(tokenizer, image_processor, seg_counts=[1, 0])
    model.eval()
    with torch.no_grad():
        out = model(**batch)
    assert torch.isfinite(out.loss) and out.mask_logits.shape == (2, 1, 64, 64)


@pytest.mark.slow
def test_complete_release_with_full_size_seg_module_loads_strictly(tmp_path):
    """The fixture's seg_model is empty; put the released names and shapes in and load with the default sizes."""
    ckpt = tmp_path / "release"
    shutil.copytree(FIXTURE, ckpt, ignore=shutil.ignore_patterns("base_model"))
    bundle = torch.load(ckpt / "seg_model_lm_head_embed_tokens.pt", map_location="cpu", weights_only=True)
    bundle["seg_model"] = released_state_dict()
    torch.save(bundle, ckpt / "seg_model_lm_head_embed_tokens.pt")
    from model.config import SegModuleConfig
    # The fixture's LLM is 64 wide; the release's query projection expects 3584, so widen only that number.
    cfg = fixture_config(ckpt, seg=SegModuleConfig())
    with pytest.raises(CheckpointError, match="query_proj.0.weight"):
        load_released(cfg)
    bundle["seg_model"]["query_proj.0.weight"] = torch.randn(1536, 64)
    torch.save(bundle, ckpt / "seg_model_lm_head_embed_tokens.pt")
    model, _, _ = load_released(cfg)
    for name, value in bundle["seg_model"].items():
        assert torch.equal(model.seg_module.state_dict()[name], value), name


def test_missing_files_are_named(tmp_path):
    ckpt = tmp_path / "broken"
    shutil.copytree(FIXTURE, ckpt)
    (ckpt / "adapter_model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing adapter_model.safetensors"):
        load_released(fixture_config(ckpt), require_seg_module=False)


def test_empty_seg_module_is_refused_by_default():
    with pytest.raises(CheckpointError, match="segmentation module"):
        load_released(fixture_config())
