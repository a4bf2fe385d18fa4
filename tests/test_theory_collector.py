"""theory.collector.paused: automatic collection off inside, restored after, and left
off where the caller had turned it off."""

from __future__ import annotations

import gc

import pytest

from varprobe.theory import collector


def test_paused_restores_the_collector_even_on_errors():
    assert gc.isenabled()
    with collector.paused():
        assert not gc.isenabled()
    assert gc.isenabled()
    with pytest.raises(ValueError), collector.paused():
        raise ValueError
    assert gc.isenabled()


def test_paused_keeps_a_collector_the_caller_turned_off():
    gc.disable()
    try:
        with collector.paused():
            assert not gc.isenabled()
        assert not gc.isenabled()
    finally:
        gc.enable()
