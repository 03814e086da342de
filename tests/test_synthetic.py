"""PlantedBackbone: the ground-truth toy backbone. Each test states one property later stages rely on."""
import pytest
import torch
import torch.nn.functional as F
import fastcore.test as fct
from dvt.backbones import Backbone
from dvt.data import sample_image, resize_images
from dvt.synthetic import PlantedBackbone, PlantedConfig, pool_field


@pytest.fixture(scope="module")
def pb(): return PlantedBackbone()


@pytest.fixture(scope="module")
def photo(): return resize_images(sample_image("astronaut"), 256)[None]  # (1, 3, 256, 256)


def test_contract_attributes(pb):
    fct.test_eq((pb.patch_size, pb.stride, pb.embed_dim, pb.num_prefix_tokens, pb.input_size), (16, 16, 64, 0, 512))
    fct.test_eq((pb.num_blocks, pb.layer, pb.name), (1, 0, "planted"))
    fct.test_eq(PlantedBackbone(patch_size=14, embed_dim=32).input_size, 518)
    fct.test_eq(PlantedBackbone(PlantedConfig(embed_dim=32), stride=8).stride, 8)


def test_deterministic_from_seed():
    a, b, c = PlantedBackbone(seed=3), PlantedBackbone(seed=3), PlantedBackbone(seed=4)
    x = torch.rand(1, 3, 64, 64)
    fct.test_eq(a(x), b(x))
    assert not torch.allclose(a(x), c(x))


def test_parts_sum_to_tokens(pb, photo):
    P = pb.parts(photo)
    fct.test_eq(set(P), {"clean", "artifact", "residual"})
    for v in P.values(): fct.test_eq(v.shape, (1, 16, 16, 64))
    fct.test_eq(P["clean"] + P["artifact"] + P["residual"], pb(photo))
    assert P["residual"].norm(dim=-1).max() > 3  # the photo has outliers, so the test is not vacuous


def test_artifact_identical_for_different_images(pb, photo):
    other = resize_images(sample_image("coffee"), 256)[None]
    Pa, Pb = pb.parts(photo), pb.parts(other)
    fct.test_eq(Pa["artifact"], Pb["artifact"])
    assert not torch.allclose(Pa["clean"], Pb["clean"])


def test_artifact_rms_and_high_norm_positions(pb):
    A = pb.artifact_tokens(32, 32)
    hn = pb.high_norm_positions(32, 32)
    mask = torch.zeros(32, 32, dtype=torch.bool); mask[hn[:, 0], hn[:, 1]] = True
    fct.test_eq(int(mask.sum()), pb.config.n_high_norm)
    fct.test_close(A[~mask].norm(dim=-1).pow(2).mean().sqrt(), pb.config.artifact_scale, eps=0.05)
    assert A[mask].norm(dim=-1).min() > 3 * A[~mask].norm(dim=-1).pow(2).mean().sqrt()


def test_clean_flip_equivariant(pb, photo):
    fct.test_close(pb.clean_tokens(photo.flip(-1)), pb.clean_tokens(photo).flip(2), eps=1e-5)


def test_clean_aligned_crop(pb, photo):
    fct.test_close(pb.clean_tokens(photo[..., 32:160, 48:240]), pb.clean_tokens(photo)[:, 2:10, 3:15], eps=1e-5)


def test_clean_zoom(pb, photo):
    small = photo[..., :64, :96]
    zoom = F.interpolate(small, scale_factor=2, mode="nearest")
    up = F.interpolate(pb.clean_pixels(small).permute(0, 3, 1, 2), scale_factor=2, mode="nearest").permute(0, 2, 3, 1)
    fct.test_close(pb.clean_pixels(zoom), up, eps=1e-5)
    fct.test_close(pb.clean_tokens(zoom), PlantedBackbone(patch_size=8).clean_tokens(small), eps=1e-5)


def test_clean_tokens_pool_the_pixel_field(pb, photo):
    fct.test_close(pb.clean_tokens(photo), pool_field(pb.clean_pixels(photo), 16), eps=1e-5)
    pb8 = PlantedBackbone(stride=8)
    fct.test_close(pb8.clean_tokens(photo), pool_field(pb8.clean_pixels(photo), 16, 8), eps=1e-5)


def test_residual_sparse_and_input_dependent(pb, photo):
    r = pb.residual_tokens(photo).norm(dim=-1) > 2
    assert 0 < r.float().mean() <= 1 / pb.config.outlier_window ** 2 + 0.02
    assert not pb.residual_tokens(torch.rand(1, 3, 128, 128)).any()          # textured noise: no outliers
    flat = pb.residual_tokens(torch.full((1, 3, 128, 128), 0.3)).norm(dim=-1)
    assert (flat > 2).any()                                                  # a flat image: some
    rf = pb.residual_tokens(photo.flip(-1)).norm(dim=-1).flip(-1) > 2
    assert not torch.equal(r, rf)                                            # not consistent across views


def test_stride_gives_denser_grid(photo):
    fct.test_eq(PlantedBackbone(stride=8)(photo).shape, (1, 31, 31, 64))
    fct.test_eq(PlantedBackbone(patch_size=14, stride=7)(torch.rand(1, 3, 224, 224)).shape, (1, 31, 31, 64))


def test_features_and_prefix(pb, photo):
    t, p = pb.features(photo, prefix=True)
    fct.test_eq(t, pb(photo)); fct.test_eq(p.shape, (1, 0, 64))
    fct.test_eq(len(pb.features(photo, layers=[0, -1])), 2)
    cls = PlantedBackbone(cls_token=True)
    fct.test_eq(cls.num_prefix_tokens, 1)
    fct.test_close(cls.prefix_tokens(photo)[:, 0], cls(photo).mean((1, 2)), eps=1e-6)


def test_same_errors_as_backbone(pb):
    bb = Backbone("vit_small_patch14_dinov2.lvd142m", pretrained=False)
    for bad, msg in ((torch.rand(1, 3, 10, 10), "one patch"), (torch.rand(1, 3, 64, 64) * 255, "[0, 1]"),
                     (torch.rand(1, 64, 64, 3), "permute"), (torch.full((1, 3, 64, 64), float("nan")), "NaN")):
        fct.test_fail(lambda: pb(bad), contains=msg)
        fct.test_fail(lambda: bb(bad), contains=msg)
    fct.test_fail(lambda: pb(torch.rand(1, 3, 100, 112)), contains="resize to 96 or 112")
    fct.test_fail(lambda: PlantedBackbone(stride=17), contains="between 1 and")
    fct.test_fail(lambda: pb.features(torch.rand(1, 3, 64, 64), layers=[2]), contains="1 blocks")
    fct.test_fail(lambda: PlantedBackbone(embed_dim=4), contains="embed_dim >= 8")
    fct.test_fail(lambda: pb.artifact_tokens(0, 4), contains="positive")


def test_buffers_follow_the_module(pb):
    sd = pb.state_dict()
    assert {"omega", "proj", "wave_dirs", "residual_dir"} <= set(sd)
    fresh = PlantedBackbone(seed=9); fresh.load_state_dict(sd)
    x = torch.rand(1, 3, 64, 64)
    fct.test_eq(fresh(x), pb(x))
