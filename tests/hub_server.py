"""A loopback HTTP server speaking the part of the Hugging Face Hub's HTTP contract that `huggingface_hub`
uses to create a repo, upload a folder (regular and LFS files) and download it again. The real, unmodified
client libraries talk to it through `HF_ENDPOINT`. It proves our side of the protocol, not the Hub's behaviour.

Repos live in memory: every commit stores a full snapshot of the files under a new sha.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse


class HubState:
    def __init__(self):
        self.repos: dict[str, dict] = {}  # repo_id → {"sha": str, "files": {path: bytes}}
        self.lfs: dict[str, bytes] = {}  # sha256 → bytes
        self.lock = threading.Lock()

    def commit(self, repo_id: str, files: dict[str, bytes], deleted: list[str]) -> str:
        with self.lock:
            repo = self.repos[repo_id]
            snapshot = {path: data for path, data in repo["files"].items() if path not in deleted}
            snapshot.update(files)
            sha = hashlib.sha1(f"{repo['sha']}{sorted(snapshot)}{len(self.lfs)}".encode()).hexdigest()
            repo.update(sha=sha, files=snapshot)
            return sha


def _etag(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class HubHandler(BaseHTTPRequestHandler):
    state: HubState
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # quiet
        pass

    # ------------------------------------------------------------------ helpers

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, content_type="application/json"):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, value, status: int = 200, headers: dict | None = None):
        self._send(status, json.dumps(value).encode(), headers)

    def _not_found(self, code: str, message: str):
        self._json({"error": message}, 404, {"X-Error-Code": code, "X-Error-Message": message})

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length", 0))
        return self.rfile.read(length) if length else b""

    def _repo(self, repo_id: str):
        return self.state.repos.get(repo_id)

    # ------------------------------------------------------------------ routes

    def do_GET(self):
        path = unquote(urlparse(self.path).path)
        if path == "/api/whoami-v2":
            return self._json({"type": "user", "name": "tester", "auth": {"accessToken": {"role": "write"}}})
        match = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?", path)
        if match:
            repo = self._repo(match[1])
            if repo is None:
                return self._not_found("RepoNotFound", f"{match[1]} not found")
            return self._json({"id": match[1], "modelId": match[1], "sha": repo["sha"], "private": False,
                               "siblings": [{"rfilename": name} for name in sorted(repo["files"])], "tags": []})
        match = re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)(?:/(.*))?", path)
        if match:
            repo = self._repo(match[1])
            if repo is None:
                return self._not_found("RepoNotFound", f"{match[1]} not found")
            prefix = (match[3] or "").strip("/")
            entries = [{"type": "file", "path": name, "size": len(data), "oid": _etag(data)}
                       for name, data in sorted(repo["files"].items()) if not prefix or name.startswith(prefix + "/")]
            if prefix and not entries:
                return self._not_found("EntryNotFound", f"{prefix} not found")
            return self._json(entries)
        return self._resolve(path)

    def do_HEAD(self):
        return self._resolve(unquote(urlparse(self.path).path))

    def _resolve(self, path: str):
        match = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if not match:
            return self._not_found("EntryNotFound", f"no route {path}")
        repo = self._repo(match[1])
        if repo is None:
            return self._not_found("RepoNotFound", f"{match[1]} not found")
        data = repo["files"].get(match[3])
        if data is None:
            return self._not_found("EntryNotFound", f"{match[3]} not found")
        headers = {"X-Repo-Commit": repo["sha"], "ETag": f'"{_etag(data)}"', "Accept-Ranges": "bytes"}
        byte_range = self.headers.get("Range")
        if byte_range and self.command == "GET":
            start, _, end = byte_range.removeprefix("bytes=").partition("-")
            start, end = int(start), int(end) if end else len(data) - 1
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            return self._send(206, data[start : end + 1], headers, "application/octet-stream")
        return self._send(200, data, headers, "application/octet-stream")

    def do_POST(self):
        path = unquote(urlparse(self.path).path)
        body = self._body()
        if path == "/api/validate-yaml":
            return self._json({})
        if path == "/api/repos/create":
            request = json.loads(body)
            repo_id = f"{request.get('organization') or 'tester'}/{request['name']}"
            if repo_id in self.state.repos:
                return self._json({"error": "already exists", "url": f"/{repo_id}"}, 409)
            self.state.repos[repo_id] = {"sha": hashlib.sha1(repo_id.encode()).hexdigest(), "files": {}}
            return self._json({"url": f"http://{self.headers['Host']}/{repo_id}", "name": repo_id})
        match = re.fullmatch(r"/api/models/([^/]+/[^/]+)/preupload/([^/]+)", path)
        if match:
            files = json.loads(body)["files"]
            return self._json({"files": [{"path": item["path"], "uploadMode": "lfs" if _binary(item) else "regular",
                                          "shouldIgnore": False} for item in files]})
        match = re.fullmatch(r"/([^/]+/[^/]+)\.git/info/lfs/objects/batch", path)
        if match:
            objects = json.loads(body)["objects"]
            host = self.headers["Host"]
            return self._json({"transfer": "basic", "objects": [
                {"oid": item["oid"], "size": item["size"]} if item["oid"] in self.state.lfs else
                {"oid": item["oid"], "size": item["size"],
                 "actions": {"upload": {"href": f"http://{host}/lfs-upload/{item['oid']}"}}}
                for item in objects]})
        match = re.fullmatch(r"/api/models/([^/]+/[^/]+)/commit/([^/]+)", path)
        if match:
            repo_id = match[1]
            if self._repo(repo_id) is None:
                return self._not_found("RepoNotFound", f"{repo_id} not found")
            files, deleted = {}, []
            for line in body.splitlines():
                if not line.strip():
                    continue
                item = json.loads(line)
                value = item["value"]
                if item["key"] == "file":
                    files[value["path"]] = base64.b64decode(value["content"])
                elif item["key"] == "lfsFile":
                    if value["oid"] not in self.state.lfs:
                        return self._json({"error": f"LFS object {value['oid']} missing"}, 422)
                    files[value["path"]] = self.state.lfs[value["oid"]]
                elif item["key"] in ("deletedFile", "deletedFolder"):
                    deleted.append(value["path"])
            sha = self.state.commit(repo_id, files, deleted)
            return self._json({"commitUrl": f"http://{self.headers['Host']}/{repo_id}/commit/{sha}", "commitOid": sha})
        match = re.fullmatch(r"/api/models/([^/]+/[^/]+)/paths-info/([^/]+)", path)
        if match:
            repo = self._repo(match[1])
            if repo is None:
                return self._not_found("RepoNotFound", f"{match[1]} not found")
            wanted = _form_or_json_paths(body)
            return self._json([{"type": "file", "path": name, "size": len(repo["files"][name]),
                                "oid": _etag(repo["files"][name])} for name in wanted if name in repo["files"]])
        return self._not_found("EntryNotFound", f"no route {path}")

    def do_PUT(self):
        path = unquote(urlparse(self.path).path)
        match = re.fullmatch(r"/lfs-upload/([0-9a-f]{64})", path)
        if not match:
            return self._not_found("EntryNotFound", f"no route {path}")
        data = self._body()
        if hashlib.sha256(data).hexdigest() != match[1]:
            return self._json({"error": "sha256 mismatch"}, 400)
        self.state.lfs[match[1]] = data
        return self._json({})


def _binary(item: dict) -> bool:
    sample = base64.b64decode(item["sample"])
    return b"\x00" in sample or item["size"] > 10_000_000


def _form_or_json_paths(body: bytes) -> list[str]:
    try:
        return list(json.loads(body).get("paths", []))
    except (json.JSONDecodeError, UnicodeDecodeError):
        from urllib.parse import parse_qs

        return parse_qs(body.decode()).get("paths", [])


def start_hub_server() -> tuple[ThreadingHTTPServer, str]:
    """Start the server on a free loopback port in a daemon thread; return it and its URL."""
    handler = type("BoundHubHandler", (HubHandler,), {"state": HubState()})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"
