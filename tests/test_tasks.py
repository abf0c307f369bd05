"""Each training task on the synthetic phantom: exact texts, supervised spans, masks per <SEG>, determinism."""

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from dataset.augment import SegAugment
from dataset.collate import PACK_ALIGN, PackedBatch, collate
from dataset.conversation import IGNORE_INDEX
from dataset.finish import BatchFinisher, WorkerCollate
from dataset.phantom import write_phantom
from dataset.prompts import GROUNDED_REPORT_EVAL, NO_ABNORMALITY, NO_RELEVANT_ABNORMALITY, REPORT_SUFFIX
from dataset.records import load_records
from dataset.sampler import SampleKey, TaskBatchSampler
from dataset.stack25d import seg_stack
from dataset.tasks import (
    GroundedReportTask,
    GroundingTask,
    MultiTaskDataset,
    PerFindingReportTask,
    ReferringOneRoundTask,
    ReferringTask,
    SampleBuilder,
    VisualPromptTask,
)

SEG = 64


@pytest.fixture(scope="session")
def phantom(tmp_path_factory):
    root = write_phantom(tmp_path_factory.mktemp("phantom") / "data", n=16, seed=1, size=64)
    return load_records(root / "merged_train.json")


@pytest.fixture(scope="session")
def builder(tiny_base):
    from transformers import AutoTokenizer

    from model.omniabnorm import build_image_processor
    from model.tokenizer import add_seg_token

    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    add_seg_token(tokenizer)
    return SampleBuilder(tokenizer, build_image_processor(tiny_base, 56 * 56))


def supervised_text(builder, sample):
    labels = sample.conversation.labels
    return builder.tokenizer.decode(labels[labels != IGNORE_INDEX])


def full_text(builder, sample):
    return builder.tokenizer.decode(sample.conversation.input_ids)


def seg_count(builder, sample):
    return int((sample.conversation.input_ids == builder.tokenizer.convert_tokens_to_ids("<SEG>")).sum())


def test_visual_prompt_items_and_text(phantom, builder):
    task = VisualPromptTask(phantom, builder, seed=0)
    scopes = {item[1] for item in task.items}
    assert scopes == {"single", "group", "all"}  # the phantom has groups of two lesions
    for index, item in enumerate(task.items[:40]):
        sample = task[index]
        _, scope, _kind, _ = item
        text = full_text(builder, sample)
        assert ("Describe the abnormal finding" in text) == (scope == "group")
        assert (REPORT_SUFFIX in text) == (scope != "group")
        answer = supervised_text(builder, sample)
        assert answer.endswith("<|im_end|>") and "<|im_start|>" not in answer
        if scope == "all":
            assert answer.startswith("Findings 1: ")
        assert sample.seg_slices is None and sample.image_grid_thw.shape == (1, 3)


def test_visual_prompt_online_matches_prerendered(phantom, builder):
    pre, online = VisualPromptTask(phantom, builder), VisualPromptTask(phantom, builder, online=True)
    for index in range(0, len(pre.items), 7):
        r, scope, kind, ids = pre.items[index]
        a = pre.prompt_image(pre.records[r], scope, kind, ids)
        b = online.prompt_image(online.records[r], scope, kind, ids)
        assert a.shape == b.shape
        red = lambda im: (im[..., 0] == 255) & (im[..., 1] == 0) & (im[..., 2] == 0)
        assert (red(a) == red(b)).mean() > 0.995  # same marks; only JPEG-decoded gray may differ


def test_grounding_and_grounded_report(phantom, builder):
    grounding, report = GroundingTask(phantom, builder), GroundedReportTask(phantom, builder, train=False)
    for index, record in enumerate(phantom):
        g, r = grounding[index], report[index]
        assert supervised_text(builder, g) == "<SEG><|im_end|>"
        key = record.read_slice(0)
        assert g.seg_masks.shape == (1, *key.shape) and g.seg_slices.shape == (9, *key.shape)
        assert g.seg_slices.dtype == torch.uint8 and torch.equal(g.seg_slices[4], torch.from_numpy(key))
        assert bool(g.seg_masks.any()) == (not record.is_normal)
        assert "describe the findings" not in full_text(builder, g)
        text = full_text(builder, r)
        assert GROUNDED_REPORT_EVAL in text and "<|im_start|>tool\n<|vision_start|>" in text
        assert r.image_grid_thw.shape[0] == 2 and seg_count(builder, r) == 1
        answer = supervised_text(builder, r)
        if record.is_normal:
            assert answer == f"<SEG><|im_end|>{NO_ABNORMALITY}<|im_end|>"
        else:
            expected = "".join(f"Findings {i}: {g.description}\n" for i, g in enumerate(record.groups(), 1))
            assert answer == f"<SEG><|im_end|>{expected}<|im_end|>"  # eval: descriptions, not rewrites
        assert torch.equal(r.seg_masks, g.seg_masks)  # same union mask in both flows


def test_per_finding_masks_follow_their_lines(phantom, builder):
    task = PerFindingReportTask(phantom, builder)
    for index, record in enumerate(phantom):
        sample = task[index]
        groups = record.groups()
        assert seg_count(builder, sample) == len(groups) == sample.seg_masks.shape[0]
        if len(groups) > 1:  # each finding's mask is its own group's, so the masks differ
            assert not torch.equal(sample.seg_masks[0], sample.seg_masks[1])
        for k, mask in enumerate(sample.seg_masks):
            assert mask.any()


def test_referring_positives_and_negatives(phantom, builder):
    two, one = ReferringTask(phantom, builder, seed=0), ReferringOneRoundTask(phantom, builder, seed=0)
    assert len(two) == sum(len(r.groups()) for r in phantom)
    kinds = set()
    for task in (two, one):
        for index in range(len(task)):
            sample = task[index]
            record = task.records[task.items[index][0]]
            present = {a.key for a in record.abnormalities}
            answer = supervised_text(builder, sample)
            positive = sample.meta["positive"]
            kinds.add(positive)
            if positive:
                assert sample.seg_masks.shape[0] == 1 and sample.seg_masks.any()
            else:
                assert NO_RELEVANT_ABNORMALITY in answer and not sample.seg_masks.any()
                question = sample.meta["question"].lower()
                assert not any(organ in question for organ in present)  # never about a finding present
            assert seg_count(builder, sample) == sample.seg_masks.shape[0]
    assert kinds == {True, False}


def finished(builder, samples, augment: bool = True) -> dict:
    """The samples collated and finished on the CPU, as the training step does on its device."""
    finisher = BatchFinisher(builder.vision, SegAugment() if augment else None, SEG)
    return finisher(collate(samples, builder.tokenizer.pad_token_id), "cpu")


def test_the_finisher_brings_each_sample_to_the_model_space(phantom, builder):
    """Workers ship each sample's slices and masks as read, at its own size; finished in one batch, every row is what
    the inference path builds (`seg_stack`, `SquareGeometry.to_model`), square and non-square slices alike, with
    zero masks beyond a row's own; a square slice's key channel is its z-score (float64 reference)."""
    task = GroundingTask(phantom, builder)
    samples = [task[i] for i in range(len(task))]
    assert len({s.seg_slices.shape for s in samples}) > 1  # the phantom mixes square axial and other planes
    batch = finished(builder, samples, augment=False)
    assert batch["seg_slices"].shape == (len(samples), 9, SEG, SEG) and batch["seg_masks"].dtype == torch.float32
    for row, (sample, record) in enumerate(zip(samples, phantom)):
        slices = record.read_slices()
        reference, geometry = seg_stack(np.stack([slices[o] for o in sorted(slices)]), key_index=-min(slices),
                                        size=SEG)
        assert torch.equal(batch["seg_slices"][row], torch.from_numpy(reference))
        masks = torch.from_numpy(geometry.to_model(sample.seg_masks.numpy(), binary=True)).float()
        assert torch.equal(batch["seg_masks"][row], masks)
        if slices[0].shape == (SEG, SEG):
            key = slices[0].astype(np.float64)
            np.testing.assert_allclose(batch["seg_slices"][row, 4], (key - key.mean()) / key.std(), atol=2e-6)
    two = finished(builder, [task[0], PerFindingReportTask(phantom, builder)[0]], augment=False)
    assert two["seg_masks"].shape[1] == max(1, len(phantom[0].groups())) and not two["seg_masks"][0, 1:].any()


def test_samples_are_pure_functions_of_the_key(phantom, builder):
    augmented = SampleBuilder(builder.tokenizer, builder.image_processor, augment=True)
    task = GroundedReportTask(phantom, augmented, seed=5)
    a, b = task[SampleKey(task.task, 3, 1)], task[SampleKey(task.task, 3, 1)]
    c = task[SampleKey(task.task, 3, 2)]
    assert torch.equal(a.conversation.input_ids, b.conversation.input_ids)
    assert torch.equal(a.pixel_codes, b.pixel_codes) and a.seg_augment_seed == b.seg_augment_seed
    batch_a, batch_b, batch_c = (finished(augmented, [s]) for s in (a, b, c))
    assert torch.equal(batch_a["seg_slices"], batch_b["seg_slices"])
    assert torch.equal(batch_a["pixel_values"], batch_b["pixel_values"])
    assert not (torch.equal(batch_a["seg_slices"], batch_c["seg_slices"])
                and torch.equal(a.conversation.input_ids, c.conversation.input_ids))


@pytest.mark.slow
def test_loader_batches_drive_the_tiny_model(phantom, tiny):
    model, tokenizer, image_processor, _cfg = tiny
    builder = SampleBuilder(tokenizer, image_processor, augment=True)
    dataset = MultiTaskDataset([GroundedReportTask(phantom, builder), VisualPromptTask(phantom, builder),
                                PerFindingReportTask(phantom, builder)])
    sampler = TaskBatchSampler(dataset.sizes(), batch_size=2, seed=0)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=lambda s: finished(builder, s))
    tasks_seen = set()
    for step, batch in enumerate(loader):
        out = model(**batch)
        assert torch.isfinite(out.loss)
        tasks_seen.add("seg_slices" in batch)
        if step == 6:
            break
    assert tasks_seen == {True, False}


def test_training_samples_are_augmented(phantom, builder):
    """Training samples carry their augmentation seed and the finisher really applies it to the stack and masks
    (their alignment: tests/test_augment.py); samples without a seed are left as they are."""
    augmented = SampleBuilder(builder.tokenizer, builder.image_processor, augment=True)
    plain, aug = (GroundingTask([r for r in phantom if not r.is_normal], b, seed=2) for b in (builder, augmented))
    changed = 0
    for index in range(len(plain)):
        key = SampleKey(plain.task, index, 0)
        a, b = plain[key], aug[key]
        assert a.seg_augment_seed is None and b.seg_augment_seed is not None
        assert torch.equal(a.seg_slices, b.seg_slices)  # the stack itself is augmented later
        batch_a, batch_b = finished(builder, [a]), finished(builder, [b])
        assert torch.equal(batch_a["seg_slices"], finished(builder, [a], augment=False)["seg_slices"])  # no seed
        assert set(np.unique(batch_b["seg_masks"].numpy())) <= {0.0, 1.0}
        assert batch_b["seg_slices"].shape == batch_a["seg_slices"].shape
        changed += not torch.equal(batch_a["seg_slices"], batch_b["seg_slices"])
    assert changed >= len(plain) // 2


def test_finishing_in_the_worker_or_on_the_device_gives_the_same_batch(phantom, builder):
    """data.finish_on: the batch finished by a DataLoader worker's collate and the one finished in the training
    step are identical (on the CPU, where both run the same generator), in several batch orders; both travel packed
    through a real worker."""
    augmented = SampleBuilder(builder.tokenizer, builder.image_processor, augment=True)
    task = PerFindingReportTask(phantom, augmented, seed=3)
    keys = [[SampleKey(task.task, i, 0) for i in range(4)]]
    samples = [task[key] for key in keys[0]]
    finisher = BatchFinisher(builder.vision, SegAugment(), SEG)
    pad = builder.tokenizer.pad_token_id

    def through_a_worker(collate_fn):
        (batch,) = DataLoader(task, batch_sampler=keys, num_workers=1, collate_fn=collate_fn)
        assert isinstance(batch, PackedBatch)
        return batch

    in_worker = finisher(through_a_worker(WorkerCollate(pad, finisher)), "cpu")
    in_step = finisher(through_a_worker(WorkerCollate(pad)), torch.device("cpu"))
    assert in_worker.keys() == in_step.keys() and "seg_augment_seed" not in in_step
    for key in in_step:
        assert torch.equal(in_worker[key], in_step[key]), key
    in_process = WorkerCollate(pad)(samples)  # num_workers: 0: no handover, so nothing is packed
    assert isinstance(in_process, dict)
    direct = finisher(in_process, "cpu")
    for key in in_step:
        assert torch.equal(direct[key], in_step[key]), key
    # each row is a function of its own sample: the same sample alone or in another batch order gives the same
    reordered = finished(augmented, samples[::-1])
    alone = finished(augmented, samples[2:3])
    assert torch.equal(reordered["seg_slices"][1], in_step["seg_slices"][2])
    assert torch.equal(alone["seg_slices"][0], in_step["seg_slices"][2])
    n = int(alone["seg_target_mask"].sum())
    assert torch.equal(alone["seg_masks"][0, :n], in_step["seg_masks"][2, :n])


def test_packed_batches_unpack_bit_for_bit(monkeypatch):
    """PackedBatch: every tensor and list of tensors back with its dtype, shape and bits, as aligned views of one
    buffer; what cannot be packed is refused; the DataLoader's pin-memory step keeps it packed."""
    generator = torch.Generator().manual_seed(0)
    batch = {
        "input_ids": torch.randint(0, 2**40, (2, 7), generator=generator),
        "seg_masks": [torch.rand(3, 5, 6, generator=generator) > 0.5, torch.zeros(0, 4, 4, dtype=torch.bool)],
        "pixel_values": torch.randn(9, 4, generator=generator).t(),  # not contiguous
        "pixel_codes": torch.randint(0, 256, (3, 13), dtype=torch.uint8, generator=generator),
        "weights": torch.randn(5, generator=generator).bfloat16(),
        "step": torch.tensor(3.5, dtype=torch.float64),
    }
    packed = PackedBatch.pack(batch)
    unpacked = packed.unpack()
    assert list(unpacked) == list(batch)
    pairs = [(unpacked[k], v) for k, v in batch.items() if not isinstance(v, list)]
    pairs += [pair for k, v in batch.items() if isinstance(v, list) for pair in zip(unpacked[k], v, strict=True)]
    for got, want in pairs:
        assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want)
        assert got.untyped_storage().data_ptr() == packed.buffer.untyped_storage().data_ptr()
        assert (got.data_ptr() - packed.buffer.data_ptr()) % PACK_ALIGN == 0
    with pytest.raises(TypeError, match="'meta' holds a dict"):
        PackedBatch.pack({"meta": {"id": 1}})
    with pytest.raises(ValueError, match="'seg_masks' is an empty list"):
        PackedBatch.pack({"seg_masks": []})
    # pinning needs an accelerator; a copy stands in for it: what matters is that the DataLoader keeps the batch packed
    from torch.utils.data._utils.pin_memory import pin_memory
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self, *args, **kwargs: self.clone())
    pinned = pin_memory(packed)
    assert isinstance(pinned, PackedBatch) and pinned.buffer.data_ptr() != packed.buffer.data_ptr()
    assert torch.equal(pinned.unpack()["input_ids"], batch["input_ids"])


def test_instruction_qa_and_report_corpus(tmp_path, builder):
    from PIL import Image

    from dataset.ct import InputError
    from dataset.prompts import REPORT_CORPUS_INSTRUCTION
    from dataset.tasks import InstructionQATask, ReportCorpusTask, load_pubmedvision_ct, load_report_corpus

    Image.fromarray(np.full((40, 30, 3), 90, np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.arange(1200, dtype=np.uint16).reshape(40, 30) * 50).save(tmp_path / "b.png")
    qa = [{"image": ["a.png"], "modality": "CT", "conversations": [
              {"from": "human", "value": "<image>\nWhat organ is shown?"}, {"from": "gpt", "value": "The liver."},
              {"from": "human", "value": "Second?"}, {"from": "gpt", "value": "Ignored."}]},
          {"image": ["a.png", "b.png"], "modality": "CT", "conversations": []},  # several images: skipped
          {"image": ["a.png"], "modality": "MRI", "conversations": []},  # not CT: skipped
          {"image": "b.png", "modality": "Computed Tomography", "conversations": [
              {"from": "human", "value": "Q?"}, {"from": "gpt", "value": "A."}]}]
    (tmp_path / "qa.json").write_text(__import__("json").dumps(qa))
    pairs = load_pubmedvision_ct(tmp_path / "qa.json")
    assert pairs == [(tmp_path / "a.png", "What organ is shown?", "The liver."), (tmp_path / "b.png", "Q?", "A.")]
    task = InstructionQATask(pairs, builder)
    assert supervised_text(builder, task[0]) == "The liver.<|im_end|>"
    assert "What organ is shown?<|im_end|>" in full_text(builder, task[0])
    assert task[1].pixel_codes is not None  # a 16-bit image is shown stretched, not wrapped
    (tmp_path / "corpus.json").write_text('[{"image": "a.png", "caption": "No acute findings."}]')
    corpus = ReportCorpusTask(load_report_corpus(tmp_path / "corpus.json"), builder)
    assert REPORT_CORPUS_INSTRUCTION in full_text(builder, corpus[0])
    (tmp_path / "bad.json").write_text('[{"image": "a.png"}]')
    with pytest.raises(InputError, match="needs non-empty 'image' and 'caption'"):
        load_report_corpus(tmp_path / "bad.json")
