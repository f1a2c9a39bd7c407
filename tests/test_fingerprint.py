"""Fingerprints change on every kind of source change, and only then."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cachedload.fingerprint import RACY_WINDOW_NS, fingerprint_source, hash_file


def make_tree(root: Path) -> Path:
    (root / "a").mkdir(parents=True)
    (root / "b" / "deep").mkdir(parents=True)
    (root / "a" / "1.png").write_bytes(b"one")
    (root / "a" / "2.png").write_bytes(b"two!")
    (root / "b" / "deep" / "3.jpg").write_bytes(b"three")
    (root / "labels.csv").write_text("x,y\n")
    return root


def digest(root: Path, **options: object) -> str:
    return fingerprint_source(root, **options).digest  # type: ignore[arg-type]


def test_counts_files_bytes_and_newest_mtime(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "t")
    found = fingerprint_source(root)
    assert found.file_count == 4
    assert found.total_bytes == 3 + 4 + 5 + 4
    assert found.newest_mtime_ns == max(p.stat().st_mtime_ns for p in root.rglob("*"))
    assert [f[0] for f in found.files] == ["a/1.png", "a/2.png", "b/deep/3.jpg", "labels.csv"]


def test_same_tree_same_digest(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "t")
    assert digest(root) == digest(root)


@pytest.mark.parametrize(
    "change",
    ["add", "remove", "rename", "touch", "rewrite_size", "rewrite_same_size", "add_empty_dir_file"],
)
def test_every_kind_of_change_changes_the_digest(tmp_path: Path, change: str) -> None:
    root = make_tree(tmp_path / "t")
    before = digest(root)
    target = root / "a" / "1.png"
    info = target.stat()
    if change == "add":
        (root / "a" / "new.png").write_bytes(b"new")
    elif change == "remove":
        target.unlink()
    elif change == "rename":
        target.rename(root / "a" / "renamed.png")
    elif change == "touch":
        os.utime(target, ns=(info.st_atime_ns, info.st_mtime_ns + 1))
    elif change == "rewrite_size":
        target.write_bytes(b"longer content")
        os.utime(target, ns=(info.st_atime_ns, info.st_mtime_ns))
    elif change == "rewrite_same_size":
        target.write_bytes(b"ONE")
        os.utime(target, ns=(info.st_atime_ns, info.st_mtime_ns + 1000))
    elif change == "add_empty_dir_file":
        (root / "c").mkdir()
        (root / "c" / "empty.png").touch()
    assert digest(root) != before


def test_moving_a_file_between_folders_changes_the_digest(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "t")
    before = digest(root)
    (root / "a" / "1.png").rename(root / "b" / "1.png")
    assert digest(root) != before


def test_default_junk_is_ignored(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "t")
    before = fingerprint_source(root)
    (root / ".DS_Store").write_bytes(b"junk")
    (root / "a" / "Thumbs.db").write_bytes(b"junk")
    (root / "desktop.ini").write_bytes(b"junk")
    (root / "__pycache__").mkdir()
    (root / "__pycache__" / "x.pyc").write_bytes(b"junk")
    (root / ".ipynb_checkpoints").mkdir()
    (root / ".ipynb_checkpoints" / "n.ipynb").write_bytes(b"junk")
    after = fingerprint_source(root)
    assert after.digest == before.digest
    assert after.file_count == 4


def test_include_and_exclude_patterns(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "t")
    pngs = fingerprint_source(root, include=["*.png"])
    assert [f[0] for f in pngs.files] == ["a/1.png", "a/2.png"]
    (root / "labels.csv").write_text("changed, and not counted\n")
    assert fingerprint_source(root, include=["*.png"]).digest == pngs.digest
    no_b = fingerprint_source(root, exclude=["b"])
    assert [f[0] for f in no_b.files] == ["a/1.png", "a/2.png", "labels.csv"]
    by_path = fingerprint_source(root, exclude=["a/2.png"])
    assert "a/2.png" not in [f[0] for f in by_path.files]


def test_single_file_source(tmp_path: Path) -> None:
    csv = tmp_path / "labels.csv"
    csv.write_text("a,b\n")
    first = fingerprint_source(csv)
    assert first.file_count == 1
    info = csv.stat()
    os.utime(csv, ns=(info.st_atime_ns, info.st_mtime_ns + 5))
    assert fingerprint_source(csv).digest != first.digest


def test_symlinks_are_followed_and_cycles_end(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "t")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "x.png").write_bytes(b"x")
    (root / "linked").symlink_to(outside, target_is_directory=True)
    (root / "loop").symlink_to(root, target_is_directory=True)  # a cycle
    (root / "file_link.png").symlink_to(root / "a" / "1.png")
    found = fingerprint_source(root)
    names = [f[0] for f in found.files]
    assert "linked/x.png" in names
    assert "file_link.png" in names
    assert not any(name.startswith("loop/") for name in names)
    before = found.digest
    (outside / "x.png").write_bytes(b"changed through the link")
    assert fingerprint_source(root).digest != before


def test_dangling_symlink_is_skipped(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "t")
    before = digest(root)
    (root / "dangling.png").symlink_to(tmp_path / "nowhere.png")
    assert digest(root) == before


def test_content_mode_ignores_mtime_but_sees_bytes(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "t")
    before = digest(root, mode="content")
    target = root / "a" / "1.png"
    info = target.stat()
    os.utime(target, ns=(info.st_atime_ns, info.st_mtime_ns + 10**9))
    assert digest(root, mode="content") == before
    target.write_bytes(b"ONE")  # same size, new bytes
    assert digest(root, mode="content") != before
    assert digest(root, mode="content") != digest(root, mode="mtime")


def test_content_mode_keeps_each_files_digest(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "t")
    found = fingerprint_source(root, mode="content")
    assert sorted(found.contents) == [record[0] for record in found.files]
    assert found.contents["a/1.png"] == hash_file(root / "a" / "1.png")
    assert not fingerprint_source(root).contents  # mode "mtime" hashes no file


def test_content_mode_is_independent_of_location(tmp_path: Path) -> None:
    first = make_tree(tmp_path / "one")
    second = make_tree(tmp_path / "two")
    os.utime(second / "labels.csv", ns=(0, 123))
    assert digest(first, mode="content") == digest(second, mode="content")
    assert digest(first) != digest(second)


def test_missing_path_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        fingerprint_source(tmp_path / "missing")


def test_bad_mode_raises(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="mode"):
        fingerprint_source(tmp_path, mode="sha")


def test_racy_files_are_the_recently_modified_ones(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "t")
    old = root / "labels.csv"
    info = old.stat()
    os.utime(old, ns=(info.st_atime_ns, info.st_mtime_ns - 2 * RACY_WINDOW_NS))
    racy = fingerprint_source(root).racy_files()
    assert sorted(racy) == ["a/1.png", "a/2.png", "b/deep/3.jpg"]


def test_hash_file_small_and_chunked(tmp_path: Path) -> None:
    import xxhash

    small = tmp_path / "small"
    small.write_bytes(b"abc")
    assert hash_file(small) == xxhash.xxh3_128_hexdigest(b"abc")
    big = tmp_path / "big"
    data = os.urandom(8 * 1024 * 1024 + 12345)
    big.write_bytes(data)
    assert hash_file(big) == xxhash.xxh3_128_hexdigest(data)
