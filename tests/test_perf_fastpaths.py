"""Each fast path (docs/performance.md) gives what the plain path gives, on the tiny model on CPU."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from transformers import LogitsProcessor, LogitsProcessorList, Qwen2_5_VLForConditionalGeneration

from bench.perf_bench import Script, ScriptedGenerator, report_script
from dataset.conversation import Turn
from dataset.prompts import GROUNDED_REPORT_EVAL
from inference.cases import Case
from inference.decoding import StaticDecoder
from inference.generate import DecodeSettings, Generator, Prompt
from inference.pipeline import OmniAbnormPipeline
from model import omniabnorm
from model.losses import linear_cross_entropy, shifted_cross_entropy
from model.omniabnorm import (
    PACKED_ATTENTION,
    VARLEN_ATTENTION,
    OmniAbnormCT,
    attention_within_sequences,
    build_model,
    compile_blocks,
    lora_layers,
    set_vision_attention,
    varlen_attention,
)
from model.tiny import build_tiny, tiny_model_config, tiny_vlm_config
from model.trainable_rows import LinearWithTrainableRows


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tiny model's small ops run fastest on one thread on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def trainable_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


# ------------------------------------------------------------------------------------- training: no full logits

def test_linear_ce_gives_the_full_logits_loss_and_gradients(tiny, make_batch):
    model, tokenizer, image_processor, cfg = tiny
    batch = make_batch(tokenizer, image_processor, seg_counts=[0, 1, 3])
    plain = model(**batch)
    plain.loss.backward()
    expected = trainable_grads(model)
    model.zero_grad(set_to_none=True)
    cfg.linear_ce = True  # the model's own config object
    fast = model(**batch)
    fast.loss.backward()
    assert plain.logits.shape[:2] == batch["input_ids"].shape and fast.logits is None
    torch.testing.assert_close(fast.ce_loss, plain.ce_loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fast.loss, plain.loss, rtol=1e-6, atol=1e-6)
    got = trainable_grads(model)
    assert got.keys() == expected.keys() and any(".lora_" in n for n in got)
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    assert got["vlm.lm_head.trainable_rows"].abs().sum() > 0  # the <SEG> row of the head is trained


def test_linear_cross_entropy_in_chunks_and_without_labels():
    torch.manual_seed(0)
    head = LinearWithTrainableRows.wrap(nn.Linear(16, 50, bias=False), [3, 7])
    hidden = torch.randn(2, 9, 16, requires_grad=True)
    labels = torch.randint(0, 50, (2, 9))
    labels[0, :4] = -100
    labels[1, 6:] = -100
    reference = shifted_cross_entropy(head(hidden), labels)
    reference.backward()
    expected = hidden.grad.clone(), head.trainable_rows.grad.clone()
    hidden.grad = head.trainable_rows.grad = None
    loss = linear_cross_entropy(hidden, head, labels, chunk=3)  # 9 labelled positions: three chunks
    loss.backward()
    torch.testing.assert_close(loss, reference, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(hidden.grad, expected[0], rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(head.trainable_rows.grad, expected[1], rtol=1e-5, atol=1e-8)

    head.trainable_rows.grad = None
    empty = linear_cross_entropy(hidden, head, torch.full_like(labels, -100))
    empty.backward()
    assert empty.item() == 0.0
    assert head.trainable_rows.grad is not None and not head.trainable_rows.grad.any()  # present, zero (DDP)


# ------------------------------------------------------------------------------------------ packed sequences

def test_packed_sequences_give_the_padded_losses_and_gradients(tiny, make_batch, monkeypatch):
    """Three samples of different lengths: the packed row (padding dropped, causal attention within each sample) gives
    the padded batch's logits, losses, masks and gradients."""
    model, tokenizer, image_processor, cfg = tiny
    batch = make_batch(tokenizer, image_processor, seg_counts=[0, 1, 3])
    lengths = batch["attention_mask"].sum(dim=1)
    assert lengths.unique().numel() == 3  # padding to drop
    plain = model(**batch)
    plain.loss.backward()
    expected = trainable_grads(model)
    model.zero_grad(set_to_none=True)

    calls = []

    def spy(query, key, value, cu_seq_lens, longest, scaling, causal):
        calls.append((query.shape[2], cu_seq_lens.tolist(), causal))
        return attention_within_sequences(query, key, value, cu_seq_lens, longest, scaling, causal)

    monkeypatch.setattr(omniabnorm, "attention_within_sequences", spy)
    packed_model = OmniAbnormCT(model.vlm, model.seg_module, model.seg_token_id,
                                dataclasses.replace(cfg, packed_sequences=True))
    assert model.vlm.model.language_model.config._attn_implementation == PACKED_ATTENTION
    packed = packed_model(**batch)
    packed.loss.backward()
    cu = [0, *lengths.cumsum(0).tolist()]
    lm_calls = [c for c in calls if c[2]]
    assert len(lm_calls) == model.vlm.config.text_config.num_hidden_layers
    assert all(c == (cu[-1], cu, True) for c in lm_calls)  # one row of Σ lengths tokens, split per sample

    keep = batch["attention_mask"].bool()
    torch.testing.assert_close(packed.logits[keep], plain.logits[keep], rtol=1e-5, atol=1e-5)
    for name in ("loss", "ce_loss", "dice_loss", "bce_loss", "mask_logits"):
        torch.testing.assert_close(getattr(packed, name), getattr(plain, name), rtol=1e-5, atol=1e-6, msg=name)
    got = trainable_grads(model)
    assert got.keys() == expected.keys()
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.slow
def test_compiled_blocks_give_the_eager_losses_and_gradients(tiny, make_batch):
    """model.compile_blocks: every decoder layer and vision block compiled (inductor's C++ backend on CPU), same
    losses and gradients as eager, parameter names unchanged; a second batch of other lengths runs too."""
    model, tokenizer, image_processor, _cfg = tiny
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    batch = make_batch(tokenizer, image_processor, seg_counts=[0, 1, 3])
    plain = model(**batch)
    plain.loss.backward()
    expected = trainable_grads(model)
    names = [n for n, _ in model.named_parameters()]
    model.zero_grad(set_to_none=True)
    compile_blocks(model.vlm)  # what training/loop.py does with model.compile_blocks
    blocks = [*model.vlm.model.language_model.layers, *model.vlm.model.visual.blocks]
    assert all(block._compiled_call_impl is not None for block in blocks)
    out = model(**batch)
    out.loss.backward()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 2  # compiled, not silently eager
    assert [n for n, _ in model.named_parameters()] == names  # nn.Module.compile wraps nothing
    for name in ("loss", "ce_loss", "dice_loss", "bce_loss"):
        torch.testing.assert_close(getattr(out, name), getattr(plain, name), rtol=1e-5, atol=1e-6, msg=name)
    got = trainable_grads(model)
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    assert torch.isfinite(model(**make_batch(tokenizer, image_processor, seg_counts=[2, 0])).loss)
    compile_blocks(model.vlm, compiled=False)
    assert all(block._compiled_call_impl is None for block in blocks)
    torch._dynamo.reset()  # compiled code caches stay out of later tests


def test_attention_within_sequences_is_causal_per_sequence_with_grouped_heads():
    torch.manual_seed(0)
    cu = torch.tensor([0, 5, 6, 13], dtype=torch.int32)
    q = torch.randn(1, 4, 13, 8)
    k, v = torch.randn(1, 2, 13, 8), torch.randn(1, 2, 13, 8)  # 2 KV heads, each serving 2 query heads
    out = attention_within_sequences(q, k, v, cu, 7, scaling=0.35, causal=True)
    assert out.shape == (1, 13, 4, 8)
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        expected = F.scaled_dot_product_attention(q[..., s:e, :], k[..., s:e, :], v[..., s:e, :], scale=0.35,
                                                  is_causal=True, enable_gqa=True)
        torch.testing.assert_close(out[0, s:e], expected[0].transpose(0, 1), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------- varlen vision attention

def test_varlen_attention_equals_attention_per_sequence():
    torch.manual_seed(0)
    cu = torch.tensor([0, 3, 10, 11, 16], dtype=torch.int32)
    q, k, v = (torch.randn(1, 2, 16, 8) for _ in range(3))
    out, _ = varlen_attention(nn.Module(), q, k, v, None, scaling=0.3, cu_seq_lens_q=cu)
    assert out.shape == (1, 16, 2, 8)
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        expected = F.scaled_dot_product_attention(q[..., s:e, :], k[..., s:e, :], v[..., s:e, :], scale=0.3)
        torch.testing.assert_close(out[0, s:e], expected[0].transpose(0, 1), rtol=1e-5, atol=1e-6)


def test_varlen_vision_tower_equals_the_window_loop(tiny, tiny_base):
    """Two images of different sizes, several 112-px windows each: features and gradients match transformers'
    per-window SDPA loop. (The tiny base attends over the whole image in both blocks; here block 0 attends within
    windows, as 28 of the 7B tower's 32 blocks do.)"""
    config = tiny_vlm_config(tiny[1])
    config.vision_config.fullatt_block_indexes = [1]
    torch.manual_seed(0)
    vlm = Qwen2_5_VLForConditionalGeneration(config)
    assert vlm.model.visual.config._attn_implementation == "sdpa"  # the default is transformers' own path
    grid = torch.tensor([[1, 16, 16], [1, 12, 20]])
    pixels = torch.randn(int(grid.prod(dim=1).sum()), 1176, generator=torch.Generator().manual_seed(0))
    weight = vlm.model.visual.blocks[0].attn.qkv.weight  # block 0 attends within windows, block 1 over the image
    weight.requires_grad_(True)
    results = {}
    for kind in ("sdpa", "varlen"):
        set_vision_attention(vlm, kind)
        weight.grad = None
        features = torch.cat(vlm.model.get_image_features(pixels, grid).pooler_output)
        features.square().sum().backward()
        results[kind] = features.detach(), weight.grad.clone()
    assert results["sdpa"][0].shape == (64 + 60, 64)
    torch.testing.assert_close(results["varlen"][0], results["sdpa"][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(results["varlen"][1], results["sdpa"][1], rtol=1e-4, atol=1e-6)

    model, _, _ = build_model(tiny_model_config(tiny_base, vision_attention="varlen"))
    assert model.vlm.model.visual.config._attn_implementation == VARLEN_ATTENTION


# ------------------------------------------------------------------------------------------------ decoding

def _prompts(generator: Generator) -> list:
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), rng.integers(0, 256, (72, 96, 3), dtype=np.uint8)]
    texts = [GROUNDED_REPORT_EVAL, "Which organ is shown?"]
    return [generator.encode(Prompt([Turn("user", t, images=1)], [im])) for t, im in zip(texts, images)]


def _greedy(tiny, settings: DecodeSettings, max_new_tokens: int = 12, processor=None) -> list[list[int]]:
    model, tokenizer, image_processor, _ = tiny
    generator = Generator(model.eval(), tokenizer, image_processor, torch.device("cpu"), settings)
    rows = generator.generate(_prompts(generator), max_new_tokens, processor and LogitsProcessorList([processor]))
    return [g.token_ids.tolist() for g in rows]


def test_static_loop_gives_the_tokens_and_scores_of_generate(tiny):
    """Left-padded rows of different prompt lengths, decoded to the token limit: same tokens, and the same scores at
    every step (tokens alone would miss a small error such as a rope position off by one). The CPU runs the loop
    without CUDA graphs; bench/perf_bench.py compares the graphs with the loop run without them on the GPU."""
    _, tokenizer, _, _ = tiny
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    plain_scores, static_scores = StopAt(eos, []), StopAt(eos, [])
    plain = _greedy(tiny, DecodeSettings(), processor=plain_scores)
    assert [len(t) for t in plain] == [12, 12]
    assert _greedy(tiny, DecodeSettings(loop="static"), processor=static_scores) == plain
    assert len(static_scores.scores) == len(plain_scores.scores) == 12
    for ours, theirs in zip(static_scores.scores, plain_scores.scores):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="loop"):
        DecodeSettings(loop="compiled")
    with pytest.raises(ValueError, match="compile_step needs loop='static'"):
        DecodeSettings(compile_step=True)


def test_decode_attention_equals_sdpa_with_every_head_repeated():
    """`decode_attention`: one query per row, 8 query heads on 2 KV heads, keys masked per row: the grouped call gives
    what SDPA over repeated key and value heads gives (what transformers computes under torch.compile), and more
    than one query goes to transformers' SDPA unchanged."""
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    rng = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(3, h, n, 16, generator=rng) for h, n in ((8, 1), (2, 10), (2, 10)))
    mask = torch.rand(3, 1, 1, 10, generator=rng) > 0.3
    mask[:, ..., 0] = True
    module = nn.Module()
    module.num_key_value_groups, module.is_causal = 4, True
    out, _ = omniabnorm.decode_attention(module, query, key, value, mask, scaling=0.25)
    expected = F.scaled_dot_product_attention(query, repeat_kv(key, 4), repeat_kv(value, 4), attn_mask=mask, scale=0.25)
    torch.testing.assert_close(out, expected.transpose(1, 2), rtol=1e-5, atol=1e-6)
    prefill = torch.randn(3, 8, 4, 16, generator=rng)
    causal = torch.ones(4, 10, dtype=torch.bool).tril(diagonal=6)[None, None].expand(3, 1, 4, 10)
    torch.testing.assert_close(omniabnorm.decode_attention(module, prefill, key, value, causal, scaling=0.25)[0],
                               sdpa_attention_forward(module, prefill, key, value, causal, scaling=0.25)[0])


def test_static_decode_steps_attend_with_decode_attention(tiny, monkeypatch):
    """Every decode step of every layer goes through `decode_attention` (the prefill through the model's own), and the
    language model's attention setting is what it was after the loop."""
    from transformers import AttentionInterface

    seen = []

    def spy(module, query, *args, **kwargs):
        seen.append(query.shape[2])
        return omniabnorm.decode_attention(module, query, *args, **kwargs)

    monkeypatch.setitem(AttentionInterface._global_mapping, omniabnorm.DECODE_ATTENTION, spy)
    model = tiny[0]
    before = model.vlm.model.language_model.config._attn_implementation
    rows = _greedy(tiny, DecodeSettings(loop="static"), max_new_tokens=5)
    layers = len(model.vlm.model.language_model.layers)
    assert [len(t) for t in rows] == [5, 5] and seen == [1] * (4 * layers)  # tokens 0..3 fed back
    assert model.vlm.model.language_model.config._attn_implementation == before


@pytest.mark.slow
def test_compiled_decode_step_gives_the_same_scores_and_leaves_the_prefill_eager(tiny, monkeypatch):
    """DecodeSettings(compile_step=True): every step's scores equal the eager loop's. Only the step is compiled: the
    layers run eagerly again after each call, and prompts of another length (another prefill shape, the same cache)
    compile nothing new (compiling the prefill too made the H100's grounded flow 5× slower). Each decoder layer
    compiles a graph of its own (dynamo specialises on the layer's KV-cache index): `compiled_calls` must raise
    dynamo's limit on graphs per code object to fit them all, which a starting limit of 1 and a hard failure on
    hitting it check (at 7B, 28 layers, torch's default 8 did not). The compiled step attends with grouped query
    heads: transformers' SDPA would repeat every key and value head there (`repeat_kv`), never called in a step."""
    from transformers.integrations import sdpa_attention

    in_step, repeated = [False], []
    step, repeat_kv = StaticDecoder._forward, sdpa_attention.repeat_kv

    def forward(self, state):
        in_step[0] = True
        try:
            return step(self, state)
        finally:
            in_step[0] = False

    monkeypatch.setattr(StaticDecoder, "_forward", forward)
    monkeypatch.setattr(sdpa_attention, "repeat_kv", lambda states, n: repeated.append(in_step[0]) or repeat_kv(states, n))
    model, tokenizer, image_processor, _ = tiny
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    eager_scores, compiled_scores = StopAt(eos, []), StopAt(eos, [])
    eager = _greedy(tiny, DecodeSettings(loop="static"), processor=eager_scores)
    layers = model.vlm.model.language_model.layers
    counters = torch._dynamo.utils.counters
    torch._dynamo.reset()
    counters.clear()
    with torch._dynamo.config.patch(recompile_limit=1, accumulated_recompile_limit=1,
                                    fail_on_recompile_limit_hit=True):
        try:
            generator = Generator(model, tokenizer, image_processor, torch.device("cpu"),
                                  DecodeSettings(loop="static", compile_step=True))
            prompts = _prompts(generator)
            rows = generator.generate(prompts, 12, LogitsProcessorList([compiled_scores]))
            assert [g.token_ids.tolist() for g in rows] == eager
            graphs = counters["stats"]["unique_graphs"]
            assert graphs >= 2  # compiled, not silently eager
            assert all(layer._compiled_call_impl is None for layer in layers)
            for ours, theirs in zip(compiled_scores.scores, eager_scores.scores, strict=True):
                torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
            shorter = [min(prompts, key=lambda p: len(p.input_ids))] * 2
            assert len(shorter[0].input_ids) < max(len(p.input_ids) for p in prompts)
            generator.generate(shorter, 12)
            assert counters["stats"]["unique_graphs"] == graphs
            assert not any(repeated)
        finally:
            torch._dynamo.reset()


@pytest.mark.slow
def test_compiled_vision_gives_the_eager_scores_and_settles_on_dynamic_sizes(tiny):
    """DecodeSettings(compile_vision=True): the vision blocks run compiled inside generation only, every step's
    scores equal the eager varlen tower's, and batches of other image counts and grids stop compiling new graphs once
    sizes have turned dynamic (a graph per image batch would make inference slower than eager, as the compiled
    prefill did). On the CPU the attention's padded fallback breaks the graph at a data-dependent size, so sizes turn
    dynamic piece by piece over the first few batches. Dynamo's hard failure on its graph limit checks that no block
    silently fell back to eager."""
    model, tokenizer, image_processor, _ = tiny
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    settings = DecodeSettings(loop="static", varlen_vision=True)
    eager_scores, compiled_scores = StopAt(eos, []), StopAt(eos, [])
    eager = _greedy(tiny, settings, processor=eager_scores)
    blocks = model.vlm.model.visual.blocks
    counters = torch._dynamo.utils.counters
    torch._dynamo.reset()
    counters.clear()
    rng = np.random.default_rng(0)
    with torch._dynamo.config.patch(recompile_limit=1, accumulated_recompile_limit=1,
                                    fail_on_recompile_limit_hit=True):
        try:
            generator = Generator(model, tokenizer, image_processor, torch.device("cpu"),
                                  dataclasses.replace(settings, compile_vision=True))
            rows = generator.generate(_prompts(generator), 12, LogitsProcessorList([compiled_scores]))
            assert [g.token_ids.tolist() for g in rows] == eager
            for ours, theirs in zip(compiled_scores.scores, eager_scores.scores, strict=True):
                torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
            assert counters["stats"]["unique_graphs"] >= 1 and all(b._compiled_call_impl is None for b in blocks)

            def images(shapes):
                return [generator.encode(Prompt([Turn("user", "Describe.", images=1)],
                                                [rng.integers(0, 256, (*shape, 3), dtype=np.uint8)]))
                        for shape in shapes]

            for shapes in ([(72, 96)] * 3, [(96, 64)], [(64, 120), (64, 64), (80, 80)]):  # sizes turn dynamic
                generator.generate(images(shapes), 2)
            graphs = counters["stats"]["unique_graphs"]
            for shapes in ([(90, 90)] * 2, [(64, 64)] * 5):
                generator.generate(images(shapes), 2)
            assert counters["stats"]["unique_graphs"] == graphs
        finally:
            torch._dynamo.reset()
            set_vision_attention(model.vlm, "sdpa")  # the module's other tests share the model


def test_merged_lora_gives_the_scores_of_the_adapters(tmp_path):
    """`merge_lora` adds B·A·scale into the base weights: every step's scores stay those of the unmerged model (a
    model of its own: merging changes it in place)."""
    model, tokenizer, image_processor, _ = build_tiny(tmp_path, seed=3)
    for layer in lora_layers(model.vlm):  # peft starts B at zero: give the adapters something to merge
        for b in layer.lora_B.values():
            torch.nn.init.normal_(b.weight, std=0.2)
    tiny = (model, tokenizer, image_processor, None)
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    plain, merged = StopAt(eos, []), StopAt(eos, [])
    tokens = _greedy(tiny, DecodeSettings(), processor=plain)
    assert _greedy(tiny, DecodeSettings.fast(), processor=merged) == tokens
    assert all(layer.merged for layer in lora_layers(model.vlm))
    for ours, theirs in zip(merged.scores, plain.scores, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


class StopAt(LogitsProcessor):
    """Records the scores of every step and forces `<|im_end|>` at step `stops[b]` of row b."""

    def __init__(self, eos_id: int, stops: list[int]):
        self.eos_id, self.stops, self.start, self.scores = eos_id, stops, None, []

    def __call__(self, input_ids, scores):
        self.scores.append(scores.clone())
        self.start = input_ids.shape[1] if self.start is None else self.start
        for b, stop in enumerate(self.stops):
            if input_ids.shape[1] - self.start == stop:
                scores[b] = -torch.inf
                scores[b, self.eos_id] = 0.0
        return scores


@pytest.mark.parametrize("stops", [[2, 5], [0, 3], [4, 4]])
def test_static_loop_stops_where_generate_stops(tiny, stops):
    """Rows ending at different steps, one at the very first token: same tokens, and the loop stops once every row
    has ended (the processor sees every step, so its calls count the steps)."""
    _, tokenizer, _, _ = tiny
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    plain = _greedy(tiny, DecodeSettings(), processor=StopAt(eos, stops))
    counting = StopAt(eos, stops)
    assert _greedy(tiny, DecodeSettings(loop="static"), processor=counting) == plain
    assert [len(t) for t in plain] == stops
    assert len(counting.scores) == max(stops) + 1


def test_seg_queries_from_the_decode_equal_the_seg_forward(tiny, monkeypatch):
    """DecodeSettings(seg_from_decode=True): each `<SEG>` query and probability is the state the static loop computed
    at that position, equal to those of the forward over prompt + reply, which is then not run. A `<SEG>` after
    `<|im_end|>` is not part of the reply; a reply cut by the token limit right after a `<SEG>` (never fed back, so
    without a state) falls back to the forward."""
    model, tokenizer, image_processor, _ = tiny
    seg, eos = (tokenizer.convert_tokens_to_ids(t) for t in ("<SEG>", "<|im_end|>"))
    word = tokenizer("lesion", add_special_tokens=False).input_ids[0]
    scripts = [[word, seg, word, word, seg], [seg, word, eos, seg]]  # then <|im_end|>
    model.eval()

    def run(settings: DecodeSettings, max_new_tokens: int):
        generator = Generator(model, tokenizer, image_processor, torch.device("cpu"), settings)
        rows = generator.generate(_prompts(generator), max_new_tokens,
                                  LogitsProcessorList([Script(scripts, eos)]))
        return rows, generator.seg_queries(rows)

    plain_rows, plain = run(DecodeSettings(loop="static"), 8)
    seg_forward = model.seg_queries
    with monkeypatch.context() as patch:
        patch.setattr(model, "seg_queries", lambda **kwargs: pytest.fail("the <SEG> forward ran"))
        rows, decoded = run(DecodeSettings(loop="static", seg_from_decode=True), 8)
    assert [g.token_ids.tolist() for g in rows] == [g.token_ids.tolist() for g in plain_rows]
    assert plain[1].tolist() == decoded[1].tolist() == [[True, True], [True, False]]
    torch.testing.assert_close(decoded[0], plain[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(decoded[2], plain[2], rtol=1e-4, atol=1e-6)
    assert (decoded[2][decoded[1]] > 0).all()

    calls = []
    monkeypatch.setattr(model, "seg_queries", lambda **kwargs: calls.append(1) or seg_forward(**kwargs))
    rows, cut = run(DecodeSettings(loop="static", seg_from_decode=True), 2)  # row 0 ends in an unfed <SEG>
    assert [g.token_ids.tolist() for g in rows] == [[word, seg], [seg, word]]
    assert all(g.seg_states is None for g in rows) and calls == [1]
    torch.testing.assert_close(cut[0][:, :1], plain[0][:, :1], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="seg_from_decode needs loop='static'"):
        DecodeSettings(seg_from_decode=True)


def test_second_round_from_the_first_rounds_cache_equals_a_full_prefill(tiny, monkeypatch):
    """DecodeSettings(continue_rounds=True): a second round that continues the first (rows reordered and one left out,
    replies of different lengths, so the cache holds tokens decoded past a row's end) starts from the first round's
    KV cache, prefilling only the tool turn with its image, and gives the scores at every step, the tokens and the
    `<SEG>` states of a full prefill. A prompt that does not begin with its reply's prompt, reply and images (here:
    another first image) takes the full prefill."""
    model, tokenizer, image_processor, _ = tiny
    seg, eos = (tokenizer.convert_tokens_to_ids(t) for t in ("<SEG>", "<|im_end|>"))
    word = tokenizer(" lesion", add_special_tokens=False).input_ids
    rng = np.random.default_rng(2)
    images = [rng.integers(0, 256, shape, dtype=np.uint8) for shape in ((64, 64, 3), (72, 96, 3), (64, 80, 3))]
    model.eval()

    def two_rounds(settings: DecodeSettings, first_images: list) -> tuple[list, list, list]:
        generator = Generator(model, tokenizer, image_processor, torch.device("cpu"), settings)
        prompts = [generator.encode(Prompt([Turn("user", text, images=1)], [image]))
                   for text, image in zip((GROUNDED_REPORT_EVAL, "Which organ?", "Any lesion?"), images)]
        first = generator.generate(prompts, 8, LogitsProcessorList([Script([[*word, seg, *word], [seg], word], eos)]))
        order = [2, 0]
        second = [generator.encode(Prompt([Turn("user", text, images=1), Turn("assistant", first[i].text),
                                           Turn("tool", "", images=1)], [first_images[i], images[1 - i % 2]]))
                  for i, text in zip(order, ("Any lesion?", GROUNDED_REPORT_EVAL))]
        scores = StopAt(eos, [])
        rows = generator.generate(second, 6, LogitsProcessorList([scores, Script([[], [seg]], eos)]),
                                  after=[first[i] for i in order])
        return rows, scores.scores, generator.seg_queries([rows[1]])

    plain_rows, plain_scores, plain_queries = two_rounds(DecodeSettings(loop="static", seg_from_decode=True), images)
    calls = []
    real = StaticDecoder.continue_last
    monkeypatch.setattr(StaticDecoder, "continue_last", lambda *a, **k: calls.append(1) or real(*a, **k))
    settings = DecodeSettings(loop="static", seg_from_decode=True, continue_rounds=True)
    rows, scores, queries = two_rounds(settings, images)
    assert calls == [1]
    assert [g.token_ids.tolist() for g in rows] == [g.token_ids.tolist() for g in plain_rows] == [[], [seg]]
    for ours, theirs in zip(scores, plain_scores, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    for ours, theirs in zip(queries, plain_queries, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)

    calls.clear()
    other = [images[0], images[1], np.ascontiguousarray(images[2][::-1])]  # row 2's first image is not round 1's
    _, scores, _ = two_rounds(settings, other)
    _, plain_scores, _ = two_rounds(DecodeSettings(loop="static"), other)
    assert calls == []
    for ours, theirs in zip(scores, plain_scores, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="continue_rounds needs loop='static'"):
        DecodeSettings(continue_rounds=True)


def test_image_features_are_computed_once_per_image(tiny, tmp_path):
    """Two-round grounded flow: the `<SEG>` forward and the second round reuse the key slice's features; the reports
    are those of the plain path and the vision tower encodes 2 images per case instead of 4."""
    model, tokenizer, image_processor, _ = tiny
    rng = np.random.default_rng(1)
    cases = []
    for i, shape in enumerate(((64, 64), (72, 96))):
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(tmp_path / f"{i}.png")
        cases.append(Case(str(tmp_path / f"{i}.png"), task="grounded"))
    encoded = []
    model.vlm.model.visual.register_forward_pre_hook(
        lambda module, args, kwargs: encoded.append(len(kwargs["grid_thw"])), with_kwargs=True)
    script = {"first": [tokenizer.convert_tokens_to_ids("<SEG>")], "second": report_script(tokenizer, 6)}
    reports = {}
    for reuse in (False, True):
        pipe = OmniAbnormPipeline(model, tokenizer, image_processor, device="cpu", max_new_tokens=8, batch_size=2)
        pipe.generator = ScriptedGenerator(pipe.model, tokenizer, image_processor, pipe.device,
                                           DecodeSettings(reuse_image_features=reuse), **script)
        encoded.clear()
        reports[reuse] = pipe.run(cases)
        assert sum(encoded) == (4 if reuse else 8)  # 2 cases: key slices once + tool images, or 4 forwards' worth
    for plain, fast in zip(reports[False], reports[True]):
        assert [r["output"] for r in fast.rounds] == [r["output"] for r in plain.rounds]
        assert len(plain.rounds) == 2 and plain.generation["seg_tokens"] == 1 and plain.findings
        assert [f.box_xyxy for f in fast.findings] == [f.box_xyxy for f in plain.findings]
        for a, b in zip(fast.findings, plain.findings):
            assert np.array_equal(a.mask, b.mask)
            assert a.seg_probability == pytest.approx(b.seg_probability, rel=1e-6)
