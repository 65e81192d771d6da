"""A run's files on storage that this machine and a pool's workers both reach, named by an
fsspec URL (a shared path or file:// here, s3:// or gs:// in production, with their fsspec
packages installed). fsspec does the transfers; this module only names where things go."""

from __future__ import annotations

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
