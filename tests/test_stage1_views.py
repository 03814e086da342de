"""dvt.views and dvt.fields: the coordinate convention holds for any stride and size; fields are deterministic."""
import pytest
import torch
import torch.nn.functional as F
import fastcore.test as fct
from dvt.data import sample_image, resize_images
from dvt.views import make_views, render_views, token_centres
from dvt.contract import grid_shape
from dvt.fields import MultiResGrid, NoiseModel, ArtifactField, tcnn_levels, grid_sample_taps


def at(x, coords):  # bilinear lookup of (3, H, W) at (n, 2) coordinates in [0, 1], pixel-edge aligned
    return F.grid_sample(x[None], (coords * 2 - 1)[None, None].to(x.dtype), align_corners=False)[0, :, 0].T


@pytest.mark.parametrize("size,patch,stride", [((224, 224), 14, 14), ((160, 224), 16, 8), ((96, 128), 16, 16)])
def test_token_coordinates_match_pixels(size, patch, stride):
    img = resize_images(sample_image("coffee"), size)
    vs = make_views(6, size, patch, stride, generator=torch.Generator().manual_seed(1))
    fct.test_eq(vs.grid, grid_shape(*size, patch, stride))
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


def test_linspace_coords_are_the_official_formula():
    "rule='linspace' (paper): torch.linspace over the crop box in float32, a flip as max - x + min, the full image linspace(0, 1)."
    vs = make_views(12, 518, 14, generator=torch.Generator().manual_seed(2), rule="linspace")
    fct.test_eq(vs.coords[0, 0, :, 0], torch.linspace(0, 1, 37))
    for i in range(1, 13):
        t, l, h, w = vs.boxes[i].tolist()
        x, y = torch.linspace(l / 518, (l + w) / 518, 37), torch.linspace(t / 518, (t + h) / 518, 37)
        if vs.flips[i]: x = (x.max() - x) + x.min()
        fct.test_eq(vs.coords[i, 7, :, 0], x); fct.test_eq(vs.coords[i, :, 9, 1], y)


def test_tcnn_grid_is_tinycudann_arithmetic():
    "Level sizes from tcnn's float32 scale rule, offset lookup and the coherent prime hash on the finest (hashed) level."
    lv = tcnn_levels(16, 16, 1024)
    fct.test_eq([r for _, r, _ in lv][5::5], [65, 257, 1025])
    fct.test_eq([n for _, _, n in lv][-1], 2**20); fct.test_eq([n for _, _, n in lv][:2], [256, 488])    # 22^2 = 484 -> 488 (x 8)
    g = MultiResGrid(16, 2, 16, 1024, kind="tcnn")
    xy = torch.rand(50, 2)
    rows, w = g.layout.corners(xy)
    S, R = float(lv[15][0]), lv[15][1]
    u = (xy.double() * S + 0.5).float(); i0 = u.floor().long(); f = u - u.floor()
    ix, iy = i0[:, 0:1] + torch.tensor([0, 1, 0, 1]), i0[:, 1:2] + torch.tensor([0, 0, 1, 1])
    want = (ix ^ ((iy * 2654435761) % 2**32)) % 2**20 + sum(n for _, _, n in lv[:15])
    fct.test_eq(rows[:, 15], want)
    wx = torch.stack([1 - f[:, 0], f[:, 0], 1 - f[:, 0], f[:, 0]], 1); wy = torch.stack([1 - f[:, 1], 1 - f[:, 1], f[:, 1], f[:, 1]], 1)
    fct.test_close(w[:, 15], wx * wy, eps=1e-7)
    u0 = (xy.double() * float(lv[0][0]) + 0.5).float().floor().long()
    fct.test_eq(rows[:, 0, 0], (u0[:, 0] + u0[:, 1] * 16) % 256)


def test_dense_grid_is_grid_sample_and_g_taps():
    g = MultiResGrid(3, 4, 4, 20)
    with torch.no_grad(): g.table.normal_()
    xy = torch.rand(200, 2)
    ref = torch.cat([F.grid_sample(g.level(l).permute(2, 0, 1)[None], (xy * 2 - 1).view(1, -1, 1, 2), align_corners=True,
                                   padding_mode="border")[0, :, :, 0].T for l in range(3)], 1)
    fct.test_close(g(xy), ref, eps=1e-5)
    G = ArtifactField(37, 37, 5, read="grid_sample")
    lin = torch.stack(torch.meshgrid(torch.linspace(-1, 1, 37), torch.linspace(-1, 1, 37), indexing="ij")[::-1], -1)
    ref = F.grid_sample(G.table.permute(2, 0, 1)[None], lin[None], align_corners=True)[0].permute(1, 2, 0).reshape(-1, 5)
    with torch.no_grad(): fct.test_close(G(torch.arange(37 * 37)), ref, eps=1e-6)
    rows, w = grid_sample_taps(37, 37)
    fct.test_eq(int((w[:37] > 0).sum(1).gt(1).sum()), 9)                     # 9 of 37 nodes of the first row read a neighbour


def test_render_clamp_option():
    "The official crops keep the bicubic overshoot; clamp=False renders them that way, clamp=True (default) stays in [0, 1]."
    img = (torch.rand(3, 64, 64) > 0.5).float()                                  # hard edges: bicubic overshoots
    vs = make_views(3, 64, 16, generator=torch.Generator().manual_seed(0))
    a, b = render_views(img, vs, clamp=False), render_views(img, vs)
    assert a.min() < -0.01 and a.max() > 1.01 and b.min() >= 0 and b.max() <= 1
    fct.test_eq(b, a.clamp(0, 1))
