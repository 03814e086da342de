"""dvt.discovery beyond the notebook: LOST details, the propagation step, DAVIS scoring, real timm grids."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import fastcore.test as fct
from dvt.backbones import Backbone
from dvt.datasets import make_fixture_davis, make_fixture_voc, load_dataset
from dvt.synthetic import PlantedBackbone
from dvt.discovery import (lost, token_box_to_pixels, run_lost, lost_image, lost_config, attention_features, neighbourhood,
                           propagate_step, propagate_sequence, davis_scores, run_davis, davis_config, PropagationConfig,
                           frame_size, resize_labels)


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
    fct.test_eq(frame_size(480, 854, cfg, 16, 16), (480, 832))          # DINO: 480 x 832 for DAVIS 480p
    fct.test_eq(frame_size(854, 480, cfg, 16, 16), (832, 480))          # portrait
    fct.test_eq(frame_size(480, 854, cfg, 16, 8), (480, 832))


@pytest.fixture(scope="module")
def davis(tmp_path_factory):
    r = tmp_path_factory.mktemp("davis"); make_fixture_davis(r, n_seqs=2, n_frames=5); return r


def test_scores_skip_first_and_last_frame(davis):
    seq = load_dataset("davis", davis)[0]
    preds = [seq.mask(t) for t in range(len(seq))]
    preds[0] = torch.zeros_like(preds[0]); preds[-1] = torch.zeros_like(preds[-1])   # wrong where DAVIS does not look
    sc = davis_scores(preds, seq)
    assert sc and all((v["J"], v["F"], v["J_recall"], v["J_decay"]) == (1.0, 1.0, 1.0, 0.0) for v in sc.values())
    preds[1] = torch.zeros_like(preds[1])                               # wrong on the first scored frame only
    for v in davis_scores(preds, seq).values():
        assert v["J"] < 1.0 and v["J_decay"] < 0 and v["J_recall"] == 2 / 3   # frames 1..3 scored, the first one fails


def test_propagation_keeps_frame0_and_ids(davis):
    seq = load_dataset("davis", davis)[1]
    preds = propagate_sequence(PlantedBackbone(), seq, davis_config("smoke"))
    fct.test_eq(len(preds), len(seq)); fct.test_eq(preds[0], seq.mask(0))
    assert set(torch.cat([p.unique() for p in preds]).tolist()) <= set(seq.mask(0).unique().tolist())
    fct.test_eq(preds[3].shape, seq.mask(3).shape)


def test_run_davis_with_a_dinov2_grid(davis):
    bb = Backbone("vit_small_patch14_dinov2.lvd142m", pretrained=False)
    r = run_davis(bb, davis, short_side=84, sequences=["fixture-00"], n_last=2, radius=3)
    assert 0 <= r["J&F"] <= 100 and r["n_sequences"] == 1 and set(r["per_sequence"]) == {"fixture-00"}
    fct.test_close(r["J&F"], (r["J"] + r["F"]) / 2)
    assert all(0 <= r[k] <= 100 for k in ("J_recall", "F_recall")) and r["void"] == "background"


def test_davis_void_background_against_ignore(davis):
    "The toolkit's reading charges predictions on void pixels; 'ignore' does not (a hand-made void band)."
    seq = load_dataset("davis", davis)[0]
    o = seq.objects[0]
    class WithVoid:                                                     # the real sequence with a void ring around object o
        objects, mask = [o], None
        def __len__(self): return len(seq)
    gts = []
    for t in range(len(seq)):
        m = seq.mask(t).clone(); obj = (m == o).float()[None, None]
        ring = (F.max_pool2d(obj, 5, 1, 2)[0, 0] > 0) & (m != o); m[ring] = 255; gts.append(m)
    fake = WithVoid(); fake.mask = lambda t: gts[t]
    preds = [torch.where(g == 255, o, g) for g in gts]                  # the object grown over its void ring
    bg, ig = davis_scores(preds, fake)[o], davis_scores(preds, fake, void="ignore")[o]
    fct.test_eq((ig["J"], ig["F"]), (1.0, 1.0)); assert bg["J"] < 1.0
    fct.test_fail(lambda: davis_scores(preds, fake, void="skip"), contains="'background'")


def test_labels_resized_like_pil():
    lab = torch.tensor([[0, 1, 2], [3, 4, 5]])
    fct.test_eq(resize_labels(lab, (4, 6)), lab.repeat_interleave(2, 0).repeat_interleave(2, 1))
    fct.test_eq(resize_labels(lab, (1, 1)), torch.tensor([[4]]))        # PIL samples the centre: row 1, column 1
    fct.test_fail(lambda: resize_labels(lab + 300, (2, 2)), contains="0..255")


def test_run_lost_limits_and_stride(tmp_path):
    make_fixture_voc(tmp_path, n=4, size=(120, 160))
    for pad in ("pad", "crop"):
        r = run_lost(PlantedBackbone(stride=8), tmp_path, max_images=2, pad=pad)
        fct.test_eq(r["n_images"], 2); fct.test_eq(len(r["boxes"]), 2); fct.test_eq((r["features"], r["pad"]), ("tokens", pad))
        for b in r["boxes"]: assert 0 <= b[0] < b[2] <= 160 and 0 <= b[1] < b[3] <= 120
    fct.test_fail(lambda: run_lost(PlantedBackbone(), tmp_path, preset="paper"), contains="features='tokens'")
    fct.test_fail(lambda: run_lost(PlantedBackbone(), tmp_path, max_image=2), contains="did you mean 'max_images'")


def test_lost_runs_on_keys_of_a_timm_vit(tmp_path):
    make_fixture_voc(tmp_path, n=2, size=(120, 160))
    bb = Backbone("vit_small_patch16_224", pretrained=False)
    r = run_lost(bb, tmp_path)                                           # 'auto' takes the keys of a timm ViT
    fct.test_eq(r["features"], "k"); fct.test_eq(r["n_images"], 2)
    img = load_dataset("voc_boxes", tmp_path)[0][0]                      # (3, 120, 160): padded to 128 x 160
    k = lost_image(bb, img, lost_config("paper")); q = lost_image(bb, img, lost_config(features="q"))
    fct.test_eq(k["mask"].shape, (8, 10)); fct.test_eq((k["features"], q["features"]), ("k", "q"))
    x = torch.rand(1, 3, 32, 48, generator=torch.Generator().manual_seed(0))
    kv = [attention_features(bb, x, w) for w in ("q", "k", "v")]
    assert not torch.allclose(kv[0], kv[1]) and not torch.allclose(kv[1], kv[2])
    fct.test_fail(lambda: attention_features(bb, x, "tokens"), contains="'q', 'k' or 'v'")


def test_eva_values_match_its_attention():
    "EVA's attention never calls its qkv module (separate q/v biases): the recomputed v equals what attention uses."
    from unittest import mock
    import timm.models.eva as eva
    bb = Backbone("eva02_tiny_patch14_224", pretrained=False).eval()
    attn = bb.model.blocks[-1].attn
    with torch.no_grad(): attn.q_bias.normal_(); attn.v_bias.normal_()
    seen, sdpa = [], F.scaled_dot_product_attention
    def spy(q, k, v, **kw): seen.append(v); return sdpa(q, k, v, **kw)
    x = torch.rand(1, 3, 28, 42, generator=torch.Generator().manual_seed(0))
    with mock.patch.object(eva.F, "scaled_dot_product_attention", spy), torch.no_grad():
        v = attention_features(bb, x, "v")                               # (1, 2, 3, C)
    ref = seen[-1].transpose(1, 2).reshape(1, seen[-1].shape[2], -1)[:, bb.num_prefix_tokens:]
    fct.test_close(v.reshape(1, 6, -1), ref, eps=1e-6)


def _official_lost_box(bb, img, k=100):
    "LOST's procedure written out from main_lost.py / object_discovery.py: zero-pad in normalised space, keys, box clipped."
    import scipy.ndimage
    p = bb.patch_size; _, H, W = img.shape
    Hp, Wp = -(-H // p) * p, -(-W // p) * p
    x = torch.zeros(3, Hp, Wp); x[:, :H, :W] = (img - bb.mean[0]) / bb.std[0]
    out = {}
    hook = bb.model.blocks[-1].attn.qkv.register_forward_hook(lambda m, i, o: out.__setitem__("qkv", o))
    with torch.no_grad(): bb.model.forward_features(x[None])
    hook.remove()
    N, nh = out["qkv"].shape[1], bb.model.blocks[-1].attn.num_heads
    keys = out["qkv"].reshape(1, N, 3, nh, -1).permute(2, 0, 3, 1, 4)[1].transpose(1, 2).reshape(1, N, -1)[:, 1:]
    A = (keys @ keys.transpose(1, 2)).squeeze()
    A2 = A.clone(); A2.fill_diagonal_(0); A2[A2 < 0] = 0
    order = torch.argsort(-torch.sum(A2 > 0, dim=1).float(), descending=True, stable=True)
    seed, pot = order[0], order[:k]
    M = torch.sum(A[pot[A[seed, pot] > 0]], dim=0)
    lab, _ = scipy.ndimage.label(M.reshape(Hp // p, Wp // p).numpy() > 0)
    ys, xs = np.where(lab == lab[np.unravel_index(int(seed), (Hp // p, Wp // p))])
    return [xs.min() * p, ys.min() * p, min((xs.max() + 1) * p, W), min((ys.max() + 1) * p, H)]


def test_lost_paper_equals_the_official_procedure():
    bb = Backbone("vit_small_patch16_224", pretrained=False).eval()    # random weights: any will do
    g = torch.Generator().manual_seed(1)
    for H, W in ((70, 90), (83, 61)):
        img = torch.rand(3, H, W, generator=g) * 0.3; img[:, H // 3:, W // 4:W // 2] += 0.6   # a bright block
        ours = lost_image(bb, img, lost_config("paper"))["box_px"].tolist()
        fct.test_eq(ours, [float(v) for v in _official_lost_box(bb, img)])
