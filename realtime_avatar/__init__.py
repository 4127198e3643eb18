"""realtime-avatar: a real-time streaming talking-avatar engine."""

import os

# A live session runs the Whisper encoder, the renderer and the video encoder on different
# threads of one process, often on 2 cores. OpenMP's default busy-waiting makes torch's thread
# team spin against the other threads: a 2 s encoder window took 10x longer when they overlapped
# (measured here). Passive waiting costs little when the cores are free. Must be set before
# torch loads its OpenMP runtime; an explicit user setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
