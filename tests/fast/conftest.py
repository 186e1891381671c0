"""The fast tier: no server, no mount. The kernel's side of pyfuse3 is not there, so its notifications are
recorded instead of sent."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pyfuse3
import pytest


@pytest.fixture(autouse=True)
def no_kernel(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[str, Any]]]:
    sent: list[tuple[str, Any]] = []
    for name in ("invalidate_inode", "invalidate_entry", "invalidate_entry_async", "notify_store"):
        monkeypatch.setattr(pyfuse3, name, lambda *args, _name=name, **kw: sent.append((_name, args)))
    yield sent
