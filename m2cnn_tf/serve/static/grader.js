// The grader page: sends each photograph to POST /v1/grade (a few at a time, so that the
// server can micro-batch them), fills one row per file in #results, shows Grad-CAM on click,
// and writes the results as predict.py's CSV. Plain JS, no dependencies, works offline.
"use strict";

const body = document.body;
// Enough requests in flight to fill the server's batches, within a browser's 6 per host.
const CONCURRENT_UPLOADS = Math.max(1, Math.min(6, Number(body.dataset.maxBatch) || 1));
const GRADES = JSON.parse(body.dataset.grades);
const COLUMNS = JSON.parse(body.dataset.columns);
// predict.py's rule against CSV formula injection (m2cnn_tf/prediction.py, csv_text): a text
// cell that starts with one of these gets a leading "'"; numbers are left as they are.
const CSV_TEXT_COLUMNS = JSON.parse(body.dataset.csvTextColumns);
const FORMULA_PREFIXES = JSON.parse(body.dataset.formulaPrefixes);
// A busy server answers 503 with Retry-After: wait that long and try again, a few times.
const BUSY_RETRIES = 5;
const EXTENSIONS = JSON.parse(body.dataset.extensions);
const tbody = document.querySelector("#results tbody");
const entries = []; // {name, file, row, state, result} in the order the files were added
const waiting = [];
let running = 0;

function el(tag, props = {}, children = []) {
  const node = Object.assign(document.createElement(tag), props);
  for (const child of children) node.append(child);
  return node;
}

function hasImageExtension(name) {
  const lower = name.toLowerCase();
  return EXTENSIONS.some((ext) => lower.endsWith(ext));
}

// ------------------------------------------------------------------------------------------
// Adding files: picker, folder picker, drag and drop (files and folders)

function addFiles(files, fromFolder) {
  for (const file of files) {
    const name = file.relativePath || file.webkitRelativePath || file.name;
    if (fromFolder && !hasImageExtension(name)) continue; // as predict.py does with folders
    const entry = { name, file, state: "waiting", result: null };
    entry.row = makeRow(entry);
    entries.push(entry);
    waiting.push(entry);
  }
  pump();
  refreshSummary();
}

async function filesOfEntry(entry, prefix) {
  if (entry.isFile) {
    const file = await new Promise((ok, fail) => entry.file(ok, fail));
    file.relativePath = prefix + file.name;
    return [file];
  }
  const reader = entry.createReader();
  const found = [];
  for (;;) {
    const batch = await new Promise((ok, fail) => reader.readEntries(ok, fail));
    if (!batch.length) break;
    for (const child of batch) found.push(...(await filesOfEntry(child, prefix + entry.name + "/")));
  }
  return found;
}

async function onDrop(event) {
  event.preventDefault();
  drop.classList.remove("over");
  const items = [...event.dataTransfer.items].map((item) => item.webkitGetAsEntry?.());
  if (items.length && items.every(Boolean)) {
    for (const item of items) {
      const files = await filesOfEntry(item, "");
      addFiles(files, item.isDirectory);
    }
  } else {
    addFiles(event.dataTransfer.files, false);
  }
}

// ------------------------------------------------------------------------------------------
// Grading

function pump() {
  while (running < CONCURRENT_UPLOADS && waiting.length) {
    const entry = waiting.shift();
    running += 1;
    grade(entry).finally(() => {
      running -= 1;
      pump();
    });
  }
}

async function post(file, name, gradcam) {
  let response;
  for (let attempt = 0; ; attempt += 1) {
    const form = new FormData();
    form.append("files", file, name);
    response = await fetch("/v1/grade" + (gradcam ? "?gradcam=1" : ""), {
      method: "POST",
      body: form,
      credentials: "same-origin",
    });
    if (response.status !== 503 || attempt >= BUSY_RETRIES) break;
    const seconds = Math.min(60, Math.max(1, Number(response.headers.get("Retry-After")) || 2));
    await new Promise((ok) => setTimeout(ok, seconds * 1000));
  }
  const payload = await response.json().catch(() => ({}));
  if (!response.ok) {
    throw new Error(payload.detail || `the server answered ${response.status}`);
  }
  return payload.results[0];
}

async function grade(entry) {
  setState(entry, "grading");
  try {
    entry.result = await post(entry.file, entry.name, false);
  } catch (err) {
    entry.result = { filename: entry.name, grade: null, warnings: [], error: String(err.message) };
  }
  setState(entry, entry.result.error ? "error" : "done");
  fillRow(entry);
  refreshSummary();
}

// ------------------------------------------------------------------------------------------
// The table

function makeRow(entry) {
  const thumb = el("img", { className: "thumb", alt: "" });
  thumb.src = URL.createObjectURL(entry.file);
  thumb.addEventListener("error", () => thumb.classList.add("none"));
  const row = el("tr", { className: "row" }, [
    el("td", {}, [
      el("div", { className: "file" }, [thumb, el("span", { className: "name", textContent: entry.name })]),
    ]),
    el("td", { className: "grade" }, [el("progress", { title: "waiting" })]),
    el("td", { className: "score" }),
    el("td", { className: "probs" }),
    el("td", { className: "referable" }),
    el("td", { className: "notes" }),
  ]);
  row.addEventListener("click", () => showGradcam(entry));
  tbody.append(row);
  return row;
}

function setState(entry, state) {
  entry.state = state;
  entry.row.dataset.state = state;
  const progress = entry.row.querySelector("progress");
  if (progress) progress.title = state;
}

function bar(value, label, title) {
  const fill = el("span", { className: "fill" });
  fill.style.width = `${Math.max(0, Math.min(1, value)) * 100}%`;
  return el("span", { className: "bar", title }, [el("span", { className: "label", textContent: label }), el("span", { className: "track" }, [fill])]);
}

function fillRow(entry) {
  const r = entry.result;
  const cells = entry.row.children;
  if (r.error) {
    cells[1].replaceChildren(el("span", { className: "error", textContent: "not graded" }));
    cells[5].replaceChildren(el("span", { className: "error", textContent: r.error }));
    return;
  }
  cells[1].replaceChildren(
    el("strong", { textContent: String(r.grade) }),
    " ",
    el("span", { textContent: GRADES[r.grade] }),
  );
  cells[2].replaceChildren(bar(r.score / (GRADES.length - 1), r.score.toFixed(2), `score ${r.score}`));
  cells[3].replaceChildren(
    ...r.probabilities.map((p, k) => bar(p, String(k), `p${k} = ${p.toFixed(4)} (${GRADES[k]})`)),
  );
  cells[4].replaceChildren(
    el("span", { className: r.referable ? "flag yes" : "flag no", textContent: r.referable ? "referable" : "no" }),
  );
  cells[5].replaceChildren(...r.warnings.map((w) => el("p", { className: "warning", textContent: w })));
}

function refreshSummary() {
  const done = entries.filter((e) => e.state === "done");
  const failed = entries.filter((e) => e.state === "error").length;
  const pending = entries.length - done.length - failed;
  const referable = done.filter((e) => e.result.referable).length;
  const parts = [`${done.length} graded`, `${referable} referable`, `${failed} not graded`];
  if (pending) parts.push(`${pending} in progress`);
  document.getElementById("summary").textContent = entries.length ? parts.join(", ") : "No photographs yet.";
  document.getElementById("download").disabled = done.length + failed === 0;
  document.getElementById("clear").disabled = pending > 0 || entries.length === 0;
}

// ------------------------------------------------------------------------------------------
// Grad-CAM view

async function showGradcam(entry) {
  if (entry.state !== "done") return;
  const dialog = document.getElementById("gradcam-view");
  const img = document.getElementById("gradcam-img");
  const status = document.getElementById("gradcam-status");
  const r = entry.result;
  document.getElementById("gradcam-title").textContent =
    `${entry.name}: grade ${r.grade} (${GRADES[r.grade]}), score ${r.score.toFixed(2)}`;
  img.removeAttribute("src");
  dialog.showModal();
  if (!entry.gradcam) {
    status.textContent = "Computing Grad-CAM…";
    try {
      entry.gradcam = (await post(entry.file, entry.name, true)).gradcam_png;
    } catch (err) {
      status.textContent = `Grad-CAM failed: ${err.message}`;
      return;
    }
  }
  status.textContent = "";
  img.src = `data:image/png;base64,${entry.gradcam}`;
}

// ------------------------------------------------------------------------------------------
// CSV: predict.py's columns and number format (6 decimals), csv module's quoting and CRLF

function fixed6(x) {
  return Object.is(x, -0) ? "-0.000000" : x.toFixed(6);
}

function csvField(value) {
  const text = String(value);
  return /[",\r\n]/.test(text) ? `"${text.replace(/"/g, '""')}"` : text;
}

function csvText(text) {
  return FORMULA_PREFIXES.some((p) => text.startsWith(p)) ? `'${text}` : text;
}

function csvRow(entry) {
  const r = entry.result;
  const values = { path: entry.name, error: r.error || "" };
  if (!r.error) {
    values.grade = r.grade;
    values.grade_prob = r.probabilities.indexOf(Math.max(...r.probabilities));
    values.score = fixed6(r.score);
    r.probabilities.forEach((p, k) => (values[`p${k}`] = fixed6(p)));
  }
  for (const c of CSV_TEXT_COLUMNS) values[c] = csvText(values[c]);
  return COLUMNS.map((c) => csvField(values[c] ?? "")).join(",");
}

function downloadCsv() {
  const finished = entries.filter((e) => e.state === "done" || e.state === "error");
  const text = [COLUMNS.join(","), ...finished.map(csvRow)].join("\r\n") + "\r\n";
  const link = el("a", { download: "predictions.csv" });
  link.href = URL.createObjectURL(new Blob([text], { type: "text/csv" }));
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(link.href), 10000);
}

function clearResults() {
  for (const entry of entries) URL.revokeObjectURL(entry.row.querySelector("img").src);
  entries.length = 0;
  tbody.replaceChildren();
  refreshSummary();
}

// ------------------------------------------------------------------------------------------

const drop = document.getElementById("drop");
drop.addEventListener("dragover", (event) => {
  event.preventDefault();
  drop.classList.add("over");
});
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", onDrop);
document.getElementById("pick-files").addEventListener("change", (event) => {
  addFiles(event.target.files, false);
  event.target.value = "";
});
document.getElementById("pick-folder").addEventListener("change", (event) => {
  addFiles(event.target.files, true);
  event.target.value = "";
});
document.getElementById("download").addEventListener("click", downloadCsv);
document.getElementById("clear").addEventListener("click", clearResults);
