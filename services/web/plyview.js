// A point cloud on the page: a PLY file (what the API returns for coloured point clouds, `application/ply`) read here and
// shown as a turntable, the points projected onto a 2D canvas and turned about the vertical axis. No WebGL, no
// viewer library (nothing is fetched from a CDN): a few hundred to a few thousand points draw in well under a frame.
// Meshes (GLB) are not drawn: the page offers their download.

const SIZES = { char: 1, uchar: 1, int8: 1, uint8: 1, short: 2, ushort: 2, int16: 2, uint16: 2,
  int: 4, uint: 4, int32: 4, uint32: 4, float: 4, float32: 4, double: 8, float64: 8 };

function reader(view, type, little) {
  switch (type) {
    case "char": case "int8": return (o) => view.getInt8(o);
    case "uchar": case "uint8": return (o) => view.getUint8(o);
    case "short": case "int16": return (o) => view.getInt16(o, little);
    case "ushort": case "uint16": return (o) => view.getUint16(o, little);
    case "int": case "int32": return (o) => view.getInt32(o, little);
    case "uint": case "uint32": return (o) => view.getUint32(o, little);
    case "float": case "float32": return (o) => view.getFloat32(o, little);
    default: return (o) => view.getFloat64(o, little);
  }
}

/** PLY bytes (ascii or binary, either byte order; a `vertex` element with x, y, z and optional uchar red, green,
 * blue; elements before it of fixed-size properties) -> {count, xyz: Float32Array(3 N), rgb: Uint8Array(3 N)}
 * (white where the file has no colours). Throws an Error saying what is wrong with the file. */
export function parsePly(buffer) {
  const bytes = new Uint8Array(buffer);
  const end = new TextDecoder("latin1").decode(bytes.subarray(0, Math.min(bytes.length, 4096))).indexOf("end_header");
  if (end < 0 || !new TextDecoder().decode(bytes.subarray(0, 3)).startsWith("ply")) throw new Error("not a PLY file");
  let bodyAt = end + "end_header".length;
  while (bodyAt < bytes.length && bytes[bodyAt] !== 10) bodyAt++;
  bodyAt++;
  const header = new TextDecoder("latin1").decode(bytes.subarray(0, end)).split(/\r?\n/);
  let format = "";
  const elements = [];
  for (const line of header) {
    const w = line.trim().split(/\s+/);
    if (w[0] === "format") format = w[1];
    else if (w[0] === "element") elements.push({ name: w[1], count: Number(w[2]), props: [] });
    else if (w[0] === "property" && elements.length) {
      if (w[1] === "list") throw new Error(`PLY list property ${w[4]} of ${elements.at(-1).name}: not a point cloud`);
      elements.at(-1).props.push({ type: w[1], name: w[2] });
    }
  }
  const vertex = elements.find((e) => e.name === "vertex");
  if (!vertex || !["x", "y", "z"].every((n) => vertex.props.some((p) => p.name === n))) {
    throw new Error("PLY file without vertex x, y, z");
  }
  const n = vertex.count, xyz = new Float32Array(3 * n), rgb = new Uint8Array(3 * n).fill(255);
  const slot = (name) => ["x", "y", "z", "red", "green", "blue"].indexOf(name);
  if (format === "ascii") {
    const lines = new TextDecoder("latin1").decode(bytes.subarray(bodyAt)).split(/\r?\n/);
    let row = 0;
    for (const e of elements) {
      if (e !== vertex) { row += e.count; continue; }
      for (let i = 0; i < n; i++) {
        const vals = lines[row + i].trim().split(/\s+/).map(Number);
        e.props.forEach((p, k) => {
          const s = slot(p.name);
          if (s >= 0 && s < 3) xyz[3 * i + s] = vals[k];
          else if (s >= 3) rgb[3 * i + s - 3] = vals[k];
        });
      }
      break;
    }
    return { count: n, xyz, rgb };
  }
  if (format !== "binary_little_endian" && format !== "binary_big_endian") throw new Error(`PLY format ${format}?`);
  const view = new DataView(buffer), little = format === "binary_little_endian";
  let at = bodyAt;
  for (const e of elements) {
    const stride = e.props.reduce((s, p) => s + (SIZES[p.type] || 0), 0);
    if (e !== vertex) { at += stride * e.count; continue; }
    if (at + stride * n > buffer.byteLength) throw new Error("PLY file shorter than its header says");
    let off = 0;
    const fields = e.props.map((p) => { const f = { s: slot(p.name), off, read: reader(view, p.type, little) };
      off += SIZES[p.type] || 0; return f; }).filter((f) => f.s >= 0);
    for (let i = 0; i < n; i++) {
      const base = at + i * stride;
      for (const f of fields) {
        if (f.s < 3) xyz[3 * i + f.s] = f.read(base + f.off);
        else rgb[3 * i + f.s - 3] = f.read(base + f.off);
      }
    }
    break;
  }
  return { count: n, xyz, rgb };
}

/** Draws `cloud` on `canvas` turned by `angle` radians about the vertical (y) axis, with a fixed 20-degree tilt
 * towards the viewer, far points first; scaled to fit the canvas from the cloud's own extent. */
export function drawCloud(canvas, cloud, angle) {
  const ctx = canvas.getContext("2d"), W = canvas.width, H = canvas.height;
  const { count, xyz, rgb } = cloud;
  let cx = 0, cy = 0, cz = 0;
  for (let i = 0; i < count; i++) { cx += xyz[3 * i]; cy += xyz[3 * i + 1]; cz += xyz[3 * i + 2]; }
  cx /= count || 1; cy /= count || 1; cz /= count || 1;
  let r = 1e-6;
  for (let i = 0; i < count; i++) {
    r = Math.max(r, Math.hypot(xyz[3 * i] - cx, xyz[3 * i + 1] - cy, xyz[3 * i + 2] - cz));
  }
  const ca = Math.cos(angle), sa = Math.sin(angle), ct = Math.cos(0.35), st = Math.sin(0.35);
  const pts = [];
  for (let i = 0; i < count; i++) {
    const x = xyz[3 * i] - cx, y = xyz[3 * i + 1] - cy, z = xyz[3 * i + 2] - cz;
    const x1 = ca * x + sa * z, z1 = -sa * x + ca * z;
    const y2 = ct * y - st * z1, z2 = st * y + ct * z1;
    pts.push([x1, y2, z2, i]);
  }
  pts.sort((a, b) => a[2] - b[2]);
  const scale = 0.42 * Math.min(W, H) / r, dot = Math.max(2, Math.round(Math.min(W, H) / 60));
  ctx.fillStyle = "#101418";
  ctx.fillRect(0, 0, W, H);
  for (const [x, y, z, i] of pts) {
    const shade = 0.65 + 0.35 * (z / r + 1) / 2; // nearer points brighter
    ctx.fillStyle = `rgb(${rgb[3 * i] * shade | 0}, ${rgb[3 * i + 1] * shade | 0}, ${rgb[3 * i + 2] * shade | 0})`;
    ctx.fillRect(W / 2 + x * scale - dot / 2, H / 2 - y * scale - dot / 2, dot, dot);
  }
}

/** A <canvas> showing `cloud` as a turntable (one turn in `period` ms; a still view where the user asks for reduced
 * motion); it stops once the canvas has left the page. `canvas.dataset.angle` holds the angle drawn last. */
export function turntable(cloud, { size = 256, period = 8000, label = "point cloud" } = {}) {
  const canvas = document.createElement("canvas");
  canvas.width = canvas.height = size;
  canvas.className = "ply-turntable";
  canvas.setAttribute("role", "img");
  canvas.setAttribute("aria-label", `${label}: ${cloud.count} points, turning`);
  const still = window.matchMedia?.("(prefers-reduced-motion: reduce)").matches;
  const t0 = performance.now();
  let shown = false;
  const frame = (now) => {
    const angle = still ? 0.6 : (2 * Math.PI * (now - t0)) / period;
    drawCloud(canvas, cloud, angle);
    canvas.dataset.angle = angle.toFixed(3);
    shown ||= canvas.isConnected;
    if (!still && (!shown || canvas.isConnected)) requestAnimationFrame(frame);
  };
  frame(t0);
  return canvas;
}
