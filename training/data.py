"""Datasets, sampler and loader from the run config: task quotas → task-homogeneous distributed batches."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from dataset.augment import SegAugment
from dataset.ct import PLANES, InputError
from dataset.finish import BatchFinisher, WorkerCollate
from dataset.phantom import write_phantom
from dataset.records import Record, load_records
from dataset.sampler import TaskBatchSampler
from dataset.tasks import (
    RECORD_TASKS,
    GroundingTask,
    InstructionQATask,
    MultiTaskDataset,
    ReportCorpusTask,
    SampleBuilder,
    load_pubmedvision_ct,
    load_report_corpus,
)
from dataset.vision import VisionPreprocessor
from training.config import TrainConfig
from training.distributed import Dist


@dataclass
class DataFiles:
    """Resolved annotation files: the data root and absolute paths."""

    root: Path
    train: list[Path]
    valid: list[Path]


def prepare_data(cfg: TrainConfig, env: Dist) -> DataFiles:
    """Resolve the data files; with `data.phantom`, rank 0 first writes the phantom into `<output_dir>/phantom`
    (kept across resumes: the same settings give byte-identical files)."""
    data = cfg.data
    if data.phantom is None:
        root = Path(data.root)
        return DataFiles(root, [root / p for p in data.train_json], [root / p for p in data.valid_json])
    root = Path(cfg.output_dir) / "phantom"
    settings = json.loads((root / "phantom.json").read_text()) if (root / "phantom.json").is_file() else None
    p = data.phantom
    if env.is_main and (settings is None or (settings["n"], settings["seed"], settings["size"]) != (p.n, p.seed, p.size)):
        write_phantom(root, n=p.n, seed=p.seed, size=p.size, valid_fraction=p.valid_fraction, overwrite=True)
    env.barrier()
    valid = [root / plane / f"{plane}_valid.json" for plane in PLANES]
    return DataFiles(root, [root / "merged_train.json"], [v for v in valid if json.loads(v.read_text())])


def read_records(files: list[Path]) -> list[Record]:
    """Paths inside each file resolve against its own folder or the nearest parent where they exist."""
    return [record for path in files for record in load_records(path)]


def build_train_dataset(cfg: TrainConfig, files: DataFiles, tokenizer, image_processor) -> MultiTaskDataset:
    """One dataset per task with a positive quota; a configured task without samples is an error."""
    builder = SampleBuilder(tokenizer, image_processor, augment=cfg.data.augment)
    wanted = [name for name, quota in cfg.data.tasks.items() if quota > 0]
    records = read_records(files.train) if any(name in RECORD_TASKS for name in wanted) else []
    tasks = []
    for name in wanted:
        if name in RECORD_TASKS:
            tasks.append(RECORD_TASKS[name](records, builder, seed=cfg.seed))
        elif name == "instruction_qa":
            tasks.append(InstructionQATask(load_pubmedvision_ct(cfg.data.instruction_qa_json), builder, seed=cfg.seed))
        else:
            tasks.append(ReportCorpusTask(load_report_corpus(cfg.data.report_corpus_json), builder, seed=cfg.seed))
    empty = [t.task for t in tasks if len(t) == 0]
    if empty:
        raise InputError(f"task(s) {', '.join(empty)} have no samples in {', '.join(map(str, files.train))}; "
                         "set their data.tasks quota to 0 or add data for them")
    return MultiTaskDataset(tasks)


def steps_per_epoch(cfg: TrainConfig, world_size: int) -> int:
    """Optimizer steps per epoch: the summed quotas over the global batch, rounded up."""
    global_batch = cfg.micro_batch_size * cfg.grad_accumulation * world_size
    return max(1, math.ceil(sum(cfg.data.tasks.values()) / global_batch))


def build_finisher(cfg: TrainConfig, image_processor) -> BatchFinisher:
    return BatchFinisher(VisionPreprocessor(image_processor), SegAugment() if cfg.data.augment else None,
                         cfg.model.seg.image_size)


def build_loader(cfg: TrainConfig, dataset: MultiTaskDataset, env: Dist, pad_token_id: int, finisher: BatchFinisher
                 ) -> tuple[DataLoader, TaskBatchSampler]:
    """Sampler steps are micro-steps; an epoch is a whole number of optimizer steps, so no accumulation group
    straddles two epochs. With `data.finish_on: worker` the workers also finish the batches (on the CPU)."""
    weights = {name: float(q) for name, q in cfg.data.tasks.items() if q > 0}
    sampler = TaskBatchSampler(dataset.sizes(), batch_size=cfg.micro_batch_size, world_size=env.world_size,
                               rank=env.rank, seed=cfg.seed, task_weights=weights,
                               steps_per_epoch=steps_per_epoch(cfg, env.world_size) * cfg.grad_accumulation)
    # Its own generator: creating an iterator draws a worker base seed, which must not advance the global torch
    # RNG (dropout) differently in a resumed run that starts mid-epoch. Samples take no randomness from workers.
    collate_fn = WorkerCollate(pad_token_id, finisher if cfg.data.finish_on == "worker" else None)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_fn,
                        num_workers=cfg.data.num_workers, pin_memory=env.device.type == "cuda",
                        generator=torch.Generator().manual_seed(cfg.seed))
    return loader, sampler


def build_valid_grounding(cfg: TrainConfig, files: DataFiles, tokenizer, image_processor) -> GroundingTask:
    """Held-out grounding cases (no augmentation, no jitter) for the periodic key-slice Dice."""
    builder = SampleBuilder(tokenizer, image_processor)
    return GroundingTask(read_records(files.valid), builder, seed=cfg.seed, train=False)
