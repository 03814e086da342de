"""dvt.discovery beyond the notebook: LOST details, the propagation step, DAVIS scoring, real timm grids."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import fastcore.test as fct
from dvt.backbones import Backbone
from dvt.datasets import make_fixture_davis, make_fixture_voc, load_dataset
from dvt.synthetic import PlantedBackbone
from dvt.discovery import (lost, token_box_to_pixels, run_lost, neighbourhood, propagate_step, propagate_sequence,
                           davis_scores, run_davis, PropagationConfig, _frame_size)


def test_lost_seed_and_box_geometry():
    g = torch.Generator().manual_seed(1)
    bg = torch.randn(8, generator=g)
    f = bg + 0.2 * torch.randn(9, 9, 8, generator=g)
    f[0:2, 6:9] = -bg + 0.2 * torch.randn(2, 3, 8, generator=g)          # object in the top-right corner
    f[7, 0] = -bg                                                        # a lone outlier token, disconnected
    out = lost(f)
    assert out["seed"][0] < 2 and out["seed"][1] >= 6
    fct.test_eq(out["box"], (0, 6, 1, 8))                                # the outlier is not in the seed's component
    fct.test_eq(token_box_to_pixels(out["box"], 16, 8, H=80, W=76), torch.tensor([48.0, 0, 76, 24], dtype=torch.float64))


def test_lost_k_limits_the_seed_set():
    f = torch.randn(6, 6, 4, generator=torch.Generator().manual_seed(0))
    assert len(lost(f, k_patches=3)["seed_set"]) <= 3


def test_neighbourhood_and_topk():
    nb = neighbourhood(5, 5, 1)
    fct.test_eq(nb.sum(1).reshape(5, 5)[0, 0].item(), 4); fct.test_eq(nb.sum(1).reshape(5, 5)[2, 2].item(), 9)
    fct.test_eq(nb, nb.T)
    # two sources, one far: with the neighbourhood the far one is excluded even though it matches better
    tgt = F.normalize(torch.tensor([[1.0, 0.0]]), dim=1)
    src = F.normalize(torch.tensor([[[0.6, 0.8], [1.0, 0.0]]]), dim=2)
    labels = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])                   # (m=1, K=2, n=2)
    near = torch.tensor([[1.0, 0.0]])
    fct.test_close(propagate_step(tgt, src, labels, near, topk=2), torch.tensor([[1.0], [0.0]]))
    fct.test_close(propagate_step(tgt, src, labels, None, topk=1), torch.tensor([[0.0], [1.0]]))
    soft = propagate_step(tgt, src, labels, None, topk=2, temperature=0.1)
    w = torch.exp(torch.tensor([0.6, 1.0]) / 0.1); w = w / w.sum()
    fct.test_close(soft[:, 0], w)


def test_frame_size_rules():
    cfg = PropagationConfig()
    fct.test_eq(_frame_size(480, 854, cfg, 16, 16), (480, 832))          # DINO: 480 x 832 for DAVIS 480p
    fct.test_eq(_frame_size(854, 480, cfg, 16, 16), (832, 480))          # portrait
    fct.test_eq(_frame_size(480, 854, cfg, 16, 8), (480, 832))


@pytest.fixture(scope="module")
def davis(tmp_path_factory):
    r = tmp_path_factory.mktemp("davis"); make_fixture_davis(r, n_seqs=2, n_frames=5); return r


def test_scores_skip_first_and_last_frame(davis):
    seq = load_dataset("davis", davis)[0]
    preds = [seq.mask(t) for t in range(len(seq))]
    preds[0] = torch.zeros_like(preds[0]); preds[-1] = torch.zeros_like(preds[-1])   # wrong where DAVIS does not look
    sc = davis_scores(preds, seq)
    assert sc and all(v == (1.0, 1.0) for v in sc.values())
    preds[2] = torch.zeros_like(preds[2])
    assert all(v[0] < 1.0 for v in davis_scores(preds, seq).values())


def test_propagation_keeps_frame0_and_ids(davis):
    seq = load_dataset("davis", davis)[1]
    preds = propagate_sequence(PlantedBackbone(), seq, PropagationConfig(short_side=96))
    fct.test_eq(len(preds), len(seq)); fct.test_eq(preds[0], seq.mask(0))
    assert set(torch.cat([p.unique() for p in preds]).tolist()) <= set(seq.mask(0).unique().tolist())
    fct.test_eq(preds[3].shape, seq.mask(3).shape)


def test_run_davis_with_a_dinov2_grid(davis):
    bb = Backbone("vit_small_patch14_dinov2.lvd142m", pretrained=False)
    r = run_davis(bb, davis, short_side=84, sequences=["fixture-00"], n_last=2, radius=3)
    assert 0 <= r["J&F"] <= 100 and r["n_sequences"] == 1 and set(r["per_sequence"]) == {"fixture-00"}
    fct.test_close(r["J&F"], (r["J"] + r["F"]) / 2)


def test_run_lost_limits_and_stride(tmp_path):
    make_fixture_voc(tmp_path, n=4, size=(120, 160))
    r = run_lost(PlantedBackbone(stride=8), tmp_path, max_images=2)
    fct.test_eq(r["n_images"], 2); fct.test_eq(len(r["boxes"]), 2)
    for b in r["boxes"]: assert 0 <= b[0] < b[2] <= 160 and 0 <= b[1] < b[3] <= 120
