"""The hardware flavor catalogue: shipped data (tasks/flavors.yaml) plus user overrides.

Overrides come from a YAML file named by FINETUNE_FLAVORS_FILE (same shape as the shipped
one) and from the spec's `flavors:` mapping, in that order. An override of a known flavor
may change any field (typically `price_per_hour`); a new flavor must give every field.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tasks.errors import UserFacingError
from tasks.money import usd

CATALOGUE_FILE = Path(__file__).resolve().parent / "flavors.yaml"


class CatalogueError(UserFacingError, ValueError):
    """A flavor override that cannot be used; the message names the flavor and field."""


class Flavor(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    accelerator: str | None
    count: int = Field(ge=0)
    memory_gb: float = Field(gt=0, description="per GPU; for CPU flavors, the RAM")
    ram_gb: float = Field(gt=0)
    vcpus: int = Field(ge=1)
    bf16: bool
    peak_tflops: float = Field(gt=0, description="dense peak per GPU (per CPU flavor for CPUs)")
    price_per_hour: float = Field(ge=0)

    @property
    def is_gpu(self) -> bool:
        return self.accelerator is not None and self.count > 0

    def describe(self) -> str:
        if self.is_gpu:
            gpus = f"{self.count}x {self.accelerator}" if self.count > 1 else self.accelerator
            return f"{self.name}: {gpus} ({self.memory_gb:.0f} GB each), {usd(self.price_per_hour)}/h"
        return f"{self.name}: {self.vcpus} vCPU, {self.ram_gb:.0f} GB RAM, {usd(self.price_per_hour)}/h"


class Catalogue(BaseModel):
    model_config = ConfigDict(frozen=True)

    source: str
    prices_read: str
    flavors: dict[str, Flavor]

    def get(self, name: str) -> Flavor:
        try:
            return self.flavors[name]
        except KeyError:
            raise CatalogueError(
                f"unknown hardware flavor '{name}'; known flavors: {', '.join(self.flavors)} "
                "(or add one under `flavors:` in the spec)"
            ) from None


def _merge(base: dict[str, dict[str, Any]], overrides: dict[str, Any], where: str) -> None:
    for name, fields in (overrides or {}).items():
        if not isinstance(fields, dict):
            raise CatalogueError(f"{where}: flavor '{name}' must be a mapping of fields, got {fields!r}")
        base[name] = {**base.get(name, {}), **fields}


def load_catalogue(spec_overrides: dict[str, Any] | None = None) -> Catalogue:
    data = yaml.safe_load(CATALOGUE_FILE.read_text())
    flavors: dict[str, dict[str, Any]] = {k: dict(v) for k, v in data["flavors"].items()}
    source = data["source"]
    extra_file = os.environ.get("FINETUNE_FLAVORS_FILE")
    if extra_file:
        extra = yaml.safe_load(Path(extra_file).read_text()) or {}
        _merge(flavors, extra.get("flavors", {}), extra_file)
        source += f"; overrides from {extra_file}"
    if spec_overrides:
        _merge(flavors, spec_overrides, "spec flavors")
        source += "; overrides from the spec"
    built = {}
    for name, fields in flavors.items():
        try:
            built[name] = Flavor(name=name, **fields)
        except ValidationError as e:
            problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
            raise CatalogueError(f"flavor '{name}' is incomplete or invalid: {problems}") from None
    return Catalogue(source=source, prices_read=str(data["prices_read"]), flavors=built)
