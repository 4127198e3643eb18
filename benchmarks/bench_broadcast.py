"""The broadcast set-up end to end: one `serve` command on RTMP and in a Janus room at once, fed by
a voice agent pushing TTS audio over the API, watched by N WHEP viewers and a Janus subscriber.

    nginx-rtmp (started here) <-- RTMP --+
                                         |   realtime-avatar serve --broadcast broadcast
    janus (started here) <-- VideoRoom --+-- --rtmp rtmp://.../live/avatar --janus http://.../janus
                                         |
    N aiortc WHEP viewers <-- /whep -----+   <-- ws /sessions/broadcast/audio (espeak-ng TTS, 100 ms chunks)

Measures, per output: frames per second received (WHEP viewers, the Janus subscriber, nginx's
recording of the RTMP push), audio received, the session's own fps and late frames, the agent's
time from first push to playback_started, and playback_finished's position vs the TTS length.
Prints JSON and a table; --plots writes a PNG of every viewer's fps.

Everything shares one machine, so by default only 2 WHEP viewers decode (here); the others count
the complete frames they receive without decoding them (tests/whep_viewers.py --count-only, in a
child process), as viewers on their own machines would leave the server's cores alone.
`--decoding-viewers 20` decodes all of them here; `--whep-encode per-viewer` compares with one
VP8 encode per viewer; `--via janus` makes the audience subscribers of the Janus room instead
(the SFU path: the server sends one stream, Janus fans it out).

    .venv/bin/python benchmarks/bench_broadcast.py [--quick] [--viewers 20] [--plots DIR]

Needs Debian nginx + libnginx-mod-rtmp and janus (./setup.sh --dev). Everything runs on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import wave
from pathlib import Path

import aiohttp
import av

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

from tests.broadcast_servers import JanusGateway, NginxRtmp, free_port  # noqa: E402
from tests.speech import espeak_wav  # noqa: E402
from tests.test_janus import Received, subscribe  # noqa: E402
from tests.whep_viewers import JanusViewer, Viewer, first_publisher  # noqa: E402

ROOM = 1234
PAUSE_S = 1.5  # between the agent's utterances
TTS_TEXT = ("Hello everyone, and welcome to the show. I am a talking avatar, and this voice comes from a "
            "text to speech engine that streams its audio to me over a web socket.")


async def wait_health(url: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    end = time.monotonic() + timeout
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < end:
            if proc.poll() is not None:
                raise RuntimeError(f"serve exited with {proc.returncode}")
            try:
                async with http.get(f"{url}/health") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.5)
    raise TimeoutError("serve did not come up")


async def agent(url: str, wav: Path) -> dict:
    """A voice agent: pushes TTS audio in 100 ms chunks as fast as it has it, then flush."""
    with wave.open(str(wav)) as w:
        rate, pcm = w.getframerate(), w.readframes(w.getnframes())
    seconds = len(pcm) / 2 / rate
    events = {}
    async with aiohttp.ClientSession() as http, http.ws_connect(url.replace("http", "ws", 1) +
                                                                "/sessions/broadcast/audio") as ws:
        await ws.send_str(json.dumps({"type": "start", "sample_rate": rate, "channels": 1}))
        t0 = time.monotonic()
        step = 2 * rate // 10
        for i in range(0, len(pcm), step):
            await ws.send_bytes(pcm[i : i + step])
        await ws.send_str(json.dumps({"type": "flush"}))
        async for msg in ws:
            event = json.loads(msg.data)
            events[event["type"]] = (time.monotonic() - t0, event)
            if event["type"] == "playback_finished":
                break
    return {"tts_seconds": round(seconds, 3),
            "push_to_playback_started_s": round(events["playback_started"][0], 3),
            "playback_finished_position_s": events["playback_finished"][1]["playback_position"],
            "interrupted": events["playback_finished"][1]["interrupted"]}


async def wait_publisher(http: aiohttp.ClientSession, janus_url: str, timeout: float = 30) -> None:
    """Until the avatar publishes in the room (serve joins Janus in the background)."""
    from realtime_avatar.janus import VIDEOROOM, JanusSession

    janus = JanusSession(http, janus_url)
    await janus.create()
    try:
        await first_publisher(janus, await janus.attach(VIDEOROOM), ROOM, timeout)
    finally:
        await janus.destroy()


def rtmp_recording(nginx: NginxRtmp) -> dict:
    records = nginx.records("avatar")
    if not records:
        return {"recorded": False}
    with av.open(str(records[-1])) as c:
        times = [f.time for f in c.decode(video=0)]
    with av.open(str(records[-1])) as c:
        audio_s = sum(f.samples / f.sample_rate for f in c.decode(audio=0))
    span = times[-1] - times[0] if len(times) > 1 else 0
    return {"recorded": True, "video_frames": len(times), "fps": round((len(times) - 1) / span, 2) if span else 0,
            "video_seconds": round(span, 2), "audio_seconds": round(audio_s, 2), "publishes": len(records)}


async def scenario(args, tmp: Path) -> dict:
    if args.clients_nice:
        # Everything but serve (nginx, Janus, the viewers here and in the crowd process) inherits
        # this; serve is put back to 0 when it starts (lowering a nice value needs root).
        os.nice(args.clients_nice)
    nginx = NginxRtmp(tmp / "nginx").start()
    janus = JanusGateway(tmp / "janus").start()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "realtime_avatar.cli", "serve", "--port", str(port),
               "--broadcast", "broadcast", "--rtmp", nginx.url("avatar"), "--janus", janus.url,
               "--room", str(ROOM), "--max-viewers", str(args.viewers + 5),
               "--whep-encode", args.whep_encode, "--whep-peers", args.whep_peers] + (["--threads", str(args.serve_threads)] if args.serve_threads else [])
    server_nice = (lambda: os.setpriority(os.PRIO_PROCESS, 0, 0)) if args.clients_nice else None
    proc = subprocess.Popen(command, cwd=common.REPO, preexec_fn=server_nice, stdout=subprocess.DEVNULL, stderr=open(tmp / "serve.log", "w"))
    result: dict = {"command": "realtime-avatar " + " ".join(command[3:])}
    try:
        await wait_health(url, proc)
        wav = espeak_wav(TTS_TEXT if not args.quick else "Hello everyone, welcome to the show.",
                         tmp / "tts.wav", rate=24_000)
        with wave.open(str(wav)) as w:
            tts_s = w.getnframes() / w.getframerate()
        async with aiohttp.ClientSession() as http:
            # Viewers that decode run here; the rest (a crowd that counts frames without decoding,
            # as if each decoded on its own machine) in a child process: see --decoding-viewers.
            if args.via == "janus":  # the audience through the SFU: the server publishes once
                await wait_publisher(http, janus.url)
                decoding = [JanusViewer(audio=i < 2) for i in range(min(args.decoding_viewers, args.viewers))]
                await asyncio.gather(*(v.join(http, janus.url, ROOM) for v in decoding))
            else:
                decoding = [Viewer(audio=i < 2) for i in range(min(args.decoding_viewers, args.viewers))]
                await asyncio.gather(*(v.join(http, f"{url}/whep/broadcast") for v in decoding))
            crowd_n = args.viewers - len(decoding)
            crowd = None
            if crowd_n:
                target = (janus.url, str(ROOM)) if args.via == "janus" else (url, "broadcast")
                crowd = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "tests.whep_viewers", *target, "--via", args.via, "--viewers", str(crowd_n),
                    "--audio", "0", "--warmup", "3", "--measure", f"{args.utterances * (tts_s + PAUSE_S) + 1:.2f}",
                    "--count-only",
                    cwd=common.REPO, stdout=asyncio.subprocess.PIPE, stderr=open(tmp / "crowd.log", "w"))
                await asyncio.wait_for(crowd.stdout.readline(), 120)  # joined
            received = Received()
            janus_session, janus_pc = await subscribe(http, janus.url, ROOM, received)
            await asyncio.sleep(3.0)
            t0 = time.monotonic()
            utterances, before = [], {"late_frames": 0, "frames_played": 0}
            for k in range(args.utterances):
                if k:
                    await asyncio.sleep(PAUSE_S)  # the agent listens; the session re-sizes its delay
                said = await agent(url, wav)
                if not k:
                    agent_result = said  # the figures of the first utterance, as before
                async with http.get(f"{url}/sessions/broadcast/stats") as r:
                    now = (await r.json())["session"]
                late, played = now["late_frames"] - before["late_frames"], now["frames_played"] - before["frames_played"]
                utterances.append({"late_frames": late, "frames_played": played, "late_share": round(late / max(1, played), 3),
                                   "started_with_delay_ms": (now.get("spurt_delays_ms") or [None])[-1],
                                   "playback_finished_position_s": said["playback_finished_position_s"]})
                before = now
            agent_result["utterances"] = utterances
            await asyncio.sleep(1.0)
            t1 = time.monotonic()
            async with http.get(f"{url}/sessions/broadcast/stats") as r:
                stats = await r.json()
            fps = [v.fps(t0, t1) for v in decoding]
            line = await asyncio.wait_for(crowd.stdout.readline(), 120) if crowd else b'{"fps": []}'
            if not line.strip():
                raise RuntimeError("the viewer crowd failed:\n" + (tmp / "crowd.log").read_text()[-3000:]
                                   + "\nserve's log:\n" + (tmp / "serve.log").read_text()[-3000:])
            crowd_out = json.loads(line)
            if crowd:
                await crowd.wait()
            all_fps = fps + crowd_out["fps"]
            connected = sum(v.pc.connectionState == "connected" for v in decoding) + crowd_out.get("connected", 0)
            result.update({
                "agent": agent_result,
                "whep_viewers": {"n": args.viewers, "via": args.via, "connected": connected, "fps": common.summarize(all_fps),
                                 "decoding": len(decoding), "decoding_fps": [round(f, 2) for f in fps],
                                 "counting_only": crowd_n,
                                 "audio_frames_first_two": [v.audio_frames for v in decoding[:2]],
                                 "per_viewer_fps": [round(f, 2) for f in all_fps]},
                "janus_subscriber": {"fps": round(received.fps(t0), 2), "audio_frames": received.audio_frames,
                                     "audio_peak": round(received.audio_peak, 3)},
                "session": stats["session"], "clients_nice": args.clients_nice,
                # share of the frames the clock played from speech that were not rendered in
                # time (shown as idle frames): the mouth the audience sees
                "session_late_share": stats["session"]["late_frames"] / max(1, stats["session"]["frames_played"]),
                "rtmp_push": stats["rtmp"], "janus_publisher": stats["janus"], "window_s": round(t1 - t0, 2),
            })
            left = await asyncio.gather(*(v.leave(http, url) for v in decoding), return_exceptions=True)
            result["whep_viewers"]["cut_off_before_leaving"] = sum(isinstance(x, BaseException) for x in left)
            await janus_pc.close()
            await janus_session.destroy()
    finally:
        proc.terminate()
        proc.wait(30)
        time.sleep(0.5)
        janus.stop()
        nginx.stop()
    result["rtmp_recording"] = rtmp_recording(nginx)
    return result


def markdown(result: dict) -> str:
    rows = [
        {"output": f"{result['whep_viewers'].get('via', 'whep').upper()} viewers ({result['whep_viewers']['n']}: "
                   f"{result['whep_viewers']['decoding']} decoding)",
         "fps (min / median)": f"{result['whep_viewers']['fps']['min']} / {result['whep_viewers']['fps']['median']}",
         "audio": "yes"},
        {"output": "  of them decoding here", "fps (min / median)":
            " / ".join(str(f) for f in sorted(result["whep_viewers"]["decoding_fps"])), "audio": ""},
        {"output": "Janus subscriber", "fps (min / median)": result["janus_subscriber"]["fps"],
         "audio": f"{result['janus_subscriber']['audio_frames']} frames"},
        {"output": "RTMP (nginx recording)", "fps (min / median)": result["rtmp_recording"].get("fps"),
         "audio": f"{result['rtmp_recording'].get('audio_seconds')} s"},
        {"output": "session itself", "fps (min / median)": result["session"]["fps"],
         "audio": f"speech frames late {result['session']['late_frames']} of {result['session']['frames_played']} "
                  f"({result['session_late_share']:.0%})"},
    ] + [{"output": f"  utterance {k + 1}", "fps (min / median)": "",
          "audio": f"late {u['late_frames']} of {u['frames_played']} ({u['late_share']:.0%}), delay "
                   f"{u['started_with_delay_ms']} ms"} for k, u in enumerate(result["agent"].get("utterances", []))]
    agent = result["agent"]
    return (common.markdown_table(rows) + f"\nTTS {agent['tts_seconds']} s; first push -> playback_started "
            f"{agent['push_to_playback_started_s']} s; playback_finished at {agent['playback_finished_position_s']} s\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_common_args(parser)
    parser.add_argument("--viewers", type=int, default=20, help="WHEP viewers (default 20)")
    parser.add_argument("--decoding-viewers", type=int, default=2,
                        help="viewers that decode video in this process (default 2); the others count "
                             "received frames without decoding, in a child process: on one 2-core machine "
                             "20 VP8 decoders measure the viewers' CPU, not the server")
    parser.add_argument("--serve-threads", type=int, default=None,
                        help="serve's --threads (default: serve's own choice: cores - 1 with RTMP/Janus outputs)")
    parser.add_argument("--utterances", type=int, default=2,
                        help="times the agent says its sentence, 1.5 s apart (default 2): the first comes "
                             "right after the audience joined, the next ones with the delay re-sized to the load")
    parser.add_argument("--clients-nice", type=int, default=0,
                        help="run the clients (viewers, Janus subscriber, Janus, nginx) at this nice value "
                             "and serve at 0, so the server gets the cores first: a stand-in for viewers "
                             "and servers on their own machines (needs root; default 0: all equal)")
    parser.add_argument("--via", choices=("whep", "janus"), default="whep",
                        help="how the viewers watch: WHEP from the server (default) or as subscribers of the "
                             "Janus room the server publishes into (the SFU path: the server sends one stream)")
    parser.add_argument("--whep-encode", choices=("shared", "per-viewer"), default="shared",
                        help="serve's --whep-encode (default shared: one VP8 encode for all viewers)")
    parser.add_argument("--whep-peers", choices=("process", "inline"), default="process",
                        help="serve's --whep-peers: the viewers' peer connections in a child process or inline")
    args = parser.parse_args()
    if args.clients_nice and os.geteuid() != 0:
        parser.error("--clients-nice needs root: serve is started at nice 0 below its clients")
    with tempfile.TemporaryDirectory() as tmp:
        result = {**common.header("broadcast", args, None), **asyncio.run(scenario(args, Path(tmp)))}
    if args.plots is not None:
        plt = common.pyplot()
        fig, ax = plt.subplots(figsize=(7, 3))
        fps = result["whep_viewers"]["per_viewer_fps"]
        ax.bar(range(len(fps)), fps, label="WHEP viewer")
        ax.axhline(25, color="k", lw=0.8, ls="--", label="25 fps")
        ax.axhline(result["janus_subscriber"]["fps"], color="tab:orange", label="Janus subscriber")
        ax.set_xlabel("viewer")
        ax.set_ylabel("fps received")
        ax.legend(loc="lower right")
        result["plot"] = common.save_figure(fig, args.plots, "broadcast_viewers")
    common.finish(result, args, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
