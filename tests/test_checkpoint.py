import dataclasses
import json

import pytest
import torch

from model.checkpoint import (
    CheckpointError,
    export_released,
    load_checkpoint,
    load_released,
    main,
    module_name_to_released_key,
    released_key_to_module_name,
    save_checkpoint,
    trained_vlm_state,
)
from model.omniabnorm import build_model
from tests.helpers import REPO


def _perturb(model):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


def test_round_trip_is_exact_and_stores_only_trained_tensors(tiny, make_batch, tmp_path):
    model, tokenizer, image_processor, _ = tiny
    _perturb(model)
    out = save_checkpoint(model, tokenizer, tmp_path / "ckpt")
    assert sorted(p.name for p in out.iterdir()) == ["omniabnorm.json", "seg_module.safetensors", "tokenizer",
                                                     "vlm_trained.safetensors"]
    loaded, tok2, _ = load_checkpoint(out)
    assert tok2.get_vocab() == tokenizer.get_vocab()
    a, b = trained_vlm_state(model), trained_vlm_state(loaded)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert not any("embed_tokens.weight" in k or "lm_head.weight" in k for k in a)
    for (ka, va), (kb, vb) in zip(model.seg_module.state_dict().items(), loaded.seg_module.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    batch = make_batch(tokenizer, image_processor, seg_counts=[2])
    model.eval(), loaded.eval()
    with torch.no_grad():
        x, y = model(**batch), loaded(**batch)
    assert torch.equal(x.logits, y.logits) and torch.equal(x.mask_logits, y.mask_logits)


def test_overwrite_is_atomic_and_leaves_no_temporaries(tiny, tmp_path):
    model, tokenizer, _, _ = tiny
    save_checkpoint(model, tokenizer, tmp_path / "ckpt")
    _perturb(model)
    save_checkpoint(model, tokenizer, tmp_path / "ckpt")
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    loaded, _, _ = load_checkpoint(tmp_path / "ckpt")
    a, b = trained_vlm_state(model), trained_vlm_state(loaded)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_failed_save_keeps_the_previous_checkpoint(tiny, tmp_path, monkeypatch):
    model, tokenizer, _, _ = tiny
    save_checkpoint(model, tokenizer, tmp_path / "ckpt")
    before = (tmp_path / "ckpt" / "vlm_trained.safetensors").read_bytes()
    monkeypatch.setattr(tokenizer, "save_pretrained", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(model, tokenizer, tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "vlm_trained.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_mismatched_checkpoint_is_refused(tiny, tmp_path):
    model, tokenizer, _, _ = tiny
    out = save_checkpoint(model, tokenizer, tmp_path / "ckpt")
    meta = json.loads((out / "omniabnorm.json").read_text())
    meta["model"]["lora"]["r"] = 8
    (out / "omniabnorm.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="shape"):
        load_checkpoint(out)


def test_unknown_folder_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="no omniabnorm.json"):
        load_checkpoint(tmp_path)


def test_every_torch_load_uses_weights_only():
    call = "torch." + "load("  # split so this file does not match itself
    sources = [p for p in REPO.rglob("*.py") if not any(part.startswith(".") for part in p.relative_to(REPO).parts)]
    hits = [f"{p.name}: {line.strip()}" for p in sources for line in p.read_text().splitlines() if call in line]
    assert any("checkpoint.py" in h for h in hits), "expected at least the released-checkpoint loader"
    assert all("weights_only=True" in h for h in hits), hits


def test_demo_checkpoint_loads_with_its_bundled_base():
    """checkpoint/demo/ names its tiny base relative to itself, so it loads from any working folder."""
    model, tokenizer, _ = load_checkpoint(REPO / "checkpoint" / "demo")
    assert model.config.base_model == str(REPO / "checkpoint" / "demo" / "base_model")
    assert tokenizer.convert_tokens_to_ids("<SEG>") == model.seg_token_id


def test_trained_vision_tower_is_saved_and_restored(tiny, tmp_path):
    _, _, _, cfg = tiny
    torch.manual_seed(0)
    model, tokenizer, _ = build_model(dataclasses.replace(cfg, train_vision="merger"))
    merger = {n for n, p in model.vlm.named_parameters() if p.requires_grad and ".visual." in f".{n}"}
    assert merger and all(".merger." in n for n in merger)
    _perturb(model)
    loaded, _, _ = load_checkpoint(save_checkpoint(model, tokenizer, tmp_path / "ckpt"))
    a, b = trained_vlm_state(model), trained_vlm_state(loaded)
    assert merger <= set(a) and set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_released_names_map_both_ways():
    for name in ("model.language_model.layers.1.mlp.up_proj.lora_B.default.weight",
                 "model.language_model.embed_tokens.weight", "lm_head.weight", "model.visual.merger.mlp.0.weight"):
        assert released_key_to_module_name(module_name_to_released_key(name)) == name


def test_export_to_released_layout_loads_back_exactly(tiny, make_batch, tmp_path):
    model, tokenizer, image_processor, cfg = tiny
    _perturb(model)
    out = export_released(model, tokenizer, tmp_path / "released")
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                     "extended_tokenizer", "seg_model_lm_head_embed_tokens.pt"]
    loaded, _, _ = load_released(dataclasses.replace(cfg, released_checkpoint=str(out)))
    a, b = trained_vlm_state(model), trained_vlm_state(loaded)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    batch = make_batch(tokenizer, image_processor, seg_counts=[1])
    model.eval(), loaded.eval()
    with torch.no_grad():
        x, y = model(**batch), loaded(**batch)
    assert torch.equal(x.logits, y.logits) and torch.equal(x.mask_logits, y.mask_logits)


def test_export_cli_refuses_what_the_released_layout_cannot_hold(tiny, tmp_path, capsys):
    _, _, _, cfg = tiny
    model, tokenizer, _ = build_model(dataclasses.replace(cfg, train_vision="all"))
    ckpt = save_checkpoint(model, tokenizer, tmp_path / "ckpt")
    capsys.readouterr()  # the fixture's model loading
    assert main(["export-released", "--checkpoint", str(ckpt), "--out", str(tmp_path / "released")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: the released layout") and "\n" not in err
    assert not (tmp_path / "released").exists()
    model, tokenizer, _ = build_model(cfg)
    ckpt = save_checkpoint(model, tokenizer, tmp_path / "ckpt")
    assert main(["export-released", "--checkpoint", str(ckpt), "--out", str(tmp_path / "released")]) == 0
    assert (tmp_path / "released" / "adapter_model.safetensors").is_file()
