"""The backbone contract end to end: a third-party module with only `patch_size`, `embed_dim` and `forward` runs through
every stage of dvt, and the package's public names stay callable whatever submodules are imported."""
import importlib, pkgutil
from pathlib import Path
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import dvt
from dvt.contract import check_backbone, BackboneSpec


class ThirdParty(nn.Module):
    "A backbone written outside dvt: 8-px patches linearly embedded to 12 channels; nothing but the three required members."
    patch_size, embed_dim = 8, 12

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(3 * 8 * 8, 12)

    def forward(self, images):                                    # (B, 3, H, W) in [0, 1] -> (B, H/8, W/8, 12)
        B, _, H, W = images.shape
        patches = F.unfold(images, 8, stride=8).transpose(1, 2)   # (B, h*w, 192)
        return self.proj(patches).reshape(B, H // 8, W // 8, 12)


@pytest.fixture(scope="module")
def bb():
    torch.manual_seed(0)
    return ThirdParty().eval()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return dvt.make_fixtures(tmp_path_factory.mktemp("data"))


def test_the_contract_fills_the_defaults(bb):
    assert check_backbone(bb) == BackboneSpec(8, 8, 12, 256, 0, "ThirdParty")


def test_stage1_one_image_several_and_a_folder(bb, tmp_path):
    imgs = [dvt.sample_image("astronaut"), dvt.sample_image("coffee")]
    r = dvt.denoise_image(bb, imgs[0], size=64, preset="smoke")
    assert r.clean.shape == (8, 8, 12)
    rs = dvt.denoise_images(bb, imgs, size=64, preset="smoke", progress=False)
    assert [x.clean.shape for x in rs] == [(8, 8, 12)] * 2
    from PIL import Image
    for k, im in enumerate(imgs): Image.fromarray((im.permute(1, 2, 0).numpy() * 255).astype("uint8")).save(tmp_path / f"{k}.png")
    dvt.denoise_folder(tmp_path, tmp_path / "out", bb, preset="smoke", size=64, progress=False)
    assert len(list((tmp_path / "out").glob("*.safetensors"))) == 2


def test_denoiser_srt_and_distillation(bb, tmp_path):
    x = torch.rand(2, 3, 64, 48)
    db = dvt.DenoisedBackbone(bb, dvt.Denoiser(12, grid=8))
    assert db(x).shape == (2, 8, 6, 12) and check_backbone(db).name == "denoised(ThirdParty)"
    assert dvt.srt(bb, x, radius=2).shape == (2, 8, 6, 12)
    assert dvt.SRTTeacher(bb, radius=1)(x).shape == (2, 8, 6, 12)
    from dvt.distillation import make_student
    student = make_student(bb)
    dvt.distill(student, db, [dvt.sample_image("astronaut")], tmp_path / "s3", preset="smoke", size=64, progress=False,
                curve=None, steps=2, save_every=2)
    assert (tmp_path / "s3" / "student.safetensors").is_file() and student(x).shape == (2, 8, 6, 12)


def test_probes_lost_and_davis(bb, data, tmp_path):
    seg = dvt.run_seg_probe(bb, data, "voc", preset="smoke", iters=4)
    assert 0 <= seg["mIoU"] <= 100
    depth = dvt.run_depth_probe(bb, data, preset="smoke", iters=4)
    assert depth["rmse"] > 0
    lost = dvt.run_lost(bb, data)
    assert 0 <= lost["CorLoc"] <= 100 and lost["features"] == "tokens" and lost["n_images"] > 0
    davis = dvt.run_davis(bb, data, preset="smoke")
    assert 0 <= davis["J&F"] <= 100 and davis["n_objects"] > 0


def test_every_public_name_stays_callable_after_importing_every_submodule():
    import dvt as pkg
    for m in pkgutil.iter_modules(pkg.__path__):
        if not m.name.startswith("_"): importlib.import_module(f"dvt.{m.name}")
    for name in pkg._API:
        obj = getattr(pkg, name)
        assert not isinstance(obj, type(pkg)), f"dvt.{name} is a module, not the public {name}"
    assert callable(pkg.distill) and callable(pkg.srt) and callable(pkg.diagnose)
