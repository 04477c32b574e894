"""Runs inside the sandbox with `python -I -S` (the standard library only): limits itself, runs the user's
source, calls `grade(sample, item)` and writes `{"score": ...}` or `{"error": ...}` as the last line."""

import json
import math
import os
import resource
import sys
import traceback
from typing import Any


def main() -> None:
    request = json.load(sys.stdin)
    limits = request["limits"]
    resource.setrlimit(resource.RLIMIT_CPU, (limits["cpu_seconds"], limits["cpu_seconds"]))
    resource.setrlimit(resource.RLIMIT_AS, (limits["memory_bytes"], limits["memory_bytes"]))
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits["output_bytes"], limits["output_bytes"]))
    resource.setrlimit(resource.RLIMIT_NOFILE, (32, 32))
    out = os.fdopen(os.dup(1), "w")
    sys.stdout = sys.stderr  # the user's prints go to stderr, so only this runner writes the result line
    try:
        namespace: dict[str, Any] = {"__name__": "grader"}
        exec(compile(request["source"], "grader.py", "exec"), namespace)  # inside the sandbox: the point
        grade = namespace.get("grade")
        if not callable(grade):
            raise TypeError("the source defines no function grade(sample, item)")
        returned: Any = grade(request["sample"], request["item"])
        score = float(returned)
        if not math.isfinite(score):
            raise ValueError(f"grade returned {score}, not a finite number")
        result = {"score": score}
    except BaseException as error:  # noqa: B036 (SystemExit and KeyboardInterrupt too: all are reported)
        last = traceback.format_exception_only(type(error), error)[-1].strip()
        result = {"error": last[-2000:]}
    out.write("\n" + json.dumps(result) + "\n")
    out.flush()


if __name__ == "__main__":  # run as `python -c`; importing it runs nothing
    main()
