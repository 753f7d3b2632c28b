"""Task streams: the real Fashion-MNIST split, and one-line errors for tasks a run cannot use."""
import gzip

import pytest
import torch

from edgesparse import EdgesparseError
from edgesparse_sparcl import data
from edgesparse_sparcl.data import TaskStream, parse_tasks, read_idx


def _stream(tasks, y_train=None, y_test=None):
    y_train = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]) if y_train is None else y_train
    y_test = torch.tensor([0, 1, 2, 3]) if y_test is None else y_test
    return TaskStream(torch.zeros(len(y_train), 1, 4, 4), y_train, torch.zeros(len(y_test), 1, 4, 4), y_test, tasks)


def test_split_fashion_mnist_is_balanced_and_disjoint(fmnist_two_tasks):
    s = fmnist_two_tasks
    assert s.x_train.shape == (192, 1, 28, 28) and s.x_test.shape == (80, 1, 28, 28)
    assert s.tasks == ((0, 1), (2, 3))
    for t, classes in enumerate(s.tasks):
        y = s.y_train[s.task_indices(t, "train")]
        assert sorted(torch.unique(y).tolist()) == list(classes)
        assert (y == classes[0]).sum() == (y == classes[1]).sum() == 48
    assert abs(float(s.x_train.mean())) < 0.3  # normalised with the data set's mean/std


def test_overlapping_tasks_are_refused():
    with pytest.raises(EdgesparseError, match="tasks 0 and 1 both contain class 1"):
        _stream(((0, 1), (1, 2)))


def test_missing_classes_are_refused():
    with pytest.raises(EdgesparseError, match="task 1 lists class 7, which has no training examples"):
        _stream(((0, 1), (2, 7)))
    with pytest.raises(EdgesparseError, match="class 3, which has no test examples"):
        _stream(((0, 1), (2, 3)), y_test=torch.tensor([0, 1, 2]))
    with pytest.raises(EdgesparseError, match="task 1 has no classes"):
        _stream(((0, 1), ()))


def test_real_loader_refuses_bad_tasks():
    with pytest.raises(EdgesparseError, match="both contain class 4"):
        data.split_fashion_mnist(tasks=((3, 4), (4, 5)), train_per_task=10, test_per_task=10)
    with pytest.raises(EdgesparseError, match="class 10, which has no training examples"):
        data.split_fashion_mnist(tasks=((8, 9), (10, 11)), train_per_task=10, test_per_task=10)


def test_parse_tasks():
    assert parse_tasks("0,1;2,3") == ((0, 1), (2, 3))
    with pytest.raises(EdgesparseError, match="task 1 in '0,1;a,b'"):
        parse_tasks("0,1;a,b")


def test_read_idx_rejects_truncated_files(tmp_path):
    bad = tmp_path / "bad.gz"
    with gzip.open(bad, "wb") as f:
        f.write(bytes([0, 0, 8, 1]) + (10).to_bytes(4, "big") + bytes(5))
    with pytest.raises(EdgesparseError, match="truncated"):
        read_idx(bad)
