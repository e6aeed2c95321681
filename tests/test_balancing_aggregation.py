import numpy as np
import pytest

from fedgen.aggregation import rowwise_average, weighted_average
from fedgen.balancing import fill_to_max, noise_fill, oversample


def test_fill_to_max_fills_every_class_including_absent_ones():
    counts = np.array([10, 4, 0, 7])
    assert fill_to_max(counts, 1.0).tolist() == [0, 6, 10, 3]
    assert fill_to_max(counts, 0.5).tolist() == [0, 3, 5, 2]  # round(1.5) = 2
    assert fill_to_max(counts, 0.0).tolist() == [0, 0, 0, 0]
    balanced = counts + fill_to_max(counts, 1.0)
    assert (balanced == 10).all()


def test_fill_to_max_works_per_client_row():
    counts = np.array([[5, 0], [1, 3]])
    assert fill_to_max(counts, 1.0).tolist() == [[0, 5], [2, 0]]


def test_oversample_and_noise_leave_absent_classes_absent():
    rng = np.random.default_rng(0)
    labels = np.array([0, 0, 0, 1])
    images = np.stack([np.full((1, 2, 2), 10 * i, np.uint8) for i in range(4)])
    deficits = fill_to_max(np.bincount(labels, minlength=3), 1.0)  # [0, 2, 3]
    x, y = oversample(images, labels, deficits, rng)
    assert sorted(y.tolist()) == [1, 1]
    assert (x == 30).all()  # copies of the only class-1 image
    xn, yn = noise_fill(images, labels, deficits, 0.1, rng)
    assert sorted(yn.tolist()) == [1, 1] and not (xn == 30).all()
    assert np.abs(xn.astype(int) - 30).max() < 80


def test_weighted_average_weights_by_samples():
    a = [np.array([0.0, 0.0]), np.array([10], dtype=np.int64)]
    b = [np.array([4.0, 8.0]), np.array([20], dtype=np.int64)]
    avg = weighted_average([a, b], [1, 3])
    assert np.allclose(avg[0], [3.0, 6.0])
    assert avg[1].dtype == np.int64 and avg[1].tolist() == [18]  # 17.5 rounds to even 18
    uniform = weighted_average([a, b], [1, 1])
    assert np.allclose(uniform[0], [2.0, 4.0])


def test_weighted_average_rejects_bad_weights():
    with pytest.raises(ValueError):
        weighted_average([[np.zeros(1)]], [0])


def test_rowwise_average_weights_each_row_by_its_own_column():
    a = np.array([[1.0, 1.0], [2.0, 2.0], [5.0, 5.0]], np.float32)
    b = np.array([[3.0, 3.0], [4.0, 4.0], [5.0, 5.0]], np.float32)
    fallback = np.full((3, 2), -1.0, np.float32)
    # row 0: only client a holds the class -> its row as is; row 1: 1:3 -> 2*0.25 + 4*0.75;
    # row 2: nobody weights it -> the fallback (the plain average) stays
    out = rowwise_average([a, b], np.array([[2, 1, 0], [0, 3, 0]]), fallback)
    np.testing.assert_allclose(out, [[1, 1], [3.5, 3.5], [-1, -1]])
    assert out.dtype == np.float32
    with pytest.raises(ValueError, match="row_weights"):
        rowwise_average([a, b], np.ones((2, 2)), fallback)
