"""The engine below the flows, in layers (docs/ARCHITECTURE.md): `core` at the bottom; the
phases `data`, `evaluate`, `plan`, `run`, `export` and `report` above it; `stages`, the
Prefect tasks, on top. A module imports only from layers below its own (pyproject.toml's
import-linter contract, checked by `make test`)."""
