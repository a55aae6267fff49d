"""Datasets: digits, folder, cifar10 (restricted unpickler), synthetic; spec parsing and errors."""

import os
import pickle
import sys

import numpy as np
import pytest
import torch

from ddim_fast import data as D


# -- digits ----------------------------------------------------------------------------------------
def test_digits_values_and_split():
    pytest.importorskip("sklearn")
    from sklearn.datasets import load_digits

    raw = load_digits()
    x, y = D.load_digits(8, split="all")  # native resolution: no resampling
    assert x.shape == (1797, 1, 8, 8) and x.dtype == torch.float32
    # 0..16 maps linearly to [-1, 1]
    assert torch.equal(x[:, 0], torch.from_numpy(raw.images).float() / 8 - 1)
    assert torch.equal(y, torch.from_numpy(raw.target).long())
    xtr, ytr = D.load_digits(8, split="train")
    xte, yte = D.load_digits(8, split="test")
    assert len(xtr) == 1438 and len(xte) == 359
    # disjoint and together the whole set: compare as multisets of rows
    rows = lambda a: sorted(map(tuple, a.flatten(1).tolist()))
    assert rows(torch.cat([xtr, xte])) == rows(x)
    assert set(ytr.tolist()) == set(yte.tolist()) == set(range(10))


@pytest.mark.parametrize("res", [16, 32])
def test_digits_dataset_upsampled(res):
    pytest.importorskip("sklearn")
    ds = D.load_dataset("digits", res, 1)
    assert len(ds) == 1438 and ds[0].shape == (1, res, res)
    assert ds.images.min() >= -1 and ds.images.max() <= 1
    assert not ds.flip_ok  # a mirrored 2 is not a 2
    # bilinear upsampling keeps the mean intensity of each image close to the 8x8 original's
    small, _ = D.load_digits(8, split="train")
    assert torch.allclose(ds.images.mean((1, 2, 3)), small.mean((1, 2, 3)), atol=0.05)
    rgb = D.load_dataset("digits", res, 3)
    assert rgb[0].shape == (3, res, res) and torch.equal(rgb[0][0], rgb[0][2])


def test_digits_without_sklearn_names_the_fix(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # import fails
    with pytest.raises(ImportError, match=r"pip install 'ddim-fast\[train\]'"):
        D.load_dataset("digits", 16, 1)


# -- synthetic -------------------------------------------------------------------------------------
def test_synthetic_is_deterministic_and_in_range():
    a = D.load_dataset("synthetic:10", 16, 3)
    b = D.load_dataset("synthetic:10", 16, 3)
    assert len(a) == 10 and torch.equal(a.images, b.images)
    assert a.images.min() >= -1 and a.images.max() <= 1 and a.images.std() > 0.2
    assert len(D.load_dataset("synthetic", 8, 1)) == 256


# -- folder ----------------------------------------------------------------------------------------
def _png(path, arr, mode=None):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, mode=mode).save(path)


def test_folder_center_crop_resize_and_modes(tmp_path):
    # 40 wide x 20 high: the centre 20x20 square is white, the 10-px side bands are black,
    # so a correct centre crop is all white and a wrong one is not.
    wide = np.zeros((20, 40, 3), np.uint8)
    wide[:, 10:30] = 255
    _png(tmp_path / "a" / "wide.png", wide)
    tall = np.zeros((30, 10), np.uint8)  # grey, tall: centre rows 10..20 are 128
    tall[10:20] = 128
    _png(tmp_path / "b" / "c" / "tall.png", tall)
    (tmp_path / "notes.txt").write_text("not an image")
    ds = D.load_dataset(f"folder:{tmp_path}", 8, 3)
    assert len(ds) == 2 and ds.flip_ok
    x = torch.stack([ds[0], ds[1]])
    assert x.shape == (2, 3, 8, 8)
    assert torch.allclose(x[0], torch.ones(3, 8, 8), atol=1e-6)  # wide.png: centre crop is white
    assert torch.allclose(x[1], torch.full((3, 8, 8), 128 / 127.5 - 1), atol=0.02)  # grey -> RGB
    grey = D.load_dataset(f"folder:{tmp_path}", 8, 1)
    assert grey[0].shape == (1, 8, 8)


def test_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        D.load_dataset(f"folder:{tmp_path / 'missing'}", 16, 3)
    with pytest.raises(ValueError, match="no images"):
        D.load_dataset(f"folder:{tmp_path}", 16, 3)
    f = tmp_path / "x.png"
    _png(f, np.zeros((4, 4), np.uint8))
    with pytest.raises(NotADirectoryError, match="needs a folder"):
        D.load_dataset(f"folder:{f}", 16, 3)
    with pytest.raises(ValueError, match="needs a path"):
        D.load_dataset("folder:", 16, 3)


def test_folder_labels_come_from_class_sub_folders(tmp_path):
    # ImageFolder's layout: the label is the index of the sub-folder among the sorted names
    for cls, n in (("dog", 2), ("cat", 1), ("zebra", 1)):
        for i in range(n):
            _png(tmp_path / "pics" / cls / f"{i}.png", np.full((6, 6), 10 * n + i, np.uint8))
    _png(tmp_path / "pics" / "dog" / "deep" / "x.png", np.zeros((6, 6), np.uint8))  # nested: still a dog
    (tmp_path / "pics" / "empty").mkdir()  # holds no image: no class
    ds = D.load_dataset(f"folder:{tmp_path / 'pics'}", 4, 1)
    assert ds.classes == ("cat", "dog", "zebra")
    got = {str(f.relative_to(tmp_path / "pics")): int(y) for f, y in zip(ds.files, ds.labels)}
    assert got == {"cat/0.png": 0, "dog/0.png": 1, "dog/1.png": 1, "dog/deep/x.png": 1, "zebra/0.png": 2}
    assert ds.labels.dtype == torch.long
    # one image directly in the root: an unlabelled folder, as before
    _png(tmp_path / "pics" / "loose.png", np.zeros((6, 6), np.uint8))
    flat = D.load_dataset(f"folder:{tmp_path / 'pics'}", 4, 1)
    assert flat.labels is None and flat.classes is None and len(flat) == 6


def test_labelled_datasets_name_their_classes():
    pytest.importorskip("sklearn")
    ds = D.load_dataset("digits", 8, 1)
    assert ds.classes == tuple("0123456789") and ds.labels.min() == 0 and ds.labels.max() == 9
    syn = D.load_dataset("synthetic:4", 8, 1)
    assert syn.labels is None and syn.classes is None


# -- cifar10 ---------------------------------------------------------------------------------------
def _cifar_batch(n, seed, protocol=2, py2_names=False):
    rs = np.random.RandomState(seed)
    d = {b"batch_label": b"batch", b"labels": rs.randint(0, 10, n).tolist(),
         b"data": rs.randint(0, 256, (n, 3072)).astype(np.uint8), b"filenames": [b"f%d" % i for i in range(n)]}
    raw = pickle.dumps(d, protocol=protocol)
    if py2_names:  # the real files were written by Python 2 with numpy 1: numpy.core.multiarray
        raw = raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    return d, raw


@pytest.mark.parametrize("protocol,py2", [(2, True), (2, False), (4, False), (5, False)])
def test_cifar10_reads_batches(tmp_path, protocol, py2):
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    batches = {}
    for i, name in enumerate(D.CIFAR_TRAIN_FILES + D.CIFAR_TEST_FILES):
        batches[name], raw = _cifar_batch(3, i, protocol, py2)
        (root / name).write_bytes(raw)
    ds = D.load_dataset(f"cifar10:{tmp_path}", 32, 3)  # the parent folder works too
    assert len(ds) == 15 and ds.flip_ok
    first = batches["data_batch_1"]
    want = torch.from_numpy(first[b"data"][0].reshape(3, 32, 32)).float() / 127.5 - 1
    assert torch.equal(ds[0], want)
    assert ds.labels.tolist()[:3] == first[b"labels"]
    test = D.load_dataset(f"cifar10:{root}", 16, 1, split="test")
    assert len(test) == 3 and test[0].shape == (1, 16, 16)


def test_cifar10_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        D.load_dataset(f"cifar10:{tmp_path / 'nope'}", 32, 3)
    with pytest.raises(FileNotFoundError, match="data_batch_1"):
        D.load_dataset(f"cifar10:{tmp_path}", 32, 3)


class _Evil:
    """Unpickling this would run os.system and create a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _EvalEvil:
    def __reduce__(self):
        return (eval, ("__import__('os').system('touch /tmp/ddim_fast_eval_marker')",))


@pytest.mark.parametrize("payload", ["system", "eval", "nested"])
def test_restricted_unpickler_refuses_code_without_running_it(tmp_path, payload):
    marker = tmp_path / "pwned"
    evil = {"system": _Evil(marker), "eval": _EvalEvil(),
            "nested": {b"data": np.zeros((1, 3072), np.uint8), b"labels": [_Evil(marker)]}}[payload]
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps(evil, protocol=2))
    # the unrestricted unpickler WOULD run it (proves the payload is live)
    if payload == "system":
        pickle.loads(path.read_bytes())
        assert marker.exists()
        marker.unlink()
    with pytest.raises(ValueError, match="refused to unpickle.*forbidden global"):
        D.read_cifar_batch(path)
    assert not marker.exists()
    assert not os.path.exists("/tmp/ddim_fast_eval_marker")


def test_restricted_unpickler_allows_only_arrays_and_containers():
    import io

    ok = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": [1, 2.5, "x", b"y", (3, None)], "s": {1, 2}}
    out = D.RestrictedUnpickler(io.BytesIO(pickle.dumps(ok, protocol=2))).load()
    assert np.array_equal(out["a"], ok["a"]) and out["b"] == ok["b"] and out["s"] == {1, 2}
    import collections

    for obj in (torch.zeros(2), collections.OrderedDict(a=1), os.getcwd):  # tensor, foreign class, function
        with pytest.raises(pickle.UnpicklingError, match="forbidden global"):
            D.RestrictedUnpickler(io.BytesIO(pickle.dumps(obj, protocol=2))).load()


def test_cifar_batch_garbage(tmp_path):
    bad = tmp_path / "data_batch_1"
    bad.write_bytes(b"\x80\x02not a pickle")
    with pytest.raises(ValueError, match="not a readable CIFAR-10 batch"):
        D.read_cifar_batch(bad)
    bad.write_bytes(pickle.dumps({b"data": np.zeros((2, 5), np.uint8), b"labels": [0, 1]}, protocol=2))
    with pytest.raises(ValueError, match="lacks the CIFAR-10 'data'"):
        D.read_cifar_batch(bad)


# -- specs -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec,match", [
    ("mnist", "unknown dataset spec"), ("", "non-empty"), ("synthetic:zero", "positive int"),
    ("cifar10:", "needs a path"),
])
def test_bad_specs(spec, match):
    with pytest.raises(ValueError, match=match):
        D.load_dataset(spec, 16, 3)


def test_bad_arguments():
    with pytest.raises(ValueError, match="channels"):
        D.load_dataset("synthetic", 16, 2)
    with pytest.raises(ValueError, match="split"):
        D.load_dataset("synthetic", 16, 3, split="val")
    with pytest.raises(ValueError, match="resolution"):
        D.load_dataset("synthetic", 0, 3)
