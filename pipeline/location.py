"""Where a store lives: a local directory, or an object-store prefix (`s3://`, `gs://`, `az://`… through fsspec).

A local directory has what a filesystem offers: atomic renames, so a store is built under a temporary name, and
OS locks. An object store has neither; a store there is written in place and is complete only once the manifest
is in its zarr.json, which an object store replaces in one PUT, never partly (pipeline/store.py). `file://` URLs
are local directories.

Credentials and endpoints come from the filesystem library's usual sources (for S3: `AWS_*` environment
variables, `~/.aws`, instance roles; `AWS_ENDPOINT_URL` for an S3-compatible server such as MinIO).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
from pathlib import Path
from typing import Any

import fsspec

from pipeline.atomic import write_json
from pipeline.errors import PipelineError

LOCAL_SCHEME = "file://"


def is_url(where: str | Path) -> bool:
    """Whether `where` names an object store (a URL other than file://)."""
    return "://" in str(where) and not str(where).startswith(LOCAL_SCHEME)


class Location:
    """A directory, local or remote, with the few file operations the store format needs (names are relative)."""

    def __init__(self, where: str | Path) -> None:
        self.name = str(where).removeprefix(LOCAL_SCHEME)  # as the user wrote it, for messages
        self.is_remote = is_url(self.name)
        try:
            self.fs, self.root = fsspec.core.url_to_fs(self.name)
        except (ImportError, ValueError) as exc:  # no library for the scheme (fsspec names the one to install)
            raise PipelineError(f"cannot open {self.name}: {exc}") from None
        self.root = self.root.rstrip("/")

    def __str__(self) -> str:
        return self.name

    @property
    def zarr_store(self) -> str | Path:
        """What zarr.open_group takes: the URL (zarr's fsspec store) or the local path (its local store)."""
        return self.name if self.is_remote else Path(self.name)

    @property
    def path(self) -> Path:
        """The local directory; only for a local location."""
        assert not self.is_remote, f"{self.name} is not a local path"
        return Path(self.name)

    def exists(self, name: str = "") -> bool:
        """Whether file `name` exists (or, with no name, anything at all is at this location)."""
        self.fs.invalidate_cache()  # other processes write here: a cached listing may be stale
        return self.fs.exists(self._full(name) if name else self.root)

    def read_text(self, name: str) -> str:
        return self.fs.cat_file(self._full(name)).decode()

    def write_json(self, name: str, data: Any) -> None:
        """Write a JSON file, atomically where the filesystem can (an object store's PUT is atomic by itself)."""
        if self.is_remote:
            self.fs.pipe_file(self._full(name), (json.dumps(data, indent=2) + "\n").encode())
        else:
            write_json(self.path / name, data)

    def remove(self, name: str) -> None:
        self.fs.rm_file(self._full(name))

    def remove_all(self) -> None:
        if self.exists():
            self.fs.rm(self.root, recursive=True)

    def top_level(self, pattern: str) -> list[str]:
        """Names of the files directly here that match the shell pattern, sorted."""
        if not self.exists():
            return []
        names = (entry.rstrip("/").rsplit("/", 1)[-1] for entry in self.fs.ls(self.root, detail=False))
        return sorted(name for name in names if fnmatch.fnmatchcase(name, pattern))

    def sizes(self) -> dict[str, int]:
        """Every file below this location (relative name -> bytes), from one listing."""
        self.fs.invalidate_cache()
        if not self.fs.exists(self.root):
            return {}
        found = self.fs.find(self.root, detail=True)
        return {full[len(self.root) + 1 :]: int(info["size"]) for full, info in found.items()}

    def checksum(self, name: str) -> dict[str, Any]:
        """{size, sha256} of file `name`, read in blocks."""
        digest, size = hashlib.sha256(), 0
        with self.fs.open(self._full(name), "rb", block_size=1 << 22) as handle:
            while block := handle.read(1 << 22):
                digest.update(block)
                size += len(block)
        return {"size": size, "sha256": digest.hexdigest()}

    def _full(self, name: str) -> str:
        return f"{self.root}/{name}"
