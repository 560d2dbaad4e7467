import os

import pytest
import torch
from hypothesis import settings


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


# The suite's networks are tiny: one intra-op thread is as fast, and it stays fast when
# the other core is busy (2 threads on a loaded 2-core machine made small matmuls ~100x slower).
torch.set_num_threads(1)


# Property tests draw the same examples on every run (a CI result is reproducible and a failure
# is not a coin toss); HYPOTHESIS_PROFILE=explore draws fresh random ones.
settings.register_profile("default", derandomize=True, print_blob=True)
settings.register_profile("explore", print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
