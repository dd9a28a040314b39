"""torchrun for a stage's processes, ending with the exit code of the process that failed first.

torchrun ends with 1 however a process failed. A stage's own codes (2: bad input, 3: a damaged input artifact;
core/errors.py) tell the launcher not to retry it, or to compute that input again first, so a stage of several
processes must end with them too. This is torchrun's own launch (`torch.distributed.run`: its options, its
rendezvous, its supervision of the processes) with that failure passed on. The launcher runs it as
`python -m rlhf_pipeline.stages.modeling.torchrun ...`, or calls `main` in a child of its warm interpreter.
"""

from __future__ import annotations

import sys

from torch.distributed import run as torch_run
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure


def main(argv: list[str] | None = None) -> int:
    """`torchrun ARGV`; 0, or the exit code of the process that failed first (1 where a signal killed it)."""
    try:
        torch_run.run(torch_run.parse_args(argv))
    except ChildFailedError as failed:
        rank, failure = failed.get_first_failure()
        print(f"the stage's process of rank {rank} failed first, {how_it_ended(failure)}", file=sys.stderr)
        return failure.exitcode if failure.exitcode > 0 else 1
    return 0


def how_it_ended(failure: ProcessFailure) -> str:
    """The signal or exit code, and the exception the process recorded (`runner.run_stage`), if it did."""
    how = f"killed by {failure.signal_name()}" if failure.exitcode < 0 else f"exit code {failure.exitcode}"
    recorded = failure.message.get("message") if isinstance(failure.message, dict) else None
    return f"{how}: {recorded}" if recorded else how


if __name__ == "__main__":
    sys.exit(main())
