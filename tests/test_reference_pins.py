"""Every paper method's default still calibrates as the reference code on identical input.

tests/data/reference_pins.json holds, for stories260K and 16 fixed calibration windows, each
method's per-linear losses, code checksums and first sign plane, made once by hand with
`python tests/make_reference_pins.py` (its docstring says how, the JSON's note at which
commit). The defaults keep scales and means fp32 inside the reconstruction loop as the three
reference implementations do; rounding them earlier (scale_rounding=in_loop, the former
default) or any other drift of the calibration moves these pins. Tiers (reference_pins.py):
losses to LOSS_RTOL and sign planes to SIGN_AGREEMENT everywhere; checksums and bit-identical
losses where the environment is the one the pins were made in.
"""

from __future__ import annotations

import json

import pytest
import torch
from reference_pins import (
    DATA,
    LOSS_RTOL,
    METHODS,
    SIGN_AGREEMENT,
    decode_signs,
    environment,
    method_pins,
    one_thread,
)


@pytest.fixture(scope="module")
def pins():
    return json.loads(DATA.read_text())


def test_the_pins_cover_every_paper_method_with_its_defaults(pins):
    assert list(pins["methods"]) == METHODS
    assert pins["tolerances"] == {"loss_rtol": LOSS_RTOL, "sign_agreement": SIGN_AGREEMENT}
    assert len(pins["windows"]) == 16 and {len(w) for w in pins["windows"]} == {128}


@pytest.mark.parametrize("method", METHODS)
def test_default_reproduces_the_reference_pins(method, pins, stories_path):
    with one_thread():
        got = method_pins(stories_path, method, pins["windows"])
    want = pins["methods"][method]
    assert [g["name"] for g in got["linears"]] == [w["name"] for w in want["linears"]]
    for g, w in zip(got["linears"], want["linears"]):
        for key in ("calibration_loss", "loss"):
            assert g[key] == pytest.approx(w[key], rel=LOSS_RTOL), (w["name"], key)
    signs = decode_signs(got["signs"], got["n_signs"])
    ref = decode_signs(want["signs"], want["n_signs"])
    assert signs.shape == ref.shape
    agreement = (signs == ref).float().mean().item()
    assert agreement >= SIGN_AGREEMENT, f"{method}: {agreement:.5%} of the signs as pinned"
    if environment() == pins["environment"]:  # bit for bit where the pins were made
        for g, w in zip(got["linears"], want["linears"]):
            assert g == w, w["name"]
        assert torch.equal(signs, ref)
