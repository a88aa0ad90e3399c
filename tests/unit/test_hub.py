"""hub.py against a hub of our own on 127.0.0.1: it serves the tiny GPT-2 fixture the way
the Hugging Face hub does (a HEAD answer with the file's hash, a redirect to storage for
the weights), or serves it damaged. Good files are cached and load; a corrupted or
truncated file is refused in one line and nothing is left in the cache."""

import hashlib
import http.server
import json
import os
import threading
from pathlib import Path

import pytest
import torch

import hf
import hub
from cli import UserError

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "gpt2-tiny"
REPO, REV = hub.MODELS["gpt2"]


class Hub(http.server.BaseHTTPRequestHandler):
    """Files of FIXTURE under /<repo>/resolve/<rev>/<file>; the weights (an LFS file on
    the hub) are declared by SHA-256 and redirected to /storage/; small files by their Git
    blob hash. server.mode: good, corrupt (other bytes than declared), truncated (half the
    bytes, then the connection closes), nohash (no hash header)."""

    def log_message(self, *args):
        pass

    def file(self):
        prefix = f"/{REPO}/resolve/{REV}/"
        name = self.path.removeprefix(prefix).removeprefix("/storage/")
        path = FIXTURE / name
        return name, (path.read_bytes() if path.is_file() else None)

    def do_HEAD(self):
        self.server.requests.append(("HEAD", self.path))
        name, data = self.file()
        if data is None:
            self.send_error(404)
            return
        lfs = name.endswith(".safetensors")
        self.send_response(302 if lfs else 200)
        if self.server.mode != "nohash":
            if lfs:
                self.send_header("X-Linked-Etag", f'"{hashlib.sha256(data).hexdigest()}"')
                self.send_header("Location", f"/storage/{name}")
            else:
                blob = hashlib.sha1(f"blob {len(data)}\0".encode() + data).hexdigest()
                self.send_header("ETag", f'"{blob}"')
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self):
        self.server.requests.append(("GET", self.path))
        name, data = self.file()
        if data is None:
            self.send_error(404)
            return
        if name.endswith(".safetensors") and not self.path.startswith("/storage/"):
            self.send_response(302)
            self.send_header("Location", f"/storage/{name}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = data
        if self.server.mode == "corrupt" and name == "model.safetensors":
            body = data[:-1] + bytes([data[-1] ^ 1])
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.server.mode == "truncated" and name == "model.safetensors":
            self.wfile.write(body[:len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)


@pytest.fixture
def local_hub(tmp_path, monkeypatch):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    server.mode, server.requests = "good", []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("MINRLHF_HUB_URL", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.setenv("MINRLHF_CACHE", str(tmp_path / "cache"))
    yield server
    server.shutdown()
    server.server_close()


def cached_files(tmp_path):
    root = tmp_path / "cache"
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_good_files_are_cached_verified_and_reused(local_hub, tmp_path):
    model, enc = hf.from_pretrained("gpt2")
    assert sorted(os.path.basename(f) for f in cached_files(tmp_path)) == sorted(
        [*hub.FILES, "verified.json"])
    direct, _ = hf.from_pretrained(str(FIXTURE))
    for a, b in zip(model.state_dict().values(), direct.state_dict().values()):
        assert torch.equal(a, b)
    # the weights came through the redirect, after a HEAD for their hash
    assert ("HEAD", f"/{REPO}/resolve/{REV}/model.safetensors") in local_hub.requests
    assert ("GET", "/storage/model.safetensors") in local_hub.requests
    # a second run makes no request at all, and hashes the cached files again first
    local_hub.requests.clear()
    hf.from_pretrained("gpt2")
    assert local_hub.requests == []
    weights = next((tmp_path / "cache").rglob("model.safetensors"))
    good = weights.read_bytes()
    weights.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))  # one bit changed in the cache
    with pytest.raises(UserError, match=r"model.safetensors: the cached file changed since its "
                                        r"sha256 was checked .*; remove it to download it again"):
        hf.from_pretrained("gpt2")
    assert local_hub.requests == []
    # a file cached without a kept hash (an older cache) is checked with the hub's
    weights.write_bytes(good)
    (weights.parent / "verified.json").unlink()
    hf.from_pretrained("gpt2")
    assert ("GET", "/storage/model.safetensors") not in local_hub.requests
    assert sorted(json.loads((weights.parent / "verified.json").read_text())) == sorted(hub.FILES)


@pytest.mark.parametrize("mode, message", [
    ("corrupt", "the file's sha256 is .*, the hub declares .*; nothing was kept"),
    ("truncated", "(the transfer stopped at|download from .* failed)"),
    ("nohash", "declares no hash for the file"),
])
def test_a_bad_transfer_leaves_nothing(local_hub, tmp_path, mode, message):
    local_hub.mode = mode
    with pytest.raises(UserError, match=message) as e:
        hf.from_pretrained("gpt2")
    assert "\n" not in str(e.value)
    files = cached_files(tmp_path)
    assert not any(f.endswith(("model.safetensors", ".part")) for f in files), files
    # the next run, with the hub mended, completes the cache
    local_hub.mode = "good"
    hf.from_pretrained("gpt2")
    assert "model.safetensors" in [os.path.basename(f) for f in cached_files(tmp_path)]


def test_unreachable_hub_and_unknown_names(monkeypatch, tmp_path):
    monkeypatch.setenv("MINRLHF_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MINRLHF_HUB_URL", "http://127.0.0.1:9")  # the discard port: refused
    with pytest.raises(UserError, match="gpt2 config.json: cannot reach"):
        hf.from_pretrained("gpt2")
    with pytest.raises(UserError, match="no such directory"):
        hf.from_pretrained("gpt3")
    with pytest.raises(UserError, match="neither a directory nor a model to download"):
        hub.fetch("gpt3")
