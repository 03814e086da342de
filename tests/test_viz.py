"""dvt.viz: each picture helper on maps whose right answer is known."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import fastcore.test as fct
from dvt.viz import PCAStats, pca_rgb, norm_map, similarity_map, kmeans_map, upsample_map, panel, save_figure


def three_bands(C=24, n=18, seed=0):
    "A `(n, n, C)` map of three vertical bands along three orthogonal directions, plus noise; and the band index per column."
    g = torch.Generator().manual_seed(seed)
    dirs = torch.linalg.qr(torch.randn(C, 3, generator=g))[0].T * 2
    band = torch.arange(n) * 3 // n
    return dirs[band][None].expand(n, n, C) + 0.05 * torch.randn(n, n, C, generator=g), band


def test_pca_rgb_shapes_and_range():
    fm, _ = three_bands()
    rgb = pca_rgb(fm)
    fct.test_eq(rgb.shape, (18, 18, 3))
    assert rgb.min() >= 0 and rgb.max() <= 1
    fct.test_eq(pca_rgb(torch.stack([fm, fm])).shape, (2, 18, 18, 3))
    fct.test_eq(pca_rgb(torch.rand(4, 5, 2)).shape, (4, 5, 3))  # fewer than 3 channels still gives RGB


def test_pca_rgb_separates_known_directions_despite_outliers():
    fm, band = three_bands()
    fm = fm.clone(); fm[0, 0] += 200; fm[5, 9] -= 150              # extreme tokens must not wash the colours out
    rgb = pca_rgb(fm)
    cols = torch.stack([rgb[6:, band == k].reshape(-1, 3).median(0).values for k in range(3)])
    d = torch.cdist(cols, cols)
    assert d[~torch.eye(3, dtype=torch.bool)].min() > 0.5
    nearest = torch.cdist(rgb.reshape(-1, 3), cols).argmin(1).reshape(18, 18)   # colour -> closest band colour
    assert (nearest == band).float().mean() > 0.95                               # the colouring separates the bands


def test_pca_rgb_shared_stats():
    fm, _ = three_bands()
    rgb, st = pca_rgb(fm, return_stats=True)
    assert isinstance(st, PCAStats)
    fct.test_eq(st.components.shape, (24, 3))
    fct.test_eq(pca_rgb(fm, stats=st), rgb)
    other = pca_rgb(fm + 0.5 * st.components[:, 0] * (st.hi[0] - st.lo[0]), stats=st)  # shift along component 1
    assert (other[..., 0] >= rgb[..., 0] - 1e-6).all() and (other[..., 0] > rgb[..., 0] + 0.1).any()
    fct.test_fail(lambda: pca_rgb(torch.rand(3, 3, 8), stats=st), contains="24-dim")


def test_pca_rgb_deterministic():
    x = torch.randn(10, 10, 32)
    fct.test_eq(pca_rgb(x), pca_rgb(x))


def test_norm_map():
    x = torch.ones(6, 7, 4); x[2, 3] *= 5; x[4, 4] *= 0
    n = norm_map(x)
    fct.test_eq(n.shape, (6, 7)); fct.test_eq(n[2, 3], 1.0); fct.test_eq(n[4, 4], 0.0)
    assert n.min() >= 0 and n.max() <= 1
    fct.test_eq(norm_map(torch.stack([x, 3 * x])), torch.stack([n, n]))


def test_similarity_query_is_max():
    x = torch.randn(2, 9, 11, 16)
    for q in [(0, 0), (4, 7), (-1, -1)]:
        s = similarity_map(x[0], q)
        fct.test_close(s[q], 1.0, eps=1e-5)
        fct.test_eq(s.max(), s[q])
    s = similarity_map(x)                                              # default: the centre token of each map
    fct.test_eq(s.shape, (2, 9, 11)); fct.test_close(s[:, 4, 5], torch.ones(2), eps=1e-5)
    assert s.min() >= -1 - 1e-6 and s.max() <= 1 + 1e-6
    fct.test_close(similarity_map(x[1], x[1, 2, 3]), similarity_map(x[1], (2, 3)), eps=1e-6)


def test_kmeans_recovers_separated_clusters():
    g = torch.Generator().manual_seed(2)
    centres = F.normalize(torch.randn(5, 32, generator=g), dim=-1)
    truth = torch.randint(5, (16, 16), generator=g)
    x = 3 * centres[truth] + 0.1 * torch.randn(16, 16, 32, generator=g)   # scale does not matter (cosine)
    lab = kmeans_map(x, k=5, seed=3)
    fct.test_eq(lab.shape, (16, 16)); fct.test_eq(lab.dtype, torch.int64)
    fct.test_eq(len(set(zip(truth.flatten().tolist(), lab.flatten().tolist()))), 5)  # one-to-one with the truth
    fct.test_eq(kmeans_map(x, k=5, seed=3), lab)
    counts = torch.bincount(lab.flatten(), minlength=5)
    fct.test_eq(counts, counts.sort(descending=True).values)            # 0 = largest cluster
    fct.test_eq(kmeans_map(torch.stack([x, x]), k=5).shape, (2, 16, 16))


def test_upsample_map():
    m = torch.arange(6.).reshape(2, 3)
    up = upsample_map(m, (4, 6))
    fct.test_eq(up, m.repeat_interleave(2, 0).repeat_interleave(2, 1))
    lab = torch.tensor([[0, 3], [1, 2]])
    fct.test_eq(upsample_map(lab, 4).dtype, torch.int64)
    fct.test_eq(upsample_map(torch.rand(2, 3, 3), 12).shape, (12, 12, 3))


def test_panel_and_save(tmp_path):
    fm, _ = three_bands()
    rows = [[("image", torch.rand(3, 32, 32)), ("pca", pca_rgb(fm)), ("norm", norm_map(fm))],
            [("k-means", kmeans_map(fm, k=3)), None]]
    p = save_figure(panel(rows, title="t"), "panel_test", folder=tmp_path)
    fct.test_eq(p, tmp_path / "panel_test.png")
    fct.test_eq(p.read_bytes()[:8], b"\x89PNG\r\n\x1a\n")
    again = save_figure(panel(rows, title="t"), "panel_test.png", folder=tmp_path)
    fct.test_eq(again.read_bytes(), p.read_bytes())                    # deterministic bytes
    fct.test_eq(sorted(f.name for f in tmp_path.iterdir()), ["panel_test.png"])  # no temp files left


@pytest.mark.parametrize("fn", [pca_rgb, norm_map, similarity_map, kmeans_map])
def test_bad_shapes_and_types(fn):
    fct.test_fail(lambda: fn(torch.rand(4, 5)), contains="(h, w, C)")
    fct.test_fail(lambda: fn(torch.rand(1, 2, 3, 4, 5)), contains="(h, w, C)")
    fct.test_fail(lambda: fn(np.zeros((3, 3, 4))), contains="torch.Tensor")
    fct.test_fail(lambda: fn(torch.full((3, 3, 4), float("nan"))), contains="NaN")


def test_bad_arguments():
    x = torch.rand(5, 5, 8)
    fct.test_fail(lambda: similarity_map(x, (5, 0)), contains="outside the 5x5")
    fct.test_fail(lambda: similarity_map(x, torch.rand(7)), contains="(8,)")
    fct.test_fail(lambda: kmeans_map(x, k=0), contains="between 1 and")
    fct.test_fail(lambda: upsample_map(torch.rand(2, 2, 2, 2), 4), contains="(h, w)")
    fct.test_fail(lambda: panel([]), contains="non-empty")
    fct.test_fail(lambda: panel([[("x", torch.rand(4, 4, 4, 4))]]), contains="panel picture")
    fct.test_fail(lambda: save_figure(panel([[("x", torch.rand(4, 4))]]), "f.jpg"), contains="PNG")
