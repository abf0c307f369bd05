import pytest
import torch

from dataset.conversation import IGNORE_INDEX, Turn, encode, render
from model.config import SEG_TOKEN
from model.omniabnorm import gather_seg_queries


def test_labels_cover_assistant_replies_only(tiny):
    _, tokenizer, _, _ = tiny
    turns = [Turn("user", "Please localize all the abnormalities on this CT image and describe the findings.",
                  images=1),
             Turn("assistant", SEG_TOKEN), Turn("tool", "", images=1),
             Turn("assistant", "Findings 1: A round hypodense lesion in the liver.\n")]
    enc = encode(tokenizer, turns, image_tokens=[4, 4])
    supervised = tokenizer.decode(enc.input_ids[enc.labels != IGNORE_INDEX])
    assert supervised == f"{SEG_TOKEN}<|im_end|>Findings 1: A round hypodense lesion in the liver.\n<|im_end|>"
    assert torch.equal(enc.labels[enc.labels != IGNORE_INDEX], enc.input_ids[enc.labels != IGNORE_INDEX])
    text = tokenizer.decode(enc.input_ids)
    assert text.startswith("<|im_start|>system\nYou are a helpful medical assistant.<|im_end|>\n<|im_start|>user\n"
                           "<|vision_start|>" + "<|image_pad|>" * 4 + "<|vision_end|>Please")
    assert "<|im_start|>tool\n<|vision_start|>" in text
    assert int(enc.mm_token_type_ids.sum()) == 8
    image_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert torch.equal(enc.mm_token_type_ids.bool(), enc.input_ids == image_id)


def test_encoding_equals_tokenising_the_expanded_text(tiny):
    """`encode` tokenises one `<|image_pad|>` per image and repeats it: the ids are those of the text with every
    placeholder expanded, images of different counts, text on both sides of each image, labels shifted with them."""
    _, tokenizer, _, _ = tiny
    turns = [Turn("user", "Where is the lesion? Compare with the prior", images=2), Turn("assistant", "Here <SEG>."),
             Turn("tool", "see", images=1), Turn("assistant", "Findings 1: a cyst.\n")]
    counts = [5, 1, 7]
    enc = encode(tokenizer, turns, image_tokens=counts)
    text, _ = render(turns, counts)
    assert enc.input_ids.tolist() == tokenizer(text, add_special_tokens=False).input_ids
    supervised = tokenizer.decode(enc.input_ids[enc.labels != IGNORE_INDEX])
    assert supervised == "Here <SEG>.<|im_end|>Findings 1: a cyst.\n<|im_end|>"
    assert int(enc.mm_token_type_ids.sum()) == sum(counts)
    with pytest.raises(ValueError, match="image placeholders"):  # a placeholder typed into the text is refused
        encode(tokenizer, [Turn("user", "<|image_pad|>", images=1)], image_tokens=[3])


def test_image_count_mismatch_is_an_error(tiny):
    _, tokenizer, _, _ = tiny
    with pytest.raises(ValueError, match="image slot"):
        encode(tokenizer, [Turn("user", "hi", images=1), Turn("assistant", "ok")], image_tokens=[])


def test_gather_seg_queries_mixed_batch():
    seg = 7
    input_ids = torch.tensor([[1, 2, 3, 4, 5], [1, seg, 3, 4, 5], [seg, 2, seg, seg, 5]])
    hidden = torch.arange(3 * 5 * 2, dtype=torch.float32).view(3, 5, 2)
    queries, mask = gather_seg_queries(hidden, input_ids, seg)
    assert queries.shape == (3, 3, 2)
    assert mask.tolist() == [[False, False, False], [True, False, False], [True, True, True]]
    assert torch.equal(queries[1, 0], hidden[1, 1])
    assert torch.equal(queries[2], hidden[2, [0, 2, 3]])
    assert (queries[~mask] == 0).all()


def test_gather_with_no_seg_anywhere():
    queries, mask = gather_seg_queries(torch.randn(2, 4, 8), torch.ones(2, 4, dtype=torch.long), 9)
    assert queries.shape == (2, 0, 8) and mask.shape == (2, 0)


def test_forward_returns_each_loss_term_and_masks_for_mixed_batch(tiny, make_batch):
    model, tokenizer, image_processor, cfg = tiny
    batch = make_batch(tokenizer, image_processor, seg_counts=[0, 1, 3])
    out = model(**batch)
    assert out.mask_logits.shape == (3, 3, 64, 64)
    assert out.query_mask.tolist() == [[False] * 3, [True, False, False], [True] * 3]
    for term in (out.ce_loss, out.dice_loss, out.bce_loss):
        assert term.ndim == 0 and torch.isfinite(term) and term > 0
    w = cfg.loss
    torch.testing.assert_close(out.loss.detach(), w.ce * out.ce_loss + w.dice * out.dice_loss + w.bce * out.bce_loss)
    assert out.logits.shape[:2] == batch["input_ids"].shape


def test_loss_weights_are_applied(tiny, make_batch):
    model, tokenizer, image_processor, cfg = tiny
    batch = make_batch(tokenizer, image_processor, seg_counts=[1, 2])
    model.eval()
    cfg.loss.dice, cfg.loss.bce = 0.0, 2.0
    out = model(**batch)
    torch.testing.assert_close(out.loss.detach(), out.ce_loss + 2.0 * out.bce_loss)


def test_seg_count_mismatch_with_targets_is_an_error(tiny, make_batch):
    model, tokenizer, image_processor, _ = tiny
    batch = make_batch(tokenizer, image_processor, seg_counts=[2, 1])
    batch["seg_target_mask"][0, 1] = False
    with pytest.raises(ValueError, match="do not match target masks"):
        model(**batch)


def test_gradients_reach_trainable_parts_and_nothing_frozen(tiny, make_batch):
    model, tokenizer, image_processor, _ = tiny
    batch = make_batch(tokenizer, image_processor, seg_counts=[1, 2])
    model(**batch).loss.backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p for n, p in model.named_parameters() if not p.requires_grad}

    lora = [n for n in trainable if ".lora_" in n]
    assert lora and all(".language_model." in n for n in lora)
    assert {n for n in trainable if n.startswith("vlm.")} == set(lora) | {
        "vlm.model.language_model.embed_tokens.trainable_rows", "vlm.lm_head.trainable_rows"}
    assert all(n.startswith("seg_module.") for n in set(trainable) - {n for n in trainable if n.startswith("vlm.")})
    assert any(n.startswith("vlm.model.visual.") for n in frozen)
    # LoRA B starts at zero, so LoRA A gets no gradient in the first step; B must.
    for name, p in trainable.items():
        if ".lora_A." in name:
            continue
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    for name, p in frozen.items():
        assert p.grad is None, name
    seg_id = model.seg_token_id
    assert model.vlm.get_input_embeddings().trainable_rows.shape == (1, 64)
    assert model.vlm.get_input_embeddings().row_ids.tolist() == [seg_id]
    n_trainable_vlm = sum(p.numel() for n, p in trainable.items() if n.startswith("vlm."))
    assert n_trainable_vlm < model.vlm.get_input_embeddings().weight.numel()


def test_seg_rows_change_only_the_seg_token(tiny):
    model, tokenizer, _, _ = tiny
    emb, head = model.vlm.get_input_embeddings(), model.vlm.get_output_embeddings()
    with torch.no_grad():
        emb.trainable_rows.add_(1.0)
        head.trainable_rows.add_(1.0)
    seg, other = model.seg_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")
    ids = torch.tensor([[other, seg]])
    out = emb(ids)
    torch.testing.assert_close(out[0, 0], emb.weight[other])
    torch.testing.assert_close(out[0, 1], emb.weight[seg] + 1.0)
    x = torch.randn(1, 64)
    logits = head(x)
    torch.testing.assert_close(logits[0, other], x[0] @ head.weight[other])
    torch.testing.assert_close(logits[0, seg], x[0] @ (head.weight[seg] + 1.0))
    torch.testing.assert_close(head.merged_weight()[seg], head.weight[seg] + 1.0)


def test_batch_without_slices_skips_segmentation(tiny, make_batch):
    model, tokenizer, image_processor, _ = tiny
    batch = make_batch(tokenizer, image_processor, seg_counts=[0, 0])
    for key in ("seg_slices", "seg_masks", "seg_target_mask"):
        batch.pop(key)
    out = model(**batch)
    assert out.mask_logits is None and out.dice_loss == 0 and out.bce_loss == 0
    out.loss.backward()


def test_mm_token_type_ids_drive_image_positions(tiny, make_batch):
    """transformers 5.x uses 3D image positions only when mm_token_type_ids marks the image tokens."""
    model, tokenizer, image_processor, _ = tiny
    batch = make_batch(tokenizer, image_processor, seg_counts=[1])
    model.eval()
    with torch.no_grad():
        with_types = model(**batch).logits
        without = model(**{**batch, "mm_token_type_ids": torch.zeros_like(batch["mm_token_type_ids"])}).logits
    assert not torch.allclose(with_types, without)


def test_tiny_base_is_deterministic_by_seed(tmp_path):
    import time

    from safetensors.torch import load_file

    from model.tiny import write_tiny_base

    start = time.perf_counter()
    a = load_file(write_tiny_base(tmp_path / "a", seed=3) / "model.safetensors")
    assert time.perf_counter() - start < 30
    b = load_file(write_tiny_base(tmp_path / "b", seed=3) / "model.safetensors")
    c = load_file(write_tiny_base(tmp_path / "c", seed=4) / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()
