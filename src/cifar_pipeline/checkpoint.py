"""models/model.pt: the trained weights with everything needed to rebuild and use them.

A plain dict of tensors, lists and numbers, so it loads with torch.load(weights_only=True):
    state_dict   the model's weights (fp32)
    model_config params.yaml's model section as trained (depth, widths, residual, mean, std)
    class_names  the class names, in label order
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from cifar_pipeline.atomic import atomic_file
from cifar_pipeline.config import ModelConfig, parse_section
from cifar_pipeline.errors import PipelineError
from cifar_pipeline.model import SimpleResNet, build_model

MODEL_PATH = Path("models/model.pt")


def save_model(path: Path, model: nn.Module, model_cfg: ModelConfig, class_names: list[str]) -> None:
    state = {k: v.detach().float().cpu().contiguous() if v.is_floating_point() else v.detach().cpu()
             for k, v in _unwrap(model).state_dict().items()}
    payload = {"state_dict": state, "model_config": model_cfg.model_dump(mode="json"), "class_names": list(class_names)}
    with atomic_file(path) as tmp:
        torch.save(payload, tmp)


def load_model(path: Path = MODEL_PATH) -> tuple[SimpleResNet, ModelConfig, list[str]]:
    """The model in eval mode on the CPU, its config and its class names."""
    path = Path(path)
    if not path.exists():
        raise PipelineError(f"{path} not found; run `cifar-pipeline train` (or `dvc repro train`) first")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    model_cfg = parse_section("model", payload["model_config"], path)
    model = build_model(model_cfg, num_classes=len(payload["class_names"]))
    model.load_state_dict(payload["state_dict"])
    return model.eval(), model_cfg, list(payload["class_names"])


def _unwrap(model: nn.Module) -> nn.Module:
    """The plain module behind torch.compile or DistributedDataParallel wrappers."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)
