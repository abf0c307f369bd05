"""The exact instruction and answer texts of every task (SPEC §4.4).

The released checkpoint was trained on these strings: change one character and the model sees a prompt it has not
learned. Each text lives here once; the task datasets and inference import them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np

from model.config import SEG_TOKEN

PromptKind = Literal["bbox", "ellipse", "contour", "cropped"]

REPORT_SUFFIX = ("Please use precise medical terminology, maintain the concise reporting style used in formal "
                 "radiology reports and provide only the specific radiological findings. Do not list general "
                 "possibilities, explanations, or recommendations.")

# One finding, one mark: instruction + " " + REPORT_SUFFIX.
VISUAL_PROMPT_SINGLE: dict[str, str] = {
    "cropped": "What are the main findings at the center of this image?",
    "bbox": "What are the main findings indicated by the red box in the image?",
    "contour": "What are the main findings indicated by the red-outlined area in the image?",
    "ellipse": "What are the main findings indicated by the red circular/elliptical demarcation in the image?",
}
# One finding marked several times (a group): no suffix.
VISUAL_PROMPT_GROUP: dict[str, str] = {
    "bbox": "Describe the abnormal finding indicated by the red boxes in the image.",
    "contour": "Describe the abnormal finding indicated by the red-outlined areas in the image.",
    "ellipse": "Describe the abnormal finding indicated by the red circular/elliptical demarcations in the image.",
}
# Every finding of the image marked: instruction + " " + REPORT_SUFFIX, answered in the grounded format.
VISUAL_PROMPT_ALL: dict[str, str] = {
    "bbox": "What are the main findings indicated by the red boxes in the image?",
    "contour": "What are the main findings indicated by the red-outlined areas in the image?",
    "ellipse": "What are the main findings indicated by the red circular/elliptical demarcations in the image?",
}

GROUNDED_REPORT_EVAL = "Please localize all the abnormalities on this CT image and describe the findings."
# Per-finding flow (ours, SPEC §3.3): its own wording, so a model trained on both flows knows which answer is wanted.
PER_FINDING_REQUEST = "describe each finding separately"
GROUNDED_REPORT_PER_FINDING_EVAL = f"Please localize all the abnormalities on this CT image and {PER_FINDING_REQUEST}."
NO_ABNORMALITY = "I don't see any abnormalities on the image."
NO_RELEVANT_ABNORMALITY = "I don't see any relevant abnormalities on the image."
# Generic image–report corpora carry no instruction of their own (our choice; the original shipped none).
REPORT_CORPUS_INSTRUCTION = "Please describe the findings in this image."

# Training instruction template: "{prefix} {verb} {target} {condition} and describe the findings{suffix}".
GROUNDING_VERBS = ("mark", "annotate", "locate", "localize", "detect", "segment", "outline", "delineate")
GROUNDING_PREFIX_SUFFIX = (("please", "."), ("", "."), ("please help me", "."), ("can you", "?"),
                           ("can you help me", "?"))
GROUNDING_TARGETS = ("all the abnormalities", "all abnormal regions", "abnormalities", "abnormal regions",
                     "anomalies", "abnormal findings")
GROUNDING_CONDITIONS = ("on this CT image", "on this CT scan", "in this CT image", "in this CT", "on this scan",
                        "in this scan", "on this image", "in this image", "on this CT", "")


def visual_prompt_instruction(kind: PromptKind, scope: Literal["single", "group", "all"]) -> str:
    if scope == "single":
        return f"{VISUAL_PROMPT_SINGLE[kind]} {REPORT_SUFFIX}"
    if kind == "cropped":
        raise ValueError("cropped visual prompts mark exactly one finding")
    if scope == "group":
        return VISUAL_PROMPT_GROUP[kind]
    return f"{VISUAL_PROMPT_ALL[kind]} {REPORT_SUFFIX}"


def grounding_instruction(rng: np.random.Generator, describe: bool, per_finding: bool = False) -> str:
    """One random instruction from the template; words joined by single spaces, first letter capitalised (the
    original's empty-prefix case left a leading space and a lower-case first word). `per_finding` asks to
    "describe each finding separately" instead of "describe the findings"."""
    prefix, suffix = GROUNDING_PREFIX_SUFFIX[rng.integers(len(GROUNDING_PREFIX_SUFFIX))]
    words = [prefix, GROUNDING_VERBS[rng.integers(len(GROUNDING_VERBS))],
             GROUNDING_TARGETS[rng.integers(len(GROUNDING_TARGETS))],
             GROUNDING_CONDITIONS[rng.integers(len(GROUNDING_CONDITIONS))]]
    if describe:
        words.append(f"and {PER_FINDING_REQUEST}" if per_finding else "and describe the findings")
    text = " ".join(w for w in words if w) + suffix
    return text[0].upper() + text[1:]


def findings_text(descriptions: Sequence[str], seg_after_each: bool = False) -> str:
    """The grounded format `Findings 1: …\\nFindings 2: …\\n`; with `seg_after_each` every line ends in ` <SEG>` (the
    per-finding flow: the query token comes after the text it grounds)."""
    tail = f" {SEG_TOKEN}" if seg_after_each else ""
    return "".join(f"Findings {i}: {text}{tail}\n" for i, text in enumerate(descriptions, start=1))
