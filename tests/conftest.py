import pytest
import torch

_THREADS = torch.get_num_threads()


@pytest.fixture(autouse=True)
def _threads(request):
    """Tiny models are dominated by per-op overhead, where extra threads only spin: use one.
    The real default model gets every core."""
    torch.set_num_threads(_THREADS if request.node.get_closest_marker("integration") else 1)
    yield
