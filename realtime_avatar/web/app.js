// realtime-avatar page: sends the microphone over WebRTC, plays the avatar that comes back,
// and shows live statistics from RTCPeerConnection.getStats() and the server.
// window.avatar holds the page's state and last statistics (tests read it).
"use strict";

const ICE_GATHERING_TIMEOUT_MS = 3000; // the server has no trickle ICE: send what we have by then
const STATS_INTERVAL_MS = 1000;
const token = new URLSearchParams(location.search).get("token");

const video = document.getElementById("avatar");
const startButton = document.getElementById("start");
const interruptButton = document.getElementById("interrupt");
const statusText = document.getElementById("status");

// timings: ms since Start for ICE gathered, answer applied, first avatar frame shown
const avatar = (window.avatar = { state: "idle", sessionId: null, stats: {}, server: null, error: null, timings: {} });
let pc = null;
let mic = null;
let statsTimer = null;
let previous = null; // last video inbound-rtp report, for a received-fps fallback

function setState(state, detail) {
  avatar.state = state;
  statusText.textContent = detail ? `${state}: ${detail}` : state;
}

function authHeaders(extra) {
  const headers = Object.assign({}, extra);
  if (token) headers["Authorization"] = `Bearer ${token}`;
  return headers;
}

function waitForIceGathering(peer, timeoutMs) {
  if (peer.iceGatheringState === "complete") return Promise.resolve(true);
  return new Promise((resolve) => {
    const timer = setTimeout(() => finish(false), timeoutMs);
    function check() {
      if (peer.iceGatheringState === "complete") finish(true);
    }
    function finish(complete) {
      clearTimeout(timer);
      peer.removeEventListener("icegatheringstatechange", check);
      resolve(complete);
    }
    peer.addEventListener("icegatheringstatechange", check);
  });
}

// The server already holds audio and video back by the same output delay and sends them in
// the same 40 ms tick, in sync and paced: a receiver-side buffer beyond what the network's
// jitter needs only adds latency. Ask the browser for its minimum (jitterBufferTarget in ms,
// Chrome 114+/Firefox; playoutDelayHint in s, older Chrome). The browser still grows the buffer
// on its own when it measures real jitter, and A/V sync between the two tracks is kept.
const PLAYOUT_TARGET_MS = 0;

function lowLatencyPlayout(receiver) {
  try {
    if ("jitterBufferTarget" in receiver) receiver.jitterBufferTarget = PLAYOUT_TARGET_MS;
    else if ("playoutDelayHint" in receiver) receiver.playoutDelayHint = PLAYOUT_TARGET_MS / 1000;
    avatar.playoutTargetMs = PLAYOUT_TARGET_MS;
  } catch (err) {
    avatar.playoutTargetMs = null; // not honoured by this browser: its default applies
  }
}

async function start() {
  startButton.disabled = true;
  avatar.error = null;
  const t0 = performance.now();
  const mark = (name) => (avatar.timings[name] = Math.round(performance.now() - t0));
  avatar.timings = {};
  video.addEventListener("loadeddata", () => mark("firstFrame"), { once: true });
  try {
    setState("starting", "microphone");
    // Raw microphone: the browser's echo cancellation, noise suppression and gain control
    // change the speech the lips are driven by.
    mic = await navigator.mediaDevices.getUserMedia({
      audio: { echoCancellation: false, noiseSuppression: false, autoGainControl: false },
      video: false,
    });
    pc = new RTCPeerConnection({ iceServers: [] });
    const remote = new MediaStream();
    pc.addEventListener("track", (event) => {
      lowLatencyPlayout(event.receiver);
      remote.addTrack(event.track);
      video.srcObject = remote;
      video.play().catch(() => {}); // autoplay may wait for the next gesture; the stream still flows
    });
    pc.addEventListener("connectionstatechange", () => {
      avatar.stats.connection = pc.connectionState;
      if (pc.connectionState === "failed") setState("failed", "connection failed");
    });
    for (const track of mic.getAudioTracks()) pc.addTrack(track, mic);
    pc.addTransceiver("video", { direction: "recvonly" });

    setState("starting", "gathering ICE candidates");
    await pc.setLocalDescription(await pc.createOffer());
    const complete = await waitForIceGathering(pc, ICE_GATHERING_TIMEOUT_MS);
    if (!complete) console.warn("ICE gathering did not complete; sending the candidates found so far");
    mark("iceGathered");

    setState("starting", "waiting for the answer");
    const response = await fetch("offer", {
      method: "POST",
      headers: authHeaders({ "Content-Type": "application/json" }),
      body: JSON.stringify({ sdp: pc.localDescription.sdp, type: pc.localDescription.type }),
    });
    const body = await response.json().catch(() => ({}));
    if (!response.ok) throw new Error(body.error || `server answered ${response.status}`);
    avatar.sessionId = body.session_id;
    await pc.setRemoteDescription({ sdp: body.sdp, type: body.type });
    mark("answered");

    setState("streaming");
    startButton.textContent = "Stop";
    startButton.disabled = false;
    interruptButton.disabled = false;
    statsTimer = setInterval(updateStats, STATS_INTERVAL_MS);
  } catch (error) {
    avatar.error = String(error.message || error);
    await stop(false);
    setState("error", avatar.error);
  }
}

async function stop(tellServer = true) {
  clearInterval(statsTimer);
  statsTimer = null;
  previous = null;
  const sessionId = avatar.sessionId;
  avatar.sessionId = null;
  if (tellServer && sessionId) {
    await fetch(`sessions/${sessionId}`, { method: "DELETE", headers: authHeaders() }).catch(() => {});
  }
  if (pc) pc.close();
  pc = null;
  if (mic) mic.getTracks().forEach((track) => track.stop());
  mic = null;
  video.srcObject = null;
  startButton.textContent = "Start";
  startButton.disabled = false;
  interruptButton.disabled = true;
  setState("idle");
}

async function interrupt() {
  if (!avatar.sessionId) return;
  await fetch(`sessions/${avatar.sessionId}/interrupt`, { method: "POST", headers: authHeaders() });
}

async function updateStats() {
  if (!pc) return;
  const s = avatar.stats;
  const reports = await pc.getStats();
  let rtt = null;
  reports.forEach((r) => {
    if (r.type === "inbound-rtp" && r.kind === "video") {
      s.framesDecoded = r.framesDecoded || 0;
      s.framesDropped = r.framesDropped || 0;
      if (r.framesPerSecond !== undefined) s.fps = r.framesPerSecond;
      else if (previous) s.fps = ((r.framesDecoded - previous.framesDecoded) * 1000) / (r.timestamp - previous.timestamp);
      previous = r;
      // average time a frame waited in the jitter buffer, and to decode
      s.jitterBufferMs = r.jitterBufferEmittedCount ? (1000 * r.jitterBufferDelay) / r.jitterBufferEmittedCount : null;
      s.decodeMs = r.framesDecoded ? (1000 * r.totalDecodeTime) / r.framesDecoded : null;
    }
    if (r.type === "candidate-pair" && r.nominated && r.currentRoundTripTime !== undefined) {
      rtt = 1000 * r.currentRoundTripTime;
    }
  });
  s.rttMs = rtt;
  if (avatar.sessionId) {
    try {
      const response = await fetch(`sessions/${avatar.sessionId}/stats`, { headers: authHeaders() });
      if (response.ok) avatar.server = await response.json();
    } catch (error) {
      console.warn("server stats unavailable", error);
    }
  }
  const server = avatar.server ? avatar.server.session : null;
  s.serverLatencyMs = server ? server.latency_ms : null;
  // mic -> server (half the round trip) + server render latency + server -> page (half) +
  // the video jitter buffer + decode. The browser's audio capture buffer is not counted.
  if (s.serverLatencyMs !== null && s.serverLatencyMs !== undefined && rtt !== null) {
    s.endToEndMs = rtt + s.serverLatencyMs + (s.jitterBufferMs || 0) + (s.decodeMs || 0);
  }
  render(s, server);
}

function fmt(value, digits = 0, unit = "") {
  return value === null || value === undefined || Number.isNaN(value) ? "–" : `${Number(value).toFixed(digits)}${unit}`;
}

function render(s, server) {
  const cells = {
    connection: s.connection || (pc ? pc.connectionState : "–"),
    fps: fmt(s.fps, 1),
    framesDecoded: fmt(s.framesDecoded),
    framesDropped: fmt(s.framesDropped),
    jitterBufferMs: fmt(s.jitterBufferMs, 0, " ms"),
    rttMs: fmt(s.rttMs, 1, " ms"),
    serverLatencyMs: fmt(s.serverLatencyMs, 0, " ms"),
    endToEndMs: fmt(s.endToEndMs, 0, " ms"),
    serverFps: server ? `${fmt(server.fps, 1)} / ${fmt(server.late_frames)}` : "–",
    serverAudioPeak: avatar.server ? fmt(avatar.server.audio_in.peak, 3) : "–",
  };
  for (const [name, text] of Object.entries(cells)) {
    const cell = document.querySelector(`[data-stat="${name}"]`);
    if (cell) cell.textContent = text;
  }
}

startButton.addEventListener("click", () => (pc ? stop() : start()));
interruptButton.addEventListener("click", interrupt);
// Leaving the page: tell the server now (keepalive outlives the page) rather than let it
// notice the silence a few seconds later.
window.addEventListener("pagehide", () => {
  if (!avatar.sessionId) return;
  fetch(`sessions/${avatar.sessionId}`, { method: "DELETE", headers: authHeaders(), keepalive: true });
});
