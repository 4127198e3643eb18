"""CPU priority inside one process: the render and the Whisper encoder before the outputs.

On a machine with few cores, a session's output encoders (x264 for RTMP, the shared VP8 for
WHEP viewers and the Janus publisher) and its render compete for the same cores. When the
outputs win, the audience gets 25 fps of a face whose mouth frames all came too late (shown as
idle frames); when the render wins, the outputs lose a little smoothness at worst. So threads
that only encode output run at a lower priority: Linux keeps a nice value per thread
(setpriority(2), "the nice value is a per-thread attribute" under NPTL), and threads an encoder
starts (x264's, libvpx's) inherit it. No privileges are needed to lower a priority.

Elsewhere (macOS, Windows) this is a no-op: everything runs at one priority, as before.
"""

from __future__ import annotations

import logging
import os
import sys
import threading

log = logging.getLogger(__name__)

# CFS weights: nice 0 = 1024, nice 5 = 335 (kernel/sched/core.c sched_prio_to_weight), so a
# busy render thread gets ~75% of a contended core against one output thread, yet an output
# thread still gets a whole core whenever the render is idle. Not lower: a nice-10 RTMP thread
# dropped 22% of its frames on a machine where another process (a training run at nice 5) was busy.
OUTPUT_NICE = 5


def lower_thread_priority(nice: int = OUTPUT_NICE) -> bool:
    """Lower the calling thread's CPU priority to at least `nice` (Linux; threads it starts
    afterwards inherit it). Returns whether the priority is now `nice` or lower; never raises
    (an output that cannot be deprioritised still works)."""
    if not sys.platform.startswith("linux"):
        return False
    tid = threading.get_native_id()
    try:
        if os.getpriority(os.PRIO_PROCESS, tid) < nice:
            os.setpriority(os.PRIO_PROCESS, tid, nice)
        return True
    except OSError as exc:  # a seccomp sandbox, say
        log.debug("could not lower thread %d's priority: %s", tid, exc)
        return False


def thread_nice(tid: int | None = None) -> int:
    """The nice value of a thread (default: the calling one); Linux only."""
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id() if tid is None else tid)


def compute_threads(cores: int, encodes_outputs: bool, requested: int | None = None) -> int | None:
    """Intra-op threads for the model and the Whisper encoder (ONNX Runtime, torch).

    `requested` (--threads) wins. Otherwise None (all cores) for a server whose only outputs are
    its WebRTC peers, and cores - 1 (at least 1) for one that also encodes broadcast outputs
    (RTMP, Janus): a parallel operator waits for its slowest thread, so when an encoder thread
    takes one of the model's cores every operator stalls for a time slice. Measured with
    bench_broadcast on 2 cores (RTMP + Janus publisher + a Janus subscriber, TTS pushed over the
    API): 2 threads, 120 of 267 speech frames late, render batch p99 202 ms; 1 thread, 2 late,
    p99 87 ms. A conversation without broadcast outputs is faster with all cores (bench_e2e:
    mouth onset 292 vs 333 ms median)."""
    if requested:
        return requested
    return max(1, cores - 1) if encodes_outputs else None
