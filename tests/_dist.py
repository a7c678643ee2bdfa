"""The tests' launcher: `uniopd_mcore.learner.parallel.run_local_processes`, forking where that is
safe (fast: the children do not re-import torch), with a 300 s timeout and without the GPU count
check (some tests run gloo on CPU tensors with more ranks than GPUs).

    from _dist import run_distributed
    results = run_distributed(fn, world_size=2, args=(...,))   # fn(rank, world_size, *args)
"""

import functools

from uniopd_mcore.learner.parallel import run_local_processes

run_distributed = functools.partial(run_local_processes, start_method=None, timeout=300.0, check_gpus=False)
