"""dvt.retrieval beyond the notebook: resize and stride options, the memory cap, ADE's void, RNG hygiene."""
import numpy as np
import pytest
import torch
import fastcore.test as fct
from dvt.datasets import make_fixture_voc, make_fixture_ade, load_dataset
from dvt.synthetic import PlantedBackbone
from dvt.retrieval import (dense_sample, patch_labels, knn_vote, kmeans, match_clusters, run_hummingbird, run_overclustering,
                           hummingbird_config, overcluster_config)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    r = tmp_path_factory.mktemp("seg"); make_fixture_voc(r, n=4); make_fixture_ade(r, n=4); return r


def test_dense_sample_pads_or_resizes():
    bb = PlantedBackbone(stride=8)                                      # patch 16, stride 8
    img, lab = torch.rand(3, 50, 70), torch.zeros(50, 70, dtype=torch.long)
    f, y = dense_sample(bb, img, lab)
    fct.test_eq(y.shape, (56, 72)); fct.test_eq(f.shape[:2], (6, 8)); assert (y[50:] == 255).all() and (y[:, 70:] == 255).all()
    f, y = dense_sample(bb, img, lab, size=60)                          # fitted down to 56 = 16 + 5 * 8
    fct.test_eq(y.shape, (56, 56)); fct.test_eq(f.shape[:2], (6, 6))
    fct.test_eq(patch_labels(y, 3, 16, 8).shape, (6, 6, 3))


def test_memory_cap_and_votes_on_fixtures(root):
    bb = PlantedBackbone()
    full = run_hummingbird(bb, root, "voc", k=5)
    capped = run_hummingbird(bb, root, "voc", k=5, memory_size=50)
    fct.test_eq(capped["memory"], 50); assert full["memory"] > 50
    fct.test_eq(run_hummingbird(bb, root, "voc", k=5, memory_size=50)["mIoU"], capped["mIoU"])   # same seed, same subset
    ade = run_hummingbird(bb, root, "ade", preset="smoke", vote="majority")
    assert 0 <= ade["mIoU"] <= 100 and ade["dataset"] == "ade" and len(ade["IoU"]) == 150


def test_overclustering_leaves_global_rng_alone(root):
    torch.manual_seed(123); before = torch.rand(1)
    torch.manual_seed(123)
    r = run_overclustering(PlantedBackbone(), root, "ade", preset="smoke", n_clusters=12)
    fct.test_eq(torch.rand(1), before); fct.test_eq(r["n_clusters"], 12)
    r2 = run_overclustering(PlantedBackbone(), root, "ade", preset="smoke", n_clusters=12)
    fct.test_eq(r["mIoU"], r2["mIoU"])


def test_match_clusters_hungarian_uses_each_cluster_once():
    conf = torch.tensor([[5, 5, 0, 0], [0, 0, 8, 0], [0, 0, 2, 7]])
    h = match_clusters(conf)
    used = h["mapping"][h["mapping"] >= 0]
    fct.test_eq(len(used), len(used.unique())); fct.test_eq(len(used), 3)
    fct.test_close(h["IoU"][1], 100 * 8 / 10)                             # class 1 owns cluster 2 (8 of its 10 pixels)
    fct.test_fail(lambda: match_clusters(conf, "greedy"), contains="'hungarian' or 'many_to_one'")


def test_knn_vote_edge_cases():
    fct.test_fail(lambda: knn_vote(torch.ones(2, 3), torch.zeros(0, 3), torch.zeros(0, 4)), contains="memory bank is empty")
    out = knn_vote(torch.ones(2, 3), torch.ones(1, 3), torch.tensor([[0.0, 1, 0, 0]]), k=30)   # k larger than the memory
    fct.test_eq(out, torch.tensor([[0.0, 1, 0, 0]] * 2))
    fct.test_fail(lambda: hummingbird_config(vote="mean"), contains="'softmax' or 'majority'")
    fct.test_fail(lambda: overcluster_config(n_clusters=0), contains="n_clusters")


def test_open_hummingbird_preset_reads_memory_void_as_background(root):
    cfg = hummingbird_config("open_hummingbird")
    fct.test_eq((cfg.size, cfg.memory_void, cfg.k, cfg.temperature), (512, "background", 30, 0.02))
    bb = PlantedBackbone()
    ign = run_hummingbird(bb, root, "voc", k=5, size=64)
    bgd = run_hummingbird(bb, root, "voc", k=5, size=64, memory_void="background")
    assert bgd["memory"] >= ign["memory"]                               # all-void patches now carry background
    fct.test_fail(lambda: hummingbird_config(memory_void="drop"), contains="'ignore' or 'background'")
