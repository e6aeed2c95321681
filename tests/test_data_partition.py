import pickle

import numpy as np
import pytest
from PIL import Image

from fedgen.config import RunConfig
from fedgen.data import DataError, load_data, to_float, to_uint8
from fedgen.partition import histograms, partition


def test_digits_ship_with_a_stratified_split():
    data = load_data(RunConfig())
    assert data.train_x.dtype == np.uint8 and data.train_x.shape[1:] == (1, 8, 8)
    assert len(data.train_y) + len(data.test_y) == 1797
    assert data.num_classes == 10
    train_share = np.bincount(data.train_y) / len(data.train_y)
    test_share = np.bincount(data.test_y) / len(data.test_y)
    assert np.abs(train_share - test_share).max() < 0.01


def test_uint8_float_roundtrip():
    x = np.arange(256, dtype=np.uint8).reshape(1, 1, 16, 16)
    assert np.array_equal(to_uint8(to_float(x)), x)
    assert to_float(x).min() == -1 and to_float(x).max() == 1


@pytest.mark.parametrize("scheme", ["dirichlet", "iid"])
def test_partition_is_deterministic_disjoint_and_complete(scheme):
    data = load_data(RunConfig())
    cfg = RunConfig(partitioning=scheme, alpha=0.1, num_clients=10, seed=3)
    parts = partition(data.train_y, cfg)
    again = partition(data.train_y.copy(), cfg.replace(alpha=0.1))
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    joined = np.concatenate(parts)
    assert len(joined) == len(np.unique(joined)) == len(data.train_y)  # disjoint, complete
    assert min(len(p) for p in parts) >= cfg.min_partition_size
    other = partition(data.train_y, cfg.replace(seed=4))
    assert any(not np.array_equal(a, b) for a, b in zip(parts, other))


def test_dirichlet_alpha_controls_skew():
    data = load_data(RunConfig())
    def classes_per_client(alpha):
        cfg = RunConfig(alpha=alpha, num_clients=10, seed=0)
        h = histograms(data.train_y, partition(data.train_y, cfg), 10)
        return (h > 0).sum(1).mean()
    assert classes_per_client(0.1) < classes_per_client(100.0)


def _write_cifar(root, n_train=20, n_test=10):
    rng = np.random.default_rng(0)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for i in range(1, 6):
        batch = {b"data": rng.integers(0, 256, (n_train, 3072), dtype=np.uint8),
                 b"labels": list(rng.integers(0, 10, n_train))}
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(batch))
    test = {b"data": rng.integers(0, 256, (n_test, 3072), dtype=np.uint8),
            b"labels": list(rng.integers(0, 10, n_test))}
    (folder / "test_batch").write_bytes(pickle.dumps(test))
    meta = {b"label_names": [f"c{i}".encode() for i in range(10)]}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta))


def test_cifar10_loads_the_python_pickle_layout(tmp_path):
    _write_cifar(tmp_path)
    data = load_data(RunConfig(dataset="cifar10", data_dir=str(tmp_path)))
    assert data.train_x.shape == (100, 3, 32, 32) and data.test_x.shape == (10, 3, 32, 32)
    assert data.classes[3] == "c3"
    small = load_data(RunConfig(dataset="cifar10", data_dir=str(tmp_path), image_size=16))
    assert small.train_x.shape == (100, 3, 16, 16)


def test_missing_cifar_names_path_and_layout(tmp_path):
    with pytest.raises(DataError) as err:
        load_data(RunConfig(dataset="cifar100", data_dir=str(tmp_path / "none")))
    msg = str(err.value)
    assert str(tmp_path / "none") in msg and "cifar-100-python" in msg and "train" in msg


def test_imagefolder_reads_class_folders(tmp_path):
    for c, name in enumerate(["cat", "dog"]):
        (tmp_path / name).mkdir()
        for i in range(5):
            Image.new("RGB", (20, 12), (40 * c, 10 * i, 0)).save(tmp_path / name / f"{i}.png")
    data = load_data(RunConfig(dataset="imagefolder", data_dir=str(tmp_path), image_size=8,
                               test_fraction=0.4))
    assert data.classes == ("cat", "dog")
    assert data.train_x.shape == (6, 3, 8, 8) and len(data.test_y) == 4


def test_empty_imagefolder_is_a_clear_error(tmp_path):
    (tmp_path / "cat").mkdir()
    with pytest.raises(DataError, match="ImageFolder layout"):
        load_data(RunConfig(dataset="imagefolder", data_dir=str(tmp_path), image_size=9))
