"""Fusion registry: text-weight limits, normalisation, and the combiner's starting point."""

import pytest
import torch
import torch.nn.functional as F

from fashion_search.errors import FashionSearchError
from fashion_search.models.fusion import create_fusion, list_fusions


@pytest.fixture
def pair():
    torch.manual_seed(0)
    return F.normalize(torch.randn(8, 32), dim=-1), F.normalize(torch.randn(8, 32), dim=-1)


@pytest.mark.parametrize("name", ["sum", "combiner"])
def test_weight_limits_are_exact_single_modalities(name, pair):
    img, txt = pair
    fusion = create_fusion(name, 32).eval()
    # Exactly the (normalised) single-modality embedding, so rankings are identical, not just close.
    assert torch.equal(fusion(img, txt, 0.0), F.normalize(img, dim=-1))
    assert torch.equal(fusion(img, txt, 1.0), F.normalize(txt, dim=-1))


@pytest.mark.parametrize("name", ["sum", "combiner"])
@pytest.mark.parametrize("w", [0.1, 0.5, 0.8])
def test_outputs_are_unit_norm(name, w, pair):
    out = create_fusion(name, 32).eval()(*pair, w)
    assert torch.allclose(out.norm(dim=-1), torch.ones(8), atol=1e-5)


def test_sum_default_is_normalised_sum(pair):
    img, txt = pair
    assert torch.allclose(create_fusion("sum", 32)(img, txt), F.normalize(img + txt, dim=-1))


def test_untrained_combiner_is_a_gated_sum(pair):
    img, txt = pair
    out = create_fusion("combiner", 32).eval().fuse(img, txt)
    # The residual starts at zero, so the output lies in the plane of image and text.
    basis = torch.stack([img, txt], dim=-1)
    coeffs = torch.linalg.lstsq(basis, out.unsqueeze(-1)).solution
    assert torch.allclose((basis @ coeffs).squeeze(-1), out, atol=1e-5)


def test_weight_moves_monotonically_towards_text(pair):
    img, txt = pair
    fusion = create_fusion("combiner", 32).eval()
    with torch.no_grad():
        sims = [float((fusion(img, txt, w) * txt).sum(-1).mean()) for w in (0.0, 0.25, 0.5, 0.75, 1.0)]
    assert sims == sorted(sims)


@pytest.mark.parametrize("w", [-0.1, 1.5])
def test_weight_out_of_range_is_refused(w, pair):
    with pytest.raises(FashionSearchError, match="text weight"):
        create_fusion("sum", 32)(*pair, w)


def test_registry():
    assert {"sum", "combiner"} <= set(list_fusions())
    with pytest.raises(FashionSearchError, match="unknown fusion"):
        create_fusion("concat", 8)
