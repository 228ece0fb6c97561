// The console's pages. Every /ui/ path loads this module, which renders the page the path names
// from the JSON API: overview, dataset, new job, job, model, predict.

import { ApiError, del, events, get, getFirst, objectUrl, post, postWatching, send, upload } from "./api.js";
import { heatmap, lineChart } from "./charts.js";
import { filesOfEntry, tarOf } from "./tar.js";

const main = document.getElementById("main");

/** An element: h("a", {href: "/ui/"}, "text", child, …). Text is always text, never HTML. */
function h(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (k === "class") node.className = v;
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

const pct = (v) => (v === null || v === undefined ? "–" : `${(v * 100).toFixed(1)}%`);
const num = (v, d = 3) => (v === null || v === undefined ? "–" : Number(v).toFixed(d));
const when = (t) => (t ? new Date(t).toLocaleString() : "–");
/** A count as the progress lines write it: 1,002. */
const countText = (x) => x.toLocaleString("en");
const short = (id) => id.slice(-8);
const SPLITS = ["train", "validation", "test"];
const status = (s) => h("span", { class: `status ${s}` }, s);

function errorBox(e) {
  return h("p", { class: "error", role: "alert" }, e instanceof ApiError ? `${e.message} (${e.code})` : String(e));
}

/**
 * The labels of a report's confusion matrix, in its order: the model's labels or the dataset's
 * classes where known, else the report's classes in the service's code-point order (not
 * `Object.keys`' order, which puts names that look like integers first).
 */
const matrixLabels = (report, known) => known ?? Object.keys(report.per_class).sort();

/** A button that deletes `path` once the person confirms `question`, then goes to the start page. */
function deleteButton(question, path, label) {
  const button = h("button", {
    class: "danger",
    onclick: async () => {
      if (!confirm(question)) return;
      try {
        await del(path);
        location.href = "/ui/";
      } catch (e) {
        button.after(errorBox(e));
      }
    },
  }, label);
  return button;
}

function render(title, ...content) {
  document.title = `${title} · vitforge`;
  main.replaceChildren(h("h1", {}, title), ...content.filter((c) => c !== null && c !== undefined));
}

/** A table from rows of cells (a cell: text, a node, or {v, num: true}). */
function table(headers, rows, empty = "none yet") {
  if (!rows.length) return h("p", { class: "muted" }, empty);
  return h(
    "table",
    {},
    h("thead", {}, h("tr", {}, headers.map((x) => h("th", { class: x.startsWith("#") ? "num" : null }, x.replace(/^#/, ""))))),
    h("tbody", {}, rows.map((r) => h("tr", {}, r.map((c) => (c && c.num !== undefined ? h("td", { class: "num" }, c.v) : h("td", {}, c)))))),
  );
}

// A phase's done/total and rate; the loading phase counts the bytes of a base model's download.
function counts(p) {
  const mib = (n) => (n / 1048576).toFixed(1);
  if (p.phase === "loading" && p.total > 1) return `${mib(p.done)}/${mib(p.total)} MiB${p.rate ? ` · ${mib(p.rate)} MiB/s` : ""}`;
  return `${p.done}/${p.total}${p.rate ? ` · ${p.rate.toFixed(1)}/s` : ""}`;
}

function progressOf(job) {
  const p = job.progress;
  if (!p.phase) return h("span", { class: "muted" }, job.status === "queued" ? "waiting" : "–");
  const share = p.total ? p.done / p.total : 0;
  return h(
    "div",
    {},
    h("div", { class: "muted" }, `${p.phase} ${counts(p)} · epoch ${p.epoch}/${p.epochs}`),
    h("div", { class: "bar", role: "progressbar", "aria-valuemin": 0, "aria-valuemax": p.total, "aria-valuenow": p.done }, h("div", { style: `width:${(share * 100).toFixed(0)}%` })),
  );
}

/** Loads an image through the API (with the key) into an <img>. */
function apiImage(path, alt) {
  // The object URL goes once the image has been decoded: a page of thumbnails would otherwise
  // hold every one for the life of the tab.
  const img = h("img", { alt, loading: "lazy", onload: () => URL.revokeObjectURL(img.src), onerror: () => URL.revokeObjectURL(img.src) });
  objectUrl(path).then((url) => (img.src = url)).catch(() => (img.alt = `${alt} (unavailable)`));
  return img;
}

// ---- Overview ------------------------------------------------------------------------------

// Uploads a dataset, or with `base` (a dataset) images to add to a copy of it.
function uploadZone(onDone, base = null) {
  const input = h("input", { type: "file", id: "dataset-file", accept: ".zip,.tar,.gz,.tgz,.parquet" });
  const folder = h("input", { type: "file", id: "dataset-folder", webkitdirectory: true, multiple: true });
  const placeholder = base ? `name (default: ${base.name} (extended))` : "name (default: the file's or folder's)";
  const name = h("input", { type: "text", id: "dataset-name", placeholder });
  const bar = h("progress", { max: 1, value: 0, hidden: true });
  const note = h("p", { class: "muted", "aria-live": "polite" });
  const zone = h(
    "div",
    { class: "drop", id: "drop" },
    base
      ? "Drop a folder of class folders (one class is enough), or a zip, tar(.gz) or Parquet file of more labelled images here, or pick a file: "
      : "Drop a folder of class folders (cat/…, dog/…), or a zip, tar(.gz) or Parquet file of labelled images here, or pick a file: ",
    input,
    " or a folder: ",
    folder,
  );
  // A folder goes up as one tar archive, read from disk as it is sent; the dataset is named after
  // the folder.
  function sendFolder(top, entries) {
    if (entries.length === 0) {
      note.textContent = "that folder holds no files";
      return;
    }
    let archive;
    try {
      archive = tarOf(entries);
    } catch (e) {
      note.replaceChildren(errorBox(e)); // a file over tar's 8 GiB
      return;
    }
    send(new File([archive], `${top}.tar`, { type: "application/x-tar" }), top);
  }
  // `fallback`: a new dataset's name when none is typed (else the service names it after the
  // file; an extension after its dataset).
  async function send(file, fallback) {
    const form = new FormData();
    form.append("file", file);
    const chosen = name.value.trim() || (base ? "" : fallback);
    if (chosen) form.append("name", chosen);
    bar.hidden = false;
    note.textContent = `uploading ${file.name}…`;
    let checked = ""; // the service's last word on its check, kept above a refusal
    const sent = (share) => {
      bar.value = share;
      note.textContent = share < 1 ? `uploading ${file.name}: ${(share * 100).toFixed(0)}%` : "uploaded; waiting for the service to check it…";
    };
    const stage = (p) => {
      checked = checkText(p);
      note.textContent = checked;
      if (p.stage === "checking" && p.entries > 0) bar.value = p.checked / p.entries;
    };
    try {
      const ds = await upload(base ? `/datasets/${base.id}/extend` : "/datasets", form, sent, stage);
      note.textContent = base
        ? `added ${ds.source.added} images (${ds.rejected_total} files rejected)`
        : `stored ${ds.num_images} images in ${ds.classes.length} classes (${ds.rejected_total} files rejected)`;
      onDone(ds);
    } catch (e) {
      note.replaceChildren(...(checked ? [h("span", { class: "checked" }, checked)] : []), errorBox(e));
    } finally {
      bar.hidden = true;
    }
  }
  input.addEventListener("change", () => input.files[0] && send(input.files[0]));
  folder.addEventListener("change", () => {
    const files = [...folder.files];
    const top = files[0]?.webkitRelativePath.split("/")[0];
    sendFolder(top, files.map((file) => ({ path: file.webkitRelativePath, file })));
  });
  zone.addEventListener("dragover", (e) => {
    e.preventDefault();
    zone.classList.add("over");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("over");
    const entry = e.dataTransfer.items?.[0]?.webkitGetAsEntry?.();
    if (entry?.isDirectory) {
      note.textContent = `reading the folder ${entry.name}…`;
      filesOfEntry(entry).then((entries) => sendFolder(entry.name, entries), (err) => note.replaceChildren(errorBox(err)));
    } else if (e.dataTransfer.files[0]) {
      send(e.dataTransfer.files[0]);
    }
  });
  return h("div", {}, zone, h("label", {}, "Name ", name), bar, note);
}

/** What an upload's progress event says, as a line under its drop zone. */
function checkText(p) {
  switch (p.stage) {
    case "waiting":
      return "waiting for a free slot to check the upload…";
    case "listing":
      return `listing the archive: ${countText(p.entries)} entries so far…`;
    // Entries, not files: a zip lists its folders too, and a Parquet file counts rows.
    case "checking":
      return `checked ${countText(p.checked)} of ${countText(p.entries)} entries`;
    case "comparing":
      return `checked ${countText(p.entries)} entries; looking for repeated files and look-alikes…`;
    default:
      return `checked ${countText(p.entries)} entries; storing the dataset…`;
  }
}

/** Rows a list of the overview shows at first, and how many more each "Show more" adds. */
const OVERVIEW_ROWS = 25;

/** A "Show more" button under a list that has more rows than it shows. */
function showMore(list, onclick) {
  return h("button", { class: "more", "data-list": list, onclick }, "Show more");
}

async function overview() {
  const datasets = h("div", { id: "datasets" });
  const jobs = h("div", { id: "jobs" });
  const jobsError = h("div", {});
  const models = h("div", { id: "models" });
  render(
    "Overview",
    h("section", {}, h("h2", {}, "Datasets"), uploadZone((ds) => (location.href = `/ui/datasets/${ds.id}`)), datasets),
    h("section", {}, h("h2", {}, "Jobs"), h("p", {}, h("a", { href: "/ui/new" }, "Start a fine-tune")), jobsError, jobs),
    h("section", {}, h("h2", {}, "Models"), models),
  );
  // Each list shows its newest rows; the service says whether more follow.
  const shown = { datasets: OVERVIEW_ROWS, jobs: OVERVIEW_ROWS, models: OVERVIEW_ROWS };
  const drawDatasets = async () => {
    const ds = await getFirst("/datasets", shown.datasets);
    datasets.replaceChildren(
      table(
        ["Dataset", "#Images", "Classes", "Created", ""],
        ds.items.map((d) => [h("a", { href: `/ui/datasets/${d.id}` }, d.name), { v: d.num_images, num: true }, d.classes.join(", "), when(d.created_at), h("a", { href: `/ui/new?dataset=${d.id}` }, "fine-tune")]),
        "No dataset yet: upload one above.",
      ),
      ds.more ? showMore("datasets", () => ((shown.datasets += OVERVIEW_ROWS), drawDatasets().catch((e) => datasets.append(errorBox(e))))) : null,
    );
  };
  await drawDatasets();
  const drawModels = (ms, named) => models.replaceChildren(
    table(
      ["Model", "Aliases", "Labels", "#Val. accuracy", "#Val. F1", "Recipe", "Created"],
      ms.items.map((m, i) => [
        h("span", {}, h("a", { href: `/ui/models/${m.id}` }, short(m.id)), i === 0 ? h("span", { class: "muted" }, " (newest)") : null),
        (named.get(m.id) ?? []).join(", "),
        m.labels.join(", "),
        { v: pct(m.metrics?.accuracy), num: true },
        { v: num(m.metrics?.f1), num: true },
        m.recipe ?? "–",
        when(m.created_at),
      ]),
      "No model yet: fine-tune one.",
    ),
    ms.more ? showMore("models", () => ((shown.models += OVERVIEW_ROWS), refresh().catch((e) => jobsError.replaceChildren(errorBox(e))))) : null,
  );
  // Live job status (and the models jobs register) without reloading. A job's F1 is its model's:
  // from the models shown, else asked for once (a model's metrics never change; a deleted one's
  // F1 stays blank).
  const f1 = new Map();
  const refresh = async () => {
    const [js, ms, aliases] = await Promise.all([getFirst("/jobs", shown.jobs), getFirst("/models", shown.models), get("/aliases")]);
    const named = new Map();
    for (const a of aliases) named.set(a.model_id, [...(named.get(a.model_id) ?? []), a.name]);
    for (const m of ms.items) f1.set(m.id, m.metrics?.f1);
    const unknown = new Set(js.items.map((j) => j.model_id).filter((id) => id && !f1.has(id)));
    await Promise.all(
      [...unknown].map((id) =>
        get(`/models/${id}`).then(
          (m) => f1.set(id, m.metrics?.f1),
          (e) => {
            if (e.status !== 404) throw e;
            f1.set(id, undefined);
          },
        ),
      ),
    );
    drawModels(ms, named);
    jobs.replaceChildren(
      table(
        ["Job", "Status", "Progress", "Recipe", "#Best val. F1", "Created"],
        js.items.map((j) => [h("a", { href: `/ui/jobs/${j.id}` }, short(j.id)), status(j.status), progressOf(j), j.recipe, { v: num(f1.get(j.model_id)), num: true }, when(j.created_at)]),
        "No job yet.",
      ),
      js.more ? showMore("jobs", () => ((shown.jobs += OVERVIEW_ROWS), refresh().catch((e) => jobsError.replaceChildren(errorBox(e))))) : null,
    );
    return js.items.some((j) => j.status === "queued" || j.status === "running");
  };
  // A failed refresh says why above the (stale) tables, and is cleared by the next success.
  const loop = async () => {
    const busy = await refresh().then(
      (b) => (jobsError.replaceChildren(), b),
      (e) => (jobsError.replaceChildren(errorBox(e)), true),
    );
    setTimeout(loop, busy ? 1500 : 5000);
  };
  loop();
}

// ---- Dataset -------------------------------------------------------------------------------

// A dataset's repeated files (or its look-alike pictures) in a sentence: the report's own, as
// `vitforge train` says it.
function duplicatesSummary(dup) {
  return `${dup.summary}. All are used as uploaded.`;
}

// A group's pictures, small, so that it can be judged by eye: each file's for pictures that look
// alike, the one file's for copies of a file. (A report stored before files named their blobs
// has none to show.)
function groupThumbs(datasetId, files, alike) {
  const shown = (alike ? files : files.slice(0, 1)).filter((f) => f.blob);
  return h("div", { class: "strip" }, shown.map((f) => apiImage(`/datasets/${datasetId}/images/${f.blob}/thumbnail`, f.file)));
}

// A dataset's section on repeated files, or with `alike` on pictures that look alike; with `fix`
// (corrections), a choice for each picture.
function repeatsSection(datasetId, dup, alike, fix = null) {
  if (!dup) return h("p", { class: "muted", id: "look-alikes" }, "Not checked yet: an earlier version stored this dataset, and the service compares its pictures in the background after an upgrade. Reload in a moment.");
  if (!dup.copies) return h("p", { class: "muted" }, alike ? "No two different files look alike." : "No image is repeated.");
  return h(
    "div",
    { id: alike ? "look-alikes" : "duplicates" },
    h(
      "p",
      { class: dup.across_classes || dup.across_splits ? "warning" : null },
      duplicatesSummary(dup),
      dup.across_classes ? ` A ${alike ? "picture" : "file"} under two classes contradicts itself.` : "",
      dup.across_splits ? " A validation or test image that is also a training image makes that split's figures look better than they are." : "",
    ),
    table(
      [alike ? "Files" : "Images", alike ? "#Images" : "#Copies", "Classes", "Splits"],
      dup.groups.map((g) => [
        [groupThumbs(datasetId, g.files, alike), h("span", { class: "mono" }, g.files.map((f, i) => [i ? h("br") : null, f.file])), fix ? groupControls(fix, g.files) : null],
        { v: g.count, num: true },
        g.classes.join(", "),
        g.splits.join(", "),
      ]),
    ),
    dup.groups_total > dup.groups.length ? h("p", { class: "muted" }, `and ${dup.groups_total - dup.groups.length} more ${alike ? "groups" : "repeated files"}`) : null,
  );
}

// ---- Corrections: a copy of a dataset with images relabelled, moved or removed -------------

/**
 * Edits to a dataset's images, by blob, kept while its pages are redrawn: a select per image
 * (keep, relabel as another class, move to another split, remove) and a bar that saves them as a corrected copy (the
 * dataset itself never changes: its jobs and models keep reading it as it was).
 */
function corrections(datasetId, classes, fromJob = null) {
  const edits = new Map();
  // The selects shown for each blob (a picture can be in the grid and in a group at once).
  const shown = new Map();
  const count = h("span", { class: "muted", id: "edit-count" });
  const name = h("input", { type: "text", id: "edit-name", "aria-label": "Name of the copy", placeholder: "name of the copy (default: this one's, with \"(copy)\")" });
  const save = h("button", { class: "primary", id: "edit-save", onclick: saveCopy }, "Save as a new dataset");
  const failure = h("div", { "aria-live": "polite" });
  // Shown, at the foot of the window, once there is something to save.
  const bar = h("div", { class: "card", id: "edit-bar", hidden: true }, h("p", { class: "row" }, count, name, save), failure);
  function update() {
    const n = edits.size;
    count.textContent = `${n} image${n === 1 ? "" : "s"} to correct`;
    save.disabled = n === 0;
    bar.hidden = n === 0;
  }
  async function saveCopy() {
    failure.replaceChildren();
    const body = { relabel: {}, remove: [] };
    for (const [blob, edit] of edits) {
      const [kind, value] = edit.split(/:(.*)/s);
      if (kind === "remove") body.remove.push(blob);
      else if (kind === "move") (body.move ??= {})[blob] = value;
      else body.relabel[blob] = value;
    }
    if (name.value.trim()) body.name = name.value.trim();
    save.disabled = true;
    try {
      const copy = await post(`/datasets/${datasetId}/copy`, body);
      // From a job's page, the copy's page offers to run that job again on it.
      location.href = `/ui/datasets/${copy.id}${fromJob ? `?job=${encodeURIComponent(fromJob)}` : ""}`;
    } catch (e) {
      failure.replaceChildren(errorBox(e));
      update();
    }
  }
  /**
   * The select of one image (of one label and split, or `null` for files under several, or a
   * split not known), showing its pending edit.
   */
  function control(blob, label, split = null) {
    const select = h(
      "select",
      { class: "edit", "aria-label": label === null ? "Correct a picture filed under several classes" : `Correct ${label} image`, "data-blob": blob },
      h("option", { value: "" }, label === null ? "keep as filed" : `keep as ${label}`),
      classes.filter((c) => c !== label).map((c) => h("option", { value: `label:${c}` }, `relabel as ${c}`)),
      SPLITS.filter((s) => s !== split).map((s) => h("option", { value: `move:${s}` }, `move to ${s}`)),
      h("option", { value: "remove" }, "remove"),
    );
    select.value = edits.get(blob) ?? "";
    select.addEventListener("change", () => {
      if (select.value) edits.set(blob, select.value);
      else edits.delete(blob);
      for (const other of shown.get(blob)) if (other !== select) other.value = select.value;
      update();
    });
    // Those of pages drawn before are let go.
    shown.set(blob, [...(shown.get(blob) ?? []).filter((s) => s.isConnected), select]);
    return select;
  }
  update();
  return { bar, control };
}

// What a copy was made from, and what changed or was added.
function sourceNote(source) {
  if (!source) return null;
  const changes = [["relabelled", source.relabelled], ["removed", source.removed], ["moved to another split", source.moved], ["added", source.added]].filter(([, n]) => n).map(([what, n]) => `${n} ${what}`);
  const what = source.added ? "An extended copy" : "A corrected copy";
  return h("p", { id: "dataset-source" }, `${what} of dataset `, h("a", { href: `/ui/datasets/${source.dataset_id}` }, short(source.dataset_id)), `: ${changes.length ? changes.join(", ") : "no image changed"}.`);
}

// The choices of a group's pictures: one per distinct file (a file repeated under several names
// is one picture, whose files change together).
function groupControls(fix, files) {
  const byBlob = Map.groupBy(files.filter((f) => f.blob), (f) => f.blob);
  if (!byBlob.size) return null;
  // The value all of a picture's files share, else null.
  const one = (values) => (new Set(values).size === 1 ? values[0] : null);
  return h("div", { class: "strip" }, [...byBlob].map(([blob, of]) => fix.control(blob, one(of.map((f) => f.label)), one(of.map((f) => f.split)))));
}

async function dataset(id) {
  const d = await get(`/datasets/${id}`);
  const fix = corrections(id, d.classes);
  // Made from a job's mistakes (?job=<id>): that job, again, on this dataset.
  const fromJob = new URLSearchParams(location.search).get("job");
  const again = fromJob ? h("a", { href: `/ui/new?from=${encodeURIComponent(fromJob)}&dataset=${id}`, id: "dataset-again" }, `Run job ${short(fromJob)} again on it`) : null;
  const counts = table(
    ["Class", ...SPLITS.map((s) => "#" + s)],
    d.classes.map((c) => [c, ...SPLITS.map((s) => ({ v: d.counts[s][c] ?? 0, num: true }))]),
  );
  const rejected = d.rejected_total
    ? h("details", {}, h("summary", {}, `${d.rejected_total} files rejected`), table(["File", "Why"], d.rejected.map((r) => [h("span", { class: "mono" }, r.file), r.reason])))
    : h("p", { class: "muted" }, "No file was rejected.");
  const split = h("select", { id: "split", "aria-label": "Split" }, h("option", { value: "" }, "all splits"), SPLITS.map((s) => h("option", { value: s }, s)));
  const cls = h("select", { id: "class", "aria-label": "Class" }, h("option", { value: "" }, "all classes"), d.classes.map((c) => h("option", { value: c }, c)));
  const grid = h("div", { class: "grid", id: "thumbs" });
  const pager = h("p", { class: "row" });
  let offset = 0;
  const limit = 48;
  async function page() {
    const q = new URLSearchParams({ offset, limit });
    if (split.value) q.set("split", split.value);
    if (cls.value) q.set("class", cls.value);
    const p = await get(`/datasets/${id}/images?${q}`);
    grid.replaceChildren(...p.images.map((im) => h("figure", { class: "thumb" }, apiImage(im.thumbnail, im.file), h("figcaption", {}, `${im.label} · ${im.split}`, h("br"), h("span", { class: "muted" }, im.file), h("br"), fix.control(im.blob, im.label, im.split)))));
    pager.replaceChildren(
      h("button", { disabled: offset === 0, onclick: () => ((offset = Math.max(0, offset - limit)), page()) }, "Previous"),
      h("span", { class: "muted" }, p.total ? `${offset + 1}–${Math.min(offset + limit, p.total)} of ${p.total}` : "no image"),
      h("button", { disabled: offset + limit >= p.total, onclick: () => ((offset += limit), page()) }, "Next"),
    );
  }
  split.addEventListener("change", () => ((offset = 0), page()));
  cls.addEventListener("change", () => ((offset = 0), page()));
  const remove = deleteButton(`Delete dataset ${d.name}?`, `/datasets/${id}`, "Delete dataset");
  render(
    d.name,
    h("p", { class: "row" }, again, h("a", { href: `/ui/new?dataset=${id}` }, "Fine-tune on it"), remove),
    sourceNote(d.source),
    h("section", {}, h("h2", {}, `${d.num_images} images in ${d.classes.length} classes`), counts),
    h("section", {}, h("h2", {}, "Rejected files"), rejected),
    h("section", {}, h("h2", {}, "Repeated files"), repeatsSection(id, d.duplicates, false, fix)),
    h("section", { id: "look-alikes-section" }, h("h2", {}, "Pictures that look alike"), repeatsSection(id, d.look_alikes, true, fix)),
    h("section", {}, h("h2", {}, "Images"), h("p", { class: "row" }, split, cls), grid, pager),
    h(
      "section",
      { id: "extend" },
      h("h2", {}, "Add images"),
      h("p", { class: "muted" }, "Makes a new dataset: this one's images and the new ones (those it already has are not added twice). This dataset stays as it is."),
      uploadZone((ds) => (location.href = `/ui/datasets/${ds.id}`), d),
    ),
    fix.bar,
  );
  await page();
}

// ---- New job -------------------------------------------------------------------------------

const FIELDS = [
  ["learning_rate", "number", "Peak learning rate"],
  ["head_learning_rate", "number", "Head learning rate"],
  ["epochs", "number", "Epochs"],
  ["batch_size", "number", "Batch size"],
  ["optimizer", ["adamw", "sgd"], "Optimiser"],
  ["weight_decay", "number", "Weight decay"],
  ["lr_scheduler", ["linear", "cosine", "constant"], "Schedule"],
  ["warmup_ratio", "number", "Warm-up share"],
  ["train_mode", ["full", "head_only", "last_n_layers"], "What trains"],
  ["trainable_layers", "number", "Trainable layers"],
  ["augment", ["true", "false"], "Augmentation"],
  ["head_init", ["random", "probe"], "Head"],
  ["after_probe", ["given", "auto"], "After the probe"],
  ["probe_views", "number", "Probe views per image"],
  ["class_balanced_loss", ["false", "true"], "Class-balanced loss"],
  ["validation_split", "number", "Validation share"],
  ["early_stopping_patience", "number", "Early stopping patience"],
  ["calibrate", ["true", "false"], "Calibrate scores"],
  ["time_budget_secs", "number", "Time budget (s)"],
  ["precision", ["f32", "bf16", "auto"], "Precision"],
  ["seed", "number", "Seed"],
];

async function newJob() {
  const [datasets, bases, models, recipes] = await Promise.all([get("/datasets"), get("/base-models"), get("/models"), get("/recipes")]);
  const query = new URLSearchParams(location.search);
  // "Run again" (?from=<job id>): that job's dataset (unless ?dataset= names another, as for a
  // corrected copy of it), base model, recipe and the parameters it set away from its recipe's
  // defaults.
  const prior = query.get("from") ? await get(`/jobs/${query.get("from")}`) : null;
  const want = query.get("dataset") ?? prior?.dataset_id;
  const dsSelect = h("select", { id: "job-dataset", required: true }, datasets.map((d) => h("option", { value: d.id, selected: d.id === want }, `${d.name} (${d.num_images} images)`)));
  const base = h("select", { id: "job-base" },
    h("optgroup", { label: "Local base models" }, bases.local.map((b) => h("option", { value: b }, b))),
    h("optgroup", { label: "Hugging Face hub" }, bases.hub.map((b) => h("option", { value: b, selected: !bases.local.length && b === bases.default }, b))),
    h("optgroup", { label: "Models of this service (continue training)" }, models.map((m) => h("option", { value: m.id }, `${short(m.id)} (${m.labels.join(", ")})`))));
  const recipe = h("select", { id: "job-recipe" }, h("option", { value: "auto" }, "auto: probe head, then what pays"), h("option", { value: "manual" }, "manual: Hugging Face's defaults"));
  const inputs = {};
  const grid = h("div", { class: "form-grid" });
  function showDefaults() {
    const defaults = recipes[recipe.value];
    grid.replaceChildren(
      ...FIELDS.map(([key, kind, label]) => {
        const d = defaults[key];
        const input = Array.isArray(kind)
          ? h("select", { name: key }, h("option", { value: "" }, `default: ${d}`), kind.map((o) => h("option", { value: o }, o)))
          : h("input", { type: "number", name: key, step: "any", placeholder: `default: ${d ?? "none"}` });
        inputs[key] = [input, kind];
        return h("label", {}, h("span", {}, label), input);
      }),
    );
  }
  recipe.addEventListener("change", showDefaults);
  // Parameters of the earlier job that the form has no field for (momentum, label smoothing…).
  let carried = {};
  const notes = [];
  if (prior) {
    if (!datasets.some((d) => d.id === want)) notes.push(`Its dataset ${short(want)} has been deleted: choose another.`);
    if (![...base.options].some((o) => o.value === prior.base_model)) base.append(h("option", { value: prior.base_model }, prior.base_model));
    base.value = prior.base_model;
    recipe.value = prior.recipe;
  }
  showDefaults();
  if (prior) {
    const defaults = recipes[prior.recipe] ?? {};
    for (const [key, value] of Object.entries(prior.params)) {
      if (value === null || value === defaults[key]) continue;
      if (inputs[key]) inputs[key][0].value = String(value);
      else carried[key] = value;
    }
  }
  const extra = Object.entries(carried).map(([k, v]) => `${k} ${v}`);
  const kept = h("span", {}, extra.length ? ` Also kept from job ${short(prior.id)}: ${extra.join(", ")}.` : "");
  // Another recipe starts from its own defaults: nothing is carried over to it.
  recipe.addEventListener("change", () => ((carried = {}), (kept.textContent = "")));
  const note = h("div", { "aria-live": "polite" });
  const form = h(
    "form",
    {
      id: "job-form",
      onsubmit: async (e) => {
        e.preventDefault();
        const params = {};
        for (const [key, [input, kind]] of Object.entries(inputs)) {
          if (input.value === "") continue;
          params[key] = kind === "number" ? Number(input.value) : input.value === "true" ? true : input.value === "false" ? false : input.value;
        }
        try {
          const job = await post("/jobs", { dataset_id: dsSelect.value, base_model: base.value, recipe: recipe.value, params: { ...carried, ...params } });
          location.href = `/ui/jobs/${job.id}`;
        } catch (err) {
          note.replaceChildren(errorBox(err));
        }
      },
    },
    prior ? h("p", { class: "muted", id: "job-from" }, `As job ${short(prior.id)} ran; change what you like.`, notes.map((n) => [" ", n]), kept) : null,
    h("label", {}, "Dataset ", dsSelect),
    h("label", {}, "Base model ", base),
    h("label", {}, "Recipe ", recipe),
    h("h2", {}, "Hyper-parameters (empty: the recipe's default)"),
    grid,
    h("p", {}, h("button", { class: "primary", type: "submit", id: "job-submit" }, "Start the fine-tune")),
    note,
  );
  render(prior ? `Run job ${short(prior.id)} again` : "New fine-tune", datasets.length ? form : h("p", {}, "Upload a dataset first, on the ", h("a", { href: "/ui/" }, "overview"), "."));
}

// ---- Job -----------------------------------------------------------------------------------

async function job(id) {
  const head = h("div", {});
  // Outside the head, which progress redraws every second.
  const refusal = h("div", { "aria-live": "polite" });
  // Whether the live view is reconnecting (kept apart from a refusal, which must stay shown).
  const connection = h("div", { "aria-live": "polite" });
  // What the dataset's repeated files mean for this job's figures.
  const repeats = h("div", {});
  const charts = h("div", { class: "charts" });
  const matrix = h("div", {});
  const perClass = h("div", {});
  const mistakes = h("div", {});
  render(`Job ${short(id)}`, head, refusal, connection, repeats, h("section", {}, h("h2", {}, "Training"), charts), h("section", {}, h("h2", {}, "Confusion matrix (best epoch, validation)"), matrix, perClass), h("section", {}, h("h2", {}, "What the model gets wrong (validation)"), mistakes));

  // A refused cancel (the job ended meanwhile: 409) says so below the head.
  async function cancelJob() {
    refusal.replaceChildren();
    try {
      await post(`/jobs/${id}/cancel`);
    } catch (e) {
      refusal.replaceChildren(errorBox(e));
    }
    drawHead();
  }

  async function drawHead() {
    const j = await get(`/jobs/${id}`);
    const cancel = !["succeeded", "failed", "cancelled"].includes(j.status)
      ? h("button", { class: "danger", onclick: cancelJob }, "Cancel")
      : deleteButton("Delete this job with its metrics? The model it made stays.", `/jobs/${id}`, "Delete job");
    head.replaceChildren(
      h("section", {},
        h("p", { class: "row" }, status(j.status), j.model_id ? h("a", { href: `/ui/models/${j.model_id}`, id: "job-model" }, `model ${short(j.model_id)}`) : null, h("a", { href: `/ui/new?from=${id}`, id: "job-again" }, "Run again…"), cancel),
        progressOf(j),
        table(["Dataset", "Base model", "Recipe", "Precision", "Worker", "Started", "Finished"], [[h("a", { href: `/ui/datasets/${j.dataset_id}` }, short(j.dataset_id)), j.base_model, j.recipe, j.precision ?? j.params.precision, j.worker ?? "–", when(j.started_at), when(j.finished_at)]]),
        j.decision ? h("p", {}, h("strong", {}, j.decision.action === "as_given" ? "stopped: " : "auto: "), j.decision.reason) : null,
        j.error ? errorBox(j.error) : null,
      ),
    );
    return j;
  }

  // The job's matrices are in its dataset's class order (null if the dataset is gone).
  let classes = null;
  // The last validated epoch drawn: the events replay earlier ones on connecting.
  let drawnEpoch = 0;

  async function drawMetrics() {
    const m = await get(`/jobs/${id}/metrics`);
    drawnEpoch = Math.max(0, ...m.validation.map((v) => v.epoch));
    charts.replaceChildren(
      lineChart("Training loss", [{ name: "loss", points: m.train.map((p) => [p.step, p.loss]) }], { xLabel: "step" }),
      lineChart("Learning rate", [{ name: "lr", points: m.train.map((p) => [p.step, p.learning_rate]) }], { xLabel: "step" }),
      lineChart("Validation", [
        { name: "accuracy", points: m.validation.map((v) => [v.epoch, v.accuracy]) },
        { name: "macro-F1", points: m.validation.map((v) => [v.epoch, v.f1]) },
      ], { xLabel: "epoch" }),
    );
    if (!m.validation.length) return;
    const best = m.validation.reduce((a, b) => (b.f1 > a.f1 || (b.f1 === a.f1 && b.loss < a.loss) ? b : a));
    const labels = matrixLabels(best, classes);
    matrix.replaceChildren(h("p", { class: "muted" }, `epoch ${best.epoch}: accuracy ${pct(best.accuracy)}, macro-F1 ${num(best.f1)}, calibration error ${num(best.ece)}`), heatmap(best.confusion_matrix, labels));
    perClass.replaceChildren(
      table(["Class", "#Precision", "#Recall", "#F1", "#Support"], labels.map((l) => {
        const c = best.per_class[l];
        return [l, { v: num(c.precision), num: true }, { v: num(c.recall), num: true }, { v: num(c.f1), num: true }, { v: c.support, num: true }];
      })),
    );
  }

  // Corrections of the mistakes' labels, saved as a copy of the dataset (none once it is gone).
  let fix = null;

  async function drawMistakes() {
    try {
      const m = await get(`/jobs/${id}/mistakes`);
      const figure = (x) => h("figure", { class: "thumb" }, apiImage(`/datasets/${m.dataset_id}/images/${x.blob}/thumbnail`, x.file), h("figcaption", {}, `true: ${x.label}`, h("br"), h("span", { class: "wrong" }, `predicted: ${x.predicted} (${pct(x.score)})`), fix ? [h("br"), fix.control(x.blob, x.label)] : null));
      mistakes.replaceChildren(
        m.mistakes.length
          ? h("div", { class: "grid", id: "mistakes" }, m.mistakes.map(figure))
          : h("p", { class: "muted" }, `No validation image was misclassified at epoch ${m.epoch}.`),
      );
    } catch (e) {
      mistakes.replaceChildren(h("p", { class: "muted" }, e.code === "not_validated" ? "No epoch has been validated yet." : e.message));
    }
  }

  const ended = (job) => ["succeeded", "failed", "cancelled"].includes(job.status);
  const j = await drawHead();
  const dataset = await get(`/datasets/${j.dataset_id}`).catch(() => null);
  classes = dataset ? dataset.classes : null;
  if (dataset) {
    fix = corrections(dataset.id, dataset.classes, id);
    main.append(fix.bar);
  }
  // Repeated files, and pictures that look alike, under two classes or in two splits.
  const worrying = (dup) => dup && (dup.across_classes || dup.across_splits);
  const reports = dataset ? [dataset.duplicates, dataset.look_alikes].filter(worrying) : [];
  if (reports.length) {
    repeats.replaceChildren(
      h("p", { class: "warning", id: "job-repeats" }, "Its dataset repeats pictures: ", reports.map(duplicatesSummary).join(" "),
        reports.some((dup) => dup.across_splits) ? " Where the dataset has its own validation or test split, those figures count images the model was trained on." : "",
        " ", h("a", { href: `/ui/datasets/${j.dataset_id}` }, "See which")),
    );
  }
  // The service going away while the page loads (a restart) does not end the page: the live view
  // below reconnects and draws the metrics again. An answer from the service still does.
  await drawMetrics().catch((e) => {
    if (e instanceof ApiError || ended(j)) throw e;
    connection.replaceChildren(h("p", { class: "muted" }, `reconnecting… (${e.message ?? e})`));
  });
  await drawMistakes();
  if (ended(j)) return;
  // Live: the event stream; the page redraws on progress (at most a few times a second). A stream
  // that ends before the job does (the service restarted, the network dropped) is reconnected,
  // after a pause that grows while the service stays out of reach.
  let last = 0;
  for (let failures = 0; ; ) {
    let finished = false;
    try {
      for await (const ev of events(`/jobs/${id}/events`)) {
        failures = 0;
        if (ev.event === "status") {
          finished = true;
          break;
        }
        if (ev.event === "metrics" && ev.data.epoch <= drawnEpoch) continue;
        if (ev.event === "metrics" || Date.now() - last > 1000) {
          last = Date.now();
          await drawHead();
          // Live progress carries the step's loss; a process that runs no jobs (--role api) sends
          // progress without it, so the charts follow the training phase instead.
          if (ev.event === "metrics" || ev.data.loss !== undefined || ev.data.phase === "training") await drawMetrics();
        }
      }
    } catch (e) {
      // A job that is gone, or a key refused: no reconnect would help. Anything else is retried.
      if (e instanceof ApiError && [401, 403, 404].includes(e.status)) {
        connection.replaceChildren(errorBox(e));
        return;
      }
    }
    if (finished) break;
    await new Promise((resolve) => setTimeout(resolve, Math.min(30000, 1000 * 2 ** failures++)));
    try {
      if (ended(await drawHead())) break;
      connection.replaceChildren();
    } catch (e) {
      connection.replaceChildren(h("p", { class: "muted" }, `reconnecting… (${e.message ?? e})`));
    }
  }
  await drawHead();
  await drawMetrics();
  await drawMistakes();
}

// ---- Model ---------------------------------------------------------------------------------

async function model(id) {
  const [m, datasets] = await Promise.all([get(`/models/${id}`), get("/datasets")]);
  const result = h("div", { "aria-live": "polite" });
  const ds = h("select", { id: "eval-dataset" }, datasets.map((d) => h("option", { value: d.id }, d.name)));
  const split = h("select", { id: "eval-split" }, h("option", { value: "" }, "test split if any, else all"), ["test", "validation", "train", "all"].map((s) => h("option", { value: s }, s)));
  const evaluate = async () => {
    const bar = h("progress", { max: 1, value: 0 });
    const note = h("span", { class: "muted", id: "eval-progress" }, "evaluating…");
    result.replaceChildren(h("p", {}, bar, " ", note));
    const stage = (p) => {
      if (p.stage === "waiting") note.textContent = "waiting for the evaluation before this one to end…";
      else if (p.stage === "loading") note.textContent = "loading the model…";
      else {
        note.textContent = `evaluated ${countText(p.evaluated)} of ${countText(p.images)} images`;
        bar.value = p.images ? p.evaluated / p.images : 0;
      }
    };
    try {
      const body = { dataset_id: ds.value };
      if (split.value) body.split = split.value;
      const r = await postWatching(`/models/${id}/evaluate`, body, stage);
      const labels = matrixLabels(r, m.labels);
      const summary = `accuracy ${pct(r.accuracy)}, macro-F1 ${num(r.f1)}, calibration error ${num(r.ece)}`;
      result.replaceChildren(h("p", {}, summary, h("span", { class: "muted" }, ` (${note.textContent})`)), heatmap(r.confusion_matrix, labels));
    } catch (e) {
      result.replaceChildren(errorBox(e));
    }
  };
  const downloadNote = h("div", {});
  const download = async () => {
    downloadNote.replaceChildren(h("span", { class: "muted" }, "preparing…"));
    try {
      const url = await objectUrl(`/models/${id}/download`);
      const a = h("a", { href: url, download: `vitforge-model-${id}.tar` });
      document.body.append(a);
      a.click();
      a.remove();
      // The browser has the file once the download has started: the copy in memory can go.
      setTimeout(() => URL.revokeObjectURL(url), 60000);
      downloadNote.replaceChildren();
    } catch (e) {
      downloadNote.replaceChildren(errorBox(e));
    }
  };
  const remove = deleteButton("Delete this model?", `/models/${id}`, "Delete model");
  // The aliases that name this model (for /predict?model=<alias>), and pointing one here.
  const aliases = h("div", { id: "aliases" });
  const aliasName = h("input", { type: "text", id: "alias-name", placeholder: "production", "aria-label": "Alias name" });
  const aliasNote = h("div", { "aria-live": "polite" });
  const drawAliases = async () => {
    const mine = (await get("/aliases")).filter((a) => a.model_id === id);
    aliases.replaceChildren(
      mine.length
        ? h("p", { class: "row" }, mine.map((a) => h("span", { class: "status" }, a.name, " ", h("button", { "aria-label": `Remove alias ${a.name}`, onclick: () => change(() => del(`/aliases/${encodeURIComponent(a.name)}`)) }, "×"))))
        : h("p", { class: "muted" }, "No alias names this model."),
    );
  };
  const change = async (action) => {
    aliasNote.replaceChildren();
    try {
      await action();
      await drawAliases();
    } catch (e) {
      aliasNote.replaceChildren(errorBox(e));
    }
  };
  const pointHere = () => change(async () => {
    await send("PUT", `/aliases/${encodeURIComponent(aliasName.value.trim())}`, { model_id: id });
    aliasName.value = "";
  });
  await drawAliases();
  const c = m.metrics?.calibration;
  render(
    `Model ${short(id)}`,
    h("p", { class: "row" }, h("button", { onclick: download }, "Download (tar for transformers)"), h("a", { href: `/ui/predict?model=${id}` }, "Predict with it"), remove),
    downloadNote,
    h("section", {}, h("h2", {}, "Validation (kept epoch)"),
      table(["Labels", "#Accuracy", "#Macro-F1", "#Loss", "#Calibration error"], [[m.labels.join(", "), { v: pct(m.metrics?.accuracy), num: true }, { v: num(m.metrics?.f1), num: true }, { v: num(m.metrics?.loss), num: true }, { v: num(m.metrics?.ece), num: true }]]),
      c ? h("p", { class: "muted" }, c.fitted ? `Scores calibrated: temperature ${num(c.temperature)}; validation calibration error ${num(c.validation_ece_before)} → ${num(c.validation_ece_after)}` : `Scores not calibrated: ${c.reason || "no reason recorded"}.`) : null),
    h("section", {}, h("h2", {}, "Aliases"),
      h("p", { class: "muted" }, "A name for /predict?model=<name> that stays on a model until pointed elsewhere (without one, /predict takes the newest model)."),
      aliases, h("p", { class: "row" }, aliasName, h("button", { id: "alias-set", onclick: pointHere }, "Point here")), aliasNote),
    h("section", {}, h("h2", {}, "Trained with"), table(["Base model", "Recipe", "Job"], [[m.base_model, m.recipe ?? "–", m.job_id ? h("a", { href: `/ui/jobs/${m.job_id}` }, short(m.job_id)) : "–"]]),
      h("pre", { class: "mono" }, JSON.stringify(m.params, null, 2))),
    h("section", {}, h("h2", {}, "Evaluate on a dataset"), h("p", { class: "row" }, ds, split, h("button", { class: "primary", onclick: evaluate }, "Evaluate")), result),
  );
}

// ---- Predict -------------------------------------------------------------------------------

async function predict() {
  const [models, aliases] = await Promise.all([get("/models"), get("/aliases")]);
  const want = new URLSearchParams(location.search).get("model");
  const labels = new Map(models.map((m) => [m.id, m.labels.join(", ")]));
  const choice = h("select", { id: "predict-model" },
    aliases.length ? h("optgroup", { label: "Aliases" }, aliases.map((a) => h("option", { value: a.name, selected: a.name === want }, `${a.name} → ${short(a.model_id)} (${labels.get(a.model_id) ?? "?"})`))) : null,
    h("optgroup", { label: "Models" }, models.map((m, i) => h("option", { value: m.id, selected: want ? m.id === want : i === 0 }, `${short(m.id)} (${m.labels.join(", ")})${i === 0 ? " — newest" : ""}`))));
  const input = h("input", { type: "file", id: "predict-file", accept: "image/*", multiple: true });
  const results = h("div", { id: "predictions", "aria-live": "polite" });
  // The picture sent, as the browser shows it; a format it cannot show (TIFF in most browsers)
  // gets a note in its place, its prediction all the same.
  const preview = (file) =>
    h("img", {
      src: URL.createObjectURL(file),
      alt: file.name,
      style: "max-width:160px;max-height:160px;border-radius:4px",
      onload: (ev) => URL.revokeObjectURL(ev.target.src),
      onerror: (ev) => (URL.revokeObjectURL(ev.target.src), ev.target.replaceWith(h("div", { class: "no-preview" }, "no preview: this browser cannot show the format"))),
    });
  async function classify(files) {
    if (!files.length) return;
    const form = new FormData();
    for (const f of files) form.append("image", f, f.name);
    results.replaceChildren(h("p", { class: "muted" }, "classifying…"));
    try {
      const r = await (await send("POST", `/predict?top_k=5&model=${encodeURIComponent(choice.value)}`, form)).json();
      results.replaceChildren(
        ...r.predictions.map((p, i) =>
          h("section", { class: "prediction" },
            h("div", { class: "row" }, preview(files[i]),
              h("div", {}, h("h2", { class: "label" }, p.label), h("p", { class: "muted" }, `${files[i].name} · ${pct(p.score)}`))),
            h("div", { class: "topk" }, p.top_k.map((t) => [h("span", {}, t.label), h("div", { class: "bar" }, h("div", { style: `width:${(t.score * 100).toFixed(1)}%` })), h("span", { class: "num" }, pct(t.score))])),
          ),
        ),
      );
    } catch (e) {
      results.replaceChildren(errorBox(e));
    }
  }
  input.addEventListener("change", () => classify([...input.files]));
  const zone = h("div", { class: "drop", id: "predict-drop" }, "Drop images here, or pick them: ", input);
  zone.addEventListener("dragover", (e) => (e.preventDefault(), zone.classList.add("over")));
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => (e.preventDefault(), zone.classList.remove("over"), classify([...e.dataTransfer.files])));
  render("Predict", models.length ? h("div", {}, h("label", {}, "Model ", choice), zone, results) : h("p", {}, "No model yet: ", h("a", { href: "/ui/new" }, "fine-tune one"), "."));
}

// ---- Routing -------------------------------------------------------------------------------

const routes = [
  [/^\/ui\/?$/, overview],
  [/^\/ui\/datasets\/([^/]+)$/, dataset],
  [/^\/ui\/new$/, newJob],
  [/^\/ui\/jobs\/([^/]+)$/, job],
  [/^\/ui\/models\/([^/]+)$/, model],
  [/^\/ui\/predict$/, predict],
];

async function start() {
  for (const [pattern, page] of routes) {
    const m = location.pathname.match(pattern);
    if (m) {
      try {
        await page(...m.slice(1).map(decodeURIComponent));
      } catch (e) {
        render("Something went wrong", errorBox(e));
      }
      return;
    }
  }
  render("Not found", h("p", {}, "No console page here. ", h("a", { href: "/ui/" }, "Overview")));
}

start();
