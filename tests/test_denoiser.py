"""Stage 2 (dvt.denoiser, dvt.denoiser_io, dvt.denoiser_train): official-format checkpoints, our checkpoints, bad input, training/resume, the CLI, DDP on CPU,
and generalization of a denoiser trained on planted pairs to unseen photos."""
import json, os, subprocess, sys, textwrap
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import fastcore.test as fct
from safetensors.torch import save_file
from timm.models.vision_transformer import Block

import dvt.denoiser as dd
import dvt.denoiser_io as dio
import dvt.runs
from dvt.runs import RunLock, LockedError
from dvt.train import STATE_FILE
from dvt.stage1_data import write_stage1
from dvt.train import TrainConfig
from dvt.denoiser import Denoiser, DenoisedBackbone, token_loss
from dvt.denoiser_io import load_official, load_denoiser, save_denoiser, load_denoiser_state
from dvt.denoiser_train import train_denoiser, train_denoiser_cli, PairFolder


def official_dict(C, n, seed=0, prefix="denoiser.", extra_keys=None):
    "A state dict in the released DVT layout, built from timm's Block independently of dvt.Denoiser."
    g = torch.Generator().manual_seed(seed)
    blk = Block(C, C // 64, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6))
    sd = {f"{prefix}{k}": torch.randn(v.shape, generator=g) for k, v in blk.state_dict().items()}
    sd["pos_embed"] = torch.randn(1, n, C, generator=g)
    sd.update(extra_keys or {})
    return sd


def write_pairs(folder, raw, clean, model="toy"):
    "Write (N, h, w, C) raw/clean tensors as a stage-1 output folder."
    folder = Path(folder); folder.mkdir(parents=True, exist_ok=True)
    for i in range(len(raw)): write_stage1(folder / f"img{i:03d}.safetensors", raw[i], clean[i], {"image": f"img{i}", "model": model})
    (folder / "config.json").write_text(json.dumps({"model": model}))
    return folder


def toy_pairs(folder, n=12, grid=(6, 6), C=64, seed=0):
    "Raw = clean + a fixed position pattern (+ noise): a denoiser can learn it."
    g = torch.Generator().manual_seed(seed)
    clean = torch.randn(n, *grid, C, generator=g)
    art = torch.randn(1, *grid, C, generator=g)
    return write_pairs(folder, clean + art + 0.05 * torch.randn(clean.shape, generator=g), clean)


# ---------------------------------------------------------------- official checkpoints
@pytest.mark.parametrize("n,side", [(1369, 37), (1024, 32)])
def test_official_vitb_layout_loads_every_tensor(tmp_path, n, side):
    sd = official_dict(768, n, extra_keys={})
    torch.save({"denoiser": sd, "optimizer": {"state": {}, "param_groups": []}, "step": 50000}, tmp_path / "m.pth")
    den = load_official(tmp_path / "m.pth")
    fct.test_eq((den.embed_dim, den.grid, den.num_heads), (768, (side, side), 12))
    own = den.state_dict()
    fct.test_eq(len(own), len(sd))
    for k, v in sd.items(): assert torch.equal(own["block." + k[9:] if k.startswith("denoiser.") else k], v), k
    with torch.inference_mode():
        for h in (37, 32, 23):
            fct.test_eq(den(torch.randn(1, h, h, 768)).shape, (1, h, h, 768))
    fct.test_eq(den.training, False)


def test_official_variants_v2_sequential_and_vit_keys(tmp_path):
    sd = official_dict(384, 1369, prefix="denoiser.0.", extra_keys={"vit.model.cls_token": torch.zeros(1, 1, 384)})
    torch.save({"denoiser": sd}, tmp_path / "v2.pth")
    den = load_official(tmp_path / "v2.pth")
    assert torch.equal(den.block.mlp.fc1.weight, sd["denoiser.0.mlp.fc1.weight"])
    torch.save({"denoiser": {**sd, **{k.replace(".0.", ".1.", 1): v for k, v in sd.items() if k.startswith("denoiser.0.")}}},
               tmp_path / "two.pth")
    fct.test_fail(lambda: load_official(tmp_path / "two.pth"), contains="several blocks")


def test_official_runs_behind_a_backbone_at_518_and_448(tmp_path):
    from dvt.backbones import Backbone
    torch.save({"denoiser": official_dict(384, 1369)}, tmp_path / "vit_small_patch14_dinov2.lvd142m.pth")
    dbb = DenoisedBackbone(Backbone("vit_small_patch14_dinov2.lvd142m", pretrained=False),
                           load_official(tmp_path / "vit_small_patch14_dinov2.lvd142m.pth"))
    with torch.inference_mode():
        for size, g in ((518, 37), (448, 32)):
            y = dbb(torch.rand(1, 3, size, size))
            fct.test_eq(y.shape, (1, g, g, 384)); assert torch.isfinite(y).all()


def test_official_by_name_uses_the_hub(tmp_path, monkeypatch):
    import huggingface_hub
    f = tmp_path / "cached.pth"; torch.save({"denoiser": official_dict(384, 1369)}, f)
    asked = []
    def fake(repo_id, filename, **kw): asked.append((repo_id, filename)); return str(f)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake)
    den = load_official("vit_small_patch14_dinov2.lvd142m")
    fct.test_eq(asked, [("jjiaweiyang/DVT", "voc_denoised/vit_small_patch14_dinov2.lvd142m.pth")])
    fct.test_eq(den.grid, (37, 37))
    load_official("vit_base_patch14_dinov2.lvd142m", folder="imgnet_denoised")
    fct.test_eq(asked[-1][1], "imgnet_denoised/vit_base_patch14_dinov2.lvd142m.pth")

    def offline(repo_id, filename, **kw): raise OSError("offline mode is enabled")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    fct.test_fail(lambda: load_official("vit_small_patch14_dinov2.lvd142m"), contains="huggingface-cli download jjiaweiyang/DVT")


# ---------------------------------------------------------------- our checkpoints
def test_roundtrip_bit_identical_and_folder(tmp_path):
    torch.manual_seed(0)
    den = Denoiser(128, grid=(5, 7))
    with torch.no_grad(): den.block.norm1.weight.normal_()
    f = save_denoiser(den, tmp_path / "run" / "denoiser", backbone="x")
    fct.test_eq(f.name, "denoiser.safetensors"); assert (tmp_path / "run" / "denoiser.json").is_file()
    for again in (load_denoiser(f), load_denoiser(tmp_path / "run")):
        fct.test_eq(again.grid, (5, 7))
        for k, v in den.state_dict().items(): assert torch.equal(v, again.state_dict()[k]), k
    x = torch.randn(2, 5, 7, 128)
    with torch.inference_mode():
        assert torch.equal(den.eval()(x), load_denoiser(f)(x))
        fct.test_eq(den(x.bfloat16()).dtype, torch.bfloat16)                     # bf16 tokens, fp32 denoiser
        fct.test_close(den.bfloat16()(x).float(), den.float()(x), eps=0.3)      # bf16 denoiser, fp32 tokens


# ---------------------------------------------------------------- bad input
def test_bad_checkpoints(tmp_path):
    torch.save({"denoiser": official_dict(768, 1024)}, tmp_path / "p16.pth")
    sd = dio._read_official(tmp_path / "p16.pth")
    fct.test_fail(lambda: load_denoiser_state(Denoiser(768, 37), sd), contains="grid does not match")
    fct.test_fail(lambda: load_denoiser_state(Denoiser(384, 32), sd), contains="wrong embed dim")
    fct.test_fail(lambda: load_denoiser_state(Denoiser(768, 32), {k: v for k, v in sd.items() if "fc2" not in k}),
                  contains="missing keys")
    torch.save({"something": {"a": torch.zeros(1)}}, tmp_path / "other.pth")
    fct.test_fail(lambda: load_official(tmp_path / "other.pth"), contains="no denoiser state dict")
    torch.save({"a": torch.zeros(1)}, tmp_path / "flat.pth")
    fct.test_fail(lambda: load_official(tmp_path / "flat.pth"), contains="no pos_embed")
    torch.save([1, 2], tmp_path / "list.pth")
    fct.test_fail(lambda: load_official(tmp_path / "list.pth"), contains="no denoiser state dict")
    good = save_denoiser(Denoiser(64, 4), tmp_path / "ok.safetensors")
    raw = good.read_bytes(); (tmp_path / "cut.safetensors").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "cut.json").write_text((tmp_path / "ok.json").read_text())
    fct.test_fail(lambda: load_denoiser(tmp_path / "cut.safetensors"), contains="corrupted")
    (tmp_path / "ok.json").unlink()
    fct.test_eq(load_denoiser(good).grid, (4, 4))                      # the config travels inside the weights file too
    save_file(Denoiser(64, 4).state_dict(), str(tmp_path / "bare.safetensors"))
    fct.test_fail(lambda: load_denoiser(tmp_path / "bare.safetensors"), contains="config next to the weights")


class _Evil:
    def __init__(self, marker): self.marker = marker
    def __reduce__(self): return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("where", ["top", "inside"])
def test_malicious_pickle_is_refused_without_running(tmp_path, where):
    marker = tmp_path / "pwned"
    obj = _Evil(marker) if where == "top" else {"denoiser": {"pos_embed": _Evil(marker)}}
    torch.save(obj, tmp_path / "evil.pth")
    fct.test_fail(lambda: load_official(tmp_path / "evil.pth"), contains="nothing in them was run")
    fct.test_fail(lambda: load_denoiser(tmp_path / "evil.pth"), contains="nothing in them was run")
    assert not marker.exists()


def test_bad_pairs(tmp_path):
    g = torch.Generator().manual_seed(0)
    a = write_pairs(tmp_path / "a", torch.randn(2, 4, 4, 8, generator=g), torch.randn(2, 4, 4, 8, generator=g))
    save_file({"raw": torch.zeros(5, 5, 8), "clean": torch.zeros(5, 5, 8)}, str(a / "other.safetensors"))
    fct.test_fail(lambda: PairFolder(a), contains="different grids")
    b = tmp_path / "b"; b.mkdir(); save_file({"raw": torch.zeros(4, 4, 8)}, str(b / "x.safetensors"))
    fct.test_fail(lambda: PairFolder(b), contains="not a raw/clean pair")
    c = tmp_path / "c"; c.mkdir()
    fct.test_fail(lambda: PairFolder(c), contains="dvt_denoise")


def test_denoised_backbone_contract_with_planted():
    from dvt.synthetic import PlantedBackbone
    pb = PlantedBackbone(embed_dim=64, patch_size=8, input_size=64)
    dbb = DenoisedBackbone(pb, Denoiser(64, 8)).eval()
    fct.test_eq((dbb.patch_size, dbb.stride, dbb.embed_dim, dbb.input_size, dbb.num_prefix_tokens, dbb.name),
                (8, 8, 64, 64, 0, "denoised(planted)"))
    with torch.inference_mode():
        fct.test_eq(dbb(torch.rand(2, 3, 64, 96)).shape, (2, 8, 12, 64))
        fct.test_eq(dbb.features(torch.rand(1, 3, 64, 64), layers=[0, -1])[1].shape, (1, 8, 8, 64))
    fct.test_fail(lambda: DenoisedBackbone(pb, Denoiser(128, 8)), contains="128-wide")
    fct.test_fail(lambda: DenoisedBackbone(nn.Linear(2, 2), Denoiser(64, 8)), contains="TokenBackbone")


def test_denoised_backbone_of_a_minimal_third_party_backbone():
    "Only patch_size, embed_dim and forward: the wrapper's geometry comes from the contract's defaults."
    class Minimal(nn.Module):
        patch_size, embed_dim = 14, 64
        def forward(self, x):
            B, _, H, W = x.shape
            return torch.zeros(B, H // 14, W // 14, 64) + x.mean()
    dbb = DenoisedBackbone(Minimal(), Denoiser(64, 4))
    fct.test_eq((dbb.stride, dbb.input_size, dbb.num_prefix_tokens, dbb.name), (14, 518, 0, "denoised(Minimal)"))
    with torch.inference_mode(): fct.test_eq(dbb(torch.rand(1, 3, 56, 70)).shape, (1, 4, 5, 64))
    fct.test_eq(dbb.grid_size(56, 70), (4, 5))


def test_training_settings_are_checked_by_name_and_type(tmp_path):
    pairs = toy_pairs(tmp_path / "pairs", n=4)
    fct.test_fail(lambda: train_denoiser(pairs, tmp_path / "o", "smoke", stpes=3), contains="did you mean 'steps'")
    fct.test_fail(lambda: train_denoiser(pairs, tmp_path / "o", "smoke", steps=2.5), contains="must be an integer")
    fct.test_fail(lambda: train_denoiser(pairs, tmp_path / "o", "smoke", save_every=0), contains="save_every=0")
    fct.test_fail(lambda: train_denoiser(pairs, tmp_path / "o", "fast"), contains="'smoke'")
    den = train_denoiser(pairs, tmp_path / "o", "smoke", steps=2, batch_size=2, progress=False, curve=None)
    fct.test_eq(load_denoiser(tmp_path / "o").meta["train"]["steps"], 2); fct.test_eq(den.grid, (6, 6))


# ---------------------------------------------------------------- training
def test_training_learns_and_resumes_exactly(tmp_path):
    pairs = toy_pairs(tmp_path / "pairs")
    cfg = TrainConfig(steps=60, batch_size=4, blr=3e-2, save_every=25)
    ref = train_denoiser(pairs, tmp_path / "ref", cfg, progress=False, curve=tmp_path / "ref.png")
    assert (tmp_path / "ref.png").stat().st_size > 1000
    data = PairFolder(pairs)
    raw = torch.stack([data[i][0] for i in range(len(data))]); clean = torch.stack([data[i][1] for i in range(len(data))])
    with torch.inference_mode(): assert token_loss(ref(raw), clean) < 0.5 * token_loss(raw, clean)

    class Crash(Exception): pass
    def crash(step, loss):
        if step == 30: raise Crash()
    with pytest.raises(Crash): train_denoiser(pairs, tmp_path / "cut", cfg, progress=False, curve=None, callback=crash)
    from safetensors import safe_open
    with safe_open(str(tmp_path / "cut" / STATE_FILE), "pt") as f: fct.test_eq(f.metadata()["step"], "25")  # last checkpoint
    resumed = train_denoiser(pairs, tmp_path / "cut", cfg, progress=False, curve=None)
    for k, v in ref.state_dict().items(): assert torch.equal(v, resumed.state_dict()[k]), k
    # a finished run resumed again does nothing and keeps the weights
    again = train_denoiser(pairs, tmp_path / "cut", cfg, progress=False, curve=None)
    for k, v in ref.state_dict().items(): assert torch.equal(v, again.state_dict()[k]), k


def test_cli(tmp_path, capsys):
    pairs = toy_pairs(tmp_path / "pairs", n=6)
    train_denoiser_cli([str(pairs), str(tmp_path / "out"), "--preset", "smoke", "--steps", "3", "--batch-size", "2",
                        "--no-progress", "--curve", str(tmp_path / "c.png")])
    assert "wrote" in capsys.readouterr().out
    den = load_denoiser(tmp_path / "out")
    fct.test_eq((den.embed_dim, den.grid), (64, (6, 6)))
    cfg = json.loads((tmp_path / "out" / "denoiser.json").read_text())
    fct.test_eq((cfg["backbone"], cfg["train"]["steps"], cfg["train"]["batch_size"]), ("toy", 3, 2))
    assert (tmp_path / "c.png").is_file()


def test_ddp_two_processes_match_one(tmp_path):
    "torchrun --nproc_per_node 2 (gloo, CPU) gives the weights of a single-process run: the global batch is the same."
    pairs = toy_pairs(tmp_path / "pairs", n=8)
    args = [str(pairs), "--preset", "smoke", "--steps", "6", "--batch-size", "4", "--no-progress", "--curve", str(tmp_path / "none.png"),
            "--device", "cpu"]
    script = tmp_path / "run.py"
    script.write_text("from dvt.denoiser_train import train_denoiser_cli\ntrain_denoiser_cli()\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(dd.__file__).parents[1])}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(script), args[0], str(tmp_path / "ddp"), *args[1:]], env=env, cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "(2 processes)" in r.stdout, r.stdout
    train_denoiser_cli([args[0], str(tmp_path / "one"), *args[1:]])
    a, b = load_denoiser(tmp_path / "ddp"), load_denoiser(tmp_path / "one")
    for k, v in a.state_dict().items(): fct.test_close(v, b.state_dict()[k], eps=1e-4)


# ---------------------------------------------------------------- generalization (planted backbone, unseen photos)
def test_generalizes_to_unseen_photos(tmp_path):
    from dvt.synthetic import PlantedBackbone
    from dvt.data import sample_images, resize_images
    from dvt.views import make_views, render_views
    pb = PlantedBackbone(embed_dim=64, patch_size=8, input_size=128)
    g = torch.Generator().manual_seed(0)
    raws, cleans = [], []
    for img in sample_images(names=["astronaut", "coffee", "hubble_deep_field", "immunohistochemistry", "camera"]):
        v = render_views(resize_images(img, 128), make_views(11, 128, 8, generator=g, scale=(0.25, 1.0)))
        with torch.inference_mode(): raws.append(pb(v)); cleans.append(pb.parts(v)["clean"])
    pairs = write_pairs(tmp_path / "pairs", torch.cat(raws), torch.cat(cleans), model="planted")
    den = train_denoiser(pairs, tmp_path / "run", TrainConfig(steps=150, batch_size=8, blr=1.6e-2, save_every=150),
                         progress=False, curve=None)
    x = torch.stack([resize_images(im, 128) for im in sample_images(names=["chelsea", "rocket", "retina"])])
    centre = lambda t: t - t.mean((1, 2), keepdim=True)
    rel = lambda t, c: (centre(t) - centre(c)).flatten(1).norm(dim=1) / centre(c).flatten(1).norm(dim=1)
    with torch.inference_mode():
        raw, clean = pb(x), pb.parts(x)["clean"]
        e_raw, e_den = rel(raw, clean), rel(den(raw), clean)
    assert (e_den < 0.6 * e_raw).all(), (e_raw, e_den)


# ---------------------------------------------------------------- crash, disk and concurrency safety (issue 14)
TINY = ["--preset", "smoke", "--steps", "6", "--batch-size", "2", "--save-every", "3", "--no-progress"]


def run_cli(*args, fault=None, timeout=300):
    "dvt_train_denoiser in a fresh process (as installed), optionally killed by SIGKILL at the fault point `fault`."
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "DVT_FAULT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(Path(dd.__file__).parents[1]), **({"DVT_FAULT": fault} if fault else {}))
    return subprocess.run([sys.executable, "-c", "from dvt.denoiser_train import train_denoiser_cli; train_denoiser_cli()", *map(str, args)],
                          env=env, capture_output=True, text=True, timeout=timeout)


def same_weights(a, b):
    a, b = load_denoiser(a), load_denoiser(b)
    return all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    "Six toy pairs and the uninterrupted 6-step reference run."
    d = tmp_path_factory.mktemp("tiny")
    pairs = toy_pairs(d / "pairs", n=6)
    train_denoiser_cli([str(pairs), str(d / "ref"), *TINY, "--curve", "none"])
    return pairs, d / "ref"


def temporaries(folder):
    return [p.name for p in Path(folder).iterdir() if ".tmp" in p.name or p.name.startswith((".write-test", ".lock"))]


def test_kill_between_weights_and_state_at_the_last_step(tiny_run, tmp_path):
    "Killed after the final denoiser.safetensors and before the final train_state: the rerun recomputes and matches."
    pairs, ref = tiny_run
    r = run_cli(pairs, tmp_path / "out", *TINY, "--curve", "none", fault="product-saved:6")
    assert r.returncode == -9, (r.returncode, r.stderr[-2000:])
    from safetensors import safe_open
    with safe_open(str(tmp_path / "out" / STATE_FILE), "pt") as f: fct.test_eq(f.metadata()["step"], "3")
    train_denoiser_cli([str(pairs), str(tmp_path / "out"), *TINY, "--curve", "none"])
    assert same_weights(tmp_path / "out", ref)
    fct.test_eq(temporaries(tmp_path / "out"), [])


def test_finished_run_rewrites_stale_or_truncated_weights(tiny_run, tmp_path, capsys):
    "The old failure (final state written, weights of the previous checkpoint left) and a truncated weights file."
    import shutil
    pairs, ref = tiny_run
    out = tmp_path / "out"; shutil.copytree(ref, out)
    save_denoiser(Denoiser(64, (6, 6)), out / "denoiser.safetensors")          # stale weights under the final name
    assert not same_weights(out, ref)
    train_denoiser_cli([str(pairs), str(out), *TINY, "--curve", "none"])
    assert same_weights(out, ref) and "wrote" in capsys.readouterr().out
    data = (out / "denoiser.safetensors").read_bytes(); (out / "denoiser.safetensors").write_bytes(data[:100])
    fct.test_fail(lambda: load_denoiser(out), contains="truncated")
    train_denoiser_cli([str(pairs), str(out), *TINY, "--curve", "none"])
    assert same_weights(out, ref)


def test_truncated_or_empty_state_restarts(tiny_run, tmp_path, capsys):
    import shutil
    pairs, ref = tiny_run
    for cut in (0, 50):
        out = tmp_path / f"out{cut}"; shutil.copytree(ref, out)
        st = out / STATE_FILE; st.write_bytes(st.read_bytes()[:cut])
        train_denoiser_cli([str(pairs), str(out), *TINY, "--curve", "none"])
        assert "unusable" in capsys.readouterr().err
        assert same_weights(out, ref)


def test_kill_during_renames_leaves_no_temporaries(tiny_run, tmp_path):
    "Killed with a written temporary not yet renamed: the rerun removes it (and those of the other write points) and ends right."
    pairs, ref = tiny_run
    out = tmp_path / "out"
    r = run_cli(pairs, out, *TINY, "--curve", "none", fault=f"rename:{STATE_FILE}")
    assert r.returncode == -9, r.stderr[-2000:]
    assert any(f".{STATE_FILE}.tmp-" in t for t in temporaries(out)), temporaries(out)
    for name in (".denoiser.safetensors.tmp-otherhost-12", ".denoiser.json.tmp-h-3", ".tmpab3x_9", ".write-test-h-5"):
        (out / name).write_bytes(b"half")                           # what kills at the other write points leave
    train_denoiser_cli([str(pairs), str(out), *TINY, "--curve", "none"])
    fct.test_eq(temporaries(out), [])
    assert same_weights(out, ref)


def test_resume_with_other_data_or_length_is_refused(tiny_run, tmp_path, capsys):
    import shutil
    pairs, ref = tiny_run
    out = tmp_path / "out"; shutil.copytree(ref, out)
    other = toy_pairs(tmp_path / "other", n=6, seed=1)
    with pytest.raises(SystemExit) as e: train_denoiser_cli([str(other), str(out), *TINY, "--curve", "none"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "pairs: sha256:" in err and "--no-resume" in err, err
    with pytest.raises(SystemExit): train_denoiser_cli([str(pairs), str(out), *TINY[:2], "--steps", "12", *TINY[4:]])
    err = capsys.readouterr().err
    assert "cannot be extended in place" in err and "--no-resume" in err and "resume=False" not in err, err
    train_denoiser_cli([str(pairs), str(out), *TINY[:2], "--steps", "12", *TINY[4:], "--no-resume", "--curve", "none"])
    fct.test_eq(json.loads((out / "denoiser.json").read_text())["train"]["steps"], 12)


def test_second_run_on_the_folder_is_refused_and_a_killed_lock_does_not_block(tiny_run, tmp_path):
    pairs, _ = tiny_run
    out = tmp_path / "out"; out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from dvt.runs import RunLock; "
                               f"RunLock({str(out / '.lock')!r}).acquire(); print('held', flush=True); time.sleep(60)"],
                              env={**os.environ, "PYTHONPATH": str(Path(dd.__file__).parents[1])}, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LockedError, match=f"PID {holder.pid} on host"):
            train_denoiser(pairs, out, TrainConfig(steps=2, batch_size=2), progress=False, curve=None)
        assert not (out / STATE_FILE).exists()
    finally:
        holder.kill(); holder.wait()
    train_denoiser(pairs, out, TrainConfig(steps=2, batch_size=2), progress=False, curve=None)   # the dead holder's lock is free
    fct.test_eq(temporaries(out), [])


def test_unwritable_out_stops_before_step_1(tiny_run, tmp_path, monkeypatch, capsys):
    "A read-only output folder (EROFS, raised where the probe file is created; root ignores chmod) stops before any step."
    import builtins, errno
    pairs, _ = tiny_run
    real = builtins.open
    def ro(path, *a, **k):
        if ".write-test-" in str(path): raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real(path, *a, **k)
    monkeypatch.setattr(dvt.runs, "open", ro, raising=False)
    steps = []
    with pytest.raises(OSError, match="read-only file system"):
        train_denoiser(pairs, tmp_path / "ro", TrainConfig(steps=2, batch_size=2), progress=False, curve=None,
                       callback=lambda s, l: steps.append(s))
    fct.test_eq(steps, [])
    with pytest.raises(SystemExit) as e: train_denoiser_cli([str(pairs), str(tmp_path / "ro"), *TINY])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "choose a writable --out" in err, err


def test_full_disk_at_a_checkpoint_names_it_and_resumes(tiny_run, tmp_path, monkeypatch):
    import errno
    pairs, ref = tiny_run
    real, calls = dvt.runs.atomic_write, []
    def full(path, write, **kw):
        calls.append(Path(path).name)
        if len(calls) > 3: raise OSError(errno.ENOSPC, "No space left on device")   # the step-6 checkpoint
        return real(path, write, **kw)
    monkeypatch.setattr(dvt.runs, "atomic_write", full)
    with pytest.raises(OSError, match="step-6 checkpoint .*disk full.*previous checkpoint are intact"):
        train_denoiser(pairs, tmp_path / "out", TrainConfig(steps=6, batch_size=2, save_every=3), progress=False, curve=None)
    monkeypatch.setattr(dvt.runs, "atomic_write", real)
    fct.test_eq(temporaries(tmp_path / "out"), [])
    train_denoiser_cli([str(pairs), str(tmp_path / "out"), *TINY, "--curve", "none"])
    assert same_weights(tmp_path / "out", ref)


def test_outputs_group_readable_curve_next_to_them_rng_untouched(tiny_run, tmp_path):
    pairs, _ = tiny_run
    old = os.umask(0o022)
    try:
        before = torch.get_rng_state()
        train_denoiser(pairs, tmp_path / "out", TrainConfig(steps=2, batch_size=2), progress=False)
        assert torch.equal(torch.get_rng_state(), before)
    finally: os.umask(old)
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    fct.test_eq(files, ["denoiser.json", "denoiser.safetensors", "loss.png", STATE_FILE])
    for f in files: fct.test_eq(oct((tmp_path / "out" / f).stat().st_mode & 0o777), "0o644")


def test_help_says_what_it_does_and_what_a_rerun_does(capsys):
    with pytest.raises(SystemExit): train_denoiser_cli(["--help"])
    out = capsys.readouterr().out
    assert out.split("\n\n")[1].startswith("Train DVT's stage-2 denoiser"), out[:300]
    assert "Killed and rerun" in out and "Console entry point" not in out


def test_fit_resume_restores_the_random_generator(tmp_path):
    "A model with dropout: resumed after a Ctrl-C, it ends with the uninterrupted run's weights only because the checkpoint "
    "carries the loop's RNG state (the dropout masks after the resume are the ones the uninterrupted run drew)."
    from dvt.train import fit, StepSampler, step_loader
    g = torch.Generator().manual_seed(0); xs = torch.randn(16, 8, generator=g)
    class Data(torch.utils.data.Dataset):
        def __len__(self): return 16
        def __getitem__(self, key): return xs[key[1]], xs[key[1]].flip(0)
    cfg = TrainConfig(steps=10, batch_size=4, blr=0.2, save_every=100)
    sampler = StepSampler(16, 4, 0)
    batches = lambda start, rank, world: step_loader(Data(), sampler, start, 10, rank, world)
    loss = lambda net, b: ((net(b[0]) - b[1]) ** 2).mean()
    def model():
        with torch.random.fork_rng(): torch.manual_seed(3); return nn.Sequential(nn.Linear(8, 32), nn.Dropout(0.5), nn.Linear(32, 8))
    ref = model(); fit(ref, loss, batches, cfg, tmp_path / "ref", progress=False, curve=None)
    def stop(step, l):
        if step == 5: raise KeyboardInterrupt
    cut = model()
    with pytest.raises(KeyboardInterrupt): fit(cut, loss, batches, cfg, tmp_path / "cut", progress=False, curve=None, callback=stop)
    cut = model(); fit(cut, loss, batches, cfg, tmp_path / "cut", progress=False, curve=None)
    for k, v in ref.state_dict().items(): assert torch.equal(v, cut.state_dict()[k]), k


def test_progress_lines_in_a_log(tmp_path, capsys):
    "Not a terminal (a Slurm log): plain lines, at most every 30 s plus the last one, instead of a tqdm bar."
    pairs = toy_pairs(tmp_path / "pairs", n=4)
    train_denoiser(pairs, tmp_path / "o", "smoke", steps=3, batch_size=2, curve=None)
    lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("[stage 2: denoiser] ")]
    assert lines[0].startswith("[stage 2: denoiser] 1/3 loss=") and lines[-1].startswith("[stage 2: denoiser] 3/3 "), lines


def test_denoiser_refuses_a_non_positive_width():
    fct.test_fail(lambda: Denoiser(0), contains="positive integer")
    fct.test_fail(lambda: Denoiser(-8), contains="embed_dim=-8")



OLD_HOMES = {  # every name code imported from the one-module dvt.denoiser -> the module that defines it now
    **dict.fromkeys(("Denoiser", "DenoisedBackbone", "token_loss"), "dvt.denoiser"),
    **dict.fromkeys(("save_denoiser", "load_denoiser_state", "load_denoiser", "official_file", "load_official", "OFFICIAL_REPO",
                     "OFFICIAL_FOLDERS", "OFFICIAL_DISTILLED", "_read_official", "_check_denoiser_state"), "dvt.denoiser_io"),
    **dict.fromkeys(("DENOISER_PRESETS", "PairFolder", "pair_shapes", "train_denoiser", "train_denoiser_cli", "_model_name"),
                    "dvt.denoiser_train"),
    **dict.fromkeys(("TrainConfig", "fit", "distributed_run", "StepSampler", "step_loader", "dist_info", "add_train_args",
                     "config_from_args", "TRAIN_EPILOG"), "dvt.train")}


def test_every_old_name_still_imports_from_dvt_denoiser():
    "Code written against the one-module dvt.denoiser keeps working: in a fresh process (no import cycle), and as the same objects."
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(dd.__file__).parents[1])}
    code = f"from dvt.denoiser import {', '.join(OLD_HOMES)}; import sys; print(sorted(m for m in sys.modules if m.startswith('dvt.den')))"
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "['dvt.denoiser', 'dvt.denoiser_io', 'dvt.denoiser_train']" in r.stdout, r.stdout
    import importlib
    for name, home in OLD_HOMES.items(): assert getattr(dd, name) is getattr(importlib.import_module(home), name), name
    assert set(OLD_HOMES) <= set(dir(dd))
    fct.test_fail(lambda: dd.load_offical, contains="no attribute 'load_offical'")
