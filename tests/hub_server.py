"""A fake Hugging Face Hub over real HTTP, serving local folders as model repositories.

Faithful to what huggingface_hub 2.4's client sends and reads (file_download.py, hf_api.py,
utils/_http.py), so that `snapshot_download`, `hf_hub_download`, `HfApi.model_info`,
`list_repo_tree` and the safetensors-header range reads run unchanged against it:

    GET  /api/models/{org}/{name}[/revision/{rev}]      id, sha, gated, siblings (rfilename,
                                                          size, blobId, lfs)
    GET  /api/models/{org}/{name}/tree/{rev}[/{path}]   ?recursive=, one page, no Link header
    HEAD /{org}/{name}/resolve/{rev}/{path}             ETag, X-Repo-Commit, Content-Length,
    GET  /{org}/{name}/resolve/{rev}/{path}              Accept-Ranges; `Range: bytes=a-b` -> 206

Revisions are branch names or their 40-hex commit sha, URL-quoted as the client quotes them.
Errors carry the Hub's `X-Error-Code` (RepoNotFound, RevisionNotFound, EntryNotFound,
GatedRepo) and `X-Error-Message` headers, which `hf_raise_for_status` turns into typed errors.
A gated repository's metadata and tree are public (as on the Hub); its files need
`Authorization: Bearer <token>` (401 without one, 403 with a wrong one). No Xet headers are
sent, so the client downloads over plain HTTP.

Every request lands in `FakeHub.requests` (method, path, range, status, body bytes sent).
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

# Files the Hub stores in LFS (what .gitattributes of a model repo tracks).
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".onnx", ".msgpack", ".h5",
                ".model")
_CHUNK = 1 << 16
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


@dataclass(frozen=True, slots=True)
class HubFile:
    """One file of a revision: where its bytes are, and the ids the Hub gives it."""

    path: str  # in the repository, '/'-separated
    source: Path  # on this machine
    size: int
    sha256: str  # the LFS oid, and the ETag of LFS files
    git_sha1: str  # the git blob id, and the ETag of other files

    @property
    def is_lfs(self) -> bool:
        return self.path.endswith(LFS_SUFFIXES)

    @property
    def etag(self) -> str:
        return self.sha256 if self.is_lfs else self.git_sha1


@dataclass(slots=True)
class HubRepo:
    repo_id: str
    token: str | None  # set: the repository is gated, its files need this bearer token
    revisions: dict[str, str] = field(default_factory=dict)  # branch -> commit sha
    commits: dict[str, dict[str, HubFile]] = field(default_factory=dict)  # sha -> files

    def commit(self, revision: str) -> str | None:
        if revision in self.commits:
            return revision
        return self.revisions.get(revision)


@dataclass(frozen=True, slots=True)
class HubRequest:
    """One request as the fake hub saw and answered it."""

    method: str
    path: str  # decoded, without the query
    range: str | None  # the Range header, as sent
    status: int
    bytes_sent: int  # body bytes written
    authorization: str | None  # the Authorization header, as sent
    filename: str | None  # the repository file a /resolve/ request asked for


def _file(path: str, source: Path) -> HubFile:
    data = source.read_bytes()
    blob = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
    return HubFile(path, source, len(data), hashlib.sha256(data).hexdigest(), blob)


class FakeHub:
    """A Hub on 127.0.0.1 (`url`), serving folders registered with `add_repo`."""

    def __init__(self) -> None:
        self.repos: dict[str, HubRepo] = {}
        self.requests: list[HubRequest] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-hub",
                                        daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> "FakeHub":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- repositories ------------------------------------------------------------------------

    def add_repo(self, repo_id: str, folder: str | Path, *, revision: str = "main",
                 token: str | None = None, exclude: tuple[str, ...] = ()) -> str:
        """Serve `folder` (recursively) as branch `revision` of `repo_id`; return its commit sha.

        Called again with another revision, adds a branch to the same repository.
        token: gate the repository behind this bearer token.
        exclude: file names (repository paths) to leave out.
        """
        folder = Path(folder)
        files = {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*"))
                 if p.is_file() and not p.name.startswith(".")}
        hub_files = {name: _file(name, p) for name, p in files.items() if name not in exclude}
        digest = hashlib.sha1(json.dumps([repo_id, revision, sorted(
            (f.path, f.sha256) for f in hub_files.values())]).encode()).hexdigest()
        with self._lock:
            repo = self.repos.get(repo_id)
            if repo is None:
                repo = self.repos[repo_id] = HubRepo(repo_id, token)
            elif token is not None:
                repo.token = token
            repo.revisions[revision] = digest
            repo.commits[digest] = hub_files
        return digest

    def reset(self) -> None:
        """Forget every repository and request."""
        with self._lock:
            self.repos.clear()
            self.requests.clear()

    # -- the request log ---------------------------------------------------------------------

    def log(self, request: HubRequest) -> None:
        with self._lock:
            self.requests.append(request)

    def downloads(self, repo_id: str | None = None) -> list[HubRequest]:
        """The GET requests for files (/resolve/), in order."""
        prefix = f"/{repo_id}/resolve/" if repo_id else "/"
        with self._lock:
            return [r for r in self.requests if r.method == "GET" and r.filename
                    and r.path.startswith(prefix)]

    def bytes_sent(self, repo_id: str | None = None) -> dict[str, int]:
        """Body bytes served per file name by GET /resolve/ requests."""
        sent: dict[str, int] = {}
        for r in self.downloads(repo_id):
            sent[r.filename] = sent.get(r.filename, 0) + r.bytes_sent
        return sent


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(_HubHandler):
        pass

    Handler.hub = hub
    return Handler


class _HubError(Exception):
    def __init__(self, status: int, code: str | None, message: str,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers = headers or {}


class _HubHandler(BaseHTTPRequestHandler):
    hub: FakeHub
    protocol_version = "HTTP/1.1"  # keep-alive, as the client's connection pool expects

    def log_message(self, format, *args) -> None:  # quiet: the request log is `hub.requests`
        pass

    def do_GET(self) -> None:
        self._serve(head=False)

    def do_HEAD(self) -> None:
        self._serve(head=True)

    def _serve(self, head: bool) -> None:
        url = urlsplit(self.path)
        parts = [unquote(p) for p in url.path.split("/")[1:]]
        self._sent = 0
        self._status = 500
        self._filename = None
        try:
            if parts[:2] == ["api", "models"] and len(parts) >= 4:
                self._api(parts[2] + "/" + parts[3], parts[4:], parse_qs(url.query), head)
            elif len(parts) >= 5 and parts[2] == "resolve":
                self._resolve(parts[0] + "/" + parts[1], parts[3], "/".join(parts[4:]), head)
            else:
                raise _HubError(404, None, f"no route for {url.path}")
        except _HubError as error:
            body = json.dumps({"error": error.message}).encode()
            headers = {"Content-Type": "application/json", "X-Error-Message": error.message,
                       **({"X-Error-Code": error.code} if error.code else {}), **error.headers}
            self._respond(error.status, headers, body, head)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client stopped reading; what it got is in `_sent`
        finally:
            self.hub.log(HubRequest(self.command, unquote(url.path), self.headers.get("Range"),
                                    self._status, self._sent, self.headers.get("Authorization"),
                                    self._filename))

    # -- the API -----------------------------------------------------------------------------

    def _repo(self, repo_id: str) -> HubRepo:
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            raise _HubError(404, "RepoNotFound", "Repository not found")
        return repo

    def _commit(self, repo: HubRepo, revision: str) -> str:
        commit = repo.commit(revision)
        if commit is None:
            raise _HubError(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return commit

    def _api(self, repo_id: str, rest: list[str], query: dict, head: bool) -> None:
        repo = self._repo(repo_id)
        if not rest or rest[0] == "revision":
            commit = self._commit(repo, rest[1] if len(rest) > 1 else "main")
            files = repo.commits[commit]
            body = {"id": repo_id, "modelId": repo_id, "sha": commit, "private": False,
                    "gated": "manual" if repo.token else False, "disabled": False,
                    "siblings": [_sibling(f) for f in files.values()]}
        elif rest[0] == "tree" and len(rest) >= 2:
            commit = self._commit(repo, rest[1])
            prefix = "/".join(rest[2:])
            recursive = query.get("recursive", ["false"])[0].lower() == "true"
            body = _tree(repo.commits[commit], prefix, recursive)
        else:
            raise _HubError(404, None, f"no route for /api/models/{repo_id}/{'/'.join(rest)}")
        self._respond(200, {"Content-Type": "application/json"}, json.dumps(body).encode(), head)

    # -- files -------------------------------------------------------------------------------

    def _resolve(self, repo_id: str, revision: str, path: str, head: bool) -> None:
        self._filename = path
        repo = self._repo(repo_id)
        commit = self._commit(repo, revision)
        if repo.token is not None:
            authorization = self.headers.get("Authorization")
            if authorization != f"Bearer {repo.token}":
                status, tail = ((401, "You must have access to it and be authenticated to "
                                 "access it. Please log in.") if authorization is None else
                                (403, "You are not in the authorized list."))
                raise _HubError(status, "GatedRepo",
                                f"Access to model {repo_id} is restricted. {tail}")
        hub_file = repo.commits[commit].get(path)
        if hub_file is None:
            raise _HubError(404, "EntryNotFound", f"{path} does not exist on \"{revision}\"",
                            {"X-Repo-Commit": commit})
        headers = {"Content-Type": "application/octet-stream", "Accept-Ranges": "bytes",
                   "ETag": f'"{hub_file.etag}"', "X-Repo-Commit": commit}
        start, end = 0, hub_file.size - 1
        status = 200
        requested = self.headers.get("Range")
        if requested is not None:
            start, end = _byte_range(requested, hub_file.size)
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{hub_file.size}"
        headers["Content-Length"] = str(max(0, end - start + 1))
        self._start(status, headers)
        if head:
            return
        with open(hub_file.source, "rb") as f:
            f.seek(start)
            left = end - start + 1
            while left > 0:
                chunk = f.read(min(_CHUNK, left))
                self.wfile.write(chunk)
                self._sent += len(chunk)
                left -= len(chunk)

    # -- plumbing ----------------------------------------------------------------------------

    def _start(self, status: int, headers: dict[str, str]) -> None:
        self._status = status
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()

    def _respond(self, status: int, headers: dict[str, str], body: bytes, head: bool) -> None:
        self._start(status, {**headers, "Content-Length": str(len(body))})
        if not head:
            self.wfile.write(body)
            self._sent += len(body)


def _byte_range(header: str, size: int) -> tuple[int, int]:
    """(first, last) byte of a single `bytes=a-b`, `bytes=a-` or `bytes=-n` range."""
    match = _RANGE.match(header.strip())
    if match is None or match.groups() == ("", ""):
        raise _HubError(416, None, f"unsupported Range {header!r}",
                        {"Content-Range": f"bytes */{size}"})
    first, last = match.groups()
    if first == "":  # the last n bytes
        start, end = max(0, size - int(last)), size - 1
    else:
        start, end = int(first), min(int(last), size - 1) if last else size - 1
    if start >= size or start > end:
        raise _HubError(416, None, f"Range {header!r} outside 0-{size - 1}",
                        {"Content-Range": f"bytes */{size}"})
    return start, end


def _lfs(hub_file: HubFile) -> dict | None:
    return ({"oid": hub_file.sha256, "size": hub_file.size, "pointerSize": 134}
            if hub_file.is_lfs else None)


def _sibling(hub_file: HubFile) -> dict:
    sibling = {"rfilename": hub_file.path, "size": hub_file.size, "blobId": hub_file.git_sha1}
    if hub_file.is_lfs:
        sibling["lfs"] = {"sha256": hub_file.sha256, "size": hub_file.size, "pointerSize": 134}
    return sibling


def _tree(files: dict[str, HubFile], prefix: str, recursive: bool) -> list[dict]:
    """The tree API's entries under `prefix`: files and folders, folders first."""
    base = f"{prefix}/" if prefix else ""
    folders: set[str] = set()
    entries = []
    for name, hub_file in sorted(files.items()):
        if not name.startswith(base):
            continue
        rest = name[len(base):].split("/")
        for depth in range(1, len(rest) if recursive else min(2, len(rest))):
            folders.add(base + "/".join(rest[:depth]))
        if recursive or len(rest) == 1:
            entry = {"type": "file", "oid": hub_file.git_sha1, "size": hub_file.size,
                     "path": name}
            if hub_file.is_lfs:
                entry["lfs"] = _lfs(hub_file)
            entries.append(entry)
    if prefix and not entries and not folders:
        raise _HubError(404, "EntryNotFound", f"{prefix} does not exist")
    folder_entries = [{"type": "directory", "oid": hashlib.sha1(f.encode()).hexdigest(),
                       "size": 0, "path": f} for f in sorted(folders)]
    return folder_entries + entries
