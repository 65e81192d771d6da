"""The hardware flavor catalogue: shipped data (tasks/plan/flavors.yaml) plus user overrides.

Overrides come from a YAML file named by FINETUNE_FLAVORS_FILE (same shape as the shipped
one) and from the spec's `flavors:` mapping, in that order. An override of a known flavor
may change any field (typically `price_per_hour`); a new flavor must give every field.
"""

from __future__ import annotations

import os
import time
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tasks.core.errors import UserFacingError
from tasks.core.money import usd

GB = 1024**3
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
    # assumed unless a flavor says otherwise: one 400 Gb/s InfiniBand NDR card per GPU, NVIDIA's
    # DGX H100/H200 design; only a run across several nodes (backend: kubernetes) uses it
    network_gbps: float = Field(400.0, gt=0, description="network between nodes, per GPU, in Gb/s")

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


# This machine's flavors are measured, not listed; an override may give them a price (a team's
# own GPU box has a cost per hour too) or correct a measured field.
LOCAL_FLAVORS = ("local-cpu", "local-cuda")


def _all_overrides(spec_overrides: dict[str, Any] | None) -> tuple[dict[str, dict[str, Any]], str]:
    flavors: dict[str, dict[str, Any]] = {}
    source = ""
    extra_file = os.environ.get("FINETUNE_FLAVORS_FILE")
    if extra_file:
        extra = yaml.safe_load(Path(extra_file).read_text()) or {}
        _merge(flavors, extra.get("flavors", {}), extra_file)
        source += f"; overrides from {extra_file}"
    if spec_overrides:
        _merge(flavors, spec_overrides, "spec flavors")
        source += "; overrides from the spec"
    return flavors, source


def load_catalogue(spec_overrides: dict[str, Any] | None = None) -> Catalogue:
    data = yaml.safe_load(CATALOGUE_FILE.read_text())
    flavors: dict[str, dict[str, Any]] = {k: dict(v) for k, v in data["flavors"].items()}
    overrides, extra_source = _all_overrides(spec_overrides)
    _merge(flavors, overrides, "overrides")
    source = data["source"] + extra_source
    built = {}
    for name, fields in flavors.items():
        if name in LOCAL_FLAVORS:
            continue
        try:
            built[name] = Flavor(name=name, **fields)
        except ValidationError as e:
            problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
            raise CatalogueError(f"flavor '{name}' is incomplete or invalid: {problems}") from None
    return Catalogue(source=source, prices_read=str(data["prices_read"]), flavors=built)


@lru_cache(maxsize=1)
def measured_cpu_flops(size: int = 1024, trials: int = 3, seconds: float = 0.15) -> float:
    """Achieved float32 FLOP/s of this machine's CPU on a square matmul: the best of a few
    short trials, so a busy moment does not halve the estimate."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)  # warm-up
    best = 0.0
    for _ in range(trials):
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            torch.mm(a, b)
            n += 1
        best = max(best, 2 * size**3 * n / (time.perf_counter() - start))
    return best


@lru_cache(maxsize=1)
def measured_gpu_flops(size: int = 8192, repeats: int = 20) -> float:
    """Achieved bf16 FLOP/s of this machine's first GPU on a square matmul."""
    import torch

    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    a @ a
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ a
    torch.cuda.synchronize()
    return repeats * 2 * size**3 / (time.perf_counter() - start)


def local_flavor(spec_overrides: dict[str, Any] | None = None) -> Flavor:
    """This machine as a flavor, at no cost unless an override under its name gives a price."""
    found = _measured_local_flavor()
    fields = _all_overrides(spec_overrides)[0].get(found.name)
    if not fields:
        return found
    try:
        return Flavor(**{**found.model_dump(), **fields, "name": found.name})
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        raise CatalogueError(f"flavor '{found.name}' override is invalid: {problems}") from None


def _measured_local_flavor() -> Flavor:
    """This machine as a flavor: its GPU if torch sees one, else its CPU."""
    import torch

    ram_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GB
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return Flavor(
            name="local-cuda",
            accelerator=props.name,
            count=1,
            memory_gb=props.total_memory / GB,
            ram_gb=ram_gb,
            vcpus=cpus,
            bf16=torch.cuda.is_bf16_supported(),
            peak_tflops=measured_gpu_flops() / 1e12,
            price_per_hour=0,
        )
    return Flavor(
        name="local-cpu",
        accelerator=None,
        count=0,
        memory_gb=ram_gb,
        ram_gb=ram_gb,
        vcpus=cpus,
        bf16=False,
        peak_tflops=measured_cpu_flops() / 1e12,
        price_per_hour=0,
    )
