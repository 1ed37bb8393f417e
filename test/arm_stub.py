"""A benchmark arm that measures nothing: what ``bench.common.run_in_own_process`` starts in its test, so that the
test checks the process hop (arguments in, the result file back) without a training run's start-up."""

from __future__ import annotations

import json
import os
import sys

if __name__ == "__main__":
    args = sys.argv[1:]
    result_file = args[args.index("--arm-result") + 1]
    with open(result_file, "w") as handle:
        json.dump({"args": args[: args.index("--arm-result")], "pid": os.getpid()}, handle)
