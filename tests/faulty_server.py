"""`mlxd serve` whose decode loop fails once: a stand-in for a Metal out-of-memory
error in the middle of a stream, which the tests cannot cause for real.

The batch generator raises when it has delivered MLXD_TEST_FAIL_AFTER tokens;
everything else is the real server.
"""

from __future__ import annotations

import os
import sys

from server.blas import setup_blas

setup_blas()  # before mlx.core, as server.cli does

from mlx_lm.generate import BatchGenerator  # noqa: E402

from server.cli import main  # noqa: E402

FAIL_AFTER = int(os.environ["MLXD_TEST_FAIL_AFTER"])
_real_next = BatchGenerator.next
_delivered = 0
_failed = False


def _next_that_fails_once(self, *args, **kwargs):
    global _delivered, _failed
    if _delivered >= FAIL_AFTER and not _failed:
        _failed = True
        raise RuntimeError("[metal::malloc] Resource limit exceeded (injected by tests/faulty_server.py)")
    prompt_responses, gen_responses = _real_next(self, *args, **kwargs)
    _delivered += len(gen_responses)
    return prompt_responses, gen_responses


BatchGenerator.next = _next_that_fails_once

if __name__ == "__main__":
    sys.exit(main())
