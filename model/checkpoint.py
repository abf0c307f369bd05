"""Checkpoints: the released OmniAbnorm-CT layout (load, export) and our own format (save / load).

Released layout (SPEC §3.4), written with transformers 4.49 + peft 0.10::

    adapter_config.json, adapter_model.safetensors      LoRA, keys base_model.model.model.layers.{i}.…
    extended_tokenizer/                                 Qwen tokenizer + <SEG>
    seg_model_lm_head_embed_tokens.pt                   {seg_model, lm_head_state_dict, embed_tokens_state_dict}

Our format: `omniabnorm.json` (format tag + ModelConfig), `vlm_trained.safetensors` (LoRA tensors and the trained
token rows, by module path), `seg_module.safetensors`, `tokenizer/`. Only trained tensors are stored; the base
VLM is read from `model.base_model`. Nothing is unpickled except the released `.pt`, with `weights_only=True`.

Export to the released layout (for tools built on the original code):
    python -m model.checkpoint export-released --checkpoint CKPT --out DIR [--base-model DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from pathlib import Path

import safetensors.torch
import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

from model.config import LoraSettings, ModelConfig
from model.omniabnorm import OmniAbnormCT, build_model, fully_trained_modules
from utils.atomic import atomic_folder

FORMAT = "omniabnorm-ct-checkpoint/1"
RELEASED_FILES = ("adapter_config.json", "adapter_model.safetensors", "extended_tokenizer",
                  "seg_model_lm_head_embed_tokens.pt")


class CheckpointError(RuntimeError):
    """A checkpoint folder is incomplete or does not fit the model it is loaded into."""


# transformers 4.49 named the LLM `model.*`; 5.x nests it as `model.language_model.*` and the vision tower as
# `model.visual.*`. The adapter file also carries peft's `base_model.model.` prefix and no adapter name.
_PEFT_PREFIX = "base_model.model."
_OLD_LLM = re.compile(r"^model\.(?!language_model\.|visual\.)")
_OLD_VISUAL = re.compile(r"^visual\.")
_LORA_WEIGHT = re.compile(r"\.(lora_[AB])\.weight$")


def released_key_to_module_name(key: str, adapter_name: str = "default") -> str:
    """Map a released (transformers 4.49 / peft 0.10) tensor name to this model's parameter name.

    >>> released_key_to_module_name("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight")
    'model.language_model.layers.0.self_attn.q_proj.lora_A.default.weight'
    >>> released_key_to_module_name("model.embed_tokens.weight")
    'model.language_model.embed_tokens.weight'
    """
    key = key.removeprefix(_PEFT_PREFIX)
    key = _OLD_VISUAL.sub("model.visual.", _OLD_LLM.sub("model.language_model.", key))
    return _LORA_WEIGHT.sub(rf".\1.{adapter_name}.weight", key)


def module_name_to_released_key(name: str) -> str:
    """Inverse of `released_key_to_module_name` (without peft's prefix, which only the adapter file carries).

    >>> module_name_to_released_key("model.language_model.layers.0.self_attn.q_proj.lora_A.default.weight")
    'model.layers.0.self_attn.q_proj.lora_A.weight'
    """
    name = re.sub(r"\.(lora_[AB])\.[^.]+\.weight$", r".\1.weight", name)
    return re.sub(r"^model\.visual\.", "visual.", name.replace("model.language_model.", "model.", 1))


def load_released(cfg: ModelConfig, require_seg_module: bool = True):
    """Load `cfg.released_checkpoint` onto the base `cfg.base_model` → (model, tokenizer, image_processor).

    LoRA settings come from the release's `adapter_config.json`. Every LoRA tensor, the full embedding and head
    matrices and the segmentation module (strict) are loaded; any tensor that does not land raises.
    `require_seg_module=False` accepts an empty `seg_model` (the tiny fixture has one).
    """
    ckpt = Path(cfg.released_checkpoint)
    missing = [name for name in RELEASED_FILES if not (ckpt / name).exists()]
    if missing:
        raise CheckpointError(f"{ckpt} is not a released OmniAbnorm-CT checkpoint: missing {', '.join(missing)}")
    adapter_cfg = json.loads((ckpt / "adapter_config.json").read_text())
    cfg = dataclasses.replace(cfg, lora=LoraSettings(
        r=adapter_cfg["r"], alpha=adapter_cfg["lora_alpha"], dropout=adapter_cfg["lora_dropout"],
        target_modules=tuple(sorted(adapter_cfg["target_modules"]))))
    tokenizer = AutoTokenizer.from_pretrained(str(ckpt / "extended_tokenizer"))
    model, tokenizer, image_processor = build_model(cfg, tokenizer=tokenizer)
    vlm = model.vlm

    bundle = torch.load(ckpt / "seg_model_lm_head_embed_tokens.pt", map_location="cpu", weights_only=True)
    layers = {"model.language_model.embed_tokens.weight": vlm.get_input_embeddings(),
              "lm_head.weight": vlm.get_output_embeddings()}
    for key, value in {**bundle["embed_tokens_state_dict"], **bundle["lm_head_state_dict"]}.items():
        layer = layers.get(released_key_to_module_name(key))
        if layer is None:
            raise CheckpointError(f"unexpected tensor {key!r} in seg_model_lm_head_embed_tokens.pt")
        _copy_checked(layer.weight, value, key)
        layer.load_rows_from_weight()

    adapter = load_file(ckpt / "adapter_model.safetensors")
    mapped = {released_key_to_module_name(k): v for k, v in adapter.items()}
    _load_exact(vlm, mapped, {n for n, _ in vlm.named_parameters() if ".lora_" in n}, "LoRA tensors")

    seg_state = bundle["seg_model"]
    if seg_state or require_seg_module:
        try:
            model.seg_module.load_state_dict(seg_state, strict=True)
        except RuntimeError as err:
            raise CheckpointError(f"segmentation module in {ckpt.name} does not fit: {err}") from None
    return model, tokenizer, image_processor


def load_starting_point(cfg: ModelConfig, tokenizer=None, require_seg_module: bool = True):
    """The model a config starts from: the released checkpoint on the base if one is named, else the bare base."""
    if cfg.released_checkpoint:
        return load_released(cfg, require_seg_module=require_seg_module)
    return build_model(cfg, tokenizer=tokenizer)


def _load_exact(module: torch.nn.Module, state: dict[str, torch.Tensor], expected: set[str], what: str) -> None:
    """Copy `state` into `module`'s parameters; its names must be exactly `expected` and every shape must fit."""
    if set(state) != expected:
        file_only, model_only = sorted(set(state) - expected), sorted(expected - set(state))
        raise CheckpointError(f"{what} do not match the model: {len(file_only)} in the file only (e.g. "
                              f"{file_only[:2]}), {len(model_only)} in the model only (e.g. {model_only[:2]})")
    own = dict(module.named_parameters())
    for name, value in state.items():
        _copy_checked(own[name], value, name)


def _copy_checked(param: torch.Tensor, value: torch.Tensor, name: str) -> None:
    if tuple(param.shape) != tuple(value.shape):
        raise CheckpointError(f"{name}: checkpoint shape {tuple(value.shape)} != model shape {tuple(param.shape)}")
    with torch.no_grad():
        param.copy_(value)


def trained_vlm_state(model: OmniAbnormCT) -> dict[str, torch.Tensor]:
    """The VLM tensors that training changes: LoRA, the trainable token rows and the fully trained modules."""
    full = {id(p) for m in fully_trained_modules(model.vlm, model.config) for p in m.parameters()}
    return {n: p.detach().contiguous() for n, p in model.vlm.named_parameters()
            if ".lora_" in n or n.endswith("trainable_rows") or id(p) in full}


def seg_module_tensor_names(model: OmniAbnormCT) -> list[str]:
    """The segmentation module's state-dict names with each aliased tensor once (`.conv` and `.all_modules.0` are one
    tensor): the names its file stores. safetensors' `load_model` fills the aliases back in."""
    persistent = model.seg_module.state_dict(keep_vars=True)
    names = [n for n, _ in model.seg_module.named_parameters()] + [n for n, _ in model.seg_module.named_buffers()]
    return [n for n in names if n in persistent]


def save_checkpoint(model: OmniAbnormCT, tokenizer, out_dir: str | Path, extra: dict | None = None,
                    state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write our format atomically: a reader sees the old folder or the complete new one, never a partial one.

    The tensors are read from `model`, or from `state` when given: full tensors by `OmniAbnormCT` parameter name
    (`vlm.…`, `seg_module.…`), e.g. gathered from FSDP2 shards by torch.distributed.checkpoint's `get_state_dict`.
    """
    vlm_state = trained_vlm_state(model)
    vlm_names, seg_names = list(vlm_state), seg_module_tensor_names(model)
    if state is None:
        state = {f"vlm.{n}": t for n, t in vlm_state.items()}
        state.update({f"seg_module.{n}": t for n, t in model.seg_module.state_dict().items()})
    missing = [n for n in [f"vlm.{n}" for n in vlm_names] + [f"seg_module.{n}" for n in seg_names] if n not in state]
    if missing:
        raise CheckpointError(f"cannot save: {len(missing)} trained tensors are not in the given state (e.g. "
                              f"{missing[:2]})")
    meta = {"format": FORMAT, "seg_token_id": model.seg_token_id, "model": model.config.to_dict(),
            **({"extra": extra} if extra else {})}
    with atomic_folder(out_dir) as tmp:
        save_file({n: state[f"vlm.{n}"].contiguous() for n in vlm_names}, tmp / "vlm_trained.safetensors",
                  metadata={"format": "pt"})
        save_file({n: state[f"seg_module.{n}"].contiguous() for n in seg_names}, tmp / "seg_module.safetensors",
                  metadata={"format": "pt"})
        tokenizer.save_pretrained(tmp / "tokenizer")
        (tmp / "omniabnorm.json").write_text(json.dumps(meta, indent=2))
    return Path(out_dir)


def load_checkpoint(checkpoint_dir: str | Path, base_model: str | Path | None = None):
    """Load our format → (model, tokenizer, image_processor); `base_model` overrides the recorded base folder."""
    ckpt = Path(checkpoint_dir)
    meta_path = ckpt / "omniabnorm.json"
    if not meta_path.is_file():
        hint = " (this looks like the released layout: use load_released)" if (ckpt / "adapter_config.json").exists() else ""
        raise CheckpointError(f"{ckpt} has no omniabnorm.json{hint}")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{meta_path}: unknown format {meta.get('format')!r}, expected {FORMAT!r}")
    cfg = ModelConfig.from_dict(meta["model"])
    if base_model is not None:
        cfg.base_model = str(base_model)
    elif not Path(cfg.base_model).is_absolute() and (ckpt / cfg.base_model).is_dir():
        cfg.base_model = str(ckpt / cfg.base_model)  # a base shipped inside the checkpoint (checkpoint/demo/)
    tokenizer = AutoTokenizer.from_pretrained(str(ckpt / "tokenizer"))
    # The segmentation module is read from our file below, so the starting point need not carry one.
    model, tokenizer, image_processor = load_starting_point(cfg, tokenizer, require_seg_module=False)
    if model.seg_token_id != meta["seg_token_id"]:
        raise CheckpointError(f"<SEG> id {model.seg_token_id} differs from the saved {meta['seg_token_id']}")

    state = load_file(ckpt / "vlm_trained.safetensors")
    _load_exact(model.vlm, state, set(trained_vlm_state(model)), f"{ckpt.name}: trained tensors")
    try:
        missing, unexpected = safetensors.torch.load_model(model.seg_module, str(ckpt / "seg_module.safetensors"),
                                                           strict=False)
    except RuntimeError as err:  # torch's "size mismatch for …": the saved module was built with other sizes
        detail = " ".join(str(err).split())[:400]
        raise CheckpointError(f"{ckpt.name}: segmentation module does not fit the configured sizes ({detail})") from None
    if missing or unexpected:
        raise CheckpointError(f"{ckpt.name}: segmentation module mismatch (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]})")
    return model, tokenizer, image_processor


def export_released(model: OmniAbnormCT, tokenizer, out_dir: str | Path) -> Path:
    """Write `model` in the released layout (module docstring), atomically; `load_released` reads it back exactly.

    The layout holds LoRA, the full embedding and head matrices (trained `<SEG>` rows written in) and the
    segmentation module, so a model with a trained vision tower or without LoRA cannot be expressed in it.
    """
    cfg = model.config
    if cfg.lora is None or fully_trained_modules(model.vlm, cfg):
        raise CheckpointError("the released layout stores LoRA, the embedding and head matrices and the segmentation "
                              f"module only; this model has lora={cfg.lora is not None}, train_vision="
                              f"{cfg.train_vision!r}, train_language_model={cfg.train_language_model}: keep it in our "
                              "format")
    vlm = model.vlm
    adapter = {_PEFT_PREFIX + module_name_to_released_key(n): p.detach().contiguous()
               for n, p in vlm.named_parameters() if ".lora_" in n}
    # peft 0.10's LoraConfig fields (the release's reader rejects keys it does not know).
    adapter_config = {
        "alpha_pattern": {}, "auto_mapping": None, "base_model_name_or_path": Path(cfg.base_model).name,
        "bias": "none", "fan_in_fan_out": False, "inference_mode": False, "init_lora_weights": True,
        "layer_replication": None, "layers_pattern": None, "layers_to_transform": None, "loftq_config": {},
        "lora_alpha": cfg.lora.alpha, "lora_dropout": cfg.lora.dropout, "megatron_config": None,
        "megatron_core": "megatron.core", "modules_to_save": None, "peft_type": "LORA", "r": cfg.lora.r,
        "rank_pattern": {}, "revision": None, "target_modules": sorted(cfg.lora.target_modules),
        "task_type": "CAUSAL_LM", "use_dora": False, "use_rslora": False,
    }
    bundle = {
        "seg_model": model.seg_module.state_dict(),
        "lm_head_state_dict": {"lm_head.weight": vlm.get_output_embeddings().merged_weight()},
        "embed_tokens_state_dict": {"model.embed_tokens.weight": vlm.get_input_embeddings().merged_weight()},
    }
    with atomic_folder(out_dir) as tmp:
        save_file(adapter, tmp / "adapter_model.safetensors", metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))
        tokenizer.save_pretrained(tmp / "extended_tokenizer")
        torch.save(bundle, tmp / "seg_model_lm_head_embed_tokens.pt")
    return Path(out_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model.checkpoint", description="checkpoint conversions")
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser("export-released", help="our format → the released layout")
    export.add_argument("--checkpoint", required=True, help="a folder with omniabnorm.json")
    export.add_argument("--out", required=True, help="new folder for the released layout")
    export.add_argument("--base-model", help="local Qwen2.5-VL folder (default: the one the checkpoint records)")
    args = parser.parse_args(argv)
    transformers.utils.logging.disable_progress_bar()
    try:
        model, tokenizer, _ = load_checkpoint(args.checkpoint, args.base_model)
        export_released(model, tokenizer, args.out)
    except (CheckpointError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"released layout written to {args.out} (load it with --base-model on the same base model)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
