"""What a run reports: a JSONL line per step (`metrics.jsonl`, read by tests and plots), a console line every
`log_every` steps, a tqdm bar with ETA, and TensorBoard event files when the `tensorboard` package is installed.
Only rank 0 writes."""

from __future__ import annotations

import json
import resource
from pathlib import Path

import torch
from tqdm import tqdm

try:  # torch.utils.tensorboard needs the tensorboard package, which is optional here
    from torch.utils.tensorboard import SummaryWriter
except ImportError:
    SummaryWriter = None

METRICS_FILE = "metrics.jsonl"


def memory_mb(device: torch.device) -> dict[str, float]:
    """Peak CUDA memory allocated on GPU; peak resident set size of this process on CPU (MB)."""
    if device.type == "cuda":
        return {"cuda_max_allocated_mb": torch.cuda.max_memory_allocated(device) / 2**20}
    return {"rss_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # Linux reports KiB


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


class RunLog:
    def __init__(self, run_dir: Path, enabled: bool, start_step: int, total_steps: int, log_every: int,
                 tensorboard: bool):
        self.enabled = enabled
        self.log_every = log_every
        self.path = run_dir / METRICS_FILE
        self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
                        disable=not enabled)
        self.writer = None
        if enabled:
            # A resumed run replays the steps after its checkpoint: drop their old lines so each step appears once.
            kept = [m for m in read_metrics(run_dir) if m.get("step", 0) <= start_step]
            self.path.write_text("".join(json.dumps(m) + "\n" for m in kept))
            if tensorboard and SummaryWriter is not None:
                self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step + 1)
            elif tensorboard:
                self.write("TensorBoard: the tensorboard package is not installed; metrics go to metrics.jsonl only")

    def write(self, text: str) -> None:
        if self.enabled:
            tqdm.write(text)

    def step(self, metrics: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(metrics) + "\n")
        if self.writer is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.writer.add_scalar(f"train/{key}", value, metrics["step"])
        self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}", refresh=False)
        self.bar.update(1)
        if metrics["step"] % self.log_every == 0 or metrics["step"] == self.bar.total:
            self.write(format_line(metrics, self.bar.total))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.bar.close()


def format_line(m: dict, total: int) -> str:
    seg = f" dice {m['dice']:.4f} bce {m['bce']:.4f} | seg Dice {m['seg_dice']:.3f}" if m.get("seg_dice") is not None \
        else ""
    mem = ", ".join(f"{k} {v:.0f}" for k, v in m.items() if k.endswith("_mb"))
    return (f"step {m['step']}/{total} | {'+'.join(m['tasks'])} | loss {m['loss']:.4f} (ce {m['ce']:.4f}{seg}) | "
            f"lr {m['lr']:.3e} | grad norm {m['grad_norm']:.3f} | {m['samples_per_s']:.2f} samples/s | {mem}")
