"""`--single-thread`: one CPU thread for XLA and PyTorch.

On a shared, loaded CPU box PyTorch's OpenMP threads spin-wait for descheduled peers and
can run 10–100× slower than usual, which turned one rollout ratio into fiction (see the
README). With one thread per side the ratio is per core and holds under load. The flags
must be set before jax or torch start their thread pools, so import this module first.
"""

import os
import sys


def pin_from_argv() -> bool:
    """Sets the one-thread environment when ``--single-thread`` is on the command line."""
    if "--single-thread" not in sys.argv:
        return False
    flags = " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + flags
    os.environ["OMP_NUM_THREADS"] = "1"
    return True
