"""A loopback Hugging Face Hub for tests: the slice of the Hub HTTP API that the real clients use.

`LoopbackHub` serves, on 127.0.0.1 and a free port, what `huggingface_hub` (2.4) and `datasets` (5.2) call to create
repos, commit files and read them back, so tests run the real clients end to end without network access:

- `POST /api/repos/create`: model and dataset repos; 409 with the repo's url when it exists (what `exist_ok` uses).
  A new repo gets an initial commit holding a `.gitattributes`, as on the Hub.
- `GET /api/{models,datasets}/{repo_id}[/revision/{rev}]`: repo info (`sha`, `siblings`; sizes, blob ids and LFS
  metadata with `blobs=True`).
- `GET /api/{type}s/{repo_id}/tree/{rev}[/{path}]` (with `recursive`) and `POST .../paths-info/{rev}`.
- `POST .../preupload/{rev}`: "regular" for text files, "lfs" for binary ones and for the `.gitattributes` LFS
  patterns, like the Hub, plus the remote oid the client uses to skip unchanged files. LFS is needed: `datasets`
  deletes a parquet shard right after `preupload_lfs_files`, so a shard sent as a regular file is lost.
- LFS, basic transfer only: `POST /{repo}.git/info/lfs/objects/batch` answers a single-part upload url,
  `PUT /lfs-upload/{sha256}` stores the object after checking its hash.
- `POST .../commit/{rev}`: the NDJSON commit (base64 `file`, `lfsFile`, `deletedFile`, `deletedFolder`);
  `parentCommit` is checked and a mismatch answered with 412, which `datasets` relies on.
- `GET`/`HEAD /[datasets/]{repo_id}/resolve/{rev}/{path}`: the file with `ETag` (git blob id, or sha256 for LFS
  files), `X-Repo-Commit`, `Content-Length`, and single `Range` requests (used by `HfFileSystem`). LFS files are
  served directly, not redirected to a CDN.
- `POST /api/validate-yaml` (accepts everything) and `GET /api/whoami-v2` (user "tester").

Revisions are "main" and commit shas (40 hex digits, or a prefix of 7 or more). Errors carry the `X-Error-Code`
header (`RepoNotFound`, `RevisionNotFound`, `EntryNotFound`) that the clients turn into their typed exceptions.
Request bodies may be sent with `Content-Length` or chunked.

Not covered: Xet storage (run the clients with `HF_HUB_DISABLE_XET=1`) and multipart LFS uploads (objects of 5 GB or
more), authentication and private-repo access checks (any token or none is accepted), branches other than main,
tags, pull requests (`create_pr`), copies between repos, the `lastCommit`/security fields of `expand=True`,
pagination (every listing is one page), commit history listing, repo deletion, renames and settings, Spaces, buckets,
search and listing of repos, and canonical repo ids without a namespace. Repos live in memory and die with the server.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
from hub_store import Commit, HubError, HubStore, git_blob_oid, needs_lfs

USER = "tester"
URL_PREFIXES = {"model": "", "dataset": "datasets/"}
_API_TYPES = {"models": "model", "datasets": "dataset"}

_REPO = r"(?P<repo_id>[^/]+/[^/]+?)"
_API = rf"/api/(?P<api_type>models|datasets)/{_REPO}"
_ROUTES: list[tuple[str, re.Pattern[str], str]] = [
    (method, re.compile(pattern), handler)
    for method, pattern, handler in [
        ("POST", r"/api/repos/create", "create_repo"),
        ("POST", r"/api/validate-yaml", "validate_yaml"),
        ("GET", r"/api/whoami-v2", "whoami"),
        ("GET", rf"{_API}(?:/revision/(?P<revision>[^/]+))?", "repo_info"),
        ("GET", rf"{_API}/tree/(?P<revision>[^/]+)(?:/(?P<path>.*))?", "tree"),
        ("POST", rf"{_API}/paths-info/(?P<revision>[^/]+)", "paths_info"),
        ("POST", rf"{_API}/preupload/(?P<revision>[^/]+)", "preupload"),
        ("POST", rf"{_API}/commit/(?P<revision>[^/]+)", "commit"),
        ("POST", rf"/(?P<dataset>datasets/)?{_REPO}\.git/info/lfs/objects/batch", "lfs_batch"),
        ("PUT", r"/lfs-upload/(?P<oid>[0-9a-f]{64})", "lfs_upload"),
        ("GET", rf"/(?P<dataset>datasets/)?{_REPO}/resolve/(?P<revision>[^/]+)/(?P<path>.+)", "resolve"),
    ]
]


class HubRequestHandler(BaseHTTPRequestHandler):
    """Routes each request to a `handle_*` method; `server` holds the store and the endpoint."""

    protocol_version = "HTTP/1.1"  # keep-alive: the clients pool their connections
    # Headers and body leave in two writes; with Nagle's algorithm the second waits for the client's delayed ACK.
    disable_nagle_algorithm = True
    server: _HubHTTPServer

    def do_GET(self) -> None:
        self.dispatch()

    do_HEAD = do_POST = do_PUT = do_GET  # HEAD is a GET whose body `send` leaves out

    def log_message(self, format: str, *args: Any) -> None:
        """Stay quiet: a line per request would drown pytest's report."""

    def read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() != "chunked":
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))
        # Uploads streamed from a file object come chunked: size line, data, CRLF; a 0-size chunk ends them.
        chunks = []
        while size := int(self.rfile.readline().split(b";")[0], 16):
            chunks.append(self.rfile.read(size))
            self.rfile.readline()
        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
            pass  # trailers
        return b"".join(chunks)

    def dispatch(self) -> None:
        url = urlsplit(self.path)
        self.query = {key: values[-1] for key, values in parse_qs(url.query).items()}
        body = self.read_body()
        method = "GET" if self.command == "HEAD" else self.command
        try:
            for route_method, pattern, name in _ROUTES:
                match = pattern.fullmatch(url.path)
                if match and route_method == method:
                    params = {key: unquote(value) for key, value in match.groupdict().items() if value is not None}
                    return getattr(self, f"handle_{name}")(body, **params)
            raise HubError(404, f"The loopback Hub does not serve {self.command} {url.path}.")
        except HubError as error:
            headers = {"X-Error-Message": error.message}
            headers |= {"X-Error-Code": error.code} if error.code else {}
            headers |= {"X-Repo-Commit": error.commit} if error.commit else {}
            self.send_json({"error": error.message, **error.extra}, status=error.status, headers=headers)
        except Exception as error:  # a bug here: answer it rather than drop the connection
            # 501, not 500: the clients retry 5xx answers like 500 for half a minute, 501 fails the test at once.
            message = f"The loopback Hub failed on {self.command} {url.path}: {error!r}"
            self.send_json({"error": message}, status=501, headers={"X-Error-Message": message})

    def send(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.server.store.requests.append(f"{self.command} {urlsplit(self.path).path} {status}")
        self.send_response(status)
        for key, value in {**headers, "Content-Length": str(len(body))}.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def send_json(self, payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> None:
        self.send(status, json.dumps(payload).encode(), {"Content-Type": "application/json", **(headers or {})})

    def commit_at(self, api_type: str, repo_id: str, revision: str) -> Commit:
        return self.server.store.get(_API_TYPES[api_type], repo_id).resolve(revision)

    def handle_create_repo(self, body: bytes) -> None:
        payload = json.loads(body)
        repo_type = payload.get("type") or "model"
        if repo_type not in URL_PREFIXES:
            raise HubError(400, f"The loopback Hub serves model and dataset repos, not {repo_type!r}.")
        repo_id = f"{payload.get('organization') or USER}/{payload['name']}"
        url = f"{self.server.endpoint}/{URL_PREFIXES[repo_type]}{repo_id}"
        self.server.store.create(repo_type, repo_id, payload.get("visibility", "public") != "public", url)
        self.send_json({"url": url, "name": repo_id, "id": repo_id})

    def handle_validate_yaml(self, body: bytes) -> None:
        self.send_json({"errors": [], "warnings": []})

    def handle_whoami(self, body: bytes) -> None:
        self.send_json({"type": "user", "name": USER, "fullname": "Loopback Tester", "orgs": [], "auth": {}})

    def handle_repo_info(self, body: bytes, api_type: str, repo_id: str, revision: str = "main") -> None:
        repo = self.server.store.get(_API_TYPES[api_type], repo_id)
        commit = repo.resolve(revision)
        siblings = [{"rfilename": path} for path in sorted(commit.files)]
        if self.query.get("blobs", "").lower() == "true":
            for sibling in siblings:
                entry = commit.files[sibling["rfilename"]].entry(sibling["rfilename"])
                sibling |= {"size": entry["size"], "blobId": entry["oid"]}
                if lfs := entry.get("lfs"):
                    sibling["lfs"] = {"size": lfs["size"], "sha256": lfs["oid"], "pointerSize": lfs["pointerSize"]}
        info = {"_id": repo_id, "id": repo_id, "author": repo_id.split("/")[0], "sha": commit.oid}
        info |= {"lastModified": commit.date, "createdAt": repo.commits[0].date, "private": repo.private}
        info |= {"disabled": False, "gated": False, "downloads": 0, "likes": 0, "tags": [], "siblings": siblings}
        self.send_json(info)

    def handle_tree(self, body: bytes, api_type: str, repo_id: str, revision: str, path: str = "") -> None:
        recursive = self.query.get("recursive", "").lower() in ("true", "1")
        self.send_json(self.commit_at(api_type, repo_id, revision).list_tree(path.strip("/"), recursive))

    def handle_paths_info(self, body: bytes, api_type: str, repo_id: str, revision: str) -> None:
        # The client posts a form (`paths` repeated), not JSON.
        paths = parse_qs(body.decode()).get("paths", [])
        self.send_json(self.commit_at(api_type, repo_id, revision).paths_info(paths))

    def handle_preupload(self, body: bytes, api_type: str, repo_id: str, revision: str) -> None:
        commit = self.commit_at(api_type, repo_id, revision)
        files = []
        for file in json.loads(body)["files"]:
            lfs = needs_lfs(file["path"], base64.b64decode(file["sample"]), commit.files.get(".gitattributes"))
            remote = commit.files.get(file["path"])
            # The client skips a file whose oid equals this one: sha256 in LFS mode, git blob id in regular mode.
            remote_oid = None if remote is None else (remote.sha256 if lfs else git_blob_oid(remote.content))
            mode = "lfs" if lfs else "regular"
            files.append({"path": file["path"], "uploadMode": mode, "shouldIgnore": False, "oid": remote_oid})
        self.send_json({"files": files, "commitOid": commit.oid})

    def handle_lfs_batch(self, body: bytes, repo_id: str, dataset: str = "") -> None:
        self.server.store.get("dataset" if dataset else "model", repo_id)
        objects = []
        for obj in json.loads(body)["objects"]:
            answer = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in self.server.store.lfs_objects:  # no `actions`: the client skips the upload
                answer["actions"] = {"upload": {"href": f"{self.server.endpoint}/lfs-upload/{obj['oid']}"}}
            objects.append(answer)
        self.send_json(
            {"transfer": "basic", "objects": objects}, headers={"Content-Type": "application/vnd.git-lfs+json"}
        )

    def handle_lfs_upload(self, body: bytes, oid: str) -> None:
        if hashlib.sha256(body).hexdigest() != oid:
            raise HubError(400, f"Uploaded content does not hash to {oid}.")
        with self.server.store.lock:
            self.server.store.lfs_objects[oid] = body
        self.send(200, b"", {})

    def handle_commit(self, body: bytes, api_type: str, repo_id: str, revision: str) -> None:
        if self.query.get("create_pr"):
            raise HubError(400, "The loopback Hub does not support pull requests (create_pr).")
        repo = self.server.store.get(_API_TYPES[api_type], repo_id)
        commit = self.server.store.commit(repo, revision, [json.loads(line) for line in body.splitlines() if line])
        url = f"{self.server.endpoint}/{URL_PREFIXES[repo.repo_type]}{repo_id}/commit/{commit.oid}"
        self.send_json({"success": True, "commitOid": commit.oid, "commitUrl": url, "pullRequestUrl": None})

    def handle_resolve(self, body: bytes, repo_id: str, revision: str, path: str, dataset: str = "") -> None:
        commit = self.server.store.get("dataset" if dataset else "model", repo_id).resolve(revision)
        if path not in commit.files:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", commit.oid)
        blob = commit.files[path]
        headers = {"ETag": f'"{blob.etag}"', "X-Repo-Commit": commit.oid, "Accept-Ranges": "bytes"}
        headers["Content-Type"] = "application/octet-stream"
        status, content = self.apply_range(blob.content, headers)
        self.send(status, content, headers)

    def apply_range(self, content: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
        """Serve a single `bytes=start-[end]` range as 206, or 416 past the end; anything else gets it all."""
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if not match:
            return 200, content
        start, end = int(match[1]), min(int(match[2] or len(content) - 1), len(content) - 1)
        if start >= len(content):
            headers["Content-Range"] = f"bytes */{len(content)}"
            return 416, b""
        headers["Content-Range"] = f"bytes {start}-{end}/{len(content)}"
        return 206, content[start : end + 1]


class _HubHTTPServer(ThreadingHTTPServer):
    daemon_threads = True  # an idle keep-alive connection must not block shutdown
    store: HubStore
    endpoint: str


class LoopbackHub:
    """A loopback Hub on 127.0.0.1 and a free port; a context manager, or call `start()` and `stop()`.

    Example:
        ```py
        with LoopbackHub() as hub:
            HfApi(endpoint=hub.endpoint).create_repo("tester/demo")
        ```
    """

    def __init__(self) -> None:
        self.store = HubStore()
        self._server = _HubHTTPServer(("127.0.0.1", 0), HubRequestHandler)
        self._server.store = self.store
        self.endpoint = self._server.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        # A short poll interval, because `stop()` waits up to one interval for the serving loop to notice.
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, name="loopback-hub", daemon=True
        )

    def start(self) -> LoopbackHub:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def __enter__(self) -> LoopbackHub:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


# Module attributes that hold an offline flag copied from `huggingface_hub.constants` at import time.
_OFFLINE_FLAG_COPIES = ["HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"]
_CLIENT_PACKAGES = ("huggingface_hub", "datasets", "diffusers", "transformers", "peft")


def set_offline(monkeypatch: pytest.MonkeyPatch, offline: bool) -> None:
    """Switch the Hub clients' offline mode for one test, in the environment and in every import-time copy.

    `huggingface_hub` reads `HF_HUB_OFFLINE` once, at import, and `datasets` and `diffusers` copy the flag into their
    own modules (`datasets.config.HF_HUB_OFFLINE`, `diffusers.loaders.lora_base.HF_HUB_OFFLINE`, ...), so setting the
    environment variable alone changes nothing in a running session. Modules imported later read the environment.

    Args:
        monkeypatch: The test's monkeypatch, which undoes every change after the test.
        offline: Whether requests to the Hub must raise `OfflineModeIsEnabled`.
    """
    flag = "1" if offline else "0"
    monkeypatch.setenv("HF_HUB_OFFLINE", flag)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", flag)
    import huggingface_hub.constants  # noqa: F401 - the reference copy, imported so that it is patched too

    for name, module in list(sys.modules.items()):
        if not name.startswith(_CLIENT_PACKAGES):
            continue
        # The module's own namespace only: `getattr` on a lazy module (transformers) would import submodules.
        namespace = getattr(module, "__dict__", {})
        for attribute in _OFFLINE_FLAG_COPIES:
            if isinstance(namespace.get(attribute), bool):
                monkeypatch.setattr(module, attribute, offline)


def configure_clients(monkeypatch: pytest.MonkeyPatch, endpoint: str, home: Path, token: str) -> None:
    """Point `huggingface_hub` and `datasets` at `endpoint`, with Xet off and caches and token file under `home`.

    Both libraries turn `HF_ENDPOINT` and `HF_HOME` into module constants at import, and `huggingface_hub` binds its
    module-level `HfApi` (behind `hf_hub_download`'s siblings `model_info`, `list_repo_files`, ...) and
    `HfFileSystem` instances to the endpoint of that moment, as transformers does its shared `HfApi`; all of those
    are patched here.

    Args:
        monkeypatch: The test's monkeypatch, which undoes every change after the test.
        endpoint: The Hub URL, e.g. `LoopbackHub().endpoint`.
        home: An empty folder to use as `HF_HOME`.
        token: The token the clients send; the loopback Hub accepts any.
    """
    from huggingface_hub import constants, hf_api, hf_file_system
    from huggingface_hub.utils import close_session

    paths = {"HF_HOME": home, "HF_HUB_CACHE": home / "hub", "HF_DATASETS_CACHE": home / "datasets"}
    env = {**{name: str(path) for name, path in paths.items()}, "HF_ENDPOINT": endpoint, "HF_TOKEN": token}
    # A proxy configured in the environment must not capture loopback traffic.
    no_proxy = ",".join(filter(None, [os.environ.get("NO_PROXY"), "127.0.0.1"]))
    env |= {"HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "NO_PROXY": no_proxy, "no_proxy": no_proxy}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    for name in ("HF_OIDC_RESOURCE", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_ETAG_TIMEOUT", "HUGGINGFACE_CO_STAGING"):
        monkeypatch.delenv(name, raising=False)
    set_offline(monkeypatch, False)

    hub_constants = {
        "ENDPOINT": endpoint,
        "HUGGINGFACE_CO_URL_TEMPLATE": endpoint + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_URL_HOSTS": constants.HF_URL_HOSTS | {"127.0.0.1"},
        "HF_HUB_DISABLE_XET": True,
        "HF_HUB_DISABLE_TELEMETRY": True,
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(paths["HF_HUB_CACHE"]),
        "HUGGINGFACE_HUB_CACHE": str(paths["HF_HUB_CACHE"]),
        "HF_ASSETS_CACHE": str(home / "assets"),
        "HUGGINGFACE_ASSETS_CACHE": str(home / "assets"),
        "HF_XET_CACHE": str(home / "xet"),
        "HF_TOKEN_PATH": str(home / "token"),
        "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
        "CHECK_FOR_UPDATE_DONE_PATH": str(home / ".check_for_update_done"),
        "AGENT_HARNESSES_PATH": str(home / ".agent_harnesses.json"),
    }
    for name, value in hub_constants.items():
        monkeypatch.setattr(constants, name, value)
    monkeypatch.setattr(hf_api.api, "endpoint", endpoint)
    monkeypatch.setattr(hf_file_system.hffs, "endpoint", endpoint)
    monkeypatch.setattr(hf_file_system.hffs._api, "endpoint", endpoint)
    # `HfFileSystem` instances are cached per endpoint with their listings; a later server may reuse a port.
    hf_file_system.HfFileSystem.clear_instance_cache()
    close_session()  # the pooled client was built under the previous proxy settings
    if "transformers.utils.hub" in sys.modules:  # its shared HfApi (Trainer.init_hf_repo) keeps its first endpoint
        monkeypatch.setattr(sys.modules["transformers.utils.hub"], "_hf_api", None, raising=False)

    if "datasets" in sys.modules:  # otherwise `datasets` reads the environment set above when it is imported
        _configure_datasets(monkeypatch, sys.modules["datasets"].config, endpoint, paths)


def _configure_datasets(monkeypatch: pytest.MonkeyPatch, config: Any, endpoint: str, paths: dict[str, Path]) -> None:
    datasets_cache = paths["HF_DATASETS_CACHE"]
    datasets_constants = {
        "HF_ENDPOINT": endpoint,
        "HUB_DATASETS_URL": endpoint + "/datasets/{repo_id}/resolve/{revision}/{path}",
        "HF_CACHE_HOME": str(paths["HF_HOME"]),
        "HF_DATASETS_CACHE": datasets_cache,
        "HF_MODULES_CACHE": paths["HF_HOME"] / "modules",
        "DOWNLOADED_DATASETS_PATH": datasets_cache / "downloads",
        "EXTRACTED_DATASETS_PATH": datasets_cache / "downloads" / "extracted",
        "HF_UPDATE_DOWNLOAD_COUNTS": False,
    }
    for name, value in datasets_constants.items():
        monkeypatch.setattr(config, name, value)
