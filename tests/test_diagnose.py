"""dvt.diagnostics: the stage-2 remedy on the planted backbone, measured on held-out photos like the linear removers."""
import pytest
import torch
import fastcore.test as fct
from dvt.data import resize_images, sample_images
from dvt.denoiser import DenoisedBackbone
from dvt.diagnostics import diagnose, fit_position_remover, fit_stage2, planted_effect, stage1_pairs, train_on_pairs
from dvt.stage1 import stage1_config
from dvt.synthetic import PlantedBackbone

S = 64                                                                   # the tiny preset's 8 x 8 token grid


@pytest.fixture(scope="module")
def setup():
    torch.set_num_threads(1)
    bb, photos = PlantedBackbone("tiny"), sample_images(8)
    return bb, photos[::2], photos[1::2]                                  # fit on four photos, measure on four others


def held_out(bb, test):
    xs = torch.stack([resize_images(im, S) for im in test])              # (4, 3, S, S)
    return xs, bb.parts(xs)


def test_stage2_removes_the_planted_artifact_on_held_out_photos(setup):
    bb, train, test = setup
    rng = torch.random.get_rng_state()
    st2 = fit_stage2(bb, train, size=S, stage1="smoke", steps=300)
    assert torch.equal(rng, torch.random.get_rng_state())                # the caller's RNG is untouched
    assert isinstance(st2, DenoisedBackbone) and st2.backbone is bb and not st2.denoiser.training
    xs, parts = held_out(bb, test)
    with torch.no_grad(): raw, out = planted_effect(bb(xs), parts), planted_effect(st2(xs), parts)
    fct.test_close(raw["artifact_kept"], 1.0, eps=0.05)
    assert out["artifact_kept"] < 0.5 * raw["artifact_kept"], (out, raw)    # most of the artifact is gone on unseen photos
    assert out["clean_error"] < raw["clean_error"], (out, raw)             # and the tokens are closer to the clean part
    assert set(out) == {"artifact_kept", "clean_lost", "clean_error"}    # the clean cost is reported


def test_planted_effect_of_a_linear_remover_matches_its_projection(setup):
    "For x -> x - (x - m) Q Q^T, artifact kept is the kept artifact energy up to the cross terms between parts."
    bb, train, test = setup
    rem = fit_position_remover(bb, train, method="grid", size=S)
    xs, parts = held_out(bb, test)
    a = parts["artifact"] - parts["artifact"].mean((1, 2), keepdim=True)
    Q = rem.basis.double()
    kept = float(((a.double() - a.double() @ Q @ Q.T) ** 2).sum() / (a.double() ** 2).sum())
    with torch.no_grad(): eff = planted_effect(rem(xs), parts)
    fct.test_close(eff["artifact_kept"], kept, eps=0.05)
    fct.test_fail(lambda: planted_effect(rem(xs)[:2], parts), contains="differ in shape")


def test_diagnose_accepts_the_stage2_variant(setup):
    bb, train, test = setup
    photos = [im for pair in zip(train, test) for im in pair]            # diagnose fits on the even, measures on the odd
    rep = diagnose(bb, photos, variants=("raw", "stage2"), preset="smoke", size=S, mic_k=0, stage2_steps=300)
    df = rep.frame().set_index("variant")
    fct.test_eq(list(df.index), ["raw", "stage2"])
    assert df.loc["stage2", "position_r2"] < df.loc["raw", "position_r2"]


def test_train_on_pairs_checks_its_input():
    raw = torch.randn(2, 4, 4, 16)
    fct.test_fail(lambda: train_on_pairs(raw, raw[:, :3]), contains="must be (N, h, w, C) tokens of one shape")
    fct.test_fail(lambda: train_on_pairs(raw, raw, steps=0), contains="steps=0")


def test_stage1_pairs_are_the_backbone_tokens_and_their_fields(setup):
    bb, train, _ = setup
    raw, clean = stage1_pairs(bb, train[:1], size=S, preset=stage1_config("smoke", steps=5))
    fct.test_eq(raw.shape, (1, 8, 8, 16)); fct.test_eq(clean.shape, raw.shape)
    with torch.no_grad(): fct.test_close(raw[0], bb(resize_images(train[0], S)[None])[0], eps=1e-5)
