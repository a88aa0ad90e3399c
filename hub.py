"""Downloads of GPT-2 checkpoints from the Hugging Face hub, for users with a network:
only when asked for by name (--init_from=gpt2 and the like), never on the default path.

Each model is pinned to a revision (a commit of its repository), so the same name always
means the same files. Each file is checked against the hash the hub declares for it
before it is used: the hub answers a HEAD request for a file with its SHA-256 (the
X-Linked-Etag header, for files stored in Git LFS, such as the weights) or with the
Git blob hash (the ETag header, SHA-1 of "blob <size>\\0" and the content, for small
files). A file is written to a temporary name, hashed while it arrives, and moved into
the cache only when its size and hash match; a broken transfer or a mismatch leaves
nothing behind and is refused in one line. The hashes checked are kept beside the files
(verified.json), and every later run hashes the cached files again against them before
they are used, without a request; a file that changed since is refused in one line.

The cache is $MINRLHF_CACHE, or ~/.cache/minrlhf, then <repository>/<revision>/. The hub's
address is https://huggingface.co, or $MINRLHF_HUB_URL (the tests serve files from
127.0.0.1).
"""

import hashlib
import json
import os
import re
import sys
import urllib.error
import urllib.request

from cli import UserError

# name: (repository, revision); the revisions are commits of each repository that hold
# config.json, model.safetensors, vocab.json and merges.txt
MODELS = {
    "gpt2": ("openai-community/gpt2", "607a30d783dfa663caf39e06633721c8d4cfcd7e"),
    "gpt2-medium": ("openai-community/gpt2-medium", "6dcaa7a952f72f9298047fd5137cd6e4f05f41da"),
    "gpt2-large": ("openai-community/gpt2-large", "32b71b12589c2f8d625668d2335a01cac3249519"),
    "gpt2-xl": ("openai-community/gpt2-xl", "15ea56dee5df4983c59b2538573817e1667135e2"),
}
FILES = ("config.json", "vocab.json", "merges.txt", "model.safetensors")
CHUNK = 1 << 20


def cache_root():
    return os.environ.get("MINRLHF_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                            "minrlhf")


def hub_url():
    return os.environ.get("MINRLHF_HUB_URL", "https://huggingface.co").rstrip("/")


class NoRedirect(urllib.request.HTTPRedirectHandler):
    """The hub's hash headers are on its own answer, before any redirect to storage."""

    def redirect_request(self, *args, **kwargs):
        return None


def declared_hash(url, name):
    """('sha256' or 'git-sha1', hex) the hub declares for a file, from a HEAD request."""
    opener = urllib.request.build_opener(NoRedirect)
    try:
        response = opener.open(urllib.request.Request(url, method="HEAD"), timeout=30)
        headers = response.headers
    except urllib.error.HTTPError as e:  # a 3xx lands here too, with the headers wanted
        if e.code >= 400:
            raise UserError(f"{name}: {url} answered HTTP {e.code} {e.reason}") from None
        headers = e.headers
    except (urllib.error.URLError, OSError) as e:
        raise UserError(f"{name}: cannot reach {url} ({getattr(e, 'reason', e)})") from None
    for header, kind, size in (("X-Linked-Etag", "sha256", 64), ("ETag", "git-sha1", 40)):
        value = (headers.get(header) or "").strip().removeprefix("W/").strip('"')
        if re.fullmatch(f"[0-9a-f]{{{size}}}", value):
            return kind, value
    raise UserError(f"{name}: {url} declares no hash for the file (no X-Linked-Etag or ETag), "
                    f"so it cannot be checked; nothing was downloaded")


def hasher(kind, size):
    """The hash the hub declares for a file of `size` bytes, to be fed its content: SHA-256,
    or Git's blob SHA-1 (of "blob <size>\\0" and the content)."""
    return hashlib.sha256() if kind == "sha256" else hashlib.sha1(f"blob {size}\0".encode())


def file_hash(path, kind):
    """A cached file's hash, as hasher gives it."""
    h = hasher(kind, os.path.getsize(path))
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def download(url, path, name, kind, expected):
    """Stream url to path.part, hashing; move it to path when size and hash match."""
    part = path + ".part"
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            total = int(response.headers.get("Content-Length") or 0)
            if kind == "git-sha1" and not total:
                raise UserError(f"{name}: {url} sent no Content-Length; the Git hash "
                                f"cannot be checked")
            h = hasher(kind, total)
            done = 0
            with open(part, "wb") as f:
                while chunk := response.read(CHUNK):
                    f.write(chunk)
                    h.update(chunk)
                    done += len(chunk)
                    if total > CHUNK:
                        print(f"\r{name}: {done / 1e6:.1f} / {total / 1e6:.1f} MB", end="",
                              file=sys.stderr, flush=True)
            if total > CHUNK:
                print(file=sys.stderr)
        if total and done != total:
            raise UserError(f"{name}: the transfer stopped at {done} of {total} bytes; nothing "
                            f"was kept, run again")
        if h.hexdigest() != expected:
            raise UserError(f"{name}: the file's {kind} is {h.hexdigest()[:16]}..., the hub "
                            f"declares {expected[:16]}...; nothing was kept")
        os.replace(part, path)
    except UserError:
        remove(part)
        raise
    except Exception as e:  # the network, the disk, http.client.IncompleteRead: one line
        remove(part)
        why = getattr(e, "reason", None) or getattr(e, "strerror", None) or type(e).__name__
        raise UserError(f"{name}: download from {url} failed ({why}); nothing was kept, "
                        f"run again") from None


def remove(path):
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def fetch(name):
    """The cache directory holding a known model's files, downloading what is missing."""
    if name not in MODELS:
        raise UserError(f"{name!r} is neither a directory nor a model to download (known: "
                        f"{', '.join(MODELS)})")
    repo, revision = MODELS[name]
    directory = os.path.join(cache_root(), repo, revision)
    record = os.path.join(directory, "verified.json")
    try:
        with open(record) as f:
            verified = json.load(f)
    except (OSError, ValueError):  # none yet (or damaged): every file is checked with the hub
        verified = {}
    for file in FILES:
        path = os.path.join(directory, file)
        if os.path.exists(path) and file in verified:
            kind, expected = verified[file]
            if file_hash(path, kind) != expected:
                raise UserError(f"{path}: the cached file changed since its {kind} was checked "
                                f"(not {expected[:16]}... now); remove it to download it again")
            continue
        try:
            os.makedirs(directory, exist_ok=True)
        except OSError as e:
            raise UserError(f"{directory}: {e.strerror or e} (set MINRLHF_CACHE to another "
                            f"folder)") from None
        url = f"{hub_url()}/{repo}/resolve/{revision}/{file}"
        kind, expected = declared_hash(url, f"{name} {file}")
        if os.path.exists(path):  # cached before its hash was kept: checked against the hub's
            if file_hash(path, kind) != expected:
                raise UserError(f"{path}: its {kind} is not the {expected[:16]}... the hub "
                                f"declares; remove it to download it again")
        else:
            download(url, path, f"{name} {file}", kind, expected)
        verified[file] = [kind, expected]
        tmp = record + ".part"
        with open(tmp, "w") as f:
            json.dump(verified, f, indent=1)
        os.replace(tmp, record)
    return directory
