"""In-memory stand-in for the Hugging Face Hub HTTP API (huggingface_hub 2.4.0, Xet disabled).

Why: tests of a model-publishing project must drive the *real* ``huggingface_hub`` client (create_repo,
upload_folder, git-LFS upload, NDJSON commit, list/tree, hf_hub_download) offline, and inject auth failures and
connection cuts. Stdlib only. Clients must run with ``HF_HUB_DISABLE_XET=1`` (legacy LFS protocol only)::

    hub = HubStandin(require_token="hf_test").start()   # 127.0.0.1, random port; hub.endpoint
    os.environ["HF_ENDPOINT"] = hub.endpoint            # before importing huggingface_hub
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
import threading
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self
from urllib.parse import parse_qs, unquote, urlsplit

JSON = dict[str, Any]
_TYPES = "models|datasets|spaces"
_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}


def git_blob_sha1(data: bytes) -> str:
    """Git blob id: what the Hub reports as `oid`/ETag for regular files and what the client compares in preupload."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    """Git-LFS pointer file; its blob id is the `oid` the Hub reports for LFS files in tree listings."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


@dataclass
class RepoFile:
    """One file of a commit. Content lives in `HubStandin.objects`, keyed by sha256."""

    sha256: str
    size: int
    lfs: bool
    blob_id: str  # git sha1 of the content (regular) or of the LFS pointer (LFS)

    @property
    def pointer_size(self) -> int:
        return len(lfs_pointer(self.sha256, self.size))


@dataclass
class Repo:
    """A repo with a linear history on `main`; every commit keeps a full snapshot (cheap: files are references)."""

    repo_type: str
    repo_id: str
    private: bool
    commits: list[tuple[str, dict[str, RepoFile]]] = field(default_factory=list)

    def snapshot(self, revision: str) -> tuple[str, dict[str, RepoFile]] | None:
        """Resolve "main" (or a full commit sha) to (commit_sha, files)."""
        if revision == "main":
            return self.commits[-1]
        return next((c for c in self.commits if c[0] == revision), None)


class HubError(Exception):
    """Raised by route handlers; rendered like the Hub (JSON `error` + X-Error-Code/X-Error-Message headers)."""

    def __init__(self, status: int, message: str, code: str | None = None, extra: JSON | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.extra = status, message, code, extra or {}


class HubStandin:
    """The server plus its state and fault-injection knobs.

    Args:
        require_token: if set, every request (except the pre-signed LFS PUT and the public agent-harness
            registry) must carry ``Authorization: Bearer <token>`` or one of `readonly_tokens`, else 401.
        readonly_tokens: tokens that are valid but lack write permission: write routes answer 403.
        lfs_threshold: files of at least this many bytes are declared "lfs" by preupload.
        lfs_suffixes: files with these suffixes are "lfs" whatever their size (like the Hub's .gitattributes).
    """

    # (method, regex, route name, needs write permission, public): routes a subclass adds
    extra_routes: list[tuple[str, re.Pattern[str], str, bool, bool]] = []

    def __init__(
        self,
        *,
        require_token: str | None = None,
        readonly_tokens: tuple[str, ...] = (),
        lfs_threshold: int = 10 * 1024 * 1024,
        lfs_suffixes: tuple[str, ...] = (".gguf", ".safetensors"),
        username: str = "standin-user",
    ) -> None:
        self.require_token, self.readonly_tokens = require_token, set(readonly_tokens)
        self.lfs_threshold, self.lfs_suffixes, self.username = lfs_threshold, lfs_suffixes, username
        self.repos: dict[str, Repo] = {}  # key: "models/ns/name"
        self.objects: dict[str, bytes] = {}  # sha256 -> content (LFS and regular files alike)
        self.counts: Counter[str] = Counter()  # route name -> requests received (dropped ones included)
        self.log: list[tuple[str, str, int]] = []  # (method, path, status); status 0 = dropped
        self.lfs_bytes_received = 0  # bytes accepted by the LFS PUT route
        self._rules: list[list[Any]] = []  # [substring, remaining, "drop" | "drop_after" | HTTP status]
        self._salt = secrets.token_hex(4)  # commit shas differ between server instances sharing one HF cache
        self._tickets: dict[str, tuple[str, int]] = {}  # pre-signed PUT ticket -> (sha256, size)
        self._lock = threading.RLock()
        self._httpd: ThreadingHTTPServer | None = None
        self.endpoint = ""

    # ----------------------------------------------------------------------------- lifecycle
    def start(self, host: str = "127.0.0.1", port: int = 0) -> HubStandin:
        """Serve in a daemon thread; `self.endpoint` is then e.g. ``http://127.0.0.1:54321``."""
        handler = type("Handler", (_Handler,), {"hub": self})
        self._httpd = ThreadingHTTPServer((host, port), handler)
        self._httpd.daemon_threads = True
        self.endpoint = f"http://{host}:{self._httpd.server_address[1]}"
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()

    def __enter__(self) -> Self:
        if self._httpd is None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ----------------------------------------------------------------------------- fault injection
    def drop_next(self, route_substring: str, times: int = 1, *, after_handling: bool = False) -> None:
        """Close the connection without any response for the next `times` requests whose "METHOD /path"
        contains `route_substring` (e.g. "PUT /lfs-upload/", "/commit/"). The request body is read first, so the
        client sees "Server disconnected without sending a response" (httpx2.RemoteProtocolError).
        With `after_handling=True` the request is applied first (e.g. the commit lands) and only the response is lost.
        """
        with self._lock:
            self._rules.append([route_substring, times, "drop_after" if after_handling else "drop"])

    def fail_next(
        self, route_substring: str, status: int = 503, times: int = 1, retry_after: str | None = None
    ) -> None:
        """Answer the next `times` matching requests with `status` (e.g. 500/503 to exercise http_backoff),
        with a `Retry-After` header when given (seconds or an HTTP date, as servers send it)."""
        with self._lock:
            self._rules.append([route_substring, times, (status, retry_after)])

    def clear_faults(self) -> None:
        """Forget injected faults that no request has consumed."""
        with self._lock:
            self._rules.clear()

    def _take_rule(self, request_line: str) -> str | tuple[int, str | None] | None:
        with self._lock:
            for rule in self._rules:
                if rule[1] > 0 and rule[0] in request_line:
                    rule[1] -= 1
                    action: str | tuple[int, str | None] = rule[2]
                    return action
        return None

    def reset_counters(self) -> None:
        with self._lock:
            self.counts.clear()
            self.log.clear()
            self.lfs_bytes_received = 0

    # ----------------------------------------------------------------------------- helpers
    def repo_url(self, repo: Repo) -> str:
        return f"{self.endpoint}/{_PREFIX[repo.repo_type]}{repo.repo_id}"

    def _repo(self, types: str, repo_id: str, token: str | None) -> Repo:
        repo = self.repos.get(f"{types}/{repo_id}")
        # Like the Hub: a private repo is indistinguishable from a missing one without credentials.
        if repo is None or (repo.private and token is None):
            raise HubError(404 if token else 401, "Repository not found", "RepoNotFound")
        return repo

    def _snapshot(self, repo: Repo, revision: str) -> tuple[str, dict[str, RepoFile]]:
        snap = repo.snapshot(unquote(revision))
        if snap is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return snap

    def is_lfs(self, path: str, size: int) -> bool:
        return size >= self.lfs_threshold or path.endswith(self.lfs_suffixes)

    # ----------------------------------------------------------------------------- routes
    def agent_harnesses(self, req: _Req) -> JSON:
        """Public telemetry registry the client fetches from {HF_ENDPOINT} unless HF_HUB_DISABLE_TELEMETRY=1."""
        return {"standardEnvVars": [], "harnesses": {}}

    def validate_yaml(self, req: _Req) -> JSON:
        """Called (twice) by upload_folder/create_commit when README.md is committed; everything is valid here."""
        return {"errors": [], "warnings": []}

    def whoami(self, req: _Req) -> JSON:
        if req.token is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        role = "read" if req.token in self.readonly_tokens else "write"
        return {
            "type": "user",
            "name": self.username,
            "fullname": self.username,
            "orgs": [],
            "auth": {"type": "access_token", "accessToken": {"displayName": "standin", "role": role}},
        }

    def create_repo(self, req: _Req) -> JSON:
        body = req.json()
        repo_type = body.get("type") or "model"
        repo_id = f"{body.get('organization') or self.username}/{body['name']}"
        key = f"{repo_type}s/{repo_id}"
        with self._lock:
            if key in self.repos:
                raise HubError(
                    409, "You already created this model repo", extra={"url": self.repo_url(self.repos[key])}
                )
            private = body.get("visibility") == "private" or body.get("private") is True
            repo = Repo(repo_type, repo_id, private)
            repo.commits.append((hashlib.sha1(f"{self._salt}:{key}:init".encode()).hexdigest(), {}))
            self.repos[key] = repo
        return {"url": self.repo_url(repo), "name": repo_id, "id": repo_id}

    def preupload(self, req: _Req, types: str, repo_id: str, revision: str) -> JSON:
        """Declares each file "lfs"/"regular" and returns the remote `oid` of the current file at that path
        (sha256 for lfs, git sha1 for regular): that is how the client drops unchanged files from the commit."""
        head, files = self._snapshot(self._repo(types, repo_id, req.token), revision)
        out = []
        for f in req.json()["files"]:
            mode = "lfs" if self.is_lfs(f["path"], f["size"]) else "regular"
            cur = files.get(f["path"])
            oid = None if cur is None else cur.sha256 if mode == "lfs" else git_blob_sha1(self.objects[cur.sha256])
            out.append({"path": f["path"], "uploadMode": mode, "shouldIgnore": False, "oid": oid})
        return {"files": out, "commitOid": head}

    def lfs_batch(self, req: _Req, types: str, repo_id: str) -> JSON:
        """git-lfs batch API: objects already stored get no `actions`, so the client skips their PUT."""
        self._repo(types, repo_id, req.token)
        objects = []
        for obj in req.json()["objects"]:
            entry: JSON = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in self.objects:
                ticket = secrets.token_urlsafe(16)
                with self._lock:
                    self._tickets[ticket] = (obj["oid"], obj["size"])
                entry["actions"] = {
                    "upload": {"href": f"{self.endpoint}/lfs-upload/{obj['oid']}?ticket={ticket}", "header": {}},
                    "verify": {"href": f"{self.endpoint}/{_PREFIX[types[:-1]]}{repo_id}.git/info/lfs/objects/verify"},
                }
            objects.append(entry)
        return {"transfer": "basic", "objects": objects}

    def lfs_put(self, req: _Req, oid: str) -> JSON:
        """The pre-signed upload URL (S3 on the real Hub): no Authorization header, the ticket is the credential."""
        ticket = req.query.get("ticket", [""])[0]
        with self._lock:
            expected = self._tickets.get(ticket)
        if expected is None or expected[0] != oid:
            raise HubError(403, "Invalid or expired upload URL")
        if len(req.body) != expected[1] or hashlib.sha256(req.body).hexdigest() != oid:
            raise HubError(400, "Uploaded content does not match the announced sha256/size")
        with self._lock:
            self.objects[oid] = req.body
            self.lfs_bytes_received += len(req.body)
            self._tickets.pop(ticket, None)
        return {}

    def lfs_verify(self, req: _Req, types: str, repo_id: str) -> JSON:
        self._repo(types, repo_id, req.token)
        body = req.json()
        if body["oid"] not in self.objects or len(self.objects[body["oid"]]) != body["size"]:
            raise HubError(404, f"Object {body['oid']} not found or wrong size")
        return {}

    def commit(self, req: _Req, types: str, repo_id: str, revision: str) -> JSON:
        """NDJSON commit: header, file (base64), lfsFile (by sha256 oid, must be uploaded), deletedFile/Folder."""
        repo, repo_key = self._repo(types, repo_id, req.token), f"{types}/{repo_id}"
        lines = [json.loads(line) for line in req.body.splitlines() if line.strip()]
        with self._lock:
            head, files = self._snapshot(repo, revision)
            files, new_objects = dict(files), {}
            for item in lines:
                key, val = item["key"], item["value"]
                if key == "header":
                    parent = val.get("parentCommit")
                    if parent and parent != head:
                        raise HubError(412, "A commit has happened since. Please refresh and try again.")
                elif key == "file":
                    data = base64.b64decode(val["content"])
                    sha = hashlib.sha256(data).hexdigest()
                    new_objects[sha] = data
                    files[val["path"]] = RepoFile(sha, len(data), False, git_blob_sha1(data))
                elif key == "lfsFile":
                    if val["oid"] not in self.objects:
                        raise HubError(422, f"LFS object {val['oid']} for {val['path']} was never uploaded")
                    size = len(self.objects[val["oid"]])
                    files[val["path"]] = RepoFile(val["oid"], size, True, git_blob_sha1(lfs_pointer(val["oid"], size)))
                elif key == "deletedFile":
                    if files.pop(val["path"], None) is None:
                        raise HubError(404, "A file with this name doesn't exist", "EntryNotFound")
                elif key == "deletedFolder":
                    prefix = val["path"].rstrip("/") + "/"
                    files = {p: f for p, f in files.items() if not p.startswith(prefix)}
                else:
                    raise HubError(400, f"Unsupported commit operation: {key}")
            self.objects.update(new_objects)
            oid = hashlib.sha1(f"{self._salt}:{repo_key}:{len(repo.commits)}".encode()).hexdigest()
            repo.commits.append((oid, files))
        return {
            "success": True,
            "commitOid": oid,
            "commitUrl": f"{self.repo_url(repo)}/commit/{oid}",
            "pullRequestUrl": None,
            "hookOutput": "",
        }

    def repo_info(self, req: _Req, types: str, repo_id: str, revision: str = "main") -> JSON:
        repo = self._repo(types, repo_id, req.token)
        sha, files = self._snapshot(repo, revision)
        siblings = [
            {
                "rfilename": p,
                "size": f.size,
                "blobId": f.blob_id,
                **({"lfs": {"sha256": f.sha256, "size": f.size, "pointerSize": f.pointer_size}} if f.lfs else {}),
            }
            for p, f in sorted(files.items())
        ]
        return {
            "id": repo.repo_id,
            "_id": repo.repo_id,
            "modelId": repo.repo_id,
            "author": repo.repo_id.split("/")[0],
            "sha": sha,
            "private": repo.private,
            "disabled": False,
            "gated": False,
            "tags": [],
            "downloads": 0,
            "likes": 0,
            "siblings": siblings,
        }

    def tree(self, req: _Req, types: str, repo_id: str, revision: str, sub: str = "") -> list[JSON]:
        files = self._snapshot(self._repo(types, repo_id, req.token), revision)[1]
        recursive = req.query.get("recursive", ["false"])[0].lower() in ("true", "1")
        prefix = sub.strip("/") + "/" if sub.strip("/") else ""
        if prefix and not any(p.startswith(prefix) for p in files):
            raise HubError(404, f"{sub} does not exist on main", "EntryNotFound")
        out: dict[str, JSON] = {}
        for path, f in sorted(files.items()):
            if not path.startswith(prefix):
                continue
            parts = path[len(prefix) :].split("/")
            for depth in range(1, len(parts)):  # intermediate folders
                folder = prefix + "/".join(parts[:depth])
                out.setdefault(folder, {"type": "directory", "oid": git_blob_sha1(folder.encode()), "path": folder})
                if not recursive:
                    break
            if recursive or len(parts) == 1:
                out[path] = {
                    "type": "file",
                    "oid": f.blob_id,
                    "size": f.size,
                    "path": path,
                    **({"lfs": {"oid": f.sha256, "size": f.size, "pointerSize": f.pointer_size}} if f.lfs else {}),
                }
        return list(out.values())

    def resolve(
        self, req: _Req, types: str, repo_id: str, revision: str, path: str
    ) -> tuple[int, dict[str, str], bytes]:
        """Headers hf_hub_download needs: X-Repo-Commit and ETag (X-Linked-Etag/-Size for LFS), Content-Length."""
        sha, files = self._snapshot(self._repo(types, repo_id, req.token), revision)
        f = files.get(path)
        if f is None:
            raise HubError(404, "Entry not found", "EntryNotFound", extra={"_headers": {"X-Repo-Commit": sha}})
        data, status = self.objects[f.sha256], 200
        etag = f.sha256 if f.lfs else f.blob_id
        headers = {
            "X-Repo-Commit": sha,
            "ETag": f'"{etag}"',
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
        }
        if f.lfs:
            headers.update({"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(f.size)})
        m = re.fullmatch(r"bytes=(\d+)-(\d*)", req.headers.get("Range", "").strip())
        if m:  # resumed downloads
            start, end = int(m[1]), int(m[2]) if m[2] else len(data) - 1
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            data, status = data[start : end + 1], 206
        return status, headers, data


@dataclass
class _Req:
    """What a route needs from an HTTP request."""

    query: dict[str, list[str]]
    headers: Any
    body: bytes
    token: str | None

    def json(self) -> Any:
        return json.loads(self.body or b"{}")


_REPO = r"(?P<types>" + _TYPES + r")/(?P<repo_id>[^/]+/[^/]+)"
_GIT = r"(?:(?P<types>datasets|spaces)/)?(?P<repo_id>[^/]+/[^/]+)"
# (method, regex, route name, needs write permission, public)
_ROUTES: list[tuple[str, re.Pattern[str], str, bool, bool]] = [
    (m, re.compile(rx), name, write, public)
    for m, rx, name, write, public in [
        ("GET", r"/api/agent-harnesses", "agent_harnesses", False, True),
        ("GET", r"/api/whoami-v2", "whoami", False, False),
        ("POST", r"/api/repos/create", "create_repo", True, False),
        ("POST", r"/api/validate-yaml", "validate_yaml", False, False),
        ("POST", rf"/api/{_REPO}/preupload/(?P<revision>[^/]+)", "preupload", True, False),
        ("POST", rf"/api/{_REPO}/commit/(?P<revision>[^/]+)", "commit", True, False),
        ("GET", rf"/api/{_REPO}/tree/(?P<revision>[^/]+)(?:/(?P<sub>.*))?", "tree", False, False),
        ("GET", rf"/api/{_REPO}/revision/(?P<revision>[^/]+)", "repo_info", False, False),
        ("GET", rf"/api/{_REPO}", "repo_info", False, False),
        ("POST", rf"/{_GIT}\.git/info/lfs/objects/batch", "lfs_batch", True, False),
        ("POST", rf"/{_GIT}\.git/info/lfs/objects/verify", "lfs_verify", True, False),
        ("PUT", r"/lfs-upload/(?P<oid>[0-9a-f]{64})", "lfs_put", False, True),
        ("GET", rf"/{_GIT}/resolve/(?P<revision>[^/]+)/(?P<path>.+)", "resolve_get", False, False),
        ("HEAD", rf"/{_GIT}/resolve/(?P<revision>[^/]+)/(?P<path>.+)", "resolve_head", False, False),
    ]
]


class _Handler(BaseHTTPRequestHandler):
    """HTTP/1.1 keep-alive handler; always drains the request body so a connection never desynchronises."""

    protocol_version = "HTTP/1.1"
    hub: HubStandin

    def do_GET(self) -> None:
        self._handle()

    do_HEAD = do_POST = do_PUT = do_DELETE = do_GET

    def log_message(self, format: str, *args: Any) -> None:  # silence stderr; never log headers/tokens
        pass

    def _read_body(self) -> bytes:
        # httpx2 always sends Content-Length here (bytes, or seekable files it can measure): no chunked support.
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _handle(self) -> None:
        hub, url = self.hub, urlsplit(self.path)
        path, body = unquote(url.path), self._read_body()
        auth = self.headers.get("Authorization", "")
        token = auth[7:] if auth.startswith("Bearer ") else None
        req = _Req(parse_qs(url.query), self.headers, body, token)
        routes = [*hub.extra_routes, *_ROUTES]
        route = next(((r, m) for r in routes if r[0] == self.command and (m := r[1].fullmatch(path))), None)
        name = route[0][2] if route else "unknown"
        with hub._lock:
            hub.counts[name] += 1
        rule = hub._take_rule(f"{self.command} {path}")
        if rule == "drop":  # cut before the server did anything
            return self._drop(path)
        try:
            if isinstance(rule, tuple):
                code, retry_after = rule
                raise HubError(
                    code,
                    f"Injected failure (HTTP {code})",
                    extra={"_headers": {"Retry-After": retry_after}} if retry_after else None,
                )
            if route is None:
                raise HubError(404, f"Not found: {self.command} {path}")
            (_, _, name, write, public), match = route
            if not public:
                self._check_auth(token, write)
            status, headers, payload = self._dispatch(name, req, {k: v for k, v in match.groupdict().items() if v})
        except HubError as e:
            status = e.status
            headers = {
                "X-Error-Message": e.message,
                **({"X-Error-Code": e.code} if e.code else {}),
                **e.extra.pop("_headers", {}),
            }
            payload = json.dumps({"error": e.message, **e.extra}).encode()
            headers["Content-Type"] = "application/json"
        if rule == "drop_after":  # request applied, response lost
            return self._drop(path)
        with hub._lock:
            hub.log.append((self.command, path, status))
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    def _drop(self, path: str) -> None:
        with self.hub._lock:
            self.hub.log.append((self.command, path, 0))
        self.close_connection = True  # handler returns without writing: the client sees EOF

    def _check_auth(self, token: str | None, write: bool) -> None:
        hub = self.hub
        if hub.require_token is not None and token not in {hub.require_token, *hub.readonly_tokens}:
            raise HubError(401, "Invalid credentials in Authorization header")
        if write and token in hub.readonly_tokens:
            raise HubError(403, "You don't have the rights to write to this repository (read-only token)")

    def _dispatch(self, name: str, req: _Req, args: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
        if "repo_id" in args:
            args["types"] = args.get("types") or "models"
        if name.startswith("resolve"):
            return self.hub.resolve(req, **args)
        if name.startswith("raw_"):  # the route renders its own response (e.g. server-sent events)
            return getattr(self.hub, name)(req, **args)
        ctype = "application/vnd.git-lfs+json" if name.startswith("lfs_") else "application/json"
        return 200, {"Content-Type": ctype}, json.dumps(getattr(self.hub, name)(req, **args)).encode()
