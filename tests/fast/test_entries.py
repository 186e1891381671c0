"""The entry of an object: its states, the transitions allowed between them, and its lifetime."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import trio

from clearmlfs.fs.entries import Entries, Entry, IllegalTransition, State
from tests.fast.harness import ROOT, Client, run


def dirty_handle(entry: Entry) -> None:
    entry.handles.append(SimpleNamespace(dirty=True))  # type: ignore[arg-type]


def test_a_write_is_uploaded_then_clean() -> None:
    entry = Entry("s3://b/k")
    assert entry.state is State.CLEAN
    entry.dirtied()
    assert entry.state is State.DIRTY and entry.pending
    entry.begin_upload()
    assert entry.state is State.UPLOADING and entry.pending
    entry.end_upload(clean=True)
    assert entry.state is State.CLEAN and not entry.pending


def test_a_failed_upload_leaves_it_dirty() -> None:
    entry = Entry("s3://b/k")
    entry.dirtied()
    entry.begin_upload()
    entry.end_upload(clean=False)
    assert entry.state is State.DIRTY


def test_written_again_while_uploading_stays_dirty() -> None:
    entry = Entry("s3://b/k")
    entry.dirtied()
    entry.begin_upload()
    entry.dirtied()
    assert entry.state is State.UPLOADING
    entry.end_upload(clean=False)  # (the upload saw the version move)
    assert entry.state is State.DIRTY


def test_a_failed_write_is_never_uploaded_and_discarding_cleans_it() -> None:
    entry = Entry("s3://b/k")
    entry.dirtied()
    entry.failed()
    assert entry.state is State.FAILED and entry.pending
    with pytest.raises(IllegalTransition):
        entry.begin_upload()
    with pytest.raises(IllegalTransition):
        entry.dirtied()
    entry.discarded()
    assert entry.state is State.CLEAN


def test_a_fetch_is_fetching_until_it_ends() -> None:
    entry = Entry("s3://b/k")
    entry.begin_fetch()
    assert entry.state is State.FETCHING
    entry.check_publish()
    entry.end_fetch()
    assert entry.state is State.CLEAN


@pytest.mark.parametrize(
    "illegal",
    [
        pytest.param(lambda e: e.begin_upload(), id="upload-of-a-clean-entry"),
        pytest.param(lambda e: e.end_upload(True), id="end-of-an-upload-never-begun"),
        pytest.param(lambda e: e.end_fetch(), id="end-of-a-fetch-never-begun"),
    ],
)
def test_transitions_from_clean_that_are_bugs_raise(illegal: Callable[[Entry], Any]) -> None:
    with pytest.raises(IllegalTransition):
        illegal(Entry("s3://b/k"))


def test_two_uploads_at_once_raise() -> None:
    entry = Entry("s3://b/k")
    entry.dirtied()
    entry.begin_upload()
    with pytest.raises(IllegalTransition):
        entry.begin_upload()


@pytest.mark.parametrize("local", ["dirty", "writer", "failed"])
def test_a_fetched_copy_never_replaces_local_changes(local: str) -> None:
    entry = Entry("s3://b/k")
    if local == "dirty":
        entry.dirtied()
    elif local == "writer":
        entry.writers += 1
    else:
        entry.failed()
    entry.begin_fetch()  # a download may serve readers meanwhile...
    with pytest.raises(IllegalTransition):
        entry.check_publish()  # ...but never become the cache file


def test_an_unflushed_writer_keeps_it_dirty_after_another_upload() -> None:
    """Two handles wrote; the first one's upload took the entry clean: the second one's flush uploads again."""
    entry = Entry("s3://b/k")
    entry.dirtied()
    dirty_handle(entry)
    entry.begin_upload()
    entry.end_upload(clean=True)
    assert entry.state is State.DIRTY and not entry.pending
    entry.begin_upload()
    entry.end_upload(clean=True)


def test_entries_live_while_used_and_no_longer() -> None:
    entries = Entries()
    entry = entries.at("s3://b/k")
    entry.writers += 1
    entries.release(entry)
    assert entries.get("s3://b/k") is entry
    entry.writers -= 1
    entries.release(entry)
    assert entries.get("s3://b/k") is None and len(entries) == 0


def test_a_dirty_entry_outlives_its_handles() -> None:
    entries = Entries()
    entry = entries.at("s3://b/k")
    entry.dirtied()
    entries.release(entry)
    assert entries.pending("s3://b/k") and entries.pending_urls() == ["s3://b/k"]


def test_the_lock_keeps_its_entry_and_is_held_while_waited_for() -> None:
    async def main() -> None:
        entries = Entries()
        async with entries.lock("s3://b/k") as entry:
            assert entries.held("s3://b/k") and entries.get("s3://b/k") is entry
        assert not entries.held("s3://b/k") and len(entries) == 0

    trio.run(main)


def test_a_renamed_entry_answers_to_its_new_url() -> None:
    entries = Entries()
    entry = entries.at("s3://b/old")
    entry.dirtied()
    entries.move("s3://b/old", "s3://b/new")
    assert entries.get("s3://b/new") is entry and entry.url == "s3://b/new"
    assert entries.get("s3://b/old") is None


def test_names_found_missing_are_remembered_within_a_bound() -> None:
    entries = Entries()
    for i in range(10_005):
        entries.note_absent(f"s3://b/{i}")
    assert entries.absent_since("s3://b/0") is None
    assert entries.absent_since("s3://b/10004") is not None
    entries.found("s3://b/10004")
    assert entries.absent_since("s3://b/10004") is None


def test_through_the_filesystem_states_follow_a_write(tmp_path: Path) -> None:
    async def test(c: Client) -> None:
        url = f"{c.backend.url_prefix}/f.bin"
        fh = await c.open(f"{ROOT}/f.bin", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        entries = c.fs.writeback.entries
        assert entries.local_changes(url)
        await c.ops.write(fh, 0, b"data")
        entry = entries.get(url)
        assert entry is not None and entry.state is State.DIRTY and entry.busy
        await c.close(fh)
        assert entries.get(url) is None  # clean, closed: nothing left of it
        assert c.backend.data("f.bin") == b"data"

    run(test, tmp_path)
