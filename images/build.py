"""Images built FROM scratch out of the host's own Debian binaries and wheels built on the
host, because no registry is reachable: nginx, nginx with Lua (Debian's lua-nginx-module: the
dynamic data plane, where OpenResty would be pulled) and a busybox backend (for the tests and
the Compose stack), the controller (for the Compose stack), and HAProxy (for bench/dataplane.py
only).

Each image is tagged with a hash of its build context, so a tag that already exists is the
cache: it is only rebuilt when a file in images/ or a copied host file changes. A build also
removes the tags (and cached wheels) of its kind that older sources left, once no checkout
used them for a day and no container uses them, so a machine that runs the suite after each
change does not fill up. No build step reaches the network. Run `python -m images.build`
(`make images`) to build them and write the Compose variables that point at them.
"""

from __future__ import annotations

import calendar
import hashlib
import io
import re
import shutil
import subprocess
import sys
import tarfile
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import docker
import docker.errors

IMAGES_DIR = Path(__file__).resolve().parent
ROOT = IMAGES_DIR.parent
IMAGE_LABELS = {"controlplane-offline.image": "1"}
TAG_PREFIX = "controlplane-offline"
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
# The nginx image's own files the nginx-lua image has too (only its nginx.conf differs).
NGINX_SHARED = ("/etc/passwd", "/etc/group", "/etc/nginx/conf.d/default.conf")
# What lua-nginx-module needs, as Debian packages it (install-system-deps installs them).
LUA_PACKAGES = (
    "libnginx-mod-http-ndk",
    "libnginx-mod-http-lua",
    "lua-resty-core",
    "lua-resty-lrucache",
    "lua-cjson",
)
NGINX_MODULES_DIR = "/usr/lib/nginx/modules/"
# Debian's LuaJIT searches /usr/share/lua/5.1/ and /usr/lib/<multiarch>/lua/5.1/; its packages
# also ship files for Lua 5.2-5.4, which nginx never loads.
LUA_DIR_PART = "/lua/5.1/"
# /run holds the backend's "draining" marker and its cached container name.
BACKEND_DIRS = {"/run": 0o755, "/tmp": 0o1777}
STALE_AFTER = 86400.0
"""Seconds after which a tag or a cache left by another source is removed, counted from its
last use by any checkout on this machine (USED_DIR): one used since may belong to a suite
running now from another checkout."""
USED_DIR = Path.home() / ".cache" / "controlplane-offline" / "used"
"""One empty file per tag, touched at each use: the machine's own record, since Docker keeps
no last-used time."""
# The legacy builder colours a step's stderr; progress and error tails want plain text.
ANSI_COLOUR = re.compile(r"\x1b\[[0-9;]*m")

Progress = Callable[[str], None]


@dataclass(frozen=True)
class OfflineImages:
    """Tags of the images the tests and the Compose stack run: `nginx` is plain (the reload
    data plane), `nginx_lua` has lua-nginx-module (the dynamic one); `controller` only when
    asked."""

    nginx: str
    nginx_lua: str
    backend: str
    controller: str | None = None


class ImageBuildError(RuntimeError):
    """An image failed to build; the message says why (for a build, the log's tail)."""


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


def _package_files(package: str) -> list[str]:
    """The files of an installed Debian package that nginx loads: its nginx modules and its
    Lua 5.1 files, as dpkg lists them (a link, like cjson.so, is copied as the file it names)."""
    try:
        done = subprocess.run(["dpkg", "-L", package], capture_output=True, text=True)
    except OSError as error:
        raise ImageBuildError(
            f"dpkg can't be run ({error}): the nginx-lua image is made from Debian's packages "
            f"{' '.join(LUA_PACKAGES)}, so it is built on Debian only"
        ) from error
    if done.returncode != 0:
        raise ImageBuildError(
            f"{package} is not installed ({done.stderr.strip()}): the nginx-lua image is made "
            f"from Debian's packages; run scripts/install-system-deps as root (or `apt-get "
            f"install {' '.join(LUA_PACKAGES)}`)"
        )
    return [
        path
        for path in done.stdout.splitlines()
        if (path.startswith(NGINX_MODULES_DIR) or LUA_DIR_PART in path) and Path(path).is_file()
    ]


def _nginx_lua_files(nginx_files: Mapping[str, str]) -> dict[str, str]:
    """Image path -> host path: the nginx image's files, the Lua packages' modules and Lua
    files at the paths Debian installs them to, and every library those modules load."""
    files = dict(nginx_files)
    files.update((path, str(IMAGES_DIR / "nginx" / "rootfs" / path[1:])) for path in NGINX_SHARED)
    for package in LUA_PACKAGES:
        for path in _package_files(package):
            files[path] = path
            if path.endswith(".so"):
                files.update((lib, lib) for lib in _ldd(path))
    return files


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
    """sha256 over the image labels and the paths, modes and bytes of the context,
    independent of tar's encoding."""
    h = hashlib.sha256(repr(sorted(IMAGE_LABELS.items())).encode())
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
    tag = f"{TAG_PREFIX}/{name}:{_digest(entries)[:16]}"
    _used(tag).parent.mkdir(parents=True, exist_ok=True)
    _used(tag).touch()
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
    _prune_tags(client, name, tag, progress)
    return tag


def _used(tag: str) -> Path:
    return USED_DIR / tag.replace("/", "_").replace(":", "_")


def _last_used(tag: str, created: str) -> float | None:
    """When a checkout last used `tag`, else when it was built; None if neither is known."""
    try:
        return _used(tag).stat().st_mtime
    except OSError:
        pass
    try:
        return float(calendar.timegm(time.strptime(created[:19], "%Y-%m-%dT%H:%M:%S")))
    except ValueError:
        return None


def _prune_tags(client: docker.DockerClient, name: str, current: str, progress: Progress) -> None:
    """Untag this kind's images that no checkout used for STALE_AFTER; without force, so an
    image a container still uses stays."""
    prefix = f"{TAG_PREFIX}/{name}:"
    labels = [f"{key}={value}" for key, value in IMAGE_LABELS.items()]
    for image in client.images.list(filters={"label": labels}):
        for tag in image.tags:
            if not tag.startswith(prefix) or tag == current:
                continue
            used = _last_used(tag, str(image.attrs.get("Created", "")))
            if used is None or time.time() - used < STALE_AFTER:
                continue
            try:
                client.images.remove(tag)
            except docker.errors.APIError:
                continue
            _used(tag).unlink(missing_ok=True)
            progress(f"{tag}: removed (no checkout used it for a day)")


# The controller runs on the host's Debian Python (ABI cp311, like the wheels built here).
PYTHON = "/usr/bin/python3.11"
STDLIB = "/usr/lib/python3.11"
SITE = "/usr/local/lib/python3.11/dist-packages"
# Parts of the standard library a daemon never imports: tests, GUIs, build files.
STDLIB_SKIP = frozenset(
    {
        "test",
        "tests",
        "idlelib",
        "tkinter",
        "turtledemo",
        "ensurepip",
        "lib2to3",
        "__pycache__",
        "config-3.11-x86_64-linux-gnu",
    }
)
CONTROLLER_DIRS = {"/tmp": 0o1777, "/var/lib/controlplane": 0o755}
CACHE_DIR = ROOT / ".cache" / "offline-images"


def _source_key() -> str:
    """What the controller's site-packages are built from: the project's own files."""
    h = hashlib.sha256()
    paths = [ROOT / "pyproject.toml", ROOT / "README.md"]
    for folder in ("controlplane", "templates"):
        paths += sorted(
            p for p in (ROOT / folder).rglob("*") if p.is_file() and "__pycache__" not in p.parts
        )
    for path in paths:
        h.update(f"{path.relative_to(ROOT)}\0".encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def _site_packages(progress: Progress) -> Path:
    """controlplane and its dependencies, installed from wheels built on the host (pip wheel
    uses the host's configured index; nothing is fetched inside a build). Cached by source."""
    key = _source_key()
    site = CACHE_DIR / f"site-{key}"
    if site.is_dir():
        return site
    wheels = CACHE_DIR / f"wheels-{key}"
    progress(f"building wheels of controlplane and its dependencies into {wheels}")
    _pip("wheel", "--quiet", "--wheel-dir", str(wheels), str(ROOT))
    staging = site.with_suffix(".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    _pip(
        "install",
        "--quiet",
        "--no-index",
        "--no-deps",
        "--no-compile",
        "--target",
        str(staging),
        *sorted(str(w) for w in wheels.glob("*.whl")),
    )
    staging.rename(site)
    for old in CACHE_DIR.iterdir():
        try:
            stale = time.time() - old.stat().st_mtime > STALE_AFTER
        except FileNotFoundError:
            continue  # another build removed it first
        if stale and old.name.split("-", 1)[0] in ("site", "wheels") and key not in old.name:
            shutil.rmtree(old, ignore_errors=True)
    return site


def _pip(*args: str) -> None:
    done = subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise ImageBuildError(
            f"pip {args[0]} failed ({done.stderr.strip()[-2000:]}); the controller image needs "
            "the project's wheels: check that pip can reach its index"
        )


def _controller_files(progress: Progress) -> dict[str, str]:
    """Image path -> host path: Debian's python3.11, its standard library, every library
    they load, and the site-packages."""
    if not Path(PYTHON).exists():
        raise ImageBuildError(
            f"{PYTHON} is missing: the offline controller image is made from Debian's "
            "python3.11 (apt-get install python3.11), or use the official images "
            "(compose/docker-compose.yml builds compose/Dockerfile)"
        )
    files = {PYTHON: PYTHON}
    binaries = [PYTHON]
    for path in Path(STDLIB).rglob("*"):
        if STDLIB_SKIP.intersection(path.relative_to(STDLIB).parts) or not path.is_file():
            continue
        files[str(path)] = str(path)
        if path.suffix == ".so":
            binaries.append(str(path))
    site = _site_packages(progress)
    for path in site.rglob("*"):
        relative = path.relative_to(site)
        # bin/ holds scripts for a venv; direct_url.json names the wheel's path on this host
        if (
            relative.parts[0] == "bin"
            or "__pycache__" in relative.parts
            or path.name == "direct_url.json"
            or not path.is_file()
        ):
            continue
        files[f"{SITE}/{relative.as_posix()}"] = str(path)
        if path.suffix == ".so":
            binaries.append(str(path))
    for binary in binaries:
        files.update((lib, lib) for lib in _ldd(binary))
    return files


def ensure_images(
    client: docker.DockerClient, progress: Progress | None = None, controller: bool = False
) -> OfflineImages:
    """Build (or reuse) the nginx, nginx-lua and backend images, and the controller's when
    asked."""
    report = progress or (lambda _line: None)
    nginx_files = {f: f for f in [NGINX_BINARY, *_ldd(NGINX_BINARY), "/etc/nginx/mime.types"]}
    nginx_files["/bin/busybox"] = "/usr/bin/busybox"
    nginx = _ensure(client, "nginx", _context("nginx", nginx_files, NGINX_DIRS), report)
    lua_files = _nginx_lua_files(nginx_files)
    nginx_lua = _ensure(client, "nginx-lua", _context("nginx-lua", lua_files, NGINX_DIRS), report)
    backend = _ensure(
        client,
        "backend",
        _context("backend", {"/bin/busybox": "/usr/bin/busybox"}, BACKEND_DIRS),
        report,
    )
    built = None
    if controller:
        files = _controller_files(report)
        built = _ensure(
            client, "controller", _context("controller", files, CONTROLLER_DIRS), report
        )
    return OfflineImages(nginx=nginx, nginx_lua=nginx_lua, backend=backend, controller=built)


HAPROXY_BINARY = "/usr/sbin/haproxy"


def ensure_haproxy_image(client: docker.DockerClient, progress: Progress | None = None) -> str:
    """Build (or reuse) the HAProxy image, from Debian's haproxy package's binary, that the
    data-plane bench compares nginx with; neither the tests nor the Compose stack use it."""
    if not Path(HAPROXY_BINARY).exists():
        raise ImageBuildError(
            f"{HAPROXY_BINARY} is missing: the HAProxy image is made from Debian's haproxy "
            "package; run scripts/install-system-deps as root (or `apt-get install haproxy`)"
        )
    files = {f: f for f in [HAPROXY_BINARY, *_ldd(HAPROXY_BINARY)]}
    entries = _context("haproxy", files, {"/tmp": 0o1777})
    return _ensure(client, "haproxy", entries, progress or (lambda _line: None))


def compose_env(images: OfflineImages) -> str:
    """The Compose variables that point the stack at these images: nginx with Lua, as the
    stack's default (OpenResty) is; the plain one in NGINX_PLAIN_IMAGE, for the reload data
    plane (`NGINX_IMAGE=$NGINX_PLAIN_IMAGE`, or `CP_DATAPLANE=reload make demo`)."""
    lines = [
        f"NGINX_IMAGE={images.nginx_lua}",
        f"NGINX_PLAIN_IMAGE={images.nginx}",
        f"BACKEND_IMAGE={images.backend}",
    ]
    if images.controller:
        lines.append(f"CONTROLPLANE_IMAGE={images.controller}")
    return "\n".join(lines) + "\n"


OFFLINE_ENV = ROOT / "compose" / "offline.env"

if __name__ == "__main__":
    built = ensure_images(
        docker.from_env(), lambda line: print(line, file=sys.stderr), controller=True
    )
    OFFLINE_ENV.write_text(compose_env(built))
    print(compose_env(built), end="")
    print(f"(written to {OFFLINE_ENV.relative_to(ROOT)})", file=sys.stderr)
