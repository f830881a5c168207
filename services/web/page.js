// polymodal's chat page: a client of the public API only (GET /v1/models, POST /v1/chat/completions with
// `stream: true`, GET /v1/artifacts/...). No framework, no build step, nothing fetched from elsewhere.
//
// The API key, when the server wants one, lives in `state.key` (page memory) only: never in localStorage,
// sessionStorage or a cookie.

import { AnswerView, displayUrl } from "./view.js";

const $ = (id) => document.getElementById(id);
const AUDIO_FORMATS = { "audio/wav": "wav", "audio/x-wav": "wav", "audio/wave": "wav", "audio/vnd.wave": "wav",
  "audio/mpeg": "mp3", "audio/mp3": "mp3", "audio/flac": "flac", "audio/x-flac": "flac", "audio/ogg": "ogg" };

const state = {
  key: null, // the API key (page memory only)
  model: null, // the /v1/models entry
  history: [], // the conversation as the API reads it: [{role, content}]
  historyImages: [], // display URLs of the images of `history`, in message order (what `image_index` counts)
  attachments: [], // [{kind: "image"|"audio"|"video", name, mime, dataUrl, displayUrl}]
  controller: null, // AbortController of the request in flight
  follow: true, // the conversation follows new content (false once the user scrolls up)
};

class ApiError extends Error {
  constructor(status, error) {
    super(error?.message || `HTTP ${status}`);
    this.status = status;
    this.type = error?.type;
    this.code = error?.code;
    this.param = error?.param;
  }
}

function headers(extra = {}) {
  const h = { ...extra };
  if (state.key) h.Authorization = `Bearer ${state.key}`;
  return h;
}

/** The API's error body ({"error": {"message", ...}}) of a failed response, as an ApiError. */
async function failure(response) {
  let body = null;
  try {
    body = await response.json();
  } catch { /* not JSON */ }
  return new ApiError(response.status, body?.error || { message: `${response.status} ${response.statusText}` });
}

// ---- the served model ---------------------------------------------------------------------------------
async function loadModel() {
  showBanner(null);
  let response;
  try {
    response = await fetch("/v1/models", { headers: headers() });
  } catch (e) {
    $("model-name").textContent = "not connected";
    showBanner(`Could not reach the server (${e.message}).`, loadModel);
    return;
  }
  if (response.status === 401) {
    askForKey((await failure(response)).message);
    return;
  }
  if (!response.ok) {
    showBanner((await failure(response)).message, loadModel);
    return;
  }
  const model = (await response.json()).data?.[0];
  if (!model) {
    showBanner("The server lists no model.", loadModel);
    return;
  }
  state.model = model;
  $("key-panel").hidden = true;
  showModel(model);
}

function showModel(model) {
  const arch = model.architecture || model;
  const inputs = arch.input_modalities || ["text"];
  const outputs = arch.output_modalities || ["text"];
  $("model-name").textContent = model.id;
  $("model-name").title = model.description || "";
  $("model-modalities").replaceChildren(
    ...inputs.map((m) => chip(m, "in")), arrow(), ...outputs.map((m) => chip(m, "out")));
  $("model-modalities").setAttribute("aria-label", `reads ${inputs.join(", ")}; writes ${outputs.join(", ")}`);
  const boxes = $("output-boxes");
  boxes.replaceChildren(...outputs.filter((m) => m !== "text").map((m) => {
    const input = Object.assign(document.createElement("input"), { type: "checkbox", value: m, name: "modality" });
    input.disabled = $("model-decides").checked;
    const label = document.createElement("label");
    label.append(input, ` ${m}`);
    return label;
  }));
  const accept = inputs.filter((m) => ["image", "audio", "video"].includes(m)).map((m) => `${m}/*`);
  $("file-input").accept = accept.join(",");
  document.querySelectorAll(".example").forEach((b) => { b.hidden = !outputs.includes(b.dataset.modality); });
  const tasks = model.grounding?.tasks || [];
  $("task-row").hidden = !tasks.length;
  $("task").replaceChildren(new Option("none", ""), ...tasks.map((t) => new Option(t, t)));
  if (tasks.length) $("task").value = tasks.includes("grounding") ? "grounding" : tasks[0];
}

function chip(text, kind) {
  return Object.assign(document.createElement("span"), { className: `chip ${kind}`, textContent: text });
}

function arrow() {
  return Object.assign(document.createElement("span"), { className: "arrow", textContent: "→" });
}

function askForKey(why) {
  $("key-panel").hidden = false;
  $("key-why").textContent = why || "";
  $("model-name").textContent = "API key needed";
  $("key-input").focus();
}

function useKey() {
  const value = $("key-input").value.trim();
  if (!value) return;
  state.key = value;
  $("key-input").value = "";
  loadModel();
}

function showBanner(message, retry) {
  const b = $("banner");
  b.hidden = !message;
  b.replaceChildren();
  if (!message) return;
  b.append(message);
  if (retry) {
    const btn = Object.assign(document.createElement("button"), { type: "button", textContent: "Retry" });
    btn.addEventListener("click", retry);
    b.append(" ", btn);
  }
}

// ---- attachments ------------------------------------------------------------------------------------
function kindOf(file) {
  const kind = (file.type || "").split("/")[0];
  return ["image", "audio", "video"].includes(kind) ? kind : null;
}

function readDataUrl(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function attach(files) {
  const inputs = state.model?.architecture?.input_modalities || ["image", "audio", "video"];
  const maxBytes = state.model?.limits?.max_media_bytes;
  for (const file of files) {
    const kind = kindOf(file);
    if (!kind || !inputs.includes(kind)) {
      showBanner(`${file.name}: this model reads ${inputs.join(", ")}, not ${file.type || "this kind of file"}.`);
      continue;
    }
    if (maxBytes && file.size > maxBytes) {
      showBanner(`${file.name} is ${(file.size / 1048576).toFixed(1)} MiB; this server takes media up to ` +
        `${(maxBytes / 1048576).toFixed(1)} MiB.`);
      continue;
    }
    const dataUrl = await readDataUrl(file);
    state.attachments.push({ kind, name: file.name, mime: file.type, dataUrl, displayUrl: displayUrl(dataUrl) });
  }
  showAttachments();
}

function mediaPreview(a, { controls = true } = {}) {
  let node;
  if (a.kind === "image") {
    node = Object.assign(document.createElement("img"), { src: a.displayUrl, alt: `attached image ${a.name}` });
  } else {
    node = document.createElement(a.kind);
    Object.assign(node, { src: a.displayUrl, controls, preload: "metadata" });
    node.setAttribute("aria-label", `attached ${a.kind} ${a.name}`);
  }
  node.classList.add("preview", a.kind);
  return node;
}

function showAttachments() {
  $("attachments").replaceChildren(...state.attachments.map((a, i) => {
    const li = document.createElement("li");
    const remove = Object.assign(document.createElement("button"), { type: "button", className: "remove",
      textContent: "×", title: `Remove ${a.name}` });
    remove.setAttribute("aria-label", `Remove ${a.name}`);
    remove.addEventListener("click", () => {
      state.attachments.splice(i, 1);
      showAttachments();
    });
    const name = Object.assign(document.createElement("span"), { className: "name", textContent: a.name });
    li.append(mediaPreview(a, { controls: false }), name, remove);
    return li;
  }));
}

/** An attachment as the API's content part. */
function contentPart(a) {
  if (a.kind === "image") return { type: "image_url", image_url: { url: a.dataUrl } };
  if (a.kind === "video") return { type: "video_url", video_url: { url: a.dataUrl } };
  const format = AUDIO_FORMATS[a.mime];
  if (format) return { type: "input_audio", input_audio: { data: a.dataUrl.split(",", 2)[1], format } };
  return { type: "audio_url", audio_url: { url: a.dataUrl } };
}

// ---- the conversation --------------------------------------------------------------------------------
function addMessage(role) {
  $("welcome")?.remove();
  const article = document.createElement("article");
  article.className = `msg ${role}`;
  const meta = Object.assign(document.createElement("div"), { className: "meta" });
  const who = Object.assign(document.createElement("span"), { className: "who",
    textContent: role === "user" ? "You" : state.model?.id || "polymodal" });
  const status = Object.assign(document.createElement("span"), { className: "status" });
  status.setAttribute("role", "status");
  meta.append(who, status);
  article.append(meta);
  for (const part of ["skills", "body", "overlays"]) {
    article.append(Object.assign(document.createElement("div"), { className: part }));
  }
  $("conversation").append(article);
  return article;
}

function setStatus(article, text, kind) {
  const s = article.querySelector(".status");
  s.textContent = text;
  article.dataset.state = kind;
  article.setAttribute("aria-busy", kind === "sending" || kind === "streaming" ? "true" : "false");
}

function showError(article, err) {
  const box = document.createElement("div");
  box.className = "error-box";
  box.setAttribute("role", "alert");
  const msg = Object.assign(document.createElement("p"), { className: "error-message", textContent: err.message });
  box.append(msg);
  if (err.status) {
    const code = [err.status, err.code || err.type, err.param && `field ${err.param}`].filter(Boolean).join(" · ");
    box.append(Object.assign(document.createElement("p"), { className: "error-code", textContent: code }));
  }
  article.append(box);
  setStatus(article, "error", "error");
}

/** Keeps the conversation scrolled to its end while the user has not scrolled up. */
function scrollDown(force = false) {
  const c = $("conversation");
  if (force || state.follow) c.scrollTop = c.scrollHeight;
}

function requestFields() {
  const body = {};
  if (!$("model-decides").checked) {
    body.modalities = ["text", ...[...document.querySelectorAll("#output-boxes input:checked")].map((i) => i.value)];
  }
  const seed = $("seed").value.trim();
  if (seed) body.seed = Number(seed);
  if (!$("task-row").hidden && $("task").value) {
    body.task = $("task").value;
    if ($("box-overlay").checked) body.box_overlay = true;
  }
  const extra = $("extra").value.trim();
  if (extra) {
    let parsed;
    try {
      parsed = JSON.parse(extra);
    } catch (e) {
      throw new Error(`More request fields: not JSON (${e.message})`);
    }
    if (!parsed || typeof parsed !== "object" || Array.isArray(parsed)) {
      throw new Error("More request fields: write a JSON object, e.g. {\"seed\": 1}");
    }
    Object.assign(body, parsed);
  }
  return body;
}

/** The SSE body -> the JSON of each `data:` event ("[DONE]" ends it). */
async function* events(stream) {
  const reader = stream.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  const parse = (block) => {
    const data = block.split(/\r?\n/).filter((l) => l.startsWith("data:")).map((l) => l.slice(5).replace(/^ /, ""));
    return data.length ? data.join("\n") : null;
  };
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let m;
    while ((m = /\r?\n\r?\n/.exec(buffer))) {
      const data = parse(buffer.slice(0, m.index));
      buffer = buffer.slice(m.index + m[0].length);
      if (data === "[DONE]") return;
      if (data !== null) yield JSON.parse(data);
    }
  }
  const data = parse(buffer + decoder.decode());
  if (data && data !== "[DONE]") yield JSON.parse(data);
}

/** Sends the composer's message (and attachments); `overrides`: request fields for this request only. */
async function send(event, overrides = {}) {
  event?.preventDefault();
  if (state.controller) return;
  const text = $("prompt").value.trim();
  if (!text && !state.attachments.length) return;
  if (!state.model) {
    showBanner("Not connected to a model yet.", loadModel);
    return;
  }
  let fields;
  try {
    fields = { ...requestFields(), ...overrides };
  } catch (e) {
    showBanner(e.message);
    return;
  }
  showBanner(null);
  const attachments = state.attachments;
  const userContent = attachments.length
    ? [...attachments.map(contentPart), ...(text ? [{ type: "text", text }] : [])]
    : text;
  const userMessage = { role: "user", content: userContent };
  const userImages = attachments.filter((a) => a.kind === "image").map((a) => a.displayUrl);
  const requestImages = [...state.historyImages, ...userImages];

  const userArticle = addMessage("user");
  const body = userArticle.querySelector(".body");
  if (attachments.length) {
    const media = Object.assign(document.createElement("div"), { className: "user-media" });
    media.append(...attachments.map((a) => mediaPreview(a)));
    body.append(media);
  }
  if (text) body.append(Object.assign(document.createElement("p"), { textContent: text }));
  $("prompt").value = "";
  state.attachments = [];
  showAttachments();

  const article = addMessage("assistant");
  const view = new AnswerView(article, requestImages);
  setStatus(article, "sending…", "sending");
  scrollDown(true);
  const controller = new AbortController();
  state.controller = controller;
  setBusy(true);
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: headers({ "Content-Type": "application/json", Accept: "text/event-stream" }),
      body: JSON.stringify({ model: state.model.id, messages: [...state.history, userMessage], stream: true,
        ...fields }),
      signal: controller.signal,
    });
    if (!response.ok) throw await failure(response);
    if ((response.headers.get("content-type") || "").includes("text/event-stream")) {
      setStatus(article, "streaming…", "streaming");
      for await (const chunk of events(response.body)) {
        if (chunk.error) throw new ApiError(0, chunk.error);
        const choice = chunk.choices?.[0];
        if (!choice) continue;
        view.applyMessage({ ...choice.delta, content: undefined });
        if (choice.delta?.content) view.appendContent(choice.delta.content);
        scrollDown();
      }
    } else { // a server that answered without streaming: the whole message at once
      const whole = await response.json();
      view.applyMessage(whole.choices?.[0]?.message || {});
    }
    view.finish();
    setStatus(article, "", "done");
    state.history.push(userMessage, { role: "assistant", content: view.content });
    state.historyImages.push(...userImages, ...[...view.slots.values()]
      .filter((s) => s.label === "image").sort((a, b) => a.number - b.number)
      .map((s) => s.media?.src || s.artifactUrl));
  } catch (e) {
    if (e.name === "AbortError") {
      setStatus(article, "stopped (not kept in the conversation)", "stopped");
    } else {
      if (e instanceof TypeError) e.message = `Could not reach the server (${e.message}).`;
      showError(article, e);
      userArticle.classList.add("not-sent");
      if (e.status === 401) askForKey(e.message);
    }
  } finally {
    state.controller = null;
    setBusy(false);
    scrollDown();
  }
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").hidden = !busy;
  document.body.classList.toggle("busy", busy);
}

function clearConversation() {
  state.controller?.abort();
  state.history = [];
  state.historyImages = [];
  $("conversation").replaceChildren();
}

// ---- wiring -----------------------------------------------------------------------------------------
function wire() {
  $("composer").addEventListener("submit", (e) => send(e));
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) send(e);
  });
  $("stop").addEventListener("click", () => state.controller?.abort());
  $("key-use").addEventListener("click", useKey);
  $("key-input").addEventListener("keydown", (e) => {
    if (e.key === "Enter") useKey();
  });
  $("file-input").addEventListener("change", (e) => {
    attach([...e.target.files]);
    e.target.value = "";
  });
  $("model-decides").addEventListener("change", (e) => {
    document.querySelectorAll("#output-boxes input").forEach((i) => { i.disabled = e.target.checked; });
  });
  $("clear").addEventListener("click", clearConversation);
  const conversation = $("conversation");
  conversation.addEventListener("scroll", () => {
    state.follow = conversation.scrollHeight - conversation.scrollTop - conversation.clientHeight < 80;
  });
  for (const type of ["load", "loadedmetadata"]) { // media grow the conversation when they arrive
    conversation.addEventListener(type, () => scrollDown(), true);
  }
  document.querySelectorAll(".example").forEach((b) => b.addEventListener("click", () => {
    // an example asks for its medium in this request only (when the model makes it); the controls stay as set
    const outputs = state.model?.architecture?.output_modalities || [];
    $("prompt").value = b.dataset.text;
    send(null, outputs.includes(b.dataset.modality) ? { modalities: ["text", b.dataset.modality] } : {});
  }));
  let depth = 0;
  const drop = $("drop");
  window.addEventListener("dragenter", (e) => {
    if (![...(e.dataTransfer?.types || [])].includes("Files")) return;
    depth += 1;
    drop.hidden = false;
  });
  window.addEventListener("dragleave", () => {
    depth = Math.max(0, depth - 1);
    if (!depth) drop.hidden = true;
  });
  window.addEventListener("dragover", (e) => e.preventDefault());
  window.addEventListener("drop", (e) => {
    e.preventDefault();
    depth = 0;
    drop.hidden = true;
    if (e.dataTransfer?.files?.length) attach([...e.dataTransfer.files]);
  });
}

wire();
loadModel();
