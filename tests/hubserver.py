"""A local stand-in for the Hugging Face hub, enough for the real `huggingface_hub` client.

Two HTTP servers on 127.0.0.1 (ephemeral ports, threads): the hub, and a second origin standing for the CDN that
the hub redirects LFS downloads to. What they answer, as the hub does (huggingface_hub's file_download.py,
hf_api.py and utils/_http.py read these):

    GET  /api/models/ORG/NAME[/revision/REV]     model info: id, sha, siblings (rfilename, size, blobId, lfs)
    GET  /api/models/ORG/NAME/tree/REV            the file listing snapshot_download reads (one page)
    HEAD|GET /ORG/NAME/resolve/REV/PATH           X-Repo-Commit, ETag; LFS files (*.safetensors): 302 to the CDN with
                                                  X-Linked-Etag (the sha256, quoted) and X-Linked-Size; others: 200
    HEAD|GET CDN /lfs/SHA256                       the bytes; Range: bytes=a-b and bytes=a- -> 206 + Content-Range
    errors                                         X-Error-Code RepoNotFound (401), RevisionNotFound (404),
                                                   EntryNotFound (404), GatedRepo (401 without a token, 403 with a
                                                   wrong one)

Faults, switched per test on `server.faults`, apply to data GETs (no Range, or an open-ended one: a download, not
a header read), each counted down per request: `drop[name]` cuts the connection half-way through the body,
`status[name]` answers with the listed statuses (e.g. [500]), `corrupt[name]` serves the right length with one
byte flipped. `server.requests` logs (origin, method, path, Range) for every request, to count them.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

TOKEN = "hf_local_test_token"  # the one token gated repos accept


@dataclass
class RepoFile:
    path: Path
    size: int
    sha256: str
    blob_id: str  # git's blob sha1
    lfs: bool


@dataclass
class Repo:
    repo_id: str
    commit: str
    refs: dict[str, str]  # branch/tag -> commit
    files: dict[str, RepoFile]
    gated: bool = False


@dataclass
class Faults:
    drop: dict[str, int] = field(default_factory=dict)
    status: dict[str, list[int]] = field(default_factory=dict)
    corrupt: dict[str, int] = field(default_factory=dict)

    def take(self, table: dict, name: str):
        """The next fault of that kind for `name`, counted down; None when there is none left."""
        value = table.get(name)
        if isinstance(value, list):
            return value.pop(0) if value else None
        if value:
            table[name] = value - 1
            return True
        return None


def _describe(path: Path) -> tuple[int, str, str]:
    h, size = hashlib.sha256(), path.stat().st_size
    g = hashlib.sha1(f"blob {size}\0".encode())
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            g.update(chunk)
    return size, h.hexdigest(), g.hexdigest()


_RANGE = re.compile(r"bytes=(\d+)-(\d*)$")


class HubServer:
    def __init__(self):
        self.repos: dict[str, Repo] = {}
        self.blobs: dict[str, RepoFile] = {}
        self.faults = Faults()
        self.requests: list[tuple[str, str, str, str | None]] = []
        self._lock = threading.Lock()
        self._servers: list[ThreadingHTTPServer] = []

    # -- set-up ---------------------------------------------------------------------------------------------------

    def add_repo(self, repo_id: str, directory: Path, *, gated: bool = False, tags: tuple[str, ...] = ()) -> Repo:
        files = {}
        for p in sorted(Path(directory).rglob("*")):
            if p.is_file():
                size, sha256, blob_id = _describe(p)
                rel = p.relative_to(directory).as_posix()
                files[rel] = RepoFile(p, size, sha256, blob_id, lfs=rel.endswith(".safetensors"))
                if files[rel].lfs:
                    self.blobs[sha256] = files[rel]
        commit = hashlib.sha1(repo_id.encode() + b"".join(f.sha256.encode() for f in files.values())).hexdigest()
        repo = Repo(repo_id, commit, {"main": commit, **{t: commit for t in tags}}, files, gated)
        self.repos[repo_id] = repo
        return repo

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._servers[0].server_address[1]}"

    @property
    def cdn(self) -> str:
        return f"http://127.0.0.1:{self._servers[1].server_address[1]}"

    def count(self, origin: str | None = None, method: str | None = None) -> int:
        with self._lock:
            return sum(1 for o, m, _, _ in self.requests if origin in (None, o) and method in (None, m))

    def start(self) -> HubServer:
        for role in ("hub", "cdn"):
            handler = type(f"{role}Handler", (_Handler,), {"hub": self, "role": role})
            srv = ThreadingHTTPServer(("127.0.0.1", 0), handler)
            srv.daemon_threads = True
            threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
            self._servers.append(srv)
        return self

    def stop(self) -> None:
        for srv in self._servers:
            srv.shutdown()
            srv.server_close()

    # -- answers --------------------------------------------------------------------------------------------------

    def model_info(self, repo: Repo, commit: str) -> dict:
        siblings = []
        for name, f in repo.files.items():
            s = {"rfilename": name, "size": f.size, "blobId": f.blob_id}
            if f.lfs:
                s["lfs"] = {"size": f.size, "sha256": f.sha256, "pointerSize": 134}
            siblings.append(s)
        return {"_id": commit[:24], "id": repo.repo_id, "modelId": repo.repo_id, "sha": commit, "private": False,
                "gated": "manual" if repo.gated else False, "disabled": False, "siblings": siblings}


    def tree(self, repo: Repo) -> list[dict]:
        out = []
        for name, f in repo.files.items():
            entry = {"type": "file", "path": name, "size": f.size, "oid": f.blob_id}
            if f.lfs:
                entry["lfs"] = {"oid": f.sha256, "size": f.size, "pointerSize": 134}
            out.append(entry)
        return out


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    hub: HubServer
    role: str

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    # -- plumbing -------------------------------------------------------------------------------------------------

    def _reply(self, status: int, headers: dict[str, str] | None = None, body: bytes = b"", send: bool = True) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if send and body:
            self.wfile.write(body)

    def _error(self, status: int, code: str, message: str, send: bool, commit: str | None = None) -> None:
        headers = {"X-Error-Code": code, "X-Error-Message": message, "Content-Type": "application/json"}
        if commit:
            headers["X-Repo-Commit"] = commit
        self._reply(status, headers, json.dumps({"error": message}).encode(), send)

    def _serve(self, body: bool) -> None:
        parts = urlsplit(self.path)
        rng = self.headers.get("Range")
        with self.hub._lock:
            self.hub.requests.append((self.role, self.command, parts.path, rng))
        segs = [unquote(s) for s in parts.path.strip("/").split("/")]
        if self.role == "cdn":
            return self._blob(segs, body, rng)
        if len(segs) >= 4 and segs[:2] == ["api", "models"]:
            return self._info(segs[2:], body)
        if len(segs) >= 5 and segs[2] == "resolve":
            return self._resolve(f"{segs[0]}/{segs[1]}", segs[3], "/".join(segs[4:]), body, rng)
        self._error(404, "NotFound", "no such route", body)

    def _commit(self, repo: Repo, rev: str) -> str | None:
        return repo.refs.get(rev) or (rev if rev == repo.commit else None)

    def _info(self, segs: list[str], body: bool) -> None:
        repo = self.hub.repos.get("/".join(segs[:2]))
        if repo is None:
            return self._error(401, "RepoNotFound", "Repository not found", body)
        rev = segs[3] if len(segs) >= 4 and segs[2] in ("revision", "tree") else "main"
        commit = self._commit(repo, rev)
        if commit is None:
            return self._error(404, "RevisionNotFound", "Invalid rev id: " + rev, body)
        if len(segs) >= 4 and segs[2] == "tree":
            data = json.dumps(self.hub.tree(repo)).encode()
        else:
            data = json.dumps(self.hub.model_info(repo, commit)).encode()
        self._reply(200, {"Content-Type": "application/json"}, data, body)

    def _resolve(self, repo_id: str, rev: str, path: str, body: bool, rng: str | None) -> None:
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            return self._error(401, "RepoNotFound", "Repository not found", body)
        commit = self._commit(repo, rev)
        if commit is None:
            return self._error(404, "RevisionNotFound", "Invalid rev id: " + rev, body)
        if repo.gated:
            auth = self.headers.get("Authorization")
            if auth != f"Bearer {TOKEN}":
                status = 401 if auth is None else 403
                return self._error(status, "GatedRepo", "Access to model is restricted", body, commit)
        f = repo.files.get(path)
        if f is None:
            return self._error(404, "EntryNotFound", "Entry not found", body, commit)
        base = {"X-Repo-Commit": commit, "Accept-Ranges": "bytes"}
        if f.lfs:
            base.update({"ETag": f'"{f.sha256}"', "X-Linked-Etag": f'"{f.sha256}"', "X-Linked-Size": str(f.size),
                         "Location": f"{self.hub.cdn}/lfs/{f.sha256}"})
            return self._reply(302, base, b"", body)
        base["ETag"] = f'"{f.blob_id}"'
        self._bytes(f, body, rng, base, faults=False)

    def _blob(self, segs: list[str], body: bool, rng: str | None) -> None:
        f = self.hub.blobs.get(segs[-1]) if len(segs) == 2 and segs[0] == "lfs" else None
        if f is None:
            return self._reply(404, {}, b"no such object", body)
        self._bytes(f, body, rng, {"ETag": f'"{f.sha256}"', "Accept-Ranges": "bytes"}, faults=True)

    def _bytes(self, f: RepoFile, body: bool, rng: str | None, headers: dict[str, str], faults: bool) -> None:
        """The file (or the asked range of it); faults only on data GETs (no end to the range)."""
        start, end = 0, f.size - 1
        if rng:
            m = _RANGE.match(rng)
            if not m or int(m.group(1)) >= f.size:
                return self._reply(416, {"Content-Range": f"bytes */{f.size}"}, b"", body)
            start = int(m.group(1))
            end = min(int(m.group(2)), f.size - 1) if m.group(2) else f.size - 1
        name = f.path.name
        data_get = body and faults and not (rng and _RANGE.match(rng).group(2))
        fl = self.hub.faults
        if data_get:
            with self.hub._lock:
                status = fl.take(fl.status, name)
                drop = fl.take(fl.drop, name)
                corrupt = fl.take(fl.corrupt, name)
            if status:
                return self._reply(status, {"Content-Type": "text/plain"}, b"injected failure", body)
        else:
            drop = corrupt = None
        with open(f.path, "rb") as fh:
            fh.seek(start)
            data = bytearray(fh.read(end - start + 1))
        if corrupt and data:
            data[len(data) // 2] ^= 0xFF
        status = 206 if rng else 200
        if rng:
            headers = {**headers, "Content-Range": f"bytes {start}-{end}/{f.size}"}
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if not body:
            return
        if drop:
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return
        self.wfile.write(data)
