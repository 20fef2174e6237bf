"""Worker for test_run_robustness.py: the trainer, with one rank's checkpoint write failing.

Run with ``torchrun --nproc_per_node 2 tests/train/enospc_worker.py key=value ...``. The rank in
``ENOSPC_RANK`` raises ENOSPC while saving the checkpoint of step ``ENOSPC_STEP``; every other
rank writes normally, so the processes must agree on the failure instead of waiting for each
other.
"""

import errno
import os
import sys

from accelerate import Accelerator

from clipkit.train.cli import main

_real_save = Accelerator.save_state


def _save(self, output_dir=None, **kw):
    out = _real_save(self, output_dir, **kw)
    failing = self.process_index == int(os.environ["ENOSPC_RANK"])
    if failing and output_dir.endswith(f"step_{int(os.environ['ENOSPC_STEP']):07d}.tmp"):
        raise OSError(errno.ENOSPC, "No space left on device")
    return out


Accelerator.save_state = _save

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
