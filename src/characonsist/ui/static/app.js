// characonsist ui: the story editor, runs with live progress, the gallery and exports.
// Plain JavaScript, no framework, nothing loaded from elsewhere. Every text from the user or the server is
// shown with textContent (never parsed as HTML).
"use strict";

const $ = (sel, root = document) => root.querySelector(sel);
const $$ = (sel, root = document) => Array.from(root.querySelectorAll(sel));
const MAX_SEED = 4294967295;

let info = null;                 // /api/info
let story = null;                // the document being edited
let gallery = [];                // the story's groups as generated
let currentJob = null;
let previews = {};               // live previews of the running job: group -> image index -> data URL
window.uiEvents = [];            // every event seen, for tests and the curious (newest last; previews without pictures)
window.previewsShown = 0;        // how many preview pictures were put in a slot (for tests)
const PREVIEWS_KEY = "characonsist-previews";

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (v !== null && v !== undefined && v !== false) node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children) if (c) node.append(c);
  return node;
}

async function api(path, data) {
  const opts = data === undefined ? {} : {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(data)};
  const res = await fetch(path, opts);
  const body = await res.json().catch(() => ({problems: [`${res.status} ${res.statusText}`]}));
  if (!res.ok) { const e = new Error((body.problems || []).join("\n")); e.problems = body.problems || []; throw e; }
  return body;
}

function emptyImage() { return {background: "", character: "", action: "", caption: "", seed: null, height: null, width: null}; }
function emptyStory() {
  return {title: "", character: "", scenes: [{name: "", background: "", images: [emptyImage(), emptyImage()]}]};
}

// ------------------------------------------------------------------------------------------ the editor
function status(text, error = false) { const s = $("#status"); s.textContent = text; s.className = "status" + (error ? " error" : ""); }

function showProblems(problems) {
  const list = $("#problems");
  list.replaceChildren(...(problems || []).map(p => el("li", {text: p})));
  $$(".bad-field").forEach(n => n.classList.remove("bad-field"));
  for (const p of problems || []) {      // "story.yaml: scenes[0].frames[1]: ..." -> that row
    const m = /scenes\[(\d+)\]\.(identity|frames\[(\d+)\])/.exec(p);
    if (!m) continue;
    const row = $(`.scene[data-s="${m[1]}"] .row[data-i="${m[2] === "identity" ? 0 : Number(m[3]) + 1}"]`);
    if (row) $$("input", row).forEach(i => i.classList.add("bad-field"));
  }
}

function splitLine(text) {
  const parts = text.split("#");
  return parts.length === 3 ? parts.map(p => p.trim()) : null;
}

function numberOrNull(value) { return value === "" || value === null ? null : Number(value); }

function rowView(s, i, image) {
  const scene = story.scenes[s];
  const role = i === 0 ? "identity" : `frame ${i}`;
  const lineMode = $("#line-mode").checked;
  const field = (key, placeholder) => el("input", {class: key, value: image[key] || "", placeholder,
    oninput: e => { image[key] = e.target.value; changed(); }});
  const cells = [el("span", {class: "role", text: role})];
  if (lineMode) {
    const line = el("input", {class: "line", value: `${image.background}#${image.character}#${image.action}`,
      placeholder: "background#character#action", oninput: e => {
        const parts = splitLine(e.target.value);
        e.target.classList.toggle("bad-field", !parts);
        if (parts) { [image.background, image.character, image.action] = parts; changed(); }
      }});
    cells.push(line);
  } else {
    cells.push(field("background", scene.background || "background"), field("character", story.character || "character"),
               field("action", "action"));
  }
  cells.push(field("caption", "caption"));
  const seedBox = el("input", {class: "seed-value", type: "number", min: 0, max: MAX_SEED, value: image.seed ?? "",
    placeholder: image.shownSeed ?? "auto", title: "this image's seed (locked) or the run's (auto)",
    oninput: e => { image.seed = numberOrNull(e.target.value); lock.checked = image.seed !== null; changed(); }});
  const lock = el("input", {type: "checkbox", class: "seed-lock", title: "lock this seed", checked: image.seed !== null,
    onchange: e => {
      if (e.target.checked) image.seed = numberOrNull(seedBox.value) ?? image.shownSeed ?? Number($("#seed").value || 0);
      else image.seed = null;
      seedBox.value = image.seed ?? ""; changed();
    }});
  const reroll = el("button", {type: "button", class: "reroll", title: "new random seed (locked)", text: "roll",
    onclick: () => { image.seed = Math.floor(Math.random() * MAX_SEED); seedBox.value = image.seed; lock.checked = true; changed(); }});
  cells.push(el("span", {class: "seed"}, seedBox, lock, reroll));
  const size = (key) => el("input", {class: key, type: "number", min: 16, step: info?.limits.multiple || 16, value: image[key] ?? "",
    placeholder: key[0], title: `this image's ${key} (blank: the run's)`, oninput: e => { image[key] = numberOrNull(e.target.value); changed(); }});
  cells.push(el("span", {class: "size"}, size("width"), size("height")));
  cells.push(el("button", {type: "button", class: "icon remove-row", title: "remove this image", text: "✕",
    onclick: () => { scene.images.splice(i, 1); render(); changed(); }}));
  return el("div", {class: "row" + (lineMode ? " line-mode" : ""), "data-i": i}, ...cells);
}

// The identity's picture: the upload goes to the server as bytes; the story names the stored copy
// (../pictures/<sha>.<ext>, relative to the story's folder), which is what the command line reads too.
function storedPicture(ref) {
  const m = /^\.\.\/pictures\/([0-9a-f]{16}\.(?:png|jpg|webp|gif|bmp))$/.exec((ref || "").trim());
  return m ? m[1] : null;
}

async function uploadPicture(file, image) {
  const limit = info?.pictures?.max_bytes;
  if (limit && file.size > limit) {
    showProblems([`picture: ${file.name}: ${(file.size / 2 ** 20).toFixed(1)} MiB is more than the UI takes (${limit / 2 ** 20} MiB); scale it down or save it as JPEG`]);
    status(`picture ${file.name} refused`, true);
    return;
  }
  status(`uploading ${file.name}…`);
  let ok = false, body;
  try {
    const res = await fetch(`/api/pictures?filename=${encodeURIComponent(file.name)}`,
      {method: "POST", headers: {"Content-Type": "application/octet-stream"}, body: file});
    ok = res.ok;
    body = await res.json().catch(() => ({problems: [`${res.status} ${res.statusText}`]}));
  } catch (e) { body = {problems: [`picture: ${file.name}: cannot upload it (${e.message})`]}; }
  if (!ok) { showProblems(body.problems); status(`picture ${file.name} refused`, true); return; }
  image.image = body.image;
  image.pictureInfo = `${body.name}, ${body.width}x${body.height}`;
  render(); changed(); showProblems([]);
  status(`picture ${body.name}: ${body.width}x${body.height} ${body.format}, kept as pictures/${body.file}`);
}

function pictureView(image) {
  const ref = image.image || "";
  const file = storedPicture(ref);
  const input = el("input", {type: "file", class: "picture-input", accept: "image/png,image/jpeg,image/webp,image/gif,image/bmp",
    onchange: e => { if (e.target.files[0]) uploadPicture(e.target.files[0], image); e.target.value = ""; }});
  const cells = [el("span", {class: "role", text: "picture"}),
    el("label", {class: "file picture-choose", title: "or drop a picture on this line"}, ref ? "another picture…" : "use a picture of the character…", input)];
  if (file) cells.push(el("img", {class: "picture-thumb", src: `/pictures/${file}`, alt: "the identity's picture"}));
  if (ref) {
    cells.push(el("span", {class: "picture-name small" + (file ? "" : " missing"),
      text: file ? (image.pictureInfo || `pictures/${file}`) : `${ref}: not uploaded to this UI; choose the file`}));
    cells.push(el("button", {type: "button", class: "icon remove-picture", title: "no picture: generate the identity", text: "✕",
      onclick: () => { delete image.image; delete image.pictureInfo; render(); changed(); }}));
  }
  cells.push(el("span", {class: "muted small picture-hint", text: ref
    ? "The identity is this picture; the row above still captions it (background / character / action): the masks need the character's words."
    : "Optional: your own drawing or photo of the character as the identity (PNG, JPEG, WebP, GIF, BMP)."}));
  const row = el("div", {class: "picture-row"}, ...cells);
  row.addEventListener("dragover", e => { e.preventDefault(); row.classList.add("drop"); });
  row.addEventListener("dragleave", () => row.classList.remove("drop"));
  row.addEventListener("drop", e => {
    e.preventDefault(); row.classList.remove("drop");
    if (e.dataTransfer.files[0]) uploadPicture(e.dataTransfer.files[0], image);
  });
  return row;
}

function sceneView(s) {
  const scene = story.scenes[s];
  const head = el("div", {class: "scene-head"},
    el("label", {}, "Scene name", el("input", {class: "scene-name", value: scene.name, placeholder: `scene ${s + 1}`,
      oninput: e => { scene.name = e.target.value; changed(); }})),
    el("label", {}, "Background (every image's, unless a row gives its own)", el("input", {class: "scene-background",
      value: scene.background, placeholder: "e.g. a sunny beach", oninput: e => { scene.background = e.target.value; changed(); }})),
    el("button", {type: "button", class: "remove-scene", text: "remove scene", onclick: () => { story.scenes.splice(s, 1); render(); changed(); }}));
  const rows = scene.images.flatMap((image, i) => i === 0 ? [rowView(s, i, image), pictureView(image)] : [rowView(s, i, image)]);
  const add = el("button", {type: "button", class: "add-frame", text: "+ frame", onclick: () => { scene.images.push(emptyImage()); render(); changed(); }});
  return el("div", {class: "scene", "data-s": s}, head, ...rows, add);
}

function render() {
  $("#title").value = story.title || "";
  showName();
  $("#character").value = story.character || "";
  $("#scenes").replaceChildren(...story.scenes.map((_, s) => sceneView(s)));
  backgroundInfo();
}

function backgroundInfo() {
  if (!story) return;
  const keep = $("#background-mode").value === "keep";
  const modes = story.scenes.map(scene => {
    const bgs = new Set(scene.images.map(im => (im.background || scene.background || "").trim()));
    return !keep ? "changed" : bgs.size <= 1 ? "kept" : "mixed";
  });
  $("#bg-info").textContent = `background: ${modes.map((m, i) => `scene ${i + 1} ${m}`).join(", ")}`;
}

function slug(text) { return text.toLowerCase().replace(/[^a-z0-9]+/g, "-").replace(/^-+|-+$/g, "").slice(0, 40); }

function storyName() {   // the name typed, else the title's slug (the field's placeholder shows it): a Check never fixes it
  return $("#name").value.trim() || slug(story.title || "") || "story";
}

function showName() { $("#name").placeholder = `${slug(story.title || "") || "story"} (from the title)`; }

function changed() {
  backgroundInfo();
  try { localStorage.setItem("characonsist-draft", JSON.stringify({name: $("#name").value, story, settings: settings()})); } catch (e) { /* private mode */ }
}

// ------------------------------------------------------------------------------------------ settings
function settings() {
  const options = {};
  for (const line of $("#options").value.split("\n")) {
    const [k, ...v] = line.split("=");
    if (k.trim()) options[k.trim()] = v.join("=").trim();
  }
  const method = $("#method").value;
  const known = info ? info.methods[method]?.options || {} : {};
  if ("share_bg" in known) options.share_bg = $("#background-mode").value === "keep";
  if ("use_token_merge" in known) options.use_token_merge = $("#token-merge").checked;
  const num = id => numberOrNull($(id).value);
  return {method, method_options: options, num_inference_steps: num("#steps"), guidance_scale: num("#guidance"),
          seed: num("#seed") ?? info.seed,
          width: num("#width"), height: num("#height"), save_masks: $("#save-masks").checked,
          inversion: $("#inversion").value || null};
}

function showSettings(s) {
  $("#method").value = s.method;
  const options = {...(s.method_options || s.options || {})};   // s.options: a draft kept by an older version
  $("#background-mode").value = options.share_bg === false ? "change" : "keep";
  $("#token-merge").checked = options.use_token_merge !== false;
  delete options.share_bg; delete options.use_token_merge;
  $("#options").value = Object.entries(options).map(([k, v]) => `${k}=${v}`).join("\n");
  for (const [id, key, old] of [["#steps", "num_inference_steps", "steps"], ["#guidance", "guidance_scale", "guidance"],
                                ["#seed", "seed"], ["#width", "width"], ["#height", "height"]])
    $(id).value = s[key] ?? s[old] ?? "";
  $("#save-masks").checked = s.save_masks !== false;
  const inversion = s.inversion && s.inversion !== "euler" ? s.inversion : "";
  if (inversion && !$$("#inversion option").some(o => o.value === inversion))
    $("#inversion").append(el("option", {value: inversion, text: inversion}));   // a command line's MODE:KEY=VALUE
  $("#inversion").value = inversion;
  methodChanged();
}

function methodChanged() {
  const opts = info?.methods[$("#method").value]?.options || {};
  $("#token-merge").disabled = !("use_token_merge" in opts);
  $("#background-mode").disabled = !("share_bg" in opts);
  const others = Object.keys(opts).filter(k => k !== "share_bg" && k !== "use_token_merge");
  $("#option-names").textContent = others.length ? `options of ${$("#method").value}: ${others.join(", ")}` : "";
}

function setBar(id, value, max) {
  const bar = $(id);
  bar.dataset.value = value; bar.dataset.max = max;
  bar.firstElementChild.style.width = `${Math.min(100, 100 * value / Math.max(max, 1))}%`;
}

// ------------------------------------------------------------------------------------------ runs
function payload(extra = {}) { return {name: storyName(), story: cleanStory(), settings: settings(), previews: livePreviews(), ...extra}; }
function livePreviews() { return $("#live-previews").checked; }

function cleanStory() {   // the document without the editor's own fields
  return {title: story.title, character: story.character, scenes: story.scenes.map(sc => ({name: sc.name, background: sc.background,
    images: sc.images.map(({shownSeed, pictureInfo, ...im}) => im)}))};
}

async function check() {
  try {
    const res = await api("/api/validate", payload());
    showProblems([]); status(`ready: ${res.groups.length} group(s)`); $("#command").textContent = res.command;
    $("#notes").replaceChildren(...(res.notes || []).map(n => el("li", {text: n})));
    return true;
  } catch (e) { showProblems(e.problems); $("#notes").replaceChildren(); status("fix the problems below", true); return false; }
}

async function submit(data) {
  try {
    const job = await api("/api/jobs", data);
    showProblems([]);
    follow(job.id);
  } catch (e) { showProblems(e.problems); status("fix the problems below", true); }
}

function follow(id) {
  currentJob = id;
  $("#cancel").disabled = false;
  setBar("#progress-steps", 0, 1); setBar("#progress-images", 0, 1);
  const source = new EventSource(`/api/jobs/${id}/events`);
  let groupsDone = 0, groupsTotal = 1;
  source.onmessage = msg => {
    const ev = JSON.parse(msg.data);
    window.uiEvents.push(ev.type === "preview" ? {...ev, images: ev.images.map(({url, ...im}) => ({...im, bytes: url ? url.length : 0}))} : ev);
    if (ev.type === "queued") status(ev.position ? `queued (${ev.position} job(s) before it)` : "queued");
    else if (ev.type === "started") status(`${ev.kind}: starting`);
    else if (ev.type === "plan") {
      groupsTotal = Math.max(ev.todo.length, 1);
      setBar("#progress-images", 0, groupsTotal);
      status(ev.todo.length ? `generating ${ev.images} image(s) in ${ev.todo.length} group(s)` : "every group is already done");
    } else if (ev.type === "loading") { info.model_state = ev.state; showModel(); status(`generating (model ${ev.state})`); }
    else if (ev.type === "group_started") { status(`generating ${ev.group} (${ev.images} images)`); startSlots(ev.group, ev.images); }
    else if (ev.type === "preview") showPreview(ev);
    else if (ev.type === "progress") {
      setBar("#progress-steps", ev.done, ev.total);
      $("#steps-text").textContent = `${ev.phase} ${ev.done}/${ev.total}`;
      $("#images-text").textContent = `group ${ev.group_index}/${ev.groups}`;
    } else if (ev.type === "group") {
      groupsDone += 1; setBar("#progress-images", groupsDone, groupsTotal); delete previews[ev.group];
      $("#images-text").textContent = `${groupsDone}/${groupsTotal} group(s) done`;
      if (ev.gallery) { const k = gallery.findIndex(g => g.name === ev.group); if (k >= 0) gallery[k] = ev.gallery; else gallery.push(ev.gallery); showGallery(); }
    } else if (ev.type === "group_failed") showProblems([`${ev.group}: ${ev.message}`]);
    else if (ev.type === "error") {
      showProblems(ev.problems); status(ev.conflict ? "some groups were made with other settings" : "failed", true);
      if (ev.conflict) offerOverwrite();
    } else if (ev.type === "cancelled") status(ev.message);
    else if (ev.type === "done") {
      status(ev.files ? "exported" : ev.kept_differing !== undefined ? `regenerated ${ev.group} image ${ev.index} (seed ${ev.seed})` : `done (${ev.groups - ev.failed}/${ev.groups} groups)`);
      if (ev.files) showExports(ev.files);
    }
    if (["done", "error", "cancelled"].includes(ev.type)) {
      source.close(); currentJob = null; $("#cancel").disabled = true; previews = {};
      refreshQueue(); openStory(storyName(), !(ev.type === "done" && !ev.files));
    }
  };
  refreshQueue();
}

// a group being generated: slots for its images (the ones it had, or empty ones), which previews fill
function startSlots(name, count) {
  previews[name] = {};
  if (!gallery.some(g => g.name === name))
    gallery.push({name, status: "generating", pending: true,
                  images: Array.from({length: count}, (_, i) => ({index: i, role: i ? "frame" : "identity"}))});
  showGallery();
}

function showPreview(ev) {
  const shown = previews[ev.group] || (previews[ev.group] = {});
  let missing = false;
  for (const im of ev.images) {
    if (!im.url) continue;
    shown[im.index] = im.url;
    const tile = $$(".tile").find(t => t.dataset.group === ev.group && Number(t.dataset.index) === im.index);
    const img = tile && $("img.preview", tile);
    if (img) img.src = im.url; else missing = true;
    window.previewsShown += 1;
  }
  if (missing) showGallery();
  $$(".tile").filter(t => t.dataset.group === ev.group).forEach(t => { const s = $(".preview-step", t); if (s) s.textContent = `preview, step ${ev.step}/${ev.steps}`; });
}

function offerOverwrite() {
  const button = el("button", {type: "button", id: "overwrite", text: "Replace those groups", onclick: () => submit(payload({kind: "generate", overwrite: true}))});
  $("#problems").append(el("li", {}, button));
}

async function generate() { if (await check()) { $("#name").value = storyName(); submit(payload({kind: "generate"})); } }

async function cancel() { if (currentJob) { await api(`/api/jobs/${currentJob}/cancel`, {}); status("cancelling…"); } }

async function refreshQueue() {
  const res = await api("/api/jobs");
  $("#queue").replaceChildren(...res.jobs.slice(-10).reverse().map(j => el("li", {text: `${j.id} ${j.kind} ${j.name}: ${j.state}`})));
}

// ------------------------------------------------------------------------------------------ gallery
function showGallery() {
  const masks = $("#show-masks").checked, matches = $("#show-matches").checked;
  if (!gallery.length) { $("#gallery").replaceChildren(el("p", {class: "muted", text: "Generate to see the identity and frames here."})); }
  else $("#gallery").replaceChildren(...gallery.map(group => {
    const tiles = group.images.map(im => {
      const pic = el("div", {class: "pic"});
      const live = previews[group.name]?.[im.index];
      if (im.url && !live) pic.append(el("img", {src: im.url, alt: `${group.name} ${im.role} ${im.index}`, class: "image"}));
      if (live) pic.append(el("img", {src: live, alt: `${group.name} ${im.role} ${im.index}: preview`, class: "preview"}),
                           el("span", {class: "preview-step"}));
      if (masks && im.mask) pic.append(el("img", {src: im.mask, class: "mask", alt: "mask"}));
      const fromPicture = im.role === "identity" && group.picture;
      const tile = el("div", {class: "tile", "data-group": group.name, "data-index": im.index}, pic,
        el("div", {text: `${im.role === "identity" ? (fromPicture ? "identity (from the picture)" : "identity") : "frame " + im.index} · seed ${im.seed ?? "…"}`}),
        im.caption ? el("div", {class: "muted", text: im.caption}) : null);
      if (fromPicture) tile.append(pictureInfo(group.picture));
      if (matches && im.match) tile.append(el("img", {src: im.match, class: "match", alt: "point matches"}));
      if ((im.notes || []).length) tile.append(el("details", {class: "notes small"},
        el("summary", {text: `${im.notes.length} note(s)`}), ...im.notes.map(n => el("div", {text: n}))));
      if (im.url && group.status === "done" && !live) tile.append(el("button", {type: "button", class: "regenerate", text: "↻ new seed",
        title: "regenerate this image with a new seed; the others stay as they are",
        onclick: () => submit({kind: "regenerate", name: storyName(), group: group.name, index: im.index, previews: livePreviews()})}));
      return tile;
    });
    const title = el("h3", {text: `${group.name} (${group.status})`});
    if (group.storyboard) title.append(" ", el("a", {href: group.storyboard, target: "_blank", text: "storyboard"}));
    return el("div", {class: "group"}, title, group.error ? el("div", {class: "notes", text: group.error}) : null, el("div", {class: "tiles"}, ...tiles));
  }));
  // the seeds each image got, for the editor's "auto" seeds
  for (const [s, group] of gallery.entries()) {
    const scene = story?.scenes[s];
    if (!scene) continue;
    group.images.forEach((im, i) => { if (scene.images[i]) scene.images[i].shownSeed = im.seed; });
  }
  $$(".row").forEach(row => {
    const s = Number(row.closest(".scene").dataset.s), i = Number(row.dataset.i);
    const seed = story.scenes[s]?.images[i]?.shownSeed;
    if (seed !== undefined) $(".seed-value", row).placeholder = seed;
  });
}

function pictureInfo(p) {   // the identity made from a picture: the picture, how close the reconstruction is, the fit
  const psnr = typeof p.psnr === "number" ? `reconstruction PSNR ${p.psnr.toFixed(1)} dB` : "not generated yet";
  return el("div", {class: "picture-info small"},
    p.url ? el("img", {class: "picture-source", src: p.url, alt: "the picture", title: "the picture it reconstructs"}) : null,
    el("div", {class: "psnr", text: `${psnr} · ${p.inversion || "euler"}`}),
    p.fit ? el("div", {class: "muted fit", text: `picture ${p.fit}`}) : null);
}

function showExports(files) {
  $("#exports").replaceChildren(...files.map(f => el("li", {}, el("a", {href: f.url, target: "_blank", text: f.path}),
    f.path.endsWith(".png") ? el("div", {}, el("img", {src: f.url, alt: f.path, class: "export-preview"})) : null)));
}

async function exportLayout() {
  submit({kind: "export", name: storyName(), layouts: [$("#export-layout").value], formats: [$("#export-format").value]});
}

// ------------------------------------------------------------------------------------------ stories
async function listStories() {
  const res = await api("/api/stories");
  const picker = $("#story-picker"), current = $("#name").value;
  picker.replaceChildren(el("option", {value: "", text: "(new story)"}),
    ...res.stories.map(s => el("option", {value: s.name, text: `${s.title} (${s.done}/${s.groups} groups)`})));
  picker.value = res.stories.some(s => s.name === current) ? current : "";
}

async function openStory(name, keepEditor = false) {
  if (!name) return;
  let res;
  try { res = await api(`/api/stories/${encodeURIComponent(name)}`); } catch (e) { return; }
  if (!keepEditor) { story = res.story; $("#name").value = name; showSettings(res.settings); render(); changed(); }
  gallery = res.groups; showGallery();
  $("#command").textContent = res.command;
  $("#zip").href = `/api/stories/${encodeURIComponent(name)}/zip`;
  showExports(res.exports);
  listStories();
}

async function loadFile(file) {
  const text = await file.text();
  try {
    const res = await api("/api/parse", {filename: file.name, text});
    story = res.story; $("#name").value = slug(story.title || file.name.replace(/\.[^.]+$/, "")) || "story";
    gallery = []; showGallery(); render(); changed(); showProblems([]); status(`loaded ${file.name}`);
  } catch (e) { showProblems(e.problems); status(`cannot load ${file.name}`, true); }
}

async function saveFile(format) {
  try {
    const res = await api("/api/storyfile", {name: storyName(), story: cleanStory(), format});
    const url = URL.createObjectURL(new Blob([res.text], {type: "text/plain"}));
    el("a", {href: url, download: res.filename}).click();
    setTimeout(() => URL.revokeObjectURL(url), 1000);
    showProblems([]);
  } catch (e) { showProblems(e.problems); status(`cannot save as ${format}`, true); }
}

// ------------------------------------------------------------------------------------------ start
function showModel() {   // the header: the model, how it is loaded and its state (updated by the jobs' events)
  $("#model").textContent = `model ${info.model}${info.loading ? " " + info.loading : ""} (${info.model_state}) · ${info.defaults.width}x${info.defaults.height}, ${info.defaults.num_inference_steps} steps · folder ${info.out}`;
}

async function start() {
  info = await api("/api/info");
  showModel();
  $("#method").replaceChildren(...Object.keys(info.methods).map(m => el("option", {value: m, text: m})));
  $("#export-layout").replaceChildren(...info.layouts.map(l => el("option", {value: l, text: l})));
  if (info.limits.vocabulary.length) $("#vocabulary").textContent = `this model knows only these words: ${info.limits.vocabulary.join(" ")}`;
  for (const [id, key] of [["#steps", "num_inference_steps"], ["#guidance", "guidance_scale"], ["#width", "width"], ["#height", "height"]])
    $(id).placeholder = info.defaults[key];
  try { $("#live-previews").checked = localStorage.getItem(PREVIEWS_KEY) !== "off"; } catch (e) { /* private mode */ }
  let draft = null;
  try { draft = JSON.parse(localStorage.getItem("characonsist-draft") || "null"); } catch (e) { draft = null; }
  story = draft?.story || emptyStory();
  $("#name").value = draft?.name || "";
  showSettings(draft?.settings || {method: "characonsist", method_options: {}, seed: info.seed, save_masks: true});
  render();
  // the form listens before anything else is awaited: what is typed once the model shows is never lost
  $("#title").addEventListener("input", e => { story.title = e.target.value; showName(); changed(); });
  $("#character").addEventListener("input", e => { story.character = e.target.value; changed(); });
  $("#line-mode").addEventListener("change", render);
  $("#add-scene").addEventListener("click", () => { story.scenes.push({name: "", background: "", images: [emptyImage(), emptyImage()]}); render(); changed(); });
  $("#background-mode").addEventListener("change", changed);
  $("#method").addEventListener("change", () => { methodChanged(); changed(); });
  $("#check").addEventListener("click", check);
  $("#generate").addEventListener("click", generate);
  $("#cancel").addEventListener("click", cancel);
  $("#export").addEventListener("click", exportLayout);
  $("#show-masks").addEventListener("change", showGallery);
  $("#show-matches").addEventListener("change", showGallery);
  $("#story-picker").addEventListener("change", e => { if (e.target.value) openStory(e.target.value); });
  $("#new-story").addEventListener("click", () => { story = emptyStory(); gallery = []; $("#name").value = ""; $("#notes").replaceChildren(); render(); showGallery(); changed(); });
  $("#load-file").addEventListener("change", e => { if (e.target.files[0]) loadFile(e.target.files[0]); e.target.value = ""; });
  $$(".save-file").forEach(b => b.addEventListener("click", () => saveFile(b.dataset.format)));
  $$("#run input, #run select, #run textarea").forEach(n => n.addEventListener("change", changed));
  $("#live-previews").addEventListener("change", e => { try { localStorage.setItem(PREVIEWS_KEY, e.target.checked ? "on" : "off"); } catch (err) { /* private mode */ } });

  await listStories();
  if ($("#name").value) openStory($("#name").value, true);
  const live = (await api("/api/jobs")).jobs.find(j => j.state === "running" || j.state === "queued");
  if (live) follow(live.id);     // a page reloaded while a job runs follows it again
}

start().catch(e => status(`cannot start: ${e.message}`, true));
