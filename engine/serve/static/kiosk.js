// The kiosk page: choose or capture an image, pick a task, see the text stream in and the boxes
// and masks drawn on the image. Talks to POST /v1/{task} with stream=true (server-sent events:
// {"text": piece} ..., {"result": {...}}, [DONE]). No external resources.
"use strict";

const PALETTE = [[31, 119, 180], [255, 127, 14], [44, 160, 44], [214, 39, 40], [148, 103, 189],
                 [140, 86, 75], [227, 119, 194], [188, 189, 34], [23, 190, 207]];   // engine/draw.py's
const MASK_ALPHA = 0.45;
const HINTS = {answer: "Your question, e.g. what colour is the square?",
               detect: "Objects, e.g. blue square ; red circle", segment: "Objects, e.g. blue square"};

const $ = (id) => document.getElementById(id);
const canvas = $("canvas"), ctx = canvas.getContext("2d");
let file = null, picture = null, busy = false;

function task() { return document.querySelector("input[name=task]:checked").value; }

function setStatus(text, isError) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "muted";
}

function updateQuery() {
  const hint = HINTS[task()];
  $("query").hidden = !hint;
  $("query").placeholder = hint || "";
}

function drawPicture() {
  if (!picture) return;
  const scale = Math.min(1, 640 / picture.naturalWidth, 480 / picture.naturalHeight) * (picture.naturalWidth < 320 ? 2 : 1);
  canvas.width = Math.round(picture.naturalWidth * scale);
  canvas.height = Math.round(picture.naturalHeight * scale);
  ctx.imageSmoothingEnabled = true;
  ctx.drawImage(picture, 0, 0, canvas.width, canvas.height);
  canvas.dataset.overlays = "0";
}

$("image").addEventListener("change", () => {
  file = $("image").files[0] || null;
  if (!file) return;
  const img = new Image();
  img.onload = () => { picture = img; drawPicture(); $("run").disabled = false; setStatus("Pick a task and press Run."); };
  img.onerror = () => setStatus("This file is not an image the browser can show.", true);
  img.src = URL.createObjectURL(file);
  $("text").textContent = "";
  $("results").innerHTML = "";
});
document.querySelectorAll("input[name=task]").forEach((el) => el.addEventListener("change", updateQuery));

function rleDecode(rle) {         // COCO uncompressed RLE, column-major -> Uint8Array [h * w] row-major
  const [h, w] = rle.size, out = new Uint8Array(h * w);
  let pos = 0, value = 0;
  for (const run of rle.counts) {
    if (value) for (let i = pos; i < pos + run; i++) out[(i % h) * w + Math.floor(i / h)] = 1;
    pos += run;
    value ^= 1;
  }
  return out;
}

function colors(items, given) {    // the server's (engine.draw's) colour per label; a palette otherwise
  const map = new Map();
  for (const it of items) {
    if (map.has(it.label)) continue;
    map.set(it.label, given && given[it.label] ? given[it.label] : PALETTE[map.size % PALETTE.length]);
  }
  return map;
}

function drawResult(result) {
  drawPicture();
  const items = result.detections || result.segments || [];
  const sx = canvas.width / result.image.width, sy = canvas.height / result.image.height;
  const cmap = colors(items, result.colors);
  for (const it of items) {                      // masks first, boxes and labels on top
    if (!it.mask) continue;
    const [h, w] = it.mask.size, bits = rleDecode(it.mask), c = cmap.get(it.label);
    const layer = document.createElement("canvas");
    layer.width = w; layer.height = h;
    const lctx = layer.getContext("2d"), data = lctx.createImageData(w, h);
    const halo = 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2] > 100 ? 0 : 255;     // engine.draw's halo rule
    const at = (y, x) => y >= 0 && y < h && x >= 0 && x < w && bits[y * w + x];
    for (let i = 0; i < bits.length; i++) if (bits[i]) {
      const y = Math.floor(i / w), x = i % w;
      const edge = !(at(y - 1, x) && at(y + 1, x) && at(y, x - 1) && at(y, x + 1));   // as engine.draw's _edge
      data.data[4 * i] = edge ? halo : c[0];
      data.data[4 * i + 1] = edge ? halo : c[1];
      data.data[4 * i + 2] = edge ? halo : c[2];
      data.data[4 * i + 3] = edge ? 255 : Math.round(255 * MASK_ALPHA);
    }
    lctx.putImageData(data, 0, 0);
    ctx.drawImage(layer, 0, 0, canvas.width, canvas.height);
  }
  ctx.font = "bold 15px system-ui, sans-serif";
  ctx.textBaseline = "top";
  for (const it of items) {
    const c = cmap.get(it.label), css = `rgb(${c[0]},${c[1]},${c[2]})`;
    const [x0, y0, x1, y1] = it.box;
    const light = 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2] > 100;     // engine.draw's halo rule
    ctx.lineWidth = 6;                                                    // a halo keeps the box visible
    ctx.strokeStyle = light ? "#000" : "#fff";
    ctx.strokeRect(x0 * sx, y0 * sy, (x1 - x0) * sx, (y1 - y0) * sy);
    ctx.lineWidth = 3;
    ctx.strokeStyle = css;
    ctx.strokeRect(x0 * sx, y0 * sy, (x1 - x0) * sx, (y1 - y0) * sy);
    if (it.label) {
      const tw = ctx.measureText(it.label).width + 8, th = 20;
      const ty = y0 * sy - th >= 0 ? y0 * sy - th : y0 * sy;
      ctx.fillStyle = css;
      ctx.fillRect(x0 * sx, ty, tw, th);
      ctx.fillStyle = (0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]) > 150 ? "#000" : "#fff";
      ctx.fillText(it.label, x0 * sx + 4, ty + 3);
    }
  }
  canvas.dataset.overlays = String(items.length);
  const list = $("results");
  list.innerHTML = "";
  for (const it of items) {
    const li = document.createElement("li"), sw = document.createElement("span"), name = document.createElement("span");
    const c = cmap.get(it.label);
    sw.className = "swatch";
    sw.style.background = `rgb(${c[0]},${c[1]},${c[2]})`;
    name.className = "label";
    name.textContent = it.label || "(no label)";
    li.append(sw, name);
    const box = document.createElement("span");
    box.className = "muted";
    box.textContent = `[${it.box.map((v) => Math.round(v)).join(", ")}]` + (it.mask_area ? `, ${it.mask_area} px` : "");
    li.append(box);
    list.append(li);
  }
  if (result.detections || result.segments) {
    $("text").textContent = items.length ? `${items.length} found` : "nothing found";
  }
}

async function run() {
  if (!file || busy) return;
  const t = task(), form = new FormData();
  form.append("image", file);
  form.append("stream", "true");
  const q = $("query").value.trim();
  if (t === "answer") form.append("question", q);
  if (t === "detect" || t === "segment") form.append("labels", q);
  busy = true;
  $("run").disabled = true;
  document.body.dataset.state = "running";
  $("text").textContent = "";
  $("results").innerHTML = "";
  drawPicture();
  setStatus("Working…");
  const headers = {};
  const key = localStorage.getItem("paligemma-api-key");
  if (key) headers["Authorization"] = "Bearer " + key;
  const t0 = performance.now();
  try {
    const resp = await fetch(`/v1/${t}`, {method: "POST", body: form, headers});
    if (!resp.ok) {
      const body = await resp.json().catch(() => ({error: {message: resp.statusText}}));
      if (resp.status === 401) $("keybox").hidden = false;
      throw new Error(body.error ? body.error.message : resp.statusText);
    }
    const reader = resp.body.getReader(), decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, {stream: true});
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const line = buffer.slice(0, cut).trim();
        buffer = buffer.slice(cut + 2);
        if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
        const ev = JSON.parse(line.slice(6));
        if (ev.error) throw new Error(ev.error.message);
        if (ev.text !== undefined) $("text").textContent += ev.text;
        if (ev.result) {
          if (!ev.result.detections && !ev.result.segments) $("text").textContent = ev.result.text;
          drawResult(ev.result);
          const ms = ev.result.usage.timings.total * 1000;
          setStatus(`${t}: ${ev.result.usage.completion_tokens} tokens, ${Math.round(ms)} ms in the engine, ` +
                    `${Math.round(performance.now() - t0)} ms here`);
        }
      }
    }
    document.body.dataset.state = "done";
  } catch (e) {
    setStatus(String(e.message || e), true);
    document.body.dataset.state = "error";
  } finally {
    busy = false;
    $("run").disabled = !file;
  }
}

$("run").addEventListener("click", run);
$("apikey").addEventListener("change", () => { localStorage.setItem("paligemma-api-key", $("apikey").value); });
fetch("/v1/models", {headers: localStorage.getItem("paligemma-api-key") ?
  {"Authorization": "Bearer " + localStorage.getItem("paligemma-api-key")} : {}})
  .then((r) => r.ok ? r.json() : null).then((m) => { if (m) $("model").textContent = m.data[0].id; }).catch(() => {});
updateQuery();
