"""`mlxd serve` whose decode loop fails once: a stand-in for a Metal out-of-memory
error in the middle of a stream, which the tests cannot cause for real.

The batch generator raises each time it has delivered MLXD_TEST_FAIL_AFTER more
tokens, MLXD_TEST_FAILURES times (default 1); everything else is the real server.
"""

from __future__ import annotations

import os
import sys

from mlxd.server.blas import setup_blas

setup_blas()  # before mlx.core, as server.cli does

from mlx_lm.generate import BatchGenerator  # noqa: E402

from mlxd.server.cli import main  # noqa: E402

FAIL_AFTER = int(os.environ["MLXD_TEST_FAIL_AFTER"])
_real_next = BatchGenerator.next
_delivered = 0
_failures_left = int(os.environ.get("MLXD_TEST_FAILURES", "1"))


def _next_that_fails(self, *args, **kwargs):
    global _delivered, _failures_left
    if _delivered >= FAIL_AFTER and _failures_left > 0:
        _delivered = 0
        _failures_left -= 1
        raise RuntimeError("[metal::malloc] Resource limit exceeded (injected by tests/faulty_server.py)")
    prompt_responses, gen_responses = _real_next(self, *args, **kwargs)
    _delivered += len(gen_responses)
    return prompt_responses, gen_responses


BatchGenerator.next = _next_that_fails

if __name__ == "__main__":
    sys.exit(main())
