"""Greedy decoding over a preallocated KV cache, each decode step replayed as one CUDA graph.

transformers' `generate()` spends more host time per token than an H100 needs for the 7B forward at batch 1:
its input preparation, logits processors, stopping criteria and a device sync run in Python every step, and the
GPU waits (bench/perf_bench.py measured 93 tokens/s with its compiled static-cache step, against about 220 that
the weights' bandwidth allows). Here:

- the prefill is the model's own forward (vision tower, image features, 3D rope positions) into a `StaticCache`
  of `bucket_len(prompt + max_new_tokens)` slots, so a handful of cache lengths serve all prompts;
- every later step is one fixed-shape call of the language model and output head: token (B, 1), rope positions
  (3, B, 1), and a (B, 1, 1, slots) key mask passed as transformers' prepared mask mapping. On CUDA that call is
  captured once per (batch, slots) as a CUDA graph and replayed; elsewhere it runs as is (the same arithmetic, so
  CPU tests check the loop against `generate()`);
- between steps only a few small tensor updates run, and the end-of-turn check reads the previous step's flag,
  copied to pinned memory without blocking, so the host never waits for the step it just launched (at most one
  step is decoded past the point where every row has finished; its tokens are cut like any after `<|im_end|>`).

Rope positions of new tokens continue as transformers continues them: one past the row's last prompt position in
each of the three rope sections (Qwen2.5-VL's 3D positions make that differ from the cache index).

With `keep_hidden`, the loop also returns the last-layer hidden state of every position it ran, so the `<SEG>`
queries come from the decode itself instead of a second forward over prompt + reply (inference/generate.py).

`continue_last` starts a later round from the latest call's cache: the rows' prompt and reply slots are copied into
the new cache as they are, and only the tokens after the kept reply (a tool turn with its image) are prefilled,
attending to those slots through an explicit key mask; the rest is the same loop.
"""

from __future__ import annotations

import contextlib
import itertools
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import StaticCache

from model.omniabnorm import DECODE_ATTENTION, calls_in_use, compiled_calls

CACHE_BUCKET = 256  # cache slots are rounded up to a multiple of this: few shapes, few graphs
MAX_SHAPES = 4  # (batch, slots) caches and graphs kept; the least recently used beyond this is dropped
_CALL_IDS = itertools.count(1)  # unique across decoders: a reply is continued only by the decoder that made it


def bucket_len(length: int, bucket: int = CACHE_BUCKET) -> int:
    return -(-length // bucket) * bucket


class _DecodeState:
    """Cache and fixed-address step buffers of one (batch, slots) shape, and the step's CUDA graph once captured."""

    def __init__(self, vlm, batch: int, slots: int, device: torch.device):
        self.cache = StaticCache(config=vlm.config, max_cache_len=slots)
        self.token = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.positions = torch.zeros(3, batch, 1, dtype=torch.long, device=device)
        self.key_mask = torch.zeros(batch, 1, 1, slots, dtype=torch.bool, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.outputs: tuple[Tensor, Tensor] | None = None  # the graph's output buffers: scores, hidden state


@dataclass
class LastCall:
    """What a continuation needs of the decoder's latest call."""

    call_id: int
    state: _DecodeState
    start: int  # cache slot of new token 0 (the padded prompt's length)
    fed: int  # slots written: the prompt's and those of the new tokens fed back
    key_mask: Tensor  # (B, fed) bool: the prompt's real slots and the fed tokens' slots

    @property
    def fed_tokens(self) -> int:
        """New tokens fed back, so in the cache: a continuation can keep at most these of each row's reply."""
        return self.fed - self.start


class StaticDecoder:
    """Greedy decoding of a left-padded batch; `use_graphs` captures the decode step on CUDA; `compile_step` runs the
    step's decoder layers through torch.compile (the prefill stays eager: a new prompt length compiles nothing)."""

    def __init__(self, vlm, eos_id: int, use_graphs: bool, compile_step: bool = False):
        self.vlm = vlm
        self.eos_id = eos_id
        self.use_graphs = use_graphs
        self._layers = list(vlm.model.language_model.layers)
        self._step_calls = compiled_calls(self._layers) if compile_step else None
        self._states: OrderedDict[tuple[int, int], _DecodeState] = OrderedDict()
        self.last: LastCall | None = None

    @torch.no_grad()
    def generate(self, inputs: dict[str, Tensor], max_new_tokens: int, logits_processor=None,
                 keep_hidden: bool = False) -> tuple[Tensor, Tensor | None]:
        """inputs: the model kwargs of a left-padded batch (input_ids, attention_mask (B, L), mm_token_type_ids,
        image_grid_thw, and pixel_values or mm_encoder_outputs) → (tokens, hidden).

        tokens: new token ids (B, T), T ≤ max_new_tokens, `<|im_end|>` and anything after it included as decoded.
        hidden (with `keep_hidden`, else None): last-layer hidden states after the final norm (B, S, D), [:, 0] at
        the last prompt position (the state token 0 was chosen from) and [:, s + 1] at new token s's position. Every
        token fed back has its state, so S = T + 1, except that the last token is not fed back when it was the
        token limit's last or when every row had already ended (S = T).
        `logits_processor(input_ids (B, L + t), scores (B, V))` may change the scores of step t, as in transformers.
        """
        input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
        batch, length = input_ids.shape
        state = self._state(batch, bucket_len(length + max_new_tokens), input_ids.device)
        state.cache.reset()
        positions, _ = self.vlm.model.get_rope_index(
            input_ids, inputs["mm_token_type_ids"], inputs["image_grid_thw"], attention_mask=attention_mask)
        last = self.vlm.model(**inputs, position_ids=positions, past_key_values=state.cache,
                              use_cache=True).last_hidden_state[:, -1]  # (B, D)
        state.key_mask.zero_()
        state.key_mask[:, 0, 0, :length] = attention_mask.bool()
        state.positions.copy_(positions[:, :, -1:] + 1)  # the last prompt token is real (left padding)
        return self._decode(state, input_ids, last, max_new_tokens, logits_processor, keep_hidden)

    @torch.no_grad()
    def continue_last(self, rows: Tensor, kept: Tensor, chunk: dict[str, Tensor], positions: Tensor,
                      max_new_tokens: int, logits_processor=None, keep_hidden: bool = False
                      ) -> tuple[Tensor, Tensor | None]:
        """Continue rows of the latest call: new row j is that call's row rows[j] (B2,) with the first kept[j] (B2,)
        of its new tokens kept (at most `last.fed_tokens`), followed by `chunk`, the model kwargs of the tokens that
        come after them, left-padded (input_ids, attention_mask (B2, C), mm_token_type_ids, image_grid_thw and the
        chunk's images), whose 3D rope positions `positions` (3, B2, C) the caller computed over the whole
        sequences. → (tokens, hidden) as `generate`, the processor seeing the chunk's ids then the new tokens."""
        previous = self.last
        rows, kept = rows.to(previous.key_mask.device), kept.to(previous.key_mask.device)
        if bool((kept > previous.fed_tokens).any()):
            raise ValueError(f"a continuation keeps at most the {previous.fed_tokens} tokens in the cache")
        fed = previous.fed
        prefix = [(layer.keys[rows, :, :fed], layer.values[rows, :, :fed]) for layer in previous.state.cache.layers]
        valid = previous.key_mask[rows]  # (B2, fed), a copy: the new state may be the previous one
        valid[:, previous.start:] &= torch.arange(fed - previous.start, device=valid.device)[None] < kept[:, None]
        input_ids, attention_mask = chunk["input_ids"], chunk["attention_mask"]
        batch, length = input_ids.shape
        state = self._state(batch, bucket_len(fed + length + max_new_tokens), input_ids.device)
        state.cache.reset()
        for index, (keys, values) in enumerate(prefix):
            state.cache.update(keys, values, index)
        state.key_mask.zero_()
        state.key_mask[:, 0, 0, :fed] = valid
        state.key_mask[:, 0, 0, fed:fed + length] = attention_mask.bool()
        # chunk query q sees the kept slots and the chunk's real tokens up to itself (a padding query sees the kept
        # slots only: its output is never used, but must be finite)
        mask = state.key_mask.expand(batch, 1, length, state.key_mask.shape[-1]).clone()  # (B2, 1, C, slots)
        mask[:, 0, :, fed:fed + length] &= torch.ones(length, length, dtype=torch.bool, device=mask.device).tril()
        kwargs = {k: v for k, v in chunk.items() if k != "attention_mask"}
        last = self.vlm.model(**kwargs, attention_mask={"full_attention": mask}, position_ids=positions,
                              past_key_values=state.cache, use_cache=True).last_hidden_state[:, -1]
        state.positions.copy_(positions[:, :, -1:] + 1)
        return self._decode(state, input_ids, last, max_new_tokens, logits_processor, keep_hidden, start=fed + length)

    def _decode(self, state: _DecodeState, prompt_ids: Tensor, last: Tensor, max_new_tokens: int, logits_processor,
                keep_hidden: bool, start: int | None = None) -> tuple[Tensor, Tensor | None]:
        """The greedy loop after a prefill that left `last` (B, D), the hidden state at the prompt's last position,
        with the state's key mask and rope positions set for new token 0, which goes to cache slot `start` (default:
        the prompt's length)."""
        batch, length = prompt_ids.shape
        start = length if start is None else start
        device = prompt_ids.device
        scores = self.vlm.lm_head(last)
        hidden = [last] if keep_hidden else None
        ids = torch.cat([prompt_ids, prompt_ids.new_zeros(batch, max_new_tokens)], dim=1)  # (B, L + max_new)
        finished = torch.zeros(batch, dtype=torch.bool, device=device)
        on_cuda = device.type == "cuda"
        flag = torch.zeros((), dtype=torch.bool, pin_memory=on_cuda)  # CUDA: `finished.all()` of the step before
        pending = None  # CUDA event after that flag's copy
        steps = max_new_tokens
        fed = 0
        for t in range(max_new_tokens):
            if logits_processor is not None:
                scores = logits_processor(ids[:, :length + t], scores.float())
            token = scores.argmax(dim=-1)
            ids[:, length + t] = token
            finished |= token == self.eos_id
            if t == max_new_tokens - 1:
                break
            if not on_cuda:
                done = bool(finished.all())
            else:  # the previous step's flag: ready, since this step's inputs came after it
                done = False
                if pending is not None:
                    pending.synchronize()
                    done = bool(flag)
                flag.copy_(finished.all(), non_blocking=True)
                pending = torch.cuda.Event()
                pending.record()
            if done:
                steps = t + 1
                break
            state.token.copy_(token[:, None])
            state.key_mask[:, 0, 0, start + t] = True
            scores, step_hidden = self._step(state, device)
            fed += 1
            if keep_hidden:  # a copy: a graph's output buffer is rewritten by the next replay
                hidden.append(step_hidden.clone())
            state.positions.add_(1)
        self.last = LastCall(next(_CALL_IDS), state, start, start + fed, state.key_mask[:, 0, 0, :start + fed].clone())
        return ids[:, length:length + steps], torch.stack(hidden, dim=1) if keep_hidden else None

    def _state(self, batch: int, slots: int, device: torch.device) -> _DecodeState:
        key = (batch, slots)
        if key in self._states:
            self._states.move_to_end(key)
        else:
            while len(self._states) >= MAX_SHAPES:
                self._states.popitem(last=False)
            self._states[key] = _DecodeState(self.vlm, batch, slots, device)
        return self._states[key]

    def _forward(self, state: _DecodeState) -> tuple[Tensor, Tensor]:
        """One decode step on the state's buffers → scores (B, V) of the next token, hidden state (B, D) of the
        token fed in. The layers attend with `decode_attention` (grouped query heads, compiled or not)."""
        language_model = self.vlm.model.language_model
        config = language_model.config
        attention, config._attn_implementation = config._attn_implementation, DECODE_ATTENTION
        try:
            with calls_in_use(self._layers, self._step_calls) if self._step_calls else contextlib.nullcontext():
                hidden = language_model(inputs_embeds=language_model.embed_tokens(state.token),
                                        position_ids=state.positions,
                                        attention_mask={"full_attention": state.key_mask},
                                        past_key_values=state.cache, use_cache=True).last_hidden_state[:, -1]
        finally:
            config._attn_implementation = attention
        return self.vlm.lm_head(hidden), hidden

    def _step(self, state: _DecodeState, device: torch.device) -> tuple[Tensor, Tensor]:
        if not (self.use_graphs and device.type == "cuda"):
            return self._forward(state)
        if state.graph is None:
            self._capture(state)
        state.graph.replay()
        return state.outputs

    def _capture(self, state: _DecodeState) -> None:
        """Capture the step as a CUDA graph. The warm-up steps that capture needs write this step's key and value
        (rewritten by the first replay) and advance the cache's lengths, which are restored."""
        layers = state.cache.layers
        lengths = [layer.cumulative_length.clone() for layer in layers]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._forward(state)
        torch.cuda.current_stream().wait_stream(stream)
        for layer, saved in zip(layers, lengths):
            layer.cumulative_length.copy_(saved)
        state.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(state.graph):  # its own memory pool: graphs of different shapes replay in any order
            state.outputs = self._forward(state)
