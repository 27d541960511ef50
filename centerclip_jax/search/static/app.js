// The search page: GET /search?q=...&k=... and a grid of results; a click plays the video.
"use strict";

const form = document.getElementById("search-form");
const input = document.getElementById("q");
const grid = document.getElementById("results");
const statusLine = document.getElementById("status");
const player = document.getElementById("player");
const video = document.getElementById("video");
const nowPlaying = document.getElementById("now-playing");
const K = 24;

function setStatus(text, isError) {
  statusLine.textContent = text;
  statusLine.className = isError ? "error" : "";
}

function play(hit) {
  player.hidden = false;
  video.src = hit.media;
  nowPlaying.textContent = hit.path;
  video.play().catch(() => {});  // autoplay may be refused; the controls remain
}

function card(hit) {
  const el = document.createElement("figure");
  el.className = "result" + (hit.media ? "" : " static");
  el.dataset.path = hit.path;
  el.dataset.rank = hit.rank;
  const img = document.createElement("img");
  img.alt = hit.path;
  img.loading = "lazy";
  if (hit.thumb) img.src = hit.thumb;
  const meta = document.createElement("figcaption");
  meta.className = "meta";
  const rank = document.createElement("span");
  rank.className = "rank";
  rank.textContent = "#" + hit.rank;
  const score = document.createElement("span");
  score.className = "score";
  score.textContent = hit.score.toFixed(3);
  const name = document.createElement("span");
  name.className = "name";
  name.textContent = hit.path;  // textContent: file names are never parsed as HTML
  name.title = hit.path;
  meta.append(rank, score, name);
  el.append(img, meta);
  if (hit.media) el.addEventListener("click", () => play(hit));
  return el;
}

async function search(q) {
  setStatus("searching...");
  let body;
  try {
    const resp = await fetch("/search?" + new URLSearchParams({q: q, k: K}));
    body = await resp.json();
    if (!resp.ok) throw new Error(body.error || resp.statusText);
  } catch (err) {
    setStatus(String(err.message || err), true);
    return;
  }
  grid.replaceChildren(...body.results.map(card));
  let line = `${body.results.length} videos, ${body.took_ms.toFixed(0)} ms (${body.method})`;
  if (body.truncated) line += " - " + body.note;
  setStatus(line);
  history.replaceState(null, "", "?" + new URLSearchParams({q: q}));
}

form.addEventListener("submit", (ev) => {
  ev.preventDefault();
  if (input.value.trim()) search(input.value.trim());
});

const initial = new URLSearchParams(location.search).get("q");
if (initial) {
  input.value = initial;
  search(initial);
}
