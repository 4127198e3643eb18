"""FrameEngine and compose on the device, tested on this CPU with the same torch code.

Real components throughout: Whisper tiny.en features of real speech, the runtime's renderer
model, avatars prepared by mediapipe from real photos (three different faces/frame sizes).
The reference for every frame is the pre-engine path: model.render() (uint8 patches on the
host) + the numpy Blender, one session at a time. The CUDA versions of these checks are in
test_frame_engine_cuda.py (skipped without a GPU; benchmarks/gpu_check.py runs them).
"""

from __future__ import annotations

import asyncio
import gc
import threading
import warnings

import av
import cv2
import numpy as np
import pytest
import torch

from realtime_avatar.avatar import AvatarSettings, default_avatar_source, load_or_prepare_avatar
from realtime_avatar.compose import ComposeBank, bgr_to_yuv420p, family_levels
from realtime_avatar.frame_engine import BUCKETS, FrameEngine, FrameRequest, bucket_size
from realtime_avatar.frame_windows import offline_frame_windows
from tests.speech import espeak_wav, read_wav

# -- fixtures: three different avatars, real speech windows ----------------------------------------


def _prepare(model, image: np.ndarray, folder, settings: AvatarSettings):
    source = folder / "face.png"
    cv2.imwrite(str(source), image)
    return load_or_prepare_avatar(source, folder / "cache", model, settings, progress=False)


@pytest.fixture(scope="module")
def avatars(runtime, tmp_path_factory):
    """The runtime's avatar (512x512, 10 frames), a mirrored face on a 640x480 canvas (another
    frame size: a second compose bank), a smaller still face on 512x512 (other face boxes)."""
    photo = cv2.imread(str(default_avatar_source()))
    wide = np.full((480, 640, 3), 90, np.uint8)
    wide[:, 64:576] = cv2.resize(photo[:, ::-1], (512, 480))
    small = np.full((512, 512, 3), 160, np.uint8)
    small[96:480, 64:448] = cv2.resize(photo, (384, 384))
    return [
        runtime.avatar,
        _prepare(runtime.model, wide, tmp_path_factory.mktemp("wide"), AvatarSettings(idle_seconds=0.24)),
        _prepare(runtime.model, small, tmp_path_factory.mktemp("small"), AvatarSettings(idle_motion=False)),
    ]


@pytest.fixture(scope="module")
def windows(runtime, tmp_path_factory):
    wav = espeak_wav("Four sessions share one engine today.", tmp_path_factory.mktemp("w") / "s.wav")
    audio, rate = read_wav(wav)
    assert rate == 16000
    return offline_frame_windows(runtime.clip_features(audio))


def reference_frames(model, avatar, positions, windows) -> list[np.ndarray]:
    """One session alone on the pre-engine path: host uint8 patches + numpy blend."""
    with torch.inference_mode():
        patches = model.render(avatar.latents_at(positions), torch.from_numpy(np.ascontiguousarray(windows)))
    return [avatar.compose_into(avatar.new_frame_buffer(), p, pos) for p, pos in zip(patches, positions)]


def assert_within_one_level(got: list[np.ndarray], want: list[np.ndarray]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == np.uint8
        assert np.abs(g.astype(np.int16) - w.astype(np.int16)).max() <= 1


# -- pure parts -------------------------------------------------------------------------------------


def test_bucket_sizes_round_up_to_fixed_shapes():
    assert [bucket_size(n) for n in (1, 2, 3, 5, 8, 9, 200, 256)] == [1, 2, 4, 8, 8, 16, 256, 256]
    assert bucket_size(257) == 512 and bucket_size(600) == 768  # several calls of the largest
    with pytest.raises(ValueError):
        bucket_size(0)
    assert BUCKETS[-1] == 256


def test_requests_are_cut_at_chunk_boundaries():
    from realtime_avatar.frame_engine import _chunk_requests

    assert _chunk_requests([3, 2, 4], [9]) == [[3, 2, 4]]
    assert _chunk_requests([3, 2, 4], [4, 5]) == [[3, 1], [1, 4]]
    assert _chunk_requests([300], [256, 44]) == [[256], [44]]
    assert _chunk_requests([2, 2], [2, 2]) == [[2], [2]]


def test_torch_compose_matches_the_numpy_blend_within_one_level(runtime, avatars, windows):
    model = runtime.model
    for avatar in avatars:
        bank = ComposeBank(avatar.frame_shape[:2], torch.device("cpu"))
        first = bank.add(np.asarray(avatar.frames), avatar.blender)
        positions = list(range(min(8, avatar.cycle_length)))
        with torch.inference_mode():
            latents, audio = avatar.latents_at(positions), torch.from_numpy(windows[: len(positions)])
            levels = family_levels(model.model_id, model.net(latents, audio))
            # the device's grey levels are exactly the family's own uint8 patches
            assert np.array_equal(levels.permute(0, 2, 3, 1).to(torch.uint8).numpy(), model.render(latents, audio))
            ids = torch.tensor([first + avatar.cycle_index(p) for p in positions])
            got = list(bank.compose(levels, ids).numpy())
        assert_within_one_level(got, reference_frames(model, avatar, positions, windows[: len(positions)]))
        # pixels outside the mask (the top rows: only the lower face talks) are the cached frame's
        assert np.array_equal(got[0][:40], np.asarray(avatar.frame(positions[0]))[:40])


def test_on_a_cpu_bgr_frames_are_the_numpy_blend_exactly(runtime, avatars, windows):
    """CPU + bgr24 composes on the host (the family's uint8 patches + the numpy Blender, the
    reference path itself): equal frames, not within a level; yuv420p keeps the torch compose."""
    engine = FrameEngine(runtime.model, "cpu")
    assert engine.host_compose and engine.stats()["compose"] == "numpy" and "numpy compose" in engine.describe()
    for avatar in avatars:
        slot = engine.add_avatar(avatar)
        positions = list(range(3, 3 + min(6, avatar.cycle_length)))
        frames = engine.render_now([FrameRequest(slot, tuple(positions), windows[: len(positions)])])[0]
        want = reference_frames(runtime.model, avatar, positions, windows[: len(positions)])
        assert all(np.array_equal(g, w) for g, w in zip(frames, want))
        assert len({id(f.base if f.base is not None else f) for f in frames}) == len(frames)  # a buffer each
    assert engine.compose_calls == engine.model_calls == len(avatars)
    # the device compose's frame copies and windows (~0.85 MB a cached frame) were never built
    assert engine.slots and not any(s.bank.built for s in engine.slots) and not any(len(s.bank.frames) for s in engine.slots)
    assert not FrameEngine(runtime.model, "cpu", frame_format="yuv420p").host_compose


def test_a_bank_built_on_first_compose_composes_as_one_built_at_add(runtime, avatars, windows):
    """ComposeBank.add(build=False) (the host-compose engine's) defers the device tensors; a later
    compose() builds them for every avatar added and gives the same frames as an eager bank."""
    shape = avatars[0].frame_shape[:2]
    same = [a for a in avatars if a.frame_shape[:2] == shape]
    eager, lazy = ComposeBank(shape, torch.device("cpu")), ComposeBank(shape, torch.device("cpu"))
    firsts = [(eager.add(np.asarray(a.frames), a.blender), lazy.add(np.asarray(a.frames), a.blender, build=False))
              for a in same]
    assert eager.built and not lazy.built and len(lazy) == len(eager) and len(lazy.frames) == 0
    assert [f for f, _ in firsts] == [f for _, f in firsts]
    model = runtime.model
    with torch.inference_mode():
        for avatar, (first, _) in zip(same, firsts):
            positions = list(range(min(4, avatar.cycle_length)))
            latents, audio = avatar.latents_at(positions), torch.from_numpy(windows[: len(positions)])
            levels = family_levels(model.model_id, model.net(latents, audio))
            ids = torch.tensor([first + avatar.cycle_index(p) for p in positions])
            assert torch.equal(lazy.compose(levels, ids), eager.compose(levels, ids))
    assert lazy.built and torch.equal(lazy.frames, eager.frames) and torch.equal(lazy.weights, eager.weights)


def test_an_avatar_whose_mask_reads_undrawn_rows_is_refused(runtime):
    """A render graph that draws fewer rows than an avatar's blend reads (here one drawing from
    row 128; the runtime's avatar reads from ~110) is refused at add_avatar, naming the
    avatar and what to do, instead of blending black rows into its frames."""
    from realtime_avatar.models.compact import CompactModel

    model = runtime.model
    assert runtime.avatar.blender.first_patch_row() >= model.rows_from
    fewer_rows = CompactModel(model.net, rows_from=128)
    with pytest.raises(ValueError, match=r"reads patch row 1\d\d, above row 128 .*prepare the avatar again"):
        FrameEngine(fewer_rows).add_avatar(runtime.avatar)


def test_yuv420p_matches_libswscale_within_one_level(avatars):
    frames = np.stack([np.asarray(a.frame(0)) for a in avatars if a.frame_shape[:2] == (512, 512)])
    ours = bgr_to_yuv420p(torch.from_numpy(frames)).numpy()
    for frame, yuv in zip(frames, ours):
        theirs = av.VideoFrame.from_ndarray(frame, format="bgr24").reformat(format="yuv420p").to_ndarray()
        assert yuv.shape == theirs.shape == (768, 512)
        assert np.abs(yuv.astype(int) - theirs.astype(int)).max() <= 1
        back = av.VideoFrame.from_ndarray(yuv, format="yuv420p")  # what the encoder is given
        assert (back.width, back.height) == (512, 512)


# -- the engine with many sessions ------------------------------------------------------------------


def _session_plan(s: int, avatars, windows, requests: int = 2, frames: int = 3):
    """Session s: avatar s % 3, its own cycle positions and its own stretch of the speech."""
    avatar = avatars[s % len(avatars)]
    plan = []
    for k in range(requests):
        start = (s * 5 + k * frames) % (len(windows) - frames)
        positions = tuple(range(s * 7 + k * frames, s * 7 + (k + 1) * frames))
        plan.append((avatar, positions, windows[start : start + frames]))
    return plan


@pytest.mark.parametrize("sessions", [1, 3, 8])
def test_each_session_gets_the_frames_it_would_get_alone(runtime, avatars, windows, sessions):
    engine = FrameEngine(runtime.model, "cpu")
    slots = {id(a): engine.add_avatar(a) for a in avatars}
    plans = [_session_plan(s, avatars, windows) for s in range(sessions)]

    async def session(plan):
        out = []
        for avatar, positions, w in plan:
            out.append(await engine.render(FrameRequest(slots[id(avatar)], positions, w)))
        return out

    async def go():
        results = await asyncio.gather(*(session(p) for p in plans))
        stats = engine.stats()
        await engine.close()
        return results, stats

    results, stats = asyncio.run(go())
    for plan, result in zip(plans, results):
        for (avatar, positions, w), frames in zip(plan, result):
            assert_within_one_level(frames, reference_frames(runtime.model, avatar, list(positions), w))
    batches = stats["batches"]
    assert batches["requests"] == 2 * sessions
    if sessions > 1:  # sessions due in the same tick share one batch
        assert batches["batches"] < batches["requests"] and batches["largest_batch"] >= 2 * 3
    # one model call per batch; one compose call per frame size present in the batch
    assert engine.model_calls == batches["batches"]
    assert engine.compose_calls <= batches["batches"] * len({a.frame_shape for a in avatars})


def test_a_session_closed_mid_batch_costs_the_others_nothing_and_nothing_leaks(runtime, avatars, windows):
    engine = FrameEngine(runtime.model, "cpu")
    slots = [engine.add_avatar(a) for a in avatars]
    keep = [FrameRequest(slots[i], tuple(range(i, i + 3)), windows[5 * i : 5 * i + 3]) for i in (1, 2)]
    want = [reference_frames(runtime.model, r.slot.avatar, list(r.positions), r.windows) for r in keep]
    victim = FrameRequest(slots[0], (0, 1, 2, 3), windows[20:24])

    def tensors() -> int:
        with warnings.catch_warnings():  # isinstance() pokes deprecated torch objects
            warnings.simplefilter("ignore")
            return sum(isinstance(o, torch.Tensor) for o in gc.get_objects())

    # The batch is held at its start until the victim is cancelled, so that "during the batch"
    # does not depend on how fast this machine renders (a timed cancel raced a fast batch).
    real_render_now = engine.render_now
    hold, started = threading.Event(), None

    def held_render_now(requests):
        loop.call_soon_threadsafe(started.set)
        assert hold.wait(10), "the test never released the batch"
        return real_render_now(requests)

    engine.render_now = held_render_now  # before the batcher is made: it binds this attribute

    async def cycle(during_batch: bool):
        nonlocal started
        started = asyncio.Event()
        hold.clear()
        gone = asyncio.create_task(engine.render(victim))
        others = [asyncio.create_task(engine.render(r)) for r in keep]
        if during_batch:
            await started.wait()
        else:
            await asyncio.sleep(0)  # submitted, waiting for the tick
        gone.cancel()  # the session closes while its frames are queued or in the batch
        hold.set()
        t0 = loop.time()
        results = await asyncio.gather(*others)
        return results, loop.time() - t0, gone

    async def go():
        nonlocal loop
        loop = asyncio.get_running_loop()
        await cycle(False)  # warm-up
        gc.collect()
        before_tensors, before_tasks = tensors(), len(asyncio.all_tasks())
        waits = []
        for n in range(50):
            results, waited, gone = await cycle(during_batch=n % 2 == 1)
            assert gone.cancelled()
            for got, exp in zip(results, want):
                assert_within_one_level(got, exp)
            waits.append(waited)
        gc.collect()
        leaked = tensors() - before_tensors
        tasks = len(asyncio.all_tasks()) - before_tasks
        pending = engine._batcher.pending
        stats = engine.stats()
        await engine.close()
        return leaked, tasks, pending, stats, waits

    loop = None
    leaked, tasks, pending, stats, waits = asyncio.run(go())
    assert leaked <= 2 and tasks == 0 and pending == 0, (leaked, tasks, pending)
    batches = stats["batches"]
    assert batches["failed_batches"] == 0 and batches["cancelled"] >= 1
    # the others were never held back by the closed session: every cycle ended with one batch
    # (not a second one for frames that nobody wanted)
    assert batches["requests"] <= 3 * 51
    print("wait after cancel (s): median", sorted(waits)[len(waits) // 2], "max", max(waits))


def test_compiled_on_a_cpu_runs_the_same_torch_code_eagerly(runtime, avatars, windows, caplog):
    caplog.set_level("INFO")
    engine = FrameEngine(runtime.model, "cpu", step="compiled")
    assert engine.step == "torch" and "CUDA graphs need a CUDA device" in caplog.text
    slot = engine.add_avatar(avatars[0])
    frames = engine.render_now([FrameRequest(slot, (0, 1), windows[:2])])[0]
    assert_within_one_level(frames, reference_frames(runtime.model, avatars[0], [0, 1], windows[:2]))


def test_compiled_keeps_a_graph_for_every_bucket(runtime, avatars, windows, monkeypatch):
    """Dynamo caches graphs per function, not per torch.compile wrapper: with more buckets than
    its recompile limit (8) the last ones used to run eagerly. The same compiled path, with
    dynamo's counting backend instead of CUDA graphs (which a CPU does not have)."""
    import torch._dynamo
    import torch._dynamo.config
    from torch._dynamo.testing import CompileCounter

    counter = CompileCounter()
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(fn, backend=counter, dynamic=False))
    # the limit lowered from 8 to 2, so that 3 buckets cross it (each graph traced costs ~1 s here)
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 2)
    monkeypatch.setattr(torch._dynamo.config, "accumulated_recompile_limit", 256)
    buckets = (1, 2, 3)
    engine = FrameEngine(runtime.model, "cpu", buckets=buckets)
    engine.step = "compiled"  # what a CUDA device gets; the constructor turns it off on a CPU
    slot = engine.add_avatar(avatars[0])
    torch._dynamo.reset()
    try:
        for size in buckets:
            frames = engine.render_now([FrameRequest(slot, tuple(range(size)), windows[:size])])[0]
        assert counter.frame_count == 2 * len(buckets)  # the model step and the compose step, per bucket
        assert_within_one_level(frames, reference_frames(runtime.model, avatars[0], [0, 1, 2], windows[:3]))
    finally:
        torch._dynamo.reset()


def test_every_device_call_runs_on_the_engine_thread(runtime, avatars, windows):
    """PyTorch keeps cuDNN handles and CUDA graph trees per Python thread: warm-up, direct
    calls from any thread and the sessions' batches must all run the model on one thread."""
    import threading

    engine = FrameEngine(runtime.model, "cpu")
    seen: list[str] = []
    render = engine._render

    def watched(latents, audio):
        seen.append(threading.current_thread().name)
        return render(latents, audio)

    engine._render = watched
    slot = engine.add_avatar(avatars[0])
    engine.warm_up()
    direct = engine.render_now([FrameRequest(slot, (0, 1), windows[:2])])[0]

    async def sessions():
        from_thread = await asyncio.to_thread(engine.render_now, [FrameRequest(slot, (2,), windows[2:3])])
        batched = await asyncio.gather(*(engine.render(FrameRequest(slot, (k,), windows[k : k + 1])) for k in range(3)))
        await engine.close()
        return from_thread[0], batched

    from_thread, batched = asyncio.run(sessions())
    assert len(seen) >= 4 and set(seen) == {seen[0]} and seen[0].startswith("frame-engine")
    assert_within_one_level(direct + from_thread, reference_frames(runtime.model, avatars[0], [0, 1, 2], windows[:3]))
    assert_within_one_level([f for fs in batched for f in fs],
                            reference_frames(runtime.model, avatars[0], [0, 1, 2], windows[:3]))


def test_the_engine_renders_yuv420p_frames_the_encoder_takes(runtime, avatars, windows):
    engine = FrameEngine(runtime.model, "cpu", frame_format="yuv420p")
    slot = engine.add_avatar(avatars[0])
    frames = engine.render_now([FrameRequest(slot, (0, 1), windows[:2])])[0]
    want = reference_frames(runtime.model, avatars[0], [0, 1], windows[:2])
    for yuv, bgr in zip(frames, want):
        theirs = av.VideoFrame.from_ndarray(bgr, format="bgr24").reformat(format="yuv420p").to_ndarray()
        assert yuv.shape == theirs.shape and np.abs(yuv.astype(int) - theirs.astype(int)).max() <= 2


# -- Whisper windows of all sessions in one encoder call ---------------------------------------------


def test_encoder_batcher_gives_each_stream_the_features_it_gets_alone(runtime):
    """Three live streams (different audio) through one EncoderBatcher: each gets exactly the
    features of its own unbatched stream, in fewer encoder calls than windows."""
    from realtime_avatar.audio_ring import AudioRing
    from realtime_avatar.encoder_batching import EncoderBatcher
    from realtime_avatar.streaming_whisper import LOW_LATENCY, StreamingWhisper
    from realtime_avatar.timing import SAMPLE_RATE

    rng = np.random.default_rng(0)
    t = np.arange(int(2.5 * SAMPLE_RATE)) / SAMPLE_RATE
    clips = [(0.1 * np.sin(2 * np.pi * f * t) + 0.01 * rng.standard_normal(len(t))).astype(np.float32)
             for f in (180, 260, 340)]
    batcher = EncoderBatcher(runtime.encoder, tick_s=0.04)

    async def stream(clip, batcher):
        ring = AudioRing(len(clip))
        whisper = StreamingWhisper(runtime.encoder, ring, LOW_LATENCY, batcher=batcher)
        ring.write(clip)  # all audio at once: every window is due now
        ring.close()
        return np.concatenate([block.states async for block in whisper.stream()]), whisper.runs

    async def go():
        out = await asyncio.gather(*(stream(c, batcher) for c in clips))
        await batcher.close()
        alone = [await stream(c, None) for c in clips]  # one stream at a time, unbatched
        return out, alone

    results, alone = asyncio.run(go())
    for (states, runs), (want, want_runs) in zip(results, alone):
        assert states.shape == want.shape and runs == want_runs
        assert np.abs(states - want).max() < 1e-3
    windows = sum(runs for _, runs in results)
    assert batcher.calls < windows  # windows of different streams shared calls


# -- real sessions sharing the engine ----------------------------------------------------------------


def test_a_live_session_closing_mid_speech_leaves_the_other_paced(runtime):
    """Two AvatarSessions on the runtime's engine speak at once; one hangs up mid-sentence
    (its frames queued or in a batch). The other keeps one tick per 40 ms, plays every input
    frame once, and its frames keep going through the engine after the close."""
    from realtime_avatar.session import AvatarSession, SessionConfig
    from realtime_avatar.streaming_whisper import StreamingConfig
    from realtime_avatar.timing import SAMPLE_RATE, SAMPLES_PER_FRAME

    config = SessionConfig(streaming=StreamingConfig(window_s=2.0, hop_s=0.12, lookahead_s=0.12),
                           render_budget_s=0.6, batch_size=4)
    t = np.arange(int(4.0 * SAMPLE_RATE)) / SAMPLE_RATE
    speech = (0.2 * np.sin(2 * np.pi * 200 * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t))).astype(np.float32)

    async def go():
        a = AvatarSession(runtime.encoder, runtime.renderer, config)
        b = AvatarSession(runtime.encoder, runtime.renderer, config)
        ticks: list = []
        b.on_tick = lambda n, frame, image, pcm: ticks.append((n, frame))
        await a.start()
        await b.start()
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        packet = SAMPLE_RATE // 50
        rendered_at_close = None
        for i in range(0, len(speech), packet):
            await asyncio.sleep(max(0.0, t0 + i / SAMPLE_RATE - loop.time()))
            chunk = speech[i : i + packet]
            b.push_pcm(chunk, SAMPLE_RATE)
            if not a.closed:
                a.push_pcm(chunk, SAMPLE_RATE)
            if i >= 2 * SAMPLE_RATE and not a.closed:
                await a.close()  # mid-speech: its frames are queued or in a batch
                rendered_at_close = b.rendered_frames + b.stale_frames
        b.end_of_input()
        await asyncio.sleep(1.2)
        stats = b.stats()
        await b.close()
        return ticks, stats, rendered_at_close

    ticks, stats, rendered_at_close = asyncio.run(go())
    assert [n for n, _ in ticks] == list(range(len(ticks)))
    assert 23.5 <= stats["fps"] <= 26.5
    played = [f for _, f in ticks if f is not None]
    assert played == list(range(len(speech) // SAMPLES_PER_FRAME))  # nothing dropped or repeated
    # b's render loop kept taking its frames after the close (rendered, or skipped as stale when
    # this machine is too loaded to render them in time: then they show idle and count late)
    assert stats["rendered_frames"] + stats["stale_frames"] > rendered_at_close
    assert runtime.engine.stats()["batches"].get("failed_batches", 0) == 0
