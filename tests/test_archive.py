"""Archives unpack completely when honest, and never outside their folder when not."""

from __future__ import annotations

import io
import logging
import os
import stat
import tarfile
import zipfile
from pathlib import Path
from typing import Literal

import pytest

from clearmlfs import archive as archive_mod
from clearmlfs.archive import archive_suffix, extract_archive, extract_once
from clearmlfs.errors import StorageError

FILES = {"top.txt": b"top", "a/b/deep.bin": b"\x00\x01" * 1000, "a/mid.txt": b"mid"}


def _tree(root: Path, exclude: Path | None = None) -> set[str]:
    """Every path under `root` (links not followed), except those under `exclude`."""
    found = set()
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            if exclude is None or not path.is_relative_to(exclude):
                found.add(str(path.relative_to(root)))
    return found


def _make_zip(path: Path, entries: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries.items():
            zf.writestr(zipfile.ZipInfo(name), data)
    return path


def _tar_file(name: str, data: bytes) -> tuple[tarfile.TarInfo, io.BytesIO]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, io.BytesIO(data)


def _tar_link(name: str, kind: bytes, linkname: str) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info, None


def _make_tar(
    path: Path, members: list[tuple[tarfile.TarInfo, io.BytesIO | None]], mode: Literal["w", "w:gz"] = "w"
) -> Path:
    with tarfile.open(path, mode) as tar:
        for info, data in members:
            tar.addfile(info, data)
    return path


def _assert_extracted(target: Path) -> None:
    for name, data in FILES.items():
        assert (target / name).read_bytes() == data
    assert _tree(target) == set(FILES) | {"a", "a/b"}


@pytest.mark.parametrize(
    ("name", "suffix"),
    [
        ("data.zip", ".zip"),
        ("DATA.ZIP", ".zip"),
        ("x.tar", ".tar"),
        ("x.Tar.Gz", ".tar.gz"),
        ("x.TGZ", ".tgz"),
        ("model.pt", None),
        ("x.gz", None),
        ("zip", None),
        ("x.tar.bz2", None),
    ],
)
def test_archive_suffix_recognises_the_archives_we_extract(name: str, suffix: str | None) -> None:
    assert archive_suffix(name) == suffix


@pytest.mark.parametrize(("filename", "mode"), [("d.tar", "w"), ("d.tar.gz", "w:gz"), ("d.tgz", "w:gz")])
def test_tar_archives_round_trip_with_nested_folders(
    tmp_path: Path, filename: str, mode: Literal["w", "w:gz"]
) -> None:
    src = _make_tar(tmp_path / filename, [_tar_file(n, d) for n, d in FILES.items()], mode)
    extract_archive(src, tmp_path / "out")
    _assert_extracted(tmp_path / "out")


def test_zip_round_trips_with_nested_folders(tmp_path: Path) -> None:
    src = _make_zip(tmp_path / "d.zip", {"a/": b"", **FILES})
    extract_archive(src, tmp_path / "out")
    _assert_extracted(tmp_path / "out")


def test_extracted_files_and_folders_are_private(tmp_path: Path) -> None:
    src = _make_tar(tmp_path / "d.tgz", [_tar_file(n, d) for n, d in FILES.items()], "w:gz")
    target = tmp_path / "cache" / "out"
    extract_archive(src, target)
    assert stat.S_IMODE(target.stat().st_mode) == 0o700
    for path in target.rglob("*"):
        expected = 0o700 if path.is_dir() else 0o600
        assert stat.S_IMODE(path.stat().st_mode) == expected, path


def test_zip_entries_leaving_the_target_are_skipped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    outside = tmp_path / "abs" / "evil"
    src = _make_zip(
        tmp_path / "bad.zip",
        {
            "../evil": b"x",
            "ok/../../evil": b"x",
            str(outside): b"x",
            "..\\evil": b"x",
            "C:/evil": b"x",
            "good.txt": b"good",
        },
    )
    target = tmp_path / "out"
    before = _tree(tmp_path)
    with caplog.at_level(logging.WARNING, logger="clearmlfs.archive"):
        extract_archive(src, target)
    assert _tree(tmp_path, exclude=target) == before
    assert not outside.exists()
    assert _tree(target) == {"good.txt"}
    assert "'../evil'" in caplog.text and repr(str(outside)) in caplog.text


def test_zip_symlink_entries_are_not_created(tmp_path: Path) -> None:
    link = zipfile.ZipInfo("link")
    link.create_system = 3
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    with zipfile.ZipFile(tmp_path / "l.zip", "w") as zf:
        zf.writestr(link, "/etc/passwd")
        zf.writestr("file.txt", b"f")
    extract_archive(tmp_path / "l.zip", tmp_path / "out")
    assert _tree(tmp_path / "out") == {"file.txt"}


def test_tar_attacks_create_nothing_outside_the_target_and_no_links(tmp_path: Path) -> None:
    outside = tmp_path / "abs" / "evil"
    src = _make_tar(
        tmp_path / "bad.tar",
        [
            _tar_file("../evil", b"x"),
            _tar_file(str(outside), b"x"),
            # Classic attack: a symlink to a folder outside, then a file written "through" it.
            _tar_link("escape", tarfile.SYMTYPE, str(tmp_path)),
            _tar_file("escape/evil", b"x"),
            _tar_link("passwd", tarfile.LNKTYPE, "/etc/passwd"),
            _tar_link("fifo", tarfile.FIFOTYPE, ""),
            _tar_file("good.txt", b"good"),
        ],
    )
    target = tmp_path / "out"
    before = _tree(tmp_path)
    extract_archive(src, target)
    assert _tree(tmp_path, exclude=target) == before
    assert not (tmp_path / "evil").exists() and not outside.exists()
    # The file behind the skipped symlink lands harmlessly inside, as a plain folder and file.
    assert _tree(target) == {"good.txt", "escape", "escape/evil"}
    assert not any(p.is_symlink() for p in target.rglob("*"))
    passwd = os.stat("/etc/passwd")
    assert all(
        (p.stat().st_dev, p.stat().st_ino) != (passwd.st_dev, passwd.st_ino) for p in target.rglob("*")
    )


@pytest.mark.parametrize("filename", ["broken.zip", "broken.tar.gz", "broken.tgz", "broken.tar"])
def test_a_corrupt_archive_raises_storage_error_naming_it(tmp_path: Path, filename: str) -> None:
    src = tmp_path / filename
    src.write_bytes(b"this is not an archive at all" * 100)
    with pytest.raises(StorageError, match=filename):
        extract_archive(src, tmp_path / "out")


def test_a_truncated_tgz_raises_storage_error(tmp_path: Path) -> None:
    src = _make_tar(tmp_path / "t.tgz", [_tar_file("big", os.urandom(200_000))], "w:gz")
    src.write_bytes(src.read_bytes()[:50_000])
    with pytest.raises(StorageError, match="t.tgz"):
        extract_archive(src, tmp_path / "out")


def test_a_zip_with_damaged_content_raises_storage_error(tmp_path: Path) -> None:
    with zipfile.ZipFile(tmp_path / "c.zip", "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("f.txt", b"A" * 1000)
    raw = (tmp_path / "c.zip").read_bytes().replace(b"A" * 10, b"B" * 10, 1)
    (tmp_path / "c.zip").write_bytes(raw)
    with pytest.raises(StorageError, match="c.zip"):
        extract_archive(tmp_path / "c.zip", tmp_path / "out")


@pytest.mark.parametrize("filename", ["bomb.zip", "bomb.tgz"])
def test_archives_declaring_more_than_max_bytes_are_refused(tmp_path: Path, filename: str) -> None:
    entries = {"a": b"\0" * 600, "b": b"\0" * 600}
    if filename.endswith(".zip"):
        src = _make_zip(tmp_path / filename, entries)
    else:
        src = _make_tar(tmp_path / filename, [_tar_file(n, d) for n, d in entries.items()], "w:gz")
    with pytest.raises(StorageError, match=filename):
        extract_archive(src, tmp_path / "out", max_bytes=1000)
    extract_archive(src, tmp_path / "ok", max_bytes=1200)


def test_extract_once_reuses_the_folder_on_the_second_call(tmp_path: Path) -> None:
    src = _make_zip(tmp_path / "d.zip", FILES)
    target = tmp_path / "d_artifacts_archive"
    assert extract_once(src, target) == target
    _assert_extracted(target)
    (target / "sentinel").write_text("still here")
    (target / "top.txt").write_bytes(b"changed")
    os.utime(target, (0, 0))

    assert extract_once(src, target) == target
    assert (target / "sentinel").read_text() == "still here"
    assert (target / "top.txt").read_bytes() == b"changed"
    assert target.stat().st_mtime > 0  # touched, so the cache cleanup sees it as recently used
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.zip", "d_artifacts_archive"]


def test_extract_once_keeps_the_winners_folder_when_it_loses_the_race(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = _make_zip(tmp_path / "d.zip", FILES)
    target = tmp_path / "out"
    real_extract = archive_mod.extract_archive

    def extract_while_another_process_finishes(archive: Path, temp: Path, **kwargs: object) -> None:
        real_extract(archive, temp)
        target.mkdir()
        (target / "winner").write_text("first")

    monkeypatch.setattr(archive_mod, "extract_archive", extract_while_another_process_finishes)
    assert extract_once(src, target) == target
    assert (target / "winner").read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.zip", "out"]


def test_extract_once_leaves_nothing_behind_when_the_archive_is_corrupt(tmp_path: Path) -> None:
    src = tmp_path / "bad.zip"
    src.write_bytes(b"garbage")
    with pytest.raises(StorageError, match="bad.zip"):
        extract_once(src, tmp_path / "out")
    assert [p.name for p in tmp_path.iterdir()] == ["bad.zip"]


def test_entries_under_a_symlink_already_in_the_target_are_skipped(tmp_path: Path) -> None:
    target = tmp_path / "out"
    target.mkdir()
    (target / "link").symlink_to(tmp_path)
    src = _make_zip(tmp_path / "d.zip", {"link/evil": b"x", "good.txt": b"good"})
    extract_archive(src, target)
    assert not (tmp_path / "evil").exists()
    assert (target / "good.txt").read_bytes() == b"good"
