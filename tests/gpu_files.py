"""Files as a GPU run writes them, made on a machine without one."""

import contextlib

import torch


@contextlib.contextmanager
def saved_as_cuda():
    """Within this block, torch.save tags every CPU tensor's storage "cuda:0", as a GPU run's files are tagged.

    Such a file loaded without map_location on a machine without CUDA fails
    with "Attempting to deserialize object on a CUDA device": what a
    checkpoint of a GPU run does on a laptop unless its reader maps it to the CPU.
    """
    registry = torch.serialization._package_registry
    before = list(registry)
    # Priority 0 puts this tagger ahead of torch's CPU one (10); the deserializer
    # declines (None), leaving the "cuda:0" tag to torch's own CUDA deserializer.
    torch.serialization.register_package(0, lambda s: "cuda:0" if s.device.type == "cpu" else None,
                                         lambda s, location: None)
    try:
        yield
    finally:
        registry[:] = before
