"""Stage 3 (dvt.distillation): any teacher callable or precomputed targets, exact resume, save/reload through Backbone, the CLI
with an official-format denoiser, and clear errors."""
import json
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import fastcore.test as fct
from timm.models.vision_transformer import Block

from dvt.backbones import Backbone
from dvt.data import sample_images, resize_images
import dvt.train
from dvt.denoiser import Denoiser, DenoisedBackbone, token_loss
from dvt.train import TrainConfig, STATE_FILE
from dvt.runs import module_fingerprint
from dvt.distillation import distill, distill_loss, make_student, distill_cli, ImageSet, DISTILL_PRESETS

NAME = "vit_small_patch14_dinov2.lvd142m"
SIZE = 42  # a 3 x 3 grid: cheap on CPU


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    vit = Backbone(NAME, pretrained=False)
    teacher = DenoisedBackbone(vit, Denoiser(384, 3))
    return vit, teacher, sample_images(4)


def test_resume_after_interruption_is_exact(setup, tmp_path):
    vit, teacher, ims = setup
    cfg = TrainConfig(steps=4, batch_size=2, blr=4e-3, save_every=4)
    a = make_student(vit); distill(a, teacher, ims, tmp_path / "a", cfg, size=SIZE, progress=False, curve=None)
    b = make_student(vit)
    def stop(step, loss):
        if step == 2: raise KeyboardInterrupt   # Ctrl-C: the loop saves step 2 before stopping
    with pytest.raises(KeyboardInterrupt):
        distill(b, teacher, ims, tmp_path / "b", cfg, size=SIZE, progress=False, curve=None, callback=stop)
    b = make_student(vit)  # a fresh process would start from the untrained weights
    hb = distill(b, teacher, ims, tmp_path / "b", cfg, size=SIZE, progress=False, curve=None)
    fct.test_eq(len(hb), 4)
    for k, v in a.state_dict().items(): assert torch.equal(v, b.state_dict()[k]), k
    # the teacher did not move, and its requires_grad flags are the caller's (not switched off behind their back)
    flags = [p.requires_grad for p in teacher.parameters()]
    fp = module_fingerprint(teacher)
    distill(make_student(vit), teacher, ims, tmp_path / "c", TrainConfig(steps=1, batch_size=2), size=SIZE, progress=False, curve=None)
    fct.test_eq(module_fingerprint(teacher), fp); fct.test_eq([p.requires_grad for p in teacher.parameters()], flags)


def test_saved_student_reloads_through_backbone(setup, tmp_path):
    vit, teacher, ims = setup
    s = make_student(vit)
    h = distill(s, teacher, ims, tmp_path / "run", TrainConfig(steps=4, batch_size=2, blr=4e-3, save_every=4), size=SIZE,
                progress=False, curve=None)
    again = Backbone(NAME, checkpoint=tmp_path / "run" / "student.safetensors")
    for k, v in s.model.state_dict().items(): assert torch.equal(v, again.model.state_dict()[k]), k
    fct.test_eq(distill_loss(again, teacher, ims, size=SIZE), distill_loss(s, teacher, ims, size=SIZE))
    assert any(not torch.equal(v, vit.model.state_dict()[k]) for k, v in s.model.state_dict().items())  # it was trained


def test_any_callable_teacher_and_targets(setup, tmp_path):
    vit, teacher, ims = setup
    fn = lambda x: teacher(x) * 0.5                      # a plain function as teacher
    h1 = distill(make_student(vit), fn, ims, tmp_path / "f", TrainConfig(steps=1, batch_size=4, save_every=1), size=SIZE,
                 flip=False, progress=False, curve=None)
    with torch.inference_mode():
        tg = [fn(resize_images(im, SIZE)[None])[0] for im in ims]
    h2 = distill(make_student(vit), None, ims, tmp_path / "t", TrainConfig(steps=1, batch_size=4, save_every=1), size=SIZE,
                 flip=False, targets=tg, progress=False, curve=None)
    fct.test_close(h1[0], h2[0], eps=1e-5)


class TinyStudent(nn.Module):
    "A non-timm student obeying the backbone contract (8-px patches, 16 channels)."
    patch_size = stride = 8; embed_dim = 16; input_size = 64
    def __init__(self): super().__init__(); self.proj = nn.Conv2d(3, 16, 8, 8)
    def forward(self, x): return self.proj(x).permute(0, 2, 3, 1)


def test_generic_student_and_planted_teacher(tmp_path):
    from dvt.synthetic import PlantedBackbone
    pb = PlantedBackbone(embed_dim=16, patch_size=8, input_size=64)
    torch.manual_seed(0); st = TinyStudent()
    ims = sample_images(3)
    before = distill_loss(st, pb, ims)
    distill(st, pb, ims, tmp_path / "run", TrainConfig(steps=30, batch_size=3, blr=5e-2, save_every=30), progress=False, curve=None)
    assert distill_loss(st, pb, ims) < before
    assert (tmp_path / "run" / "student.safetensors").is_file()


def test_errors(setup, tmp_path):
    vit, teacher, ims = setup
    cfg = TrainConfig(steps=1, batch_size=2, save_every=1)
    fct.test_fail(lambda: distill(vit, teacher, ims, tmp_path / "x", cfg, size=SIZE), contains="make_student")
    fct.test_fail(lambda: distill(make_student(vit), 3, ims, tmp_path / "x", cfg, size=SIZE), contains="callable")
    fct.test_fail(lambda: distill(make_student(vit), None, ims, tmp_path / "x", cfg, size=SIZE), contains="exactly one")
    fct.test_fail(lambda: distill(make_student(vit), lambda x: torch.zeros(len(x), 2, 2, 384), ims, tmp_path / "y", cfg,
                                  size=SIZE, progress=False, curve=None), contains="student's grid")
    fct.test_fail(lambda: distill(make_student(vit), teacher, ims, tmp_path / "x", "fast"), contains="smoke")
    fct.test_fail(lambda: ImageSet(ims, SIZE, targets=[torch.zeros(3, 3, 384)]), contains="one (h, w, C) target per image")
    fct.test_fail(lambda: ImageSet(tmp_path, SIZE), contains="no images")
    fct.test_fail(lambda: ImageSet(tmp_path / "nope", SIZE), contains="not found")


def test_cli_with_an_official_format_denoiser(tmp_path):
    from PIL import Image
    (tmp_path / "imgs" / "a").mkdir(parents=True)
    for i, im in enumerate(sample_images(2)):
        Image.fromarray((resize_images(im, 64).permute(1, 2, 0) * 255).round().byte().numpy()).save(tmp_path / "imgs" / "a" / f"{i}.jpg")
    g = torch.Generator().manual_seed(0)
    blk = Block(384, 6, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6))
    sd = {f"denoiser.{k}": torch.randn(v.shape, generator=g) * 0.02 for k, v in blk.state_dict().items()}
    torch.save({"denoiser": {**sd, "pos_embed": torch.randn(1, 1369, 384, generator=g) * 0.02}}, tmp_path / f"{NAME}.pth")
    distill_cli([NAME, str(tmp_path / "imgs"), str(tmp_path / "out"), "--denoiser", str(tmp_path / f"{NAME}.pth"),
                 "--random-init", "--size", str(SIZE), "--steps", "2", "--batch-size", "2", "--no-progress",
                 "--curve", str(tmp_path / "c.png")])
    again = Backbone(NAME, checkpoint=tmp_path / "out" / "student.safetensors")
    with torch.inference_mode(): fct.test_eq(again(torch.rand(1, 3, SIZE, SIZE)).shape, (1, 3, 3, 384))


def test_presets():
    fct.test_eq(DISTILL_PRESETS["paper"].total_steps(1_281_167), 12_512)
    fct.test_close(DISTILL_PRESETS["paper"].lr, 2e-4 * 2 ** 0.5, eps=1e-12)


# ---------------------------------------------------------------- crash safety, bad images, messages (issue 14)
class Killed(BaseException):
    "Stands for SIGKILL: no handler of the loop runs (it is not an Exception nor a KeyboardInterrupt)."


def test_kill_between_student_and_state_at_the_last_step(setup, tmp_path, monkeypatch):
    vit, teacher, ims = setup
    cfg = TrainConfig(steps=2, batch_size=2, blr=4e-3, save_every=1)
    a = make_student(vit); distill(a, teacher, ims, tmp_path / "a", cfg, size=SIZE, progress=False, curve=None)
    def fault(name):
        if name == "product-saved:2": raise Killed()
    monkeypatch.setattr(dvt.train, "fault_point", fault)
    with pytest.raises(Killed): distill(make_student(vit), teacher, ims, tmp_path / "b", cfg, size=SIZE, progress=False, curve=None)
    monkeypatch.undo()
    from safetensors import safe_open
    with safe_open(str(tmp_path / "b" / STATE_FILE), "pt") as f: fct.test_eq(f.metadata()["step"], "1")
    b = make_student(vit); distill(b, teacher, ims, tmp_path / "b", cfg, size=SIZE, progress=False, curve=None)
    for k, v in a.state_dict().items(): assert torch.equal(v, b.state_dict()[k]), k
    again = Backbone(NAME, checkpoint=tmp_path / "b" / "student.safetensors")
    for k, v in a.model.state_dict().items(): assert torch.equal(v, again.model.state_dict()[k]), k
    fct.test_eq(oct((tmp_path / "b" / "student.safetensors").stat().st_mode & 0o777), oct(0o666 & ~_umask()))


def _umask():
    import os
    u = os.umask(0); os.umask(u); return u


def test_resume_with_another_teacher_or_images_is_refused(setup, tmp_path):
    vit, teacher, ims = setup
    cfg = TrainConfig(steps=2, batch_size=2, save_every=2)
    distill(make_student(vit), teacher, ims, tmp_path / "r", cfg, size=SIZE, progress=False, curve=None)
    other = DenoisedBackbone(vit, Denoiser(384, 3))
    fct.test_fail(lambda: distill(make_student(vit), other, ims, tmp_path / "r", cfg, size=SIZE, progress=False, curve=None),
                  contains="teacher: sha256:")
    fct.test_fail(lambda: distill(make_student(vit), teacher, ims[:3] + ims[:1], tmp_path / "r", cfg, size=SIZE, progress=False,
                                  curve=None), contains="images: sha256:")


def test_unreadable_image_is_skipped_by_name(tmp_path, capsys):
    from PIL import Image
    from dvt.denoiser_io import save_denoiser
    d = tmp_path / "imgs"; d.mkdir()
    for i, im in enumerate(sample_images(3)):
        Image.fromarray((resize_images(im, 64).permute(1, 2, 0) * 255).round().byte().numpy()).save(d / f"{i}.jpg")
    (d / "1.jpg").write_bytes(b"\xff\xd8 truncated jpeg")
    den = save_denoiser(Denoiser(384, 3), tmp_path / "den.safetensors")
    distill_cli([NAME, str(d), str(tmp_path / "out"), "--denoiser", str(den), "--random-init", "--size", str(SIZE),
                 "--steps", "2", "--batch-size", "3", "--no-progress", "--curve", "none", "--workers", "0"])
    out, err = capsys.readouterr()
    assert "skipping unreadable image" in err and "1.jpg" in err and err.count("Traceback") == 0, err
    assert "wrote" in out and (tmp_path / "out" / "student.safetensors").is_file()
    (d / "0.jpg").write_bytes(b""); (d / "2.jpg").write_bytes(b"")
    with pytest.raises(SystemExit) as e:
        distill_cli([NAME, str(d), str(tmp_path / "none"), "--denoiser", str(den), "--random-init", "--size", str(SIZE),
                     "--steps", "1", "--batch-size", "1", "--no-progress"])
    assert e.value.code == 2 and "none of the 3 training images can be read" in capsys.readouterr().err


def test_help_says_what_it_does_and_what_a_rerun_does(capsys):
    with pytest.raises(SystemExit): distill_cli(["--help"])
    out = capsys.readouterr().out
    assert out.split("\n\n")[1].startswith("Fine-tune a timm ViT"), out[:300]
    assert "Killed and rerun" in out and "Unreadable images are skipped" in out and "Console entry point" not in out


def test_dvt_distill_stays_the_function():
    import dvt
    f = dvt.distill
    import dvt.distillation
    assert callable(dvt.distill) and dvt.distill is f is dvt.distillation.distill
