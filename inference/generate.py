"""Batched greedy generation and segmentation for the fused model.

Prompts are encoded exactly as training encodes conversations (dataset.conversation.encode, same chat text, same
image-token counts) and batched with LEFT padding plus an attention mask, so every row's last prompt token sits at
the end and generation continues all rows in step. Qwen2.5-VL's 3D rope positions and their per-row deltas are
computed by transformers from `mm_token_type_ids`, `image_grid_thw` and the attention mask, so padding does not move
any real token's position (tests/test_inference.py checks a batch against each row alone).

`<SEG>` queries are taken as training takes them: the last-layer hidden state after the final norm at each `<SEG>`
input position. By default that is one more forward over prompt + generated tokens (`OmniAbnormCT.seg_queries`);
with `DecodeSettings.seg_from_decode` they are the states the static loop computed while decoding (the same
arithmetic over the KV cache), and that forward is not run.

`DecodeSettings` switches the fast paths (docs/performance.md): our own greedy loop over a static KV cache with the
decode step replayed as a CUDA graph (inference/decoding.py), `<SEG>` queries from that loop, a second round that
continues the first round's cache, the vision tower's varlen attention and compiled blocks, and image features
computed once per distinct image and reused by the `<SEG>` forward and the second round.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence
from transformers.modeling_outputs import BaseModelOutputWithPooling

from dataset.conversation import Turn, encode
from dataset.vision import VisionPreprocessor
from inference.decoding import StaticDecoder
from model.omniabnorm import OmniAbnormCT, calls_in_use, compiled_calls, merge_lora, set_vision_attention


@dataclass
class Prompt:
    """One row of a generation batch: the conversation so far (ending in a user or tool turn) and its images."""

    turns: list[Turn]
    images: list[np.ndarray]  # (H, W, 3) uint8 each, in order of appearance


@dataclass
class EncodedPrompt:
    input_ids: Tensor  # (L,)
    mm_token_type_ids: Tensor  # (L,)
    pixel_codes: Tensor  # (patches, C·P·P) uint8; pixel values are made on the device (dataset/vision.py)
    image_grid_thw: Tensor  # (images, 3)
    image_keys: tuple[bytes, ...] = ()  # per image: shape + SHA-256 of its pixels (the reuse key of its features)


@dataclass
class DecodeSettings:
    """Inference fast paths. The defaults are transformers' plain path (the stock path of bench/perf_bench.py)."""

    loop: str = "transformers"  # transformers: model.generate, dynamic KV cache | static: inference.decoding
    cuda_graphs: bool = True  # static loop on CUDA: each decode step replayed as a CUDA graph
    merge_lora: bool = False  # add the LoRA updates into the base weights once (changes the model in place)
    reuse_image_features: bool = False  # run the vision tower once per distinct image, not once per forward
    varlen_vision: bool = False  # the vision tower's attention as one variable-length call per layer (changes the model)
    # the vision blocks run through torch.compile inside generation (sizes turn dynamic over the first image batches)
    compile_vision: bool = False
    # static loop: its decode step runs the decoder layers through torch.compile (on CUDA its graph replays the
    # fused kernels). The prefill, vision tower and <SEG> forward stay eager: their shapes change with every prompt,
    # and recompiling for each cost more than it saved (docs/performance.md).
    compile_step: bool = False
    # static loop: the <SEG> queries (and their probabilities) are the hidden states the loop computed while
    # decoding, instead of one more forward over prompt + reply
    seg_from_decode: bool = False
    # static loop: a round that continues the previous one (`generate(..., after=...)`) starts from its KV cache and
    # prefills only the tokens after the reply (the tool turn and its image)
    continue_rounds: bool = False

    def __post_init__(self) -> None:
        if self.loop not in ("transformers", "static"):
            raise ValueError(f"loop must be transformers or static, got {self.loop!r}")
        for name in ("compile_step", "seg_from_decode", "continue_rounds"):
            if getattr(self, name) and self.loop != "static":
                raise ValueError(f"{name} needs loop='static'")

    @classmethod
    def fast(cls) -> DecodeSettings:
        """What `--fast` means on inference.py, app.py and evaluation.sh: every fast path on."""
        return cls(loop="static", cuda_graphs=True, merge_lora=True, reuse_image_features=True,
                   varlen_vision=True, seg_from_decode=True, continue_rounds=True)


@dataclass
class Generated:
    """One row's output: token ids up to (not including) the end-of-turn token, and the decoded text."""

    prompt: EncodedPrompt
    token_ids: Tensor  # (T,)
    text: str  # decoded with special tokens kept (so `<SEG>` stays visible)
    finished: bool  # False when max_new_tokens ran out before <|im_end|>
    # with DecodeSettings.seg_from_decode: the row's <SEG> queries (N, D) and probabilities (N,) from the decode
    seg_states: tuple[Tensor, Tensor] | None = None
    decoded: tuple[int, int] | None = None  # static loop: (call id, row) of the decode, for a continuation


class Generator:
    """Encodes prompts, generates greedily in batches, and computes the `<SEG>` queries of generated rows."""

    def __init__(self, model: OmniAbnormCT, tokenizer, image_processor, device: torch.device,
                 settings: DecodeSettings | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.settings = settings or DecodeSettings()
        self._features: dict[bytes, Tensor] = {}  # image key → (tokens, D) features of the latest call's images
        self.vision = VisionPreprocessor(image_processor)
        self.merge = image_processor.merge_size ** 2
        self.image_token_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
        self.eos_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id
        self.static = StaticDecoder(model.vlm, self.eos_id, self.settings.cuda_graphs, self.settings.compile_step) \
            if self.settings.loop == "static" else None
        if self.settings.merge_lora:
            merge_lora(model.vlm)
        if self.settings.varlen_vision:
            set_vision_attention(model.vlm, "varlen")
        self._vision_blocks = list(model.vlm.model.visual.blocks)
        self._vision_calls = compiled_calls(self._vision_blocks) if self.settings.compile_vision else None

    def encode(self, prompt: Prompt) -> EncodedPrompt:
        return self.encode_all([prompt])[0]

    def encode_all(self, prompts: Sequence[Prompt], pool: Executor | None = None) -> list[EncodedPrompt]:
        """Prompts → encoded prompts. The images' preprocessing (and reuse keys) runs on `pool`'s threads when given;
        the tokenizer runs on the calling thread (a fast tokenizer is not safe to share between threads)."""
        images = (pool.map if pool is not None else map)(self._pixels, prompts)
        encoded = []
        for prompt, (pixel_codes, grid, keys) in zip(prompts, images):
            conversation = encode(self.tokenizer, prompt.turns, (grid.prod(dim=1) // self.merge).tolist(),
                                  self.image_token_id, add_generation_prompt=True)
            encoded.append(EncodedPrompt(conversation.input_ids, conversation.mm_token_type_ids, pixel_codes, grid,
                                         keys))
        return encoded

    def _pixels(self, prompt: Prompt) -> tuple[Tensor, Tensor, tuple[bytes, ...]]:
        pixel_codes, grid = self.vision.encode(prompt.images)
        keys = tuple(image_key(image) for image in prompt.images) if self.settings.reuse_image_features else ()
        return pixel_codes, grid, keys

    def _pixel_values(self, pixel_codes: Sequence[Tensor]) -> Tensor:
        """Pixel codes of several images → their pixel values (patches, C·T·P·P) on the device, in the model's dtype."""
        return self.vision.values(torch.cat(list(pixel_codes)).to(self.device)).to(self.model.vlm.dtype)

    def batch(self, rows: Sequence[tuple[EncodedPrompt, Tensor]]) -> dict[str, Tensor]:
        """(prompt, continuation ids) rows → left-padded model kwargs on the device: `tokens`, and the images of all
        rows in row order: pixel_values, or with `reuse_image_features` their features (`_with_features`)."""
        inputs = self.tokens(rows)
        prompts = [p for p, _ in rows]
        if self.settings.reuse_image_features:
            return self._with_features(inputs, prompts)
        return {**inputs, "pixel_values": self._pixel_values([p.pixel_codes for p in prompts])}

    def tokens(self, rows: Sequence[tuple[EncodedPrompt, Tensor]]) -> dict[str, Tensor]:
        """(prompt, continuation ids) rows → input_ids, attention_mask, mm_token_type_ids (B, L), left-padded, and
        image_grid_thw, on the device."""
        length = max(p.input_ids.numel() + c.numel() for p, c in rows)
        ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        mm = torch.zeros((len(rows), length), dtype=torch.long)
        for b, (p, cont) in enumerate(rows):
            n = p.input_ids.numel() + cont.numel()
            ids[b, length - n:] = torch.cat([p.input_ids, cont])
            mm[b, length - n:length - cont.numel()] = p.mm_token_type_ids
            mask[b, length - n:] = 1
        return {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device),
                "mm_token_type_ids": mm.to(self.device),
                "image_grid_thw": torch.cat([p.image_grid_thw for p, _ in rows]).to(self.device)}

    @torch.no_grad()
    def generate(self, prompts: Sequence[EncodedPrompt], max_new_tokens: int, logits_processor=None,
                 after: Sequence[Generated] | None = None) -> list[Generated]:
        """Greedy decoding of all prompts in one batch (left padding, KV cache on). `after[b]`: the reply that
        prompts[b]'s conversation continues (a second round); with `continue_rounds` and the static loop, the
        decode then starts from that reply's KV cache when every row's prompt begins with exactly that prompt,
        reply and images, and from a full prefill otherwise."""
        empty = torch.zeros(0, dtype=torch.long)
        seg_states = [None] * len(prompts)
        with self._vision_in_use():
            continuation = self._continuation(prompts, after) if after is not None else None
            if continuation is not None:
                new, hidden = self.static.continue_last(*continuation, max_new_tokens, logits_processor,
                                                        keep_hidden=self.settings.seg_from_decode)
            elif self.static is not None:
                new, hidden = self.static.generate(self.batch([(p, empty) for p in prompts]), max_new_tokens,
                                                   logits_processor, keep_hidden=self.settings.seg_from_decode)
            else:
                inputs = self.batch([(p, empty) for p in prompts])
                # Every setting explicit: a base model's generation_config (Qwen2.5-VL-7B-Instruct:
                # repetition_penalty 1.05, sampling settings) would otherwise fill in whatever is left unset.
                out = self.model.vlm.generate(**inputs, do_sample=False, num_beams=1, repetition_penalty=1.0,
                                              max_new_tokens=max_new_tokens, eos_token_id=self.eos_id,
                                              pad_token_id=self.pad_id, use_cache=True,
                                              logits_processor=logits_processor)
                new, hidden = out[:, inputs["input_ids"].shape[1]:], None
            if hidden is not None:
                seg_states = self._seg_states(new, hidden)
            new = new.cpu()
        call = self.static.last.call_id if self.static is not None else None
        results = []
        for b, (prompt, row, states) in enumerate(zip(prompts, new, seg_states)):
            ends = (row == self.eos_id).nonzero()
            finished = bool(len(ends))
            tokens = row[: int(ends[0]) if finished else row.numel()]
            text = self.tokenizer.decode(tokens, skip_special_tokens=False, clean_up_tokenization_spaces=False)
            results.append(Generated(prompt, tokens, text, finished, states, None if call is None else (call, b)))
        return results

    def _continuation(self, prompts: Sequence[EncodedPrompt], after: Sequence[Generated]) -> tuple | None:
        """The arguments of `StaticDecoder.continue_last` (rows, kept, chunk, positions) when every prompt continues
        its reply of the decoder's latest call: it starts with that reply's prompt ids, reply ids and images (pixel
        for pixel) and has tokens after them, and the reply is in the cache. None otherwise."""
        last = self.static.last if self.static is not None and self.settings.continue_rounds else None
        if last is None or len(after) != len(prompts):
            return None
        rows, kept, chunks = [], [], []
        for p, g in zip(prompts, after, strict=True):
            head = torch.cat([g.prompt.input_ids, g.token_ids])
            images, patches = len(g.prompt.image_grid_thw), len(g.prompt.pixel_codes)
            if (g.decoded is None or g.decoded[0] != last.call_id or len(g.token_ids) > last.fed_tokens
                    or p.input_ids.numel() <= head.numel() or not torch.equal(p.input_ids[:head.numel()], head)
                    or not torch.equal(p.image_grid_thw[:images], g.prompt.image_grid_thw)
                    or not torch.equal(p.pixel_codes[:patches], g.prompt.pixel_codes)):
                return None
            rows.append(g.decoded[1])
            kept.append(g.token_ids.numel())
            chunks.append(EncodedPrompt(p.input_ids[head.numel():], p.mm_token_type_ids[head.numel():],
                                        p.pixel_codes[patches:], p.image_grid_thw[images:], p.image_keys[images:]))
        empty = torch.zeros(0, dtype=torch.long)
        chunk = self.batch([(c, empty) for c in chunks])
        whole = self.tokens([(p, empty) for p in prompts])  # rope positions are those of the whole sequences
        positions, _ = self.model.vlm.model.get_rope_index(whole["input_ids"], whole["mm_token_type_ids"],
                                                           whole["image_grid_thw"],
                                                           attention_mask=whole["attention_mask"])
        return (torch.tensor(rows), torch.tensor(kept), chunk, positions[:, :, -chunk["input_ids"].shape[1]:])

    def _seg_states(self, tokens: Tensor, hidden: Tensor) -> list[tuple[Tensor, Tensor] | None]:
        """The static loop's tokens (B, T) and hidden states (B, S, D) (inference/decoding.py) → per row its `<SEG>`
        queries (N, D) and probabilities (N,), on the device. Tokens from `<|im_end|>` on are not the reply. A reply
        whose last token is a `<SEG>` never fed back has no state for it: None for every row then (the `<SEG>`
        forward serves that batch)."""
        reply = tokens.masked_fill((tokens == self.eos_id).cumsum(dim=1) > 0, self.pad_id)
        if hidden.shape[1] == reply.shape[1]:
            if bool((reply[:, -1] == self.model.seg_token_id).any()):
                return [None] * len(reply)
            reply = reply[:, :-1]
        # ids at the states' positions: the last prompt token (never <SEG>: it opens the assistant turn), the reply
        ids = torch.cat([reply.new_full((len(reply), 1), self.pad_id), reply], dim=1)
        queries, query_mask, probability = self.model.seg_outputs(hidden, ids)
        counts = query_mask.sum(dim=1).tolist()
        return [(queries[b, :n], probability[b, :n]) for b, n in enumerate(counts)]

    @torch.no_grad()
    def seg_queries(self, rows: Sequence[Generated]) -> tuple[Tensor, Tensor, Tensor]:
        """Generated rows → queries (B, N, D), query_mask (B, N), seg_probability (B, N), on the device: the decode's
        states when every row has them, else one forward over prompt + reply."""
        if rows and all(g.seg_states is not None for g in rows):
            counts = torch.tensor([len(g.seg_states[1]) for g in rows], device=self.device)
            query_mask = torch.arange(int(counts.max()), device=self.device)[None, :] < counts[:, None]
            return (pad_sequence([g.seg_states[0] for g in rows], batch_first=True), query_mask,
                    pad_sequence([g.seg_states[1] for g in rows], batch_first=True))
        with self._vision_in_use():
            return self.model.seg_queries(**self.batch([(g.prompt, g.token_ids) for g in rows]))

    def _vision_in_use(self):
        """Context of every call that may run the vision tower: its blocks compiled inside with `compile_vision`."""
        if self._vision_calls is None:
            return contextlib.nullcontext()
        return calls_in_use(self._vision_blocks, self._vision_calls)

    def _with_features(self, inputs: dict[str, Tensor], prompts: Sequence[EncodedPrompt]) -> dict:
        """Model kwargs without images → the same with the prompts' image features (`mm_encoder_outputs`).

        Images whose features the previous call computed (the key slice of a second round or of the `<SEG>` forward)
        are not encoded again; the others are encoded together in one vision-tower call. Only the features of this
        call's images are kept, so the held memory is one batch's images.
        """
        pending: dict[bytes, tuple[Tensor, Tensor]] = {}  # key → (pixel codes, grid) of images to encode
        for p in prompts:
            pixels = p.pixel_codes.split(p.image_grid_thw.prod(dim=1).tolist())
            for key, pv, grid in zip(p.image_keys, pixels, p.image_grid_thw, strict=True):
                if key not in self._features:
                    pending.setdefault(key, (pv, grid))
        features = {key: self._features[key] for p in prompts for key in p.image_keys if key in self._features}
        if pending:
            vlm = self.model.vlm
            pixel_values = self._pixel_values([codes for codes, _ in pending.values()])
            grids = torch.stack([grid for _, grid in pending.values()]).to(self.device)
            features.update(zip(pending, vlm.model.get_image_features(pixel_values, grids).pooler_output))
        self._features = features
        pooled = tuple(features[key] for p in prompts for key in p.image_keys)
        return {**inputs, "mm_encoder_outputs": {"image": BaseModelOutputWithPooling(pooler_output=pooled)}}

    @torch.no_grad()
    def segment(self, seg_slices: Sequence[np.ndarray], queries: Tensor, query_mask: Tensor) -> np.ndarray:
        """Batched segmentation: stacks (S, size, size) per row + queries (B, N, D) → probabilities (B, N, size,
        size) float32 (padded query slots are 0)."""
        seg = self.model.seg_module
        slices = torch.from_numpy(np.stack(seg_slices)).to(self.device, next(seg.parameters()).dtype)
        logits = seg(slices, queries, query_mask)
        return logits.float().sigmoid().cpu().numpy()


def image_key(image: np.ndarray) -> bytes:
    """Identity of an image's pixels: its shape and the SHA-256 of its bytes (about 1 ms for 512 × 512 × 3)."""
    return repr(image.shape).encode() + hashlib.sha256(np.ascontiguousarray(image).tobytes()).digest()
