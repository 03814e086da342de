"""dvt.views and dvt.fields: the coordinate convention holds for any stride and size; fields are deterministic."""
import pytest
import torch
import torch.nn.functional as F
import fastcore.test as fct
from dvt.data import sample_image, resize_images
from dvt.views import make_views, render_views, token_centres, grid_shape
from dvt.fields import MultiResGrid, NoiseModel


def at(x, coords):  # bilinear lookup of (3, H, W) at (n, 2) coordinates in [0, 1], pixel-edge aligned
    return F.grid_sample(x[None], (coords * 2 - 1)[None, None].to(x.dtype), align_corners=False)[0, :, 0].T


@pytest.mark.parametrize("size,patch,stride", [((224, 224), 14, 14), ((160, 224), 16, 8), ((96, 128), 16, 16)])
def test_token_coordinates_match_pixels(size, patch, stride):
    img = resize_images(sample_image("coffee"), size)
    vs = make_views(6, size, patch, stride, generator=torch.Generator().manual_seed(1))
    fct.test_eq(vs.grid, grid_shape(size, patch, stride))
    px = render_views(img, vs)
    own = vs.coords[0].reshape(-1, 2)                                    # a view's own token centres, as fractions
    fct.test_close(own[:, 0].unique(), token_centres(vs.grid[1], patch, stride, size[1]).float(), eps=1e-6)
    for i in range(len(vs)):
        err = (at(px[i], own) - at(img, vs.coords[i].reshape(-1, 2))).abs().mean()
        off = (at(px[i], own) - at(img, vs.coords[i].reshape(-1, 2) + torch.tensor([2 / size[1], 0]))).abs().mean()
        assert err < 0.012 and off > 2 * err, (i, err, off)


def test_views_seeded_and_bounded():
    a = make_views(50, 518, 14, generator=torch.Generator().manual_seed(0))
    b = make_views(50, 518, 14, generator=torch.Generator().manual_seed(0))
    fct.test_eq(a.coords, b.coords); fct.test_eq(a.flips, b.flips)
    assert 10 < int(a.flips.sum()) < 40
    assert (a.coords >= 0).all() and (a.coords <= 1).all()


def test_fields_deterministic_backward():
    torch.manual_seed(0); m = NoiseModel(32, (8, 8), n_levels=3, n_features=2, base_res=4, max_res=16)
    xy, pos, y = torch.rand(256, 2), torch.randint(0, 64, (256,)), torch.randn(256, 32)
    grads = []
    for _ in range(3):
        m.zero_grad(); f, g, r = m(xy, pos, y); (f + g + r).pow(2).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
    assert torch.equal(grads[0], grads[1]) and torch.equal(grads[0], grads[2])


def test_grid_bad_sizes():
    fct.test_fail(lambda: MultiResGrid(4, 2, 32, 16), contains="base_res <= max_res")
    fct.test_fail(lambda: make_views(0, 224, 14, include_full=False), contains="n_views >= 1")
