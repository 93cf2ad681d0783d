"""params.yaml, loaded into typed, validated settings.

Each stage asks for its own section (`load_section("train")`); the whole file's top level is
checked too, so a misspelt section name fails instead of being silently ignored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import (
    BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, ValidationError, field_validator, model_validator,
)

from cifar_pipeline.errors import ConfigError

DEFAULT_PARAMS = Path("params.yaml")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(Section):
    url: str = Field(pattern=r"^(https?|file)://")
    md5: str | None = Field(pattern=r"^[0-9a-f]{32}$")
    train_size: PositiveInt | None
    test_size: PositiveInt | None
    subset_seed: int
    retries: int = Field(ge=0, le=20)
    retry_backoff_s: float = Field(ge=0)
    timeout_s: PositiveFloat

    @field_validator("md5", mode="before")
    @classmethod
    def _md5_is_text(cls, value):
        if value is not None and not isinstance(value, str):  # YAML reads an all-digit md5 as a number
            raise ValueError("must be 32 hex digits in quotes, or null")
        return value


class ModelConfig(Section):
    blocks_per_stage: list[PositiveInt] = Field(min_length=1)
    widths: list[PositiveInt] = Field(min_length=1)
    residual: bool
    mean: tuple[float, float, float]
    std: tuple[PositiveFloat, PositiveFloat, PositiveFloat]

    @model_validator(mode="after")
    def _same_number_of_stages(self) -> "ModelConfig":
        if len(self.blocks_per_stage) != len(self.widths):
            raise ValueError(
                f"blocks_per_stage has {len(self.blocks_per_stage)} stages but widths has "
                f"{len(self.widths)}; give one width per stage"
            )
        return self


class TrainConfig(Section):
    experiment: str = Field(min_length=1)
    epochs: PositiveInt
    batch_size: PositiveInt
    lr: PositiveFloat
    momentum: float = Field(ge=0, lt=1)
    weight_decay: float = Field(ge=0)
    nesterov: bool
    schedule: Literal["step", "cosine", "onecycle"]
    step_size: PositiveInt
    gamma: PositiveFloat
    label_smoothing: float = Field(ge=0, lt=1)
    crop_padding: int = Field(ge=0, le=16)
    flip: bool
    seed: int
    device: Literal["auto", "cuda", "cpu"]
    precision: Literal["auto", "bf16", "fp32"]
    channels_last: bool
    compile: bool
    eval_every: int = Field(ge=0)
    sync_batchnorm: bool = False  # distributed training: BatchNorm over the global batch (CUDA)

    @model_validator(mode="after")
    def _nesterov_needs_momentum(self) -> "TrainConfig":
        if self.nesterov and self.momentum == 0:
            raise ValueError("nesterov needs momentum > 0; set train.momentum or nesterov: false")
        return self


class EvaluateConfig(Section):
    batch_size: PositiveInt
    tta: bool
    wrong_examples: int = Field(ge=0, le=400)


class ExportConfig(Section):
    opset: int = Field(ge=17, le=23)
    min_agreement: float = Field(ge=0, le=1)
    max_prob_diff: float = Field(ge=0)
    int8: bool
    calibration_images: PositiveInt
    batch_size: PositiveInt


class RegisterConfig(Section):
    model_name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    min_accuracy: float = Field(ge=0, le=1)
    min_improvement: float = Field(ge=-1, le=1)


SECTIONS: dict[str, type[Section]] = {
    "data": DataConfig,
    "model": ModelConfig,
    "train": TrainConfig,
    "evaluate": EvaluateConfig,
    "export": ExportConfig,
    "register": RegisterConfig,
}


def read_params(path: Path = DEFAULT_PARAMS) -> dict:
    """The raw YAML mapping, with its top level checked against the known sections."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found; run from the project root or pass --params") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}; fix the syntax") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections ({', '.join(SECTIONS)})")
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"{path}: unknown section '{unknown[0]}'; expected one of {', '.join(SECTIONS)}")
    return raw


def load_section(name: str, path: Path = DEFAULT_PARAMS):
    """Validate and return one section of params.yaml as its typed settings object."""
    raw = read_params(path)
    if name not in raw:
        raise ConfigError(f"{path}: missing section '{name}'")
    return parse_section(name, raw[name], path)


def parse_section(name: str, values: object, path: Path | str = DEFAULT_PARAMS):
    try:
        return SECTIONS[name].model_validate(values)
    except ValidationError as exc:
        raise ConfigError(_one_line(exc, name, path)) from None


def _one_line(exc: ValidationError, section: str, path: Path | str) -> str:
    err = exc.errors()[0]
    key = ".".join([section, *(str(p) for p in err["loc"])])
    kind = err["type"]
    if kind == "missing":
        return f"{path}: missing key '{key}'"
    if kind == "extra_forbidden":
        return f"{path}: unknown key '{key}'; remove it or check its spelling"
    if kind == "model_type":
        return f"{path}: section '{section}' must be a mapping of keys"
    if not err["loc"]:  # a rule across keys (a model validator): its message names them
        return f"{path}: section '{section}': {err['msg'].removeprefix('Value error, ')}"
    got = err.get("input")
    return f"{path}: key '{key}' {err['msg'].lower()} (got {got!r})"
