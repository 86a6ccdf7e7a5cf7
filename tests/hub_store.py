"""The state behind the loopback Hub (`hub_server.py`): repos as linear histories of whole-tree commits.

Each commit keeps its full tree (path -> `Blob`), so every revision stays readable; blobs are shared between commits,
so a commit costs a dict copy, not a copy of the data. Files carry the ids the Hub reports for them (git blob ids,
sha256 and pointer sizes for LFS files), because the clients cache and skip uploads by those ids.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import re
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import cached_property
from typing import Any

# The Hub seeds every new repo with a `.gitattributes` naming the LFS patterns (a shorter list here); tests see it in
# listings as they would on the Hub, and preupload reads its patterns.
_LFS_PATTERNS = ["*.bin", "*.safetensors", "*.pt", "*.ckpt", "*.parquet", "*.arrow", "*.png", "*.jpg", "*.zip"]
_GITATTRIBUTES = "".join(f"{pattern} filter=lfs diff=lfs merge=lfs -text\n" for pattern in _LFS_PATTERNS).encode()


def git_blob_oid(content: bytes) -> str:
    """Return the git object id of a blob: what the Hub reports as a regular file's `oid` and `ETag`.

    Args:
        content: The file's bytes.

    Returns:
        The 40-hex-digit SHA-1 of the git blob header and the content.
    """
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


class HubError(Exception):
    """An error answer: status, message, the `X-Error-Code` the clients dispatch on, extra JSON fields."""

    def __init__(
        self, status: int, message: str, code: str | None = None, commit: str | None = None, **extra: Any
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.commit, self.extra = status, message, code, commit, extra


@dataclass(frozen=True)
class Blob:
    """A file's content and whether git stores it as an LFS pointer."""

    content: bytes
    lfs: bool = False

    @cached_property
    def sha256(self) -> str:
        return hashlib.sha256(self.content).hexdigest()

    @cached_property
    def pointer(self) -> bytes:
        return f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\nsize {len(self.content)}\n".encode()

    @cached_property
    def git_oid(self) -> str:
        """The blob id git stores: of the pointer file for LFS files."""
        return git_blob_oid(self.pointer if self.lfs else self.content)

    @property
    def etag(self) -> str:
        """The id the clients cache and compare a file by: sha256 for LFS files, the git blob id otherwise."""
        return self.sha256 if self.lfs else self.git_oid

    def entry(self, path: str) -> dict[str, Any]:
        """The file's entry in tree and paths-info listings."""
        entry = {"type": "file", "oid": self.git_oid, "size": len(self.content), "path": path}
        if self.lfs:
            entry["lfs"] = {"oid": self.sha256, "size": len(self.content), "pointerSize": len(self.pointer)}
        return entry


@dataclass(frozen=True)
class Commit:
    """One commit: its id, title, date and the whole tree it leaves behind."""

    oid: str
    title: str
    date: str
    files: dict[str, Blob]

    @cached_property
    def folders(self) -> set[str]:
        """Every folder holding a file, at any depth (git has no empty folders)."""
        folders = set()
        for path in self.files:
            parents = path.split("/")[:-1]
            folders.update("/".join(parents[:depth]) for depth in range(1, len(parents) + 1))
        return folders

    def folder_entry(self, path: str) -> dict[str, Any]:
        # Real tree ids hash the folder's content; any stable 40-hex id satisfies the clients.
        tree_id = hashlib.sha1(f"{self.oid}:{path}".encode()).hexdigest()
        return {"type": "directory", "oid": tree_id, "size": 0, "path": path}

    def list_tree(self, folder: str, recursive: bool) -> list[dict[str, Any]]:
        """Return the entries under `folder` ("" for the root), folders first as on the Hub.

        Raises:
            HubError: 404 EntryNotFound when `folder` is not a folder of this commit.
        """
        if folder and folder not in self.folders:
            raise HubError(404, f"{folder} does not exist on {self.oid}", "EntryNotFound", self.oid)
        prefix = f"{folder}/" if folder else ""

        def wanted(path: str) -> bool:
            return path.startswith(prefix) and (recursive or "/" not in path[len(prefix) :])

        folders = [self.folder_entry(path) for path in sorted(self.folders) if wanted(path)]
        return folders + [self.files[path].entry(path) for path in sorted(self.files) if wanted(path)]

    def paths_info(self, paths: list[str]) -> list[dict[str, Any]]:
        """Return the entries of the paths that exist; missing paths are skipped, as on the Hub."""
        paths = [path.strip("/") for path in paths]
        return [
            self.files[path].entry(path) if path in self.files else self.folder_entry(path)
            for path in paths
            if path in self.files or path in self.folders
        ]


@dataclass
class Repo:
    """A repo with a linear history on `main`."""

    repo_id: str
    repo_type: str
    private: bool
    commits: list[Commit] = field(default_factory=list)

    @property
    def head(self) -> Commit:
        return self.commits[-1]

    def resolve(self, revision: str) -> Commit:
        """Return the commit a revision names: "main", or a commit sha or a prefix of 7+ digits of one."""
        if revision == "main":
            return self.head
        if re.fullmatch(r"[0-9a-f]{7,40}", revision):
            for commit in self.commits:
                if commit.oid.startswith(revision):
                    return commit
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    def add_commit(self, title: str, files: dict[str, Blob]) -> Commit:
        date = datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        parent = self.commits[-1].oid if self.commits else ""
        oid = hashlib.sha1(f"{parent}\0{len(self.commits)}\0{title}\0{date}".encode()).hexdigest()
        self.commits.append(Commit(oid=oid, title=title, date=date, files=files))
        return self.head


def needs_lfs(path: str, sample: bytes, gitattributes: Blob | None) -> bool:
    """Decide the upload mode as the Hub does: LFS for binary content and for the `.gitattributes` LFS patterns."""
    text = gitattributes.content.decode() if gitattributes else ""
    patterns = [line.split()[0] for line in text.splitlines() if "filter=lfs" in line]
    name = path.rsplit("/", 1)[-1]
    return b"\0" in sample or any(fnmatch.fnmatch(name, pattern) for pattern in patterns)


class HubStore:
    """All repos and LFS objects of one server; a lock serialises writes from the handler threads."""

    def __init__(self) -> None:
        self.repos: dict[tuple[str, str], Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}  # sha256 -> content, shared by all repos as on the Hub
        self.requests: list[str] = []  # "METHOD /path status", for tests that assert on traffic
        self.lock = threading.Lock()

    def get(self, repo_type: str, repo_id: str) -> Repo:
        """Return a repo, or raise 404 RepoNotFound."""
        repo = self.repos.get((repo_type, repo_id))
        if repo is None:
            raise HubError(404, f"Repository not found: {repo_type} {repo_id}", "RepoNotFound")
        return repo

    def create(self, repo_type: str, repo_id: str, private: bool, url: str) -> Repo:
        """Create a repo with the Hub's initial commit, or raise 409 carrying the existing repo's `url`."""
        with self.lock:
            if (repo_type, repo_id) in self.repos:
                raise HubError(409, f"You already created this {repo_type} repo", url=url)
            repo = Repo(repo_id=repo_id, repo_type=repo_type, private=private)
            repo.add_commit("initial commit", {".gitattributes": Blob(_GITATTRIBUTES)})
            self.repos[(repo_type, repo_id)] = repo
            return repo

    def commit(self, repo: Repo, revision: str, lines: list[dict[str, Any]]) -> Commit:
        """Apply the NDJSON commit `lines` on `main`, checking `parentCommit` like the Hub (412 on mismatch)."""
        if revision != "main":
            raise HubError(404, f"The loopback Hub only commits to main, not {revision!r}.", "RevisionNotFound")
        with self.lock:
            header = next((line["value"] for line in lines if line["key"] == "header"), {})
            parent = header.get("parentCommit")
            if parent is not None and parent != repo.head.oid:
                raise HubError(412, f"Parent commit {parent} is not the head of main ({repo.head.oid}).")
            files = dict(repo.head.files)
            for line in lines:
                self._apply(files, line["key"], line["value"])
            return repo.add_commit(header.get("summary") or "Upload files", files)

    def _apply(self, files: dict[str, Blob], key: str, value: dict[str, Any]) -> None:
        path = value.get("path", "")
        if key == "file":
            encoded = value["content"]
            files[path] = Blob(base64.b64decode(encoded) if value.get("encoding") == "base64" else encoded.encode())
        elif key == "lfsFile":
            if value["oid"] not in self.lfs_objects:
                raise HubError(422, f"LFS object {value['oid']} of {path} was never uploaded.")
            files[path] = Blob(self.lfs_objects[value["oid"]], lfs=True)
        elif key == "deletedFile":
            if files.pop(path, None) is None:
                raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
        elif key == "deletedFolder":
            prefix = path.rstrip("/") + "/"
            for name in [name for name in files if name.startswith(prefix)]:
                del files[name]
        elif key != "header":
            raise HubError(400, f"The loopback Hub does not support the commit operation {key!r}.")
