// How one answer of the API looks on the page (see services/ingress/__init__.py, "The answer's shape").
//
// An AnswerView takes the answer as it arrives: `content` pieces (text with a markdown reference where each medium
// was emitted: `![image 1](URL)`, `[audio 1](URL)`, `[video 1](URL)`), the media arrays' items (`images`, `audios`,
// `videos`: `{"type": "image_url", "image_url": {"url"}, "index"}`), then `boxes`, `masks` and `skill_calls`. It
// shows the text and every medium in output order (a reference becomes a placeholder that its array item fills:
// an <img>, <audio controls> or <video controls>, with a download link of the same bytes), boxes and masks drawn
// over the request's image they belong to, and skill calls folded in <details>. Text is always set as text (never
// parsed as HTML).

import { parsePly, turntable } from "./plyview.js";

const REF = /(!?)\[([a-z][a-z0-9_-]*) (\d+)\]\(([^)\s]+)\)/g;
const ELEMENT = { image: "img", audio: "audio", video: "video" };
const EXT = { "image/png": "png", "image/jpeg": "jpg", "image/webp": "webp", "image/gif": "gif",
  "audio/wav": "wav", "audio/x-wav": "wav", "audio/wave": "wav", "audio/mpeg": "mp3", "audio/flac": "flac",
  "audio/ogg": "ogg", "video/mp4": "mp4", "video/webm": "webm", "application/ply": "ply", "model/gltf-binary": "glb" };
export const PALETTE = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#9a6324"];

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k === "style") node.style.cssText = v; // CSSOM: allowed by the page's policy (style attributes are not)
    else node.setAttribute(k, v === true ? "" : String(v));
  }
  node.append(...children);
  return node;
}

/** True for a URL the page treats as a medium: a data URL or one of the server's artifact URLs. */
export function isMediaUrl(url) {
  if (url.startsWith("data:")) return true;
  try {
    return /\/v1\/artifacts\/[^/]+$/.test(new URL(url, location.href).pathname);
  } catch {
    return false;
  }
}

/** `content` -> [{type: "text", text}, {type: "ref", label, number, url, key}] in order. */
export function splitContent(content) {
  const out = [];
  let last = 0;
  for (const m of content.matchAll(REF)) {
    const [whole, , label, number, url] = m;
    if (!isMediaUrl(url)) continue;
    if (m.index > last) out.push({ type: "text", text: content.slice(last, m.index) });
    out.push({ type: "ref", label, number: Number(number), url, key: `${label} ${number}` });
    last = m.index + whole.length;
  }
  if (last < content.length) out.push({ type: "text", text: content.slice(last) });
  return out;
}

/** A data URL -> Blob (decoded here: the page's policy allows fetching only from its own server). */
export function dataUrlToBlob(url) {
  const comma = url.indexOf(",");
  const head = url.slice(5, comma);
  const mime = head.split(";")[0] || "application/octet-stream";
  const body = url.slice(comma + 1);
  let bytes;
  if (head.endsWith(";base64")) {
    const bin = atob(body);
    bytes = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
  } else {
    bytes = new TextEncoder().encode(decodeURIComponent(body));
  }
  return new Blob([bytes], { type: mime });
}

/** A URL the page can put in `src`: data URLs become blob: URLs (cheaper, seekable), others stay (an artifact URL
 * needs the API key when the server has keys: see `artifactBlobUrl`). */
export function displayUrl(url) {
  return url.startsWith("data:") ? URL.createObjectURL(dataUrlToBlob(url)) : url;
}

/** An artifact URL fetched with the page's headers (`Authorization` when the server wants a key: an `<img src>`
 * cannot send it, and another key's or no key's request is a 404) -> {url: a blob: URL} on success, else
 * {message: the API's error message or null}; `blob` too (the bytes, for media the page reads itself). */
export async function artifactBlobUrl(url, headers = {}) {
  let response;
  try {
    response = await fetch(url, { headers });
  } catch {
    return { message: null };
  }
  if (!response.ok) {
    let message = null;
    try {
      message = (await response.json())?.error?.message || null;
    } catch { /* not JSON */ }
    return { message };
  }
  const blob = await response.blob();
  return { url: URL.createObjectURL(blob), blob };
}

function extensionOf(url) {
  if (url.startsWith("data:")) {
    const mime = url.slice(5, url.indexOf(",")).split(";")[0];
    return EXT[mime] || mime.split("/")[1] || "bin";
  }
  const m = /\.([a-z0-9]+)$/i.exec(new URL(url, location.href).pathname);
  return m ? m[1].toLowerCase() : "bin";
}

/** COCO uncompressed RLE ({size: [H, W], counts}, column-major, runs of 0 then 1 ...) -> Uint8Array (H * W),
 * row-major, 1 where set. Throws on counts that do not cover the image. */
export function decodeRle(rle) {
  const [h, w] = rle.size;
  const mask = new Uint8Array(h * w);
  let pos = 0;
  let value = 0;
  for (const c of rle.counts) {
    if (c < 0 || pos + c > h * w) throw new Error("RLE counts do not match its size");
    if (value) {
      for (let k = pos; k < pos + c; k++) mask[(k % h) * w + Math.floor(k / h)] = 1;
    }
    pos += c;
    value ^= 1;
  }
  if (pos !== h * w) throw new Error("RLE counts do not sum to H * W");
  return mask;
}

function colourFor(map, label) {
  if (!map.has(label)) map.set(label, PALETTE[map.size % PALETTE.length]);
  return map.get(label);
}

function hexToRgb(hex) {
  const n = parseInt(hex.slice(1), 16);
  return [(n >> 16) & 255, (n >> 8) & 255, n & 255];
}

function short(text, n) {
  const t = String(text ?? "").replace(/\s+/g, " ").trim();
  return t.length > n ? `${t.slice(0, n - 1)}…` : t;
}

/** JSON for people: long arrays (mask counts) and long strings (data URLs) abridged, short number lists on one line. */
function prettyJson(value) {
  const text = JSON.stringify(value, (_, v) => {
    if (Array.isArray(v) && v.length > 24 && v.every((x) => typeof x === "number")) {
      return `[${v.slice(0, 12).join(", ")}, … ${v.length} numbers]`;
    }
    if (typeof v === "string" && v.length > 200) return `${v.slice(0, 80)}… (${v.length} characters)`;
    return v;
  }, 2);
  return text.replace(/\[\s*(-?[\d.e+-]+(?:,\s*-?[\d.e+-]+)*)\s*\]/g, (_, inner) => `[${inner.split(/,\s*/).join(", ")}]`);
}

export class AnswerView {
  /**
   * @param {HTMLElement} root the assistant message's element (its .body, .skills, .overlays are filled here)
   * @param {string[]} requestImages display URLs of the request's images in message order (what `image_index`
   *   counts)
   * @param {() => Object} headers the headers of a request to the API (the `Authorization` of its key, if any): media
   *   given by artifact URL are fetched with them into blob: URLs
   */
  constructor(root, requestImages, headers = () => ({})) {
    this.root = root;
    this.headers = headers;
    this.pending = []; // artifact fetches in flight (see `settled`)
    this.requestImages = requestImages;
    this.body = root.querySelector(".body");
    this.content = "";
    this.segments = []; // [{key, node}] rendered in order
    this.slots = new Map(); // "image 1" -> {figure, label, number, artifactUrl, src, filled}
    this.colours = new Map();
    this.boxes = [];
    this.masks = [];
    this.skillCalls = [];
    this.toolCalls = [];
  }

  /** Appends a `delta.content` piece. */
  appendContent(piece) {
    this.content += piece;
    this.render();
  }

  /** Sets the whole `content` (a non-streamed answer). */
  setContent(content) {
    this.content = content || "";
    this.render();
  }

  /** The answer's text without media references (where `text_span` offsets point). */
  textOnly() {
    return splitContent(this.content).filter((s) => s.type === "text").map((s) => s.text).join("");
  }

  render() {
    const segs = splitContent(this.content);
    for (let i = 0; i < segs.length; i++) {
      const seg = segs[i];
      const key = seg.type === "text" ? "text" : seg.key;
      const have = this.segments[i];
      if (have && have.key === key) {
        if (seg.type === "text" && have.text !== seg.text) this.fillText(have.node, seg.text, i === 0);
        if (seg.type === "text") have.text = seg.text;
        continue;
      }
      for (const gone of this.segments.splice(i)) gone.node.remove();
      let node;
      if (seg.type === "text") {
        node = el("div", { class: "text" });
        this.fillText(node, seg.text, i === 0);
      } else {
        node = this.slot(seg).figure;
      }
      this.body.append(node);
      this.segments.push({ key, node, text: seg.text });
    }
    for (const gone of this.segments.splice(segs.length)) gone.node.remove();
  }

  fillText(node, text, first, marks = []) {
    const paragraphs = text.split(/\n{2,}/).filter((p) => p.length);
    let from = 0;
    node.replaceChildren(...paragraphs.map((p) => {
      const para = el("p");
      const start = text.indexOf(p, from);
      from = start + p.length;
      if (first && marks.length) this.markSpans(para, p, start, marks);
      else para.textContent = p;
      return para;
    }));
  }

  markSpans(para, p, start, marks) {
    let at = 0;
    for (const { span, colour, label } of marks) {
      const a = span[0] - start;
      const b = span[1] - start;
      if (a < at || b > p.length || a >= b) continue;
      para.append(p.slice(at, a), el("mark", { style: `--mark: ${colour}`, title: label, text: p.slice(a, b) }));
      at = b;
    }
    para.append(p.slice(at));
  }

  slot(seg) {
    if (this.slots.has(seg.key)) return this.slots.get(seg.key);
    const figure = el("figure", { class: `medium medium-${seg.label} pending`, "data-label": seg.label,
      "data-number": seg.number, "data-artifact": seg.url });
    const frame = el("div", { class: "frame" },
      el("div", { class: "placeholder", role: "status", text: `Making ${seg.key}…` }));
    const link = el("a", { class: "download", hidden: true, text: "Download" });
    figure.append(frame, el("figcaption", {}, el("span", { class: "caption", text: seg.key }), link));
    const slot = { figure, frame, link, label: seg.label, number: seg.number, artifactUrl: seg.url, filled: false };
    this.slots.set(seg.key, slot);
    return slot;
  }

  /** A media array item (`{"type": "image_url", "image_url": {"url"}, "index"}`) fills its reference's place. */
  fill(item) {
    const label = String(item.type || "").replace(/_url$/, "");
    const url = item[item.type]?.url;
    if (!label || !url || typeof item.index !== "number") return;
    const key = `${label} ${item.index + 1}`;
    let slot = this.slots.get(key);
    if (!slot) { // an item without a reference in the content (should not happen): shown at the end
      slot = this.slot({ key, label, number: item.index + 1, url });
      this.body.append(slot.figure);
    }
    if (item.overlay) slot.figure.classList.add("overlay-image");
    this.show(slot, url);
  }

  show(slot, url) {
    if (slot.filled) return;
    slot.filled = true;
    if (url.startsWith("data:")) {
      const blob = dataUrlToBlob(url);
      this.pending.push(this.place(slot, url, URL.createObjectURL(blob), blob));
      return;
    }
    this.pending.push(artifactBlobUrl(url, this.headers()).then((got) => {
      if (got.url) return this.place(slot, url, got.url, got.blob);
      return this.failed(slot, got.message);
    }));
  }

  /** Resolves when every medium given by artifact URL has been fetched (or failed). */
  async settled() {
    while (this.pending.length) await Promise.all(this.pending.splice(0));
  }

  /** Puts the medium (`src`: a blob: URL of `url`'s bytes, `blob` the bytes) in its reference's place: an element by
   * its modality, a turntable for a PLY point cloud (any modality whose file is PLY), else a link. */
  async place(slot, url, src, blob) {
    const tag = ELEMENT[slot.label];
    const name = `${slot.label} ${slot.number}`;
    let media;
    if (!tag && extensionOf(url) === "ply") {
      try {
        media = turntable(parsePly(await blob.arrayBuffer()), { label: `Generated ${name}` });
      } catch (e) {
        media = el("a", { href: src, text: `Open ${name} (${e.message})` });
      }
    } else if (tag === "img") {
      const alt = short(this.textOnly(), 100);
      media = el("img", { src, alt: alt ? `Generated ${name}: ${alt}` : `Generated ${name}` });
      media.addEventListener("load", () => {
        if (Math.max(media.naturalWidth, media.naturalHeight) < 128) media.classList.add("pixelated");
      });
    } else if (tag) {
      media = el(tag, { src, controls: true, preload: "auto", "aria-label": `Generated ${name}` });
      if (tag === "video") {
        Object.assign(media, { loop: true, muted: true, autoplay: true, playsInline: true });
        media.addEventListener("loadedmetadata", () => {
          if (Math.max(media.videoWidth, media.videoHeight) < 128) media.classList.add("pixelated");
        });
      }
    } else {
      media = el("a", { href: src, text: `Open ${name}` });
    }
    media.addEventListener("error", () => this.failed(slot), { once: true });
    slot.media = media;
    slot.frame.replaceChildren(media);
    slot.figure.classList.remove("pending");
    slot.link.href = src;
    slot.link.download = `${slot.label}-${slot.number}.${extensionOf(url)}`;
    slot.link.setAttribute("aria-label", `Download ${name}`);
    slot.link.hidden = false;
  }

  /** A medium that could not be shown: `known` or the artifact URL's error message (e.g. its generation failed). */
  async failed(slot, known = null) {
    let message = known || `${slot.label} ${slot.number} could not be loaded`;
    if (!known) {
      try {
        const r = await fetch(slot.artifactUrl, { headers: this.headers() });
        if (!r.ok) message = (await r.json())?.error?.message || message;
      } catch { /* keep the generic message */ }
    }
    slot.figure.classList.add("failed");
    slot.frame.replaceChildren(el("div", { class: "placeholder error", role: "alert", text: message }));
    slot.link.hidden = true;
  }

  /** Every reference not filled by an array item gets its artifact URL (the server waits for a pending one). */
  fillRemaining() {
    for (const slot of this.slots.values()) if (!slot.filled) this.show(slot, slot.artifactUrl);
  }

  /** A whole (non-streamed) message, or the fields that came with the last chunk. */
  applyMessage(message) {
    if (typeof message.content === "string") this.setContent(message.content);
    for (const [k, v] of Object.entries(message)) {
      if (Array.isArray(v) && v.length && v.every((it) => it && /_url$/.test(it.type || "") && "index" in it)) {
        v.forEach((it) => this.fill(it));
      }
    }
    if (Array.isArray(message.boxes)) this.boxes = message.boxes;
    if (Array.isArray(message.masks)) this.masks = message.masks;
    if (Array.isArray(message.skill_calls)) this.skillCalls = message.skill_calls;
    if (Array.isArray(message.tool_calls)) this.toolCalls = message.tool_calls;
  }

  /** The answer is complete: remaining references, overlays, skill calls, marks in the text. */
  finish() {
    this.fillRemaining();
    this.drawSkillCalls();
    this.drawOverlays();
    this.markText();
  }

  markText() {
    const marks = this.boxes.filter((b) => Array.isArray(b.text_span))
      .map((b) => ({ span: b.text_span, colour: colourFor(this.colours, b.phrase || ""), label: b.phrase }))
      .sort((a, b) => a.span[0] - b.span[0]);
    const first = this.segments[0];
    if (!marks.length || !first || first.key !== "text") return;
    this.fillText(first.node, first.text, true, marks);
  }

  drawSkillCalls() {
    const box = this.root.querySelector(".skills");
    const calls = [
      ...this.skillCalls.map((c) => ({ kind: "Skill", name: c.name, args: c.arguments, result: c.result })),
      ...this.toolCalls.map((c) => ({ kind: "Tool call", name: c.function?.name, args: c.function?.arguments })),
    ];
    box.replaceChildren(...calls.map((c) => {
      let args = c.args;
      if (typeof args === "string") { try { args = JSON.parse(args); } catch { /* shown as written */ } }
      const res = c.result || {};
      const failed = Boolean(res.error);
      const summary = el("summary", {},
        el("span", { class: "skill-kind", text: c.kind }), " ", el("code", { text: c.name || "?" }),
        c.result ? el("span", { class: `skill-result ${failed ? "error" : ""}`,
          text: ` → ${short(failed ? res.error : res.text, 90)}` }) : "");
      const parts = [summary, el("h4", { text: "Arguments" }), el("pre", { text: prettyJson(args ?? {}) })];
      if (c.result) parts.push(el("h4", { text: "Result" }), el("pre", { text: prettyJson(res) }));
      return el("details", { class: `skill${failed ? " failed" : ""}` }, ...parts);
    }));
  }

  drawOverlays() {
    const box = this.root.querySelector(".overlays");
    const byImage = new Map();
    const add = (index, kind, item) => {
      if (!byImage.has(index)) byImage.set(index, { boxes: [], masks: [] });
      byImage.get(index)[kind].push(item);
    };
    this.boxes.forEach((b) => add(b.image_index ?? this.requestImages.length - 1, "boxes", b));
    this.masks.forEach((m) => add(m.image_index ?? this.requestImages.length - 1, "masks", m));
    const figures = [];
    for (const [index, what] of [...byImage].sort((a, b) => a[0] - b[0])) {
      const src = this.requestImages[index];
      if (!src) continue;
      figures.push(this.overlayFigure(index, src, what.boxes, what.masks));
    }
    box.replaceChildren(...figures);
  }

  overlayFigure(index, src, boxes, masks) {
    const img = el("img", { src, alt: `Image ${index + 1} of the request, with ${boxes.length} box(es) and ` +
      `${masks.length} mask(s) drawn over it` });
    const canvas = el("canvas", { class: "overlay-canvas", "aria-hidden": "true" });
    const labels = el("div", { class: "overlay-labels", "aria-hidden": "true" });
    const stage = el("div", { class: "stage" }, img, canvas, labels);
    const legend = el("ul", { class: "legend" });
    const figure = el("figure", { class: "overlay", "data-image-index": index }, stage,
      el("figcaption", {}, el("span", { class: "caption", text: `On image ${index + 1} of the request` }), legend));
    const draw = () => {
      const w = img.naturalWidth;
      const h = img.naturalHeight;
      if (!w || !h) return;
      if (Math.max(w, h) < 128) img.classList.add("pixelated");
      const scale = Math.max(1, Math.floor(768 / Math.max(w, h)));
      canvas.width = w * scale;
      canvas.height = h * scale;
      canvas.dataset.scale = String(scale);
      const ctx = canvas.getContext("2d");
      const rows = [];
      for (const m of masks) {
        const colour = colourFor(this.colours, m.label || "");
        try {
          this.paintMask(ctx, m, colour, w, h, scale);
        } catch (e) {
          rows.push(el("li", { class: "error", text: `mask ${m.label || ""}: ${e.message}` }));
          continue;
        }
        const bb = m.bbox_px || [];
        rows.push(el("li", {}, el("span", { class: "swatch mask", style: `--c: ${colour}` }),
          `${m.label || "mask"} (mask${m.area_px != null ? `, ${m.area_px} px` : ""}` +
          `${m.score != null ? `, score ${Number(m.score).toFixed(2)}` : ""}) [${bb.map((v) => Math.round(v)).join(", ")}]`));
      }
      const shown = img.getBoundingClientRect().width || Math.min(320, Math.max(192, w));
      ctx.lineWidth = Math.max(1, Math.round((2.5 * canvas.width) / shown)); // about 2.5 CSS pixels
      for (const b of boxes) {
        const colour = colourFor(this.colours, b.phrase || "");
        const [x1, y1, x2, y2] = b.box;
        ctx.strokeStyle = colour;
        ctx.strokeRect(x1 * scale, y1 * scale, (x2 - x1) * scale, (y2 - y1) * scale);
        labels.append(el("span", { class: "box-label", style: `--c: ${colour}; left: ${(100 * x1) / w}%; ` +
          `top: ${(100 * y1) / h}%`, text: b.phrase || "box" }));
        rows.push(el("li", {}, el("span", { class: "swatch", style: `--c: ${colour}` }),
          `${b.phrase || "box"} [${b.box.map((v) => Math.round(v)).join(", ")}] px`));
      }
      legend.replaceChildren(...rows);
    };
    if (img.complete && img.naturalWidth) draw();
    else img.addEventListener("load", draw, { once: true });
    return figure;
  }

  paintMask(ctx, m, colour, w, h, scale) {
    const [mh, mw] = m.rle.size;
    const bits = decodeRle(m.rle);
    const [r, g, b] = hexToRgb(colour);
    const layer = document.createElement("canvas");
    layer.width = mw;
    layer.height = mh;
    const lctx = layer.getContext("2d");
    const data = lctx.createImageData(mw, mh);
    for (let i = 0; i < bits.length; i++) {
      if (!bits[i]) continue;
      const y = Math.floor(i / mw);
      const x = i % mw;
      const edge = x === 0 || y === 0 || x === mw - 1 || y === mh - 1 || !bits[i - 1] || !bits[i + 1] ||
        !bits[i - mw] || !bits[i + mw];
      data.data.set([r, g, b, edge ? 255 : 110], i * 4);
    }
    lctx.putImageData(data, 0, 0);
    ctx.imageSmoothingEnabled = false;
    ctx.drawImage(layer, 0, 0, w * scale, h * scale);
  }
}
