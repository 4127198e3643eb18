"""WHEP viewers on loopback: real aiortc viewers of one broadcast session, fanned out by MediaRelay.

The session is tests.loopback_session's (small frames, so 20 encoders and 20 decoders fit on a
2-core test machine); what is under test is the fan-out, the WHEP signalling and the cut-offs.
"""

from __future__ import annotations

import asyncio
import gc
import json
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from realtime_avatar.broadcast import BROADCASTER_KEY, BroadcastOptions
from realtime_avatar.server import create_app
from tests.loopback_session import LoopbackSession
from tests.rtc_client import serving
from tests.test_server import offer_sdp, rss_bytes
from tests.whep_viewers import Viewer

REPO = Path(__file__).resolve().parents[1]


def live_objects() -> dict[str, int]:
    """How many peer connections, relay proxies and RTP senders are alive (after gc)."""
    counts: dict[str, int] = {"RTCPeerConnection": 0, "RelayStreamTrack": 0, "RTCRtpSender": 0}
    for obj in gc.get_objects():
        name = type(obj).__name__
        if name in counts:
            counts[name] += 1
    return counts


async def _broadcast(http, url) -> str:
    async with http.post(f"{url}/sessions", json={"name": "show", "outputs": ["whep"]}) as r:
        assert r.status == 201, await r.text()
        return (await r.json())["whep"]


def _app():
    async def factory():
        return LoopbackSession(size=96)

    return create_app(factory, broadcast=BroadcastOptions(max_viewers=30))


@pytest.mark.slow
def test_twenty_viewers_of_one_session_each_get_24_fps_and_memory_is_flat_after(tmp_path):
    n_viewers = 20

    async def scenario():
        app = _app()
        async with serving(app) as url, aiohttp.ClientSession() as http:
            whep = url + await _broadcast(http, url)
            session = app[BROADCASTER_KEY].sessions["show"].session
            warm = Viewer()
            await warm.join(http, whep)
            await asyncio.sleep(2.0)
            fps_alone = session.stats()["fps"]
            await warm.leave(http, url)
            warm = None  # noqa: F841  (its peer connection must not be counted as left over)

            async def crowd(measure_s: float):
                # The viewers run in a child process (tests/whep_viewers.py): the server under
                # test keeps its process, and its memory and objects, to itself.
                child = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "tests.whep_viewers", url, "show", "--viewers", str(n_viewers),
                    "--warmup", "2", "--measure", str(measure_s), cwd=REPO,
                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
                joined = json.loads(await asyncio.wait_for(child.stdout.readline(), 60))
                await asyncio.sleep(2.0)  # the child's warm-up
                t0, cpu0 = time.monotonic(), time.process_time()
                await asyncio.sleep(measure_s / 2)
                result = {"session_fps": session.stats()["fps"], "on_server": len(app[BROADCASTER_KEY].whep.viewers),
                          "joined": joined["joined"]}
                await asyncio.sleep(measure_s / 2)
                result["cpu"] = (time.process_time() - cpu0) / (time.monotonic() - t0)
                out = json.loads(await asyncio.wait_for(child.stdout.readline(), 60))
                await child.wait()
                result.update({"fps": out["fps"], "audio": out["audio_frames"][:2]})
                await asyncio.sleep(1.5)
                gc.collect()
                result["left"] = len(app[BROADCASTER_KEY].whep.viewers)
                result["rss"] = rss_bytes()
                process = app[BROADCASTER_KEY].whep.process  # the viewers' peers (serve's default)
                result["child_rss"] = rss_bytes(process._proc.pid) if process is not None and process.running else 0
                result["objects"] = live_objects()
                return result

            # Memory is flat when a crowd leaves the server as the one before it did. The first
            # crowds pay one-time costs (codec tables, thread stacks, malloc arenas), so the
            # third is compared with the second.
            await crowd(1.0)
            second = await crowd(4.0)
            third = await crowd(1.0)
        return fps_alone, second, third

    fps_alone, second, third = asyncio.run(scenario())
    fps, grown = second["fps"], (third["rss"] - second["rss"]) / 2**20
    child_grown = (third["child_rss"] - second["child_rss"]) / 2**20
    print(f"viewer fps min {min(fps):.1f} median {sorted(fps)[len(fps) // 2]:.1f}; session fps alone "
          f"{fps_alone:.1f}, with {n_viewers} viewers {second['session_fps']:.1f}; process CPU "
          f"{second['cpu']:.2f} cores (server process); RSS after the third crowd left vs the second: {grown:+.1f} MiB "
          f"(viewer process {child_grown:+.1f} MiB)")
    assert second["on_server"] == n_viewers and second["left"] == third["left"] == 0
    assert second["objects"] == third["objects"] and second["objects"]["RTCPeerConnection"] == 0
    assert min(fps) >= 24.0, fps
    assert min(second["audio"]) > 100
    assert second["session_fps"] >= 24.0 and abs(second["session_fps"] - fps_alone) < 1.0
    # measured here: a few MiB from malloc arenas of the per-viewer encoder threads; a leak of
    # the viewers themselves (peer connections, relay proxies with their queues) shows above
    assert grown < 12, f"memory grew {grown:.1f} MiB from one crowd of viewers to the next"
    # the viewer process holds the 20 peer connections: it must not keep them either
    assert second["child_rss"] > 0 and child_grown < 12, f"viewer process grew {child_grown:.1f} MiB"


def test_whep_signalling_errors_and_a_viewer_that_never_reads_is_cut_off_alone():
    async def scenario():
        app = _app()
        broadcaster = app[BROADCASTER_KEY]
        broadcaster.whep.connect_timeout_s = 2.0
        async with serving(app) as url, aiohttp.ClientSession() as http:
            whep = url + await _broadcast(http, url)
            sdp = {"Content-Type": "application/sdp"}
            # errors: unknown channel, wrong type, an offer that receives nothing, garbage
            recv_offer = await offer_sdp(audio="recvonly", video="recvonly")
            async with http.post(f"{url}/whep/nobody", data=recv_offer, headers=sdp) as r:
                assert r.status == 404 and "nobody" in (await r.json())["error"]
            async with http.post(whep, data=recv_offer, headers={"Content-Type": "text/plain"}) as r:
                assert r.status == 415
            async with http.post(whep, data=await offer_sdp(audio="sendonly", video=None), headers=sdp) as r:
                assert r.status == 400 and "recvonly" in (await r.json())["error"]
            async with http.post(whep, data="v=0 garbage", headers=sdp) as r:
                assert r.status == 400
            # a viewer that takes an answer and never connects (never reads a packet)
            async with http.post(whep, data=recv_offer, headers=sdp) as r:
                assert r.status == 201
                ghost = r.headers["Location"]
            good = Viewer()
            await good.join(http, whep)
            await asyncio.sleep(3.0)
            ghost_gone = ghost.rsplit("/", 1)[1] not in broadcaster.whep.viewers
            t0 = time.monotonic()
            await asyncio.sleep(2.0)
            good_fps = good.fps(t0, time.monotonic())
            async with http.delete(f"{url}{ghost}") as r:
                ghost_delete = r.status
            await good.leave(http, url)
            async with http.delete(f"{url}{good.location}") as r:
                second_delete = r.status
            async with http.get(f"{url}/health") as r:
                healthy = r.status
        return ghost_gone, good_fps, ghost_delete, second_delete, healthy

    ghost_gone, good_fps, ghost_delete, second_delete, healthy = asyncio.run(scenario())
    assert ghost_gone, "a viewer that never connected was not cut off"
    assert good_fps >= 24.0
    assert ghost_delete == 404 and second_delete == 404 and healthy == 200


@pytest.mark.browser
def test_chromium_watches_a_session_on_the_whep_page(tmp_path):
    """The watch-only page /watch/<session>: Chromium plays the session over WHEP and its
    viewer leaves the server's registry when the page goes away (DELETE on pagehide)."""
    from tests.browser import CHROMIUM, chromium_page

    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} missing: apt-get install -y chromium")
    wav = tmp_path / "silence.wav"
    import wave

    with wave.open(str(wav), "w") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16_000)
        w.writeframes(b"\x00\x00" * 16_000)

    async def scenario():
        app = _app()
        async with serving(app) as url, aiohttp.ClientSession() as http:
            await _broadcast(http, url)
            whep = app[BROADCASTER_KEY].whep
            async with chromium_page(tmp_path / "profile", wav) as page:
                await page.goto(f"{url}/watch/show")
                await page.wait_for_function("window.viewer.framesDecoded >= 50", timeout=20_000, polling=100)
                state = await page.evaluate("window.viewer")
                watching = whep.count("show")
                await page.goto("about:blank")  # pagehide: the page DELETEs its viewer
                for _ in range(50):
                    if whep.count("show") == 0:
                        break
                    await asyncio.sleep(0.1)
                after = whep.count("show")
        return state, watching, after

    state, watching, after = asyncio.run(scenario())
    assert state["state"] == "connected" and state["error"] is None and state["framesDecoded"] >= 50
    assert state["location"].startswith("/whep/show/")
    assert watching == 1 and after == 0
