"""SRT (dvt.resonance): both implementations against a per-pixel loop written from the definition, the released-code
mode, multi-layer and denoised backbones, memory flat in the number of shifts, and bad input."""
import warnings
import numpy as np
import pytest
import torch
import torch.nn as nn
import fastcore.test as fct
from dvt.resonance import srt, shift_grid, PatchMeanBackbone, SRTTeacher, srt_memory_probe, IMAGENET_MEAN


def reference(bb, images, radius, step=1, output="tokens", factor=2, agg="mean", paper=False, paper_patch=None, fill=None):
    """SRT by the definition, one pixel at a time (NumPy): shift with padding, tokens, pixel field read at y + d, aggregate
    over the views that saw each pixel (or, for `paper`, over all N with zeros), then average each output cell."""
    p, s = bb.patch_size, bb.stride
    x = images.numpy()
    B, _, H, W = x.shape
    views = shift_grid(radius, step) + ([(0, 0)] if paper else [])
    fill = fill or ("grey" if paper else "reflect")
    f = (paper_patch or p) if paper else None
    h, w = (H - p) // s + 1, (W - p) // s + 1
    Hf, Wf = (h * f, w * f) if paper else (H, W)
    rows = [[i for i in range(h) if i * s <= y < i * s + p] for y in range(Hf)]      # tokens covering each pixel
    cols = [[j for j in range(w) if j * s <= v < j * s + p] for v in range(Wf)]
    fields, valid = [], []
    for dx, dy in views:
        r = max(abs(dx), abs(dy))
        if fill == "grey":
            g = np.array(IMAGENET_MEAN, dtype=np.float32)[None, :, None, None]
            pad = np.pad(x - g, ((0, 0), (0, 0), (r, r), (r, r))) + g
        else: pad = np.pad(x, ((0, 0), (0, 0), (r, r), (r, r)), mode={"reflect": "reflect", "replicate": "edge"}[fill])
        shifted = pad[..., r - dy:r - dy + H, r - dx:r - dx + W]                 # shifted[y, x] = image[y - dy, x - dx]
        t = bb(torch.from_numpy(np.ascontiguousarray(shifted))).numpy()          # (B, h, w, C)
        fld, val = np.zeros((B, Hf, Wf, t.shape[-1])), np.zeros((Hf, Wf))
        for y in range(Hf):
            for xx in range(Wf):
                sy, sx = y + dy, xx + dx                                           # where this view saw pixel (y, x)
                if not (0 <= sy < Hf and 0 <= sx < Wf): continue
                if paper: fld[:, y, xx] = t[:, sy // f, sx // f]
                else: fld[:, y, xx] = t[:, rows[sy]][:, :, cols[sx]].mean((1, 2))
                val[y, xx] = 1
        fields.append(fld); valid.append(val)
    fields, valid = np.stack(fields), np.stack(valid)
    if agg == "median":
        if paper: pix = np.median(fields, 0)
        else:
            fl = fields.copy(); fl[np.broadcast_to((valid == 0)[:, None, :, :, None], fl.shape)] = np.nan
            pix = np.nanmedian(fl, 0)
    if output == "pixels": cy, cx = [(y, y + 1) for y in range(Hf)], [(v, v + 1) for v in range(Wf)]
    elif output == "tokens":
        k, st = (f, f) if paper else (p, s)
        cy = [(i * st, i * st + k) for i in range((Hf - k) // st + 1)]
        cx = [(j * st, j * st + k) for j in range((Wf - k) // st + 1)]
    else:
        c = (f if paper else s) // factor
        cy, cx = [(i * c, i * c + c) for i in range(Hf // c)], [(j * c, j * c + c) for j in range(Wf // c)]
    out = np.zeros((B, len(cy), len(cx), fields.shape[-1]))
    for a, (y0, y1) in enumerate(cy):
        for b, (x0, x1) in enumerate(cx):
            if agg == "median": out[:, a, b] = pix[:, y0:y1, x0:x1].mean((1, 2))
            elif paper: out[:, a, b] = fields[:, :, y0:y1, x0:x1].sum((0, 2, 3)) / (len(views) * (y1 - y0) * (x1 - x0))
            else: out[:, a, b] = fields[:, :, y0:y1, x0:x1].sum((0, 2, 3)) / valid[:, y0:y1, x0:x1].sum()
    return torch.tensor(out).float()


IMGS = torch.rand(2, 3, 24, 32, generator=torch.Generator().manual_seed(0))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    "Many small ops: one thread is several times faster on a busy 2-core box (restored afterwards)."
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("p,s", [(8, 8), (8, 4), (6, 2)])
@pytest.mark.parametrize("threshold", [None, 0.5])
@pytest.mark.parametrize("output", ["tokens", "pixels", "fine"])
def test_mean_matches_definition(p, s, threshold, output):
    bb = PatchMeanBackbone(p, s, threshold)
    for radius, step in [(0, 1), (2, 1), (3, 2)]:
        ref = reference(bb, IMGS, radius, step, output)
        for impl in ("token", "pixel"):
            got = srt(bb, IMGS, radius, step, output=output, impl=impl, batch_size=5, progress=False)
            fct.test_close(got, ref, eps=1e-5)


@pytest.mark.parametrize("output", ["tokens", "pixels", "fine"])
def test_median_matches_definition(output):
    bb = PatchMeanBackbone(8, 4)
    fct.test_close(srt(bb, IMGS, 2, output=output, agg="median", batch_size=7), reference(bb, IMGS, 2, output=output, agg="median"), eps=1e-5)


@pytest.mark.parametrize("paper_patch", [None, 10])
def test_paper_mode_matches_definition(paper_patch):
    bb, x = PatchMeanBackbone(8), IMGS[..., :24, :24]
    for output in ("tokens", "fine"):
        ref = reference(bb, x, 2, output=output, paper=True, paper_patch=paper_patch)
        for impl in ("token", "pixel"):
            fct.test_close(srt(bb, x, 2, output=output, impl=impl, paper=True, paper_patch=paper_patch, batch_size=7), ref, eps=1e-5)
    fct.test_close(srt(bb, x, 2, agg="median", paper=True), reference(bb, x, 2, agg="median", paper=True), eps=1e-5)


def test_full_period_ensemble_is_translation_equivariant():
    # one view quantises position to the patch grid; the ensemble over a whole period of shifts does not
    bb = PatchMeanBackbone(7)
    x = torch.zeros(1, 3, 70, 70); x[..., 30:37, 25:41] = 1
    moved = torch.zeros_like(x); moved[..., 33:40, 27:43] = 1                       # the same block, 3 px down, 2 px right
    a, b = (srt(bb, im, radius=3, output="pixels") for im in (x, moved))
    fct.test_close(b[0, 3:, 2:], a[0, :-3, :-2], eps=1e-6)
    a0, b0 = (srt(bb, im, radius=0, output="pixels") for im in (x, moved))
    assert (b0[0, 3:, 2:] - a0[0, :-3, :-2]).abs().max() > 0.1                      # a single view is not


@pytest.fixture(scope="module")
def vits():
    from dvt.backbones import Backbone
    vit = Backbone("vit_small_patch14_dinov2.lvd142m", pretrained=False)
    vit7 = Backbone("vit_small_patch14_dinov2.lvd142m", pretrained=False, stride=7); vit7.load_state_dict(vit.state_dict())
    return vit, vit7


def test_implementations_agree_on_a_vit(vits):
    vit, vit7 = vits
    x = torch.rand(1, 3, 42, 56, generator=torch.Generator().manual_seed(1))
    cases = [(vit, dict(radius=1, output=o)) for o in ("tokens", "pixels", "fine")]
    cases += [(vit7, dict(radius=3, step=2, output=o, factor=7)) for o in ("tokens", "pixels", "fine")]
    cases += [(vit, dict(radius=2, paper=True, paper_patch=16, output=o)) for o in ("tokens", "fine")]
    for bb, kw in cases:
        a, b = (srt(bb, x, impl=i, batch_size=16, **kw) for i in ("token", "pixel"))
        fct.test_close(a, b, eps=1e-5 * a.abs().max().item())


def test_layers_and_denoised_backbone(vits):
    from dvt.synthetic import PlantedBackbone
    from dvt.denoiser import Denoiser, DenoisedBackbone
    vit, _ = vits
    x = torch.rand(2, 3, 28, 42, generator=torch.Generator().manual_seed(2))
    many = srt(vit, x, radius=1, layers=[0, 5, -1])
    fct.test_eq([t.shape for t in many], [(2, 2, 3, 384)] * 3)
    fct.test_close(many[2], srt(vit, x, radius=1), eps=1e-4)
    pb = PlantedBackbone(embed_dim=32, patch_size=14)
    dbb = DenoisedBackbone(pb, Denoiser(32, grid=(2, 3))).eval()
    with torch.no_grad():
        fct.test_close(srt(dbb, x, radius=0), dbb(x), eps=1e-5)                    # no shift: exactly the denoised tokens
        out = srt(dbb, x, radius=2, output="pixels")
        fct.test_eq(out.shape, (2, 28, 42, 32))
        fct.test_close(srt(dbb, x, radius=2, layers=[-1])[0], srt(dbb, x, radius=2), eps=1e-5)


def test_batches_never_exceed_batch_size():
    seen = []
    class Spy(nn.Module):
        patch_size = stride = 8
        def forward(self, x): seen.append(x.shape[0]); return PatchMeanBackbone(8)(x)
    srt(Spy(), torch.rand(3, 3, 32, 32), radius=2, batch_size=7)
    assert max(seen) <= 7 and sum(seen) == 3 * 25


def test_mean_memory_is_flat_in_the_number_of_shifts():
    # 168² x 64 channels: one pixel field is 7.2 MB, so keeping the views would cost ~290 MB more at N = 49 than at N = 9
    probe = lambda r, impl: srt_memory_probe("planted:64:14", size=168, radius=r, output="pixels", impl=impl, batch_size=8, threads=1)
    a, b = probe(1, "auto"), probe(3, "auto")           # the pixel-space implementation: benchmarks/srt_cpu.md
    assert (a["N"], b["N"]) == (9, 49)
    assert b["extra_mb"] - a["extra_mb"] < 40, (a, b)


def test_teacher_is_a_backbone_and_refuses_shared_weights():
    from dvt.backbones import Backbone
    from dvt.distillation import check_teacher, make_student
    tiny = Backbone("vit_tiny_patch16_224", pretrained=False, depth=1)
    t = SRTTeacher(tiny, radius=1)
    x = torch.rand(2, 3, 32, 48)
    fct.test_eq(t(x).shape, (2, 2, 3, 192)); fct.test_eq((t.patch_size, t.stride, t.embed_dim), (16, 16, 192))
    fct.test_close(t(x), srt(tiny, x, radius=1), eps=1e-6)
    fct.test_fail(lambda: check_teacher(tiny, t), contains="make_student")
    check_teacher(make_student(tiny), t)
    fct.test_fail(lambda: SRTTeacher(tiny, output="pixels"), contains="cannot be set")


def test_bad_input():
    bb, x = PatchMeanBackbone(14), torch.rand(1, 3, 56, 56)
    fct.test_fail(lambda: srt(bb, x, agg="mode"), contains="agg='mode' is unknown")
    fct.test_fail(lambda: srt(bb, x, output="grid"), contains="output='grid' is unknown")
    fct.test_fail(lambda: srt(bb, torch.rand(1, 3, 57, 56)), contains="resize or crop to 56 or 70")
    fct.test_fail(lambda: srt(bb, x, radius=1.5), contains="radius=1.5")
    fct.test_fail(lambda: srt(bb, x, step=-1), contains="step=-1")
    fct.test_fail(lambda: srt(bb, x, output="fine", factor=3), contains="factor in [2, 7, 14]")
    fct.test_fail(lambda: srt(bb, x, layers=[1]), contains="features(images, layers=...)")
    fct.test_fail(lambda: srt(PatchMeanBackbone(14, 7), x, paper=True), contains="stride == patch")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always"); srt(bb, x, radius=14)
    assert any("not sub-token" in str(m.message) for m in w)
    with warnings.catch_warnings():
        warnings.simplefilter("error"); srt(bb, x, radius=13)                        # below the patch: no warning
