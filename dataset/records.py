"""The OmniAbnorm-CT-14K annotation format (SPEC §4.1) and the converted public-dataset format, as typed records.

A JSON file maps `sample_id → datum`. One `Record` per datum: where its slices and masks are, which neighbour offsets
exist, its abnormalities and their groups. Converted 3D datasets (dataset/convert.py, phantom volumes) use the same
shape with 16-bit slices holding HU + `hu_offset` and a table of HU `windows`.

Paths in the JSON may be absolute (the original's files) or relative to a data root (ours); the root defaults to
the JSON file's folder, walking up until the paths resolve, so `<root>/axial/axial_valid.json` works too.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dataset.ct import InputError
from dataset.readers import load_image_array, luma

SLICE_SUFFIXES = (".jpg", ".jpeg", ".png")
MASK_SUFFIXES = (".jpeg", ".jpg", ".png")


@dataclass
class Abnormality:
    id: int
    group_id: int
    label: str
    description: str
    rewritten_findings: list[str] = field(default_factory=list)
    category: list[str] = field(default_factory=list)  # taxonomy path, e.g. [system, structure, category]
    referring_prompts: list[str] = field(default_factory=list)  # referring_prompt_1..5 (train) or referring_prompt[]
    negative_prompts: list[str] = field(default_factory=list)  # negative_referring_prompt[] (test files)

    @property
    def key(self) -> str:
        """What a referring question is about: the structure level of the taxonomy when known, else the label."""
        return (self.category[1] if len(self.category) > 1 else self.label).lower()


@dataclass
class Group:
    """One finding: the abnormalities that share a description (a lesion seen as several marks, or several lesions
    reported together)."""

    id: int
    members: list[Abnormality]

    @property
    def ids(self) -> list[int]:
        return [a.id for a in self.members]

    @property
    def description(self) -> str:
        return max((a.description for a in self.members), key=len)

    @property
    def rewritten_findings(self) -> list[str]:
        return [text for a in self.members for text in a.rewritten_findings]


@dataclass
class Record:
    sample_id: str
    image_dir: Path
    mask_dir: Path
    context: list[int]  # neighbour offsets that exist, incl. 0, ascending
    plane: str
    abnormalities: list[Abnormality]
    dataset: str = "OmniAbnorm-CT-14K"
    hu_offset: float | None = None  # slices store HU + hu_offset (16-bit) when set
    windows: list[tuple[float, float]] = field(default_factory=list)  # [lo, hi] HU windows for HU slices

    @property
    def is_normal(self) -> bool:
        return not self.abnormalities

    def groups(self) -> list[Group]:
        """Groups in order of first appearance."""
        by_id: dict[int, Group] = {}
        for a in self.abnormalities:
            by_id.setdefault(a.group_id, Group(a.group_id, [])).members.append(a)
        return list(by_id.values())

    def slice_path(self, offset: int) -> Path:
        return _find(self.image_dir, str(offset), SLICE_SUFFIXES, f"slice {offset} of sample {self.sample_id}")

    def read_slice(self, offset: int) -> np.ndarray:
        """(H, W) of the slice at `offset`: HU as float32 (converted files, `hu_offset` set), otherwise display
        values as stored (uint8 or uint16 gray; a colour-saved slice's uint8 luma, `readers.luma`). Stored integers
        stay integers: every consumer converts to float32 itself, and the copy here would cost a tenth of a sample's
        preparation."""
        array = load_image_array(self.slice_path(offset))
        if array.ndim == 3:  # colour-saved gray slices: read as inference reads them
            array = luma(array)
        if self.hu_offset is None:
            return array
        values = array.astype(np.float32)
        values -= self.hu_offset
        return values

    def read_slices(self) -> dict[int, np.ndarray]:
        """offset → `read_slice(offset)` for every offset of `context`; all the key slice's size."""
        slices = {offset: self.read_slice(offset) for offset in self.context}
        shape = slices[0].shape
        for offset, values in slices.items():
            if values.shape != shape:
                raise InputError(f"slice {self.slice_path(offset)} is {values.shape[1]}×{values.shape[0]} but the key "
                                 f"slice is {shape[1]}×{shape[0]}; all slices of a sample must have one size")
        return slices

    def read_masks(self, ids: Sequence[int], shape: tuple[int, int]) -> np.ndarray:
        """(N, H, W) bool, one per abnormality id (0/255 files, threshold at 128 so JPEG ringing is ignored)."""
        masks = np.zeros((len(ids), *shape), dtype=bool)
        for i, abn_id in enumerate(ids):
            path = _find(self.mask_dir, str(abn_id), MASK_SUFFIXES, f"mask of abnormality {abn_id} of {self.sample_id}")
            array = load_image_array(path)
            if array.ndim == 3:
                array = array[..., 0]
            if array.shape != shape:
                raise InputError(f"mask {path} is {array.shape[1]}×{array.shape[0]} but its key slice is "
                                 f"{shape[1]}×{shape[0]}")
            masks[i] = array >= 128 if array.dtype == np.uint8 else array > 0
        return masks


def _find(folder: Path, stem: str, suffixes: Sequence[str], what: str) -> Path:
    for suffix in suffixes:
        path = folder / f"{stem}{suffix}"
        if path.is_file():
            return path
    raise InputError(f"{what} not found: no {stem}{'/'.join(suffixes)} in {folder}")


def _strings(value, where: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value] if value else []
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return [v for v in value if v]
    raise InputError(f"{where}: expected a string or a list of strings, got {value!r}")


def _abnormality(raw: dict, where: str) -> Abnormality:
    try:
        abn_id = int(raw["id"])
    except (KeyError, TypeError, ValueError):
        raise InputError(f"{where}: every abnormality needs an integer 'id', got {raw.get('id')!r}") from None
    prompts = [raw[f"referring_prompt_{k}"] for k in range(1, 6) if raw.get(f"referring_prompt_{k}")]
    prompts += _strings(raw.get("referring_prompt"), f"{where} referring_prompt")
    return Abnormality(
        id=abn_id,
        group_id=int(raw.get("group_id", abn_id)),
        label=str(raw.get("label") or ""),
        description=str(raw.get("description") or ""),
        rewritten_findings=_strings(raw.get("rewritten_findings"), f"{where} rewritten_findings"),
        category=_strings(raw.get("category"), f"{where} category"),
        referring_prompts=list(dict.fromkeys(prompts)),  # test files repeat referring_prompt_k in the list
        negative_prompts=_strings(raw.get("negative_referring_prompt"), f"{where} negative_referring_prompt"),
    )


def _data_root(json_path: Path, first_image: str) -> Path:
    for root in (json_path.parent, *json_path.parent.parents):
        if (root / first_image).is_dir():
            return root
    raise InputError(f"{json_path}: image folder {first_image!r} not found under the JSON file's folder or its "
                     f"parents; pass data_root= the folder the paths are relative to")


def load_records(json_path: str | Path, data_root: str | Path | None = None) -> list[Record]:
    """Every datum of one annotation file, validated (ids unique, context holds 0, groups consistent)."""
    json_path = Path(json_path)
    try:
        data = json.loads(json_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"annotation file {json_path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"annotation file {json_path} is not valid JSON ({err})") from None
    if not isinstance(data, dict) or not data:
        raise InputError(f"annotation file {json_path} must be a non-empty JSON object sample_id → datum")
    relative = [d["image"] for d in data.values() if isinstance(d, dict) and not Path(d.get("image", "/")).is_absolute()]
    root = Path(data_root) if data_root is not None else _data_root(json_path, relative[0]) if relative else Path("/")
    records = []
    for sample_id, datum in data.items():
        where = f"{json_path} sample {sample_id!r}"
        if not isinstance(datum, dict) or "image" not in datum:
            raise InputError(f"{where}: a datum needs at least an 'image' folder")
        context = sorted(int(o) for o in datum.get("context", [0]))
        if 0 not in context:
            raise InputError(f"{where}: 'context' must include offset 0 (the key slice), got {context}")
        abnormalities = [_abnormality(raw, where) for raw in _raw_abnormalities(datum)]
        ids = [a.id for a in abnormalities]
        if len(set(ids)) != len(ids):
            raise InputError(f"{where}: abnormality ids repeat: {ids}")
        image_dir = root / datum["image"]
        records.append(Record(
            sample_id=str(sample_id),
            image_dir=image_dir,
            mask_dir=root / datum.get("mask", datum["image"]),
            context=context,
            plane=str(datum.get("plane") or _plane_from_path(json_path)),
            abnormalities=abnormalities,
            dataset=str(datum.get("dataset", "OmniAbnorm-CT-14K")),
            hu_offset=float(datum["hu_offset"]) if datum.get("hu_offset") is not None else None,
            windows=[(float(lo), float(hi)) for lo, hi in datum.get("windows", [])],
        ))
    return records


def _raw_abnormalities(datum: dict) -> list[dict]:
    """The abnormality dicts with their group ids: from `abnormality`, or from a grouped test file's
    `abnormality_group: group_id → [abnormality dicts]`, or with group ids taken from `group_id → {"id": [...]}`."""
    groups = datum.get("abnormality_group") or {}
    if not datum.get("abnormality") and groups and all(isinstance(g, list) for g in groups.values()):
        return [{**raw, "group_id": raw.get("group_id", int(gid))} for gid, members in groups.items() for raw in members]
    group_of = {int(i): int(gid) for gid, g in groups.items() if isinstance(g, dict) for i in g.get("id", [])}
    return [{**raw, "group_id": raw.get("group_id", group_of.get(int(raw.get("id", -1)), raw.get("id")))}
            for raw in datum.get("abnormality") or []]


def _plane_from_path(json_path: Path) -> str:
    name = json_path.name.lower()
    return next((p for p in ("axial", "coronal", "sagittal") if p in name), "unknown")
