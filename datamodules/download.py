"""Download and install StreetHazards: ``python main.py download --root DIR``.

The two archives of the release are fetched from the dataset authors' page, checked, extracted
safely and indexed::

    streethazards_train.tar  9,386,226,176 bytes  MD5 cd2d1a8649848afb85b5059d227d2090  -> ROOT/train/
    streethazards_test.tar   2,150,484,992 bytes  MD5 8c547c1346b00c21b2483887110bfea7  -> ROOT/test/

What happens, in order:

1. A split whose folder (``ROOT/train``, ``ROOT/test``) already exists is not downloaded; it only
   gets its missing ``.odgt`` indexes (so a dataset extracted by hand is completed, offline).
2. Each archive goes to ``ROOT/.downloads/NAME.part``. An interrupted transfer resumes with an HTTP
   ``Range: bytes=N-`` request (guarded by ``If-Range`` when the server gave an ETag or a
   Last-Modified date, so a changed file is fetched anew); a server that answers a range request with
   the whole file (200) is read from the start again. ``retries`` interrupted transfers that made
   progress are resumed within one call; a server that cannot be reached at all fails at once.
3. The size is checked against the expected one and, unless disabled, the MD5 (computed while the
   bytes arrive; a resumed part is hashed first). For the official URLs both are the published
   values. For another URL the expected size is what the server announces (``Content-Length`` or
   the total of ``Content-Range``) and there is no MD5 unless ``expected`` gives one. A finished
   archive is renamed to ``ROOT/.downloads/NAME``.
4. An archive already present as ``ROOT/.downloads/NAME`` (finished earlier, or copied there by
   hand from a machine with internet) is used without any network access, after the same checks.
5. All archives are extracted into one temporary folder ``ROOT/.extract-tmp-PID-*`` (one left by
   a killed run is removed by the next run), refusing absolute paths,
   ``..`` components, members that resolve outside the folder, links and device files (own checks,
   plus tarfile's ``"data"`` filter where Python has it). The ``.odgt`` indexes are written there,
   and only when everything succeeded are ``train/`` and ``test/`` moved into ROOT. On any failure
   ROOT keeps its previous content, except for what saves a download next time in ``ROOT/.downloads``:
   a ``.part`` to resume, and archives that passed their checks (a bad or unsafe download is deleted).
6. The archives are deleted unless ``keep_archives``.

``.odgt`` indexes (``train/train.odgt``, ``train/validation.odgt``, ``test/test.odgt``) are JSON arrays
of ``{"fpath_img", "fpath_segm", "width", "height"}`` with paths relative to the split folder, built
with :func:`datamodules.streethazards.scan_split`; sizes come from the PNG headers only.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import logging
import os
import re
import shutil
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from datamodules.io import atomic_write_text
from datamodules.streethazards import SPLITS, StreetHazardsDataError, scan_split

__all__ = [
    "ARCHIVES",
    "DEFAULT_TEST_URL",
    "DEFAULT_TRAIN_URL",
    "DOWNLOADS_DIR",
    "DownloadError",
    "Expected",
    "download_main",
    "download_streethazards",
    "extract_archive",
    "write_odgt_indexes",
]

log = logging.getLogger(__name__)

BASE_URL = "https://people.eecs.berkeley.edu/~hendrycks/"
#: Folder inside ROOT where archives are downloaded (and where hand-copied archives are looked for).
DOWNLOADS_DIR = ".downloads"
_CHUNK = 1 << 20
_STAGING_PREFIX = ".extract-tmp-"  # + pid: extraction folders inside ROOT
_USER_AGENT = "streethazards-anomaly/0.1 (python urllib)"


class DownloadError(RuntimeError):
    """Downloading or installing the dataset failed; the message names the URL or file and the cause."""


class _BadArchive(DownloadError):
    """The archive itself is unusable (unsafe member, not a tar); a copy this call downloaded is deleted."""


@dataclass(frozen=True)
class Expected:
    """What an archive must be. ``None`` means unknown: the size is then taken from the server's
    headers, and no MD5 is checked."""

    size: int | None = None
    md5: str | None = None


@dataclass(frozen=True)
class Archive:
    """One archive of the release: the folder it extracts to, its file name, address and checksums."""

    folder: str
    file_name: str
    url: str
    official: Expected


ARCHIVES: dict[str, Archive] = {
    "train": Archive(
        "train",
        "streethazards_train.tar",
        BASE_URL + "streethazards_train.tar",
        Expected(9_386_226_176, "cd2d1a8649848afb85b5059d227d2090"),
    ),
    "test": Archive(
        "test",
        "streethazards_test.tar",
        BASE_URL + "streethazards_test.tar",
        Expected(2_150_484_992, "8c547c1346b00c21b2483887110bfea7"),
    ),
}
DEFAULT_TRAIN_URL = ARCHIVES["train"].url
DEFAULT_TEST_URL = ARCHIVES["test"].url


# ----------------------------------------------------------------------------- small helpers
def _gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n:,} bytes"


def _progress_bar(total: int | None, initial: int, desc: str, enabled: bool) -> tqdm:
    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        disable=not enabled,
        file=sys.stderr,
    )


def _hash_file(path: Path, hasher: Any, progress: bool, desc: str) -> None:
    """Feed the bytes of ``path`` to ``hasher`` (md5 objects are not typed publicly)."""
    with path.open("rb") as f, _progress_bar(path.stat().st_size, 0, desc, progress) as bar:
        while chunk := f.read(_CHUNK):
            hasher.update(chunk)
            bar.update(len(chunk))


def _unlink(*paths: Path) -> None:
    for path in paths:
        path.unlink(missing_ok=True)


_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$", re.IGNORECASE)
_UNSATISFIED_RANGE = re.compile(r"^\s*bytes\s+\*/(\d+)\s*$", re.IGNORECASE)


def _parse_content_range(value: str | None) -> tuple[int, int, int | None] | None:
    """``bytes START-END/TOTAL`` -> (START, END, TOTAL or None for ``*``); None if malformed."""
    match = _CONTENT_RANGE.match(value or "")
    if match is None:
        return None
    start, end = int(match[1]), int(match[2])
    total = None if match[3] == "*" else int(match[3])
    if end < start or (total is not None and end >= total):
        return None
    return start, end, total


def _header_int(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


# ----------------------------------------------------------------------------- indexing
def _record(image: Path, annotation: Path, split_dir: Path) -> dict[str, Any]:
    try:
        with Image.open(image) as opened:  # reads the header only
            width, height = opened.size
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as error:
        raise DownloadError(f"{image}: unreadable image ({error})") from None
    return {
        "fpath_img": image.relative_to(split_dir).as_posix(),
        "fpath_segm": annotation.relative_to(split_dir).as_posix(),
        "width": width,
        "height": height,
    }


def write_odgt_indexes(root: str | os.PathLike[str], folder: str, overwrite: bool = False) -> list[Path]:
    """Write the ``.odgt`` indexes of the splits stored in ``root/folder`` ('train' or 'test').

    ``train`` holds the train and validation splits, ``test`` the test split. An existing index is
    kept unless ``overwrite``. Records list every image found by scanning the town folders, with
    paths relative to ``root/folder`` and the image's width and height. Returns the files written.
    Raises DownloadError when a split has no images, StreetHazardsDataError when an image has no
    annotation.
    """
    root = Path(root)
    written = []
    for layout in (layout for layout in SPLITS.values() if layout.folder == folder):
        index = layout.index_path(root)
        if index.exists() and not overwrite:
            continue
        samples = scan_split(root, layout)
        if not samples:
            raise DownloadError(
                f"{root / folder / 'images' / layout.subset}: no images in its town folders (*/), "
                f"so split '{layout.name}' cannot be indexed"
            )
        split_dir = root / folder
        records = [_record(s.image, s.annotation, split_dir) for s in samples if s.annotation is not None]
        text = "[\n" + ",\n".join(json.dumps(r) for r in records) + "\n]\n"
        atomic_write_text(index, text)  # readers never see a half-written index
        written.append(index)
    return written


# ----------------------------------------------------------------------------- safe extraction
# tarfile's own filter errors (Python >= 3.11.4 / 3.10.12); an empty tuple catches nothing elsewhere.
_FILTER_ERRORS: tuple[type[Exception], ...] = ()
if hasattr(tarfile, "FilterError"):
    _FILTER_ERRORS = (tarfile.FilterError,)


def _unsafe_reason(member: tarfile.TarInfo, dest: Path) -> str | None:
    """Why ``member`` must not be extracted into ``dest`` (a resolved folder), or None if it is safe."""
    name = member.name
    if name.startswith(("/", "\\")) or PurePosixPath(name).is_absolute() or re.match(r"^[A-Za-z]:", name):
        return "absolute path"
    if ".." in PurePosixPath(name.replace("\\", "/")).parts:
        return "'..' path component"
    if member.issym():
        return f"symbolic link to '{member.linkname}'"
    if member.islnk():
        return f"hard link to '{member.linkname}'"
    if not (member.isreg() or member.isdir()):
        kind = "device file" if member.isdev() else "special file"
        return f"{kind} (only regular files and folders are allowed)"
    if not (dest / name).resolve().is_relative_to(dest):
        return "resolves outside the extraction folder"
    return None


def extract_archive(archive: str | os.PathLike[str], dest: str | os.PathLike[str]) -> None:
    """Extract the tar ``archive`` into the folder ``dest``, refusing anything unsafe.

    Only regular files and folders whose paths stay inside ``dest`` are allowed: an absolute path, a
    ``..`` component, a link or a device file raises DownloadError naming the member (members
    before it may already be extracted: extract into a fresh folder and discard it on error).
    tarfile's ``"data"`` filter is applied on top where available (Python >= 3.11.4 / 3.10.12).
    """
    archive, dest = Path(archive), Path(dest).resolve()

    def checked(tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
        for member in tar:
            if not PurePosixPath(member.name).parts:  # the "./" entry of `tar -cf x.tar .`
                continue
            reason = _unsafe_reason(member, dest)
            if reason is not None:
                raise _BadArchive(f"{archive}: refusing unsafe member '{member.name}' ({reason})")
            yield member

    options: dict[str, Any] = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
    try:
        with tarfile.open(archive, mode="r:*") as tar:
            tar.extractall(dest, members=checked(tar), **options)
    except _FILTER_ERRORS as error:
        name = getattr(getattr(error, "tarinfo", None), "name", "?")
        raise _BadArchive(f"{archive}: refusing unsafe member '{name}' ({error})") from None
    except (tarfile.TarError, EOFError) as error:
        raise _BadArchive(f"{archive}: not a readable tar archive, or truncated ({error})") from None


# ----------------------------------------------------------------------------- download
@dataclass
class _Job:
    """One archive to obtain: where from, what it must be, and where it goes."""

    archive: Archive
    url: str
    expected: Expected
    downloads: Path
    downloaded_now: bool = field(default=False)

    @property
    def final(self) -> Path:
        return self.downloads / self.archive.file_name

    @property
    def part(self) -> Path:
        return self.downloads / (self.archive.file_name + ".part")

    @property
    def meta(self) -> Path:
        """Sidecar of a ``.part``: its URL and the server's validator, so a resume never mixes files."""
        return self.downloads / (self.archive.file_name + ".part.json")


class _Interrupted(Exception):
    def __init__(self, received: int, total: int | None, reason: str, progressed: bool) -> None:
        super().__init__(reason)
        self.received, self.total, self.reason, self.progressed = received, total, reason, progressed


class _Restart(Exception):
    """The server's reply means the ``.part`` cannot be continued: read the file from the start."""


@dataclass
class _Downloader:
    root: Path
    jobs: list[_Job]
    timeout: float
    verify_md5: bool
    progress: bool
    retries: int

    # -- messages
    def offline_message(self, job: _Job, reason: object) -> str:
        names = " and ".join(j.archive.file_name for j in self.jobs)
        sources = {j.url.rsplit("/", 1)[0] + "/" for j in self.jobs}
        source = sources.pop() if len(sources) == 1 else " and ".join(j.url for j in self.jobs)
        folders = " and ".join(str(self.root / j.archive.folder) for j in self.jobs)
        kept = ""
        if job.part.is_file():
            kept = f"; the {job.part.stat().st_size:,} bytes already in {job.part} resume when run again"
        return (
            f"cannot reach {job.url} ({reason}). Without internet access here, download {names} from "
            f"{source} on a machine with internet and place them in {self.root / DOWNLOADS_DIR}/ (or "
            f"extract them into {self.root} so that {folders} exist), then run this command again{kept}"
        )

    # -- one archive
    def obtain(self, job: _Job) -> Path:
        """The verified archive of ``job``: one already in ``.downloads``, or a fresh download."""
        if job.final.is_file():
            return self.check_existing(job)
        attempts = restarts = 0
        while True:
            try:
                path = self.transfer(job)
                job.downloaded_now = True
                return path
            except _Restart:
                _unlink(job.part, job.meta)
                restarts += 1
                if restarts > 2:  # a restart sends no Range header, so only a broken server gets here
                    raise DownloadError(f"{job.url}: the server keeps sending unusable ranges") from None
                continue
            except _Interrupted as interrupted:
                total = f"{interrupted.total:,}" if interrupted.total is not None else "?"
                where = f"after {interrupted.received:,} of {total} bytes ({interrupted.reason})"
                if interrupted.progressed and attempts < self.retries:
                    attempts += 1
                    log.warning("Transfer of %s interrupted %s; resuming (%d/%d)", job.url, where, attempts,
                                self.retries)  # fmt: skip
                    continue
                raise DownloadError(
                    f"transfer of {job.url} interrupted {where}; run the command again to resume: the bytes "
                    f"received are kept in {job.part}"
                ) from None

    def check_existing(self, job: _Job) -> Path:
        path, expected = job.final, job.expected
        size = path.stat().st_size
        if expected.size is not None and size != expected.size:
            raise DownloadError(
                f"{path} has {size:,} bytes but the archive has {expected.size:,}: an incomplete copy? "
                "Replace it with the complete file, or delete it to download it again"
            )
        if expected.size is None:
            log.warning("Using %s as it is: its expected size is unknown without asking %s", path, job.url)
        if self.verify_md5 and expected.md5 is not None:
            hasher = hashlib.md5(usedforsecurity=False)
            _hash_file(path, hasher, self.progress, f"{path.name} (MD5)")
            if hasher.hexdigest() != expected.md5.lower():
                raise DownloadError(
                    f"{path}: MD5 {hasher.hexdigest()} differs from the expected {expected.md5}: the file is "
                    "corrupt; delete it to download it again (or pass --skip_md5 to use it anyway)"
                )
        log.info("Using %s (already downloaded; no network needed)", path)
        return path

    def transfer(self, job: _Job) -> Path:
        """One HTTP request: start or continue ``job.part``; rename it to ``job.final`` when verified."""
        offset = job.part.stat().st_size if job.part.is_file() else 0
        meta = self.read_meta(job)
        if offset and meta.get("url") != job.url:
            log.warning("%s came from another address (%s): starting over", job.part, meta.get("url"))
            raise _Restart
        expected = job.expected
        if expected.size is not None and offset > expected.size:
            raise _Restart
        if expected.size is not None and offset == expected.size:
            return self.finish(job, None)  # complete, only the rename was missing

        headers = {"User-Agent": _USER_AGENT}
        if offset:
            headers["Range"] = f"bytes={offset}-"
            if meta.get("validator"):
                headers["If-Range"] = meta["validator"]
        request = urllib.request.Request(job.url, headers=headers)
        # A fresh opener per request so proxy settings are read from the environment now.
        opener = urllib.request.build_opener()
        try:
            response = opener.open(request, timeout=self.timeout)
        except urllib.error.HTTPError as error:
            with error:
                if error.code == 416 and offset:  # nothing left after ``offset``
                    match = _UNSATISFIED_RANGE.match(error.headers.get("Content-Range") or "")
                    if match and int(match[1]) == offset:
                        return self.finish(job, None)
                    raise _Restart from None
                raise DownloadError(f"{job.url}: HTTP error {error.code} {error.reason}") from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as error:
            reason = getattr(error, "reason", None) or error
            raise DownloadError(self.offline_message(job, reason)) from None
        with response:
            return self.receive(job, response, offset)

    def receive(self, job: _Job, response: http.client.HTTPResponse, offset: int) -> Path:
        expected = job.expected
        if response.status == 206:
            content_range = _parse_content_range(response.headers.get("Content-Range"))
            if content_range is None or content_range[0] != offset:
                log.warning("%s answered bytes=%d- with Content-Range %r: starting over", job.url, offset,
                            response.headers.get("Content-Range"))  # fmt: skip
                raise _Restart
            total = content_range[2]
        elif 200 <= response.status < 300:
            if offset:
                log.warning("%s ignored the range request (HTTP %d): downloading from the start", job.url,
                            response.status)  # fmt: skip
                offset = 0
            total = _header_int(response.headers.get("Content-Length"))
        else:
            raise DownloadError(f"{job.url}: unexpected HTTP status {response.status} {response.reason}")
        if expected.size is not None and total is not None and total != expected.size:
            raise DownloadError(
                f"{job.url}: size mismatch: the server reports {total:,} bytes, expected {expected.size:,}"
            )
        size = expected.size if expected.size is not None else total

        etag = response.headers.get("ETag")
        validator = etag if etag and not etag.startswith("W/") else response.headers.get("Last-Modified")
        job.meta.write_text(json.dumps({"url": job.url, "validator": validator, "size": size}))

        hasher = None
        if self.verify_md5 and expected.md5 is not None:
            hasher = hashlib.md5(usedforsecurity=False)
            if offset:
                _hash_file(job.part, hasher, self.progress, f"{job.part.name} (MD5 of the part)")
        if offset:
            log.info("Resuming %s at %s", job.url, _gb(offset))
        else:
            log.info("Downloading %s (%s) to %s", job.url, _gb(size) if size is not None else "size unknown",
                     job.part)  # fmt: skip
        with job.part.open("ab" if offset else "wb") as out:
            received = self.copy(job, response, out, offset, size, hasher)
        if size is not None and received < size:
            raise _Interrupted(received, size, "the connection closed early", received > offset)
        return self.finish(job, hasher)

    def copy(
        self,
        job: _Job,
        response: http.client.HTTPResponse,
        out: BinaryIO,
        offset: int,
        size: int | None,
        hasher: Any,
    ) -> int:
        """Append the response body to ``out``; returns the size of the part afterwards."""
        received = offset
        # read1 returns what has arrived (up to a chunk): on a stall, the bytes before it are kept.
        read = getattr(response, "read1", response.read)
        with _progress_bar(size, offset, job.archive.file_name, self.progress) as bar:
            while True:
                try:
                    chunk = read(_CHUNK)
                except (OSError, http.client.HTTPException) as error:  # timeout, reset, IncompleteRead
                    out.flush()
                    reason = str(error) or type(error).__name__
                    raise _Interrupted(received, size, reason, received > offset) from None
                if not chunk:
                    return received
                if size is not None and received + len(chunk) > size:  # never write more than expected
                    out.close()
                    _unlink(job.part, job.meta)
                    raise DownloadError(
                        f"{job.url}: size mismatch: the server sends more than the expected {size:,} bytes; "
                        "nothing was kept"
                    )
                try:
                    out.write(chunk)
                except OSError as error:
                    raise DownloadError(f"cannot write {job.part}: {error.strerror or error}") from None
                if hasher is not None:
                    hasher.update(chunk)
                received += len(chunk)
                bar.update(len(chunk))

    def finish(self, job: _Job, hasher: Any) -> Path:
        """Check the size and MD5 of the complete ``.part``, then rename it. A bad file is deleted."""
        expected = job.expected
        actual = job.part.stat().st_size
        wanted = expected.size if expected.size is not None else self.read_meta(job).get("size")
        if wanted is not None and actual != wanted:
            _unlink(job.part, job.meta)
            raise DownloadError(
                f"{job.url}: size mismatch: received {actual:,} bytes, expected {wanted:,}; the file was "
                "deleted, run again to download it anew"
            )
        if wanted is None:
            log.warning("%s did not announce its size: %s may be incomplete", job.url, job.part)
        if self.verify_md5 and expected.md5 is not None:
            if hasher is None:
                hasher = hashlib.md5(usedforsecurity=False)
                _hash_file(job.part, hasher, self.progress, f"{job.part.name} (MD5)")
            if hasher.hexdigest() != expected.md5.lower():
                _unlink(job.part, job.meta)
                raise DownloadError(
                    f"{job.url}: MD5 mismatch: got {hasher.hexdigest()}, expected {expected.md5}; "
                    "the file was deleted, run again to download it anew"
                )
        os.replace(job.part, job.final)
        _unlink(job.meta)
        return job.final

    @staticmethod
    def read_meta(job: _Job) -> dict[str, Any]:
        try:
            meta = json.loads(job.meta.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return meta if isinstance(meta, dict) else {}


# ----------------------------------------------------------------------------- installation
def _check_free_space(root: Path, jobs: Sequence[_Job]) -> None:
    """Fail before a long download when the disk cannot hold the archives and their extraction."""
    needed = 0
    for job in jobs:
        size = job.expected.size
        if size is None:
            continue
        if job.final.is_file():  # used as it is (or rejected): nothing more to download
            have = size
        else:
            have = job.part.stat().st_size if job.part.is_file() else 0
        needed += max(size - have, 0) + size  # the rest of the archive, then its extracted files
    free = shutil.disk_usage(root).free
    if needed > free:
        raise DownloadError(f"{root}: {_gb(free)} free; downloading and extracting need about {_gb(needed)}")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True  # exists under another user, or cannot tell: keep its folder
    return True


def _remove_stale_staging(root: Path) -> None:
    """Delete extraction folders left by a killed run (their process is gone): up to 10 GB each."""
    for folder in root.glob(f"{_STAGING_PREFIX}*"):
        match = re.match(rf"{re.escape(_STAGING_PREFIX)}(\d+)-", folder.name)
        if folder.is_dir() and match and not _process_alive(int(match[1])):
            log.info("Removing %s, left by an interrupted run", folder)
            shutil.rmtree(folder, ignore_errors=True)


def _install(root: Path, archives: Mapping[str, tuple[Path, bool]]) -> None:
    """Extract, index, then move the split folders into ``root``; ``root`` is untouched on failure."""
    _remove_stale_staging(root)
    staging = Path(tempfile.mkdtemp(prefix=f"{_STAGING_PREFIX}{os.getpid()}-", dir=root))
    try:
        for folder, (archive, downloaded_now) in archives.items():
            log.info("Extracting %s", archive)
            try:
                extract_archive(archive, staging)
            except _BadArchive:
                if downloaded_now:  # untrusted bytes we fetched: do not keep them around
                    archive.unlink(missing_ok=True)
                raise
            if not (staging / folder).is_dir():
                found = sorted(p.name for p in staging.iterdir())
                raise DownloadError(f"{archive}: no top-level '{folder}/' folder inside (found {found})")
            try:
                write_odgt_indexes(staging, folder)
            except StreetHazardsDataError as error:
                raise DownloadError(f"{archive}: the extracted files are incomplete: {error}") from None
        for folder in archives:
            if (root / folder).exists():
                raise DownloadError(f"{root / folder} appeared while extracting; not replacing it")
        for folder in archives:
            (staging / folder).rename(root / folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def download_streethazards(
    root: str | os.PathLike[str],
    train_url: str = DEFAULT_TRAIN_URL,
    test_url: str = DEFAULT_TEST_URL,
    expected: Mapping[str, Expected] | None = None,
    timeout: float = 10.0,
    keep_archives: bool = False,
    progress: bool = True,
    *,
    splits: Sequence[str] = ("train", "test"),
    verify_md5: bool = True,
    retries: int = 2,
) -> Path:
    """Download, verify, extract and index StreetHazards into ``root``; returns ``Path(root)``.

    ``splits``: archives to install, among 'train' (train + validation) and 'test'.
    ``expected``: per archive, the size and MD5 it must have. Unset entries default to the published
    values when the URL is the official one, else to nothing known (the size then comes from the
    server's ``Content-Length`` / ``Content-Range``, no MD5).
    ``timeout``: seconds to connect and for any single read to stall; no reconnection is tried when
    the server cannot be reached. ``retries``: how many interrupted transfers that made progress are
    resumed within this call. ``verify_md5=False`` skips the MD5 (minutes for 9 GB).
    Raises DownloadError with a one-line message.
    """
    root = Path(root)
    splits = list(dict.fromkeys(splits))
    unknown = [s for s in splits if s not in ARCHIVES]
    if unknown or not splits:
        raise DownloadError(f"unknown splits {unknown or splits}; expected some of {sorted(ARCHIVES)}")
    if timeout <= 0 or retries < 0:
        raise DownloadError(f"timeout must be > 0 and retries >= 0, got {timeout} and {retries}")
    if root.exists() and not root.is_dir():
        raise DownloadError(f"{root} exists and is not a folder")
    urls = {"train": train_url, "test": test_url}
    expected = dict(expected or {})

    downloads = root / DOWNLOADS_DIR
    jobs = []
    for split in splits:
        archive = ARCHIVES[split]
        if (root / archive.folder).exists():
            log.info("%s exists: not downloading %s", root / archive.folder, archive.file_name)
            continue
        default = archive.official if urls[split] == archive.url else Expected()
        jobs.append(_Job(archive, urls[split], expected.get(split, default), downloads))

    # Folders this call creates (ROOT and missing parents), removed again if they end up empty.
    created = [downloads] + [p for p in (root, *root.parents) if not p.exists()]
    try:
        if jobs:
            downloads.mkdir(parents=True, exist_ok=True)
            _check_free_space(root, jobs)
            downloader = _Downloader(root, jobs, timeout, verify_md5, progress, retries)
            archives = {job.archive.folder: (downloader.obtain(job), job.downloaded_now) for job in jobs}
            _install(root, archives)
            if not keep_archives:
                for path, _ in archives.values():
                    path.unlink(missing_ok=True)
    finally:
        # Leave no empty folder behind: ROOT looks as before unless something worth keeping is there.
        for folder in created:
            try:
                folder.rmdir()
            except OSError:
                pass  # absent, or not empty

    for split in splits:
        folder = root / ARCHIVES[split].folder
        if not folder.is_dir():
            raise DownloadError(f"{folder} exists but is not a folder")
        try:
            for index in write_odgt_indexes(root, ARCHIVES[split].folder):
                log.info("Wrote %s", index)
        except StreetHazardsDataError as error:
            raise DownloadError(str(error)) from None
    return root


# ----------------------------------------------------------------------------- command line
def download_main(argv: Sequence[str]) -> int:
    """``python main.py download --root DIR [...]``: see the module docstring. Returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="python main.py download",
        description="Download StreetHazards (train 9.4 GB, test 2.2 GB), check, extract and index it into "
        "ROOT. Interrupted downloads resume when run again. Offline: copy the archives into "
        "ROOT/.downloads/.",
    )
    parser.add_argument("--root", required=True, help="dataset folder; receives train/ and test/")
    parser.add_argument("--splits", nargs="+", choices=sorted(ARCHIVES), default=["train", "test"])
    parser.add_argument("--train_url", default=DEFAULT_TRAIN_URL)
    parser.add_argument("--test_url", default=DEFAULT_TEST_URL)
    parser.add_argument("--keep_archives", action="store_true", help="keep the .tar files in ROOT/.downloads")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds to connect / for a stalled read")
    parser.add_argument("--retries", type=int, default=2, help="resumes of a cut transfer within one run")
    parser.add_argument("--skip_md5", action="store_true", help="skip the MD5 check (minutes on 9 GB)")
    parser.add_argument("--no_progress", action="store_true", help="no progress bars")
    args = parser.parse_args(list(argv))
    if args.timeout <= 0:
        parser.error("--timeout must be > 0")
    if args.retries < 0:
        parser.error("--retries must be >= 0")
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")

    root = download_streethazards(
        args.root,
        train_url=args.train_url,
        test_url=args.test_url,
        timeout=args.timeout,
        keep_archives=args.keep_archives,
        progress=not args.no_progress,
        splits=args.splits,
        verify_md5=not args.skip_md5,
        retries=args.retries,
    )
    counts = []
    for name, layout in SPLITS.items():
        if layout.folder in args.splits and layout.index_path(root).is_file():
            counts.append(f"{name} {len(json.loads(layout.index_path(root).read_text(encoding='utf-8')))}")
    print(f"StreetHazards is ready in {root} ({', '.join(counts)} images); use it with --data.root {root}")
    return 0


def _module_main(argv: Sequence[str]) -> int:
    try:
        return download_main(argv)
    except (DownloadError, StreetHazardsDataError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(_module_main(sys.argv[1:]))
