"""``accelerate launch`` whose exit status is the training script's, with no launcher traceback.

    python -m clipkit.train.launch scripts/train.py train.batch_size=64
    python -m clipkit.train.launch --config_file configs/accelerate/multi_gpu_8.yaml \\
        scripts/train.py --config my.yaml

The options are ``accelerate launch``'s own (same parser). Why it exists (issue 17): accelerate
runs the script as a child process and, when the child exits non-zero, raises
``CalledProcessError`` in the parent (single process, MPI) or lets torchrun's
``ChildFailedError`` escape (multi-GPU): a traceback after the trainer's one-line error, and exit
1 in place of the trainer's 2. The child cannot prevent that; this wrapper runs the same launch
in-process and turns those two exceptions into the child's exit status. With plain ``accelerate
launch``, ``-q``/``--quiet`` hides the traceback for single-process and MPI launches (exit 1).

A process that dies in a multi-process launch (issue 15): the survivors print one line naming it
and the checkpoint to resume from (:mod:`clipkit.train.fault`); torchrun's own log lines and
failure summary are silenced here, so that line is all the user reads. When no process printed
a line of its own (all killed), one line here says which rank ended how.
"""

from __future__ import annotations

import subprocess
import sys


def _status(code: int) -> int:
    """A child's return code as a shell exit status (killed by signal N -> 128 + N)."""
    return 128 - code if code < 0 else code


def main(argv: list[str] | None = None) -> int:
    """Run ``accelerate launch`` with ``argv``; return the training script's exit status.

    Returns:
        0 on success, else the (first failing) child's status: 2 for a one-line error, 1 for a
        failed evaluation, 128 + N when killed by signal N.
    """
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    _quiet_torchrun()

    parser = launch_command_parser()
    parser.prog = "python -m clipkit.train.launch"
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        launch_command(args)
    except subprocess.CalledProcessError as err:
        return _status(err.returncode) or 1
    except ChildFailedError as err:
        # torchrun has already logged which rank failed; the trainer printed its own line.
        failures = sorted(err.failures.items())
        codes = [_status(f.exitcode) for _, f in failures]
        if 2 not in codes:  # nobody printed the trainer's one line: say what happened
            first_rank, first = failures[0]
            how = f"signal {-first.exitcode}" if first.exitcode < 0 else f"status {first.exitcode}"
            print(f"error: rank {first_rank} ended with {how} (no message)", file=sys.stderr)
        return next((c for c in codes if c), 1)
    return 0


def _quiet_torchrun() -> None:
    """Silence torch.distributed.elastic's log lines ("failed (exitcode: -9) local_rank: 1 ...",
    "Sending process N closing signal SIGTERM"): the trainer reports a failure in one line."""
    import logging

    import torch.distributed.elastic.multiprocessing.api  # noqa: F401  (creates its loggers)

    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch.distributed.elastic") or name.startswith("torch.distributed.run"):
            logging.getLogger(name).setLevel(logging.CRITICAL)


if __name__ == "__main__":
    raise SystemExit(main())
