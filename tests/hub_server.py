"""A small Hugging Face Hub-compatible HTTP server for tests (standard library only).

It implements the part of the Hub HTTP API that ``huggingface_hub`` (with ``HF_HUB_DISABLE_XET=1``) and
``transformers`` use to create repos, push commits (small text files inline, large or binary files through the
git-LFS batch API, basic or multipart transfer) and to download files, list trees, refs and commits.

Storage: file contents are content-addressed blobs under ``<root>/blobs``; repos, refs and commits are kept in
memory and mirrored to ``<root>/state.json`` after every change, so a server restarted on the same root keeps
its repos. Any bearer token is accepted; the authenticated user is always ``org``.

Run manually with ``python tests/hub_server.py --port 8080 --root /tmp/hub``.
"""

from __future__ import annotations

import argparse
import base64
import copy
import hashlib
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import threading
import traceback
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

USER = "org"
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024
_LFS_EXTENSIONS = (
    ".safetensors .bin .pt .pth .ckpt .h5 .onnx .msgpack .pkl .pickle .npy .npz .gguf .tflite .model .arrow"
    " .parquet .zip .gz .tar .png .jpg .jpeg .gif .wav .mp3 .mp4"
)
LFS_EXTENSIONS = frozenset(_LFS_EXTENSIONS.split())
API_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
URL_PREFIXES = {"model": "", "dataset": "datasets/", "space": "spaces/"}
GITATTRIBUTES = b"".join(
    f"*{ext} filter=lfs diff=lfs merge=lfs -text\n".encode() for ext in sorted(LFS_EXTENSIONS)
)

# Path fragments shared by the route table.
_API = r"^/api/(?P<rtype>models|datasets|spaces)/(?P<repo>[^/]+/[^/]+)"
_WEB = r"^/(?:(?P<rtype>datasets|spaces)/)?(?P<repo>[^/]+/[^/]+?)"


class HubError(Exception):
    """An HTTP error answered the way the Hub does (X-Error-Code / X-Error-Message headers)."""

    def __init__(self, status: int, message: str, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def git_blob_sha1(data: bytes) -> str:
    """Git object id of a blob (what ``git hash-object`` prints)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    """Content of the git-LFS pointer file stored in git for an LFS blob."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


class Store:
    """Thread-safe repos, refs and commits, with content-addressed blobs on disk."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.blobs = self.root / "blobs"
        self.tmp = self.root / "tmp"
        self.blobs.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.lock = threading.RLock()
        state = self.root / "state.json"
        self.repos: dict[str, dict] = json.loads(state.read_text()) if state.exists() else {}

    def save(self) -> None:
        with self.lock:
            tmp = self.root / "state.json.tmp"
            tmp.write_text(json.dumps(self.repos))
            os.replace(tmp, self.root / "state.json")

    # -- blobs ---------------------------------------------------------------------------------------------
    def blob_path(self, sha256: str) -> Path:
        return self.blobs / sha256

    def has_blob(self, sha256: str, size: int | None = None) -> bool:
        path = self.blob_path(sha256)
        return path.is_file() and (size is None or path.stat().st_size == size)

    def put_bytes(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        if not self.has_blob(sha):
            self.put_stream(iter([data]), sha, len(data))
        return sha

    def put_stream(self, chunks: Iterator[bytes], oid: str, size: int | None) -> None:
        """Write a blob from chunks, checking its sha256 (and size) before it becomes visible."""
        digest, written = hashlib.sha256(), 0
        fd, tmp = tempfile.mkstemp(dir=self.tmp)
        try:
            with os.fdopen(fd, "wb") as f:
                for chunk in chunks:
                    digest.update(chunk)
                    f.write(chunk)
                    written += len(chunk)
            if digest.hexdigest() != oid or (size is not None and written != size):
                raise HubError(400, f"Uploaded content does not match oid {oid} / size {size}", "BadRequest")
            os.replace(tmp, self.blob_path(oid))
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    # -- repos and revisions -------------------------------------------------------------------------------
    @staticmethod
    def key(repo_type: str, repo_id: str) -> str:
        return f"{repo_type}:{repo_id}"

    def get_repo(self, repo_type: str, repo_id: str, authorized: bool) -> dict:
        repo = self.repos.get(self.key(repo_type, repo_id))
        if repo is None or (repo["private"] and not authorized):
            raise HubError(404 if repo is None else 401, "Repository not found", "RepoNotFound")
        return repo

    def create_repo(self, repo_type: str, repo_id: str, private: bool) -> bool:
        """Create a repo with an initial commit holding ``.gitattributes``; False if it already exists."""
        with self.lock:
            key = self.key(repo_type, repo_id)
            if key in self.repos:
                return False
            repo = {"type": repo_type, "id": repo_id, "private": private, "createdAt": _now()}
            repo.update(branches={}, tags={}, prs=[], commits={})
            files = {".gitattributes": self.file_entry(GITATTRIBUTES, lfs=False)}
            repo["branches"]["main"] = self.add_commit(
                repo, None, files, "initial commit", "", author="system"
            )
            self.repos[key] = repo
            self.save()
            return True

    def file_entry(self, data: bytes, lfs: bool) -> dict:
        sha = self.put_bytes(data)
        oid = git_blob_sha1(lfs_pointer(sha, len(data)) if lfs else data)
        return {"sha256": sha, "size": len(data), "lfs": lfs, "oid": oid}

    @staticmethod
    def add_commit(
        repo: dict, parent: str | None, files: dict, title: str, message: str, author: str = USER
    ) -> str:
        date = _now()
        seed = json.dumps(
            [parent, sorted((p, e["oid"]) for p, e in files.items()), title, date, uuid.uuid4().hex]
        )
        sha = hashlib.sha1(seed.encode()).hexdigest()
        repo["commits"][sha] = {
            "id": sha,
            "parents": [parent] if parent else [],
            "title": title,
            "message": message,
            "date": date,
            "author": author,
            "files": files,
        }
        return sha

    @staticmethod
    def resolve(repo: dict, revision: str) -> str:
        """Commit sha for a branch, tag, ``refs/...`` name, full sha or unique sha prefix."""
        rev = unquote(revision)
        for name in (rev, rev.removeprefix("refs/heads/")):
            if name in repo["branches"]:
                return repo["branches"][name]
        if rev.removeprefix("refs/tags/") in repo["tags"]:
            return repo["tags"][rev.removeprefix("refs/tags/")]
        match = re.fullmatch(r"refs/pr/(\d+)", rev)
        if match and 0 < int(match.group(1)) <= len(repo["prs"]):
            return repo["prs"][int(match.group(1)) - 1]
        if re.fullmatch(r"[0-9a-f]{7,40}", rev):
            found = [sha for sha in repo["commits"] if sha.startswith(rev)]
            if len(found) == 1:
                return found[0]
        raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")

    def history(self, repo: dict, sha: str) -> list[dict]:
        commits = []
        while sha:
            commit = repo["commits"][sha]
            commits.append(commit)
            sha = commit["parents"][0] if commit["parents"] else None
        return commits


def _tree_entry(path: str, entry: dict | None, files: dict) -> dict:
    """Tree/paths-info JSON for a file (``entry``) or a directory (``entry is None``)."""
    if entry is None:
        children = sorted((p, e["oid"]) for p, e in files.items() if p.startswith(path + "/"))
        oid = hashlib.sha1(json.dumps(children).encode()).hexdigest()
        return {"type": "directory", "oid": oid, "size": 0, "path": path}
    out = {"type": "file", "oid": entry["oid"], "size": entry["size"], "path": path}
    if entry["lfs"]:
        pointer_size = len(lfs_pointer(entry["sha256"], entry["size"]))
        out["lfs"] = {"oid": entry["sha256"], "size": entry["size"], "pointerSize": pointer_size}
    return out


def _directories(files: dict) -> set[str]:
    return {"/".join(p.split("/")[:i]) for p in files for i in range(1, p.count("/") + 1)}


class HubRequestHandler(BaseHTTPRequestHandler):
    """Dispatch requests through ``ROUTES``; handlers return ``(status, body)`` or raise ``HubError``."""

    protocol_version = "HTTP/1.1"
    server_version = "FakeHub/1.0"
    # (method, path regex, handler name). GET routes also answer HEAD.
    ROUTES: tuple[tuple[str, str, str], ...] = (
        ("GET", r"^/api/whoami-v2$", "whoami"),
        ("GET", r"^/api/agent-harnesses$", "agent_harnesses"),
        ("POST", r"^/api/repos/create$", "create_repo"),
        ("DELETE", r"^/api/repos/delete$", "delete_repo"),
        ("POST", r"^/api/validate-yaml$", "validate_yaml"),
        ("GET", r"^/api/(?P<rtype>models|datasets|spaces)$", "list_repos"),
        ("GET", _API + r"(?:/revision/(?P<rev>.+))?$", "repo_info"),
        ("GET", _API + r"/refs$", "list_refs"),
        ("GET", _API + r"/commits/(?P<rev>.+)$", "list_commits"),
        ("GET", _API + r"/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?$", "list_tree"),
        ("POST", _API + r"/paths-info/(?P<rev>.+)$", "paths_info"),
        ("POST", _API + r"/preupload/(?P<rev>.+)$", "preupload"),
        ("POST", _API + r"/commit/(?P<rev>.+)$", "commit"),
        ("POST", _API + r"/branch/(?P<name>.+)$", "create_branch"),
        ("DELETE", _API + r"/branch/(?P<name>.+)$", "delete_branch"),
        ("POST", _API + r"/tag/(?P<rev>.+)$", "create_tag"),
        ("DELETE", _API + r"/tag/(?P<name>.+)$", "delete_tag"),
        ("PUT", _API + r"/settings$", "update_settings"),
        ("POST", _WEB + r"\.git/info/lfs/objects/batch$", "lfs_batch"),
        ("PUT", r"^/_lfs/(?P<oid>[0-9a-f]{64})$", "lfs_put"),
        ("PUT", r"^/_lfs/(?P<oid>[0-9a-f]{64})/part/(?P<part>\d+)$", "lfs_put_part"),
        ("POST", r"^/_lfs/(?P<oid>[0-9a-f]{64})/complete$", "lfs_complete"),
        ("POST", r"^/_lfs/(?P<oid>[0-9a-f]{64})/verify$", "lfs_verify"),
        ("GET", _WEB + r"/resolve/(?P<rev>[^/]+)/(?P<path>.+)$", "resolve"),
    )
    COMPILED = tuple((method, re.compile(pattern), name) for method, pattern, name in ROUTES)

    server: HubHTTPServer

    # -- plumbing ------------------------------------------------------------------------------------------
    def log_message(self, format: str, *args: Any) -> None:
        if self.server.hub.verbose:
            super().log_message(format, *args)

    def do_GET(self) -> None:
        self._dispatch(self.command)

    do_HEAD = do_POST = do_PUT = do_DELETE = do_GET

    @property
    def store(self) -> Store:
        return self.server.hub.store

    @property
    def base_url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{self.headers.get('Host') or f'{host}:{port}'}"

    def _dispatch(self, method: str) -> None:
        split = urlsplit(self.path)
        self.query = {k: v[-1] for k, v in parse_qs(split.query).items()}
        self._body_left = self._body_iterator()
        self.extra_headers: dict[str, str] = {}
        try:
            for route_method, pattern, name in self.COMPILED:
                match = pattern.match(split.path)
                if match and (route_method == method or (route_method == "GET" and method == "HEAD")):
                    params = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
                    status, body = getattr(self, f"h_{name}")(**params)
                    break
            else:
                print(f"[hub_server] no route for {method} {self.path}", file=sys.stderr)
                raise HubError(404, f"No route for {method} {split.path}")
        except HubError as err:
            status, body = err.status, {"error": err.message}
            self.extra_headers["X-Error-Message"] = err.message  # keeps headers already set
            if err.code:
                self.extra_headers["X-Error-Code"] = err.code
        except Exception as err:  # a bug in the server: answer 500 and show it
            traceback.print_exc()
            status, body = 500, {"error": f"{type(err).__name__}: {err}"}
        for _ in self._body_left:  # drain any unread request body to keep the connection usable
            pass
        self._send(status, body, head_only=method == "HEAD")

    def _send(self, status: int, body: Any, head_only: bool = False) -> None:
        headers = dict(self.extra_headers)
        if isinstance(body, Path):
            headers.update(
                {"Content-Type": "application/octet-stream", "Content-Length": str(body.stat().st_size)}
            )
            self._send_headers(status, headers)
            if not head_only:
                with body.open("rb") as f:
                    shutil.copyfileobj(f, self.wfile, 1 << 20)
            return
        if isinstance(body, bytes):
            headers.setdefault("Content-Type", "application/octet-stream")
        else:
            body = json.dumps(body).encode()
            headers["Content-Type"] = "application/json; charset=utf-8"
        headers["Content-Length"] = str(len(body))
        self._send_headers(status, headers)
        if not head_only:
            self.wfile.write(body)

    def _send_headers(self, status: int, headers: dict[str, str]) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()

    def _body_iterator(self) -> Iterator[bytes]:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                yield self.rfile.read(size)
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                pass
            return
        left = int(self.headers.get("Content-Length") or 0)
        while left > 0:
            chunk = self.rfile.read(min(left, 1 << 20))
            if not chunk:
                break
            left -= len(chunk)
            yield chunk

    def body(self) -> bytes:
        return b"".join(self._body_left)

    def json_body(self) -> Any:
        data = self.body()
        try:
            return json.loads(data) if data else {}
        except ValueError as err:
            raise HubError(400, f"Invalid JSON body: {err}", "BadRequest") from err

    @property
    def authorized(self) -> bool:
        return bool(self.headers.get("Authorization"))

    def repo(self, rtype: str | None, repo: str) -> dict:
        return self.store.get_repo(API_TYPES.get(rtype or "models", "model"), repo, self.authorized)

    def repo_url(self, repo: dict) -> str:
        return f"{self.base_url}/{URL_PREFIXES[repo['type']]}{repo['id']}"

    # -- account / repo management -------------------------------------------------------------------------
    def h_whoami(self) -> tuple[int, Any]:
        if not self.authorized:
            raise HubError(401, "Invalid credentials in Authorization header")
        token = {"displayName": "test", "role": "write", "createdAt": "2024-01-01T00:00:00.000Z"}
        user = {
            "type": "user",
            "id": "0" * 24,
            "name": USER,
            "fullname": "Test Org",
            "email": "org@example.com",
        }
        user.update(emailVerified=True, canPay=False, isPro=False, periodEnd=None, avatarUrl="", orgs=[])
        return 200, {**user, "auth": {"type": "access_token", "accessToken": token}}

    def h_agent_harnesses(self) -> tuple[int, Any]:
        return 200, {"standardEnvVars": [], "harnesses": {}}  # registry fetched by huggingface_hub telemetry

    def _repo_id_from_payload(self, payload: dict) -> tuple[str, str]:
        repo_type = payload.get("type") or "model"
        if repo_type not in URL_PREFIXES:
            raise HubError(400, f"Invalid repo type {repo_type!r}", "BadRequest")
        return repo_type, f"{payload.get('organization') or USER}/{payload['name']}"

    def h_create_repo(self) -> tuple[int, Any]:
        payload = self.json_body()
        repo_type, repo_id = self._repo_id_from_payload(payload)
        private = payload.get("visibility") == "private" or payload.get("private") is True
        created = self.store.create_repo(repo_type, repo_id, private)
        url = f"{self.base_url}/{URL_PREFIXES[repo_type]}{repo_id}"
        if not created:  # like the Hub: 409 with the url (huggingface_hub handles it for exist_ok=True)
            self.extra_headers["X-Error-Message"] = "You already created this repo"
            return 409, {"error": "You already created this repo", "url": url}
        return 200, {"url": url, "name": repo_id, "id": uuid.uuid4().hex[:24]}

    def h_delete_repo(self) -> tuple[int, Any]:
        repo_type, repo_id = self._repo_id_from_payload(self.json_body())
        with self.store.lock:
            if self.store.repos.pop(Store.key(repo_type, repo_id), None) is None:
                raise HubError(404, "Repository not found", "RepoNotFound")
            self.store.save()
        return 200, {}

    def h_update_settings(self, rtype: str, repo: str) -> tuple[int, Any]:
        payload = self.json_body()
        with self.store.lock:
            info = self.repo(rtype, repo)
            if "visibility" in payload or "private" in payload:
                info["private"] = payload.get("visibility") == "private" or payload.get("private") is True
            if "gated" in payload:
                info["gated"] = payload["gated"]
            self.store.save()
        return 200, {}

    def h_validate_yaml(self) -> tuple[int, Any]:
        self.body()
        return 200, {"errors": [], "warnings": []}

    def h_list_repos(self, rtype: str) -> tuple[int, Any]:
        author, search = self.query.get("author"), self.query.get("search", "")
        with self.store.lock:
            repos = [r for r in self.store.repos.values() if r["type"] == API_TYPES[rtype]]
            repos = [r for r in repos if (not r["private"] or self.authorized) and search in r["id"]]
            repos = [r for r in repos if author is None or r["id"].split("/")[0] == author]
            return 200, [self._info(r, r["branches"]["main"], blobs=False) for r in repos]

    # -- reading a revision ----------------------------------------------------------------------------------
    def _info(self, repo: dict, sha: str, blobs: bool) -> dict:
        commit = repo["commits"][sha]
        siblings = []
        for path, entry in sorted(commit["files"].items()):
            sibling: dict[str, Any] = {"rfilename": path}
            if blobs:
                tree = _tree_entry(path, entry, commit["files"])
                sibling.update(size=entry["size"], blobId=entry["oid"])
                if "lfs" in tree:
                    sibling["lfs"] = {**tree["lfs"], "sha256": entry["sha256"]}
            siblings.append(sibling)
        return {
            "_id": hashlib.sha1(repo["id"].encode()).hexdigest()[:24],
            "id": repo["id"],
            "modelId": repo["id"],
            "author": repo["id"].split("/")[0],
            "sha": sha,
            "lastModified": commit["date"],
            "createdAt": repo["createdAt"],
            "private": repo["private"],
            "gated": repo.get("gated", False),
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
        }

    def h_repo_info(self, rtype: str, repo: str, rev: str = "main") -> tuple[int, Any]:
        with self.store.lock:
            info = self.repo(rtype, repo)
            return 200, self._info(info, Store.resolve(info, rev), blobs=bool(self.query.get("blobs")))

    def _ref(self, name: str, kind: str, sha: str) -> dict:
        return {"name": name, "ref": f"refs/{kind}/{name}", "targetCommit": sha}

    def h_list_refs(self, rtype: str, repo: str) -> tuple[int, Any]:
        with self.store.lock:
            info = self.repo(rtype, repo)
            out = {
                "branches": [self._ref(n, "heads", s) for n, s in sorted(info["branches"].items())],
                "tags": [self._ref(n, "tags", s) for n, s in sorted(info["tags"].items())],
                "converts": [],
            }
            if self.query.get("include_prs"):
                out["pullRequests"] = [self._ref(str(i), "pr", s) for i, s in enumerate(info["prs"], 1)]
            return 200, out

    def h_list_commits(self, rtype: str, repo: str, rev: str) -> tuple[int, Any]:
        with self.store.lock:
            info = self.repo(rtype, repo)
            commits = self.store.history(info, Store.resolve(info, rev))
        return 200, [
            {
                "id": c["id"],
                "title": c["title"],
                "message": c["message"],
                "date": c["date"],
                "authors": [{"user": c["author"], "avatar": ""}],
            }
            for c in commits
        ]

    def _files(self, rtype: str | None, repo: str, rev: str) -> tuple[dict, dict, str]:
        with self.store.lock:
            info = self.repo(rtype, repo)
            sha = Store.resolve(info, rev)
            return info, info["commits"][sha]["files"], sha

    def h_list_tree(self, rtype: str, repo: str, rev: str, path: str = "") -> tuple[int, Any]:
        _, files, _ = self._files(rtype, repo, rev)
        path = path.strip("/")
        dirs = _directories(files)
        if path and path not in dirs:
            raise HubError(404, f"Path {path} not found in tree", "EntryNotFound")
        prefix = f"{path}/" if path else ""
        recursive = self.query.get("recursive", "").lower() in ("1", "true")
        entries = []
        for name in sorted(set(files) | dirs):
            rest = name[len(prefix) :]
            if name.startswith(prefix) and rest and (recursive or "/" not in rest):
                entries.append(_tree_entry(name, files.get(name), files))
        return 200, entries

    def h_paths_info(self, rtype: str, repo: str, rev: str) -> tuple[int, Any]:
        _, files, _ = self._files(rtype, repo, rev)
        body = self.body()
        if "json" in self.headers.get("Content-Type", ""):
            paths = json.loads(body or b"{}").get("paths", [])
        else:
            paths = parse_qs(body.decode()).get("paths", [])
        dirs = _directories(files)
        wanted = [p.strip("/") for p in paths]
        return 200, [_tree_entry(p, files.get(p), files) for p in wanted if p in files or p in dirs]

    def h_resolve(self, repo: str, rev: str, path: str, rtype: str | None = None) -> tuple[int, Any]:
        _, files, sha = self._files(rtype, repo, rev)
        self.extra_headers["X-Repo-Commit"] = sha
        entry = files.get(path)
        if entry is None:
            raise HubError(404, "Entry not found", "EntryNotFound")  # still sends X-Repo-Commit
        headers = {"ETag": f'"{entry["sha256"] if entry["lfs"] else entry["oid"]}"', "Accept-Ranges": "bytes"}
        if entry["lfs"]:
            headers.update({"X-Linked-Etag": f'"{entry["sha256"]}"', "X-Linked-Size": str(entry["size"])})
        self.extra_headers.update(headers)
        blob = self.store.blob_path(entry["sha256"])
        match = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range", ""))
        if not (match and (match.group(1) or match.group(2))):
            return 200, blob  # streamed by _send (headers only for HEAD)
        data = blob.read_bytes()
        start = int(match.group(1)) if match.group(1) else len(data) - int(match.group(2))
        end = min(int(match.group(2)), len(data) - 1) if match.group(1) and match.group(2) else len(data) - 1
        if not 0 <= start <= end:
            self.extra_headers["Content-Range"] = f"bytes */{len(data)}"
            raise HubError(416, "Requested range not satisfiable")
        self.extra_headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
        return 206, data[start : end + 1]

    # -- branches and tags ---------------------------------------------------------------------------------
    def h_create_branch(self, rtype: str, repo: str, name: str) -> tuple[int, Any]:
        payload = self.json_body()
        with self.store.lock:
            info = self.repo(rtype, repo)
            if name in info["branches"]:
                raise HubError(409, f"Branch {name} already exists")
            info["branches"][name] = Store.resolve(info, payload.get("startingPoint") or "main")
            self.store.save()
        return 200, {}

    def h_delete_branch(self, rtype: str, repo: str, name: str) -> tuple[int, Any]:
        with self.store.lock:
            info = self.repo(rtype, repo)
            if name == "main":
                raise HubError(403, "Cannot delete the default branch")
            if info["branches"].pop(name, None) is None:
                raise HubError(404, f"Branch {name} not found", "RevisionNotFound")
            self.store.save()
        return 200, {}

    def h_create_tag(self, rtype: str, repo: str, rev: str) -> tuple[int, Any]:
        payload = self.json_body()
        with self.store.lock:
            info = self.repo(rtype, repo)
            if payload.get("tag") in info["tags"]:
                raise HubError(409, f"Tag {payload.get('tag')} already exists")
            info["tags"][payload["tag"]] = Store.resolve(info, rev)
            self.store.save()
        return 200, {}

    def h_delete_tag(self, rtype: str, repo: str, name: str) -> tuple[int, Any]:
        with self.store.lock:
            if self.repo(rtype, repo)["tags"].pop(name, None) is None:
                raise HubError(404, f"Tag {name} not found", "RevisionNotFound")
            self.store.save()
        return 200, {}

    # -- uploads ---------------------------------------------------------------------------------------------
    @staticmethod
    def upload_mode(path: str, size: int, sample: bytes) -> str:
        """``lfs`` for big files, binary extensions or binary-looking samples, else ``regular``."""
        if size >= LFS_SIZE_THRESHOLD or os.path.splitext(path)[1].lower() in LFS_EXTENSIONS:
            return "lfs"
        return "lfs" if b"\0" in sample else "regular"

    def h_preupload(self, rtype: str, repo: str, rev: str) -> tuple[int, Any]:
        payload = self.json_body()
        _, files, sha = self._files(rtype, repo, rev)
        out = []
        for item in payload.get("files", []):
            mode = self.upload_mode(
                item["path"], item.get("size", 0), base64.b64decode(item.get("sample", ""))
            )
            entry = files.get(item["path"])
            oid = None if entry is None else (entry["sha256"] if entry["lfs"] else entry["oid"])
            out.append({"path": item["path"], "uploadMode": mode, "shouldIgnore": False, "oid": oid})
        return 200, {"files": out, "commitOid": sha}

    def h_commit(self, rtype: str, repo: str, rev: str) -> tuple[int, Any]:
        lines = [json.loads(line) for line in self.body().splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "First line of the commit payload must be the header", "BadRequest")
        header = lines[0]["value"]
        create_pr = bool(self.query.get("create_pr"))
        with self.store.lock:
            info = self.repo(rtype, repo)
            head = Store.resolve(info, rev)
            is_pr = re.fullmatch(r"refs/pr/\d+", rev) is not None
            if not (create_pr or is_pr or rev.removeprefix("refs/heads/") in info["branches"]):
                raise HubError(400, f"Cannot commit to {rev}: not a branch", "BadRequest")
            if header.get("parentCommit") and header["parentCommit"] != head:
                raise HubError(412, "A commit has happened since. Please refresh and try again.")
            files = copy.deepcopy(info["commits"][head]["files"])
            for line in lines[1:]:
                self._apply(files, line["key"], line["value"])
            sha = Store.add_commit(
                info, head, files, header.get("summary", ""), header.get("description", "")
            )
            url = self.repo_url(info)
            pr_url = None
            if create_pr:
                info["prs"].append(sha)
                pr_url = f"{url}/discussions/{len(info['prs'])}"
            elif is_pr:
                info["prs"][int(rev.split("/")[-1]) - 1] = sha
            else:
                info["branches"][rev.removeprefix("refs/heads/")] = sha
            self.store.save()
        return 200, {
            "success": True,
            "commitOid": sha,
            "commitUrl": f"{url}/commit/{sha}",
            "pullRequestUrl": pr_url,
        }

    def _apply(self, files: dict, key: str, value: dict) -> None:
        path = value.get("path", "").strip("/")
        if key == "file":
            content = value.get("content", "")
            data = base64.b64decode(content) if value.get("encoding") == "base64" else content.encode()
            files[path] = self.store.file_entry(data, lfs=False)
        elif key == "lfsFile":
            oid, size = value["oid"], value.get("size")
            if not self.store.has_blob(oid, size):
                raise HubError(400, f"LFS object {oid} for {path} was not uploaded", "BadRequest")
            size = self.store.blob_path(oid).stat().st_size
            files[path] = {
                "sha256": oid,
                "size": size,
                "lfs": True,
                "oid": git_blob_sha1(lfs_pointer(oid, size)),
            }
        elif key == "deletedFile":
            if files.pop(path, None) is None:
                raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
        elif key == "deletedFolder":
            doomed = [p for p in files if p.startswith(path + "/")]
            if not doomed:
                raise HubError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
            for p in doomed:
                del files[p]
        else:
            raise HubError(400, f"Unsupported commit operation {key!r}", "BadRequest")

    # -- git-LFS batch API (basic and multipart transfers) -------------------------------------------------
    def h_lfs_batch(self, repo: str, rtype: str | None = None) -> tuple[int, Any]:
        payload = self.json_body()
        self.repo(rtype, repo)
        if payload.get("operation") != "upload":
            raise HubError(400, "Only the 'upload' LFS operation is supported", "BadRequest")
        hub = self.server.hub
        multipart = "multipart" in payload.get("transfers", ["basic"])
        transfer, objects = "basic", []
        for obj in payload.get("objects", []):
            oid, size = obj["oid"], int(obj["size"])
            out: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
            if not self.store.has_blob(oid, size):
                href = f"{self.base_url}/_lfs/{oid}"
                upload: dict[str, Any] = {"href": href, "header": {}}
                if multipart and size > hub.multipart_threshold:
                    chunk = hub.multipart_chunk_size
                    upload_id = uuid.uuid4().hex
                    upload = {"href": f"{href}/complete?upload_id={upload_id}&size={size}"}
                    parts = {
                        str(i): f"{href}/part/{i}?upload_id={upload_id}"
                        for i in range(1, -(-size // chunk) + 1)
                    }
                    upload["header"] = {"chunk_size": str(chunk), **parts}
                    transfer = "multipart"
                out["actions"] = {"upload": upload, "verify": {"href": f"{href}/verify", "header": {}}}
            objects.append(out)
        self.extra_headers["Content-Type"] = "application/vnd.git-lfs+json"
        return 200, {"transfer": transfer, "objects": objects, "hash_algo": "sha256"}

    def h_lfs_put(self, oid: str) -> tuple[int, Any]:
        size = self.query.get("size")
        self.store.put_stream(self._body_left, oid, int(size) if size else None)
        return 200, {}

    def _part_dir(self) -> Path:
        upload_id = self.query.get("upload_id", "")
        if not re.fullmatch(r"[0-9a-f]{32}", upload_id):
            raise HubError(400, "Missing or invalid upload_id", "BadRequest")
        return self.store.tmp / upload_id

    def h_lfs_put_part(self, oid: str, part: str) -> tuple[int, Any]:
        data = self.body()
        part_dir = self._part_dir()
        part_dir.mkdir(exist_ok=True)
        (part_dir / part).write_bytes(data)
        self.extra_headers["ETag"] = f'"{hashlib.md5(data).hexdigest()}"'
        return 200, b""

    def h_lfs_complete(self, oid: str) -> tuple[int, Any]:
        payload = self.json_body()
        part_dir = self._part_dir()
        numbers = [int(p["partNumber"]) for p in payload.get("parts", [])]
        if (
            payload.get("oid") != oid
            or not numbers
            or any(not (part_dir / str(n)).is_file() for n in numbers)
        ):
            raise HubError(400, "Invalid multipart completion payload", "BadRequest")
        size = self.query.get("size")
        chunks = ((part_dir / str(n)).read_bytes() for n in sorted(numbers))
        try:
            self.store.put_stream(chunks, oid, int(size) if size else None)
        finally:
            shutil.rmtree(part_dir, ignore_errors=True)
        return 200, {}

    def h_lfs_verify(self, oid: str) -> tuple[int, Any]:
        payload = self.json_body()
        if not self.store.has_blob(oid, payload.get("size")):
            raise HubError(404, f"LFS object {oid} not found", "EntryNotFound")
        return 200, {}


class HubHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    hub: HubServer


class HubServer:
    """Hub-compatible server in a background thread; use as a context manager or call start()/stop()."""

    def __init__(self, root: str | os.PathLike, host: str = "127.0.0.1", port: int = 0) -> None:
        self.store = Store(root)
        self.host, self.port = host, port
        self.verbose = bool(os.environ.get("HUB_SERVER_VERBOSE"))  # log every request to stderr
        self.multipart_threshold = 64 * 1024 * 1024  # LFS uploads above this use the multipart transfer
        self.multipart_chunk_size = 16 * 1024 * 1024
        self._httpd: HubHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """Base URL to use as ``HF_ENDPOINT``."""
        if self._httpd is None:
            raise RuntimeError("HubServer is not started")
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> HubServer:
        """Bind the socket and serve in a daemon thread."""
        self._httpd = HubHTTPServer((self.host, self.port), HubRequestHandler)
        self._httpd.hub = self
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="hub-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket."""
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> None:
    """Command line entry point: serve until interrupted."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--root", required=True, help="storage directory (created if missing)")
    parser.add_argument("--quiet", action="store_true", help="do not log requests")
    args = parser.parse_args(argv)
    server = HubServer(args.root, host=args.host, port=args.port)
    server.verbose = not args.quiet
    server.start()
    print(f"Serving a fake Hub at {server.url} (export HF_ENDPOINT={server.url} HF_HUB_DISABLE_XET=1)")
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


if __name__ == "__main__":
    main()
