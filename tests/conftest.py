import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread_per_test():
    # Results must not depend on how many cores the machine lends a test.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """One prepared-data cache for the whole session: the default corpus is tokenized once."""
    return str(tmp_path_factory.mktemp("prepared"))
