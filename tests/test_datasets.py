"""dvt.datasets: the real layouts, the fixtures written in them, and the errors for missing data."""
import hashlib
from pathlib import Path
import numpy as np
import pytest
import torch
import fastcore.test as fct
from PIL import Image
from dvt.datasets import (LAYOUTS, DATASETS, data_root, find_dataset, load_dataset, read_label, write_label, read_voc_boxes,
                          read_depth, VOCSegmentation, ADE20KSegmentation, NYUDepthV2, DAVIS2017, VOCBoxes, make_fixture_voc,
                          make_fixture_ade, make_fixture_nyu, make_fixture_davis, make_fixtures, make_rehearsal_data)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return make_fixtures(tmp_path_factory.mktemp("fixtures"))


def test_fixture_files_are_in_the_official_layouts(root):
    voc = root / "VOCdevkit" / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "Annotations", "ImageSets/Segmentation/train.txt",
                "ImageSets/Segmentation/val.txt", "ImageSets/Main/trainval.txt"):
        assert (voc / sub).exists(), sub
    ade = root / "ADEChallengeData2016"
    assert sorted(p.name for p in (ade / "images" / "training").iterdir())[0] == "ADE_train_00000001.jpg"
    assert (ade / "annotations" / "validation").is_dir()
    line = (root / "nyu" / "nyu_test.txt").read_text().splitlines()[0].split()
    assert line[0].startswith("/") and "/rgb_" in line[0] and "/sync_depth_" in line[1] and float(line[2]) > 0
    davis = root / "DAVIS"
    seq = (davis / "ImageSets" / "2017" / "val.txt").read_text().split()[0]
    assert (davis / "JPEGImages" / "480p" / seq / "00000.jpg").exists() and (davis / "Annotations" / "480p" / seq / "00000.png").exists()
    with Image.open(davis / "Annotations" / "480p" / seq / "00000.png") as im: assert im.mode == "P"
    with Image.open(sorted((root / "nyu").glob("*/sync_depth_*.png"))[0]) as im: assert im.mode.startswith("I")  # 16-bit


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_every_dataset_loads(root, name):
    ds = load_dataset(name, root)
    assert len(ds) >= 1
    item = ds[0]
    if name == "davis":
        x = item.frame(0); assert x.shape[0] == 3 and item.mask(0).dtype == torch.int64 and item.objects
    else:
        x, y = item
        assert x.ndim == 3 and x.shape[0] == 3 and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
        if name in ("voc", "ade"): fct.test_eq(y.shape, x.shape[1:]); assert y.dtype == torch.int64
        if name == "nyu": fct.test_eq(y.shape, (480, 640)); assert y.dtype == torch.float32


def test_labels_in_range(root):
    for i in range(len(VOCSegmentation(root, "train"))):
        y = VOCSegmentation(root, "train").label(i); vals = set(y.unique().tolist())
        assert vals <= set(range(21)) | {255}
    ade = ADE20KSegmentation(root, "training")
    for i in range(len(ade)):
        y, raw = ade.label(i), read_label(ade.pairs[i][1])
        assert ((y == 255) == (raw == 0)).all() and (y[raw > 0] == raw[raw > 0] - 1).all() and y[y != 255].max() < 150


def test_train_and_val_share_classes(root):
    "The fixtures draw from few classes, so a probe trained on the train split can score on the val split."
    tr = set().union(*(set(VOCSegmentation(root, "train").label(i).unique().tolist()) for i in range(4)))
    va = set().union(*(set(VOCSegmentation(root, "val").label(i).unique().tolist()) for i in range(4)))
    assert len((tr & va) - {0, 255}) >= 1


def test_voc_boxes_match_the_labels(root):
    ds = VOCBoxes(root)
    for i in range(len(ds)):
        _, boxes = ds[i]
        lab = read_label(ds.root / "SegmentationClass" / f"{ds.ids[i]}.png")
        obj = (lab > 0) & (lab < 255)
        ys, xs = torch.nonzero(obj, as_tuple=True)
        # the union of the boxes covers every object pixel (the void band lies outside the labelled objects)
        fct.test_eq(boxes[:, 0].min().item() <= xs.min().item(), True); fct.test_eq(boxes[:, 2].max().item() >= xs.max().item() + 1, True)


def test_voc_xml_conversion(tmp_path):
    (tmp_path / "a.xml").write_text("<annotation><object><bndbox><xmin>1</xmin><ymin>5</ymin><xmax>10</xmax><ymax>20</ymax>"
                                    "</bndbox></object></annotation>")
    fct.test_eq(read_voc_boxes(tmp_path / "a.xml"), torch.tensor([[0.0, 4.0, 10.0, 20.0]], dtype=torch.float64))


def test_root_variants_and_env(root, monkeypatch):
    for r in (root, root / "VOCdevkit", root / "VOCdevkit" / "VOC2012"):
        fct.test_eq(find_dataset("voc", r), root / "VOCdevkit" / "VOC2012")
    fct.test_eq(find_dataset("nyu", root / "nyu"), root / "nyu")
    monkeypatch.setenv("DVT_DATA", str(root))
    fct.test_eq(data_root(), root); fct.test_eq(len(DAVIS2017()), len(DAVIS2017(root)))


@pytest.mark.parametrize("kind", sorted(LAYOUTS))
def test_missing_dataset_names_layout_and_readme(tmp_path, kind):
    cls = {"voc": VOCSegmentation, "ade": ADE20KSegmentation, "nyu": NYUDepthV2, "davis": DAVIS2017}[kind]
    with pytest.raises(FileNotFoundError) as e: cls(tmp_path)
    msg = str(e.value)
    assert "data/README.md" in msg and LAYOUTS[kind].splitlines()[0].split()[0] in msg and str(tmp_path) in msg


def test_bad_splits(root):
    fct.test_fail(lambda: NYUDepthV2(root, "val"), contains="'train' or 'test'")
    fct.test_fail(lambda: DAVIS2017(root, "test-dev"), contains="split file not found")
    fct.test_fail(lambda: load_dataset("kitti", root), contains="unknown dataset")
    fct.test_fail(lambda: VOCBoxes(root, year=2007), contains="VOCdevkit/VOC2007/")


def test_nyu_skips_none_lines(tmp_path):
    nyu = make_fixture_nyu(tmp_path, n=2)
    (nyu / "nyu_test.txt").write_text((nyu / "nyu_test.txt").read_text() + "/x/rgb_00099.jpg None 518.8579\n")
    fct.test_eq(len(NYUDepthV2(tmp_path, "test")), 1)


def test_fixtures_are_deterministic(tmp_path):
    def digest(r):
        return hashlib.md5(b"".join(p.read_bytes() for p in sorted(Path(r).rglob("*.png")))).hexdigest()
    make_fixture_voc(tmp_path / "a", n=3); make_fixture_voc(tmp_path / "b", n=3); make_fixture_voc(tmp_path / "c", n=3, seed=1)
    fct.test_eq(digest(tmp_path / "a"), digest(tmp_path / "b")); assert digest(tmp_path / "a") != digest(tmp_path / "c")
    fct.test_fail(lambda: make_fixture_ade(tmp_path / "d", n=1), contains="at least 2")
    fct.test_fail(lambda: make_fixture_davis(tmp_path / "e", n_frames=2), contains="at least 3")


def test_label_io_rejects_colour_pngs(tmp_path):
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "rgb.png")
    fct.test_fail(lambda: read_label(tmp_path / "rgb.png"), contains="index PNG")
    fct.test_fail(lambda: read_label(tmp_path / "missing.png"), contains="not found")


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    return make_rehearsal_data(tmp_path_factory.mktemp("rehearsal"), n=4, n_frames=3)


def test_rehearsal_data_has_the_real_sizes_and_formats(rehearsal):
    "Every dataset through its loader, at the real datasets' image sizes and in their file formats."
    voc = load_dataset("voc", rehearsal, "train")
    sizes = {tuple(voc[i][0].shape[1:]) for i in range(len(voc))}
    fct.test_eq(sizes, {(375, 500), (500, 375)})
    for img, lab in voc.pairs:
        with Image.open(img) as im: assert im.format == "JPEG" and max(im.size) == 500
        with Image.open(lab) as im: assert im.mode == "P" and im.format == "PNG"
        y = read_label(lab); assert (y == 255).any() and (y == 0).any() and ((y > 0) & (y < 255)).any()
    ade = load_dataset("ade", rehearsal, "training")
    for i in range(len(ade)):
        x, y = ade[i]; assert min(x.shape[1:]) in (384, 512) and (read_label(ade.pairs[i][1]) == 0).any() and (y == 255).any()
    nyu = load_dataset("nyu", rehearsal, "train")
    with Image.open(nyu.pairs[0][1]) as im: assert im.mode in ("I;16", "I") and im.size == (640, 480)
    x, z = nyu[0]; fct.test_eq(x.shape, (3, 480, 640))
    assert z.max() < 10 and (z[45:471, 41:601] > 0).float().mean() > 0.95 and (z[:, :8] == 0).all()   # Eigen crop inside the border
    seq = load_dataset("davis", rehearsal)[0]
    fct.test_eq(seq.frame(2).shape, (3, 480, 854)); fct.test_eq(seq.mask(2).shape, (480, 854))
    with Image.open(seq.annotations[0]) as im: assert im.mode == "P"
    assert all(len(s.objects) >= 2 for s in load_dataset("davis", rehearsal))          # multi-object masks
    fct.test_eq([p.name for p in seq.frames], ["00000.jpg", "00001.jpg", "00002.jpg"])


def test_lost_finds_the_fixture_objects_with_a_colour_only_feature(tmp_path):
    "The VOC fixture's objects are salient: a feature of the patch colour alone, with no position in it, finds them."
    from dvt.discovery import run_lost
    from dvt.synthetic import PlantedBackbone
    make_fixture_voc(tmp_path, n=4)
    class ColourOnly(torch.nn.Module):                                  # a fixed function of each patch's colours
        patch_size, stride, embed_dim = 16, 16, 64
        def __init__(self): super().__init__(); self.pb = PlantedBackbone(patch_size=16, embed_dim=64)
        def forward(self, x): return self.pb.parts(x)["clean"]
    assert run_lost(ColourOnly(), tmp_path)["CorLoc"] >= 75             # 3 of the 4 images
    class PositionOnly(torch.nn.Module):                                # the same random code at each position, whatever the image
        patch_size, stride, embed_dim = 16, 16, 8
        def forward(self, x):
            return torch.randn(1, x.shape[2] // 16, x.shape[3] // 16, 8, generator=torch.Generator().manual_seed(0)).expand(len(x), -1, -1, -1)
    assert run_lost(PositionOnly(), tmp_path)["CorLoc"] <= 25


def test_labels_outside_the_classes_name_the_file(root, tmp_path):
    ds = VOCSegmentation(root, "train")
    bad = tmp_path / "bad.png"; write_label(bad, np.array([[0, 1], [40, 255]]))
    ds.pairs = [(ds.pairs[0][0], bad)]
    fct.test_fail(lambda: ds.label(0), contains="bad.png: label values [40]")
    ade = ADE20KSegmentation(root, "training"); y = read_label(ade.pairs[0][1]).numpy(); y[0, 0] = 200
    write_label(tmp_path / "ade.png", y, palette=False); ade.pairs = [(ade.pairs[0][0], tmp_path / "ade.png")]
    fct.test_fail(lambda: ade[0], contains="ade.png: label values [200]")


def test_depth_pngs_are_checked(tmp_path):
    nyu = make_fixture_nyu(tmp_path, n=2)
    ds = NYUDepthV2(tmp_path, "test"); z = ds.depth(0)
    eight = np.clip(z.numpy() * 25.5, 0, 255).astype(np.uint8)           # the same depth as an 8-bit PNG
    Image.fromarray(eight).save(ds.pairs[0][1])
    fct.test_fail(lambda: ds[0], contains="8-bit depth PNG")
    fct.test_fail(lambda: ds[0], contains="depth_scale=")
    fct.test_close(NYUDepthV2(tmp_path, "test", depth_scale=25.5).depth(0), z, eps=0.04)   # read as it is when told the scale
    Image.fromarray(np.zeros((480, 320), np.uint16)).save(ds.pairs[0][1])
    fct.test_fail(lambda: ds[0], contains="differ in size")
    fct.test_fail(lambda: read_depth(tmp_path / "none.png"), contains="not found")
