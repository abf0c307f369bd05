"""Synthetic CT phantoms in the OmniAbnorm-CT-14K format (SPEC §4.1, §10): a learnable stand-in for the gated data.

Each case is a small 3D abdomen in HU (canonical `Volume` layout (z, y, x): z inferior→superior, y
anterior→posterior, x patient right→left; isotropic voxels, `FOV_MM / size` mm): air, a body ellipse (fat,
muscle wall), spine, aorta, liver on the patient's right, spleen on the left, both kidneys posterior, lung bases in
the upper slices, Gaussian noise. Lesions (0–3 per case) are ellipsoids wholly inside one organ: cysts, metastases,
calcifications, stones, nodules, each with a known organ, side, size, density and HU. One key slice per case
(axial for most, some coronal and sagittal) through a lesion centre, ±4 neighbours, masks, pre-rendered visual
prompts and radiology-style reports written from that ground truth.

    python -m dataset.phantom --out DIR --n N --seed S [--size PX] [--volumes] [--valid-fraction F] [--overwrite]

Output (paths in the JSON are relative to OUT):

    OUT/images/<sid>/{-4..4}.jpg             key slice 0 and neighbours, abdomen window (40/400), 8-bit JPEG
    OUT/images/<sid>/visual_instruction/     <type>_<id>.png, <type>_<id1>_<id2>.png, <type>_all.png
    OUT/masks/<sid>/<id>.jpeg                0/255 mask of abnormality <id> on the key slice
    OUT/merged_train.json, OUT/<plane>/<plane>_valid.json, OUT/<plane>/<plane>_valid_grouped.json
    OUT/phantom.json                         generator version, settings, split counts, organ and lesion tables
    OUT/volumes/<case>/ct.nii.gz, dicom/NNNN.dcm, lesions.json, lesions.nii.gz     (--volumes)

A case is a function of (seed, case index, size) alone (its plane: of the index); which cases are held out for
validation depends on n too. The same arguments give byte-identical output (no clock, UIDs from the seed).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from dataset.ct import PLANES, WINDOW_PRESETS, InputError, Volume, gray_rgb, window_to_uint8
from dataset.visual_prompt import PROMPT_KINDS, draw_prompt
from utils.atomic import atomic_folder

GENERATOR_VERSION = "1"
FOV_MM = 350.0  # in-plane field of view; voxels are FOV_MM / size mm on every axis
NOISE_HU = 10.0
HU_RANGE = (-1024.0, 3071.0)  # what 12-bit CT with intercept −1024 can store; volumes are clipped to it
WINDOW = WINDOW_PRESETS["abdomen"]
CONTEXT = 4  # neighbours on each side of the key slice
MIN_MASK_PX = 16  # smaller cross-sections are not annotated (the mask → findings step drops them too)
MIN_CENTRE_PX = 24  # a lesion's cross-section through its centre must be at least this, so it survives
JPEG_QUALITY = 95
GROUP_PROMPT_KINDS = tuple(k for k in PROMPT_KINDS if k != "cropped")  # crops show single findings only
# Planes by case index, 17 axial : 5 coronal : 3 sagittal (the 14K set is 69 : 19 : 12 %); every plane early on.
PLANE_PATTERN = "ACSAACAAASACAAACAASACAAAA"
PLANE_OF = {"A": "axial", "C": "coronal", "S": "sagittal"}
LESION_COUNT_P = (0.15, 0.45, 0.25, 0.15)  # P(0, 1, 2, 3 lesions); 0 → a normal image
PAIR_P = 0.5  # chance that a further lesion repeats the previous one's organ and kind (a group of findings)
SAME_SLICE_P = 0.7  # chance that another further lesion is centred on the first one's key slice too
PLANE_AXIS = {"axial": 0, "coronal": 1, "sagittal": 2}  # the (z, y, x) axis a plane's slices step along
UID_ROOT = "omniabnorm-ct-phantom"


@dataclass(frozen=True)
class Organ:
    name: str  # unique, e.g. "right kidney"
    label: int  # value in the organ label map
    hu: float
    organ: str  # organ without side, e.g. "kidney"
    side: str  # "left" | "right" | "none"
    system: str  # taxonomy level 1
    structure: str  # taxonomy level 2


ORGANS: tuple[Organ, ...] = (
    Organ("body", 1, -100.0, "body", "none", "Musculoskeletal system", "Body wall"),  # fat; the muscle ring is 50 HU
    Organ("spine", 2, 700.0, "spine", "none", "Musculoskeletal system", "Spine"),
    Organ("aorta", 3, 45.0, "aorta", "none", "Cardiovascular system", "Aorta"),
    Organ("liver", 4, 60.0, "liver", "none", "Digestive system", "Liver"),
    Organ("spleen", 5, 50.0, "spleen", "none", "Lymphatic system", "Spleen"),
    Organ("right kidney", 6, 35.0, "kidney", "right", "Urinary system", "Kidney"),
    Organ("left kidney", 7, 35.0, "kidney", "left", "Urinary system", "Kidney"),
    Organ("right lung", 8, -850.0, "lung", "right", "Respiratory system", "Lung"),
    Organ("left lung", 9, -850.0, "lung", "left", "Respiratory system", "Lung"),
)
ORGAN = {o.name: o for o in ORGANS}
FAT_HU, MUSCLE_HU, VISCERAL_FAT_HU, CANAL_HU, AIR_HU = -100.0, 50.0, -90.0, 20.0, -1000.0
# Words a report uses for each organ that can hold a lesion (noun first): for checking reports and questions.
ORGAN_WORDS = {"liver": ("liver", "hepatic"), "spleen": ("spleen", "splenic"), "kidney": ("kidney", "renal"),
               "lung": ("lung", "pulmonary")}


@dataclass(frozen=True)
class LesionKind:
    organ: str  # organ without side
    kind: str
    label: str  # short name, also the taxonomy category
    hu: tuple[float, float]
    density: str  # relative to the organ: "hypodense" | "hyperdense"
    noun: tuple[str, str]  # singular, plural
    impression: tuple[str, str]  # singular, plural
    question: str  # a clinical question this finding answers; {o} = the organ phrase, e.g. "the right kidney"
    max_mm: float  # largest diameter (raised where the pixel size demands larger lesions)


LESION_KINDS: tuple[LesionKind, ...] = (
    LesionKind("liver", "cyst", "hepatic cyst", (0, 10), "hypodense", ("lesion", "lesions"),
               ("consistent with a simple cyst", "consistent with simple cysts"), "Are there any cysts in {o}?", 40),
    LesionKind("liver", "metastasis", "hepatic metastasis", (15, 25), "hypodense", ("lesion", "lesions"),
               ("suspicious for metastasis", "suspicious for metastases"), "Evaluate {o} for metastatic disease.", 40),
    LesionKind("liver", "calcification", "hepatic calcification", (150, 250), "hyperdense", ("focus", "foci"),
               ("consistent with a calcified granuloma", "consistent with calcified granulomas"),
               "Are there any calcifications in {o}?", 20),
    LesionKind("spleen", "cyst", "splenic cyst", (0, 10), "hypodense", ("lesion", "lesions"),
               ("consistent with a simple cyst", "consistent with simple cysts"), "Are there any cysts in {o}?", 35),
    LesionKind("spleen", "metastasis", "splenic metastasis", (15, 25), "hypodense", ("lesion", "lesions"),
               ("suspicious for metastasis", "suspicious for metastases"), "Evaluate {o} for metastatic disease.", 35),
    LesionKind("spleen", "calcification", "splenic calcification", (150, 250), "hyperdense", ("focus", "foci"),
               ("consistent with a calcified granuloma", "consistent with calcified granulomas"),
               "Are there any calcifications in {o}?", 20),
    LesionKind("kidney", "cyst", "renal cyst", (0, 10), "hypodense", ("lesion", "lesions"),
               ("consistent with a simple renal cyst", "consistent with simple renal cysts"),
               "Are there any cysts in {o}?", 30),
    LesionKind("kidney", "calculus", "renal calculus", (150, 250), "hyperdense", ("calculus", "calculi"),
               ("consistent with a renal stone", "consistent with renal stones"), "Is there a stone in {o}?", 15),
    LesionKind("lung", "nodule", "pulmonary nodule", (20, 40), "hyperdense", ("nodule", "nodules"),
               ("consistent with a solid pulmonary nodule", "consistent with solid pulmonary nodules"),
               "Are there any nodules in {o}?", 30),
    LesionKind("lung", "calcified nodule", "calcified pulmonary nodule", (150, 250), "hyperdense",
               ("nodule", "nodules"), ("consistent with a calcified granuloma", "consistent with calcified granulomas"),
               "Is there a calcified nodule in {o}?", 20),
)
# Which organ a lesion goes to (sides split evenly).
LESION_ORGAN_P = {"liver": 0.40, "spleen": 0.15, "right kidney": 0.125, "left kidney": 0.125, "right lung": 0.10,
                  "left lung": 0.10}
# Questions about an organ, {o} = "the liver" …: positives for findings there, negatives for images without any.
ORGAN_QUESTIONS = ("Evaluate {o} for focal lesions.", "Are there any focal lesions in {o}?",
                   "Assess {o} for abnormalities.", "Check {o} for any abnormality.",
                   "Describe any focal abnormality of {o}.", "Is there a mass, cyst or nodule in {o}?")
# Structures the phantom never puts a lesion in: negatives only.
OTHER_ORGANS = ("the pancreas", "the gallbladder", "the adrenal glands", "the abdominal aorta", "the stomach",
                "the lumbar vertebrae")


@dataclass(frozen=True)
class Ellipsoid:
    centre: tuple[float, float, float]  # (z, y, x) mm from voxel (0, 0, 0)
    semi: tuple[float, float, float]  # semi-axes (z, v, u) mm; u is the x axis turned by `angle` towards +y
    angle: float = 0.0  # radians, about z

    def matrix(self) -> np.ndarray:
        """(3, 3) M with d·M·d ≤ 1 inside, d = (z, y, x) − centre in mm."""
        c, s = math.cos(self.angle), math.sin(self.angle)
        rows = np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])  # d → (z, v, u)
        return rows.T @ np.diag(1.0 / np.square(self.semi)) @ rows

    def voxels(self, shape: Sequence[int], spacing: float) -> tuple[tuple[slice, ...], np.ndarray]:
        """The bounding box (slices of a (Z, Y, X) array) and the (bz, by, bx) bool mask of voxel centres inside."""
        r = max(self.semi)
        box = tuple(slice(max(0, math.floor((c - r) / spacing)), max(0, min(n, math.ceil((c + r) / spacing) + 1)))
                    for c, n in zip(self.centre, shape))
        z, y, x = ((np.arange(b.start, b.stop, dtype=np.float32) * spacing - c) / a
                   for b, c, a in zip(box, self.centre, (self.semi[0], 1.0, 1.0)))
        y, x = y[:, None], x[None, :]
        c, s = math.cos(self.angle), math.sin(self.angle)
        in_plane = ((y * c - x * s) / self.semi[1]) ** 2 + ((x * c + y * s) / self.semi[2]) ** 2  # (v/b)² + (u/a)²
        return box, in_plane[None] <= 1.0 - z[:, None, None] ** 2

    def contains(self, point: Sequence[float]) -> bool:
        d = np.asarray(point, dtype=float) - self.centre
        return float(d @ self.matrix() @ d) <= 1.0

    def section_diameter(self, axis: int, offset_mm: float) -> float:
        """Longest diameter (mm) of the cut by the plane `axis` = centre + offset_mm (0 when it misses)."""
        m = self.matrix()
        free = [a for a in range(3) if a != axis]
        m_ff, m_fk = m[np.ix_(free, free)], m[free, axis]
        level = 1.0 - offset_mm ** 2 * (m[axis, axis] - m_fk @ np.linalg.solve(m_ff, m_fk))
        return 2.0 * math.sqrt(level / float(np.linalg.eigvalsh(m_ff)[0])) if level > 0 else 0.0


@dataclass
class Lesion:
    organ: Organ
    kind: LesionKind
    shape: Ellipsoid  # centre on a voxel centre
    hu: float
    location: str  # report phrase, e.g. "the right lobe of the liver"

    def centre_voxel(self, spacing: float) -> tuple[int, int, int]:
        return tuple(round(c / spacing) for c in self.shape.centre)


@dataclass
class Finding:
    """One annotated abnormality of a sample: a lesion cut by the key slice."""

    lesion_index: int  # into PhantomCase.lesions
    mask: np.ndarray  # (H, W) bool, display orientation of the key slice
    size_mm: float  # longest in-plane diameter of the cut, to 0.1 mm (what the report rounds)


@dataclass
class PhantomCase:
    case_id: str
    volume: Volume  # HU (whole numbers, clipped to HU_RANGE), canonical (z, y, x)
    labels: np.ndarray  # (Z, Y, X) uint8: ORGANS labels, 0 = air
    lesion_map: np.ndarray  # (Z, Y, X) uint8: k = lesions[k − 1], 0 = none
    lesions: list[Lesion]
    plane: str
    key: int  # index of the key slice along the plane's axis

    @property
    def spacing(self) -> float:
        return self.volume.spacing_mm[0]

    def on_key(self, array: np.ndarray) -> np.ndarray:
        """(Z, Y, X) array → its key slice (H, W) in the display orientation of `Volume.slices`."""
        stack = Volume(array.astype(np.float32), self.volume.spacing_mm, self.volume.origin_mm, self.case_id)
        return stack.slices(self.plane, key=self.key).key_slice

    def context(self) -> list[int]:
        count = self.volume.hu.shape[PLANE_AXIS[self.plane]]
        return [o for o in range(-CONTEXT, CONTEXT + 1) if 0 <= self.key + o < count]

    def centre_lps(self, lesion: Lesion) -> tuple[float, float, float]:
        """World LPS (x, y, z) mm of a lesion's centre."""
        z, y, x = lesion.shape.centre
        ox, oy, oz = self.volume.origin_mm
        return ox + x, oy + y, oz + z

    def findings(self) -> list[Finding]:
        """Lesions cut by the key slice in at least MIN_MASK_PX pixels, in lesion order."""
        cut = self.on_key(self.lesion_map)
        axis = PLANE_AXIS[self.plane]
        found = []
        for k, lesion in enumerate(self.lesions):
            mask = cut == k + 1
            if mask.sum() >= MIN_MASK_PX:
                offset = self.key * self.spacing - lesion.shape.centre[axis]
                found.append(Finding(k, mask, round(lesion.shape.section_diameter(axis, offset), 1)))
        return found


def voxel_mm(size: int) -> float:
    """Voxel size on every axis for `size` pixels across FOV_MM, to 0.1 µm (DICOM decimal strings stay exact)."""
    return round(FOV_MM / size, 4)


def plane_of(index: int) -> str:
    return PLANE_OF[PLANE_PATTERN[index % len(PLANE_PATTERN)]]


def case_rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, 0, index])


def _jit(rng: np.random.Generator, value: float, rel: float = 0.06) -> float:
    return value * rng.uniform(1.0 - rel, 1.0 + rel)


def _paint(hu: np.ndarray, labels: np.ndarray, shape: Ellipsoid, value: float, label: int, spacing: float,
           within: np.ndarray | None = None) -> None:
    """Fill an ellipsoid (restricted to the (Y, X) region `within`, when given) with a HU value and a label."""
    box, inside = shape.voxels(hu.shape, spacing)
    if within is not None:
        inside &= within[box[1], box[2]][None]
    hu[box][inside] = value
    labels[box][inside] = label


def _anatomy(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray, float, Ellipsoid]:
    """HU (Z, Y, X) float32 without lesions or noise, organ labels (Z, Y, X) uint8, voxel size mm, and the liver's
    left lobe (report wording)."""
    spacing = voxel_mm(size)
    depth = round(rng.uniform(170.0, 230.0) / spacing)
    extent = depth * spacing
    hu = np.full((depth, size, size), AIR_HU, dtype=np.float32)
    labels = np.zeros(hu.shape, dtype=np.uint8)
    cy, cx = (size - 1) / 2 * spacing + rng.uniform(-5, 5), (size - 1) / 2 * spacing + rng.uniform(-5, 5)
    by, bx = rng.uniform(100.0, 125.0), rng.uniform(135.0, 160.0)  # body semi-axes (y, x)
    fat, muscle = rng.uniform(10.0, 22.0), rng.uniform(8.0, 14.0)  # subcutaneous fat, muscle wall thickness
    y = (np.arange(size) * spacing - cy)[:, None]
    x = (np.arange(size) * spacing - cx)[None, :]

    def ellipse(shrink: float) -> np.ndarray:
        return (y / (by - shrink)) ** 2 + (x / (bx - shrink)) ** 2 <= 1.0

    body, wall, cavity = ellipse(0.0), ellipse(fat), ellipse(fat + muscle)
    hu[:, body], labels[:, body] = FAT_HU, ORGAN["body"].label
    hu[:, wall & ~cavity] = MUSCLE_HU
    hu[:, cavity] = VISCERAL_FAT_HU

    def part(z: float, dy: float, dx: float, semi: tuple[float, float, float]) -> Ellipsoid:
        """Centre (fraction of the height, fraction of the body semi-axes y/x); semi-axes (mm), all jittered."""
        return Ellipsoid((_jit(rng, z) * extent, cy + _jit(rng, dy) * by, cx + _jit(rng, dx) * bx),
                         tuple(_jit(rng, s, 0.08) for s in semi), rng.uniform(-0.15, 0.15))

    # Painted in order; later parts take over where they overlap (the liver dome pushes up into the lung bases,
    # the kidneys sit behind the liver and spleen).
    for side, dx in (("right", -0.5), ("left", 0.5)):
        lung = part(1.12, 0.15, dx, (0.36 * extent, 0.62 * by, 0.36 * bx))
        _paint(hu, labels, lung, ORGAN[f"{side} lung"].hu, ORGAN[f"{side} lung"].label, spacing, cavity)
    right_lobe = part(0.68, -0.05, -0.45, (0.28 * extent, 0.62 * by, 0.45 * bx))
    left_lobe = part(0.74, -0.45, 0.05, (0.18 * extent, 0.30 * by, 0.35 * bx))
    for lobe in (right_lobe, left_lobe):
        _paint(hu, labels, lobe, ORGAN["liver"].hu, ORGAN["liver"].label, spacing, cavity)
    spleen = part(0.70, 0.30, 0.62, (0.20 * extent, 0.40 * by, 0.20 * bx))
    _paint(hu, labels, spleen, ORGAN["spleen"].hu, ORGAN["spleen"].label, spacing, cavity)
    for side, z, dx in (("right", 0.38, -0.40), ("left", 0.42, 0.40)):
        kidney = part(z, 0.50, dx, (0.22 * extent, 0.28 * by, 0.18 * bx))
        _paint(hu, labels, kidney, ORGAN[f"{side} kidney"].hu, ORGAN[f"{side} kidney"].label, spacing, cavity)
    column = 4.0 * extent  # vessels and spine run through every slice
    aorta = Ellipsoid((extent / 2, cy + 0.30 * by, cx + 0.08 * bx), (column, 11.0, 11.0))
    _paint(hu, labels, aorta, ORGAN["aorta"].hu, ORGAN["aorta"].label, spacing)
    radius = rng.uniform(15.0, 18.0)
    vertebra = Ellipsoid((extent / 2, cy + 0.62 * by, cx), (column, radius, radius))
    _paint(hu, labels, vertebra, ORGAN["spine"].hu, ORGAN["spine"].label, spacing)
    canal = Ellipsoid((extent / 2, cy + 0.62 * by + radius + 7.0, cx), (column, 6.0, 6.0))
    _paint(hu, labels, canal, CANAL_HU, ORGAN["body"].label, spacing)
    return hu, labels, spacing, left_lobe


def _location(organ: Organ, centre: tuple[float, float, float], left_lobe: Ellipsoid) -> str:
    if organ.organ == "liver":
        return f"the {'left' if left_lobe.contains(centre) else 'right'} lobe of the liver"
    if organ.organ == "lung":
        return f"the lower lobe of the {organ.side} lung"
    return f"the {organ.name}"


def _fit_lesion(rng: np.random.Generator, organ: Organ, kind: LesionKind, labels: np.ndarray, spacing: float,
                axis: int, lesions: Sequence[Lesion], plane_index: int | None, tries: int = 20) -> Ellipsoid | None:
    """An ellipsoid wholly inside `organ`, apart from `lesions`, cut in at least MIN_CENTRE_PX pixels through its
    centre by the key plane (`axis`), centred on slice `plane_index` of that axis when given; None if none fits."""
    inside_organ = labels == organ.label
    if plane_index is not None:
        inside_organ = np.moveaxis(inside_organ, axis, 0).copy()
        inside_organ[:plane_index] = inside_organ[plane_index + 1:] = False
        inside_organ = np.moveaxis(inside_organ, 0, axis)
    candidates = np.flatnonzero(inside_organ)
    if not len(candidates):
        return None
    min_mm = max(8.0, 5.5 * spacing)  # smaller would be too few pixels to annotate
    for _ in range(tries):
        centre = np.unravel_index(candidates[rng.integers(len(candidates))], labels.shape)
        diameter = rng.uniform(min_mm, max(kind.max_mm, min_mm + 6.0))
        shape = Ellipsoid(tuple(float(i) * spacing for i in centre),
                          (diameter / 2 * rng.uniform(0.75, 1.0), diameter / 2 * rng.uniform(0.75, 1.0), diameter / 2),
                          rng.uniform(0.0, math.pi))
        box, inside = shape.voxels(labels.shape, spacing)
        if not (labels[box][inside] == organ.label).all():
            continue  # reaches outside its organ
        if any(np.linalg.norm(np.subtract(shape.centre, o.shape.centre)) < max(shape.semi) + max(o.shape.semi) + 5.0
               for o in lesions):
            continue  # touches another lesion
        if inside.sum(axis=tuple(a for a in range(3) if a != axis)).max() < MIN_CENTRE_PX:
            continue  # too thin in the key plane to annotate
        return shape
    return None


def _place_lesions(rng: np.random.Generator, hu: np.ndarray, labels: np.ndarray, spacing: float, plane: str,
                   left_lobe: Ellipsoid) -> tuple[list[Lesion], np.ndarray]:
    """0–3 lesions painted into `hu`, and the lesion map (Z, Y, X) uint8 (k = lesions[k − 1]). The key slice goes
    through the first lesion's centre. A further lesion either repeats the previous one's organ and kind on that
    slice (a group, reported together), or has its own organ and kind (drawn again, up to 3 times, where nothing
    fits), mostly on that slice too (several findings in one image), otherwise anywhere."""
    axis = PLANE_AXIS[plane]
    names = list(LESION_ORGAN_P)
    lesion_map = np.zeros(labels.shape, dtype=np.uint8)
    lesions: list[Lesion] = []
    for _ in range(rng.choice(len(LESION_COUNT_P), p=LESION_COUNT_P)):
        shape = None
        key_index = lesions[0].centre_voxel(spacing)[axis] if lesions else None
        if lesions and rng.random() < PAIR_P:
            organ, kind = lesions[-1].organ, lesions[-1].kind
            shape = _fit_lesion(rng, organ, kind, labels, spacing, axis, lesions, key_index)
        on_key = rng.random() < SAME_SLICE_P
        for _draw in range(3):
            if shape is not None:
                break
            organ = ORGAN[names[rng.choice(len(names), p=list(LESION_ORGAN_P.values()))]]
            kinds = [k for k in LESION_KINDS if k.organ == organ.organ]
            kind = kinds[rng.integers(len(kinds))]
            shape = _fit_lesion(rng, organ, kind, labels, spacing, axis, lesions, key_index if on_key else None)
        if shape is None:
            continue
        box, inside = shape.voxels(labels.shape, spacing)
        value = float(np.round(rng.uniform(*kind.hu)))
        hu[box][inside] = value
        lesion_map[box][inside] = len(lesions) + 1
        lesions.append(Lesion(organ, kind, shape, value, _location(organ, shape.centre, left_lobe)))
    return lesions, lesion_map


def _choose_key(rng: np.random.Generator, lesions: list[Lesion], lesion_map: np.ndarray, spacing: float,
                plane: str) -> int:
    """Through the first lesion's centre, or the nearest slice where no lesion is cut in fewer than MIN_MASK_PX
    pixels (a visible lesion without a mask would teach the model to miss it); anywhere central for normals."""
    axis = PLANE_AXIS[plane]
    count = lesion_map.shape[axis]
    if not lesions:
        return int(rng.integers(int(0.3 * count), int(0.7 * count) + 1))
    centre = lesions[0].centre_voxel(spacing)[axis]
    for key in sorted(range(count), key=lambda k: (abs(k - centre), k)):
        areas = np.bincount(lesion_map.take(key, axis=axis).ravel(), minlength=len(lesions) + 1)[1:]
        if areas[0] >= MIN_MASK_PX and not ((areas > 0) & (areas < MIN_MASK_PX)).any():
            return key
    return centre


def make_case(seed: int, index: int, size: int = 128) -> PhantomCase:
    """Case `index` of the phantom set `seed`: anatomy, lesions, noise and key slice, all from one generator."""
    rng = case_rng(seed, index)
    plane = plane_of(index)
    hu, labels, spacing, left_lobe = _anatomy(rng, size)
    lesions, lesion_map = _place_lesions(rng, hu, labels, spacing, plane, left_lobe)
    hu += rng.standard_normal(hu.shape, dtype=np.float32) * NOISE_HU
    np.clip(np.rint(hu, out=hu), *HU_RANGE, out=hu)
    key = _choose_key(rng, lesions, lesion_map, spacing, plane)
    depth = hu.shape[0]
    # LPS (x, y, z) of voxel (0, 0, 0), near the centre; to 0.01 mm so DICOM positions are exact decimals.
    origin = tuple(round(-(count - 1) / 2 * spacing, 2) for count in (size, size, depth))
    case_id = f"phantom_{index:05d}"
    volume = Volume(hu, (spacing, spacing, spacing), origin, case_id)
    return PhantomCase(case_id, volume, labels, lesion_map, lesions, plane, key)


# ---------------------------------------------------------------------------------------------------------------
# Reports


def _article(size: int) -> str:
    """'An' before the numbers spoken with a leading vowel (8, 11, 18, 80–89 mm), else 'A'."""
    return "An" if size in (8, 11, 18) or str(size).startswith("8") else "A"


def _mm(value: float) -> int:
    """Report rounding: half up (Python's round() would make 12.5 mm → 12)."""
    return math.floor(value + 0.5)


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def report(lesions: Sequence[Lesion], sizes_mm: Sequence[float]) -> tuple[str, list[str]]:
    """(description, 3 rewritten findings) for one lesion or a group of the same kind in one organ."""
    kind = lesions[0].kind
    density = kind.density
    if len(lesions) == 1:
        s, where = _mm(sizes_mm[0]), lesions[0].location
        noun, impression = kind.noun[0], kind.impression[0]
        return (f"{_article(s)} {s} mm well-defined {density} {noun} in {where}, {impression}.",
                [f"{_cap(where)} contains a well-defined {density} {noun} measuring {s} mm, {impression}.",
                 f"There is {_article(s).lower()} {s} mm well-defined {density} {noun} in {where}, {impression}.",
                 f"Well-defined {density} {noun} of {s} mm in {where}, {impression}."])
    sizes = sorted((_mm(s) for s in sizes_mm), reverse=True)
    where = f"the {lesions[0].organ.name}"
    noun, impression = kind.noun[1], kind.impression[1]
    count = {2: "two", 3: "three"}[len(lesions)]
    measured = (f"the larger {sizes[0]} mm, the smaller {sizes[1]} mm" if len(sizes) == 2 else
                f"the largest {sizes[0]} mm, the others {sizes[1]} and {sizes[2]} mm")
    return (f"{_cap(count)} well-defined {density} {noun} in {where}, {measured}, {impression}.",
            [f"{_cap(where)} contains {count} well-defined {density} {noun}, {measured}, {impression}.",
             f"There are {count} well-defined {density} {noun} in {where}, {measured}, {impression}.",
             f"{_cap(count)} {density} {noun} are seen in {where}, {measured}, {impression}."])


def _organ_phrase(organ: Organ) -> str:
    return f"the {organ.name}"


def _questions(organ: Organ, kind: LesionKind, rng: np.random.Generator) -> list[str]:
    """5 clinical questions the finding answers: its kind's question, then 4 about its organ."""
    phrase = _organ_phrase(organ)
    picks = rng.permutation(len(ORGAN_QUESTIONS))[:4]
    return [kind.question.format(o=phrase), *(ORGAN_QUESTIONS[i].format(o=phrase) for i in picks)]


def _negative_questions(present: set[str], rng: np.random.Generator, count: int = 5) -> list[str]:
    """Questions about structures with no finding in the image (`present`: organs without side, e.g. "kidney")."""
    phrases = [_organ_phrase(o) for o in ORGANS if o.organ in ORGAN_WORDS and o.organ not in present]
    phrases += OTHER_ORGANS
    picks = rng.permutation(len(phrases))[:count]
    return [ORGAN_QUESTIONS[rng.integers(len(ORGAN_QUESTIONS))].format(o=phrases[i]) for i in picks]


# ---------------------------------------------------------------------------------------------------------------
# Writing


def _jpeg(gray: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(gray).save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def _png(rgb: np.ndarray, path: Path) -> None:
    Image.fromarray(rgb).save(path, format="PNG", compress_level=1)  # noise does not compress


def _round(values: Sequence[float], digits: int = 1) -> list[float]:
    return [round(float(v), digits) for v in values]


def _write_sample(case: PhantomCase, out: Path, sample_id: str, valid: bool, rng: np.random.Generator) -> dict:
    """Write one sample's slices, masks and visual prompts under `out`; return its datum."""
    image_dir, mask_dir = out / "images" / sample_id, out / "masks" / sample_id
    image_dir.mkdir(parents=True)
    mask_dir.mkdir(parents=True)
    stack = case.volume.slices(case.plane, key=case.key)
    gray = window_to_uint8(stack.pixels[[case.key + o for o in case.context()]], *WINDOW)
    for o, slice_gray in zip(case.context(), gray):
        encoded = _jpeg(slice_gray)
        (image_dir / f"{o}.jpg").write_bytes(encoded)
        if o == 0:  # prompts are drawn on the key slice as stored, like drawing them online from the files does
            key_rgb = gray_rgb(np.asarray(Image.open(io.BytesIO(encoded))))
    datum: dict = {"image": f"images/{sample_id}", "mask": f"masks/{sample_id}", "context": case.context(),
                   "plane": case.plane}
    findings = case.findings()
    if not findings:
        return datum
    # Same organ (and side) and same kind → one group, reported together.
    group_of: dict[tuple[str, str], int] = {}
    members: dict[int, list[int]] = {}
    for abn_id, f in enumerate(findings, 1):
        lesion = case.lesions[f.lesion_index]
        gid = group_of.setdefault((lesion.organ.name, lesion.kind.kind), len(group_of) + 1)
        members.setdefault(gid, []).append(abn_id)
    present = {case.lesions[f.lesion_index].organ.organ for f in findings}
    texts = {}
    for gid, ids in members.items():
        group = [findings[i - 1] for i in ids]
        lesion = case.lesions[group[0].lesion_index]
        texts[gid] = (*report([case.lesions[f.lesion_index] for f in group], [f.size_mm for f in group]),
                      _questions(lesion.organ, lesion.kind, rng))
    abnormalities = []
    for abn_id, f in enumerate(findings, 1):
        lesion = case.lesions[f.lesion_index]
        gid = group_of[(lesion.organ.name, lesion.kind.kind)]
        description, rewritten, questions = texts[gid]
        abn = {"id": abn_id, "group_id": gid, "label": lesion.kind.label, "description": description,
               "rewritten_findings": rewritten,
               "category": [lesion.organ.system, lesion.organ.structure, _cap(lesion.kind.label)],
               **{f"referring_prompt_{k}": q for k, q in enumerate(questions, 1)}}
        if valid:
            abn["referring_prompt"] = list(questions)
            abn["negative_referring_prompt"] = _negative_questions(present, rng)
        abn.update({"organ": lesion.organ.organ, "side": lesion.organ.side, "density": lesion.kind.density,
                    "size_mm": f.size_mm, "center_mm": _round(case.centre_lps(lesion))})
        abnormalities.append(abn)
        (mask_dir / f"{abn_id}.jpeg").write_bytes(_jpeg(f.mask.astype(np.uint8) * 255))
    datum["abnormality"] = abnormalities
    datum["abnormality_group"] = {str(gid): {"id": ids} for gid, ids in members.items()}

    prompt_dir = image_dir / "visual_instruction"
    prompt_dir.mkdir()
    masks = {abn_id: f.mask for abn_id, f in enumerate(findings, 1)}
    for kind in PROMPT_KINDS:
        for abn_id, mask in masks.items():
            _png(draw_prompt(key_rgb, [mask], kind), prompt_dir / f"{kind}_{abn_id}.png")
    for kind in GROUP_PROMPT_KINDS:
        for ids in members.values():
            if len(ids) > 1:
                _png(draw_prompt(key_rgb, [masks[i] for i in ids], kind), prompt_dir / f"{kind}_{'_'.join(map(str, ids))}.png")
        unions = [np.any([masks[i] for i in ids], axis=0) for ids in members.values()]
        _png(draw_prompt(key_rgb, unions, kind), prompt_dir / f"{kind}_all.png")
    return datum


def _uid(seed: int, case_id: str, *parts: str) -> str:
    return generate_uid(entropy_srcs=[UID_ROOT, str(seed), case_id, *parts])


def write_volume(case: PhantomCase, folder: Path, seed: int) -> None:
    """ct.nii.gz, dicom/NNNN.dcm (one CT Image Storage file per axial slice, inferior first), lesions.json and
    lesions.nii.gz (lesion k of lesions.json = value k) into `folder`."""
    folder.mkdir(parents=True)
    hu = case.volume.hu
    depth, rows, cols = hu.shape
    s = case.spacing
    ox, oy, oz = case.volume.origin_mm
    # Array axes (x, y, z) → RAS: LPS x (towards the patient's left) is −R, LPS y (posterior) is −A, z is S.
    affine = np.array([[-s, 0, 0, -ox], [0, -s, 0, -oy], [0, 0, s, oz], [0, 0, 0, 1]], dtype=np.float64)
    for name, data in (("ct.nii.gz", hu.astype(np.int16)), ("lesions.nii.gz", case.lesion_map)):
        image = nib.Nifti1Image(np.ascontiguousarray(data.transpose(2, 1, 0)), affine)
        image.set_qform(affine, code=1)
        image.set_sform(affine, code=1)
        image.header.set_xyzt_units("mm")
        nib.save(image, folder / name)

    lesions = [{"index": k, "organ": lesion.organ.organ, "side": lesion.organ.side, "kind": lesion.kind.kind,
                "label": lesion.kind.label, "density": lesion.kind.density, "hu": lesion.hu,
                "centre_voxel_zyx": list(lesion.centre_voxel(s)), "centre_lps_mm": _round(case.centre_lps(lesion)),
                "semi_axes_mm": _round(lesion.shape.semi, 2), "rotation_deg": round(math.degrees(lesion.shape.angle), 2),
                "location": lesion.location}
               for k, lesion in enumerate(case.lesions, 1)]
    (folder / "lesions.json").write_text(json.dumps(
        {"case": case.case_id, "spacing_mm_zyx": [s, s, s], "origin_lps_mm": _round(case.volume.origin_mm, 3),
         "shape_zyx": [depth, rows, cols],
         "semi_axes": "(z, v, u): u is the x axis turned by rotation_deg towards +y (posterior), v is in-plane normal to u",
         "lesions": lesions}, indent=1) + "\n", encoding="utf-8")

    dicom = folder / "dicom"
    dicom.mkdir()
    study, series, frame = (_uid(seed, case.case_id, part) for part in ("study", "series", "frame"))
    stored = (hu - HU_RANGE[0]).astype(np.uint16)  # intercept −1024
    for k in range(depth):
        sop = _uid(seed, case.case_id, "sop", str(k))
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = sop
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, sop
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20000101"  # fixed: output must not depend on the clock
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = "000000"
        ds.AccessionNumber = ""
        ds.Modality = "CT"
        ds.Manufacturer = "OmniAbnorm-CT phantom"
        ds.ManufacturerModelName = f"dataset.phantom {GENERATOR_VERSION}"
        ds.ReferringPhysicianName = ""
        ds.StudyDescription = "Synthetic abdomen phantom"
        ds.SeriesDescription = "Phantom CT"
        ds.PatientName = f"Phantom^{case.case_id}"
        ds.PatientID = case.case_id
        ds.PatientBirthDate = ""
        ds.PatientSex = "O"
        ds.BodyPartExamined = "ABDOMEN"
        ds.SliceThickness = s
        ds.KVP = "120"
        ds.PatientPosition = "HFS"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.StudyID = "1"
        ds.SeriesNumber = 1
        ds.AcquisitionNumber = 1
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [ox, oy, round(oz + k * s, 4)]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]  # rows run along +x (left), columns along +y (posterior)
        ds.PositionReferenceIndicator = ""
        ds.SliceLocation = round(oz + k * s, 4)
        ds.PixelSpacing = [s, s]
        ds.set_pixel_data(stored[k], "MONOCHROME2", 16, generate_instance_uid=False)
        ds.RescaleIntercept = HU_RANGE[0]
        ds.RescaleSlope = 1
        ds.RescaleType = "HU"
        ds.WindowCenter, ds.WindowWidth = WINDOW
        ds.save_as(dicom / f"{k:04d}.dcm", enforce_file_format=True)


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")


def _valid_indices(seed: int, n: int, valid_fraction: float) -> set[int]:
    """round(fraction × count) cases of each plane (at least 1 and at most count − 1 where it has 2 or more)."""
    rng = np.random.default_rng([seed, 1])
    chosen: set[int] = set()
    for plane in PLANES:
        indices = [i for i in range(n) if plane_of(i) == plane]
        k = round(valid_fraction * len(indices))
        if valid_fraction > 0 and len(indices) >= 2:
            k = min(max(k, 1), len(indices) - 1)
        chosen.update(indices[i] for i in rng.permutation(len(indices))[:k])
    return chosen


def _check(n: int, seed: int, size: int, valid_fraction: float) -> None:
    if not 1 <= n <= 99_999:
        raise InputError(f"--n {n}: the number of cases must be 1 to 99999")
    if seed < 0:
        raise InputError(f"--seed {seed}: the seed must be 0 or more")
    if not 64 <= size <= 1024:
        raise InputError(f"--size {size}: the in-plane size must be 64 to 1024 pixels (smaller cannot show lesions)")
    if not 0.0 <= valid_fraction < 1.0:
        raise InputError(f"--valid-fraction {valid_fraction}: pass a fraction from 0 up to (not including) 1")


def write_phantom(out: str | os.PathLike, n: int, seed: int, size: int = 128, volumes: bool = False,
                  valid_fraction: float = 0.2, overwrite: bool = False) -> Path:
    """Write a phantom set of `n` cases to `out` (built in a temporary sibling folder, then renamed into place).
    Refuses an existing non-empty `out` unless `overwrite`. Returns `out` as a Path."""
    _check(n, seed, size, valid_fraction)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file; pass a folder path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise InputError(f"--out {out} already exists and is not empty; pass another folder or --overwrite")
    with atomic_folder(out) as tmp:
        _build(tmp, n, seed, size, volumes, valid_fraction)
    return out


def _build(out: Path, n: int, seed: int, size: int, volumes: bool, valid_fraction: float) -> None:
    valid = _valid_indices(seed, n, valid_fraction)
    train: dict[str, dict] = {}
    valid_sets: dict[str, dict[str, dict]] = {plane: {} for plane in PLANES}
    normal = abnormal = 0
    for index in range(n):
        case = make_case(seed, index, size)
        sample_id = f"{case.case_id}_{case.plane}"
        rng = np.random.default_rng([seed, 2, index])  # texts: apart from the case's stream, so images stay put
        datum = _write_sample(case, out, sample_id, index in valid, rng)
        (valid_sets[case.plane] if index in valid else train)[sample_id] = datum
        normal += "abnormality" not in datum
        abnormal += len(datum.get("abnormality", []))
        if volumes:
            write_volume(case, out / "volumes" / case.case_id, seed)
    _write_json(out / "merged_train.json", train)
    for plane, data in valid_sets.items():
        _write_json(out / plane / f"{plane}_valid.json", data)
        grouped = {sid: {**d, "abnormality_group": {gid: [a for a in d["abnormality"] if a["group_id"] == int(gid)]
                                                    for gid in d["abnormality_group"]}} if "abnormality" in d else d
                   for sid, d in data.items()}
        _write_json(out / plane / f"{plane}_valid_grouped.json", grouped)
    _write_json(out / "phantom.json", {
        "generator": "dataset.phantom", "version": GENERATOR_VERSION, "seed": seed, "n": n, "size": size,
        "fov_mm": FOV_MM, "voxel_mm": voxel_mm(size), "window": list(WINDOW), "noise_hu": NOISE_HU,
        "valid_fraction": valid_fraction, "volumes": volumes,
        "splits": {"train": len(train), **{f"{p}_valid": len(d) for p, d in valid_sets.items()}},
        "normal_images": normal, "abnormalities": abnormal,
        "organs": [{"name": o.name, "label": o.label, "hu": o.hu, "organ": o.organ, "side": o.side,
                    "category": [o.system, o.structure]} for o in ORGANS],
        "lesion_kinds": [{"organ": k.organ, "kind": k.kind, "label": k.label, "hu": list(k.hu), "density": k.density,
                          "max_mm": k.max_mm} for k in LESION_KINDS],
    })


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dataset.phantom", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="output folder (must not exist or be empty)")
    parser.add_argument("--n", required=True, type=int, help="number of cases (one key slice each)")
    parser.add_argument("--seed", required=True, type=int)
    parser.add_argument("--size", type=int, default=128, help="in-plane pixels (field of view 350 mm)")
    parser.add_argument("--volumes", action="store_true", help="also write each case as NIfTI and a DICOM series")
    parser.add_argument("--valid-fraction", type=float, default=0.2, help="share of cases in the *_valid files")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    args = parser.parse_args(argv)
    try:
        out = write_phantom(args.out, args.n, args.seed, args.size, args.volumes, args.valid_fraction,
                            args.overwrite)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {args.n} phantom cases to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
