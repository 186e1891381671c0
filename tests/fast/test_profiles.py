"""Workload profiles (`-o profile=...`): what each one sets, that explicit options win, and what the training
profile saves: no request to revalidate a file or a folder already seen."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio

from clearmlfs.errors import ConfigError
from clearmlfs.mount import PROFILES, parse_options
from tests.fast.harness import ROOT, Client, run


def test_each_profile_is_a_set_of_known_options() -> None:
    for name, items in PROFILES.items():
        assert parse_options([f"profile={name}"]) == parse_options(list(items))


def test_an_explicit_option_wins_over_the_profile_wherever_it_is_given() -> None:
    assert parse_options(["ttl=5,profile=training"]).ttl == 5
    assert parse_options(["profile=training", "ttl=5"]).ttl == 5
    assert parse_options(["profile=training"]).ttl == 86400


def test_an_unknown_profile_is_a_config_error_naming_the_known_ones() -> None:
    with pytest.raises(ConfigError, match="training, checkpoint, serving"):
        parse_options(["profile=inference"])


def test_the_checkpoint_profile_sets_the_s3_part_size() -> None:
    assert parse_options(["profile=checkpoint"]).write_part_size == 64 * 1024 * 1024


def _reopen_and_relist(asks_again: bool) -> Callable[[Client], Awaitable[None]]:
    async def test(c: Client) -> None:
        c.backend.put("data/a.bin", b"a" * 10)
        assert await c.read(f"{ROOT}/data/a.bin") == b"a" * 10
        assert "a.bin" in await c.listdir(f"{ROOT}/data")
        before = len(c.backend.requests)
        await trio.sleep(0.1)  # past the default-profile mount's ttl and list_ttl below
        assert await c.read(f"{ROOT}/data/a.bin") == b"a" * 10
        assert "a.bin" in await c.listdir(f"{ROOT}/data")
        asked = c.backend.requests[before:]
        assert bool(asked) == asks_again, asked

    return test


def test_without_a_profile_an_open_and_a_listing_past_their_ttl_ask_the_server(tmp_path: Path) -> None:
    run(_reopen_and_relist(asks_again=True), tmp_path, "ttl=0.05,list_ttl=0.05")


def test_the_training_profile_asks_the_server_nothing_again(tmp_path: Path) -> None:
    run(_reopen_and_relist(asks_again=False), tmp_path, "profile=training")
