// Greedy generation with a qwen3vl-merge combined folder from Node.js: one InferenceSession, no host glue
// beyond the loop (positions, image merge and DeepStack are inside the model).
//
//   node generate.mjs COMBINED_DIR INPUTS.json NEW_TOKENS [node|web]
//
// RUNTIME: "node" (onnxruntime-node, native; the default) or "web" (onnxruntime-web, the WebAssembly build that
// browsers run; here under Node, the model and its external data handed over as bytes, as a page would fetch them;
// WebAssembly's 4 GiB memory bounds the folder it can hold).
//
// INPUTS.json: {"input_ids": [[...]], "attention_mask": [[...]], "pixel_values": [[...], ...],
//               "image_grid_thw": [[t, h, w], ...],
//               "pixel_values_videos": [[...], ...], "video_grid_thw": [[t, h, w], ...]}
//   (each pair may be empty lists; the video entries may be left out: the call then has no video)
// Prints {"tokens": [[...]], "prefill_argmax": [[...]]} as JSON.
//
// Bad arguments (a missing folder, an unreadable or malformed inputs file, a bad token count) are refused in one
// line on stderr, exit status 2; a call the model refuses (its own checks, merge/checks/*: an id outside the
// vocabulary, a mask that is not 0...0 1...1) is reported in one line, exit status 1. No stack traces.
import fs from "node:fs";
import path from "node:path";

const USAGE = "usage: node generate.mjs COMBINED_DIR INPUTS.json [NEW_TOKENS] [node|web]";
const MAX_NEW_TOKENS = 1 << 20;

class UsageError extends Error {}

function fail(message, status) {
  process.stderr.write(`error: ${String(message).split("\n")[0]}\n`);
  process.exit(status);
}

process.on("uncaughtException", (error) => fail(error?.message ?? error, error instanceof UsageError ? 2 : 1));
process.on("unhandledRejection", (error) => fail(error?.message ?? error, error instanceof UsageError ? 2 : 1));

function readJson(file, what) {
  let raw;
  try {
    raw = fs.readFileSync(file, "utf8");
  } catch (error) {
    throw new UsageError(`${what} ${file} cannot be read (${error.code ?? error.message})`);
  }
  try {
    return JSON.parse(raw);
  } catch (error) {
    throw new UsageError(`${what} ${file} is not valid JSON (${error.message})`);
  }
}

// a rectangular list of rows of numbers; ints: safe integers only (ids, masks, grids)
function matrix(value, name, { ints = false, width = null, rows = null, allowEmpty = false } = {}) {
  if (!Array.isArray(value) || (!allowEmpty && value.length === 0)) {
    throw new UsageError(`inputs: ${name} must be a${allowEmpty ? "" : " non-empty"} list of rows`);
  }
  if (rows !== null && value.length !== rows) {
    throw new UsageError(`inputs: ${name} has ${value.length} rows, input_ids ${rows}`);
  }
  const cols = width ?? (value.length ? value[0]?.length : 0);
  value.forEach((row, i) => {
    if (!Array.isArray(row) || row.length !== cols || (!allowEmpty && cols === 0)) {
      throw new UsageError(`inputs: ${name} row ${i} must be a list of ${cols || "one or more"} numbers`);
    }
    const bad = row.findIndex((x) => (ints ? !Number.isSafeInteger(x) : !Number.isFinite(x)));
    if (bad >= 0) {
      const shown = typeof row[bad] === "number" ? String(row[bad]) : JSON.stringify(row[bad]);
      throw new UsageError(`inputs: ${name}[${i}][${bad}] = ${shown} is not ${ints ? "an integer" : "a finite number"}`);
    }
  });
  return value;
}

const args = process.argv.slice(2);
if (args.length < 2 || args.length > 4) throw new UsageError(USAGE);
const [folder, inputsPath, newTokensArg = "8", runtime = "node"] = args;
if (!/^[0-9]+$/.test(newTokensArg) || Number(newTokensArg) < 1 || Number(newTokensArg) > MAX_NEW_TOKENS) {
  throw new UsageError(`NEW_TOKENS must be a whole number from 1 to ${MAX_NEW_TOKENS}, got ${JSON.stringify(newTokensArg)}`);
}
const newTokens = Number(newTokensArg);
if (!["node", "web"].includes(runtime)) throw new UsageError(`runtime ${JSON.stringify(runtime)}: choose node or web`);
if (!fs.existsSync(folder) || !fs.statSync(folder).isDirectory()) throw new UsageError(`${folder}: no such folder`);
if (!fs.existsSync(path.join(folder, "model.onnx"))) throw new UsageError(`${folder} is not a combined folder: no model.onnx`);
const config = readJson(path.join(folder, "config.json"), "config");
const text = config.text_config;
const kvHeads = text.num_key_value_heads;
const headDim = text.head_dim ?? text.hidden_size / text.num_attention_heads;
// the keys and values kept between calls: float32, or float16 (merge.json's kv_cache; folders before it: float32)
const manifestPath = path.join(folder, "merge.json");
const kvCache = fs.existsSync(manifestPath) ? (readJson(manifestPath, "manifest").kv_cache ?? "float32") : "float32";
const emptyPast = { float32: () => new Float32Array(0), float16: () => new Uint16Array(0) }[kvCache];
if (!emptyPast) throw new UsageError(`${manifestPath}: kv_cache ${JSON.stringify(kvCache)} is not float32 or float16`);
const inputs = readJson(inputsPath, "inputs file");
if (inputs === null || typeof inputs !== "object" || Array.isArray(inputs)) {
  throw new UsageError(`inputs file ${inputsPath} must hold a JSON object`);
}
matrix(inputs.input_ids, "input_ids", { ints: true });
matrix(inputs.attention_mask, "attention_mask", { ints: true, width: inputs.input_ids[0].length, rows: inputs.input_ids.length });
for (const [pixels, grid] of [["pixel_values", "image_grid_thw"], ["pixel_values_videos", "video_grid_thw"]]) {
  const optional = pixels === "pixel_values_videos";
  if (optional && inputs[pixels] === undefined && inputs[grid] === undefined) continue;
  matrix(inputs[pixels], pixels, { allowEmpty: true });
  matrix(inputs[grid], grid, { ints: true, width: 3, allowEmpty: true });
}
const ortModule = await import(runtime === "web" ? "onnxruntime-web" : "onnxruntime-node");
const ort = ortModule.default ?? ortModule;

async function createSession() {
  const modelPath = path.join(folder, "model.onnx");
  if (runtime === "node") return ort.InferenceSession.create(modelPath);
  ort.env.wasm.numThreads = 1;
  const dataName = "model.onnx.data";
  const externalData = fs.existsSync(path.join(folder, dataName))
    ? [{ path: dataName, data: fs.readFileSync(path.join(folder, dataName)) }] : [];
  return ort.InferenceSession.create(fs.readFileSync(modelPath), { executionProviders: ["wasm"], externalData });
}

const session = await createSession();
const pastNames = session.inputNames.filter((n) => n.startsWith("past_key_values."));
const patchDim = inputs.pixel_values.length ? inputs.pixel_values[0].length
  : inputs.pixel_values_videos?.length ? inputs.pixel_values_videos[0].length : null;

const int64 = (rows) => new ort.Tensor("int64", BigInt64Array.from(rows.flat().map(BigInt)), [rows.length, rows[0].length]);
const batch = inputs.input_ids.length;
let mask = inputs.attention_mask.map((r) => r.slice());

function argmaxLast(logits) {
  const [b, s, v] = logits.dims;
  const out = [];
  for (let i = 0; i < b; i++) {
    const base = (i * s + (s - 1)) * v;
    let best = 0;
    for (let j = 1; j < v; j++) if (logits.data[base + j] > logits.data[base + best]) best = j;
    out.push(best);
  }
  return out;
}

function argmaxAll(logits) {
  const [b, s, v] = logits.dims;
  const out = [];
  for (let i = 0; i < b; i++) {
    const row = [];
    for (let p = 0; p < s; p++) {
      const base = (i * s + p) * v;
      let best = 0;
      for (let j = 1; j < v; j++) if (logits.data[base + j] > logits.data[base + best]) best = j;
      row.push(best);
    }
    out.push(row);
  }
  return out;
}

const pixelDim = patchDim ?? session.inputMetadata?.find?.((m) => m.name === "pixel_values")?.shape?.[1] ?? 1536;
let feeds = {
  input_ids: int64(inputs.input_ids),
  attention_mask: int64(mask),
  pixel_values: new ort.Tensor("float32", Float32Array.from(inputs.pixel_values.flat()), [inputs.pixel_values.length, pixelDim]),
  image_grid_thw: new ort.Tensor("int64", BigInt64Array.from(inputs.image_grid_thw.flat().map(BigInt)), [inputs.image_grid_thw.length, 3]),
  rope_deltas: new ort.Tensor("int64", new BigInt64Array(batch), [batch, 1]),
};
const videoRows = inputs.pixel_values_videos ?? [];
const videoGrid = inputs.video_grid_thw ?? [];
feeds.pixel_values_videos = new ort.Tensor("float32", Float32Array.from(videoRows.flat()), [videoRows.length, pixelDim]);
feeds.video_grid_thw = new ort.Tensor("int64", BigInt64Array.from(videoGrid.flat().map(BigInt)), [videoGrid.length, 3]);
for (const name of pastNames) feeds[name] = new ort.Tensor(kvCache, emptyPast(), [batch, kvHeads, 0, headDim]);
// logits_to_keep is an optional input (optional(tensor(int64))): ONNX Runtime runs without it, but the JavaScript
// API asks for every input it lists, so this loop feeds it: 0 keeps every position (the prefill's argmax is
// reported per position), 1 only the last (all a decode step needs).
const keeps = session.inputNames.includes("logits_to_keep");
const keep = (n) => new ort.Tensor("int64", BigInt64Array.from([BigInt(n)]), []);
if (keeps) feeds.logits_to_keep = keep(0);

const tokens = Array.from({ length: batch }, () => []);
// a call the model refuses throws, and this client reports it in one line: ONNX Runtime need not log it too
const quiet = { logSeverityLevel: 4 };
let out = await session.run(feeds, quiet);
const prefillArgmax = argmaxAll(out.logits);
for (let step = 0; step < newTokens; step++) {
  const next = argmaxLast(out.logits);
  next.forEach((t, i) => tokens[i].push(t));
  if (step === newTokens - 1) break;
  mask = mask.map((r) => [...r, 1]);
  feeds = {
    input_ids: int64(next.map((t) => [t])),
    attention_mask: int64(mask),
    pixel_values: new ort.Tensor("float32", new Float32Array(0), [0, pixelDim]),
    image_grid_thw: new ort.Tensor("int64", new BigInt64Array(0), [0, 3]),
    pixel_values_videos: new ort.Tensor("float32", new Float32Array(0), [0, pixelDim]),
    video_grid_thw: new ort.Tensor("int64", new BigInt64Array(0), [0, 3]),
    rope_deltas: out.rope_deltas_out,
  };
  for (const name of pastNames) feeds[name] = out[name.replace("past_key_values.", "present.")];
  if (keeps) feeds.logits_to_keep = keep(1);
  out = await session.run(feeds, quiet);
}
process.stdout.write(JSON.stringify({ tokens, prefill_argmax: prefillArgmax }) + "\n");
