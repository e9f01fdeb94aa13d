// The blipdex search page: a plain ES module, no build step, no external URLs.
// It speaks the JSON API under /api/v1 (see /openapi.json).

const PAGE = 24; // hits per page (top_k)
const RERANK_N = PAGE; // with the rerank switch on, ITM reranks the first page of the ranking
const MAX_WINDOW = 10000; // offset + top_k limit of the API
const THUMB = 256; // the thumbnail route's default size
const TOKEN_KEY = "blipdex-token";

const $ = (sel) => document.querySelector(sel);

function el(tag, props = {}, ...kids) {
  const e = document.createElement(tag);
  Object.assign(e, props);
  e.append(...kids.filter((k) => k != null));
  return e;
}

// query: {kind: "text", text} | {kind: "browse"} | {kind: "id", imageId, label} | {kind: "image", data, label}
const state = { query: null, offset: 0, seq: 0, blobs: [] };

const token = () => localStorage.getItem(TOKEN_KEY) || "";

function headers(json) {
  const h = {};
  if (json) h["Content-Type"] = "application/json";
  const t = token();
  if (t) h.Authorization = `Bearer ${t}`;
  return h;
}

/** fetch + JSON; a non-2xx answer throws the message of the API's error body. */
async function api(method, path, body) {
  const res = await fetch(path, {
    method,
    headers: headers(body !== undefined),
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  let data = null;
  try {
    data = await res.json();
  } catch {
    // not JSON (e.g. a proxy's error page)
  }
  if (!res.ok) {
    const err = data && data.error;
    const msg = (err && err.message) || res.statusText || "request failed";
    throw new Error(`${(err && err.code) || res.status}: ${msg}`);
  }
  return data;
}

function setStatus(text, isError = false) {
  const s = $("#status");
  s.textContent = text;
  s.classList.toggle("error", isError);
}

function filters() {
  const f = {};
  const v = (id) => $(id).value.trim();
  if (v("#folder")) f.path_prefix = v("#folder");
  if (v("#taken-after")) f.taken_after = v("#taken-after");
  if (v("#taken-before")) f.taken_before = v("#taken-before");
  if (v("#camera")) f.camera = v("#camera");
  if ($("#has-location").checked) f.has_location = true;
  if ($("#sort").value !== "score") f.sort = $("#sort").value;
  const min = parseFloat(v("#min-score"));
  if (Number.isFinite(min)) f.min_score = min;
  return f;
}

const fileName = (path) => path.split(/[\\/]/).pop() || path;
const fmt = (x) => (typeof x === "number" ? x.toFixed(3) : "–");

function fit(w, h) {
  if (!(w > 0 && h > 0)) return [THUMB, THUMB];
  const s = Math.min(1, THUMB / Math.max(w, h));
  return [Math.max(1, Math.round(w * s)), Math.max(1, Math.round(h * s))];
}

/** <img> cannot send an Authorization header: with a token, thumbnails come as blob URLs. */
function loadThumb(img, url) {
  img.addEventListener("error", () => img.classList.add("broken"), { once: true });
  if (!token()) {
    img.src = url;
    return;
  }
  fetch(url, { headers: headers(false) })
    .then((r) => (r.ok ? r.blob() : Promise.reject(new Error(String(r.status)))))
    .then((b) => {
      const u = URL.createObjectURL(b);
      state.blobs.push(u);
      img.src = u;
    })
    .catch(() => img.classList.add("broken"));
}

function card(hit) {
  const name = fileName(hit.path);
  const [w, h] = fit(hit.width, hit.height);
  const img = el("img", { alt: hit.caption || name, width: w, height: h, loading: "lazy", decoding: "async" });
  loadThumb(img, hit.thumbnail);

  // Browsing by date scores nothing.
  const score = state.query && state.query.kind === "browse"
    ? null
    : el("span", { className: "score", title: "ITC score" }, `score ${fmt(hit.itc_score)}`);
  const itm = hit.itm_score != null ? el("span", { className: "itm", title: "ITM score (reranked)" }, `ITM ${fmt(hit.itm_score)}`) : null;
  const copies = hit.other_paths && hit.other_paths.length
    ? el("span", { className: "copies", title: hit.other_paths.join("\n") }, `+${hit.other_paths.length} copies`)
    : null;
  const meta = [];
  if (hit.taken_at) meta.push(el("time", { dateTime: hit.taken_at, className: "taken" }, hit.taken_at.replace("T", " ").slice(0, 16) + (hit.taken_offset ? ` ${hit.taken_offset}` : "")));
  if (hit.camera) meta.push(el("span", { className: "camera-name" }, hit.camera));
  if (hit.latitude != null && hit.longitude != null) meta.push(el("span", { className: "geo", title: "location" }, `${hit.latitude.toFixed(2)}, ${hit.longitude.toFixed(2)}`));

  const caption = el("p", { className: "caption", hidden: true });
  const problem = el("p", { className: "hit-error", hidden: !hit.error, textContent: hit.error || "" });
  const capBtn = el("button", { type: "button", className: "caption-btn" }, "Caption");
  const moreBtn = el("button", { type: "button", className: "more-btn" }, "More like this");
  capBtn.setAttribute("aria-label", `Caption ${name}`);
  moreBtn.setAttribute("aria-label", `More like ${name}`);

  const li = el("li", { className: "hit", tabIndex: 0 },
    el("div", { className: "thumb" }, img),
    el("div", { className: "scores" }, score, itm, copies),
    el("p", { className: "path", title: hit.path }, name),
    meta.length ? el("p", { className: "meta" }, ...meta) : null,
    caption, problem,
    el("div", { className: "actions" }, capBtn, moreBtn));
  li.dataset.imageId = String(hit.image_id);
  li.dataset.path = hit.path;

  let busy = false;
  capBtn.addEventListener("click", async () => {
    if (busy) return;
    busy = true;
    li.setAttribute("aria-busy", "true");
    capBtn.textContent = "Captioning…";
    try {
      const r = await api("POST", "/api/v1/caption", { image_id: hit.image_id });
      caption.textContent = r.text;
      caption.hidden = false;
      img.alt = r.text;
      problem.hidden = true;
    } catch (e) {
      problem.textContent = e.message;
      problem.hidden = false;
    } finally {
      busy = false;
      li.removeAttribute("aria-busy");
      capBtn.textContent = "Caption";
    }
  });
  moreBtn.addEventListener("click", () => search({ kind: "id", imageId: hit.image_id, label: name }));
  return li;
}

function render(hits) {
  const grid = $("#grid");
  const hadFocus = grid.contains(document.activeElement) || document.activeElement === document.body;
  state.blobs.forEach((u) => URL.revokeObjectURL(u));
  state.blobs = [];
  grid.replaceChildren(...hits.map(card));
  if (hadFocus && grid.firstElementChild && state.query && state.query.kind !== "text") grid.firstElementChild.focus();
}

function describe(q) {
  if (q.kind === "text") return `“${q.text}”`;
  if (q.kind === "browse") return $("#sort").value === "date_asc" ? "photos by date, oldest first" : "photos by date, newest first";
  return q.kind === "id" ? `photos like ${q.label}` : `photos like the image ${q.label}`;
}

async function run() {
  const q = state.query;
  if (!q) return;
  const seq = ++state.seq;
  const offset = state.offset;
  const base = { top_k: PAGE, offset, filters: filters() };
  let path;
  let body;
  if (q.kind === "text") {
    path = "/api/v1/search/text";
    body = { ...base, query: q.text, rerank_top_n: $("#rerank").checked ? RERANK_N : 0 };
  } else if (q.kind === "browse") {
    // A blank query with a date order: every photo the filters keep (no score to threshold).
    if (!base.filters.sort) {
      setStatus("Sort by date to browse, or type what to look for.");
      return;
    }
    path = "/api/v1/search/text";
    const f = { ...base.filters };
    delete f.min_score;
    body = { ...base, filters: f, query: "" };
  } else {
    path = "/api/v1/search/image";
    body = { ...base, ...(q.kind === "id" ? { image_id: q.imageId } : { image: q.data }) };
  }
  setStatus(`Searching ${describe(q)}…`);
  $("#grid").setAttribute("aria-busy", "true");
  try {
    const res = await api("POST", path, body);
    if (seq !== state.seq) return; // a newer search answered or is on its way
    const hits = res.hits || [];
    render(hits);
    const range = hits.length ? `results ${offset + 1}–${offset + hits.length}` : "no results";
    const reranked = q.kind === "text" && body.rerank_top_n ? " · reranked by ITM" : "";
    setStatus(`${describe(q)}: ${range}${reranked} · generation ${res.generation}`);
    $("#prev").disabled = offset === 0;
    $("#next").disabled = hits.length < PAGE || offset + 2 * PAGE > MAX_WINDOW;
    $("#page").textContent = hits.length || offset ? `Page ${offset / PAGE + 1}` : "";
  } catch (e) {
    if (seq === state.seq) setStatus(e.message, true);
  } finally {
    if (seq === state.seq) $("#grid").removeAttribute("aria-busy");
  }
}

function search(query) {
  state.query = query;
  state.offset = 0;
  return run();
}

function rerunWithFilters() {
  if (!state.query) return;
  state.offset = 0;
  run();
}

function base64(file) {
  return new Promise((resolve, reject) => {
    const r = new FileReader();
    r.onload = () => {
      const s = String(r.result);
      resolve(s.slice(s.indexOf(",") + 1));
    };
    r.onerror = () => reject(r.error);
    r.readAsDataURL(file);
  });
}

async function searchFile(file) {
  if (!file) return;
  if (file.type && !file.type.startsWith("image/")) {
    setStatus(`${file.name} is not an image`, true);
    return;
  }
  try {
    await search({ kind: "image", data: await base64(file), label: file.name });
  } catch (e) {
    setStatus(e.message, true);
  }
}

async function loadFacets() {
  try {
    const f = await api("GET", "/api/v1/facets");
    $("#cameras").replaceChildren(...(f.cameras || []).map((c) => el("option", { value: c.camera, label: `${c.camera} (${c.images})` })));
    for (const id of ["#taken-after", "#taken-before"]) {
      if (f.taken_min) $(id).min = f.taken_min.slice(0, 10);
      if (f.taken_max) $(id).max = f.taken_max.slice(0, 10);
    }
  } catch (e) {
    setStatus(`Filters unavailable: ${e.message}`, true);
  }
}

async function checkHealth() {
  try {
    const h = await api("GET", "/api/v1/health");
    if (h.status !== "serving") {
      setStatus("The model is loading; searches work once it is ready…");
      setTimeout(checkHealth, 2000);
    }
  } catch (e) {
    setStatus(`Server unreachable: ${e.message}`, true);
  }
}

function init() {
  $("#search-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const text = $("#q").value.trim();
    if (text) search({ kind: "text", text });
    else if ($("#sort").value !== "score") search({ kind: "browse" });
    else setStatus("Type what to look for, drop an image on the page, or sort by date to browse.");
  });
  $("#rerank").addEventListener("change", () => {
    if (state.query && state.query.kind === "text") rerunWithFilters();
  });
  $("#image-file").addEventListener("change", (e) => {
    searchFile(e.target.files[0]);
    e.target.value = "";
  });

  const filterIds = ["#folder", "#taken-after", "#taken-before", "#camera", "#has-location", "#sort", "#min-score"];
  for (const id of filterIds) $(id).addEventListener("change", rerunWithFilters);
  $("#filters").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && e.target.matches("input:not([type=checkbox]):not(#token)")) {
      e.preventDefault();
      rerunWithFilters();
    }
  });
  $("#apply").addEventListener("click", rerunWithFilters);

  $("#prev").addEventListener("click", () => {
    state.offset = Math.max(0, state.offset - PAGE);
    run();
  });
  $("#next").addEventListener("click", () => {
    state.offset += PAGE;
    run();
  });

  const tok = $("#token");
  tok.value = token();
  const saveToken = () => {
    if (tok.value.trim() === token()) return;
    if (tok.value.trim()) localStorage.setItem(TOKEN_KEY, tok.value.trim());
    else localStorage.removeItem(TOKEN_KEY);
    loadFacets();
    if (state.query) run();
  };
  tok.addEventListener("change", saveToken);
  $("#token-form").addEventListener("submit", (e) => {
    e.preventDefault();
    saveToken();
  });

  document.addEventListener("keydown", (e) => {
    const t = e.target;
    const typing = t.matches && t.matches("input, textarea, select");
    if (e.key === "/" && !typing && !e.ctrlKey && !e.metaKey && !e.altKey) {
      e.preventDefault();
      $("#q").focus();
      $("#q").select();
    } else if (e.key === "Escape" && (!typing || t.id === "q")) {
      e.preventDefault();
      $("#q").value = "";
      $("#q").focus();
    } else if (t.classList && t.classList.contains("hit") && e.key.startsWith("Arrow")) {
      const next = e.key === "ArrowRight" || e.key === "ArrowDown" ? t.nextElementSibling : t.previousElementSibling;
      if (next) {
        e.preventDefault();
        next.focus();
      }
    }
  });

  const hint = $("#drop-hint");
  const hasFiles = (e) => e.dataTransfer && Array.from(e.dataTransfer.types).includes("Files");
  document.addEventListener("dragover", (e) => {
    if (!hasFiles(e)) return;
    e.preventDefault();
    hint.hidden = false;
  });
  document.addEventListener("dragleave", (e) => {
    if (!e.relatedTarget) hint.hidden = true;
  });
  document.addEventListener("drop", (e) => {
    if (!hasFiles(e)) return;
    e.preventDefault();
    hint.hidden = true;
    searchFile(e.dataTransfer.files[0]);
  });

  checkHealth();
  loadFacets();
  $("#q").focus();
}

init();
