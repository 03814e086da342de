"""The twelve seed models, random-init: the token grid at the DVT input size, at another size, and at half stride."""
import pytest
import torch
import fastcore.test as fct
from dvt.backbones import SEED_MODELS, Backbone

EXPECTED_DIM = {"small": 384, "base": 768, "large": 1024}


@pytest.mark.parametrize("name", SEED_MODELS)
def test_seed_model_grids(name):
    torch.manual_seed(0)
    m = Backbone(name, pretrained=False)
    size = next(v for k, v in EXPECTED_DIM.items() if f"_{k}_" in name)
    fct.test_eq(m.embed_dim, size)
    p = m.patch_size
    fct.test_eq(p, 14 if "patch14" in name else 16)
    fct.test_eq(m.input_size, 518 if p == 14 else 512)
    with torch.inference_mode():
        # the DVT input size: 37x37 (p14) or 32x32 (p16)
        y = m(torch.rand(1, 3, m.input_size, m.input_size))
        fct.test_eq(y.shape, (1, m.input_size // p, m.input_size // p, size))
        assert torch.isfinite(y).all()
        # another, non-square size: positional embeddings are resampled
        y2 = m(torch.rand(1, 3, 8 * p, 5 * p))
        fct.test_eq(y2.shape, (1, 8, 5, size))
        # prefix tokens: CLS (+4 registers for reg4 models)
        fct.test_eq(m.prefix_tokens(torch.rand(1, 3, 4 * p, 4 * p)).shape[1], 5 if "reg4" in name else 1)


@pytest.mark.parametrize("name", ["vit_small_patch14_reg4_dinov2.lvd142m", "vit_base_patch16_224.dino",
                                  "eva02_base_patch16_clip_224.merged2b"])
def test_half_stride_is_denser(name):
    "stride = patch / 2: overlapping tokens on a grid (2n - 1) per side for an n-patch input."
    m = Backbone(name, pretrained=False, stride=None)
    p = m.patch_size
    half = Backbone(name, pretrained=False, stride=p // 2)
    half.load_state_dict(m.state_dict())
    x = torch.rand(1, 3, 8 * p, 8 * p)
    with torch.inference_mode():
        fct.test_eq(m(x).shape[1:3], (8, 8))
        fct.test_eq(half(x).shape[1:3], (15, 15))
        # the even tokens of the dense grid see exactly the patches of the plain grid (same pixels, resampled PE)
        torch.testing.assert_close(half.model.patch_embed.proj(x)[..., ::2, ::2], m.model.patch_embed.proj(x))
