"""Every decode path under hypothesis: only pi0remote's typed errors may escape (>= 20,000 cases in all).

``PI0REMOTE_FUZZ_EXAMPLES`` sets the hypothesis examples per path (default 300; each is fed as drawn
and as 7 mutations: 9 paths x 300 x 8 = 21,600 cases); ``benchmarks/fuzz.py`` runs 200,000 and more.
"""

from __future__ import annotations

import os

import pytest

pytest.importorskip("hypothesis")

from pi0remote.harness import fuzz  # noqa: E402

EXAMPLES = int(os.environ.get("PI0REMOTE_FUZZ_EXAMPLES", "300"))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", sorted(fuzz.TARGETS))
def test_decode_path_raises_only_typed_errors(name: str) -> None:
    before = fuzz.CASES[0]
    fuzz.run_target(name, EXAMPLES)
    assert fuzz.CASES[0] - before >= EXAMPLES * fuzz.VARIANTS * 0.9  # hypothesis ran (nearly) every example


def test_mutations_are_deterministic_and_varied() -> None:
    data = bytes(range(40))
    first, second = list(fuzz.variants(data)), list(fuzz.variants(data))
    assert first == second and first[0] == data and len(set(first)) >= fuzz.VARIANTS - 1
