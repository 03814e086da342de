"""SRT (dvt.resonance): both implementations against a per-pixel loop written from the definition, the released-code
mode, multi-layer and denoised backbones, memory flat in the number of shifts, and bad input."""
import warnings
import numpy as np
import pytest
import torch
import torch.nn as nn
import fastcore.test as fct
from dvt.resonance import (srt, shift_grid, phase_grid, shift_images, PatchMeanBackbone, SRTTeacher, SRTConfig, IMAGENET_MEAN,
                           noise_ensemble, output_ensemble, bicubic_pool, SRTBaseline)
from dvt.bench_srt import srt_memory_probe


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
        if paper: pix = np.sort(fields, 0)[(len(views) - 1) // 2]               # torch.median: the lower middle value
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
            got = srt(bb, IMGS, radius=radius, step=step, output=output, impl=impl, batch_size=5, progress=False)
            fct.test_close(got, ref, eps=1e-5)


@pytest.mark.parametrize("output", ["tokens", "pixels", "fine"])
def test_median_matches_definition(output):
    bb = PatchMeanBackbone(8, 4)
    fct.test_close(srt(bb, IMGS, radius=2, output=output, agg="median", batch_size=7), reference(bb, IMGS, 2, output=output, agg="median"), eps=1e-5)


@pytest.mark.parametrize("paper_patch", [None, 10])
def test_paper_mode_matches_definition(paper_patch):
    bb, x = PatchMeanBackbone(8), IMGS[..., :24, :24]
    for output in ("tokens", "fine"):
        ref = reference(bb, x, 2, output=output, paper=True, paper_patch=paper_patch)
        for impl in ("token", "pixel"):
            fct.test_close(srt(bb, x, radius=2, output=output, impl=impl, paper=True, paper_patch=paper_patch, batch_size=7), ref, eps=1e-5)
    fct.test_close(srt(bb, x, radius=2, agg="median", paper=True), reference(bb, x, 2, agg="median", paper=True), eps=1e-5)


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
        patch_size = stride = 8; embed_dim = 3
        def forward(self, x): seen.append(x.shape[0]); return PatchMeanBackbone(8)(x)
    srt(Spy(), torch.rand(3, 3, 32, 32), radius=2, batch_size=7)
    assert max(seen) <= 7 and sum(seen) == 3 * 25


def test_mean_memory_is_flat_in_the_number_of_shifts():
    # 168² x 64 channels: one pixel field is 7.2 MB, so keeping the views would cost ~290 MB more at N = 49 than at N = 9
    probe = lambda r, impl: srt_memory_probe("planted", dict(embed_dim=64, patch_size=14), size=168, radius=r, output="pixels", impl=impl,
                                             batch_size=8, threads=1)
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
    fct.test_fail(lambda: srt(bb, torch.rand(1, 3, 57, 56)), contains="resize to 56 or 70")
    fct.test_fail(lambda: srt(bb, x, radius=1.5), contains="radius=1.5")
    fct.test_fail(lambda: srt(bb, x, step=-1), contains="step=-1")
    fct.test_fail(lambda: srt(bb, x, output="fine", factor=3), contains="factor in [2, 7, 14]")
    fct.test_fail(lambda: srt(bb, x, layers=[1]), contains="features(images, layers=..., prefix=...)")
    fct.test_fail(lambda: srt(PatchMeanBackbone(14, 7), x, paper=True), contains="stride == patch")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always"); srt(bb, x, radius=14)
    assert any("not sub-token" in str(m.message) for m in w)
    with warnings.catch_warnings():
        warnings.simplefilter("error"); srt(bb, x, radius=13)                        # below the patch: no warning


# --- the released code's behaviour (issue 15: 8-10), the budget (issue 16: 3), faults (issue 14: 9, 11), config (issue 12)

def test_paper_median_takes_the_lower_middle_value():
    # paper mode, r = 1: N = 10 views (the centre twice). Pixel (0, 0) of a constant image was seen by 5 views (dy, dx in {0, 1},
    # plus the centre again) and is 0 in the other 5: torch.median's lower middle is 0, NumPy's would be c / 2.
    c, bb = 0.7, PatchMeanBackbone(8)
    out = srt(bb, torch.full((1, 3, 16, 16), c), radius=1, agg="median", paper=True, fill="replicate", output="pixels")[0, ..., 0]
    fct.test_eq(out[0, 0].item(), 0.0)
    fct.test_close(out[0, 1], c, eps=1e-6)                       # 7 of 10 views saw it: the median is c
    fct.test_close(out[4:12, 4:12], torch.full((8, 8), c), eps=1e-6)
    default = srt(bb, torch.full((1, 3, 16, 16), c), radius=1, agg="median", output="pixels")[0, ..., 0]
    fct.test_close(default, torch.full((16, 16), c), eps=1e-6)   # the corrected median counts only the views that saw a pixel


class MeanCLS(PatchMeanBackbone):
    "Patch-mean tokens and one prefix token: the mean colour of the whole (shifted) image."
    num_prefix_tokens = 1
    def features(self, images, layers=None, prefix=False):
        t, cls = self(images), images.mean((2, 3))[:, None]                         # (B, h, w, 3), (B, 1, 3)
        if layers is not None: t, cls = [t] * len(layers), [cls] * len(layers)
        return (t, cls) if prefix else t


def test_prefix_tokens_are_averaged_over_all_views():
    bb, x = MeanCLS(8), IMGS[..., :24, :24]
    toks, cls = srt(bb, x, radius=1, prefix=True)
    by_hand = torch.stack([shift_images(x, dx, dy).mean((2, 3)) for dx, dy in shift_grid(1)]).mean(0)[:, None]
    fct.test_close(cls, by_hand, eps=1e-6); fct.test_close(toks, srt(bb, x, radius=1), eps=1e-6)
    grey = torch.tensor(IMAGENET_MEAN)
    paper = torch.stack([shift_images(x, dx, dy, "grey", grey).mean((2, 3)) for dx, dy in shift_grid(1) + [(0, 0)]]).mean(0)[:, None]
    fct.test_close(srt(bb, x, "paper", radius=1, paper_patch=None, prefix=True)[1], paper, eps=1e-6)   # N + 1 views, centre twice
    many, pres = srt(bb, x, radius=1, layers=[0, 1], prefix=True)
    fct.test_eq((len(many), len(pres), pres[0].shape), (2, 2, (2, 1, 3)))
    med = srt(bb, x, radius=1, prefix=True, agg="median")[1]
    fct.test_close(med, torch.stack([shift_images(x, dx, dy).mean((2, 3)) for dx, dy in shift_grid(1)]).median(0).values[:, None], eps=1e-6)


def test_noise_ensemble_scale_seed_and_count():
    x = 0.3 + 0.4 * torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    px = PatchMeanBackbone(1)                                                       # tokens = pixels
    fct.test_close(noise_ensemble(px, x, sigma=0.0, n=3), px(x), eps=1e-7)
    state = torch.random.get_rng_state()
    d = noise_ensemble(px, x, n=1, seed=5) - px(x)                                 # (clean + noisy) / 2 - clean = noise / 2
    assert torch.equal(torch.random.get_rng_state(), state)                        # a local generator only
    for ch, s in enumerate((0.229, 0.224, 0.225)):                                 # sigma 0.01 in normalised units
        assert abs(d[..., ch].std().item() / (0.01 * s / 2) - 1) < 0.06, (ch, d[..., ch].std().item())
    fct.test_eq(noise_ensemble(px, x, n=1, seed=5), noise_ensemble(px, x, n=1, seed=5))
    seen = []
    class Spy(PatchMeanBackbone):
        def forward(self, im): seen.append(len(im)); return super().forward(im)
    noise_ensemble(Spy(8), IMGS, n=4, batch_size=3)
    fct.test_eq((sum(seen), max(seen)), (2 * 5, 3))                                # B · (n + 1) forward images
    fct.test_eq(SRTBaseline(PatchMeanBackbone(8), "noise", n=2)(IMGS).shape, (2, 3, 4, 3))


def test_output_ensemble_by_hand():
    x = IMGS[..., :24, :24]
    ident = lambda im: im                                                           # the predictor is the image itself
    fct.test_close(output_ensemble(ident, x, radius=2), x, eps=1e-6)               # each view, moved back, is the image
    c = torch.full((1, 3, 16, 16), 0.6)
    p = output_ensemble(ident, c, radius=1, paper=True)[0, 0]
    fct.test_close(p[0, 0], 0.6 * 5 / 10, eps=1e-6); fct.test_close(p[0, 5], 0.6 * 7 / 10, eps=1e-6)   # zeros counted, / (N + 1)
    fct.test_close(p[5, 5], 0.6, eps=1e-6)
    bb = PatchMeanBackbone(8)                                                       # a linear head commutes with the average:
    head = lambda im: bb(im).permute(0, 3, 1, 2).repeat_interleave(8, 2).repeat_interleave(8, 3)
    fct.test_close(output_ensemble(head, x, radius=2).permute(0, 2, 3, 1), srt(bb, x, radius=2, output="pixels"), eps=1e-5)
    fct.test_eq(output_ensemble(lambda im: im[:, 0], x, radius=1).shape, (2, 24, 24))   # (B, H, W) predictions stay (B, H, W)
    fct.test_fail(lambda: output_ensemble(lambda im: im[..., :8, :8], x, radius=1), contains="at the image's size")


def _keys(t: float, a: float = -0.75) -> float:
    "The bicubic convolution kernel (Keys, a = -0.75 as in PyTorch)."
    t = abs(t)
    return (a + 2) * t ** 3 - (a + 3) * t ** 2 + 1 if t <= 1 else (a * t ** 3 - 5 * a * t ** 2 + 8 * a * t - 4 * a if t < 2 else 0.0)


def test_bicubic_pool_by_hand():
    p, t = 4, torch.zeros(1, 5, 5, 1); t[0, 2, 2, 0] = 1                           # a delta token
    w = lambda k: sum(_keys((u + 0.5) / p - 0.5 - 2) for u in range(k * p, k * p + p)) / p   # token k's share of token 2 (1-D)
    out = bicubic_pool(t, p)[0, ..., 0]
    fct.test_close(out[2, 2], w(2) ** 2, eps=1e-6); fct.test_close(out[2, 1], w(2) * w(1), eps=1e-6)
    fct.test_close(out[0, 2], w(0) * w(2), eps=1e-6)
    fct.test_close(bicubic_pool(torch.full((1, 3, 4, 2), 0.5), 8), torch.full((1, 3, 4, 2), 0.5), eps=1e-6)   # constants stay
    fct.test_eq(SRTBaseline(PatchMeanBackbone(8), "bicubic")(IMGS).shape, (2, 3, 4, 3))


def test_phases():
    bb = PatchMeanBackbone(7)
    x = torch.rand(1, 3, 35, 42, generator=torch.Generator().manual_seed(4))
    fct.test_eq(phase_grid(7, 7), shift_grid(3))                                   # 7 phases of a 7-px patch: every shift
    fct.test_close(srt(bb, x, phases=7), srt(bb, x, radius=3), eps=1e-6)
    fct.test_close(srt(bb, x, phases=1), bb(x), eps=1e-6)
    seen = []
    class Spy(PatchMeanBackbone):
        def forward(self, im): seen.append(len(im)); return super().forward(im)
    srt(Spy(8), IMGS, "phases")
    fct.test_eq(sum(seen), 2 * 4)                                                   # 2 x 2 half-patch phases: 4 passes per image


class NaNWhen(PatchMeanBackbone):
    "NaN tokens whenever pixel (9, 11) of a view is lit."
    def forward(self, im): t = super().forward(im); t[im[:, 0, 9, 11] > 0.5] = float("nan"); return t


@pytest.mark.parametrize("agg", ["mean", "median"])
def test_nan_tokens_name_the_view(agg):
    img = torch.zeros(2, 3, 32, 32); img[1, :, 10, 10] = 1                        # image 1 shifted by (1, -1) lights (9, 11)
    fct.test_fail(lambda: srt(NaNWhen(8), img, radius=1, agg=agg), contains="image 1 shifted by (dx, dy) = (1, -1)")
    srt(NaNWhen(8), img, radius=0, agg=agg)                                         # no view lights it: fine


def test_memory_limit_chunks_the_views_or_fails_early():
    seen = []
    class Spy(PatchMeanBackbone):
        def forward(self, im): seen.append(len(im)); return super().forward(im)
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(6))
    ref = srt(PatchMeanBackbone(8), x, radius=2, output="fine")
    got = srt(Spy(8), x, radius=2, output="fine", batch_size=50, max_memory_gb=4e-4)   # a 64² view is 49 kB: a handful at a time
    assert 1 <= max(seen) < 10, seen
    fct.test_close(got, ref, eps=1e-6)
    with pytest.raises(MemoryError) as e: srt(PatchMeanBackbone(8), x, radius=2, output="pixels", max_memory_gb=1e-4)
    assert "output='tokens'" in str(e.value) and "max_memory_gb=0.0001" in str(e.value) and "GB" in str(e.value)
    with pytest.raises(MemoryError) as e: srt(PatchMeanBackbone(8), x, radius=2, agg="median", max_memory_gb=1e-4)
    assert "agg='mean'" in str(e.value)
    seen.clear(); srt(Spy(8), x, radius=2, batch_size=50)                          # the default: the free memory, no chunking here
    fct.test_eq(max(seen), 50)


def test_full_size_views_are_never_stacked_beyond_the_view_budget(monkeypatch):
    import dvt.resonance as R
    monkeypatch.setattr(R, "_VIEW_BYTES", 3 * 64 * 64 * 4 * 3)                    # room for three 64² views (an 8000² image: 256 MB)
    seen = []
    class Spy(PatchMeanBackbone):
        def forward(self, im): seen.append(len(im)); return super().forward(im)
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(7))
    fct.test_close(srt(Spy(8), x, radius=1, batch_size=32), srt(PatchMeanBackbone(8), x, radius=1), eps=1e-6)
    fct.test_eq((max(seen), sum(seen)), (3, 9))


def test_config_convention():
    bb, x = PatchMeanBackbone(8), IMGS
    fct.test_close(srt(bb, x, "paper", paper_patch=None, radius=2), srt(bb, x, radius=2, paper=True), eps=1e-7)
    fct.test_close(srt(bb, x, SRTConfig(radius=1, output="fine")), srt(bb, x, radius=1, output="fine"), eps=1e-7)
    fct.test_fail(lambda: srt(bb, x, raduis=2), contains="did you mean 'radius'")
    fct.test_fail(lambda: srt(bb, x, "papr"), contains="did you mean 'paper'")
    fct.test_fail(lambda: srt(bb, x, 2), contains="radius=2")
    fct.test_fail(lambda: srt(bb, x, phases=2, paper=True), contains="cannot be combined")
    t = SRTTeacher(bb, 1, agg="median")
    fct.test_eq((t.config.radius, t.config.agg, t.config.progress), (1, "median", False))
    fct.test_eq(SRTTeacher(bb, preset="phases").config.phases, 2)
    fct.test_close(SRTTeacher(MeanCLS(8), radius=1).prefix_tokens(x[..., :24, :24]), srt(MeanCLS(8), x[..., :24, :24], radius=1, prefix=True)[1], eps=1e-7)
