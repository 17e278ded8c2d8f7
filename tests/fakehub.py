"""A Hugging Face Hub stand-in on 127.0.0.1 for the real huggingface_hub download code.

It serves model repos from local directories through the endpoints `snapshot_download`
uses: `GET /api/models/{repo}/revision/{rev}` (repo info, commit sha), `GET
/api/models/{repo}/tree/{rev}` (file listing), and `HEAD`/`GET /{repo}/resolve/{rev}/{file}`
with the hub's X-Repo-Commit / ETag / Content-Length headers and `Range` resumes.
Unknown repos answer 404 with `X-Error-Code: RepoNotFound`, gated ones 401 `GatedRepo`,
as the hub does. Point `HF_ENDPOINT` at `FakeHub.url`
(or pass `endpoint=` to huggingface_hub), and build repos with `write_model`.

To test interrupted downloads, `cut_next_get(file)` makes the next GET of a file send
half of it and drop the connection, and `fail_gets(file)` makes GETs of it answer 503.
"""

import hashlib
import json
import random
import re
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

_API = re.compile(r"/api/models/([^/]+/[^/]+)/(revision|tree)/([^/]+)")
_RESOLVE = re.compile(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)")


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    range: str | None


class FakeHub:
    """Threaded HTTP server; use as a context manager."""

    def __init__(self, repos: dict[str, Path], gated: tuple[str, ...] = ()):
        self.repos = repos
        self.gated = gated
        self.requests: list[Request] = []
        self._cuts: dict[str, int | None] = {}
        self._failing: set[str] = set()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def cut_next_get(self, filename: str, at: int | None = None) -> None:
        """Drop the next GET of `filename` after `at` bytes (default: half)."""
        self._cuts[filename] = at

    def fail_gets(self, filename: str) -> None:
        self._failing.add(filename)

    def heal(self) -> None:
        self._cuts.clear()
        self._failing.clear()

    def gets(self, filename: str) -> list[Request]:
        """The GETs of a file's content, in order."""
        return [
            r
            for r in self.requests
            if r.method == "GET"
            and _RESOLVE.fullmatch(r.path)
            and r.path.endswith(f"/{filename}")
        ]

    def commit(self, repo: str) -> str:
        """A stable 40-hex commit sha derived from the repo's file names and contents."""
        digest = hashlib.sha1()
        for path in _files(self.repos[repo]):
            digest.update(path.relative_to(self.repos[repo]).as_posix().encode())
            digest.update(path.read_bytes())
        return digest.hexdigest()

    def __enter__(self) -> "FakeHub":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def write_model(
    root: Path,
    weight_bytes: int = 64_000,
    shards: int = 1,
    max_position_embeddings: int = 4096,
) -> Path:
    """A directory shaped like an mlx-community repo: config, tokenizer, safetensors weights
    (opaque bytes: the registry never loads them), plus files a pull must skip."""
    root.mkdir(parents=True, exist_ok=True)
    config = {"model_type": "qwen2", "max_position_embeddings": max_position_embeddings}
    (root / "config.json").write_text(json.dumps(config))
    (root / "tokenizer.json").write_text(
        json.dumps({"version": "1.0", "model": {"type": "BPE"}})
    )
    (root / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": "{{ messages }}"})
    )
    names = (
        ["model.safetensors"]
        if shards == 1
        else [
            f"model-{i:05d}-of-{shards:05d}.safetensors" for i in range(1, shards + 1)
        ]
    )
    for i, name in enumerate(names):
        (root / name).write_bytes(random.Random(i).randbytes(weight_bytes))
    if shards > 1:
        index = {
            "metadata": {},
            "weight_map": {f"layers.{i}.weight": name for i, name in enumerate(names)},
        }
        (root / "model.safetensors.index.json").write_text(json.dumps(index))
    (root / "README.md").write_text("# test model\n")
    (root / "pytorch_model.bin").write_bytes(b"not for mlx")
    (root / "modeling_custom.py").write_text(
        "raise SystemExit('remote code must never be fetched')\n"
    )
    return root


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def do_HEAD(self) -> None:
            self._serve(send_body=False)

        def do_GET(self) -> None:
            self._serve(send_body=True)

        def _serve(self, send_body: bool) -> None:
            path = unquote(urlsplit(self.path).path)
            hub.requests.append(Request(self.command, path, self.headers.get("Range")))
            if api := _API.fullmatch(path):
                self._api(*api.groups())
            elif resolve := _RESOLVE.fullmatch(path):
                self._file(*resolve.groups(), send_body=send_body)
            else:
                self._error(404, "EntryNotFound", "no such endpoint")

        def _known(self, repo: str) -> bool:
            if repo in hub.gated:
                self._error(401, "GatedRepo", "Access to this model is restricted")
                return False
            if repo not in hub.repos:
                self._error(404, "RepoNotFound", "Repository not found")
                return False
            return True

        def _api(self, repo: str, kind: str, revision: str) -> None:
            if not self._known(repo):
                return
            root, sha = hub.repos[repo], hub.commit(repo)
            files = [p.relative_to(root).as_posix() for p in _files(root)]
            if kind == "revision":
                body = {
                    "id": repo,
                    "sha": sha,
                    "siblings": [{"rfilename": f} for f in files],
                }
            else:
                body = [
                    {
                        "type": "file",
                        "path": f,
                        "size": (root / f).stat().st_size,
                        "oid": _sha1(root / f),
                    }
                    for f in files
                ]
            self._json(body, sha)

        def _file(
            self, repo: str, revision: str, filename: str, send_body: bool
        ) -> None:
            if not self._known(repo):
                return
            path = hub.repos[repo] / filename
            if not path.is_file():
                self._error(404, "EntryNotFound", f"{filename} does not exist")
                return
            if send_body and filename in hub._failing and filename not in hub._cuts:
                self._error(503, None, "Service unavailable")
                return
            data = path.read_bytes()
            start = (
                int(match.group(1))
                if (
                    match := re.fullmatch(
                        r"bytes=(\d+)-", self.headers.get("Range", "")
                    )
                )
                else 0
            )
            self.send_response(206 if start else 200)
            self.send_header("X-Repo-Commit", hub.commit(repo))
            self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
            self.send_header("Content-Length", str(len(data) - start))
            if start:
                self.send_header(
                    "Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}"
                )
            self.end_headers()
            if not send_body:
                return
            if filename in hub._cuts:
                cut = hub._cuts.pop(filename)
                self.wfile.write(
                    data[start : (len(data) + start) // 2 if cut is None else cut]
                )
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(2)
                return
            self.wfile.write(data[start:])

        def _json(self, body: object, sha: str) -> None:
            payload = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("X-Repo-Commit", sha)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def _error(self, status: int, code: str | None, message: str) -> None:
            payload = json.dumps({"error": message}).encode()
            self.send_response(status)
            if code:
                self.send_header("X-Error-Code", code)
            self.send_header("X-Error-Message", message)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)

    return Handler


def _sha1(path: Path) -> str:
    """The git blob id the hub reports as a file's `oid`."""
    data = path.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
