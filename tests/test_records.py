"""The OmniAbnorm-CT-14K annotation format: paths, groups, grouped test files, masks, HU slices, bad input."""

import json

import numpy as np
import pytest
from PIL import Image

from dataset.ct import InputError
from dataset.readers import read_image
from dataset.records import load_records


def write_sample(root, sid, context=(-1, 0, 1), masks=None, size=(40, 32), bits=8):
    image_dir, mask_dir = root / "images" / sid, root / "masks" / sid
    image_dir.mkdir(parents=True)
    mask_dir.mkdir(parents=True)
    h, w = size
    for offset in context:
        if bits == 8:
            Image.fromarray(np.full((h, w), 100 + 10 * offset, np.uint8)).save(image_dir / f"{offset}.jpg", quality=100)
        else:
            Image.fromarray(np.full((h, w), 32768 + 40 + offset, np.uint16)).save(image_dir / f"{offset}.png")
    for abn_id, (y, x) in (masks or {}).items():
        mask = np.zeros((h, w), np.uint8)
        mask[y:y + 6, x:x + 5] = 255
        Image.fromarray(mask).save(mask_dir / f"{abn_id}.jpeg")
    return {"image": f"images/{sid}", "mask": f"masks/{sid}", "context": list(context)}


def abnormality(i, group, **extra):
    return {"id": i, "group_id": group, "label": f"lesion {i}", "description": f"Finding {i}.",
            "rewritten_findings": [f"Rewritten {i}."], "category": ["Digestive system", "Liver", "Cyst"],
            "referring_prompt_1": "Evaluate the liver.", **extra}


def test_train_file_groups_masks_and_relative_root(tmp_path):
    datum = write_sample(tmp_path, "s1", masks={1: (2, 3), 2: (20, 20), 3: (30, 5)})
    datum["abnormality"] = [abnormality(1, 1), abnormality(2, 2), abnormality(3, 2)]
    datum["abnormality_group"] = {"1": {"id": [1]}, "2": {"id": [2, 3]}}
    normal = write_sample(tmp_path, "s2")
    (tmp_path / "axial").mkdir()
    (tmp_path / "axial" / "axial_valid.json").write_text(json.dumps({"s1": datum, "s2": normal}))
    records = load_records(tmp_path / "axial" / "axial_valid.json")  # root found by walking up from the JSON
    r1, r2 = records
    assert r1.plane == "axial" and r1.context == [-1, 0, 1] and r2.is_normal and not r1.is_normal
    assert [g.ids for g in r1.groups()] == [[1], [2, 3]]
    assert r1.groups()[1].rewritten_findings == ["Rewritten 2.", "Rewritten 3."]
    slices = r1.read_slices()
    assert sorted(slices) == [-1, 0, 1] and abs(float(slices[1].mean()) - 110) < 1
    assert slices[0].dtype == np.uint8  # 8-bit files stay bytes: consumers convert to float32 themselves
    masks = r1.read_masks([1, 3], (40, 32))
    assert masks.dtype == bool and masks.sum(axis=(1, 2)).tolist() == [30, 30]  # JPEG ringing thresholded away
    assert masks[0, 2:8, 3:8].all() and masks[1, 30:36, 5:10].all()
    assert r1.abnormalities[0].referring_prompts == ["Evaluate the liver."] and r1.abnormalities[0].key == "liver"


def test_grouped_test_file_and_hu_slices(tmp_path):
    datum = write_sample(tmp_path, "g", context=(0, 1), masks={4: (0, 0), 5: (9, 9)}, bits=16)
    datum.update(hu_offset=32768, windows=[[-100, 200]], dataset="MSD_Liver")
    datum["abnormality_group"] = {"7": [abnormality(4, 7, referring_prompt=["Is there a liver lesion?"],
                                                   negative_referring_prompt=["Evaluate the spleen."]),
                                        abnormality(5, 7)]}
    (tmp_path / "x_valid_grouped.json").write_text(json.dumps({"g": datum}))
    (record,) = load_records(tmp_path / "x_valid_grouped.json")
    assert [a.group_id for a in record.abnormalities] == [7, 7] and record.windows == [(-100.0, 200.0)]
    assert record.abnormalities[0].negative_prompts == ["Evaluate the spleen."]
    assert "Is there a liver lesion?" in record.abnormalities[0].referring_prompts
    hu = record.read_slices()[1]
    assert hu.dtype == np.float32 and hu[0, 0] == 41.0  # HU = stored − 32768, exactly


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.update(context=[1, 2]), "must include offset 0"),
    (lambda d: d.update(abnormality=[{"id": 1}, {"id": 1}]), "ids repeat"),
    (lambda d: d.update(abnormality=[{"label": "x"}]), "integer 'id'"),
])
def test_bad_annotations(tmp_path, mutate, message):
    datum = write_sample(tmp_path, "b")
    mutate(datum)
    (tmp_path / "a.json").write_text(json.dumps({"b": datum}))
    with pytest.raises(InputError, match=message):
        load_records(tmp_path / "a.json")


def test_missing_files_are_named(tmp_path):
    datum = write_sample(tmp_path, "m", context=(0,))
    datum["context"] = [0, 1]
    datum["abnormality"] = [abnormality(9, 9)]
    (tmp_path / "a.json").write_text(json.dumps({"m": datum}))
    (record,) = load_records(tmp_path / "a.json")
    with pytest.raises(InputError, match="slice 1 of sample m"):
        record.read_slices()
    with pytest.raises(InputError, match="mask of abnormality 9"):
        record.read_masks([9], (40, 32))
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(InputError, match="not valid JSON"):
        load_records(tmp_path / "bad.json")


def test_a_colour_saved_slice_reads_as_inference_reads_it(tmp_path):
    """A slice saved as RGB JPEG (grey with slight colour noise) gives training the uint8 luma inference's reader
    gives for the same file (Pillow's ITU-R 601 "L"), not a float of its own."""
    datum = write_sample(tmp_path, "s1", context=(0,))
    rgb = np.random.default_rng(0).integers(0, 256, (40, 32, 3)).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "images" / "s1" / "0.jpg", quality=95)
    (tmp_path / "test.json").write_text(json.dumps({"s1": datum}))
    key = load_records(tmp_path / "test.json")[0].read_slice(0)
    assert key.dtype == np.uint8 and np.array_equal(key, read_image(tmp_path / "images" / "s1" / "0.jpg").pixels[0])
