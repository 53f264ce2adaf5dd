"""tests/chromium.py only locates chromium; a missing one fails naming scripts/setup."""

from __future__ import annotations

import shutil

import pytest

from tests import chromium


def test_missing_chromium_fails_naming_setup(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(pytest.fail.Exception, match="scripts/setup"):
        chromium.chromium()


def test_found_chromium_is_returned(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/bin/{name}")
    assert chromium.chromium() == "/usr/bin/chromium"
