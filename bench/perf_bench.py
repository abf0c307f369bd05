"""Speed of OmniAbnorm-CT at real size, the stock path and ours side by side in one run (SPEC §8).

    python bench/perf_bench.py --out perf.json                  # one H100: Qwen2.5-VL-7B architecture, random weights
    python bench/perf_bench.py --tiny --out perf_tiny.json      # the same code on the tiny model, on CPU
    python bench/perf_bench.py --only vision,decode --out perf.json   # some sections; other rows in perf.json stay
    python bench/perf_bench.py --no-graphs ...                   # ours without CUDA graphs of the decode step

The model is built by bench/perf_model.py (real sizes from numbers in code, random weights created on the device,
LoRA and segmentation module as the released recipe). Prints one Markdown table (ours / stock, % of the H100 limit
of SPEC §8) and writes it with the settings and the equality checks as JSON (`--out`, written atomically).

Sections, and what "stock" and "ours" are in each:

- vision: vision-tower forward on 504 × 504 images. stock: transformers' SDPA loop (one call per window per image
  per layer); ours: `model.vision_attention = "varlen"` (one packed call per layer); on CUDA the checks add ours
  with the blocks compiled (`*_ours_compiled`).
- decode: greedy tokens/s after the prefill, batch 1 and 32 (one 512² slice + the grounded instruction each).
  stock: transformers' generate() with its dynamic KV cache; ours: inference/decoding.py, a static KV cache and, on
  CUDA, the decode step replayed as a CUDA graph. The checks add batch 1 with the LoRA update merged and, on CUDA,
  with the step's decoder layers compiled as well (`DecodeSettings.compile_step`), its scores at each step compared
  with the eager run's on the eager run's tokens.
- grounded: the two-round grounded flow of inference/pipeline.py, s/case at batch 1 and cases/s batched (phantom
  DICOM-like slice folders; random weights would never emit `<SEG>`, so the replies are scripted through the real
  generate loop: round 1 `<SEG>`, round 2 a report of `report_tokens` tokens). stock: plain Generator, SDPA vision
  loop; ours: `DecodeSettings.fast()` (what `--fast` runs: the static loop, CUDA graphs on CUDA, LoRA merged, image
  features reused, varlen vision, `<SEG>` queries from the decode, second round from the first round's cache); on
  CUDA the checks add ours with the decode step and the vision blocks compiled (`*_compiled`).
- train: the released recipe (LoRA r 32 / α 16 on q/v, `<SEG>` rows, segmentation module, AdamW, clip 0.3, bf16
  autocast) on the five released tasks in turn. stock: HF style — micro-batch 1 × 4 accumulation, gradient
  checkpointing, full embedding and output head trained (as the release did), full-vocabulary logits, SDPA vision
  loop; ours: micro-batch `train_micro` (halved on out-of-memory), no checkpointing, `model.linear_ce`, varlen vision;
  then ours again with `model.packed_sequences` (padding dropped; in the checks, as `*_ours_packed`), and on CUDA
  once more with `model.compile_blocks` added (`*_ours_packed_compiled`; compilation happens in the warm-up steps).
  Model-FLOP utilisation = (6 · N_llm · LLM tokens + 2 · N_vision · image patches) / (time · 989 TFLOP/s), N_llm the
  language-model and output-head parameters without the input embedding, tokens counted without padding, the
  frozen vision tower forward only, attention and segmentation-module FLOPs not counted; 989 TFLOP/s is the H100
  SXM dense bf16 peak.
- data: CPU ms of one thread per prepared training sample (bench/data_bench.py), mean over the record tasks.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import LogitsProcessor, LogitsProcessorList

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.data_bench import time_samples
from bench.perf_model import build
from dataset.augment import SegAugment
from dataset.collate import collate
from dataset.conversation import Turn
from dataset.finish import AUGMENT_SEED, BatchFinisher, to_device
from dataset.phantom import write_phantom
from dataset.prompts import GROUNDED_REPORT_EVAL
from dataset.records import load_records
from dataset.sampler import SampleKey
from dataset.tasks import RECORD_TASKS, SampleBuilder
from dataset.vision import VisionPreprocessor
from inference.cases import Case
from inference.generate import DecodeSettings, Generator, Prompt
from inference.pipeline import OmniAbnormPipeline
from model import losses
from model.omniabnorm import (
    OmniAbnormCT,
    compile_blocks,
    lora_layers,
    set_packed_sequences,
    set_vision_attention,
    varlen_attn,
)
from training.config import RELEASED_QUOTAS
from utils.atomic import write_text_atomic

H100_BF16_FLOPS = 989e12  # dense bf16 peak of an H100 SXM
SECTIONS = ("vision", "decode", "grounded", "train", "data")


@dataclass(frozen=True)
class Row:
    what: str
    unit: str
    higher_is_better: bool
    limit: float | None = None  # one H100, SPEC §8
    target: str = "—"


ROWS = {
    "train_samples_per_s": Row("training, released recipe, samples/s/GPU", "samples/s", True, 33.0, "≥ 12"),
    "train_mfu_pct": Row("training model-FLOP utilisation", "%", True),
    "train_peak_memory_gb": Row("training peak GPU memory", "GiB", False),
    "decode_b1_tokens_per_s": Row("decode, batch 1", "tokens/s", True, 220.0, "≥ 150"),
    "decode_b32_tokens_per_s": Row("decode, batch 32", "tokens/s", True),
    "grounded_b1_s_per_case": Row("grounded report, batch 1", "s/case", False, None, "≤ 0.25"),
    "grounded_batched_cases_per_s": Row("grounded report, batched", "cases/s", True, None, "≥ 20"),
    "vision_images_per_s": Row("vision tower at 504², images/s", "images/s", True, 580.0, "≥ 150"),
    "cpu_ms_per_sample": Row("CPU per prepared training sample (1 core)", "ms", False, None, "< 20"),
}
SECTION_ROWS = {
    "train": ("train_samples_per_s", "train_mfu_pct", "train_peak_memory_gb"),
    "decode": ("decode_b1_tokens_per_s", "decode_b32_tokens_per_s"),
    "grounded": ("grounded_b1_s_per_case", "grounded_batched_cases_per_s"),
    "vision": ("vision_images_per_s",),
    "data": ("cpu_ms_per_sample",),
}


@dataclass(frozen=True)
class Scale:
    """Sizes of a run: the real one, or the tiny one that checks the code on CPU in seconds."""

    model: str  # bench/perf_model.py size: 7b | tiny
    vision_batch: int  # images per vision-tower call
    vision_iters: int
    decode_batches: tuple[int, int]
    decode_tokens: int  # new tokens per decode measurement
    grounded_batch: int
    grounded_cases: int  # timed cases at batch 1; twice grounded_batch are timed batched
    report_tokens: int  # scripted second-round reply
    train_micro: int  # ours; halved on CUDA out-of-memory
    train_steps: int  # timed optimizer steps per path
    phantom_size: int  # slice side of the phantom cases (px)
    phantom_cases: int


FULL = Scale("7b", vision_batch=32, vision_iters=5, decode_batches=(1, 32), decode_tokens=128, grounded_batch=32,
             grounded_cases=4, report_tokens=96, train_micro=8, train_steps=5, phantom_size=512, phantom_cases=16)
TINY = Scale("tiny", vision_batch=2, vision_iters=1, decode_batches=(1, 4), decode_tokens=8, grounded_batch=2,
             grounded_cases=2, report_tokens=8, train_micro=2, train_steps=1, phantom_size=64, phantom_cases=4)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------------------- vision

@contextlib.contextmanager
def trial(checks: dict, name: str):
    """An error in the body is recorded as `checks[name + "_error"]` and ends only the body: an untried combination
    (the compiled paths, measured on CUDA only) must not cost the section's other rows."""
    try:
        yield
    except Exception as err:  # noqa: BLE001 - see the docstring
        checks[f"{name}_error"] = f"{type(err).__name__}: {err}"[:2000]


@contextlib.contextmanager
def blocks_compiled(vlm, checks: dict, section: str):
    """A `trial` named `<section>_compiled` with the blocks compiled (model.omniabnorm.compile_blocks), eagerly again
    after."""
    compile_blocks(vlm)
    try:
        with trial(checks, f"{section}_compiled"):
            yield
    finally:
        compile_blocks(vlm, compiled=False)


def bench_vision(model: OmniAbnormCT, scale: Scale, device: torch.device) -> tuple[dict, dict]:
    """Images/s of the vision tower on `vision_batch` random 504² images (36 × 36 patches), both attentions."""
    vlm = model.vlm
    grid = torch.tensor([[1, 36, 36]] * scale.vision_batch, device=device)
    patch_dim = vlm.config.vision_config.in_channels * vlm.config.vision_config.temporal_patch_size * 14 * 14
    pixels = torch.randn(int(grid.prod(dim=1).sum()), patch_dim, generator=torch.Generator().manual_seed(0))
    pixels = pixels.to(device, vlm.dtype)
    def images_per_s() -> tuple[float, torch.Tensor]:
        features = torch.cat(vlm.model.get_image_features(pixels, grid).pooler_output)  # warm-up (and compiling)
        synchronize(device)
        start = time.perf_counter()
        for _ in range(scale.vision_iters):
            vlm.model.get_image_features(pixels, grid)
        synchronize(device)
        return scale.vision_batch * scale.vision_iters / (time.perf_counter() - start), features

    rates, outputs = {}, {}
    for path, attention in (("stock", "sdpa"), ("ours", "varlen")):
        set_vision_attention(vlm, attention)
        rates[path], outputs[path] = images_per_s()
    checks = {"vision_max_abs_diff": float((outputs["ours"].float() - outputs["stock"].float()).abs().max())}
    if device.type == "cuda":  # ours with the blocks compiled as well
        with blocks_compiled(vlm, checks, "vision"):
            rate, features = images_per_s()
            checks["vision_images_per_s_ours_compiled"] = rate
            checks["vision_compiled_max_abs_diff"] = float((features.float() - outputs["ours"].float()).abs().max())
    set_vision_attention(vlm, model.config.vision_attention)
    return {"vision_images_per_s": rates}, checks


# ---------------------------------------------------------------------------------------------------------- decode

class StepClock(LogitsProcessor):
    """Keeps `<|im_end|>` from ending any row, so every row decodes exactly `steps` tokens, and times the decode
    forwards between the first and the last (device synchronised there only: a sync every step would add host time
    that a real run does not spend)."""

    def __init__(self, eos_id: int, device: torch.device, steps: int):
        self.eos_id, self.device, self.steps, self.calls, self.times = eos_id, device, steps, 0, []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.calls in (1, self.steps - 1):  # call k follows decode forward k (forward 0 is the prefill)
            synchronize(self.device)
            self.times.append(time.perf_counter())
        self.calls += 1
        scores[:, self.eos_id] = -torch.inf
        return scores

    def rate(self, batch: int) -> float:
        """Tokens/s of the decode forwards 2 … steps − 1."""
        return batch * (self.steps - 2) / (self.times[-1] - self.times[0])


class ScoreLog(LogitsProcessor):
    """Keeps a copy of each step's scores as they come from the model (put it before any processor that edits them)."""

    def __init__(self):
        self.scores = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.scores.append(scores.float().clone())
        return scores


def fast_settings(graphs: bool, reuse: bool) -> DecodeSettings:
    return DecodeSettings(loop="static", cuda_graphs=graphs, reuse_image_features=reuse)


@contextlib.contextmanager
def lora_restored(model: OmniAbnormCT):
    """The body may merge the LoRA updates into the base weights (DecodeSettings.merge_lora); after it the base
    weights are the original ones again (copied back: unmerging in bf16 would not restore them exactly)."""
    lora = lora_layers(model.vlm)
    base = [layer.get_base_layer().weight.clone() for layer in lora]
    try:
        yield
    finally:
        for layer, weight in zip(lora, base):
            if layer.merged:
                layer.unmerge()
            layer.get_base_layer().weight.data.copy_(weight)


@torch.no_grad()
def bench_decode(model: OmniAbnormCT, tokenizer, image_processor, scale: Scale, device: torch.device,
                 graphs: bool, profile: Path | None = None) -> tuple[dict, dict]:
    image = np.random.default_rng(0).integers(0, 256, (512, 512, 3), dtype=np.uint8)
    rows, tokens = {}, {}
    for path, settings in (("stock", DecodeSettings()), ("ours", fast_settings(graphs, reuse=False))):
        generator = Generator(model, tokenizer, image_processor, device, settings)
        prompt = generator.encode(Prompt([Turn("user", GROUNDED_REPORT_EVAL, images=1)], [image]))
        for batch, key in zip(scale.decode_batches, ("decode_b1_tokens_per_s", "decode_b32_tokens_per_s")):
            for _ in range(2):  # the first call compiles (ours on CUDA) and allocates; the second is timed
                clock = StepClock(generator.eos_id, device, scale.decode_tokens)
                out = generator.generate([prompt] * batch, scale.decode_tokens, LogitsProcessorList([clock]))
            rows.setdefault(key, {})[path] = clock.rate(batch)
            if batch == 1:
                tokens[path] = out[0].token_ids
    checks = {"decode_greedy_tokens_equal": bool(torch.equal(tokens["stock"], tokens["ours"]))}
    if graphs:  # replaying the captured step must give what running it does
        generator = Generator(model, tokenizer, image_processor, device, fast_settings(False, reuse=False))
        clock = StepClock(generator.eos_id, device, scale.decode_tokens)
        out = generator.generate([prompt], scale.decode_tokens, LogitsProcessorList([clock]))
        checks["decode_graph_tokens_equal_no_graph"] = bool(torch.equal(out[0].token_ids, tokens["ours"]))
    def batch_1(settings: DecodeSettings, script: list[int] | None = None) -> tuple[float, torch.Tensor, torch.Tensor]:
        """Tokens/s at batch 1 (the second of two calls: the first captures and compiles), then one more call: its
        greedy tokens (`script`'s, when given) and the model's scores at each step, (T, V) fp32."""
        generator = Generator(model, tokenizer, image_processor, device, settings)
        for _ in range(2):
            clock = StepClock(generator.eos_id, device, scale.decode_tokens)
            generator.generate([prompt], scale.decode_tokens, LogitsProcessorList([clock]))
        log = ScoreLog()
        forced = [] if script is None else [Script([script], generator.eos_id)]
        out = generator.generate([prompt], scale.decode_tokens, LogitsProcessorList([log, *forced]))
        return clock.rate(1), out[0].token_ids, torch.cat(log.scores)

    with lora_restored(model):  # ours at batch 1 with the LoRA update merged into the base weights (peft's merge)
        merged = dataclasses.replace(fast_settings(graphs, reuse=False), merge_lora=True)
        checks["decode_b1_tokens_per_s_lora_merged"], merged_tokens, merged_scores = batch_1(merged)
        if device.type == "cuda":  # and with the step's decoder layers compiled, inside the graph
            with trial(checks, "decode_compiled"):
                # Fed the eager run's tokens: bf16 rounding differs in fused kernels and random weights have
                # near-ties, so free-running tokens part at the first tie; each step's scores are comparable.
                rate, _, scores = batch_1(dataclasses.replace(merged, compile_step=True),
                                          script=merged_tokens.tolist())
                steps = min(len(scores), len(merged_scores))
                scores, reference = scores[:steps], merged_scores[:steps]
                checks["decode_b1_tokens_per_s_lora_merged_compiled"] = rate
                checks["decode_compiled_max_abs_score_diff"] = float((scores - reference).abs().max())
                checks["decode_score_abs_max"] = float(reference.abs().max())
                checks["decode_compiled_top1_agreement"] = float(
                    (scores.argmax(-1) == reference.argmax(-1)).float().mean())
        if profile is not None:  # where a batch-1 step's time goes: the loop's kernels, run without graphs
            generator = Generator(model, tokenizer, image_processor, device, fast_settings(False, reuse=False))
            with profiled(device) as prof:
                generator.generate([prompt], 16, LogitsProcessorList([StepClock(generator.eos_id, device, 16)]))
            write_profile(prof, device, profile / "decode_b1_lora_merged.txt")
    return rows, checks


# -------------------------------------------------------------------------------------------------------- grounded

class Script(LogitsProcessor):
    """Forces row b to emit scripts[b], then `<|im_end|>`, through the real generate loop. The scripts are one device
    table indexed by the step number the host already knows: indexing a CUDA tensor with host indices copies them
    from pageable memory, which waits for the device every step, a wait a real run (no processor) never has."""

    def __init__(self, scripts: list[list[int]], eos_id: int):
        width = max(map(len, scripts), default=0) + 1  # every row ends in <|im_end|>
        self.table = torch.tensor([script + [eos_id] * (width - len(script)) for script in scripts])  # (B, width)
        self.start = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.start is None:
            self.start, self.table = input_ids.shape[1], self.table.to(scores.device)
        step = min(input_ids.shape[1] - self.start, self.table.shape[1] - 1)
        return torch.full_like(scores, -torch.inf).scatter_(1, self.table[:, step:step + 1], 0.0)


class ScriptedGenerator(Generator):
    """The pipeline's Generator replying `first` to one-image prompts (round 1) and `second` to two-image prompts
    (round 2, after the tool turn). `second_round_scores`: a ScoreLog that keeps the model's own scores of every
    step of the rounds that continue an earlier one."""

    def __init__(self, *args, first: list[int], second: list[int], second_round_scores: ScoreLog | None = None,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.first, self.second, self.second_round_scores = first, second, second_round_scores

    def generate(self, prompts, max_new_tokens, logits_processor=None, after=None):
        scripts = [self.first if p.image_grid_thw.shape[0] == 1 else self.second for p in prompts]
        log = [self.second_round_scores] if after is not None and self.second_round_scores is not None else []
        return super().generate(prompts, max_new_tokens, LogitsProcessorList([*log, Script(scripts, self.eos_id)]),
                                after)


def report_script(tokenizer, length: int) -> list[int]:
    """A report-like reply of exactly `length` tokens."""
    text = "Findings 1: A round hypodense lesion in the right lobe of the liver, about 12 mm, well-defined.\n"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    return (ids * (length // len(ids) + 1))[:length]


def bench_grounded(model: OmniAbnormCT, tokenizer, image_processor, scale: Scale, device: torch.device,
                   graphs: bool, phantom: Path, profile: Path | None = None) -> tuple[dict, dict]:
    folders = sorted((phantom / "images").iterdir())
    cases = [Case(str(folders[i % len(folders)]), task="grounded") for i in range(2 * scale.grounded_batch)]
    seg_id = tokenizer.convert_tokens_to_ids("<SEG>")
    script = {"first": [seg_id], "second": report_script(tokenizer, scale.report_tokens)}
    ours = dataclasses.replace(DecodeSettings.fast(), cuda_graphs=graphs)

    def pipeline(settings: DecodeSettings, batch: int, scores: ScoreLog | None = None) -> OmniAbnormPipeline:
        pipe = OmniAbnormPipeline(model, tokenizer, image_processor, device=device, batch_size=batch,
                                  max_new_tokens=scale.report_tokens + 8)
        pipe.generator = ScriptedGenerator(pipe.model, tokenizer, image_processor, device, settings, **script,
                                           second_round_scores=scores)
        return pipe

    def timed_runs(settings: DecodeSettings) -> tuple[dict, list]:
        """{row key: s/case at batch 1 | cases/s batched} and the batched run's (report, findings) per case."""
        rates = {}
        for batch, key in ((1, "grounded_b1_s_per_case"), (scale.grounded_batch, "grounded_batched_cases_per_s")):
            pipe = pipeline(settings, batch)
            timed = cases[:scale.grounded_cases] if batch == 1 else cases
            warm_up = time.perf_counter()
            pipe.run(timed[:batch])  # warm-up: compilation, allocations
            synchronize(device)
            start = time.perf_counter()
            reports = pipe.run(timed)
            elapsed = time.perf_counter() - start
            rates[key] = elapsed / len(timed) if batch == 1 else len(timed) / elapsed
            print(f"[grounded, batch {batch}: {rates[key]:.3g}, warm-up {start - warm_up:.0f} s]", flush=True)
        return rates, [(r.text, len(r.findings)) for r in reports]

    rows, texts, checks = {}, {}, {}
    with lora_restored(model):
        for path, attention, settings in (("stock", "sdpa", DecodeSettings()), ("ours", "varlen", ours)):
            set_vision_attention(model.vlm, attention)
            rates, texts[path] = timed_runs(settings)
            for key, rate in rates.items():
                rows.setdefault(key, {})[path] = rate
        if profile is not None:  # where a batched run of ours spends its time (warm: timed_runs ran it)
            with profiled_parts(model, device) as prof:
                pipeline(ours, scale.grounded_batch).run(cases[:scale.grounded_batch])
            write_profile(prof, device, profile / "grounded_batched.txt")
        with trial(checks, "grounded_continued"):  # the second round from the first round's cache vs a full prefill
            logs = {name: ScoreLog() for name in ("full", "continued")}
            for name, settings in (("full", dataclasses.replace(ours, continue_rounds=False)), ("continued", ours)):
                pipeline(settings, 2, logs[name]).run(cases[:2])
            full, continued = (torch.cat(logs[name].scores) for name in ("full", "continued"))
            checks["grounded_continued_max_abs_score_diff"] = float((continued - full).abs().max())
            checks["grounded_score_abs_max"] = float(full.abs().max())
            checks["grounded_continued_top1_agreement"] = float(
                (continued.argmax(-1) == full.argmax(-1)).float().mean())
        if device.type == "cuda":  # ours with the decode step and the vision blocks compiled as well
            with trial(checks, "grounded_compiled"):
                rates, compiled_texts = timed_runs(dataclasses.replace(ours, compile_step=True, compile_vision=True))
                checks.update({f"{key}_compiled": rate for key, rate in rates.items()})
                checks["grounded_compiled_reports_equal"] = compiled_texts == texts["ours"]
    set_vision_attention(model.vlm, model.config.vision_attention)
    return rows, {"grounded_reports_equal": texts["stock"] == texts["ours"], **checks}


# ----------------------------------------------------------------------------------------------------------- train

def training_samples(tokenizer, image_processor, model: OmniAbnormCT, phantom: Path, per_task: int) -> dict:
    """`per_task` prepared samples of each task the released recipe trains (equal quotas)."""
    builder = SampleBuilder(tokenizer, image_processor, augment=True)
    records = load_records(phantom / "merged_train.json")
    samples = {}
    for name in (name for name, quota in RELEASED_QUOTAS.items() if quota > 0 and name in RECORD_TASKS):
        task = RECORD_TASKS[name](records, builder, seed=0, train=True)
        samples[name] = [task[SampleKey(name, i % len(task), i // len(task))] for i in range(per_task)]
    return samples


def flop_counts(model: OmniAbnormCT) -> tuple[int, int]:
    """(N_llm, N_vision): language-model + output-head parameters without the input embedding; vision tower."""
    vlm = model.vlm
    embedding = vlm.get_input_embeddings()
    llm = sum(p.numel() for p in vlm.model.language_model.parameters()) - embedding.weight.numel() \
        - embedding.trainable_rows.numel() + vlm.lm_head.weight.numel()
    return llm, sum(p.numel() for p in vlm.model.visual.parameters())


def time_training(model: OmniAbnormCT, groups: list[list[dict]], warmup: int, device: torch.device,
                  finisher: BatchFinisher, label: str) -> dict:
    """Optimizer steps over `groups` (each: its collated micro-batches, gradients accumulated), the first `warmup`
    untimed (one per task, so no timed step is the first with its shapes). Each step finishes its batches on the
    device (pixel values, augmentation), as training/loop.py does. Token counts are read before the clock starts: a
    host read inside the loop would make the CPU wait for every micro-batch.
    → samples/s, MFU % (CUDA), peak memory GiB (CUDA), % of the LLM's token slots that are padding."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-4)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else \
        contextlib.nullcontext
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    n_llm, n_vision = flop_counts(model)
    timed = [batch for group in groups[warmup:] for batch in group]
    samples = sum(batch["input_ids"].shape[0] for batch in timed)
    tokens = sum(int(batch["attention_mask"].sum()) for batch in timed)
    slots = sum(batch["attention_mask"].numel() for batch in timed)
    flops = 6 * n_llm * tokens + 2 * n_vision * sum(int(batch["image_grid_thw"].prod(dim=1).sum()) for batch in timed)
    for step, group in enumerate(groups):
        if step == warmup:
            synchronize(device)
            start = time.perf_counter()
        for batch in group:
            with autocast():
                out = model(**finisher(batch, device))
            (out.loss / len(group)).backward()
        torch.nn.utils.clip_grad_norm_(params, 0.3)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    synchronize(device)
    elapsed = time.perf_counter() - start
    cuda = device.type == "cuda"
    result = {"samples_per_s": samples / elapsed,
              "mfu_pct": 100 * flops / elapsed / H100_BF16_FLOPS if cuda else None,
              "peak_gb": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None,
              "padding_pct": 100 * (1 - tokens / slots)}
    print(f"[train, {label}: {result}]", flush=True)  # the section's JSON is written at its end; a run cut short keeps this
    return result


def profiled(device: torch.device):
    from torch.profiler import ProfilerActivity, profile
    return profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else []))


def write_profile(prof, device: torch.device, path: Path) -> None:
    """Ops and kernels by GPU time (CPU time on CPU), 45 rows → `path`, and printed."""
    sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=45, max_name_column_width=70)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(table)
    print(table, flush=True)


@contextlib.contextmanager
def profiled_parts(model: OmniAbnormCT, device: torch.device):
    """torch.profiler over the body (synchronised at its end), each forward of the vision tower, language model and
    segmentation module a named range `forward/<part>` (a backward runs on autograd's own thread, and a CUDA graph's
    replay calls no module, so their kernels show in the list but not under a range). Yields the profile."""
    from torch.profiler import record_function

    vlm = model.vlm
    parts = {"vision_tower": vlm.model.visual, "language_model": vlm.model.language_model,
             "seg_module": model.seg_module}
    ranges = {}
    hooks = [m.register_forward_pre_hook(lambda _m, _a, n=name: ranges.setdefault(n, []).append(
        record_function(f"forward/{n}").__enter__())) for name, m in parts.items()]
    hooks += [m.register_forward_hook(lambda _m, _a, _o, n=name: ranges[n].pop().__exit__(None, None, None))
              for name, m in parts.items()]
    try:
        with profiled(device) as prof:
            yield prof
            synchronize(device)
    finally:
        for hook in hooks:
            hook.remove()


def profile_training(model: OmniAbnormCT, groups: list[list[dict]], device: torch.device, finisher: BatchFinisher,
                     path: Path) -> None:
    """Forward and backward of `groups` (one per task) under `profiled_parts` → `path`."""
    from torch.profiler import record_function

    params = [p for p in model.parameters() if p.requires_grad]
    with profiled_parts(model, device) as prof:
        for batch in (batch for group in groups for batch in group):
            with record_function("finish_batch"):
                batch = finisher(batch, device)
            with record_function("forward"), (torch.autocast("cuda", dtype=torch.bfloat16)
                                              if device.type == "cuda" else contextlib.nullcontext()):
                out = model(**batch)
            with record_function("backward"):
                out.loss.backward()
            with record_function("clip_and_zero"):
                torch.nn.utils.clip_grad_norm_(params, 0.3)
                model.zero_grad(set_to_none=True)
    write_profile(prof, device, path)


def batches(samples: dict, micro: int, steps: int, accumulation: int, pad_id: int, device: torch.device) -> list:
    """`steps` optimizer-step groups of `accumulation` collated micro-batches of `micro` samples, tasks in turn,
    already on the device (the augmentation seeds stay on the host, where the finisher reads them)."""
    names = list(samples)
    groups = []
    for step in range(steps):
        pool = samples[names[step % len(names)]]
        groups.append([{k: v if k == AUGMENT_SEED else to_device(v, device)
                        for k, v in collate(pool[:micro], pad_id).items()}
                       for _ in range(accumulation)])
    return groups


def bench_train(model: OmniAbnormCT, tokenizer, image_processor, scale: Scale, device: torch.device,
                phantom: Path, profile: Path | None = None) -> tuple[dict, dict]:
    """Ours first, then stock (which turns on checkpointing and full embedding/head training for good)."""
    vlm = model.vlm
    model.train()
    for p in model.parameters():
        if p.requires_grad:  # fp32 master weights, as training/loop.py keeps them
            p.data = p.data.float()
    samples = training_samples(tokenizer, image_processor, model, phantom, scale.train_micro)
    finisher = BatchFinisher(VisionPreprocessor(image_processor), SegAugment(), model.config.seg.image_size)
    pad = tokenizer.pad_token_id
    model.config.linear_ce = True
    set_vision_attention(vlm, "varlen")
    micro = scale.train_micro
    warmup = len(samples)  # one step of each task before the clock starts
    while True:
        try:
            ours = time_training(model, batches(samples, micro, warmup + scale.train_steps, 1, pad, device), warmup,
                                 device, finisher, "ours")
            break
        except torch.OutOfMemoryError:
            if micro == 1:
                raise
            micro //= 2
            model.zero_grad(set_to_none=True)
    if profile is not None:
        profile_training(model, batches(samples, micro, warmup, 1, pad, device), device, finisher,
                         profile / "train_steps.txt")
    set_packed_sequences(model, True)
    packed = time_training(model, batches(samples, micro, warmup + scale.train_steps, 1, pad, device), warmup,
                           device, finisher, "ours packed")
    checks = {"train_micro_batch_ours": micro, "liger_kernel": losses.LigerFusedLinearCrossEntropyLoss is not None,
              "train_samples_per_s_ours_packed": packed["samples_per_s"], "train_mfu_pct_ours_packed": packed["mfu_pct"]}
    if device.type == "cuda":  # inductor's CPU code says nothing about the GPU, and compiling costs the CI minutes
        with blocks_compiled(vlm, checks, "train"):
            compiled = time_training(model, batches(samples, micro, warmup + scale.train_steps, 1, pad, device),
                                     warmup, device, finisher, "ours packed, blocks compiled")
            checks["train_samples_per_s_ours_packed_compiled"] = compiled["samples_per_s"]
            checks["train_mfu_pct_ours_packed_compiled"] = compiled["mfu_pct"]
        model.zero_grad(set_to_none=True)  # a failed step may have left gradients
    # One batch: the loss of the packed row against the padded batch, and the CE of the fast path (Liger on CUDA
    # when installed) against full logits.
    batch = finisher(batches(samples, micro, 1, 1, pad, device)[0][0], device)
    with torch.no_grad(), (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                           else contextlib.nullcontext()):
        model.eval()
        packed_loss = model(**batch).loss
        set_packed_sequences(model, False)
        fast = model(**batch)
        model.config.linear_ce = False
        plain = model(**batch).ce_loss
        model.train()
    checks["packed_loss_abs_diff"] = float((packed_loss - fast.loss).abs())
    checks["linear_ce_abs_diff"] = float((fast.ce_loss - plain).abs())

    set_vision_attention(vlm, "sdpa")
    vlm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for layer in (vlm.get_input_embeddings(), vlm.get_output_embeddings()):
        layer.weight.data = layer.weight.data.float()
        layer.weight.requires_grad_(True)
    stock = time_training(model, batches(samples, 1, warmup + scale.train_steps, 4, pad, device), warmup, device,
                          finisher, "stock")
    checks["train_padding_pct_ours"] = ours["padding_pct"]  # token slots the packed run does not spend
    rows = {"train_samples_per_s": {"stock": stock["samples_per_s"], "ours": ours["samples_per_s"]},
            "train_mfu_pct": {"stock": stock["mfu_pct"], "ours": ours["mfu_pct"]},
            "train_peak_memory_gb": {"stock": stock["peak_gb"], "ours": ours["peak_gb"]}}
    return rows, checks


# ------------------------------------------------------------------------------------------------------------ data

def bench_data(scale: Scale, model: OmniAbnormCT) -> tuple[dict, dict]:
    cfg = model.config
    per_task = time_samples(n=scale.phantom_cases, size=scale.phantom_size, repeats=1, seg_size=cfg.seg.image_size,
                            image_pixels=cfg.image_pixels)
    prepare = {name: ms["prepare"] for name, ms in per_task.items()}
    finish = {name: ms["finish"] for name, ms in per_task.items()}
    return {"cpu_ms_per_sample": {"stock": None, "ours": float(np.mean(list(prepare.values())))}}, \
        {"cpu_ms_per_sample_by_task": prepare, "cpu_ms_finish_on_cpu_by_task": finish}


# ----------------------------------------------------------------------------------------------------------- table

def complete(rows: dict) -> dict:
    """Measured {stock, ours} per row → with ratio ours / stock and % of the H100 limit."""
    out = {}
    for key, values in rows.items():
        row = ROWS[key]
        stock, ours = values.get("stock"), values.get("ours")
        out[key] = {**dataclasses.asdict(row), "stock": stock, "ours": ours,
                    "ratio": ours / stock if stock and ours is not None else None,
                    "pct_of_limit": 100 * ours / row.limit if row.limit and ours is not None else None}
    return out


def markdown_table(rows: dict) -> str:
    def fmt(value, digits: int = 3) -> str:
        return "—" if value is None else f"{value:.{digits}g}"

    lines = ["| what | unit | stock | ours | ours / stock | % of H100 limit | target |", "|---|---|---|---|---|---|---|"]
    for key in ROWS:
        if key in rows:
            r = rows[key]
            better = "" if r["ratio"] is None else (" (higher is better)" if r["higher_is_better"] else
                                                    " (lower is better)")
            lines.append(f"| {r['what']} | {r['unit']} | {fmt(r['stock'])} | {fmt(r['ours'])} | "
                         f"{fmt(r['ratio'])}{better} | {fmt(r['pct_of_limit'])} | {r['target']} |")
    return "\n".join(lines)


def run(scale: Scale, sections: tuple[str, ...], device: torch.device, work: Path, graphs: bool,
        on_section=lambda rows, checks: None, profile: Path | None = None) -> tuple[dict, dict]:
    """→ (rows: {key: {stock, ours}}, checks). `on_section(rows, checks)` is called after each section, so a run
    stopped at a time limit keeps what it measured."""
    model, tokenizer, image_processor, _ = build(scale.model, work, device)
    model.eval()  # inference sections first; the train section switches to training mode
    phantom = write_phantom(work / "phantom", n=scale.phantom_cases, seed=0, size=scale.phantom_size) \
        if {"grounded", "train"} & set(sections) else None
    rows, checks = {}, {}
    steps = {  # train last: it changes the model (fp32 trained tensors, checkpointing, trained full head)
        "vision": lambda: bench_vision(model, scale, device),
        "decode": lambda: bench_decode(model, tokenizer, image_processor, scale, device, graphs, profile),
        "grounded": lambda: bench_grounded(model, tokenizer, image_processor, scale, device, graphs,
                                           phantom, profile),
        "data": lambda: bench_data(scale, model),
        "train": lambda: bench_train(model, tokenizer, image_processor, scale, device, phantom, profile),
    }
    for name, step in steps.items():
        if name in sections:
            start = time.perf_counter()
            try:
                section_rows, section_checks = step()
            except Exception as error:  # noqa: BLE001 - one failing section must not lose the others' figures
                traceback.print_exc()
                section_rows, section_checks = {}, {f"{name}_error": f"{type(error).__name__}: {error}"}
            rows.update(section_rows)
            checks.update(section_checks)
            print(f"[{name}: {time.perf_counter() - start:.0f} s]", flush=True)
            on_section(rows, checks)
    return rows, checks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny model on CPU (checks the code, not the speed)")
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections: {', '.join(SECTIONS)}")
    parser.add_argument("--out", type=Path, help="JSON result; rows of earlier runs in it are kept unless re-measured")
    parser.add_argument("--device", help="default: cuda when available, else cpu")
    parser.add_argument("--no-graphs", action="store_true", help="ours without CUDA graphs of the decode step")
    parser.add_argument("--grounded-batch", type=int, metavar="N",
                        help="cases per batch of the batched grounded row (default: 32; 2 with --tiny)")
    parser.add_argument("--profile", type=Path, metavar="DIR",
                        help="also profile ours (torch.profiler tables in DIR): one training step per task, 16 "
                             "decode steps at batch 1, and one batch of the grounded flow")
    args = parser.parse_args(argv)
    sections = tuple(s.strip() for s in args.only.split(",") if s.strip())
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown section(s) {', '.join(sorted(unknown))}; known: {', '.join(SECTIONS)}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.tiny else "cpu"))
    scale = TINY if args.tiny else FULL
    if args.grounded_batch is not None:
        if args.grounded_batch < 1:
            parser.error(f"--grounded-batch must be at least 1, got {args.grounded_batch}")
        scale = dataclasses.replace(scale, grounded_batch=args.grounded_batch)
    graphs = device.type == "cuda" and not args.no_graphs
    previous = json.loads(args.out.read_text()) if args.out is not None and args.out.is_file() else {}
    if previous.get("meta", {}).get("scale") not in (None, scale.model):
        previous = {}  # a tiny run never mixes with a real one
    meta = {"scale": scale.model, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else
            f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} logical cores",
            "torch": torch.__version__, "transformers": transformers.__version__,
            "varlen_attn": varlen_attn is not None, "graphs": graphs,
            "sizes": dataclasses.asdict(scale)}

    def result(measured: dict, checks: dict) -> dict:
        rows = {**previous.get("rows", {}), **complete(measured)}
        return {"meta": meta, "rows": rows, "checks": {**previous.get("checks", {}), **checks},
                "table": markdown_table(rows)}

    def save(measured: dict, checks: dict) -> None:
        if args.out is not None:
            write_text_atomic(args.out, json.dumps(result(measured, checks), indent=1))

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        final = result(*run(scale, sections, device, Path(tmp), graphs, on_section=save,
                         profile=args.profile))
    print(f"\n{meta['device']}; {scale.model} model; decode batches {scale.decode_batches}, "
          f"grounded batch {scale.grounded_batch}, vision batch {scale.vision_batch}\n")
    print(final["table"])
    print("\nchecks: " + json.dumps(final["checks"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
