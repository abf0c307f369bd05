"""Benchmark items from the validation files, and resumable prediction into a per-sample JSONL file.

Items (one model call each) from `<root>/<plane>/<plane>_valid.json`:
- visual_prompt: every abnormality × prompt type (bbox, ellipse, contour, cropped), the pre-rendered image
  `visual_instruction/<type>_<id>.png` as input; reference = the abnormality's description.
- grounded: every sample (normal ones too); reference = `Findings k: <group description>` lines, or the refusal.
- text_guided: per group its first referring question (positive; reference = the group description, mask = the
  group's union) and per abnormal sample the first negative question (reference = the refusal, empty mask).

`predictions.jsonl` gets one line per item as soon as its batch is done; a rerun skips the items already there and
drops a truncated last line left by a crash. `predictions.meta.json` records the checkpoint, so a rerun with another
one is refused instead of mixing models in one file.

Sharded over N processes (torchrun): the items not yet in `predictions.jsonl` are dealt round-robin, rank r taking
the r-th, (r + N)-th, … of them, and each rank appends to its own `predictions.rank<r>of<N>.jsonl` the same way
(resumable, torn last line cut off). After a barrier rank 0 folds the shards into `predictions.jsonl` in item order
(written atomically, then the shards are deleted): the same lines in the same order as one process writes. Rank 0
also folds leftover shards of a crashed run (any N) before predicting, so a restart skips what any rank had written.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm import tqdm

from dataset.ct import InputError
from dataset.prompts import NO_ABNORMALITY, NO_RELEVANT_ABNORMALITY
from dataset.records import Record, load_records
from dataset.visual_prompt import PROMPT_KINDS
from inference.cases import Case
from inference.report import mask_rle
from utils.atomic import write_text_atomic

BENCHMARKS = ("visual_prompt", "grounded", "text_guided")
PLANES = ("axial", "coronal", "sagittal")
PREDICTIONS = "predictions.jsonl"


@dataclass
class Item:
    key: str  # unique within a run: task/plane/sample/unit
    task: str
    plane: str
    sample_id: str
    abn_ids: list[int]  # the abnormalities the item is about (all of the sample for grounded)
    reference: str
    categories: list[list[str]]  # taxonomy path of each abnormality in abn_ids
    prompt_type: str | None = None  # visual_prompt: bbox | ellipse | contour | cropped
    polarity: str | None = None  # text_guided: positive | negative
    question: str | None = None
    case: dict = field(default_factory=dict)  # the inference Case's fields


def annotation_files(data_root: Path, planes: Sequence[str] = PLANES) -> dict[str, Path]:
    """plane → `<root>/<plane>/<plane>_valid.json` for the planes that have one; InputError when none does."""
    files = {p: data_root / p / f"{p}_valid.json" for p in planes}
    files = {p: f for p, f in files.items() if f.is_file()}
    if not files:
        raise InputError(f"no validation file under {data_root}: expected <plane>/<plane>_valid.json for a plane of "
                         f"{', '.join(planes)} (the OmniAbnorm-CT-14K layout, or python -m dataset.phantom output)")
    return files


def build_items(records: Sequence[Record], plane: str, tasks: Sequence[str] = BENCHMARKS,
                types: Sequence[str] = PROMPT_KINDS, flow: str = "union") -> list[Item]:
    items = []
    for r in records:
        groups = r.groups()
        base = dict(plane=plane, sample_id=r.sample_id)
        folder = dict(input=str(r.image_dir), naming="offset")
        if "visual_prompt" in tasks:
            for a in r.abnormalities:
                for kind in types:
                    image = r.image_dir / "visual_instruction" / f"{kind}_{a.id}.png"
                    items.append(Item(f"visual_prompt/{plane}/{r.sample_id}/{a.id}/{kind}", "visual_prompt",
                                      abn_ids=[a.id], reference=a.description, categories=[a.category],
                                      prompt_type=kind, case=dict(input=str(image), task="visual_prompt", mark=kind),
                                      **base))
        if "grounded" in tasks:
            reference = "\n".join(f"Findings {k}: {g.description}" for k, g in enumerate(groups, 1)) or NO_ABNORMALITY
            items.append(Item(f"grounded/{plane}/{r.sample_id}", "grounded", abn_ids=[a.id for a in r.abnormalities],
                              reference=reference, categories=[a.category for a in r.abnormalities],
                              case=dict(task="grounded", flow=flow, **folder), **base))
        if "text_guided" in tasks:
            for g in groups:
                questions = [q for a in g.members for q in a.referring_prompts]
                if questions:
                    items.append(Item(f"text_guided/{plane}/{r.sample_id}/g{g.id}", "text_guided", abn_ids=g.ids,
                                      reference=g.description, categories=[a.category for a in g.members],
                                      polarity="positive", question=questions[0],
                                      case=dict(task="text_guided", prompt=questions[0], **folder), **base))
            negatives = [q for a in r.abnormalities for q in a.negative_prompts]
            if negatives:
                items.append(Item(f"text_guided/{plane}/{r.sample_id}/neg", "text_guided", abn_ids=[],
                                  reference=NO_RELEVANT_ABNORMALITY, categories=[], polarity="negative",
                                  question=negatives[0], case=dict(task="text_guided", prompt=negatives[0], **folder),
                                  **base))
    return items


def read_done(path: Path) -> dict[str, dict]:
    """key → prediction line of a predictions file; a truncated last line (crash mid-write) is cut off the file.
    A damaged line before the last one means the file was edited or mixed: InputError."""
    if not path.is_file():
        return {}
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    done: dict[str, dict] = {}
    good_bytes = 0
    for i, line in enumerate(lines):
        if not line.strip():
            good_bytes += len(line) + 1
            continue
        try:
            entry = json.loads(line)
            done[entry["key"]] = entry
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
            if i == len(lines) - 1:  # the last line, without its newline: a write cut short
                with path.open("r+b") as file:
                    file.truncate(good_bytes)
                break
            raise InputError(f"{path} line {i + 1} is not a prediction (damaged file); delete it or its bad "
                             f"lines and rerun to predict the missing items again") from None
        good_bytes += len(line) + 1
    return done


def check_meta(out: Path, meta: dict) -> None:
    """Write `predictions.meta.json` (atomically) or check a resumed run matches it."""
    path = out / "predictions.meta.json"
    if path.is_file():
        old = json.loads(path.read_text(encoding="utf-8"))
        changed = [k for k in meta if old.get(k) != meta[k]]
        if changed:
            raise InputError(f"{out} holds predictions of another run ({', '.join(changed)} differ: "
                             f"{[old.get(k) for k in changed]} vs {[meta[k] for k in changed]}); use another OUT "
                             f"folder or delete {path.parent / PREDICTIONS} to start over")
        return
    write_text_atomic(path, json.dumps(meta, indent=1) + "\n")


def prediction_line(item: Item, report) -> dict:
    """What scoring needs of one report: the text, refusal, `<SEG>` count and the masks (RLE, key-slice grid)."""
    masks = [f.mask for f in report.findings if f.mask is not None]
    union = None
    if masks:
        union = masks[0].copy()
        for m in masks[1:]:
            union |= m
    return {**asdict(item), "text": report.text, "refusal": report.refusal,
            "seg_tokens": report.generation["seg_tokens"], "flow": report.flow,
            "mask_rle": mask_rle(union) if union is not None else None,
            "finding_masks_rle": [mask_rle(f.mask) if f.mask is not None else None for f in report.findings],
            "finding_texts": [f.text for f in report.findings],
            "seconds": report.timing["batch_seconds"] / report.timing["batch_cases"]}


def shard_path(out: Path, rank: int, world_size: int) -> Path:
    """The predictions file rank `rank` of a `world_size`-process run appends to."""
    return out / f"predictions.rank{rank}of{world_size}.jsonl"


def pending(items: Sequence[Item], out: Path, rank: int = 0, world_size: int = 1) -> tuple[Path, list[Item]]:
    """(the file this rank appends to, the items it still has to predict, in item order).

    One process: `predictions.jsonl` and the items not in it. Rank r of N: every N-th item from the r-th among those
    not in `predictions.jsonl` (all ranks read the same file, so the shares are disjoint and cover the rest), minus
    those its own shard already holds.
    """
    merged = read_done(out / PREDICTIONS)
    if world_size == 1:
        return out / PREDICTIONS, [it for it in items if it.key not in merged]
    path = shard_path(out, rank, world_size)
    own = read_done(path)
    share = [it for it in items if it.key not in merged][rank::world_size]
    return path, [it for it in share if it.key not in own]


def merge_shards(out: Path, items: Sequence[Item]) -> None:
    """Fold every `predictions.rank*of*.jsonl` in `out` into `predictions.jsonl`, then delete them: this run's items
    in item order, then earlier predictions of other items in their previous order; the first line of a key wins.
    Written atomically before any shard is deleted, so a crash in between loses nothing. No shard: nothing changes.
    Rank 0 alone, while the other ranks wait at a barrier."""
    shards = sorted(out.glob("predictions.rank*of*.jsonl"))
    done = read_done(out / PREDICTIONS)  # also cuts a torn last line off
    if not shards:
        return
    for shard in shards:
        for key, line in read_done(shard).items():
            done.setdefault(key, line)
    ordered = [it.key for it in items if it.key in done]
    in_run = set(ordered)
    ordered += [key for key in done if key not in in_run]
    write_text_atomic(out / PREDICTIONS, "".join(json.dumps(done[key]) + "\n" for key in ordered))
    for shard in shards:
        shard.unlink()


def predict(pipeline, items: Sequence[Item], out: Path, progress: bool = True, rank: int = 0, world_size: int = 1
            ) -> Iterator[dict]:
    """Run this rank's pending items (see `pending`), appending one line each to its file (flushed and fsynced per
    batch): `out/predictions.jsonl` in one process, its own shard under torchrun."""
    path, todo = pending(items, out, rank, world_size)
    desc = "predict" if world_size == 1 else f"predict (rank {rank} of {world_size})"
    bar = tqdm(total=len(todo), desc=desc, unit="item", disable=not progress)
    with path.open("a", encoding="utf-8") as file:
        for start in range(0, len(todo), pipeline.batch_size):
            batch = todo[start:start + pipeline.batch_size]
            reports = pipeline.run([Case(**it.case) for it in batch], [str(i) for i in range(len(batch))])
            for it, report in zip(batch, reports):
                line = prediction_line(it, report)
                file.write(json.dumps(line) + "\n")
                yield line
            file.flush()
            os.fsync(file.fileno())
            bar.update(len(batch))
    bar.close()


def load_items(data_root: Path, planes: Sequence[str], tasks: Sequence[str], types: Sequence[str], flow: str,
               limit: int | None = None) -> list[Item]:
    items = []
    for plane, path in annotation_files(data_root, planes).items():
        records = load_records(path, data_root)
        items += build_items(records[:limit] if limit else records, plane, tasks, types, flow)
    return items
