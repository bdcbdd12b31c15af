import gc

import pytest
import torch


def pytest_collection_finish(session):
    # What collection imported (torch, plait, every test module) lives for the whole session, yet
    # each full GC pass walked it again: a quarter of a second a pass, dozens of passes a run.
    # torch._dynamo too, which the first optimizer would import anyway.
    import torch._dynamo  # noqa: F401

    gc.collect()
    gc.freeze()


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
