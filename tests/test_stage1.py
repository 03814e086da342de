"""Stage 1 (dvt.views, dvt.fields, dvt.stage1): recovery of the planted parts, determinism, phases, bad input."""
import pytest
import torch
import torch.nn as nn
import fastcore.test as fct
import numpy as np
import torch.nn.functional as F
from PIL import Image
from dvt.data import sample_image
from dvt.stage1 import (denoise_image, denoise_images, recovery_metrics, stage1_config, PRESETS, lr_at, phase2_start, prepare_image,
                        fit_stack, step_loss, token_lanes, draw_tokens, GroupAdam, _pool)
from dvt.fields import NoiseModel, NoiseModelStack
from dvt.synthetic import PlantedBackbone

# a cheap but real setting: 16x16 token grid, 32 views, 600 steps (about 10 s of CPU)
CHEAP = dict(size=256, n_views=32, steps=600, max_per_token=1.0)


@pytest.fixture(scope="module")
def planted(): return PlantedBackbone()


@pytest.fixture(scope="module")
def astronaut(planted):
    return denoise_image(planted, sample_image("astronaut"), **CHEAP)


def test_recovers_the_planted_parts(planted, astronaut):
    m = recovery_metrics(astronaut, planted.parts(astronaut.image[None]))
    # measured 2026-11: raw 1.31, clean 0.265 (ratio 0.20), artifact cos 0.991, artifact left 0.002, residual cos 0.99
    assert m["raw_err"] > 1.0, m                       # the planted artifact really corrupts the raw tokens
    assert m["err_ratio"] < 0.3, m                      # F removes most of the error ...
    assert abs(m["artifact_left_clean"]) < 0.02, m      # ... and nearly all of the artifact
    assert m["artifact_cos"] > 0.97, m                  # G is the planted artifact
    assert m["residual_cos"] > 0.9, m                   # h finds the planted outliers


def test_no_learning_fails_the_threshold(planted):
    "The thresholds above can fail: two steps of fitting leave the error where it was."
    r = denoise_image(planted, sample_image("astronaut"), **{**CHEAP, "steps": 2, "n_views": 2})
    m = recovery_metrics(r, planted.parts(r.image[None]))
    assert m["err_ratio"] > 0.5 and m["artifact_cos"] < 0.97, m


def test_outputs_and_phases(astronaut):
    r = astronaut
    fct.test_eq([t.shape for t in (r.raw, r.clean, r.artifact, r.residual)], [(16, 16, 64)] * 4)
    fct.test_eq(r.losses.shape, (600, 4)); fct.test_eq(r.image.shape, (3, 256, 256)); fct.test_eq(len(r.views), 33)
    h = r.loss_curve("h")
    assert (h[:300] == 0).all() and (h[300:] > 0).all()     # h is switched on at half time, not before
    assert r.loss_curve("total")[-50:].mean() < 0.2 * r.loss_curve("total")[:50].mean()
    assert set(r.timings) == {"extract", "fit", "total", "images_per_fit"} and r.timings["images_per_fit"] == 1
    fct.test_close(r.denoised, r.raw - r.artifact - r.residual)


def test_g_frozen_after_switch(planted):
    img = sample_image("coffee")
    a = denoise_image(planted, img, size=128, preset="smoke", steps=40, switch=0.5)
    c = denoise_image(planted, img, size=128, preset="smoke", steps=40, switch=0.0)    # G frozen from the start
    d = denoise_image(planted, img, size=128, preset="smoke", steps=1, switch=0.0)
    fct.test_eq(c.artifact, d.artifact)                                                  # never updated: its initial value
    assert not torch.equal(a.artifact, c.artifact)                                       # updated in phase 1


def test_deterministic_on_cpu(planted):
    img = sample_image("chelsea")
    a = denoise_image(planted, img, size=128, preset="smoke")
    b = denoise_image(planted, img, size=128, preset="smoke")
    c = denoise_image(planted, img, size=128, preset="smoke", seed=1)
    assert torch.equal(a.clean, b.clean) and torch.equal(a.losses, b.losses)
    assert not torch.equal(a.clean, c.clean)


def test_batched_fit_is_the_per_image_fit(planted):
    "Fitting images together (one NoiseModelStack) gives each image what it gets alone: no mixing between images."
    imgs = [sample_image("coffee"), torch.rand(3, 128, 128), sample_image("rocket")]   # a photo, noise, another photo
    kw = dict(size=128, preset="smoke", steps=30)
    alone = [denoise_image(planted, im, seed=s, **kw) for s, im in zip((5, 6, 7), imgs)]
    together = denoise_images(planted, imgs, seeds=[5, 6, 7], batch_images=2, progress=False, **kw)   # groups of 2 and 1
    assert [r.timings["images_per_fit"] for r in together] == [2, 2, 1]
    for a, b in zip(alone, together):
        torch.testing.assert_close(b.clean, a.clean, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(b.artifact, a.artifact, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(b.residual, a.residual, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(b.losses, a.losses, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(together[0].clean, together[2].clean)                      # the images did differ
    with pytest.raises(ValueError, match="one seed per image"): denoise_images(planted, imgs, seeds=[1], **kw)
    with pytest.raises(ValueError, match="batch_images >= 1"): denoise_images(planted, imgs, batch_images=0, **kw)


def test_inputs_pil_path_tensor(planted, tmp_path):
    x = sample_image("coffee")
    Image.fromarray((x.permute(1, 2, 0) * 255).round().byte().numpy()).save(tmp_path / "c.png")
    a = denoise_image(planted, tmp_path / "c.png", size=64, preset="smoke")
    b = denoise_image(planted, Image.open(tmp_path / "c.png"), size=64, preset="smoke")
    c = denoise_image(planted, str(tmp_path / "c.png"), size=(64, 64), preset="smoke")
    assert torch.equal(a.clean, b.clean) and torch.equal(a.clean, c.clean)


def test_presets():
    p = PRESETS["paper"]
    fct.test_eq((p.n_views, p.steps, p.n_levels, p.n_features, p.base_res, p.max_res, p.tokens_per_step),
                (768, 25_000, 16, 8, 16, 1024, 2048))
    fct.test_eq((p.lr, p.min_lr, p.betas, p.eps, p.warmup, p.switch, p.h_weight, p.l1_weight), (1e-2, 1e-3, (0.9, 0.99), 1e-15, 0.1, 0.5, 0.1, 0.02))
    fct.test_eq((p.weight_decay, p.loss_scale, p.warmup_kind, p.switch_after, p.resize, p.coords, p.grid_kind, p.g_read, p.extract_dtype,
                 p.fit_dtype, p.disable_pe, p.residual),
                (1e-5, 1024.0, "linear", True, "pil_bilinear", "linspace", "tcnn", "grid_sample", "float32", "float32", False, True))
    fct.test_eq((p.ops, PRESETS["default"].ops), ("official", "fused"))
    fct.test_close(lr_at(12_499, p), 1e-3 + 0.9e-2 * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * 9_999 / 22_500)).item()), eps=1e-8)
    # official utils/misc.py: lr * step / warmup_iters (0 at step 0); main_img_denoising.py: phase 2 when step > int(0.5 * T)
    fct.test_eq([lr_at(s, p) for s in (0, 1, 1250)], [0.0, 1e-2 / 2500, 1e-2 * 1250 / 2500])
    fct.test_eq(phase2_start(p), 12_501); fct.test_eq(phase2_start(PRESETS["default"]), 1000)
    d = PRESETS["default"]                                                                   # the default keeps (t + 1) / w
    fct.test_eq((d.warmup_kind, d.switch_after, d.grid_kind, d.g_read, d.loss_scale, d.weight_decay), ("linear+1", False, "dense", "index", 1.0, 0.0))


class NaNBackbone(nn.Module):
    patch_size, stride, embed_dim, input_size = 16, 16, 8, 64
    def forward(self, x): return torch.full((x.shape[0], x.shape[-2] // 16, x.shape[-1] // 16, 8), float("nan"))


class WrongShape(NaNBackbone):
    def forward(self, x): return torch.zeros(x.shape[0], 3, 3, 8)


def test_bad_inputs(planted):
    img = sample_image("astronaut")
    fct.test_fail(lambda: denoise_image(NaNBackbone(), img, preset="smoke"), contains="NaN/Inf")
    fct.test_fail(lambda: denoise_image(WrongShape(), img, preset="smoke"), contains="expected (9, 4, 4, 8)")
    fct.test_fail(lambda: denoise_image(planted, img, preset="smoke", n_views=0), contains="n_views >= 1")
    fct.test_fail(lambda: denoise_image(planted, img, preset="quick"), contains="unknown preset 'quick'")
    fct.test_fail(lambda: denoise_image(planted, img, preset="smoke", stepz=3), contains="did you mean 'steps'")
    fct.test_fail(lambda: denoise_image(planted, torch.rand(3, 20, 20), preset="smoke"), contains="smaller than the 32x32 token grid")
    fct.test_fail(lambda: denoise_image(planted, img, size=16, preset="smoke"), contains="at least 2x2 tokens")
    fct.test_fail(lambda: denoise_image(planted, img, size=100, preset="smoke"), contains="96 or 112")
    fct.test_fail(lambda: denoise_image(planted, img * 255, preset="smoke"), contains="[0, 1]")
    fct.test_fail(lambda: denoise_image(nn.Identity(), img, preset="smoke"), contains="patch_size")
    fct.test_fail(lambda: denoise_image(planted, "no/such/image.png", preset="smoke"), contains="not found")
    fct.test_fail(lambda: stage1_config(extract_dtype="fp8"), contains="extract_dtype")


def test_bad_values_named():
    img = sample_image("astronaut")
    for kw, msg in [(dict(extract_batch=0), "extract_batch >= 1"), (dict(extract_batch=-1), "extract_batch >= 1"),
                    (dict(field_init=-1e-4), "field_init=-0.0001 must be >= 0"), (dict(steps=10.0), "steps=10.0 must be an int"),
                    (dict(size="64"), "size='64'"), (dict(fit_dtype="fp16"), "fit_dtype='fp16'")]:
        fct.test_fail(lambda: stage1_config("smoke", **kw), contains=msg)
    pb = PlantedBackbone()
    fct.test_fail(lambda: denoise_image(pb, torch.rand(2, 3, 64, 64), size=64, preset="smoke"), contains="denoise_images")
    fct.test_fail(lambda: denoise_image(pb, torch.rand(0, 3, 64, 64), size=64, preset="smoke"), contains="empty")
    fct.test_fail(lambda: denoise_image(pb, torch.rand(1, 3, 0, 0), size=64, preset="smoke"), contains="empty")
    fct.test_fail(lambda: denoise_image(pb, img, size="64", preset="smoke"), contains="size='64'")
    r = denoise_image(pb, torch.rand(1, 3, 64, 64), size=64, preset="smoke", steps=2)     # a batch of one is one image
    assert len(repr(r)) < 200 and "(4, 4, 64)" in repr(r), repr(r)                        # a short repr: shapes, not tensors


def test_paper_full_image_is_8bit_pil_bilinear(tmp_path):
    "The official code resizes the 8-bit image with PIL bilinear (torchvision Resize on a PIL image), then /255."
    x = sample_image("coffee")
    u8 = (x.permute(1, 2, 0) * 255).round().byte().numpy()
    Image.fromarray(u8).save(tmp_path / "c.png")
    want = torch.from_numpy(np.asarray(Image.fromarray(u8).resize((70, 56), Image.BILINEAR)).copy()).permute(2, 0, 1).float() / 255
    fct.test_eq(prepare_image(tmp_path / "c.png", (56, 70), (4, 5), "pil_bilinear"), want)
    fct.test_eq(prepare_image(x, (56, 70), (4, 5), "pil_bilinear"), want)
    assert (prepare_image(x, (56, 70), (4, 5)) - want).abs().max() > 1e-3                  # the default (float bicubic) differs


def _tiny(kind="dense", read="index", seed=0, dim=16):
    torch.manual_seed(seed)
    return NoiseModel(dim, (4, 4), n_levels=3, n_features=2, base_res=2, max_res=16, grid_kind=kind, g_read=read)


def test_weight_decay_is_the_official_arithmetic():
    "paper: Adam(wd=1e-5, eps=1e-15) on the gradients of 1024 x loss (GradScaler(2**10) never unscaled), as torch.optim.Adam does it."
    cfg = stage1_config("paper", steps=6, warmup=0.0, switch=1.0, tokens_per_step=64)   # phase 1 only
    y, c = torch.randn(1, 48, 16) * 1e-3, torch.rand(1, 48, 2)                                   # tiny tokens: eps matters
    ours, ref = _tiny("tcnn", "grid_sample"), _tiny("tcnn", "grid_sample")
    st = NoiseModelStack([ours])
    fit_stack(st, y, c, 16, cfg, [3]); st.unstack()
    rst = NoiseModelStack([ref]); pool = _pool(y, c, [3], 64)
    groups = dict(F=[rst.grid_table, *rst.f_w, *rst.f_b], G=[rst.table])
    opt = torch.optim.Adam([p for ps in groups.values() for p in ps], lr=0, betas=(0.9, 0.99), eps=1e-15, weight_decay=1e-5)
    for t in range(6):
        for gr in opt.param_groups: gr["lr"] = lr_at(t, cfg)
        loss, _ = step_loss(rst, pool, torch.tensor(t), 16, False, stage1_config(cfg, loss_scale=1.0))
        (loss * torch.tensor(1024.0)).backward(); opt.step(); opt.zero_grad()               # the scaler's multiply, no unscale
    rst.unstack()
    for p, q in zip(ours.parameters(), ref.parameters()): torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-9)
    wrong = _tiny("tcnn", "grid_sample"); sw = NoiseModelStack([wrong])                          # wd 1e-5/1024 on unscaled gradients
    fit_stack(sw, y, c, 16, stage1_config(cfg, loss_scale=1.0, weight_decay=1e-5 / 1024), [3]); sw.unstack()
    assert not torch.allclose(wrong.F.grid.table, ours.F.grid.table, rtol=1e-6, atol=0)


def _old_F(m, xy):
    "The previous implementation's F: one grid_sample per level (align_corners, border) + cat, then the MLP."
    g = (xy * 2 - 1).view(1, -1, 1, 2)
    feats = torch.cat([F.grid_sample(m.F.grid.level(l).permute(2, 0, 1)[None], g, align_corners=True, padding_mode="border")[0, :, :, 0]
                       for l in range(len(m.F.grid.resolutions))]).T
    return m.F.mlp(feats)


def test_equal_to_the_previous_implementation():
    "The default step (one gather, fused losses, grouped fused Adam) = per-level grid_sample, F.cosine_similarity, torch.optim.Adam."
    cfg = stage1_config("default", steps=12, tokens_per_step=64, weight_decay=1e-4)
    y, c = torch.randn(1, 48, 16), torch.rand(1, 48, 2)
    new, old = _tiny(), _tiny()
    st = NoiseModelStack([new]); losses = fit_stack(st, y, c, 16, cfg, [5])[0]; st.unstack()
    opt = torch.optim.Adam(old.parameters(), lr=0, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay, foreach=False)
    lanes, ref = token_lanes([5], 64), []
    for t in range(cfg.steps):
        if t == phase2_start(cfg): old.G.table.requires_grad_(False)
        for gr in opt.param_groups: gr["lr"] = lr_at(t, cfg)
        i = draw_tokens(lanes, torch.tensor(t), 48)[0]
        yt, f, g = y[0, i], _old_F(old, c[0, i]), old.G(i % 16)
        if t >= phase2_start(cfg):
            r = old.h(yt); pred = f + g + r.detach()
            hl = 0.1 * F.mse_loss(r, (yt - f - g).detach()) + 0.02 * r.abs().mean()
        else: pred, hl = f + g, torch.tensor(0.)
        mse, cos = F.mse_loss(pred, yt), 1 - F.cosine_similarity(pred, yt, dim=-1).mean()
        loss = mse + cos + hl; opt.zero_grad(); loss.backward(); opt.step(); ref.append([loss.item(), mse.item(), cos.item(), hl.item()])
    torch.testing.assert_close(losses, torch.tensor(ref), rtol=1e-4, atol=1e-6)
    for p, q in zip(new.parameters(), old.parameters()): torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)


def test_compiled_step_equals_eager():
    "The step traces into one graph per phase (no break; the chapter checks the other two cases) and, compiled, gives eager's numbers."
    y, c = torch.randn(1, 48, 16), torch.rand(1, 48, 2)
    cfg, pool = stage1_config("smoke", tokens_per_step=32), _pool(y, c, [1], 32)
    for kind, read, phase2 in (("dense", "index", True), ("tcnn", "grid_sample", False)):
        ex = torch._dynamo.explain(step_loss)(NoiseModelStack([_tiny(kind, read)]), pool, torch.tensor(2), 16, phase2, cfg)
        fct.test_eq((ex.graph_count, ex.graph_break_count), (1, 0))
    outs = []
    for fn in (step_loss, torch.compile(step_loss, backend="aot_eager", fullgraph=True)):     # AOT autograd: forward and backward graphs
        st = NoiseModelStack([_tiny("tcnn", "grid_sample")]); loss, terms = fn(st, pool, torch.tensor(2), 16, True, cfg); loss.backward()
        outs.append([terms.detach(), *[p.grad for p in st.parameters() if p.grad is not None]])
    for a, b in zip(*outs): torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_official_options():
    pb, img = PlantedBackbone(input_size=64), sample_image("coffee")
    kw = dict(size=64, preset="smoke", steps=20)
    a = denoise_image(pb, img, disable_pe=True, **kw)
    fct.test_eq(a.artifact, torch.zeros_like(a.artifact))                                # G fixed at zero
    b = denoise_image(pb, img, residual=False, **kw)
    fct.test_eq(b.residual, torch.zeros_like(b.residual)); assert (b.loss_curve("h") == 0).all()
    c32, c16 = denoise_image(pb, img, **kw), denoise_image(pb, img, fit_dtype="bfloat16", **kw)
    assert torch.isfinite(c16.clean).all() and not torch.equal(c16.clean, c32.clean)
    assert (c16.clean - c32.clean).norm() < 0.2 * c32.clean.norm()                          # bf16 autocast: close, not equal
    p = denoise_image(pb, img, size=64, preset="paper", n_views=3, steps=8, n_levels=4, max_res=64)   # the paper path end to end
    assert torch.isfinite(p.clean).all() and p.views.rule == "linspace" and p.model.F.grid.layout.kind == "tcnn"


def test_ops_per_step_budget():
    "Issue 17's measure (profiler aten:: events per fit step, nested ones included) at tiny sizes: the count does not depend on sizes."
    from torch.profiler import profile, ProfilerActivity
    def events(steps):
        cfg = stage1_config("paper", steps=steps, tokens_per_step=64, compile="off", ops="fused")   # the fused path (paper's own: official calls)
        st = NoiseModelStack([_tiny("tcnn", "grid_sample", dim=32)])
        y, c = torch.randn(1, 48, 32), torch.rand(1, 48, 2)
        with profile(activities=[ProfilerActivity.CPU]) as p: fit_stack(st, y, c, 16, cfg, [1])
        return sum(1 for e in p.events() if e.name.startswith("aten::"))
    per_step = (events(40) - events(20)) / 20
    assert per_step <= 460, per_step                                                      # 1,333 before the rewrite


def test_compile_failure_falls_back_to_eager(monkeypatch):
    "A compiler that fails (none installed, an unsupported op) costs a warning, not the run: the eager step gives the same numbers."
    def broken(*a, **k):
        def fn(*a2, **k2): raise RuntimeError("no compiler")
        return fn
    cfg = stage1_config("smoke", steps=6, tokens_per_step=32, compile="on")
    y, c = torch.randn(1, 48, 16), torch.rand(1, 48, 2)
    with monkeypatch.context() as m:
        m.setattr(torch, "compile", broken)
        with pytest.warns(UserWarning, match="fitting eagerly"): a = fit_stack(NoiseModelStack([_tiny()]), y, c, 16, cfg, [1])
    b = fit_stack(NoiseModelStack([_tiny()]), y, c, 16, stage1_config(cfg, compile="off"), [1])
    fct.test_eq(a, b)


def _official_loop(model: NoiseModel, y, c, hw, cfg, draws):
    """The official stage-1 loop written from its formulas (Jiawei-Yang/Denoising-ViT 82704df: main_img_denoising.py,
    dvt/models/offline_denoiser.py, utils/misc.py) on separate modules: G a (1, C, h, w) parameter read by grid_sample at
    linspace(-1, 1), Linear MLPs, torch.optim.Adam over all parameters, loss x tensor(1024.) never unscaled.
    Only F's grid encoding is dvt's tcnn layout (tiny-cuda-nn needs CUDA). Returns the per-step losses."""
    import math, itertools
    h, w = model.G.table.shape[:2]
    G = nn.Parameter(model.G.table.detach().permute(2, 0, 1)[None].clone())                   # (1, C, h, w)
    grid, fmlp, hmlp = model.F.grid, model.F.mlp, model.h.mlp
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    nodes = torch.stack([xx, yy], -1).view(-1, 2)
    opt = torch.optim.Adam(itertools.chain([G], hmlp.parameters(), grid.parameters(), fmlp.parameters()), lr=cfg.lr, eps=1e-15,
                           weight_decay=cfg.weight_decay, betas=(0.9, 0.99))
    T, wu, out = cfg.steps, int(cfg.warmup * cfg.steps), []
    for step in range(T):
        if step > int(cfg.switch * T): G.requires_grad = False
        i = draws[step]
        yt, xy = y[i], c[i]
        lr = cfg.lr * step / wu if step < wu else \
            cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * (step - wu) / (T - wu)))
        for g in opt.param_groups: g["lr"] = lr
        sp = F.grid_sample(G, nodes[i % hw][None, None], mode="bilinear", align_corners=True).squeeze().permute(1, 0)
        f = fmlp(grid(xy))
        if step > int(cfg.switch * T):
            r = hmlp(yt); pred = f + sp + r.detach()
        else: r, pred = None, sp + f
        loss = F.mse_loss(pred, yt) + (1 - F.cosine_similarity(pred, yt, dim=-1).mean())
        if r is not None:
            loss += 0.1 * F.mse_loss(r, (yt - f - sp).detach()); loss += 0.02 * r.abs().mean()
        opt.zero_grad(); (loss * torch.full((), 1024.0)).backward(); opt.step(); out.append(loss.item())
    with torch.no_grad(): model.G.table.copy_(G[0].permute(1, 2, 0))
    return torch.tensor(out)


def test_paper_fit_is_the_official_loop_bit_for_bit():
    "paper (ops='official'): 12 steps through both phases equal the official loop's arithmetic exactly on CPU (losses and F, G, h)."
    cfg = stage1_config("paper", steps=12, tokens_per_step=64, compile="off")
    y, c = torch.randn(1, 48, 16), torch.rand(1, 48, 2)
    ours, ref = _tiny("tcnn", "grid_sample"), _tiny("tcnn", "grid_sample")
    st = NoiseModelStack([ours]); losses = fit_stack(st, y, c, 16, cfg, [4])[0]; st.unstack()
    draws = [draw_tokens(token_lanes([4], 64), torch.tensor(t), 48)[0] for t in range(cfg.steps)]
    ref_losses = _official_loop(ref, y[0], c[0], 16, cfg, draws)
    fct.test_eq(phase2_start(cfg), 7)                                                     # both phases are exercised
    fct.test_eq(losses[:, 0], ref_losses.float())
    for (n, p), q in zip(ours.named_parameters(), ref.parameters()): assert torch.equal(p, q), n
    fused = _tiny("tcnn", "grid_sample"); sf = NoiseModelStack([fused])                     # the fused default arithmetic: close, not equal
    fit_stack(sf, y, c, 16, stage1_config(cfg, ops="fused"), [4]); sf.unstack()
    torch.testing.assert_close(fused.F.mlp[0].weight, ours.F.mlp[0].weight, rtol=1e-3, atol=1e-6)
    assert not all(torch.equal(p, q) for p, q in zip(fused.parameters(), ours.parameters()))


def test_paper_lr_is_the_official_formula_to_the_bit():
    "utils/misc.py adjust_learning_rate: lr * it / w, then min_lr + (lr - min_lr) * 0.5 * (1 + cos(pi * (it - w) / (T - w)))."
    import math
    p = PRESETS["paper"]
    def official(it, T=25_000, w=2_500):
        if it < w: return p.lr * it / w
        return p.min_lr + (p.lr - p.min_lr) * 0.5 * (1.0 + math.cos(math.pi * (it - w) / (T - w)))
    fct.test_eq([s for s in range(25_000) if lr_at(s, p) != official(s)], [])
