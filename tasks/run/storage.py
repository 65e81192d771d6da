"""A run's files on storage that this machine and a pool's workers both reach, named by an
fsspec URL (a shared path or file:// here, s3:// or gs:// in production, with their fsspec
packages installed). fsspec does the transfers; this module only names where things go."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from tasks.core.errors import UserFacingError


class StorageError(UserFacingError, RuntimeError):
    """The shared storage cannot be reached or written; the message names the URL."""


class RunStorage:
    """One attempt's folder: `inputs/` (what the job reads), `outputs/` (what it wrote) and
    `logs/train.log` (its output so far, mirrored while it runs)."""

    def __init__(self, url: str) -> None:
        from fsspec.core import url_to_fs

        self.url = url.rstrip("/")
        try:
            self.fs, self.root = url_to_fs(self.url)
        except (ImportError, ValueError) as e:
            raise StorageError(
                f"storage '{url}' cannot be opened: {e}. Install the fsspec package for its scheme (s3fs, gcsfs) "
                "or give a path both sides share"
            ) from None
        self.root = self.root.rstrip("/")
        if "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)):
            self.url = self.root  # absolute, so the worker reads the same folder whatever its working directory

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def child(self, *parts: str) -> RunStorage:
        return RunStorage("/".join([self.url, *parts]))

    def check_writable(self) -> None:
        probe = self.path(".write-check")
        try:
            self.fs.makedirs(self.root, exist_ok=True)
            self.fs.pipe_file(probe, b"ok")
            self.fs.rm_file(probe)
        except Exception as e:  # any backend's error: the message says which URL and why
            raise StorageError(f"storage '{self.url}' is not writable from here: {type(e).__name__}: {e}") from None

    def put(self, files: list[tuple[Path, str]], under: str) -> None:
        """Each local file to `under/<relative name>`; written whole, then the listing is final."""
        for local, relative in files:
            target = self.path(under, relative)
            self.fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
            self.fs.put_file(str(local), target)

    def put_tree(self, folder: Path, under: str) -> None:
        self.put([(p, p.relative_to(folder).as_posix()) for p in sorted(folder.rglob("*")) if p.is_file()], under)

    def get_tree(self, under: str, folder: Path) -> list[str]:
        """Every file below `under` into `folder`, keeping the layout; the relative names."""
        base = self.path(under)
        if not self.fs.exists(base):
            return []
        names = []
        for remote in sorted(self.fs.find(base)):
            relative = remote[len(base) :].lstrip("/")
            local = folder / relative
            local.parent.mkdir(parents=True, exist_ok=True)
            tmp = local.with_name(local.name + ".part")
            self.fs.get_file(remote, str(tmp))
            tmp.replace(local)
            names.append(relative)
        return names

    def write_text(self, relative: str, text: str) -> None:
        target = self.path(relative)
        self.fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
        self.fs.pipe_file(target, text.encode("utf-8"))

    def read_text(self, relative: str) -> str | None:
        try:
            return self.fs.cat_file(self.path(relative)).decode("utf-8", errors="replace")
        except FileNotFoundError:
            return None


def set_aside_other_inputs(store: RunStorage, key: str | None, kept: tuple[str, ...]) -> tuple[list[str], str] | None:
    """What a training made from other inputs left in `store` (a run folder here, or a job's on
    shared storage; its checkpoints above all) goes to superseded/, so it is never resumed and
    nothing is lost; the key of these inputs is written in its place, whole. Returns what moved
    and where to, or None."""
    if key is None:
        return None
    earlier = (store.read_text("training_key") or "").strip() or None
    present = [name for name in kept if store.fs.exists(store.path(name))]
    moved = None
    if earlier != key and present:
        dest = store.path("superseded", f"{(earlier or 'unkeyed')[:24]}-{datetime.now():%Y%m%d-%H%M%S}")
        store.fs.makedirs(dest, exist_ok=True)
        for name in present:
            store.fs.mv(store.path(name), f"{dest}/{name}", recursive=True)
        moved = (present, dest)
    store.write_text("training_key.tmp", key + "\n")  # then renamed: a torn key would set aside a good training
    store.fs.mv(store.path("training_key.tmp"), store.path("training_key"))
    return moved


def complete_checkpoints(folder: Path) -> list[Path]:
    """The Trainer's checkpoints that can be resumed from, oldest first: the main process writes
    trainer_state.json after its own files, the other processes write their random states (and
    FSDP shards, sealed by a .metadata) on their own time; the generated script checks the same."""
    found = [p for p in folder.glob("checkpoint-*") if _complete(p)]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]) if p.name.split("-")[-1].isdigit() else -1)


def _complete(checkpoint: Path) -> bool:
    import json
    import zipfile

    try:
        json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
        for rng in checkpoint.glob("rng_state*.pth"):  # torch.save writes a zip: cut short, it has no directory
            with zipfile.ZipFile(rng) as archive:
                if archive.testzip() is not None:
                    return False
    except Exception:  # missing, cut short: not yet (or never) a checkpoint to copy
        return False
    return all(
        (d / ".metadata").exists() for d in checkpoint.iterdir() if d.is_dir() and next(d.glob("*.distcp"), None)
    )


class CheckpointMirror:
    """A training's complete checkpoints copied to `store` (a folder of checkpoints) as they
    appear, and the ones the Trainer rotates out removed there too; the newest brought back
    before a new attempt, so an attempt on a machine that keeps nothing still leaves them behind."""

    def __init__(self, store: RunStorage, local: Path) -> None:
        self.store, self.local = store, local
        self.sent: set[str] = set(self._remote())

    def _remote(self) -> list[str]:
        if not self.store.fs.exists(self.store.root):
            return []
        return [p.rstrip("/").rsplit("/", 1)[-1] for p in self.store.fs.ls(self.store.root, detail=False)]

    def restore(self) -> str | None:
        """The newest complete checkpoint on storage into the local folder; its name, or None."""
        complete = [n for n in self._remote() if self.store.fs.exists(self.store.path(n, "trainer_state.json"))]
        if not complete:
            return None
        newest = max(complete, key=lambda n: int(n.split("-")[-1]) if n.split("-")[-1].isdigit() else -1)
        self.store.get_tree(newest, self.local / newest)
        return newest

    def sync(self) -> None:
        here = {p.name: p for p in complete_checkpoints(self.local)}
        for name, folder in here.items():
            if name not in self.sent:  # whole, then named: storage never holds half a checkpoint under its name
                self.store.put_tree(folder, f"{name}.part")
                self.store.fs.mv(self.store.path(f"{name}.part"), self.store.path(name), recursive=True)
                self.sent.add(name)
        for name in sorted(self.sent - set(here)):  # rotated out by save_total_limit
            if self.store.fs.exists(self.store.path(name)):
                self.store.fs.rm(self.store.path(name), recursive=True)
            self.sent.discard(name)
