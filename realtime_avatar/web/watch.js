// Watch-only preview of a session running on the server's machine (`live --mic`): receives its
// video and audio over WebRTC, sends nothing. window.preview holds the state (tests read it).
// The player itself is receive.js.
"use strict";

const video = document.getElementById("avatar");
const preview = (window.preview = { state: "connecting", framesDecoded: 0, error: null });
muteButton(document.getElementById("unmute"), video);

async function offerSignal(offerSdp) {
  const response = await fetch("offer", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ sdp: offerSdp, type: "offer" }),
  });
  const body = await response.json();
  if (!response.ok) throw new Error(body.error || `HTTP ${response.status}`);
  return body.sdp;
}

playAvatar({ video, statusText: document.getElementById("status"), state: preview, signal: offerSignal });
