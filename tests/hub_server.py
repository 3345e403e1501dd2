# Copyright 2025 The hf-dgm Authors. Licensed under the Apache License, Version 2.0.
"""A small Hugging Face Hub-compatible HTTP server for tests, on loopback, standard library only (+ PyYAML).

It speaks the part of the Hub protocol that `huggingface_hub`, `transformers` and `datasets` use to publish and
load repositories, so the tests drive the real clients over real HTTP:

- repos: `POST /api/repos/create` (409 with `url` when it exists), `DELETE /api/repos/delete`,
  `GET /api/{type}s/{id}[/revision/{rev}]` (`sha`, `siblings`, `cardData`), `/api/whoami-v2`
- files: `POST .../preupload/{rev}` ("regular" or "lfs" per file), `POST .../commit/{rev}` (NDJSON: header, file,
  lfsFile, deletedFile, deletedFolder), `HEAD`/`GET /{id}/resolve/{rev}/{path}` (`X-Repo-Commit`, `ETag`,
  ranges), `GET .../tree/{rev}[/{path}]` (recursive, expand), `POST .../paths-info/{rev}`
- refs: branches (`POST/DELETE .../branch/{name}`), tags (`POST .../tag/{rev}`), `GET .../refs`,
  `GET .../commits/{rev}`; a revision is a branch, a tag, or a 40-hex commit sha
- git LFS: `POST /{id}.git/info/lfs/objects/batch` with upload and verify actions that point back here,
  `PUT` of the object (sha256 and size checked), `POST` of the verify call
- `POST /api/validate-yaml`: parses a card's YAML metadata and checks the types of the common fields

Errors carry the `X-Error-Code` the client maps to its exceptions (`RepoNotFound`, `RevisionNotFound`,
`EntryNotFound`). Writes need `Authorization: Bearer <token>`; a wrong token is refused everywhere. Commits are
immutable snapshots with 40-hex ids; file contents live in a temp dir, addressed by sha256.

Which files go through LFS is set by `HubServer.upload_mode`: "auto" (the Hub's rule: large files and the
binary patterns of its default `.gitattributes`), "regular" (everything inline) or "lfs" (everything LFS). A
client with `hf_xet` installed uploads "lfs" files through Xet, which this server does not speak: set
`HF_HUB_DISABLE_XET=1` before importing huggingface_hub.

Run it by hand with `python tests/hub_server.py --port 8000` and `HF_ENDPOINT=http://127.0.0.1:8000`.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import fnmatch
import hashlib
import itertools
import json
import os
import re
import shutil
import tempfile
import threading
import time
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, quote, unquote, urlsplit

import yaml


DEFAULT_TOKEN = "hf_test_token"
DEFAULT_USER = "test-user"
REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
URL_PREFIXES = {"model": "", "dataset": "datasets/", "space": "spaces/"}
COMMIT_SHA = re.compile(r"^[0-9a-f]{40}$")
# Files the Hub stores in LFS whatever their size: the patterns of the `.gitattributes` it puts in a new repo.
LFS_PATTERNS = (
    "*.7z", "*.arrow", "*.bin", "*.bz2", "*.ckpt", "*.ftz", "*.gz", "*.h5", "*.joblib", "*.lfs.*", "*.mlmodel",
    "*.model", "*.msgpack", "*.npy", "*.npz", "*.onnx", "*.ot", "*.parquet", "*.pb", "*.pickle", "*.pkl", "*.pt",
    "*.pth", "*.rar", "*.safetensors", "*.tar", "*.tflite", "*.tgz", "*.wasm", "*.xz", "*.zip", "*.zst",
)
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024
GITATTRIBUTES = "".join(f"{pattern} filter=lfs diff=lfs merge=lfs -text\n" for pattern in LFS_PATTERNS).encode()


def git_blob_sha(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


@dataclasses.dataclass(frozen=True)
class FileEntry:
    sha256: str  # of the content: names the stored object, and is the LFS oid
    size: int
    lfs: bool
    git_oid: str  # git's blob id: of the content, or for LFS of the pointer file


@dataclasses.dataclass
class Commit:
    oid: str
    parent: str | None
    title: str
    message: str
    date: str
    files: dict[str, FileEntry]


@dataclasses.dataclass
class Repo:
    repo_type: str
    repo_id: str
    private: bool
    created_at: str
    commits: dict[str, Commit] = dataclasses.field(default_factory=dict)
    branches: dict[str, str] = dataclasses.field(default_factory=dict)
    tags: dict[str, str] = dataclasses.field(default_factory=dict)
    lfs_objects: set[str] = dataclasses.field(default_factory=set)  # LFS uploads belong to a repo, as on the Hub


class HubError(Exception):
    """An error reply: HTTP status, optional `X-Error-Code`, message (JSON `error` and `X-Error-Message`)."""

    def __init__(self, status: int, message: str, error_code: str | None = None, headers: dict | None = None,
                 body: dict | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_code = error_code
        self.headers = headers or {}
        self.body = body or {}  # extra JSON fields, e.g. the `url` of a 409 on create


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class HubServer:
    """The Hub state and the HTTP server around it. `start()` serves from a daemon thread; `stop()` ends it.

    Pass `sock` (a bound, not yet listening TCP socket) to serve on a port chosen earlier, e.g. one put in
    `HF_ENDPOINT` before huggingface_hub was imported.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, sock=None, token: str = DEFAULT_TOKEN,
                 user: str = DEFAULT_USER, storage_dir: str | None = None):
        self.token = token
        self.user = user
        self.upload_mode = "auto"  # "auto" | "regular" | "lfs"
        self._owns_storage = storage_dir is None
        self.storage_dir = storage_dir or tempfile.mkdtemp(prefix="hub-server-")
        os.makedirs(os.path.join(self.storage_dir, "objects"), exist_ok=True)
        self.repos: dict[tuple[str, str], Repo] = {}
        self.requests: list[tuple[str, str, int]] = []  # (method, path, status) of every request, for tests
        self.lock = threading.RLock()
        self._counter = itertools.count()
        self.commit_gate = threading.Event()  # cleared by `holding_commits`: commits wait until it is set again
        self.commit_gate.set()
        self.faults: list[tuple[re.Pattern, int]] = []  # (path regex, status) of requests that fail on purpose

        if sock is None:
            self.httpd = ThreadingHTTPServer((host, port), _make_handler(self))
        else:
            self.httpd = ThreadingHTTPServer(sock.getsockname()[:2], _make_handler(self), bind_and_activate=False)
            self.httpd.socket.close()
            self.httpd.socket = sock
            self.httpd.server_address = sock.getsockname()[:2]
            self.httpd.server_activate()
        self.httpd.daemon_threads = True
        self.host, self.port = self.httpd.server_address[:2]
        self.endpoint = f"http://{self.host}:{self.port}"
        self._thread = None

    # -- lifecycle ------------------------------------------------------------------------------------------

    def start(self) -> "HubServer":
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="hub-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        if self._owns_storage:
            shutil.rmtree(self.storage_dir, ignore_errors=True)

    @contextlib.contextmanager
    def uploads(self, mode: str):
        """Temporarily decides how files are uploaded: "regular" (inline), "lfs" or "auto"."""
        if mode not in ("auto", "regular", "lfs"):
            raise ValueError(f"upload mode must be 'auto', 'regular' or 'lfs', got {mode!r}")
        previous, self.upload_mode = self.upload_mode, mode
        try:
            yield
        finally:
            self.upload_mode = previous

    @contextlib.contextmanager
    def holding_commits(self):
        """Commits wait (without blocking any other request) until the block ends: a slow Hub."""
        self.commit_gate.clear()
        try:
            yield
        finally:
            self.commit_gate.set()

    @contextlib.contextmanager
    def failing(self, path_pattern: str = ".*", status: int = 503):
        """Requests whose path matches `path_pattern` get `status` (503: a Hub that is down) inside the block."""
        fault = (re.compile(path_pattern), status)
        self.faults.append(fault)
        try:
            yield
        finally:
            self.faults.remove(fault)

    # -- objects --------------------------------------------------------------------------------------------

    def _object_path(self, sha256: str) -> str:
        return os.path.join(self.storage_dir, "objects", sha256)

    def store_object(self, content: bytes) -> str:
        sha256 = hashlib.sha256(content).hexdigest()
        path = self._object_path(sha256)
        if not os.path.exists(path):
            fd, temp_path = tempfile.mkstemp(dir=os.path.dirname(path))
            with os.fdopen(fd, "wb") as f:
                f.write(content)
            os.replace(temp_path, path)
        return sha256

    def read_object(self, sha256: str) -> bytes:
        with open(self._object_path(sha256), "rb") as f:
            return f.read()

    def make_entry(self, sha256: str, size: int, lfs: bool) -> FileEntry:
        git_oid = git_blob_sha(lfs_pointer(sha256, size)) if lfs else git_blob_sha(self.read_object(sha256))
        return FileEntry(sha256, size, lfs, git_oid)

    # -- repos and revisions --------------------------------------------------------------------------------

    def get_repo(self, repo_type: str, repo_id: str, authorized: bool) -> Repo:
        repo = self.repos.get((repo_type, repo_id))
        if repo is None or (repo.private and not authorized):
            raise HubError(404, f"Repository {repo_type}s/{repo_id} not found.", "RepoNotFound")
        return repo

    def create_repo(self, repo_type: str, repo_id: str, private: bool) -> Repo:
        repo = Repo(repo_type=repo_type, repo_id=repo_id, private=private, created_at=_now())
        files = {".gitattributes": self.make_entry(self.store_object(GITATTRIBUTES), len(GITATTRIBUTES), False)}
        self.repos[(repo_type, repo_id)] = repo
        self.add_commit(repo, "main", None, "initial commit", "", files)
        return repo

    def add_commit(self, repo: Repo, branch: str, parent: str | None, title: str, message: str,
                   files: dict[str, FileEntry]) -> Commit:
        seed = f"{repo.repo_type}/{repo.repo_id}\n{parent}\n{title}\n{time.time_ns()}\n{next(self._counter)}"
        commit = Commit(hashlib.sha1(seed.encode()).hexdigest(), parent, title, message, _now(), dict(files))
        repo.commits[commit.oid] = commit
        repo.branches[branch] = commit.oid
        return commit

    @staticmethod
    def resolve_revision(repo: Repo, revision: str) -> Commit:
        if revision in repo.branches:
            return repo.commits[repo.branches[revision]]
        if revision in repo.tags:
            return repo.commits[repo.tags[revision]]
        if COMMIT_SHA.fullmatch(revision) and revision in repo.commits:
            return repo.commits[revision]
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    def upload_mode_for(self, path: str, size: int) -> str:
        if self.upload_mode != "auto":
            return self.upload_mode
        name = path.rsplit("/", 1)[-1]
        is_binary_pattern = any(fnmatch.fnmatch(name, pattern) for pattern in LFS_PATTERNS)
        return "lfs" if size > LFS_SIZE_THRESHOLD or is_binary_pattern else "regular"

    def file_entry(self, repo_type: str, repo_id: str, path: str, revision: str = "main") -> FileEntry | None:
        """For tests: the stored entry of a file (`.lfs` tells whether it went through LFS)."""
        with self.lock:
            commit = self.resolve_revision(self.repos[(repo_type, repo_id)], revision)
            return commit.files.get(path)


# ----------------------------------------------------------------------------------------------------------
# Metadata validation (the subset of the Hub's checks that catches malformed cards)
# ----------------------------------------------------------------------------------------------------------


def _front_matter(content: str) -> tuple[dict | None, str | None]:
    """(metadata, error) of a README's YAML block; (None, None) when there is none."""
    match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", content, flags=re.DOTALL)
    if match is None:
        return None, None
    try:
        metadata = yaml.safe_load(match.group(1))
    except yaml.YAMLError as error:
        return None, f"YAML metadata could not be parsed: {error}"
    if metadata is None:
        return {}, None
    if not isinstance(metadata, dict):
        return None, f"YAML metadata must be a mapping, got {type(metadata).__name__}"
    return metadata, None


def _is_str_or_str_list(value) -> bool:
    return isinstance(value, str) or (isinstance(value, list) and all(isinstance(item, str) for item in value))


def validate_metadata(metadata: dict) -> list[str]:
    """Error messages for the common card fields: their types and the shape of `model-index`."""
    errors = []
    for key in ("license", "library_name", "pipeline_tag", "model_name", "base_model_relation"):
        if key in metadata and not isinstance(metadata[key], str):
            errors.append(f'"{key}" must be a string')
    for key in ("tags", "datasets", "language", "metrics", "base_model", "license_name"):
        if key in metadata and not _is_str_or_str_list(metadata[key]):
            errors.append(f'"{key}" must be a string or a list of strings')
    if "pipeline_tag" in metadata and isinstance(metadata["pipeline_tag"], str):
        if not re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", metadata["pipeline_tag"]):
            errors.append(f'"pipeline_tag" is not a valid task id: {metadata["pipeline_tag"]!r}')
    model_index = metadata.get("model-index")
    if model_index is not None:
        if not isinstance(model_index, list):
            return errors + ['"model-index" must be a list']
        for i, model in enumerate(model_index):
            if not isinstance(model, dict) or not isinstance(model.get("name"), str):
                errors.append(f'"model-index[{i}]" must be a mapping with a string "name"')
                continue
            results = model.get("results", [])
            if not isinstance(results, list):
                errors.append(f'"model-index[{i}].results" must be a list')
                continue
            for j, result in enumerate(results):
                where = f"model-index[{i}].results[{j}]"
                if not isinstance(result, dict):
                    errors.append(f'"{where}" must be a mapping')
                    continue
                task, dataset, metrics = result.get("task"), result.get("dataset"), result.get("metrics")
                if not isinstance(task, dict) or not isinstance(task.get("type"), str):
                    errors.append(f'"{where}.task.type" must be a string')
                if not isinstance(dataset, dict) or not all(isinstance(dataset.get(k), str) for k in ("type", "name")):
                    errors.append(f'"{where}.dataset" needs string "type" and "name"')
                if not isinstance(metrics, list) or not metrics:
                    errors.append(f'"{where}.metrics" must be a non-empty list')
                    continue
                for k, metric in enumerate(metrics):
                    if not isinstance(metric, dict) or not isinstance(metric.get("type"), str) or "value" not in metric:
                        errors.append(f'"{where}.metrics[{k}]" needs a string "type" and a "value"')
                    elif not isinstance(metric["value"], (int, float, str)) or isinstance(metric["value"], bool):
                        errors.append(f'"{where}.metrics[{k}].value" must be a number or a string')
    return errors


def check_readme(content: str) -> tuple[list[str], list[str]]:
    """(errors, warnings) for a README.md, as `/api/validate-yaml` reports them."""
    metadata, error = _front_matter(content)
    if error:
        return [error], []
    if not metadata:
        return [], ["empty or missing yaml metadata in repo card"]
    return validate_metadata(metadata), []


# ----------------------------------------------------------------------------------------------------------
# HTTP
# ----------------------------------------------------------------------------------------------------------


def _make_handler(hub: HubServer):
    class Handler(_HubRequestHandler):
        server_state = hub

    return Handler


class _HubRequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_state: HubServer

    # -- plumbing -------------------------------------------------------------------------------------------

    def log_message(self, format, *args):  # noqa: A002 - signature of the base class
        pass  # requests are recorded in `HubServer.requests` instead of being printed

    def _read_body(self) -> bytes:
        self._body_read = True
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _json_body(self):
        body = self._read_body()
        try:
            return json.loads(body or b"{}")
        except json.JSONDecodeError as error:
            raise HubError(400, f"Request body is not valid JSON: {error}")

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, content_type="application/json"):
        self.send_response(status)
        headers = {"Content-Type": content_type, "Content-Length": str(len(body)), **(headers or {})}
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self.server_state.requests.append((self.command, self.path, status))

    def _send_json(self, status: int, obj, headers: dict | None = None):
        self._send(status, json.dumps(obj).encode(), headers)

    def _send_error(self, error: HubError):
        headers = {"X-Error-Message": error.message.encode("ascii", "replace").decode(), **error.headers}
        if error.error_code:
            headers["X-Error-Code"] = error.error_code
        has_body = self.headers.get("Content-Length", "0") != "0" or "Transfer-Encoding" in self.headers
        if has_body and not self._body_read:  # the unread body would be parsed as the next request
            headers["Connection"] = "close"
            self.close_connection = True
        self._send_json(error.status, {"error": error.message, **error.body}, headers)

    @property
    def _endpoint(self) -> str:
        return f"http://{self.headers.get('Host') or f'{self.server_state.host}:{self.server_state.port}'}"

    def _auth(self) -> bool:
        """True for the server's token, False without a token; a wrong token is refused outright."""
        header = self.headers.get("Authorization")
        if not header:
            return False
        if header != f"Bearer {self.server_state.token}":
            raise HubError(401, "Invalid credentials in Authorization header")
        return True

    def _require_auth(self):
        if not self._auth():
            raise HubError(401, "You must be authenticated to do this (pass a token).")

    def _dispatch(self):
        self._body_read = False
        try:
            self._route()
        except HubError as error:
            self._send_error(error)
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception as error:  # noqa: BLE001 - report server bugs to the client, do not hang it
            self._send_error(HubError(500, f"Test hub server error: {type(error).__name__}: {error}"))

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _dispatch

    # -- routing --------------------------------------------------------------------------------------------

    def _route(self):
        url = urlsplit(self.path)
        self.query = parse_qs(url.query)
        raw = [segment for segment in url.path.split("/")[1:]]
        segments = [unquote(segment) for segment in raw]
        method = self.command
        for pattern, status in list(self.server_state.faults):
            if pattern.search(url.path):
                raise HubError(status, f"Injected failure of the test hub for {url.path}")

        if segments[:2] == ["api", "whoami-v2"]:
            self._require_auth()
            return self._send_json(200, {"type": "user", "name": self.server_state.user, "fullname": "Test User",
                                         "orgs": [], "auth": {"type": "access_token",
                                                              "accessToken": {"displayName": "test", "role": "write"}}})
        if segments[:2] == ["api", "agent-harnesses"]:  # huggingface_hub's best-effort agent detection
            return self._send_json(200, {"standardEnvVars": [], "harnesses": {}})
        if segments[:3] == ["api", "repos", "create"] and method == "POST":
            return self._create_repo()
        if segments[:3] == ["api", "repos", "delete"] and method == "DELETE":
            return self._delete_repo()
        if segments[:2] == ["api", "validate-yaml"] and method == "POST":
            return self._validate_yaml()
        if len(segments) >= 4 and segments[0] == "api" and segments[1] in REPO_TYPES:
            repo_type, repo_id = REPO_TYPES[segments[1]], f"{segments[2]}/{segments[3]}"
            return self._repo_api(method, repo_type, repo_id, segments[4:])
        if segments and segments[0] in ("lfs-objects", "lfs-verify") and len(segments) == 5:
            _, repo_type, namespace, name, oid = segments
            if segments[0] == "lfs-objects":
                return self._lfs_object(repo_type, f"{namespace}/{name}", oid)
            return self._lfs_verify(repo_type, f"{namespace}/{name}", oid)

        # /{id}/..., /datasets/{id}/..., /spaces/{id}/...
        repo_type = "model"
        if segments and segments[0] in ("datasets", "spaces"):
            repo_type, segments = REPO_TYPES[segments[0]], segments[1:]
        if len(segments) >= 2 and segments[1].endswith(".git") and segments[2:] == ["info", "lfs", "objects", "batch"]:
            return self._lfs_batch(repo_type, f"{segments[0]}/{segments[1][: -len('.git')]}")
        if len(segments) >= 5 and segments[2] == "resolve" and method in ("GET", "HEAD"):
            return self._resolve(repo_type, f"{segments[0]}/{segments[1]}", segments[3], "/".join(segments[4:]))
        raise HubError(404, f"Test hub server has no route for {method} {url.path}")

    def _repo_api(self, method: str, repo_type: str, repo_id: str, rest: list[str]):
        action, args = (rest[0], rest[1:]) if rest else ("", [])
        server = self.server_state
        if action == "commit" and not server.commit_gate.wait(timeout=300):
            raise HubError(504, "Commit held by the test hub for too long.")
        with server.lock:
            authorized = self._auth()
            repo = server.get_repo(repo_type, repo_id, authorized)
            if method == "GET" and action == "":
                return self._send_json(200, self._repo_info(repo, server.resolve_revision(repo, "main")))
            if method == "GET" and action == "revision":
                return self._send_json(200, self._repo_info(repo, server.resolve_revision(repo, "/".join(args))))
            if method == "GET" and action == "tree":
                return self._tree(repo, args[0], "/".join(args[1:]))
            if method == "POST" and action == "paths-info":
                return self._paths_info(repo, args[0])
            if method == "GET" and action == "refs":
                return self._send_json(200, {
                    "branches": [{"name": n, "ref": f"refs/heads/{n}", "targetCommit": c}
                                 for n, c in repo.branches.items()],
                    "tags": [{"name": n, "ref": f"refs/tags/{n}", "targetCommit": c} for n, c in repo.tags.items()],
                    "converts": [], "pullRequests": []})
            if method == "GET" and action == "commits":
                return self._commits(repo, "/".join(args))
            if method in ("POST", "PUT", "DELETE"):
                if not authorized:
                    raise HubError(401, "You must be authenticated to write to this repository.")
                if action == "preupload":
                    return self._preupload(repo, "/".join(args))
                if action == "commit":
                    return self._commit(repo, "/".join(args))
                if action == "branch":
                    return self._branch(method, repo, "/".join(args))
                if action == "tag":
                    return self._tag(method, repo, "/".join(args))
                if action == "settings" and method == "PUT":
                    settings = self._json_body()
                    if "private" in settings:
                        repo.private = bool(settings["private"])
                    return self._send_json(200, {})
        raise HubError(404, f"Test hub server has no route for {method} {self.path}")

    # -- repositories ---------------------------------------------------------------------------------------

    def _create_repo(self):
        self._require_auth()
        body = self._json_body()
        repo_type = body.get("type") or "model"
        if repo_type not in URL_PREFIXES:
            raise HubError(400, f"Invalid repo type {repo_type!r}")
        name = body.get("name")
        if not name or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}", name) or name.endswith(".git"):
            raise HubError(400, f"Invalid repo name {name!r}: use letters, digits, '-', '_' and '.'.")
        repo_id = f"{body.get('organization') or self.server_state.user}/{name}"
        url = f"{self._endpoint}/{URL_PREFIXES[repo_type]}{repo_id}"
        private = body.get("private") or body.get("visibility") == "private"
        with self.server_state.lock:
            if (repo_type, repo_id) in self.server_state.repos:
                raise HubError(409, "You already created this repo", body={"url": url})
            self.server_state.create_repo(repo_type, repo_id, bool(private))
        self._send_json(200, {"url": url, "name": repo_id, "id": repo_id})

    def _delete_repo(self):
        self._require_auth()
        body = self._json_body()
        repo_type = body.get("type") or "model"
        repo_id = f"{body.get('organization') or self.server_state.user}/{body.get('name')}"
        with self.server_state.lock:
            if self.server_state.repos.pop((repo_type, repo_id), None) is None:
                raise HubError(404, f"Repository {repo_id} not found.", "RepoNotFound")
        self._send_json(200, {})

    def _siblings(self, commit: Commit) -> list[dict]:
        return [self._file_info(path, entry, lfs_key=True) for path, entry in sorted(commit.files.items())]

    @staticmethod
    def _file_info(path: str, entry: FileEntry, lfs_key: bool = False) -> dict:
        """A file as the Hub describes it: tree/paths-info entries, or siblings (`lfs_key`)."""
        lfs = {"oid": entry.sha256, "size": entry.size, "pointerSize": len(lfs_pointer(entry.sha256, entry.size))}
        if lfs_key:
            info = {"rfilename": path, "size": entry.size, "blobId": entry.git_oid}
            if entry.lfs:
                info["lfs"] = {"sha256": entry.sha256, "size": entry.size, "pointerSize": lfs["pointerSize"]}
            return info
        info = {"type": "file", "oid": entry.git_oid, "size": entry.size, "path": path}
        if entry.lfs:
            info["lfs"] = lfs
        return info

    def _repo_info(self, repo: Repo, commit: Commit) -> dict:
        card_data = None
        if "README.md" in commit.files:
            card_data, _ = _front_matter(self.server_state.read_object(commit.files["README.md"].sha256).decode())
        info = {
            "_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24],
            "id": repo.repo_id,
            "author": repo.repo_id.split("/")[0],
            "sha": commit.oid,
            "lastModified": commit.date,
            "createdAt": repo.created_at,
            "private": repo.private,
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": list((card_data or {}).get("tags") or []),
            "siblings": self._siblings(commit),
            "usedStorage": sum(entry.size for entry in commit.files.values()),
        }
        if card_data:
            info["cardData"] = card_data
            if repo.repo_type == "model":
                for key in ("library_name", "pipeline_tag"):
                    if key in card_data:
                        info[key] = card_data[key]
        if repo.repo_type == "model" and "config.json" in commit.files:
            with contextlib.suppress(ValueError):
                info["config"] = json.loads(self.server_state.read_object(commit.files["config.json"].sha256))
        return info

    # -- listing --------------------------------------------------------------------------------------------

    @staticmethod
    def _folders(commit: Commit) -> set[str]:
        folders = set()
        for path in commit.files:
            parts = path.split("/")[:-1]
            folders.update("/".join(parts[: i + 1]) for i in range(len(parts)))
        return folders

    def _last_commit(self, repo: Repo, commit: Commit, path: str) -> dict:
        """The newest commit, up to `commit`, after which `path` (file or folder) no longer changed."""

        def state(c: Commit):
            return sorted((p, e.sha256) for p, e in c.files.items() if p == path or p.startswith(path + "/"))

        current, target = commit, state(commit)
        while current.parent is not None and state(repo.commits[current.parent]) == target:
            current = repo.commits[current.parent]
        return {"id": current.oid, "title": current.title, "date": current.date}

    def _entry_info(self, repo: Repo, commit: Commit, path: str, expand: bool) -> dict:
        if path in commit.files:
            info = self._file_info(path, commit.files[path])
        else:
            tree = sorted((p, e.git_oid) for p, e in commit.files.items() if p.startswith(path + "/"))
            info = {"type": "directory", "oid": hashlib.sha1(json.dumps(tree).encode()).hexdigest(), "size": 0,
                    "path": path}
        if expand:
            info["lastCommit"] = self._last_commit(repo, commit, path)
        return info

    def _tree(self, repo: Repo, revision: str, path: str):
        commit = self.server_state.resolve_revision(repo, revision)
        recursive = self.query.get("recursive", ["false"])[0].lower() in ("1", "true")
        expand = self.query.get("expand", ["false"])[0].lower() in ("1", "true")
        path = path.strip("/")
        folders = self._folders(commit)
        if path and path not in folders:
            if path in commit.files:
                raise HubError(400, f"{path} is a file, not a folder")
            raise HubError(404, f"Path {path} not found in {revision}", "EntryNotFound",
                           {"X-Repo-Commit": commit.oid})
        prefix = f"{path}/" if path else ""
        candidates = [p for p in sorted(folders) + sorted(commit.files) if p.startswith(prefix)]
        if not recursive:
            candidates = [p for p in candidates if "/" not in p[len(prefix):]]
        entries = [self._entry_info(repo, commit, p, expand) for p in candidates]
        self._send_json(200, entries)

    def _paths_info(self, repo: Repo, revision: str):
        commit = self.server_state.resolve_revision(repo, revision)
        body = self._read_body().decode()
        if self.headers.get("Content-Type", "").startswith("application/json"):
            form = json.loads(body or "{}")
            paths, expand = form.get("paths", []), bool(form.get("expand"))
        else:
            form = parse_qs(body)
            paths = form.get("paths", [])
            expand = form.get("expand", ["false"])[0].lower() in ("1", "true")
        folders = self._folders(commit)
        entries = [
            self._entry_info(repo, commit, path.strip("/"), expand)
            for path in paths
            if path.strip("/") in commit.files or path.strip("/") in folders
        ]
        self._send_json(200, entries)

    def _commits(self, repo: Repo, revision: str):
        commit = self.server_state.resolve_revision(repo, revision)
        history = []
        while commit is not None:
            history.append({"id": commit.oid, "title": commit.title, "message": commit.message,
                            "authors": [{"user": self.server_state.user}], "date": commit.date})
            commit = repo.commits[commit.parent] if commit.parent else None
        self._send_json(200, history)

    # -- refs -----------------------------------------------------------------------------------------------

    def _branch(self, method: str, repo: Repo, branch: str):
        if method == "DELETE":
            if branch == "main" or repo.branches.pop(branch, None) is None:
                raise HubError(404 if branch != "main" else 403, f"Cannot delete branch {branch}")
            return self._send_json(200, {})
        if not branch or branch in repo.branches or branch in repo.tags:
            raise HubError(409, f"Reference {branch} already exists")
        starting_point = self._json_body().get("startingPoint") or "main"
        repo.branches[branch] = self.server_state.resolve_revision(repo, starting_point).oid
        self._send_json(200, {})

    def _tag(self, method: str, repo: Repo, target: str):
        if method == "DELETE":
            if repo.tags.pop(target, None) is None:
                raise HubError(404, f"Tag {target} not found", "RevisionNotFound")
            return self._send_json(200, {})
        tag = self._json_body().get("tag")
        if not tag or tag in repo.tags or tag in repo.branches:
            raise HubError(409, f"Tag {tag!r} already exists or is empty")
        repo.tags[tag] = self.server_state.resolve_revision(repo, target or "main").oid
        self._send_json(200, {})

    # -- uploads --------------------------------------------------------------------------------------------

    def _writable_branch(self, repo: Repo, revision: str) -> str:
        if self.query.get("create_pr"):
            raise HubError(400, "The test hub server does not support pull requests (create_pr).")
        if revision not in repo.branches:
            self.server_state.resolve_revision(repo, revision)  # 404 RevisionNotFound when unknown
            raise HubError(400, f"Can only commit to a branch, not to {revision!r}.")
        return revision

    def _preupload(self, repo: Repo, revision: str):
        branch = self._writable_branch(repo, revision)
        head = repo.commits[repo.branches[branch]]
        files = []
        for file in self._json_body().get("files", []):
            path, size = file["path"], int(file["size"])
            mode = self.server_state.upload_mode_for(path, size)
            info = {"path": path, "uploadMode": mode, "shouldIgnore": False}
            existing = head.files.get(path)
            if existing is not None:
                info["oid"] = existing.sha256 if mode == "lfs" else existing.git_oid
            files.append(info)
        self._send_json(200, {"files": files, "commitOid": head.oid})

    def _commit(self, repo: Repo, revision: str):
        server = self.server_state
        branch = self._writable_branch(repo, revision)
        head = repo.commits[repo.branches[branch]]
        lines = [json.loads(line) for line in self._read_body().splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "A commit starts with a 'header' line.")
        header = lines[0]["value"]
        title = header.get("summary") or ""
        if not title:
            raise HubError(400, "The commit summary must not be empty.")
        parent_commit = header.get("parentCommit")
        if parent_commit and parent_commit != head.oid:
            raise HubError(412, f"A commit has happened since {parent_commit}: the branch head is {head.oid}.")

        files = dict(head.files)
        for line in lines[1:]:
            key, value = line.get("key"), line.get("value", {})
            path = value.get("path", "").strip("/")
            if key == "file":
                if value.get("encoding", "base64") != "base64":
                    raise HubError(400, f"Unsupported encoding {value.get('encoding')!r} for {path}")
                content = base64.b64decode(value["content"])
                if path == "README.md":
                    errors, _ = check_readme(content.decode("utf-8", "replace"))
                    if errors:
                        raise HubError(400, "Invalid metadata in README.md: " + "; ".join(errors))
                files[path] = server.make_entry(server.store_object(content), len(content), False)
            elif key == "lfsFile":
                oid = value.get("oid", "")
                if value.get("algo", "sha256") != "sha256" or oid not in repo.lfs_objects:
                    raise HubError(422, f"LFS object {oid} of {path} was not uploaded before the commit.")
                size = os.path.getsize(server._object_path(oid))
                if "size" in value and int(value["size"]) != size:
                    raise HubError(422, f"LFS object {oid} of {path} has size {size}, not {value['size']}.")
                files[path] = server.make_entry(oid, size, True)
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
                raise HubError(400, f"Unknown commit operation {key!r}")

        commit = server.add_commit(repo, branch, head.oid, title, header.get("description") or "", files)
        prefix = URL_PREFIXES[repo.repo_type]
        self._send_json(200, {"success": True, "commitOid": commit.oid, "pullRequestUrl": None,
                              "commitUrl": f"{self._endpoint}/{prefix}{repo.repo_id}/commit/{commit.oid}"})

    # -- git LFS --------------------------------------------------------------------------------------------

    def _lfs_batch(self, repo_type: str, repo_id: str):
        server = self.server_state
        with server.lock:
            authorized = self._auth()
            repo = server.get_repo(repo_type, repo_id, authorized)
        if not authorized:
            raise HubError(401, "You must be authenticated to upload LFS objects.")
        body = self._json_body()
        if body.get("operation") != "upload":
            raise HubError(400, "The test hub server only serves LFS uploads (downloads go through resolve).")
        objects = []
        for obj in body.get("objects", []):
            oid, size = obj["oid"], int(obj["size"])
            reply = {"oid": oid, "size": size, "authenticated": True}
            if oid not in repo.lfs_objects:
                where = f"{repo_type}/{repo_id}/{oid}"
                reply["actions"] = {
                    "upload": {"href": f"{self._endpoint}/lfs-objects/{where}", "header": {}},
                    "verify": {"href": f"{self._endpoint}/lfs-verify/{where}", "header": {}},
                }
            objects.append(reply)
        self._send(200, json.dumps({"transfer": "basic", "objects": objects}).encode(),
                   content_type="application/vnd.git-lfs+json")

    def _lfs_object(self, repo_type: str, repo_id: str, oid: str):
        """The upload action's PUT. Unauthenticated, like a pre-signed storage URL."""
        if self.command != "PUT":
            raise HubError(405, "LFS objects are only uploaded here.")
        content = self._read_body()
        if hashlib.sha256(content).hexdigest() != oid:
            raise HubError(400, f"Uploaded content does not match LFS oid {oid}.")
        server = self.server_state
        with server.lock:
            server.store_object(content)
            server.get_repo(repo_type, repo_id, authorized=True).lfs_objects.add(oid)
        self._send(200)

    def _lfs_verify(self, repo_type: str, repo_id: str, oid: str):
        self._require_auth()
        body = self._json_body()
        server = self.server_state
        with server.lock:
            repo = server.get_repo(repo_type, repo_id, authorized=True)
        if oid not in repo.lfs_objects or os.path.getsize(server._object_path(oid)) != int(body.get("size", -1)):
            raise HubError(422, f"LFS object {oid} is missing or has the wrong size.")
        self._send_json(200, {})

    # -- downloads ------------------------------------------------------------------------------------------

    def _resolve(self, repo_type: str, repo_id: str, revision: str, path: str):
        server = self.server_state
        with server.lock:
            repo = server.get_repo(repo_type, repo_id, self._auth())
            commit = server.resolve_revision(repo, revision)
            entry = commit.files.get(path)
        if entry is None:
            raise HubError(404, f"Entry not found: {path} at {revision}", "EntryNotFound",
                           {"X-Repo-Commit": commit.oid})
        etag = entry.sha256 if entry.lfs else entry.git_oid
        headers = {"X-Repo-Commit": commit.oid, "ETag": f'"{etag}"', "Accept-Ranges": "bytes",
                   "Content-Disposition": f"inline; filename*=UTF-8''{quote(path.rsplit('/', 1)[-1])}"}
        if entry.lfs:
            headers.update({"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(entry.size)})
        content = server.read_object(entry.sha256)
        status = 200
        byte_range = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range", "").strip())
        if byte_range and self.command == "GET" and (byte_range.group(1) or byte_range.group(2)):
            start_text, end_text = byte_range.groups()
            if start_text:
                start, end = int(start_text), int(end_text) if end_text else len(content) - 1
            else:  # suffix range: the last N bytes
                start, end = max(0, len(content) - int(end_text)), len(content) - 1
            if start >= len(content) and len(content) > 0:
                raise HubError(416, "Requested range not satisfiable",
                               headers={"Content-Range": f"bytes */{len(content)}"})
            end = min(end, len(content) - 1)
            headers["Content-Range"] = f"bytes {start}-{end}/{len(content)}"
            content, status = content[start : end + 1], 206
        self._send(status, content, headers, content_type="application/octet-stream")

    # -- validate-yaml --------------------------------------------------------------------------------------

    def _validate_yaml(self):
        body = self._json_body()
        errors, warnings = check_readme(body.get("content", ""))
        status = 400 if errors else 200
        self._send_json(status, {"errors": [{"message": e} for e in errors],
                                 "warnings": [{"message": w} for w in warnings]})


def main():
    import argparse

    parser = argparse.ArgumentParser(description="Run the test Hub server on loopback.")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--token", default=DEFAULT_TOKEN)
    parser.add_argument("--upload_mode", choices=["auto", "regular", "lfs"], default="auto")
    args = parser.parse_args()
    server = HubServer(port=args.port, token=args.token)
    server.upload_mode = args.upload_mode
    print(f"Hub server on {server.endpoint} (token {args.token!r}); Ctrl-C stops it.")
    try:
        server.httpd.serve_forever()
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":
    main()
