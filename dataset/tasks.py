"""The training tasks: each turns annotation records into `Sample`s (conversation, images, segmentation targets).

Every sample is a pure function of (seed, epoch, task, index): all randomness (template words, rewritten targets,
negatives, box jitter, HU-window jitter, augmentation) comes from one generator seeded with exactly those, so a
sample can be rebuilt anywhere, on any rank, after any restart (`SampleKey`, dataset/sampler.py).

Tasks (SPEC §4.4):
- `visual_prompt`: a red box / ellipse / contour / crop marks one finding (or a group, or all) → its description.
- `grounding`: template instruction without "and describe the findings" → `<SEG>` (mask: union of all findings).
- `grounded_report`: the released two-round flow: instruction → `<SEG>` (union mask) → tool turn with the image
  with red boxes → `Findings 1: …\\n…` (one line per group); normal images → empty mask, no boxes, refusal.
- `grounded_report_per_finding`: one round, one `<SEG>` per finding after its own line (`Findings k: … <SEG>`),
  each with that group's mask — the per-finding flow of SPEC §3.3.
- `referring`: the clinical question → `<SEG>` (the group's mask) → tool turn with boxes → the group's description;
  negatives (p 0.5) ask about something absent → `<SEG>`, empty mask, no boxes → refusal.
- `referring_one_round`: question → `… <SEG>` (description then the token) or the refusal without `<SEG>`.
- `instruction_qa`: PubMedVision CT records, first Q/A pair.
- `report_corpus`: any `{image, caption}` list, as plain report generation.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from dataset.collate import Sample
from dataset.conversation import Turn, encode
from dataset.ct import InputError, gray_rgb, stretch_to_uint8, window_to_uint8
from dataset.prompts import (
    GROUNDED_REPORT_EVAL,
    GROUNDED_REPORT_PER_FINDING_EVAL,
    NO_ABNORMALITY,
    NO_RELEVANT_ABNORMALITY,
    REPORT_CORPUS_INSTRUCTION,
    findings_text,
    grounding_instruction,
    visual_prompt_instruction,
)
from dataset.readers import load_image_array
from dataset.records import Group, Record
from dataset.sampler import SampleKey
from dataset.stack25d import CONTEXT, stack_channels
from dataset.vision import VisionPreprocessor
from dataset.visual_prompt import PROMPT_KINDS, draw_boxes, draw_prompt, mask_box
from model.config import SEG_TOKEN

BOX_JITTER = 0.25  # training: each side of a tool-turn box moves by up to ±25 % of the box size
WINDOW_JITTER = 0.20  # training: each HU window bound moves by up to ±20 % of the window width (SPEC §4.2)
NEGATIVE_PROBABILITY = 0.5  # referring: chance a training sample asks about something absent
REWRITTEN_MAX = 3  # targets: the description or one of the first 3 rewritten findings


def sample_rng(seed: int, key: SampleKey) -> np.random.Generator:
    return np.random.default_rng([seed, key.epoch, zlib.crc32(key.task.encode()), key.index])


@dataclass
class RecordImages:
    """What one record gives every task: the key slice for the VLM and the segmentation stack, same geometry."""

    key_rgb: np.ndarray  # (H, W, 3) uint8, the key slice as the VLM sees it
    stack: np.ndarray  # (2·CONTEXT+1, H, W) key ± CONTEXT as read (zero slices where missing), the slices' dtype


def record_window(record: Record, rng: np.random.Generator | None, train: bool) -> tuple[float, float]:
    """[lo, hi] HU to show an HU record with: one of its dataset's windows, each bound jittered by up to ±20 % of the
    width in training; the first window in evaluation."""
    if not record.windows:
        raise InputError(f"sample {record.sample_id} stores HU but lists no 'windows' to display them with")
    if not train:
        return record.windows[0]
    lo, hi = record.windows[rng.integers(len(record.windows))]
    width = hi - lo
    lo, hi = lo + rng.uniform(-1, 1) * WINDOW_JITTER * width, hi + rng.uniform(-1, 1) * WINDOW_JITTER * width
    return min(lo, hi - 1.0), max(hi, lo + 1.0)


def load_record_images(record: Record, rng: np.random.Generator, train: bool) -> RecordImages:
    slices = record.read_slices()
    if record.hu_offset is not None:  # HU slices: a dataset window, then display values
        lo, hi = record_window(record, rng, train)
        slices = {o: np.clip(v, lo, hi) for o, v in slices.items()}
        key_gray = window_to_uint8(slices[0], (lo + hi) / 2, hi - lo)
    else:
        key_gray = slices[0]
    lo_offset, hi_offset = min(slices), max(slices)
    # The slices' own dtype (uint8 for JPEG: a quarter of float32's bytes to send from the worker); gaps stay zero
    # slices. z-scoring, padding and resizing are float work, done where the model is (dataset/finish.py).
    ordered = np.zeros((hi_offset - lo_offset + 1, *slices[0].shape), dtype=np.result_type(*slices.values()))
    for offset, values in slices.items():
        ordered[offset - lo_offset] = values
    return RecordImages(gray_rgb(stretch_to_uint8(key_gray)), stack_channels(ordered, -lo_offset, CONTEXT))


class SampleBuilder:
    """Encodes turns and images into a `Sample`: the step every task shares."""

    def __init__(self, tokenizer, image_processor, augment: bool = False):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.vision = VisionPreprocessor(image_processor)
        self.augment = augment
        self.image_token_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
        self.seg_token_id = tokenizer.convert_tokens_to_ids(SEG_TOKEN)
        if self.seg_token_id is None or self.seg_token_id == tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer has no {SEG_TOKEN} token; add it with model.tokenizer.add_seg_token")

    def __call__(self, turns: Sequence[Turn], images: Sequence[np.ndarray], stack: np.ndarray | None = None,
                 masks: np.ndarray | None = None, rng: np.random.Generator | None = None, meta: dict | None = None
                 ) -> Sample:
        """images: (H, W, 3) uint8 in order of appearance; when the task segments, stack (S, H, W) as read
        (`RecordImages.stack`) and masks (N, H, W) bool on the same slice, one per `<SEG>` in the conversation. Both
        reach the model space (z-scored, padded, resized) and, with `augment`, are augmented with the seed the sample
        carries (drawn from `rng`) in dataset.finish.BatchFinisher."""
        pixel_codes = grid = None
        image_tokens: list[int] = []
        if images:
            pixel_codes, grid = self.vision.encode(images)
            image_tokens = (grid.prod(dim=1) // self.image_processor.merge_size ** 2).tolist()
        conversation = encode(self.tokenizer, turns, image_tokens, self.image_token_id)
        seg_slices = seg_masks = seed = None
        if stack is not None:
            n_seg = int((conversation.input_ids == self.seg_token_id).sum())
            if masks is None or masks.shape[0] != n_seg:
                raise ValueError(f"{n_seg} {SEG_TOKEN} token(s) in the conversation but "
                                 f"{0 if masks is None else masks.shape[0]} mask(s)")
            if masks.shape[1:] != stack.shape[1:]:
                raise ValueError(f"masks of {masks.shape[1:]} pixels for slices of {stack.shape[1:]}")
            seg_slices, seg_masks = torch.from_numpy(stack), torch.from_numpy(np.asarray(masks, dtype=bool))
            seed = int(rng.integers(2**32)) if self.augment else None
        return Sample(conversation, pixel_codes, grid, seg_slices, seg_masks, seed, meta or {})


class TaskDataset(Dataset):
    """Items of one task; `dataset[SampleKey(task, i, epoch)]` (or `dataset[i]`, epoch 0) builds item i."""

    task: str = ""
    segments: bool = False  # whether samples carry segmentation stacks (batches never mix the two kinds)

    def __init__(self, builder: SampleBuilder, seed: int = 0, train: bool = True):
        self.builder = builder
        self.seed = seed
        self.train = train
        self.items: list = []

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: SampleKey | int) -> Sample:
        if isinstance(key, int):
            key = SampleKey(self.task, key)
        if key.task != self.task:
            raise KeyError(f"{self.task} dataset asked for a {key.task} sample")
        return self.build(self.items[key.index], sample_rng(self.seed, key))

    def build(self, item, rng: np.random.Generator) -> Sample:
        raise NotImplementedError

    def target(self, description: str, rewritten: Sequence[str], rng: np.random.Generator) -> str:
        """Training: the description or one of its first rewrites, at random; evaluation: the description."""
        candidates = [t for t in [description, *rewritten[:REWRITTEN_MAX]] if t] if self.train else [description]
        return candidates[rng.integers(len(candidates))]


class RecordTask(TaskDataset):
    """A task over OmniAbnorm-CT-style records."""

    def __init__(self, records: Sequence[Record], builder: SampleBuilder, seed: int = 0, train: bool = True):
        super().__init__(builder, seed, train)
        self.records = list(records)

    def load(self, record: Record, rng: np.random.Generator) -> tuple[RecordImages, np.ndarray]:
        """The record's images and its abnormality masks (N, H, W) bool at key-slice size, in record order."""
        images = load_record_images(record, rng, self.train)
        masks = record.read_masks([a.id for a in record.abnormalities], images.key_rgb.shape[:2])
        return images, masks

    @staticmethod
    def unions(record: Record, masks: np.ndarray, groups: Sequence[Group]) -> np.ndarray:
        """(N, H, W) per abnormality → (len(groups), H, W), each group's union."""
        index = {a.id: i for i, a in enumerate(record.abnormalities)}
        return np.stack([masks[[index[i] for i in g.ids]].any(axis=0) for g in groups]) if groups else \
            np.zeros((0, *masks.shape[1:]), dtype=bool)

    def boxed(self, image: np.ndarray, masks: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """The tool turn's image: one red box per non-empty mask, jittered in training."""
        boxes = [mask_box(m) for m in masks if m.any()]
        return draw_boxes(image, boxes, jitter=BOX_JITTER if self.train else 0.0, rng=rng)

    @staticmethod
    def meta(record: Record, **extra) -> dict:
        return {"sample_id": record.sample_id, "plane": record.plane, "dataset": record.dataset, **extra}


class VisualPromptTask(RecordTask):
    task = "visual_prompt"

    def __init__(self, records: Sequence[Record], builder: SampleBuilder, seed: int = 0, train: bool = True,
                 kinds: Sequence[str] = PROMPT_KINDS, online: bool = False):
        """Items: every (finding, kind), every (group of ≥ 2, kind) and every (image, kind) with all findings marked
        (crops: single findings only). online: draw the marks from the masks instead of reading the pre-rendered
        `visual_instruction/` PNGs (done anyway when a PNG is missing)."""
        super().__init__(records, builder, seed, train)
        self.online = online
        for r, record in enumerate(self.records):
            groups = record.groups()
            for kind in kinds:
                self.items += [(r, "single", kind, (a.id,)) for a in record.abnormalities if a.description]
                if kind == "cropped":
                    continue
                self.items += [(r, "group", kind, tuple(g.ids)) for g in groups if len(g.ids) > 1 and g.description]
                if groups and all(g.description for g in groups):
                    self.items.append((r, "all", kind, ()))

    def build(self, item, rng):
        r, scope, kind, ids = item
        record = self.records[r]
        groups = record.groups()
        if scope == "all":
            answer = findings_text([self.target(g.description, g.rewritten_findings, rng) for g in groups])
        elif scope == "group":
            group = next(g for g in groups if tuple(g.ids) == ids)
            answer = self.target(group.description, group.rewritten_findings, rng)
        else:
            abn = next(a for a in record.abnormalities if a.id == ids[0])
            answer = self.target(abn.description, abn.rewritten_findings, rng)
        image = self.prompt_image(record, scope, kind, ids)
        turns = [Turn("user", visual_prompt_instruction(kind, scope), images=1), Turn("assistant", answer)]
        return self.builder(turns, [image], meta=self.meta(record, kind=kind, scope=scope, ids=list(ids)))

    def prompt_image(self, record: Record, scope: str, kind: str, ids: tuple[int, ...]) -> np.ndarray:
        name = f"{kind}_{'all' if scope == 'all' else '_'.join(map(str, ids))}.png"
        path = record.image_dir / "visual_instruction" / name
        if not self.online and path.is_file():
            array = load_image_array(path)
            return gray_rgb(array) if array.ndim == 2 else array[..., :3]
        key = record.read_slice(0)
        if record.hu_offset is not None:  # drawn like the pre-rendered prompts: one fixed window
            lo, hi = record_window(record, None, train=False)
            gray = window_to_uint8(key, (lo + hi) / 2, hi - lo)
        else:
            gray = np.clip(np.rint(key), 0, 255).astype(np.uint8)
        masks = record.read_masks([a.id for a in record.abnormalities], key.shape)
        groups = record.groups() if scope == "all" else [Group(0, [a for a in record.abnormalities if a.id in ids])]
        marks = self.unions(record, masks, groups) if scope != "group" or kind == "cropped" else \
            masks[[i for i, a in enumerate(record.abnormalities) if a.id in ids]]
        return draw_prompt(gray_rgb(gray), list(marks), kind)


class GroundingTask(RecordTask):
    """Grounding only: template instruction without "and describe the findings" → `<SEG>`, mask = union. Subclasses
    change the conversation (`turns`) and the targets (`targets`: one mask per `<SEG>`)."""

    task = "grounding"
    segments = True

    def __init__(self, records: Sequence[Record], builder: SampleBuilder, seed: int = 0, train: bool = True):
        super().__init__(records, builder, seed, train)
        self.items = list(range(len(self.records)))

    def build(self, item, rng):
        record = self.records[item]
        images, masks = self.load(record, rng)
        turns, tool_images = self.turns(record, images, masks, rng)
        return self.builder(turns, [images.key_rgb, *tool_images], images.stack, self.targets(record, masks), rng,
                            self.meta(record, groups=[g.ids for g in record.groups()]))

    def targets(self, record: Record, masks: np.ndarray) -> np.ndarray:
        """(1, H, W): the union of all findings (empty for a normal image)."""
        return masks.any(axis=0, keepdims=True) if len(masks) else np.zeros((1, *masks.shape[1:]), dtype=bool)

    def turns(self, record: Record, images: RecordImages, masks: np.ndarray, rng) -> tuple[list[Turn], list]:
        return [Turn("user", grounding_instruction(rng, describe=False), images=1),
                Turn("assistant", SEG_TOKEN)], []


class GroundedReportTask(GroundingTask):
    """The released two-round flow: instruction → `<SEG>` → tool turn (image with red boxes) → findings."""

    task = "grounded_report"

    def turns(self, record, images, masks, rng):
        groups = record.groups()
        answer = (findings_text([self.target(g.description, g.rewritten_findings, rng) for g in groups])
                  if groups else NO_ABNORMALITY)
        instruction = grounding_instruction(rng, describe=True) if self.train else GROUNDED_REPORT_EVAL
        return [Turn("user", instruction, images=1), Turn("assistant", SEG_TOKEN),
                Turn("tool", "", images=1), Turn("assistant", answer)], [self.boxed(images.key_rgb, masks, rng)]


class PerFindingReportTask(GroundingTask):
    """One round, one `<SEG>` per finding: `Findings k: <description> <SEG>` with that group's mask."""

    task = "grounded_report_per_finding"

    def targets(self, record, masks):
        return self.unions(record, masks, record.groups())

    def turns(self, record, images, masks, rng):
        groups = record.groups()
        answer = (findings_text([self.target(g.description, g.rewritten_findings, rng) for g in groups],
                                seg_after_each=True) if groups else NO_ABNORMALITY)
        instruction = (grounding_instruction(rng, describe=True, per_finding=True) if self.train
                       else GROUNDED_REPORT_PER_FINDING_EVAL)
        return [Turn("user", instruction, images=1), Turn("assistant", answer)], []


class ReferringTask(RecordTask):
    """Text-guided grounded report: a clinical question about one finding (group), or, as a negative, about
    something absent from the image."""

    task = "referring"
    segments = True
    two_round = True

    def __init__(self, records: Sequence[Record], builder: SampleBuilder, seed: int = 0, train: bool = True,
                 negative_probability: float = NEGATIVE_PROBABILITY):
        super().__init__(records, builder, seed, train)
        self.negative_probability = negative_probability
        for r, record in enumerate(self.records):
            self.items += [(r, g) for g, group in enumerate(record.groups())
                           if group.description and any(a.referring_prompts for a in group.members)]
        # Negatives for training files (which carry none): questions written for other images, about a structure
        # none of this image's findings is in.
        self.question_pool = sorted({(p, a.key) for record in self.records for a in record.abnormalities
                                     for p in a.referring_prompts})

    def negative_question(self, record: Record, rng: np.random.Generator) -> str | None:
        own = [p for a in record.abnormalities for p in a.negative_prompts]
        if own:
            return own[rng.integers(len(own))]
        present = {a.key for a in record.abnormalities}
        candidates = [p for p, key in self.question_pool if key not in present]
        return candidates[rng.integers(len(candidates))] if candidates else None

    def build(self, item, rng):
        r, g = item
        record = self.records[r]
        group = record.groups()[g]
        images, masks = self.load(record, rng)
        question = self.negative_question(record, rng) if rng.random() < self.negative_probability else None
        positive = question is None  # also when no negative question exists for this image
        if positive:
            prompts = [p for a in group.members for p in a.referring_prompts]
            question = prompts[rng.integers(len(prompts))]
            target = self.unions(record, masks, [group])
            answer = self.target(group.description, group.rewritten_findings, rng)
        else:
            target = np.zeros((1, *masks.shape[1:]), dtype=bool)
            answer = NO_RELEVANT_ABNORMALITY
        meta = self.meta(record, group=group.ids, positive=positive, question=question)
        if self.two_round:
            turns = [Turn("user", question, images=1), Turn("assistant", SEG_TOKEN), Turn("tool", "", images=1),
                     Turn("assistant", answer)]
            return self.builder(turns, [images.key_rgb, self.boxed(images.key_rgb, target, rng)], images.stack,
                                target, rng, meta)
        if positive:
            turns = [Turn("user", question, images=1), Turn("assistant", f"{answer} {SEG_TOKEN}")]
        else:  # nothing to outline: the refusal alone
            turns, target = [Turn("user", question, images=1), Turn("assistant", answer)], target[:0]
        return self.builder(turns, [images.key_rgb], images.stack, target, rng, meta)


class ReferringOneRoundTask(ReferringTask):
    task = "referring_one_round"
    two_round = False


class ImageTextTask(TaskDataset):
    """Single-image question → answer pairs without segmentation (instruction QA, image–report corpora)."""

    def __init__(self, pairs: Sequence[tuple[Path, str, str]], builder: SampleBuilder, seed: int = 0,
                 train: bool = True):
        super().__init__(builder, seed, train)
        self.items = list(pairs)

    def build(self, item, rng):
        path, question, answer = item
        array = load_image_array(path)
        image = gray_rgb(array) if array.ndim == 2 else array[..., :3]
        if image.dtype != np.uint8:
            image = gray_rgb(stretch_to_uint8(image[..., 0]))
        turns = [Turn("user", question, images=1), Turn("assistant", answer)]
        return self.builder(turns, [image], meta={"image": str(path)})


class InstructionQATask(ImageTextTask):
    task = "instruction_qa"


class ReportCorpusTask(ImageTextTask):
    task = "report_corpus"


def _read_json_list(path: Path) -> list:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"{path} is not valid JSON ({err})") from None
    if not isinstance(data, list):
        raise InputError(f"{path} must hold a JSON list of records")
    return data


def load_pubmedvision_ct(json_path: str | Path, image_root: str | Path | None = None) -> list[tuple[Path, str, str]]:
    """PubMedVision records (`image`: list of paths, `conversations`: [{from: human|gpt, value}], `modality`) →
    (image, question, answer) for single-image CT records, first Q/A pair, `<image>` placeholders removed."""
    json_path = Path(json_path)
    root = Path(image_root) if image_root is not None else json_path.parent
    pairs = []
    for record in _read_json_list(json_path):
        images = record.get("image") or []
        images = [images] if isinstance(images, str) else images
        modality = str(record.get("modality", ""))
        if len(images) != 1 or not ("CT" in modality.split() or "computed tomography" in modality.lower()):
            continue
        turns = record.get("conversations") or []
        question = next((t["value"] for t in turns if t.get("from") == "human"), None)
        answer = next((t["value"] for t in turns if t.get("from") == "gpt"), None)
        if question and answer:
            pairs.append((root / images[0], question.replace("<image>", "").strip(), answer.strip()))
    return pairs


def load_report_corpus(json_path: str | Path, image_root: str | Path | None = None) -> list[tuple[Path, str, str]]:
    """A JSON list of `{image, caption}` → (image, fixed instruction, caption)."""
    json_path = Path(json_path)
    root = Path(image_root) if image_root is not None else json_path.parent
    pairs = []
    for i, record in enumerate(_read_json_list(json_path)):
        if not isinstance(record, dict) or not record.get("image") or not record.get("caption"):
            raise InputError(f"{json_path} record {i}: needs non-empty 'image' and 'caption'")
        pairs.append((root / record["image"], REPORT_CORPUS_INSTRUCTION, str(record["caption"]).strip()))
    return pairs


RECORD_TASKS: dict[str, type[RecordTask]] = {t.task: t for t in (
    VisualPromptTask, GroundingTask, GroundedReportTask, PerFindingReportTask, ReferringTask, ReferringOneRoundTask)}


class MultiTaskDataset(Dataset):
    """Several tasks behind one `__getitem__(SampleKey)`, for a DataLoader driven by `TaskBatchSampler`."""

    def __init__(self, tasks: Sequence[TaskDataset]):
        self.tasks = {t.task: t for t in tasks if len(t)}
        if not self.tasks:
            raise InputError("no training samples: every configured task is empty")

    def sizes(self) -> dict[str, int]:
        return {name: len(t) for name, t in self.tasks.items()}

    def __getitem__(self, key: SampleKey) -> Sample:
        return self.tasks[key.task][key]
