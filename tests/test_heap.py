"""retained_heap keeps freed memory for reuse while a bound runs, and gives it back when it ends; bounds
computed inside it are the same numbers."""

from __future__ import annotations

import os

import numpy as np
import pytest
from conftest import he_network

from lipsdp import heap
from lipsdp.methods import get_method

pytestmark = pytest.mark.skipif(heap._LIBC is None or not os.path.exists("/proc/self/statm"), reason="needs glibc")

MIB = 2**20


def resident() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_freed_memory_is_kept_inside_and_returned_after():
    with heap.retained_heap():
        a = np.ones(64 * MIB // 8)  # touched: resident
        before_free = resident()
        del a
        kept = resident()
        assert kept > before_free - 16 * MIB  # still resident: ready for the next array
        b = np.ones(64 * MIB // 8)  # served from the kept memory
        assert resident() < kept + 16 * MIB
        del b
    assert resident() < kept - 32 * MIB  # trimmed on the way out


def test_nested_uses_restore_only_at_the_outermost():
    with heap.retained_heap():
        with heap.retained_heap():
            pass
        assert heap._depth == 1
        a = np.ones(64 * MIB // 8)
        held = resident()
        del a
        assert resident() > held - 16 * MIB  # the inner exit did not restore the defaults
    assert heap._depth == 0


def test_bounds_are_identical_inside_and_outside():
    net = he_network([6, 12, 9, 3], 5, ["relu", "tanh"])
    outside = get_method("neuron")(net)
    with heap.retained_heap():
        inside = get_method("neuron")(net)
    assert inside.upper == outside.upper
