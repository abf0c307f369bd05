"""The exact task texts of SPEC §4.4."""

import numpy as np
import pytest

from dataset.prompts import (
    GROUNDING_CONDITIONS,
    GROUNDING_VERBS,
    findings_text,
    grounding_instruction,
    visual_prompt_instruction,
)

SUFFIX = ("Please use precise medical terminology, maintain the concise reporting style used in formal radiology "
          "reports and provide only the specific radiological findings. Do not list general possibilities, "
          "explanations, or recommendations.")


def test_visual_prompt_texts_are_exact():
    assert visual_prompt_instruction("bbox", "single") == \
        f"What are the main findings indicated by the red box in the image? {SUFFIX}"
    assert visual_prompt_instruction("cropped", "single") == \
        f"What are the main findings at the center of this image? {SUFFIX}"
    assert visual_prompt_instruction("ellipse", "group") == \
        "Describe the abnormal finding indicated by the red circular/elliptical demarcations in the image."
    assert visual_prompt_instruction("contour", "all") == \
        f"What are the main findings indicated by the red-outlined areas in the image? {SUFFIX}"
    with pytest.raises(ValueError):
        visual_prompt_instruction("cropped", "group")


def test_grounding_instructions_cover_the_template_and_are_capitalised():
    rng = np.random.default_rng(0)
    seen = [grounding_instruction(rng, describe=True) for _ in range(3000)]
    for text in seen:
        assert text[0].isupper() and "  " not in text and not text.startswith(" ")
        assert text.endswith(("and describe the findings.", "and describe the findings?"))
        assert text.endswith("?") == text.lower().startswith("can you")
    assert {v for v in GROUNDING_VERBS if any(f" {v} " in t or t.lower().startswith(v) for t in seen)} == \
        set(GROUNDING_VERBS)
    assert any(t.startswith("Please help me ") for t in seen) and any(t.startswith("Can you help me ") for t in seen)
    # The empty condition joins without a double space; every other condition appears verbatim.
    assert all(any(f" {c} and describe" in t for t in seen) for c in GROUNDING_CONDITIONS if c)
    bare = grounding_instruction(np.random.default_rng(1), describe=False)
    assert "describe" not in bare and bare[-1] in ".?"


def test_findings_format():
    assert findings_text(["A.", "B."]) == "Findings 1: A.\nFindings 2: B.\n"
    assert findings_text(["A."], seg_after_each=True) == "Findings 1: A. <SEG>\n"
