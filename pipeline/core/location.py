"""Where outputs live: a local directory, or an object-store prefix (`s3://`, `gs://`, `az://`… through fsspec).

The store's writer has one code path; what differs between the two kinds of place is here:

| | local directory | object-store prefix |
| --- | --- | --- |
| staging | built under `<name>.partial`, beside the final name | the same, under the prefix `<name>.partial` |
| commit | an atomic rename onto the final name | a server-side copy onto the final prefix, completion mark last |
| lock | an OS file lock on `<name>.lock` | the object `<prefix>.lock` (S3: pipeline/core/locks.py; others: none) |
| replacing | only an empty directory or one of ours | only an empty prefix or one of ours |
| litter | `.tmp-`/`.old-` siblings of killed runs removed | none |

An object store has no rename. Its commit first removes the old store's completion mark (readers refuse it from
then on), copies every object of the new one over it inside the object store (no data passes through this
machine), removes what only the old one had, and copies the completion mark last: a PUT is applied whole or not at
all, so the store is complete exactly when the mark is there. Until the commit the old store stays readable; a
commit interrupted midway leaves the complete new store under `.partial`, and the next run finishes it.

`file://` URLs are local directories. Credentials and endpoints come from
the filesystem library's usual sources (for S3: `AWS_*` environment variables, `~/.aws`, instance roles;
`AWS_ENDPOINT_URL` for an S3-compatible server such as MinIO).
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import logging
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import blake3
import fsspec

from pipeline.core.atomic import check_replaceable, remove_litter, replace_dir, write_json
from pipeline.core.errors import PipelineError
from pipeline.core.locks import exclusive_lock, object_lock

CHECKSUM = "blake3"  # the algorithm of the checksums files are written with (stores of format 2 recorded sha256)
LOCAL_SCHEME = "file://"
STAGING_SUFFIX = ".partial"

Owned = Callable[["Location"], bool]  # "what is here is ours, and may be replaced"
log = logging.getLogger(__name__)


def new_digest(algorithm: str = CHECKSUM, threads: bool = False) -> Any:
    """A hash object for `algorithm`: blake3 or sha256. `threads`: blake3 hashes each large buffer on several
    threads (for one file at a time; the store's writer threads already hash several shards at once)."""
    if algorithm == "blake3":
        return blake3.blake3(max_threads=blake3.blake3.AUTO if threads else 1)
    if algorithm == "sha256":
        return hashlib.sha256()
    raise PipelineError(f"unknown checksum algorithm {algorithm!r}: this version knows blake3 and sha256")


def is_url(where: str | Path) -> bool:
    """Whether `where` names an object store (a URL other than file://)."""
    return "://" in str(where) and not str(where).startswith(LOCAL_SCHEME)


def looks_local(name: str) -> bool:
    """Whether a model or dataset name is meant as a local path rather than a hub id (`owner/name`)."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or Path(name).expanduser().exists()


def partial_path(path: str | Path) -> Path:
    """Where a local output is staged before it is renamed into place."""
    path = Path(path)
    return path.with_name(path.name + STAGING_SUFFIX)


def open_location(where: str | Path) -> Location:
    """A local directory or an object-store prefix, by the form of `where`."""
    return ObjectPrefix(where) if is_url(str(where)) else LocalDirectory(where)


class Location:
    """A directory, local or remote, with the file operations the store needs (names are relative to it)."""

    is_remote: bool

    def __init__(self, where: str | Path) -> None:
        self.name = str(where).removeprefix(LOCAL_SCHEME)  # as the user wrote it, for messages
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
        raise NotImplementedError

    def exists(self, name: str = "") -> bool:
        """Whether file `name` exists (or, with no name, anything at all is at this location)."""
        self.fs.invalidate_cache()  # other processes write here: a cached listing may be stale
        return self.fs.exists(self._full(name) if name else self.root)

    def is_file(self) -> bool:
        """Whether this location is itself a file (where a directory is wanted)."""
        return self.fs.isfile(self.root)

    def read_text(self, name: str) -> str:
        return self.fs.cat_file(self._full(name)).decode()

    def write_json(self, name: str, data: Any) -> None:
        """Write a JSON file whole: a reader sees the old version or the new one, never a part."""
        raise NotImplementedError

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

    def write_parts(self, name: str, parts: list[memoryview]) -> dict[str, Any]:
        """Write file `name` as the concatenation of `parts`, whole or not at all; returns its {size, CHECKSUM},
        computed from the bytes as they are written (no read-back)."""
        raise NotImplementedError

    def checksum(self, name: str, algorithm: str = CHECKSUM) -> dict[str, Any]:
        """{size, algorithm} of file `name`, read in blocks."""
        digest, size = new_digest(algorithm, threads=True), 0
        with self.fs.open(self._full(name), "rb", block_size=1 << 24) as handle:
            while block := handle.read(1 << 24):
                digest.update(block)
                size += len(block)
        return {"size": size, algorithm: digest.hexdigest()}

    # What differs between a local directory and an object store (see the module's table).

    def staging(self) -> Location:
        """Where a new version of this location's content is built before it becomes this location's."""
        raise NotImplementedError

    def commit(self, staged: Location, owned: Owned, mark: str) -> bool:
        """Make the content built at `staged` this location's (`mark`: the file that says it is complete); True
        when something was moved."""
        raise NotImplementedError

    def lock(self) -> contextlib.AbstractContextManager:
        """Exclusive right to write here, for the block."""
        raise NotImplementedError

    def check_replaceable(self, owned: Owned) -> None:
        """Refuse, naming this location, to replace anything here but what `owned` recognises (or nothing)."""
        raise NotImplementedError

    def remove_litter(self) -> list[str]:
        """Remove temporaries that killed runs left beside this location; returns what was removed."""
        raise NotImplementedError

    def _full(self, name: str) -> str:
        return f"{self.root}/{name}"


class LocalDirectory(Location):
    """A directory on this machine's filesystem: staged under `.partial`, renamed into place, locked."""

    is_remote = False

    @property
    def zarr_store(self) -> Path:
        return self.path

    @property
    def path(self) -> Path:
        return Path(self.name)

    def write_json(self, name: str, data: Any) -> None:
        write_json(self.path / name, data)

    def write_parts(self, name: str, parts: list[memoryview]) -> dict[str, Any]:
        path = self.path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{uuid.uuid4().hex}{STAGING_SUFFIX}")  # as zarr names its temporaries
        digest, size = new_digest(), 0
        try:
            with tmp.open("wb") as handle:
                for part in parts:  # hashing and file writes release the GIL: writer threads run in parallel
                    handle.write(part)
                    digest.update(part)
                    size += part.nbytes
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return {"size": size, CHECKSUM: digest.hexdigest()}

    def staging(self) -> LocalDirectory:
        return LocalDirectory(partial_path(self.path))

    def commit(self, staged: Location, owned: Owned, mark: str) -> bool:
        assert isinstance(staged, LocalDirectory), f"{staged} is not on this filesystem"
        replace_dir(staged.path, self.path, lambda path: owned(LocalDirectory(path)))
        return True

    def lock(self) -> contextlib.AbstractContextManager:
        return exclusive_lock(self.path)

    def check_replaceable(self, owned: Owned) -> None:
        if self.path.exists() and not self.path.is_dir():
            raise PipelineError(f"output path {self.path} exists and is a file, not a directory")
        check_replaceable(self.path, lambda path: owned(LocalDirectory(path)))

    def remove_litter(self) -> list[str]:
        return [str(path) for path in remove_litter(self.path)]


class ObjectPrefix(Location):
    """A prefix in an object store: written in place, complete when its manifest is, locked by a lock object."""

    is_remote = True

    @property
    def zarr_store(self) -> str:
        return self.name

    def write_json(self, name: str, data: Any) -> None:
        self.fs.pipe_file(self._full(name), (json.dumps(data, indent=2) + "\n").encode())  # one PUT: whole or not

    def write_parts(self, name: str, parts: list[memoryview]) -> dict[str, Any]:
        digest = new_digest()
        for part in parts:
            digest.update(part)
        body = b"".join(parts)
        self.fs.pipe_file(self._full(name), body)  # one PUT (or one multipart upload): whole or not at all
        return {"size": len(body), CHECKSUM: digest.hexdigest()}

    def staging(self) -> ObjectPrefix:
        return ObjectPrefix(self.name + STAGING_SUFFIX)

    def commit(self, staged: Location, owned: Owned, mark: str) -> bool:
        if not (self.exists(mark) and self.read_text(mark) == staged.read_text(mark)):  # else done, but for cleanup
            if self.exists(mark):
                self.remove(mark)  # the old content stops being complete before any of it changes
            new, old = staged.sizes(), self.sizes()
            if stale := sorted(old.keys() - new.keys()):
                self.fs.rm([self._full(name) for name in stale])
            copied = [name for name in new if name != mark] + [mark]  # the mark last: complete only when all is
            for names in (copied[:-1], copied[-1:]):
                self.fs.copy([staged._full(name) for name in names], [self._full(name) for name in names])
        staged_files = sorted(staged.sizes())
        if leftovers := [staged._full(name) for name in staged_files if name != mark]:
            staged.fs.rm(leftovers)
        staged.remove(mark)  # last: a staging place that lost its mark would look like someone else's objects
        return True

    def lock(self) -> contextlib.AbstractContextManager:
        protocols = (self.fs.protocol,) if isinstance(self.fs.protocol, str) else self.fs.protocol
        if "s3" in protocols:
            return object_lock(self.fs, self.root, str(self))
        log.warning("%s: no lock on this kind of store (S3 has one): run one extraction per prefix at a time", self)
        return contextlib.nullcontext()

    def check_replaceable(self, owned: Owned) -> None:
        if self.exists() and not owned(self):
            raise PipelineError(
                f"{self} holds objects that this pipeline did not write; refusing to replace them "
                "(choose another prefix, or remove them)"
            )

    def remove_litter(self) -> list[str]:
        return []
