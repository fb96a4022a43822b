"""Every paper method's default still calibrates as the reference code on identical input.

tests/data/reference_pins.json holds, for stories260K and 16 fixed calibration windows, each
method's per-linear losses, code checksums and first sign plane, made once by hand with
`python tests/make_reference_pins.py` (its docstring says how, the JSON's note at which
commit). The defaults keep scales and means fp32 inside the reconstruction loop as the three
reference implementations do; rounding them earlier (scale_rounding=in_loop, the former
default) or any other drift of the calibration moves these pins. Two tiers (reference_pins.py
says why): everywhere, loss differences and sign-plane agreement within tolerances set between
the measured thread noise and the measured in_loop drift; bit-identical losses, checksums and
signs where the environment (torch, CPU) is the one the pins were made in.
"""

from __future__ import annotations

import json

import pytest
from reference_pins import (
    DATA,
    METHODS,
    TOLERANCES,
    distance,
    environment,
    method_pins,
    one_thread,
    within_tolerance,
)


@pytest.fixture(scope="module")
def pins():
    return json.loads(DATA.read_text())


def test_the_pins_cover_every_paper_method_with_its_defaults(pins):
    assert list(pins["methods"]) == METHODS
    assert pins["tolerances"] == TOLERANCES
    assert len(pins["windows"]) == 16 and {len(w) for w in pins["windows"]} == {128}


def test_the_tolerances_separate_noise_from_in_loop_rounding(pins):
    """As recorded by the script: two threads pass the tolerance tier, in_loop fails it."""
    for method in METHODS:
        checks = pins["checks"][method]
        assert within_tolerance(checks["two_threads"]), method
        assert not within_tolerance(checks["in_loop"]), method


@pytest.mark.parametrize("method", METHODS)
def test_default_reproduces_the_reference_pins(method, pins, stories_path):
    with one_thread():
        got = method_pins(stories_path, method, pins["windows"])
    want = pins["methods"][method]
    assert [g["name"] for g in got["linears"]] == [w["name"] for w in want["linears"]]
    d = distance(got, want)
    assert within_tolerance(d), f"{method}: {d} (tolerances {TOLERANCES})"
    if environment() == pins["environment"]:  # bit for bit where the pins were made
        for g, w in zip(got["linears"], want["linears"]):
            assert g == w, w["name"]
        assert got["signs"] == want["signs"]
