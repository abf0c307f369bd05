"""The Python API: load a checkpoint once, run any number of cases in batches.

    from inference.pipeline import OmniAbnormPipeline
    from inference.cases import Case
    pipe = OmniAbnormPipeline.from_checkpoint("checkpoint/omniabnorm-ct-7b", base_model="Qwen2.5-VL-7B-Instruct")
    reports = pipe.run([Case("ct/series01", task="grounded"), Case("slice.png", box=(120, 80, 180, 140))])
    reports[0].text, reports[0].findings[0].box_xyxy, reports[0].write("out/series01")

Flows (the conversations of dataset/tasks.py, built the same way):
- grounded, union (the released two-round flow): instruction → `<SEG>`; the mask's components become findings and
  their boxes are drawn in red on the key slice for a tool turn; the second round writes `Findings 1: …`.
- grounded, per_finding: one round, `Findings k: <text> <SEG>` per finding; finding k gets the mask of the k-th
  `<SEG>` and its own text.
- text_guided: question → `<SEG>` → tool turn with boxes → answer (or a refusal); one finding, the whole mask.
- visual_prompt and vqa: one round, no segmentation.
A two-round flow whose first round emits no `<SEG>` keeps that round's text as the answer, without a mask.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError

from dataset.conversation import Turn
from dataset.ct import gray_rgb
from dataset.prompts import NO_ABNORMALITY, NO_RELEVANT_ABNORMALITY
from dataset.visual_prompt import draw_boxes, mask_box
from inference.cases import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_MAX_NEW_TOKENS,
    SEGMENTING_TASKS,
    Case,
    PreparedCase,
    case_ids,
    check_case,
    prepare,
)
from inference.generate import DecodeSettings, Generated, Generator, Prompt
from inference.report import FindingResult, Report, measure
from model.checkpoint import CheckpointError, load_checkpoint, load_released
from model.config import SEG_TOKEN, ConfigError, ModelConfig
from model.omniabnorm import OmniAbnormCT
from postprocess.findings import mask_to_findings

REFUSALS = (NO_ABNORMALITY, NO_RELEVANT_ABNORMALITY)
CPU_WORKERS = min(8, os.cpu_count() or 1)  # threads reading cases and preprocessing images
_SEG_MARK = re.compile(r" ?" + re.escape(SEG_TOKEN))
_FINDINGS_PREFIX = re.compile(r"^Findings\s*\d+\s*:\s*")


class OmniAbnormPipeline:
    def __init__(self, model: OmniAbnormCT, tokenizer, image_processor, identity: dict | None = None,
                 device: str | torch.device | None = None, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                 batch_size: int = DEFAULT_BATCH_SIZE, decode: DecodeSettings | None = None):
        if max_new_tokens < 1 or batch_size < 1:
            raise ValueError(f"max_new_tokens ({max_new_tokens}) and batch_size ({batch_size}) must be at least 1")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.eval().to(self.device)
        self.tokenizer = tokenizer
        self.generator = Generator(self.model, tokenizer, image_processor, self.device, decode)
        self.identity = {"checkpoint": None, "layout": None, "checkpoint_sha256": None, "base_model": None,
                         **(identity or {}), "dtype": str(model.vlm.dtype).removeprefix("torch.")}
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        seg = model.config.seg
        self.seg_size, self.seg_slices = seg.image_size, seg.in_slices

    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path, base_model: str | Path | None = None, **kwargs
                        ) -> OmniAbnormPipeline:
        """Our format (`omniabnorm.json`) or the released layout (`adapter_config.json`; needs the base model).

        The base model is `base_model` when given, else a `base_model/` folder inside the checkpoint, else (our
        format) the folder the checkpoint records. Problems raise CheckpointError with one clear message.
        """
        ckpt = Path(checkpoint)
        if not ckpt.is_dir():
            raise CheckpointError(f"checkpoint folder {ckpt} does not exist")
        bundled = ckpt / "base_model"
        base = Path(base_model) if base_model is not None else bundled if bundled.is_dir() else None
        if base is not None and not (base / "config.json").is_file():
            raise CheckpointError(f"base model folder {base} has no config.json: give a local Qwen2.5-VL folder in "
                                  f"Hugging Face format")
        try:
            if (ckpt / "omniabnorm.json").is_file():
                layout = "omniabnorm"
                model, tokenizer, image_processor = load_checkpoint(ckpt, base)
                base = base or Path(model.config.base_model)
            elif (ckpt / "adapter_config.json").is_file():
                layout = "released"
                if base is None:
                    raise CheckpointError(f"{ckpt} is the released layout: it needs --base-model DIR, a local "
                                          f"Qwen2.5-VL-7B-Instruct folder")
                model, tokenizer, image_processor = load_released(
                    ModelConfig(base_model=str(base), released_checkpoint=str(ckpt)))
            else:
                raise CheckpointError(f"{ckpt} is not an OmniAbnorm-CT checkpoint: it holds neither omniabnorm.json "
                                      f"(our format) nor adapter_config.json (the released layout)")
        except CheckpointError:
            raise
        except (RuntimeError, ConfigError, OSError, json.JSONDecodeError, SafetensorError, KeyError) as err:
            # e.g. torch's "size mismatch for …" when stored tensors do not fit the configured model: one line
            lines = [line.strip() for line in str(err).splitlines() if line.strip()]
            detail = "; ".join(lines[:3]) + (f"; … ({len(lines) - 3} more)" if len(lines) > 3 else "")
            raise CheckpointError(f"cannot load checkpoint {ckpt}: {detail}") from None
        identity = {"checkpoint": str(ckpt), "layout": layout, "checkpoint_sha256": folder_sha256(ckpt),
                    "base_model": str(base)}
        return cls(model, tokenizer, image_processor, identity, **kwargs)

    # ------------------------------------------------------------------------------------------------------------

    def run(self, cases: Sequence[Case | str | Path], ids: Sequence[str] | None = None) -> list[Report]:
        """Run every case (in batches of `batch_size`, in order) → one Report each. Every case is checked before
        the first one runs; an input problem raises InputError naming it."""
        return list(self.iter_run(cases, ids))

    def iter_run(self, cases: Sequence[Case | str | Path], ids: Sequence[str] | None = None) -> Iterator[Report]:
        """`run`, yielding each batch's reports as soon as the batch is done.

        Reading and preparing cases (CPU) runs on `CPU_WORKERS` threads, one batch ahead: while the GPU works on a
        batch, the next batch's cases are read. Image preprocessing of each round's prompts uses the same threads.
        """
        cases = [c if isinstance(c, Case) else Case(input=str(c)) for c in cases]
        for case in cases:
            check_case(case)
        ids = list(ids) if ids is not None else case_ids(cases)
        if len(ids) != len(cases):
            raise ValueError(f"{len(ids)} ids for {len(cases)} cases")
        with ThreadPoolExecutor(CPU_WORKERS) as pool:
            def read(start: int) -> list[Future]:  # an empty list past the end
                return [pool.submit(prepare, case, self.seg_size, self.seg_slices)
                        for case in cases[start:start + self.batch_size]]

            pending = read(0)
            for start in range(0, len(cases), self.batch_size):
                began = time.perf_counter()
                prepared = [future.result() for future in pending]
                pending = read(start + self.batch_size)
                yield from self.run_batch(prepared, ids[start:start + self.batch_size], pool, began)

    def run_batch(self, prepared: Sequence[PreparedCase], ids: Sequence[str], pool: Executor, began: float
                  ) -> list[Report]:
        """One generation batch of prepared cases: round 1 for all, segmentation for rows that emitted `<SEG>`,
        round 2 for the two-round flows. `began`: when the batch started (its reports' batch_seconds count from
        there)."""
        first = self.generator.generate(
            self.generator.encode_all([Prompt([Turn("user", p.instruction, images=1)], [p.vlm_image])
                                       for p in prepared], pool),
            self.max_new_tokens)

        seg_rows = [i for i, p in enumerate(prepared)
                    if p.task in SEGMENTING_TASKS and (first[i].token_ids == self.model.seg_token_id).any()]
        probs: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # row → (N, size, size) probabilities, (N,) p(<SEG>)
        if seg_rows:
            queries, query_mask, seg_p = self.generator.seg_queries([first[i] for i in seg_rows])
            maps = self.generator.segment([prepared[i].seg_slices for i in seg_rows], queries, query_mask)
            counts, seg_p = query_mask.sum(dim=1).tolist(), seg_p.cpu().numpy()
            for j, i in enumerate(seg_rows):
                probs[i] = maps[j, :counts[j]], seg_p[j, :counts[j]]

        findings: dict[int, list[FindingResult]] = {}
        second_rows, second_prompts = [], []
        for i, p in enumerate(prepared):
            if i not in probs:
                findings[i] = []
                continue
            maps, seg_p = probs[i]
            if p.task == "grounded" and p.case.flow == "per_finding":  # one finding per <SEG>, empty ones kept
                texts = per_finding_texts(first[i].text)
                findings[i] = [self._finding(p, mask_to_findings(maps[k]), maps[k], float(seg_p[k]), k + 1,
                                             texts[k] if k < len(texts) else None) for k in range(len(maps))]
                continue
            # Two-round flows: one mask (several <SEG> are not trained for; their maps are merged by maximum).
            union, p_seg = maps.max(axis=0), float(seg_p.max())
            components = mask_to_findings(union)
            if p.task == "grounded":  # union flow: each component is a finding
                candidates = [self._finding(p, [c], union, p_seg, 1, None) for c in components]
            else:  # text_guided: the whole mask is the finding asked about
                candidates = [self._finding(p, components, union, p_seg, 1, None)]
            findings[i] = [f for f in candidates if f.mask is not None]
            tool_image = draw_boxes(p.key_rgb, [box for f in findings[i] for box in f.component_boxes_xyxy])
            turns = [Turn("user", p.instruction, images=1), Turn("assistant", first[i].text),
                     Turn("tool", "", images=1)]
            second_rows.append(i)
            second_prompts.append(Prompt(turns, [p.vlm_image, tool_image]))
        second = {}
        if second_prompts:  # each continues its first round (with --fast from that round's KV cache)
            replies = self.generator.generate(self.generator.encode_all(second_prompts, pool), self.max_new_tokens,
                                              after=[first[i] for i in second_rows])
            second = dict(zip(second_rows, replies))

        elapsed = time.perf_counter() - began
        timing = {"batch_cases": len(prepared), "batch_seconds": round(elapsed, 4), "device": str(self.device)}
        return [self._report(p, case_id, first[i], second.get(i), findings[i], timing)
                for i, (p, case_id) in enumerate(zip(prepared, ids))]

    # ------------------------------------------------------------------------------------------------------------

    @staticmethod
    def _finding(p: PreparedCase, components: list, prob: np.ndarray, seg_p: float, seg_index: int,
                 text: str | None) -> FindingResult:
        """A finding made of post-processed components (segmentation space) of one probability map, mapped onto
        the original slice. Components smaller than one original pixel vanish; with none left, the finding has no
        mask (and no geometry)."""
        mapped = [(c.mask, p.geometry.to_original(c.mask[None], binary=True)[0].astype(bool)) for c in components]
        mapped = [(model_mask, mask) for model_mask, mask in mapped if mask.any()]
        if not mapped:
            return FindingResult(0, text, None, None, [], None, seg_p, seg_index)
        mask = np.logical_or.reduce([m for _, m in mapped])
        model_mask = np.logical_or.reduce([m for m, _ in mapped])
        return FindingResult(0, text, mask, mask_box(mask), [mask_box(m) for _, m in mapped],
                             float(prob[model_mask].mean()), seg_p, seg_index,
                             measure(mask, p.pixel_spacing_mm, p.key_hu))

    def _report(self, p: PreparedCase, case_id: str, first: Generated, second: Generated | None,
                findings: list[FindingResult], timing: dict) -> Report:
        final = second or first
        text = "\n".join(line.rstrip() for line in _SEG_MARK.sub("", final.text).strip().splitlines())
        refusal = text.strip() in REFUSALS
        for k, f in enumerate(findings, start=1):  # numbered in report order
            f.id = k
            if p.task == "text_guided" and not refusal:  # the answer describes the finding asked about
                f.text = text
        rounds = [{"output": g.text, "finished": g.finished} for g in (first, second) if g is not None]
        seg_channels = p.seg_slice_indices or None
        preprocessing = {
            "window": {"name": p.window[0], "level": p.window[1], "width": p.window[2]} if p.window else None,
            "vlm_image_size": [int(p.vlm_image.shape[0]), int(p.vlm_image.shape[1])],
            "vlm_image": "stretched" if p.task in SEGMENTING_TASKS else "as_displayed",
            "seg_input_size": self.seg_size if p.seg_slices is not None else None,
            "seg_slice_indices": seg_channels,
        }
        generation = {"decoding": "greedy", "max_new_tokens": self.max_new_tokens,
                      "finished": all(r["finished"] for r in rounds), "seg_tokens": sum(
                          int((g.token_ids == self.model.seg_token_id).sum()) for g in (first, second) if g)}
        overlay_base = p.vlm_image if p.task == "visual_prompt" else gray_rgb(p.display)
        return Report(case_id, p.task, p.case.flow if p.task == "grounded" else None, p.instruction,
                      p.case.prompt, p.visual_prompt, text, refusal, rounds,
                      findings, p.stack_info, preprocessing, dict(self.identity), generation, timing, overlay_base)


def per_finding_texts(raw: str) -> list[str | None]:
    """Per-finding output `Findings 1: <text> <SEG>\\nFindings 2: …` → the text before each `<SEG>`, without the
    `Findings k:` prefix (None when empty)."""
    pieces = raw.split(SEG_TOKEN)[:-1]
    return [_FINDINGS_PREFIX.sub("", piece.strip()).strip() or None for piece in pieces]


def folder_sha256(folder: Path) -> str:
    """SHA-256 over every file of a checkpoint folder (relative path and content digest, in path order), except a
    bundled `base_model/` (identified by its own path in the report)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        relative = path.relative_to(folder)
        if relative.parts[0] == "base_model":
            continue
        with path.open("rb") as file:
            digest.update(f"{relative.as_posix()}\0{hashlib.file_digest(file, 'sha256').hexdigest()}\n".encode())
    return digest.hexdigest()
