"""Phonemes -> mouth poses: moved to realtime_avatar.visemes.

Per-avatar tuning (`prepare --tune`) runs the teacher at run time, and run-time code never
imports export/, so the teacher and what it needs live in realtime_avatar/. This name stays
for build-time callers: it is the same module object, private names included.
"""

import sys

import realtime_avatar.visemes as _moved

sys.modules[__name__] = _moved
