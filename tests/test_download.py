"""``python main.py download``: resumable HTTP download, checks, safe extraction, indexing, offline use.

Every test talks to a local HTTP server on 127.0.0.1 (a thread, stopped at the end of the test) that
serves tars of a small synthetic dataset in the released layout, without the ``.odgt`` files.
"""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import os
import re
import shutil
import socket
import tarfile
import threading
import time
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from datamodules.download import DownloadError, Expected, download_main, download_streethazards
from datamodules.streethazards import list_split
from datamodules.synthetic import write_synthetic_streethazards

NAMES = {"train": "streethazards_train.tar", "test": "streethazards_test.tar"}
COUNTS = {"train": 3, "val": 2, "test": 2}
INDEXES = ("train/train.odgt", "train/validation.odgt", "test/test.odgt")


# ----------------------------------------------------------------------------- data
@dataclass(frozen=True)
class Release:
    source: Path  # the dataset the tars were made from (with its .odgt files)
    tars: dict[str, bytes]  # split -> tar bytes, without the .odgt files

    def expected(self, **overrides: Expected) -> dict[str, Expected]:
        exact = {s: Expected(len(b), hashlib.md5(b).hexdigest()) for s, b in self.tars.items()}
        return {**exact, **overrides}


def _tar_folder(folder: Path, arcname: str, keep_odgt: bool = False) -> bytes:
    buffer = io.BytesIO()

    def skip_indexes(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        return info if keep_odgt or not info.name.endswith(".odgt") else None

    with tarfile.open(fileobj=buffer, mode="w") as tar:
        tar.add(folder, arcname=arcname, filter=skip_indexes)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> Release:
    source = tmp_path_factory.mktemp("release") / "streethazards"
    write_synthetic_streethazards(source, COUNTS["train"], COUNTS["val"], COUNTS["test"], image_size=(64, 96))
    return Release(source, {split: _tar_folder(source / split, split) for split in NAMES})


def snapshot(path: Path) -> dict[str, object]:
    """Everything under ``path`` (hidden entries too): file bytes, 'dir', or the target of a link."""
    if not path.exists():
        return {}
    entries: dict[str, object] = {}
    for entry in sorted(path.rglob("*")):
        key = entry.relative_to(path).as_posix()
        if entry.is_symlink():
            entries[key] = f"link -> {entry.readlink()}"
        elif entry.is_dir():
            entries[key] = "dir"
        else:
            entries[key] = entry.read_bytes()
    return entries


def dataset_files(root: Path) -> dict[str, bytes]:
    """The image and annotation files of a dataset, by path relative to ``root``."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*.png")}


def assert_installed(root: Path, release: Release, splits: tuple[str, ...] = ("train", "test")) -> None:
    """Files identical to the source, indexes written, equal to the writer's and loadable."""
    installed = dataset_files(root)
    wanted = {k: v for k, v in dataset_files(release.source).items() if k.split("/")[0] in splits}
    assert installed == wanted
    for index in INDEXES:
        if index.split("/")[0] not in splits:
            continue
        ours = json.loads((root / index).read_text())
        reference = json.loads((release.source / index).read_text())
        key = lambda r: r["fpath_img"]  # noqa: E731
        assert sorted(ours, key=key) == sorted(reference, key=key)
    for split, count in COUNTS.items():
        if ("test" if split == "test" else "train") in splits:
            samples = list_split(root, split)
            assert len(samples) == count
            assert all(s.image.is_file() and s.annotation.is_file() for s in samples)


# ----------------------------------------------------------------------------- local HTTP server
@dataclass
class ServerState:
    files: dict[str, bytes]
    requests: list[dict[str, str | None]] = field(default_factory=list)
    status: int | None = None  # answer every request with this error status
    ignore_range: bool = False  # always answer 200 with the whole file
    cut_after: dict[str, int] = field(default_factory=dict)  # path -> bytes sent once, then hang up
    announce_length: bool = True  # False: no Content-Length, the body ends when the connection closes
    stall: float = 0.0  # seconds to stay silent after a cut, before hanging up

    def etag(self, path: str) -> str:
        return '"' + hashlib.md5(self.files[path]).hexdigest() + '"'


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"  # one request per connection; the end of a body is the hang-up

    def log_message(self, format: str, *args: object) -> None:  # keep pytest output clean
        pass

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        state: ServerState = self.server.state  # type: ignore[attr-defined]
        path = self.path.lstrip("/")
        if_range = self.headers["If-Range"]
        state.requests.append({"path": path, "range": self.headers["Range"], "if_range": if_range})
        if state.status is not None:
            self.send_error(state.status)
            return
        if path not in state.files:
            self.send_error(404)
            return
        body, etag = state.files[path], state.etag(path)
        start = 0
        match = re.fullmatch(r"bytes=(\d+)-", self.headers["Range"] or "")
        if match and not state.ignore_range and (if_range is None or if_range == etag):
            start = int(match[1])
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        if state.announce_length:
            self.send_header("Content-Length", str(len(body) - start))
        self.send_header("ETag", etag)
        self.end_headers()
        if path in state.cut_after:
            self.wfile.write(body[start : start + state.cut_after.pop(path)])
            time.sleep(state.stall)
            return  # HTTP/1.0: the connection closes, before Content-Length bytes
        self.wfile.write(body[start:])


@dataclass
class LocalServer:
    state: ServerState
    port: int

    def url(self, split: str) -> str:
        return f"http://127.0.0.1:{self.port}/{NAMES[split]}"

    def urls(self) -> dict[str, str]:
        return {"train_url": self.url("train"), "test_url": self.url("test")}

    def requests_for(self, split: str) -> list[dict[str, str | None]]:
        return [r for r in self.state.requests if r["path"] == NAMES[split]]


@pytest.fixture
def server(release: Release) -> Iterator[LocalServer]:
    state = ServerState({NAMES[s]: data for s, data in release.tars.items()})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    httpd.state = state  # type: ignore[attr-defined]
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield LocalServer(state, httpd.server_address[1])
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    """A proxy from the environment must not intercept the requests to 127.0.0.1."""
    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)


@pytest.fixture
def closed_url() -> Iterator[Callable[[str], str]]:
    """URLs on a local port where nothing listens (connections are refused at once)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    yield lambda split: f"http://127.0.0.1:{port}/{NAMES[split]}"


def _disk(free: int) -> types.SimpleNamespace:
    return types.SimpleNamespace(total=10**15, used=10**15 - free, free=free)


def _download(root: Path, server: LocalServer, **kwargs: object) -> Path:
    kwargs = {"progress": False, "timeout": 5.0, **server.urls(), **kwargs}
    return download_streethazards(root, **kwargs)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- normal use
@pytest.mark.parametrize("keep_archives", [False, True])
def test_download_installs_and_indexes_the_release(
    tmp_path: Path, release: Release, server: LocalServer, keep_archives: bool
) -> None:
    root = tmp_path / "data" / "streethazards"
    returned = _download(root, server, expected=release.expected(), keep_archives=keep_archives)
    assert returned == root
    assert_installed(root, release)
    for split in NAMES:
        assert [r["range"] for r in server.requests_for(split)] == [None]  # one plain request each
    top = {p.name for p in root.iterdir()}
    if keep_archives:
        assert top == {"train", "test", ".downloads"}
        assert snapshot(root / ".downloads") == {NAMES[s]: release.tars[s] for s in NAMES}
    else:
        assert top == {"train", "test"}  # no archives, parts or extraction folders left


def test_existing_splits_are_kept_and_a_second_run_needs_no_network(
    tmp_path: Path, release: Release, server: LocalServer
) -> None:
    root = tmp_path / "root"
    _download(root, server, splits=["test"])  # custom URL: size from Content-Length, no MD5
    assert_installed(root, release, splits=("test",))
    assert not (root / "train").exists()
    before = snapshot(root / "test")
    _download(root, server, splits=["train", "test"])
    assert snapshot(root / "test") == before
    assert_installed(root, release)
    requests = len(server.state.requests)
    _download(root, server)  # everything present: no request at all
    assert len(server.state.requests) == requests


def test_stale_extraction_folders_removed(tmp_path: Path, release: Release, server: LocalServer) -> None:
    root = tmp_path / "root"
    stale = root / ".extract-tmp-999999999-abc" / "train"  # no such process
    alive = root / f".extract-tmp-{os.getpid()}-abc" / "train"  # a running process: not touched
    for folder in (stale, alive):
        folder.mkdir(parents=True)
        (folder / "half-written.bin").write_bytes(b"...")
    _download(root, server)
    assert_installed(root, release)
    assert sorted(p.name for p in root.iterdir()) == [alive.parent.name, "test", "train"]


def test_command_line(
    tmp_path: Path, release: Release, server: LocalServer, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "root"
    argv = ["--root", str(root), "--train_url", server.url("train"), "--test_url", server.url("test")]
    assert download_main([*argv, "--splits", "test", "--timeout", "5", "--keep_archives"]) == 0
    out, err = capsys.readouterr()
    assert f"ready in {root}" in out and "test 2 images" in out
    assert "streethazards_test.tar" in err  # the progress bar
    assert (root / ".downloads" / NAMES["test"]).read_bytes() == release.tars["test"]
    assert download_main([*argv, "--skip_md5", "--no_progress"]) == 0
    assert_installed(root, release)
    assert "train 3" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        download_main(["--train_url", server.url("train")])  # --root is required


# ----------------------------------------------------------------------------- resuming
def test_cut_transfer_resumes_with_a_range_request_on_the_next_call(
    tmp_path: Path, release: Release, server: LocalServer
) -> None:
    root = tmp_path / "root"
    size = len(release.tars["train"])
    cut = size // 2
    server.state.cut_after[NAMES["train"]] = cut
    with pytest.raises(DownloadError, match=r"interrupted after .* bytes") as error:
        _download(root, server, expected=release.expected(), retries=0)
    assert server.url("train") in str(error.value) and "run the command again to resume" in str(error.value)
    part = root / ".downloads" / (NAMES["train"] + ".part")
    assert part.read_bytes() == release.tars["train"][:cut]
    assert not (root / "train").exists() and not (root / "test").exists()

    _download(root, server, expected=release.expected(), retries=0)  # MD5 covers the resumed bytes too
    first, second = server.requests_for("train")
    assert first["range"] is None
    assert second["range"] == f"bytes={cut}-"
    assert second["if_range"] == server.state.etag(NAMES["train"])
    assert_installed(root, release)
    assert sorted(p.name for p in root.iterdir()) == ["test", "train"]


def test_cut_transfer_resumes_in_one_call(tmp_path: Path, release: Release, server: LocalServer) -> None:
    root = tmp_path / "root"
    cut = len(release.tars["test"]) // 3
    server.state.cut_after[NAMES["test"]] = cut
    _download(root, server, expected=release.expected(), keep_archives=True)
    assert [r["range"] for r in server.requests_for("test")] == [None, f"bytes={cut}-"]
    assert (root / ".downloads" / NAMES["test"]).read_bytes() == release.tars["test"]
    assert_installed(root, release)


def test_stalled_transfer_resumes(tmp_path: Path, release: Release, server: LocalServer) -> None:
    root = tmp_path / "root"
    cut = len(release.tars["train"]) // 4
    server.state.cut_after[NAMES["train"]] = cut
    server.state.stall = 2.0  # the connection stays open but silent
    start = time.perf_counter()
    _download(root, server, expected=release.expected(), timeout=0.3)
    assert time.perf_counter() - start < 1.5  # the stalled read was abandoned after the timeout
    assert [r["range"] for r in server.requests_for("train")] == [None, f"bytes={cut}-"]
    assert_installed(root, release)


def test_range_ignored_restarts_at_zero(tmp_path: Path, release: Release, server: LocalServer) -> None:
    root = tmp_path / "root"
    cut = len(release.tars["train"]) // 2
    server.state.cut_after[NAMES["train"]] = cut
    with pytest.raises(DownloadError, match="interrupted"):
        _download(root, server, retries=0)
    part = root / ".downloads" / (NAMES["train"] + ".part")
    part.write_bytes(b"x" * cut)  # were these bytes appended to, the archive would be corrupt
    server.state.ignore_range = True
    _download(root, server, expected=release.expected(), keep_archives=True)
    assert server.requests_for("train")[-1]["range"] == f"bytes={cut}-"  # asked, got 200
    assert (root / ".downloads" / NAMES["train"]).read_bytes() == release.tars["train"]
    assert_installed(root, release)


def test_changed_server_file_refetched(tmp_path: Path, release: Release, server: LocalServer) -> None:
    root = tmp_path / "root"
    server.state.cut_after[NAMES["train"]] = len(release.tars["train"]) // 2
    with pytest.raises(DownloadError, match="interrupted"):
        _download(root, server, retries=0)
    changed = _tar_folder(release.source / "train", "train", keep_odgt=True)  # another valid archive
    server.state.files[NAMES["train"]] = changed
    _download(root, server, keep_archives=True)
    # If-Range carried the old ETag, so the server sent the new file whole instead of its tail.
    if_range = server.requests_for("train")[-1]["if_range"]
    assert if_range is not None and if_range != server.state.etag(NAMES["train"])
    assert (root / ".downloads" / NAMES["train"]).read_bytes() == changed
    assert_installed(root, release)


# ----------------------------------------------------------------------------- failures leave ROOT unchanged
@pytest.fixture
def existing_root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    root.mkdir()
    (root / "notes.txt").write_text("the user's own file")
    return root


@pytest.mark.parametrize("status", [404, 500])
def test_http_error_names_the_url_and_changes_nothing(
    tmp_path: Path, existing_root: Path, server: LocalServer, status: int
) -> None:
    server.state.status = status
    for root in (existing_root, tmp_path / "absent"):
        before = snapshot(tmp_path)
        with pytest.raises(DownloadError, match=f"HTTP error {status}") as error:
            _download(root, server)
        assert server.url("train") in str(error.value) and "\n" not in str(error.value)
        assert snapshot(tmp_path) == before


def test_size_mismatch_announced_by_the_server(
    tmp_path: Path, existing_root: Path, release: Release, server: LocalServer
) -> None:
    size = len(release.tars["train"])
    before = snapshot(tmp_path)
    with pytest.raises(DownloadError, match=f"size mismatch.*{size:,} bytes, expected {size + 1:,}") as error:
        _download(existing_root, server, expected=release.expected(train=Expected(size + 1)))
    assert server.url("train") in str(error.value)
    assert snapshot(tmp_path) == before


def test_size_mismatch_found_while_receiving(
    tmp_path: Path, existing_root: Path, release: Release, server: LocalServer
) -> None:
    server.state.announce_length = False  # the client learns the size only by reading the body
    size = len(release.tars["test"])
    before = snapshot(tmp_path)
    pattern = f"{re.escape(server.url('test'))}: size mismatch.*{size - 100:,}"
    with pytest.raises(DownloadError, match=pattern):
        _download(existing_root, server, splits=["test"], expected={"test": Expected(size - 100)})
    assert snapshot(tmp_path) == before
    # With the right size, a body without Content-Length is fine.
    _download(existing_root, server, splits=["test"], expected={"test": Expected(size)})
    assert_installed(existing_root, release, splits=("test",))


def test_md5_mismatch_deletes_the_download_and_can_be_skipped(
    tmp_path: Path, existing_root: Path, release: Release, server: LocalServer
) -> None:
    wrong = release.expected(test=Expected(len(release.tars["test"]), "0" * 32))
    before = snapshot(tmp_path)
    with pytest.raises(DownloadError, match="MD5 mismatch") as error:
        _download(existing_root, server, expected=wrong)
    message = str(error.value)
    assert server.url("test") in message and hashlib.md5(release.tars["test"]).hexdigest() in message
    # The bad test archive is gone and nothing is extracted; the verified train archive is kept so
    # that it is not fetched again.
    kept = {".downloads": "dir", f".downloads/{NAMES['train']}": release.tars["train"]}
    assert snapshot(tmp_path) == {**before, **{f"root/{k}": v for k, v in kept.items()}}
    requests = len(server.state.requests)
    _download(existing_root, server, expected=wrong, verify_md5=False)
    assert len(server.state.requests) == requests + 1  # the test archive only
    assert_installed(existing_root, release)
    assert sorted(p.name for p in existing_root.iterdir()) == ["notes.txt", "test", "train"]


def test_md5_mismatch_of_the_first_archive_changes_nothing(
    tmp_path: Path, existing_root: Path, release: Release, server: LocalServer
) -> None:
    before = snapshot(tmp_path)
    with pytest.raises(DownloadError, match=f"{re.escape(server.url('train'))}: MD5 mismatch"):
        _download(existing_root, server, expected=release.expected(train=Expected(None, "f" * 32)))
    assert snapshot(tmp_path) == before


def test_not_enough_disk_space_fails_before_downloading(
    tmp_path: Path,
    existing_root: Path,
    release: Release,
    server: LocalServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(shutil, "disk_usage", lambda path: _disk(free=1000))
    before = snapshot(tmp_path)
    with pytest.raises(DownloadError, match="1,000 bytes free"):
        _download(existing_root, server, expected=release.expected())
    assert server.state.requests == []
    assert snapshot(tmp_path) == before


# ----------------------------------------------------------------------------- unsafe archives
def _with_member(base: bytes, member: tarfile.TarInfo, data: bytes = b"") -> bytes:
    """``base`` (a valid train archive) followed by one more member, so extraction is under way."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=io.BytesIO(base)) as source, tarfile.open(fileobj=buffer, mode="w") as tar:
        for info in source:
            tar.addfile(info, source.extractfile(info) if info.isreg() else None)
        data = data if member.isreg() else b""  # links and devices carry no data
        member.size = len(data)
        tar.addfile(member, io.BytesIO(data) if data else None)
    return buffer.getvalue()


def _unsafe_member(kind: str, tmp_path: Path) -> tuple[tarfile.TarInfo, str]:
    """A bad member and the reason the error must give."""
    if kind == "parent":
        return tarfile.TarInfo("../../evil.txt"), "'..' path component"
    if kind == "nested parent":
        return tarfile.TarInfo("train/images/../../../../evil.txt"), "'..' path component"
    if kind == "absolute":
        return tarfile.TarInfo(str(tmp_path / "absolute-evil.txt")), "absolute path"
    member = tarfile.TarInfo("train/images/evil")
    if kind == "symlink":
        member.type, member.linkname = tarfile.SYMTYPE, "../../../outside"
        return member, "symbolic link to '../../../outside'"
    if kind == "inner symlink":  # pointing inside is refused too: no links at all
        member.type, member.linkname = tarfile.SYMTYPE, "training"
        return member, "symbolic link"
    if kind == "hardlink":
        member.type, member.linkname = tarfile.LNKTYPE, "train/images"
        return member, "hard link"
    member.type, member.devmajor, member.devminor = tarfile.CHRTYPE, 1, 3
    return member, "device file"


@pytest.mark.parametrize(
    "kind", ["parent", "nested parent", "absolute", "symlink", "inner symlink", "hardlink", "device"]
)
def test_unsafe_members_are_refused_and_nothing_is_written(
    tmp_path: Path, existing_root: Path, release: Release, server: LocalServer, kind: str
) -> None:
    member, reason = _unsafe_member(kind, tmp_path)
    server.state.files[NAMES["train"]] = _with_member(release.tars["train"], member, b"evil")
    before = snapshot(tmp_path)
    with pytest.raises(DownloadError, match="refusing unsafe member") as error:
        _download(existing_root, server, splits=["train"])
    assert f"'{member.name}'" in str(error.value) and reason in str(error.value)
    assert snapshot(tmp_path) == before  # nothing outside ROOT, ROOT as it was, the bad download deleted
    assert not list(tmp_path.parent.glob("*evil*"))


def test_unsafe_archive_placed_by_hand_is_reported_and_kept(
    existing_root: Path, release: Release, closed_url: Callable[[str], str]
) -> None:
    bad = _with_member(release.tars["test"], tarfile.TarInfo("../evil.txt"), b"evil")
    placed = existing_root / ".downloads" / NAMES["test"]
    placed.parent.mkdir()
    placed.write_bytes(bad)
    with pytest.raises(DownloadError, match=r"refusing unsafe member '\.\./evil\.txt'"):
        download_streethazards(existing_root, test_url=closed_url("test"), splits=["test"], progress=False)
    assert placed.read_bytes() == bad  # the user's file: reported, not deleted
    assert sorted(p.name for p in existing_root.iterdir()) == [".downloads", "notes.txt"]


# ----------------------------------------------------------------------------- offline
def test_offline_fails_fast_and_says_where_to_put_the_archives(
    tmp_path: Path, closed_url: Callable[[str], str]
) -> None:
    root = tmp_path / "missing" / "root"
    start = time.perf_counter()
    with pytest.raises(DownloadError) as error:
        download_streethazards(root, closed_url("train"), closed_url("test"), progress=False)
    assert time.perf_counter() - start < 5
    message = str(error.value)
    assert f"cannot reach {closed_url('train')}" in message
    assert "download streethazards_train.tar and streethazards_test.tar from " in message
    assert f"place them in {root / '.downloads'}/" in message
    assert f"so that {root / 'train'} and {root / 'test'} exist" in message
    assert not (tmp_path / "missing").exists()  # the folders it made for ROOT are gone again


@pytest.mark.parametrize("known", [True, False])
def test_archives_placed_by_hand_install_without_network(
    tmp_path: Path, release: Release, closed_url: Callable[[str], str], known: bool
) -> None:
    root = tmp_path / "root"
    (root / ".downloads").mkdir(parents=True)
    for split, name in NAMES.items():
        (root / ".downloads" / name).write_bytes(release.tars[split])
    expected = release.expected() if known else None  # unknown: used as they are
    download_streethazards(root, closed_url("train"), closed_url("test"), expected=expected, progress=False)
    assert_installed(root, release)
    assert sorted(p.name for p in root.iterdir()) == ["test", "train"]


def test_archive_placed_by_hand_with_the_wrong_size_is_reported(
    tmp_path: Path, release: Release, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The official URLs imply the published sizes; a truncated copy is refused before any network use."""
    monkeypatch.setattr(shutil, "disk_usage", lambda path: _disk(free=10**14))  # 9.4 GB "needed" to extract
    root = tmp_path / "root"
    placed = root / ".downloads" / NAMES["train"]
    placed.parent.mkdir(parents=True)
    placed.write_bytes(release.tars["train"])
    with pytest.raises(DownloadError, match=r"has [\d,]+ bytes but the archive has 9,386,226,176") as error:
        download_streethazards(root, splits=["train"], progress=False)
    assert str(placed) in str(error.value)
    assert placed.read_bytes() == release.tars["train"]


def test_folders_extracted_by_hand_get_their_indexes_offline(
    tmp_path: Path, release: Release, closed_url: Callable[[str], str]
) -> None:
    root = tmp_path / "root"
    root.mkdir()
    for split in NAMES:
        with tarfile.open(fileobj=io.BytesIO(release.tars[split])) as tar:
            tar.extractall(root, filter="data")
    assert not any((root / index).exists() for index in INDEXES)
    download_streethazards(root, closed_url("train"), closed_url("test"), progress=False)
    assert_installed(root, release)
