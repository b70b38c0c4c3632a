"""The non-learned binary activation quantizer ``act_method="sign"`` against float64 by hand."""

from __future__ import annotations

import pytest
import torch

from tbt.config import QuantConfig
from tbt.quant.act_methods import SignQuantizer, check_act_method, make_act_quantizer


def test_value_and_gradient_match_a_float64_reference():
    x = torch.tensor([[-3.0, -0.5, 0.0], [0.25, 1.0, 2.75]], requires_grad=True)
    q = SignQuantizer(clip=2.5)
    y = q(x)
    s = sum(abs(v) for v in [-3.0, -0.5, 0.0, 0.25, 1.0, 2.75]) / 6  # mean|x| = 1.25
    ref = [[-s, -s, s], [s, s, s]]
    assert torch.allclose(y.detach().double(), torch.tensor(ref, dtype=torch.float64))
    y.backward(torch.full_like(y, 2.0))
    assert x.grad.tolist() == [[0.0, 2.0, 2.0], [2.0, 2.0, 0.0]]  # |x| > 2.5 gets none
    with torch.no_grad():
        assert torch.equal(q(x), y.detach())  # same values without autograd


def test_registered_for_one_bit_only():
    check_act_method("sign", 1)
    with pytest.raises(ValueError, match="supports activation bits"):
        check_act_method("sign", 2)
    cfg = QuantConfig(bits="1-1-1", method="bwn", act_method="sign", act_clip=1.5)
    mod = make_act_quantizer(cfg, signed=False)
    assert isinstance(mod, SignQuantizer) and mod.clip == 1.5
