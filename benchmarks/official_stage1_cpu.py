"""Side by side on CPU: the official DVT stage-1 loop against dvt's `paper` preset, on identical inputs.

Usage (one thread; the official checkout is `Jiawei-Yang/Denoising-ViT`, commit 82704df):

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONPATH=. python benchmarks/official_stage1_cpu.py /path/to/Denoising-ViT \
        [--views 16] [--steps 40] [--work DIR] [--dump 0,1] [--pool official|dvt] [--ops official|fused] [--repeat]
    # on a CUDA machine with tiny-cuda-nn: the same with --device cuda (no stand-ins on the official side)

The official side runs in a child process (its package is also called `dvt`) with the official code imported from the
given path at run time; nothing of it is copied here. Only CUDA-only pieces are replaced there:
  * `tinycudann.Encoding` -> a stand-in built on dvt's emulation (`dvt.fields.GridLayout(kind="tcnn")` + `grid_features`),
    with tcnn's interface: a flat float32 `params` vector (level by level, rows x features), `n_output_dims`;
  * `torch.amp.GradScaler("cuda", 2**10)` -> a scaler whose `scale(loss)` is `loss * tensor(1024.)` (what the CUDA scaler
    does; on a CPU-only machine the real one disables itself and would return the loss unscaled);
  * the DataLoader runs in-process (`num_workers=0`), and timm's `pretrained=True` loads the shared random-init weights;
  * the official visualisation package (it imports jaxtyping and torch_kmeans; never called here) is stubbed.
Both sides then see the same image (skimage astronaut as an 8-bit PNG), the same ViT weights (random init, seed 0), the
same crops and flips (the official RandomResizedCropFlip draws them; dvt gets them by replacing `make_views` for the run),
the same initial parameters (copied from the official modules into dvt's model) and the same token draws per step (the
official `np.random.randint` draws, mapped to dvt's pool order, replace dvt's counter-based `draw_tokens` for the run).
Written to WORK: official.pt, dvt.pt and report_DEVICE_POOL_OPS.json (per-step losses, F on the full image, G; final h; first difference).
"""
from __future__ import annotations
import argparse, importlib.util, json, os, subprocess, sys, tempfile, types
from pathlib import Path
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
MODEL = "vit_small_patch14_dinov2.lvd142m"


def _args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("official", help="path of a checkout of Jiawei-Yang/Denoising-ViT (commit 82704df)")
    ap.add_argument("--views", type=int, default=16, help="random views (the official --num_views); the full image is one more")
    ap.add_argument("--steps", type=int, default=40, help="optimiser steps (--num_iters); warm-up 10 %%, phase 2 after 50 %%")
    ap.add_argument("--work", default=None, help="folder for the inputs and results (default: a new temporary folder)")
    ap.add_argument("--dump", default="0,1", help="steps whose gradients and full parameters are saved for bisection")
    ap.add_argument("--pool", choices=("official", "dvt"), default="official",
                    help="tokens the dvt fit uses: the official extraction's (isolates the fit) or dvt's own (end to end)")
    ap.add_argument("--ops", choices=("official", "fused"), default="official", help="dvt's fit arithmetic (the paper preset: official)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="cpu: the stand-ins above (GPUs hidden); cuda: the official side with the real tiny-cuda-nn and GradScaler")
    ap.add_argument("--repeat", action="store_true", help="run the official loop twice and report its own run-to-run difference")
    ap.add_argument("--official-file", default="official.pt", help=argparse.SUPPRESS)
    ap.add_argument("--reuse", action="store_true", help="reuse WORK/official.pt from an earlier run (same arguments)")
    ap.add_argument("--side", default="both", choices=("both", "official"), help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def _fields_module():
    "dvt's fields module loaded by path under another name (the official package owns the name `dvt` in its process)."
    spec = importlib.util.spec_from_file_location("dvt_fields_standin", ROOT / "dvt" / "fields.py")
    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
    return mod


def prepare_inputs(work: Path) -> tuple[Path, Path]:
    "The shared inputs: skimage's astronaut as an 8-bit PNG and random-init ViT-S/14 weights (seed 0)."
    import skimage.data, timm
    from PIL import Image
    from safetensors.torch import save_file
    png, wts = work / "astronaut.png", work / "vit_small_random.safetensors"
    if not png.exists(): Image.fromarray(skimage.data.astronaut()).save(png)
    if not wts.exists():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            m = timm.create_model(MODEL, pretrained=False, num_classes=0, dynamic_img_size=True)
        save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(wts))
    return png, wts


# ----------------------------------------------------------------------------------------------------------- official side
def _install_shims(fields, wts: Path, device: str = "cpu"):
    "The stand-ins for CUDA-only pieces (with device 'cpu'), installed before the official modules are imported (see the docstring)."
    import timm, torch.nn as nn
    from safetensors.torch import load_file

    class Encoding(nn.Module):                                         # tcnn.Encoding's interface, dvt's emulation inside
        def __init__(self, n_input_dims, encoding_config, dtype=torch.float32, seed=1337):
            super().__init__()
            c = encoding_config
            assert n_input_dims == 2 and c["otype"] == "HashGrid" and c["interpolation"] == "linear" and dtype == torch.float32
            L, base, s = c["n_levels"], c["base_resolution"], c["per_level_scale"]
            top = int(round(base * s ** (L - 1)))                      # the max_resolution the official config was made from
            self.layout = fields.GridLayout(L, base, top, "tcnn", c["log2_hashmap_size"])
            ours = np.float32(np.exp((np.log(top) - np.log(base)) / (L - 1)))
            assert np.float32(s) == ours, (s, ours)                     # the same float32 per_level_scale as tcnn reads
            self.nf, self.n_output_dims = c["n_features_per_level"], L * c["n_features_per_level"]
            self.params = nn.Parameter(torch.empty(self.layout.size * self.nf).uniform_(-1e-4, 1e-4))   # tcnn's init range

        def forward(self, x):
            rows, w = self.layout.corners(x[None])
            return fields.grid_features(self.params.view(1, -1, self.nf), rows, w)[0]

    if device == "cpu": sys.modules["tinycudann"] = types.SimpleNamespace(Encoding=Encoding)
    def unused(*a, **k): raise RuntimeError("the official visualisation is not run by this harness")
    for name in ("dvt.utils.visualization", "dvt.utils.visualization.visualization_tools"):   # needs jaxtyping, torch_kmeans; unused
        sys.modules[name] = types.SimpleNamespace(visualize_offline_denoised_samples=unused, __path__=[])

    class Scaler:                                                      # torch.amp.GradScaler("cuda", 2**10) as on a GPU
        def __init__(self, device="cuda", init_scale=2.0**16, *a, **k): self._scale = torch.full((), float(init_scale))
        def scale(self, outputs): return outputs * self._scale
    if device == "cpu": torch.amp.GradScaler = Scaler

    real_create = timm.create_model
    def create_model(name, pretrained=False, **kw):
        m = real_create(name, pretrained=False, **kw)
        m.load_state_dict(load_file(str(wts)), strict=True)
        return m
    timm.create_model = create_model

    real_loader = torch.utils.data.DataLoader
    torch.utils.data.DataLoader = lambda *a, **k: real_loader(*a, **{**k, "num_workers": 0})


def run_official(a, work: Path, png: Path, wts: Path):
    "Run the official `main()` with the shims, recording its inputs, initial parameters and every step."
    fields = _fields_module()
    _install_shims(fields, wts, a.device)
    sys.path.insert(0, str(Path(a.official).resolve()))
    import main_img_denoising as mid
    import dvt.models as DVT
    from dvt.dataset import RandomResizedCropFlip
    rec = dict(crops=[], draws=[], losses=[], lrs=[], F=[], G=[], grads={}, params={})
    mods = {}
    dump = {int(s) for s in a.dump.split(",") if s != ""}

    real_params = RandomResizedCropFlip.get_params
    def get_params(img, scale, ratio):
        out = real_params(img, scale, ratio); rec["crops"].append(list(out)); return out
    RandomResizedCropFlip.get_params = staticmethod(get_params)

    class Denoiser(DVT.SingleImageDenoiser):
        def __init__(self, *x, **k): super().__init__(*x, **k); mods["denoiser"] = self
        def forward(self, *x, **k):
            out = super().forward(*x, **k)
            if self.training: rec["losses"].append([float(out.get(n, torch.zeros(())).item()) for n in
                                                    ("loss", "patch_l2_loss", "cosine_similarity_loss", "residual_loss", "residual_sparsity_loss")])
            return out

    class Field(DVT.NeuralFeatureField):
        def __init__(self, *x, **k): super().__init__(*x, **k); mods["field"] = self
    DVT.SingleImageDenoiser, DVT.NeuralFeatureField = Denoiser, Field

    real_adam = torch.optim.Adam
    class Adam(real_adam):
        def __init__(self, params, **k):
            super().__init__(params, **k); self.t = 0
            rec["init"] = {k2: v.detach().clone() for k2, v in _official_state(mods).items()}
        def step(self, closure=None):
            rec["lrs"].append(self.param_groups[0]["lr"])
            if self.t in dump: rec["grads"][self.t] = {k2: (None if p.grad is None else p.grad.clone()) for k2, p in _official_named(mods).items()}
            out = super().step(closure)
            with torch.no_grad():
                rec["F"].append(mods["field"](rec["full_coords"]).clone()); rec["G"].append(mods["denoiser"].shared_artifacts[0].permute(1, 2, 0).clone())
            if self.t in dump: rec["params"][self.t] = {k2: v.detach().clone() for k2, v in _official_state(mods).items()}
            self.t += 1
            return out
    torch.optim.Adam = Adam

    real_denoise = mid.denoise_an_image
    def denoise_an_image(args, all_raw_features, all_pixel_coords, all_transformed_views, device, **kw):
        rec.update(pool=all_raw_features.clone(), coords=all_pixel_coords.clone(), views=all_transformed_views.clone(),
                   full_coords=all_pixel_coords[-1].clone())
        real_randint = np.random.randint
        def randint(*x, **k):
            out = real_randint(*x, **k); rec["draws"].append(torch.from_numpy(np.asarray(out).astype(np.int64))); return out
        np.random.randint = randint
        try: real_denoise(args, all_raw_features, all_pixel_coords, all_transformed_views, device, **{**kw, "should_save_vis": False})
        finally: np.random.randint = real_randint
        d = mods["denoiser"]
        with torch.no_grad():
            rec["h_full"] = d.residual_predictor(all_raw_features[-1].reshape(-1, all_raw_features.shape[-1])).view(*all_raw_features.shape[1:])
        rec["final"] = {k2: v.detach().clone() for k2, v in _official_state(mods).items()}
        rec["args"] = {k2: (str(v) if isinstance(v, torch.dtype) else v) for k2, v in vars(args).items()}
    mid.denoise_an_image = denoise_an_image

    sys.argv = ["main_img_denoising.py", "--model", MODEL, "--img_path", str(png), "--num_views", str(a.views),
                "--num_iters", str(a.steps), "--warmup_iters", str(int(0.1 * a.steps)), "--output_dir", str(work / "official_out")]
    args = mid.get_args()
    mid.main(args)
    rec["draws"] = torch.stack(rec["draws"]); rec["F"] = torch.stack(rec["F"]); rec["G"] = torch.stack(rec["G"])
    rec.pop("full_coords")
    torch.save(_cpu(rec), work / a.official_file)


def _cpu(x):
    "`x` (tensors in dicts and lists) on the CPU."
    if isinstance(x, torch.Tensor): return x.detach().cpu()
    if isinstance(x, dict): return {k: _cpu(v) for k, v in x.items()}
    if isinstance(x, list): return [_cpu(v) for v in x]
    return x


def _official_named(mods) -> dict:
    "The official parameters under dvt's names (before layout changes)."
    d, f = mods["denoiser"], mods["field"]
    lin = lambda seq: [m for m in seq if isinstance(m, torch.nn.Linear)]
    out = {"F.grid": f.neural_field.params, "G": d.shared_artifacts}
    for i, l in enumerate(lin(f.mlp)): out[f"F.w{i}"], out[f"F.b{i}"] = l.weight, l.bias
    for i, l in enumerate(lin(d.residual_predictor)): out[f"h.w{i}"], out[f"h.b{i}"] = l.weight, l.bias
    return out


def _official_state(mods) -> dict:
    return _official_named(mods)


# ---------------------------------------------------------------------------------------------------------------- dvt side
def _to_dvt_layout(name: str, t: torch.Tensor, nf: int) -> torch.Tensor:
    "An official parameter (or gradient) in dvt's layout: grid (P, F), G (h, w, C), Linear weights transposed (in, out)."
    if name == "F.grid": return t.view(-1, nf)
    if name == "G": return t[0].permute(1, 2, 0)
    if ".w" in name: return t.T
    return t


def _dvt_named(stack) -> dict:
    "dvt's stacked parameters (K = 1) under the same names, in dvt's layout."
    h, w = stack.members[0].G.table.shape[:2]
    out = {"F.grid": stack.grid_table[0], "G": stack.table[0].view(h, w, -1)}
    for i, (wt, b) in enumerate(zip(stack.f_w, stack.f_b)): out[f"F.w{i}"], out[f"F.b{i}"] = wt[0], b[0, 0]
    for i, (wt, b) in enumerate(zip(stack.h_w, stack.h_b)): out[f"h.w{i}"], out[f"h.b{i}"] = wt[0], b[0, 0]
    return out


def run_dvt(a, work: Path, png: Path, wts: Path, off: dict) -> dict:
    "dvt's `paper` preset on the official crops, initial parameters and token draws; every step recorded."
    import dvt.stage1 as S
    from dvt.contract import make_backbone
    from dvt.views import ViewSet, view_coords
    V, T = a.views, a.steps
    cfg = S.stage1_config("paper", n_views=V, steps=T, compile="off", ops=a.ops, device=a.device)
    dev = torch.device(a.device)
    bb = make_backbone(MODEL, pretrained=False, checkpoint=str(wts)).to(dev)
    (H, W), p, s, (h, w) = S.stage1_geometry(bb, cfg)
    hw = h * w
    crops = torch.tensor(off["crops"], dtype=torch.long)                                    # (V, 4) top, left, height, width
    oc = off["coords"][:V]                                                                   # (V, h, w, 2) official coords
    flips = oc[:, 0, 0, 0] > oc[:, 0, -1, 0]                                                 # a flipped view's x decreases
    boxes = torch.cat([torch.tensor([[0, 0, H, W]]), crops]); flips = torch.cat([torch.tensor([False]), flips])
    official_views = ViewSet(boxes, flips, view_coords(boxes, flips, (H, W), p, s, "linspace"), (H, W), p, s, "linspace")
    rec = dict(losses=None, F=[], G=[], grads={}, params={}, lrs=[S.lr_at(t, cfg) for t in range(T)])
    dump = {int(x) for x in a.dump.split(",") if x != ""}
    real_make_views, real_draw, real_stack, real_step = S.make_views, S.draw_tokens, S.NoiseModelStack, S.GroupAdam.step
    # official pool index i (views 0..V-1 random, V the full image) -> dvt pool index (view 0 the full image)
    d = off["draws"]; dvt_draws = ((d // hw + 1) % (V + 1)) * hw + d % hw                    # (T, B)
    stacks, t_box = [], [0]
    class Stack(real_stack):
        def __init__(self, models): super().__init__(models); stacks.append(self)
    def step(self, lr):
        t, st = t_box[0], stacks[-1]
        if t in dump: rec["grads"][t] = {k: (None if v.grad is None else v.grad.clone()) for k, v in _dvt_named_params(st).items()}
        real_step(self, lr)
        with torch.no_grad():
            rec["F"].append(st.F(full.view(1, -1, 2))[0].view(h, w, -1).clone()); rec["G"].append(st.table[0].view(h, w, -1).clone())
        if t in dump: rec["params"][t] = {k: v.detach().clone() for k, v in _dvt_named(st).items()}
        t_box[0] += 1
    full = official_views.coords[0].to(dev)
    try:
        S.make_views = lambda *x, **k: official_views
        S.draw_tokens = lambda lanes, st, M: dvt_draws[int(st)][None].to(lanes.device)
        S.NoiseModelStack, S.GroupAdam.step = Stack, step
        item = S.prepare_fit(bb, png, cfg, dev)
        rec["coords"], rec["image"], rec["pool_own"] = item.views.coords.clone(), item.image.clone(), item.pool.cpu()
        if a.pool == "official":                                                             # the official tokens, in dvt's order
            item.pool = torch.cat([off["pool"][V:], off["pool"][:V]]).to(dev); item.raw = off["pool"][V].to(dev)
        nf = item.model.F.grid.n_features
        m = item.model
        with torch.no_grad():                                                                # the official initial parameters
            init = {k: _to_dvt_layout(k, v, nf) for k, v in off["init"].items()}
            m.F.grid.table.copy_(init["F.grid"]); m.G.table.copy_(init["G"])
            for mlp, pre in ((m.F.mlp, "F"), (m.h.mlp, "h")):
                for i, lin in enumerate([l for l in mlp if isinstance(l, torch.nn.Linear)]):
                    lin.weight.copy_(init[f"{pre}.w{i}"].T); lin.bias.copy_(init[f"{pre}.b{i}"])
        res = S.fit_prepared([item], dev)[0]
    finally:
        S.make_views, S.draw_tokens, S.NoiseModelStack, S.GroupAdam.step = real_make_views, real_draw, real_stack, real_step
    rec.update(losses=res.losses, final_F=res.clean, final_G=res.artifact, final_h=res.residual, raw=res.raw,
               F=torch.stack(rec["F"]), G=torch.stack(rec["G"]))
    rec = _cpu(rec)
    torch.save(rec, work / "dvt.pt")
    return rec


def _dvt_named_params(stack) -> dict:
    "The stacked parameter tensors themselves (for their .grad), K = 1."
    out = {"F.grid": stack.grid_table, "G": stack.table}
    for i, (wt, b) in enumerate(zip(stack.f_w, stack.f_b)): out[f"F.w{i}"], out[f"F.b{i}"] = wt, b
    for i, (wt, b) in enumerate(zip(stack.h_w, stack.h_b)): out[f"h.w{i}"], out[f"h.b{i}"] = wt, b
    return out


# --------------------------------------------------------------------------------------------------------------- comparison
def diff(x: torch.Tensor, y: torch.Tensor) -> dict:
    "max |x - y|, that over max |y|, and whether they are bitwise equal."
    x, y = x.double(), y.double()
    m = (x - y).abs().max().item()
    return dict(max_abs=m, rel=m / max(y.abs().max().item(), 1e-30), equal=bool(torch.equal(x, y)))


def compare(a, off: dict, ours: dict) -> dict:
    V, T = a.views, a.steps
    nf = 8
    H, W = ours["image"].shape[-2:]
    h, w = ours["coords"].shape[1:3]
    rep = dict(views=V, steps=T, pool=a.pool, ops=a.ops, official_args={k: off["args"][k] for k in ("num_iters", "warmup_iters", "lr", "min_lr",
               "weight_decay", "pixel_bsz", "freeze_shared_artifacts_after", "n_levels", "dtype", "layer_index")})
    # inputs
    oc = torch.cat([off["coords"][V:], off["coords"][:V]])
    rep["coords"] = diff(ours["coords"], oc)
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    rep["full_image_normalised"] = diff((ours["image"] - mean) / std, off["views"][V])
    own = ours["pool_own"]; op = torch.cat([off["pool"][V:], off["pool"][:V]])
    rep["pool_full_image"] = diff(own[0], op[0]); rep["pool_views"] = diff(own[1:], op[1:])
    rep["lr"] = dict(equal=[float(x) for x in ours["lrs"]] == [float(x) for x in off["lrs"]],
                     max_abs=max(abs(x - float(y)) for x, y in zip(ours["lrs"], off["lrs"])))
    # per step
    ol = torch.tensor(off["losses"], dtype=torch.float64)                                  # total, mse, cos, residual, sparsity
    dl = ours["losses"].double()                                                            # total, mse, cos, h
    steps = []
    for t in range(T):
        steps.append(dict(step=t, loss_official=ol[t, 0].item(), loss_dvt=dl[t, 0].item(),
                          loss_rel=abs(ol[t, 0] - dl[t, 0]).item() / abs(ol[t, 0]).item(),
                          mse_equal=bool(ol[t, 1] == dl[t, 1]), cos_equal=bool(ol[t, 2] == dl[t, 2]),
                          h_rel=abs(ol[t, 3] + ol[t, 4] - dl[t, 3]).item() / max(abs(ol[t, 3] + ol[t, 4]).item(), 1e-30),
                          F=diff(ours["F"][t], off["F"][t].view(h, w, -1)), G=diff(ours["G"][t], off["G"][t])))
    rep["per_step"] = steps
    fin = dict(F=diff(ours["final_F"], off["F"][-1].view(h, w, -1)), G=diff(ours["final_G"], off["G"][-1]),
               h=diff(ours["final_h"], off["h_full"]))
    rep["final"] = fin
    # the first difference
    first = next((s for s in steps if not (s["F"]["equal"] and s["G"]["equal"] and s["loss_rel"] == 0)), None)
    rep["first_difference"] = None if first is None else dict(step=first["step"], loss_rel=first["loss_rel"], F=first["F"], G=first["G"])
    for t in sorted(set(ours["grads"]) & set(off["grads"])):
        g = {}
        for k, v in off["grads"][t].items():
            u = ours["grads"][t][k]
            if v is None or u is None: g[k] = dict(official=v is not None, dvt=u is not None); continue
            g[k] = diff(u.reshape(_to_dvt_layout(k, v, nf).shape) if k != "G" else u.view(h, w, -1), _to_dvt_layout(k, v, nf))
        rep[f"grads_step{t}"] = g
        rep[f"params_after_step{t}"] = {k: diff(ours["params"][t][k], _to_dvt_layout(k, v, nf)) for k, v in off["params"][t].items()}
    return rep


def main(argv=None):
    a = _args(argv)
    torch.set_num_threads(1)
    work = Path(a.work or tempfile.mkdtemp(prefix="official_stage1_")); work.mkdir(parents=True, exist_ok=True)
    png, wts = prepare_inputs(work)
    if a.side == "official": return run_official(a, work, png, wts)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}                        # the official package owns `dvt` there
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", **({"CUDA_VISIBLE_DEVICES": ""} if a.device == "cpu" else {}))
    for name in ("official.pt", "official_b.pt") if a.repeat else ("official.pt",):
        cmd = [sys.executable, __file__, a.official, "--side", "official", "--views", str(a.views), "--steps", str(a.steps),
               "--work", str(work), "--dump", a.dump, "--device", a.device, "--official-file", name]
        if not (a.reuse and (work / name).exists()): subprocess.run(cmd, check=True, env=env, cwd=str(work))
    off = torch.load(work / "official.pt", weights_only=False, map_location="cpu")
    ours = run_dvt(a, work, png, wts, off)
    rep = compare(a, off, ours)
    rep["device"] = a.device
    if a.repeat:                                                                             # the official loop against itself
        o2 = torch.load(work / "official_b.pt", weights_only=False, map_location="cpu")
        rep["official_vs_itself"] = dict(F=diff(o2["F"][-1], off["F"][-1]), G=diff(o2["G"][-1], off["G"][-1]), h=diff(o2["h_full"], off["h_full"]),
                                         loss_rel=max(abs(x[0] - y[0]) / abs(y[0]) for x, y in zip(o2["losses"], off["losses"])))
    (work / f"report_{a.device}_{a.pool}_{a.ops}.json").write_text(json.dumps(rep, indent=1))
    print(json.dumps({k: v for k, v in rep.items() if k != "per_step"}, indent=1))
    for s in rep["per_step"]:
        print(f"step {s['step']:3d} loss off {s['loss_official']:.9g} dvt {s['loss_dvt']:.9g} rel {s['loss_rel']:.2e} "
              f"F rel {s['F']['rel']:.2e} G rel {s['G']['rel']:.2e}")
    print("work folder:", work)
    return rep


if __name__ == "__main__":
    main()
