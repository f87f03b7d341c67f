"""Test images built FROM scratch out of host binaries, because no registry is reachable.

Each image is tagged with a hash of its build context, so a tag that already exists is
the cache: it is only rebuilt when a file in images/ or a copied host file changes.
"""

from __future__ import annotations

import hashlib
import io
import re
import subprocess
import sys
import tarfile
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import docker
import docker.errors

IMAGES_DIR = Path(__file__).resolve().parents[2] / "images"
IMAGE_LABELS = {"controlplane.test-image": "1"}
NGINX_BINARY = "/usr/sbin/nginx"
# Empty directories (path -> mode): the temp and log paths Debian's nginx was built with.
NGINX_DIRS = {
    **dict.fromkeys(
        [f"/var/lib/nginx/{d}" for d in ("body", "proxy", "fastcgi", "uwsgi", "scgi")]
        + ["/var/log/nginx", "/run"],
        0o755,
    ),
    "/tmp": 0o1777,
}
# /run holds the backend's "draining" flag.
BACKEND_DIRS = {"/run": 0o755, "/tmp": 0o1777}
# The legacy builder colours a step's stderr; progress and error tails want plain text.
ANSI_COLOUR = re.compile(r"\x1b\[[0-9;]*m")

Progress = Callable[[str], None]


@dataclass(frozen=True)
class TestImages:
    """Tags of the images the integration tests run."""

    __test__ = False  # not a pytest test class, despite the name

    nginx: str
    backend: str


class ImageBuildError(RuntimeError):
    """A test image failed to build; the message ends with the build log's tail."""


@dataclass(frozen=True)
class _Entry:
    """One build-context member; ``data`` is None for a directory."""

    path: str
    mode: int
    data: bytes | None


def _ldd(binary: str) -> list[str]:
    """Libraries and dynamic loader ``binary`` needs, as paths the loader looks them up at."""
    out = subprocess.run(["ldd", binary], capture_output=True, text=True, check=True).stdout
    paths = []
    for line in out.splitlines():
        if "not found" in line:
            raise ImageBuildError(f"{binary}: missing library: {line.strip()}")
        target = line.split("=>")[-1].split()
        # linux-vdso has no file; the loader's line has no "=>".
        if target and target[0].startswith("/"):
            paths.append(target[0])
    return paths


def _file_mode(path: Path) -> int:
    """Only the executable bit: umasks and checkouts differ, the hash must not."""
    return 0o755 if path.stat().st_mode & 0o111 else 0o644


def _context(name: str, host_files: Mapping[str, str], dirs: Mapping[str, int]) -> list[_Entry]:
    """images/<name>/ plus host files (image path -> host path) and empty dirs under rootfs/."""
    source = IMAGES_DIR / name
    entries = [
        _Entry(p.relative_to(source).as_posix(), _file_mode(p), p.read_bytes())
        for p in source.rglob("*")
        if p.is_file()
    ]
    entries += [
        _Entry(f"rootfs{image_path}", _file_mode(Path(host)), Path(host).read_bytes())
        for image_path, host in host_files.items()
    ]
    entries += [_Entry(f"rootfs{d}", mode, None) for d, mode in dirs.items()]
    return sorted(entries, key=lambda e: e.path)


def _digest(entries: Iterable[_Entry]) -> str:
    """sha256 over paths, modes and bytes, independent of tar's encoding."""
    h = hashlib.sha256()
    for e in entries:
        kind = "d" if e.data is None else f"f{len(e.data)}"
        h.update(f"{e.path}\0{e.mode:o}\0{kind}\0".encode())
        h.update(e.data or b"")
    return h.hexdigest()


def _tar(entries: Iterable[_Entry]) -> io.BytesIO:
    """The context as an uncompressed tar with fixed owners and mtimes."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for e in entries:
            info = tarfile.TarInfo(e.path)
            info.mode = e.mode
            info.mtime = 0
            if e.data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(e.data)
                tar.addfile(info, io.BytesIO(e.data))
    buf.seek(0)
    return buf


def _ensure(
    client: docker.DockerClient, name: str, entries: list[_Entry], progress: Progress
) -> str:
    """Tag of the image for ``entries``, built unless that tag already exists."""
    tag = f"controlplane-test/{name}:{_digest(entries)[:16]}"
    try:
        client.images.get(tag)
    except docker.errors.ImageNotFound:
        pass
    else:
        progress(f"{tag}: cached")
        return tag
    progress(f"{tag}: building")
    tail: deque[str] = deque(maxlen=30)
    for chunk in client.api.build(
        fileobj=_tar(entries),
        custom_context=True,
        tag=tag,
        rm=True,
        forcerm=True,
        decode=True,
        labels=IMAGE_LABELS,
    ):
        text = ANSI_COLOUR.sub("", str(chunk.get("stream") or chunk.get("status") or ""))
        for line in text.splitlines():
            if line.strip():
                tail.append(line)
                progress(f"[{name}] {line}")
        if "error" in chunk:
            log = "\n".join(tail)
            raise ImageBuildError(f"building {tag} failed: {chunk['error']}\n{log}")
    return tag


def ensure_images(client: docker.DockerClient, progress: Progress | None = None) -> TestImages:
    """Build (or reuse) the nginx and backend test images and return their tags."""
    report = progress or (lambda _line: None)
    nginx_files = [NGINX_BINARY, *_ldd(NGINX_BINARY), "/etc/nginx/mime.types"]
    nginx = _ensure(
        client, "nginx", _context("nginx", {f: f for f in nginx_files}, NGINX_DIRS), report
    )
    backend = _ensure(
        client,
        "backend",
        _context("backend", {"/bin/busybox": "/usr/bin/busybox"}, BACKEND_DIRS),
        report,
    )
    return TestImages(nginx=nginx, backend=backend)


if __name__ == "__main__":
    images = ensure_images(docker.from_env(), lambda line: print(line, file=sys.stderr))
    print(images.nginx)
    print(images.backend)
