import pytest
import torch

from edgesparse_sparcl.data import split_fashion_mnist


@pytest.fixture(scope="session")
def fmnist_two_tasks():
    """Real Fashion-MNIST, two tasks of two classes, 96 training and 40 test images per task."""
    return split_fashion_mnist(tasks=((0, 1), (2, 3)), train_per_task=96, test_per_task=40)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # 1 thread in these modules (set before their module fixtures train; restored after): on the shared 2-core VM a 2-thread tiny
    # training run took 16 s instead of 2 (every parallel region waits for a descheduled thread)
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(autouse=True)
def _two_threads_for_kernels(request, _one_thread):
    # the kernel tests run 2 threads so that the kernels' work splitting is exercised
    if request.path.name != "test_sparcl_kernels.py":
        yield
        return
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(1)
