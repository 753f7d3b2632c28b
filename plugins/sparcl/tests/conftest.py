import pytest
import torch

from edgesparse_sparcl.data import split_fashion_mnist


@pytest.fixture(scope="session")
def fmnist_two_tasks():
    """Real Fashion-MNIST, two tasks of two classes, 96 training and 40 test images per task."""
    return split_fashion_mnist(tasks=((0, 1), (2, 3)), train_per_task=96, test_per_task=40)


@pytest.fixture(autouse=True)
def _few_threads():
    old = torch.get_num_threads()
    torch.set_num_threads(min(old, 2))
    yield
    torch.set_num_threads(old)
