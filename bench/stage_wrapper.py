"""Run one command and record its own resource usage: ``python -S bench/stage_wrapper.py RESULT -- ARGV...``.

``bench/scale.py`` starts every stage through this wrapper because a child's ``ru_maxrss`` on
Linux starts from the resident size of the process that spawned it (the kernel carries the
spawner's high-water mark over ``exec``): spawned by the bench itself, every stage would report at
least the bench's own RSS. This wrapper imports only the standard library (run with ``-S``, about
10 MB), spawns ``ARGV``, waits for it with ``os.wait4`` and writes ``RESULT`` (JSON): ``pid``
(also written alone to ``RESULT.pid`` as soon as the child runs), ``code`` (negative: killed by
that signal), ``maxrss`` (bytes: the child's peak RSS, with the descendants it waited for) and
``wall_s``, ``cpu_s`` (user + system seconds of the child and its waited-for descendants). SIGTERM reaches the child through its process group; the wrapper outlives it to
write the result.
"""

import json
import os
import signal
import sys
import time


def main(argv: list) -> int:
    if len(argv) < 3 or argv[1] != "--":
        print("usage: stage_wrapper.py RESULT -- ARGV...", file=sys.stderr)
        return 2
    result, cmd = argv[0], argv[2:]
    t0 = time.perf_counter()
    pid = os.posix_spawn(cmd[0], cmd, dict(os.environ))
    signal.signal(signal.SIGTERM, lambda signum, frame: None)  # after the spawn: the child keeps the default
    with open(result + ".pid", "w") as fh:
        fh.write(str(pid))
    _, status, usage = os.wait4(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    with open(result + ".tmp", "w") as fh:
        json.dump({"pid": pid, "code": code, "maxrss": usage.ru_maxrss * 1024, "wall_s": time.perf_counter() - t0,
                   "cpu_s": usage.ru_utime + usage.ru_stime}, fh)
    os.replace(result + ".tmp", result)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
