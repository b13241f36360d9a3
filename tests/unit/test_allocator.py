"""fashion_search.allocator: glibc's thresholds set once per process, and the switch that leaves them."""

from __future__ import annotations

import ctypes
import logging

import pytest

from fashion_search import allocator


def _glibc() -> bool:
    try:
        ctypes.CDLL(None).gnu_get_libc_version  # noqa: B018
    except (OSError, AttributeError):
        return False
    return True


@pytest.fixture
def fresh(monkeypatch):
    """keep_freed_memory() as in a new process (it decides once per process)."""
    monkeypatch.setattr(allocator, "_applied", None)
    return monkeypatch


@pytest.mark.skipif(not _glibc(), reason="mallopt is glibc's; other C libraries are left as they are")
def test_glibc_accepts_both_thresholds_once_per_process(fresh):
    fresh.delenv(allocator.ENV, raising=False)
    calls = []
    real = allocator._glibc_mallopt()
    fresh.setattr(allocator, "_glibc_mallopt", lambda: lambda p, v: calls.append((p, v)) or real(p, v))
    assert allocator.keep_freed_memory() is True
    assert allocator.keep_freed_memory() is True
    assert calls == [(-3, allocator.MMAP_THRESHOLD), (-1, allocator.TRIM_THRESHOLD)]  # once, not twice


def test_system_leaves_the_allocator_alone(fresh):
    fresh.setenv(allocator.ENV, "system")
    fresh.setattr(allocator, "_glibc_mallopt", lambda: pytest.fail("mallopt called under 'system'"))
    assert allocator.keep_freed_memory() is False


def test_a_refused_value_or_another_c_library_reports_not_tuned(fresh):
    fresh.delenv(allocator.ENV, raising=False)
    fresh.setattr(allocator, "_glibc_mallopt", lambda: None)  # musl, macOS
    assert allocator.keep_freed_memory() is False
    fresh.setattr(allocator, "_applied", None)
    fresh.setattr(allocator, "_glibc_mallopt", lambda: lambda p, v: 0)  # glibc refusing a value
    assert allocator.keep_freed_memory() is False


def test_an_unknown_setting_is_named_and_tuning_goes_ahead(fresh, caplog):
    fresh.setenv(allocator.ENV, "jemalloc")
    fresh.setattr(allocator, "_glibc_mallopt", lambda: lambda p, v: 1)
    with caplog.at_level(logging.WARNING, logger="fashion_search.allocator"):
        assert allocator.keep_freed_memory() is True
    assert "FASHION_SEARCH_MALLOC='jemalloc'" in caplog.text
