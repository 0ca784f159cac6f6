// Runs a parscale export in the browser with onnxruntime-web, through the graph contract
// (parscale/contract.py): no DOM here; page.js draws the page and exposes window.parscale.
//
// Why onnxruntime-web directly and not transformers.js's generate(): a multi-P export picks P from
// the KV-cache heads it is fed (P * Hkv), and transformers.js sizes its cache from the graph's input
// shapes, whose cache-heads axis is symbolic there. The tokenizer is transformers.js's own
// (@huggingface/tokenizers, the package transformers.js tokenizes with), loaded from the export's
// tokenizer.json and tokenizer_config.json.

const VENDOR = new URL('./vendor/', import.meta.url);
const ORT_BUILDS = { wasm: 'onnxruntime-web/ort.wasm.min.mjs', webgpu: 'onnxruntime-web/ort.webgpu.min.mjs' };
const SUPPORTED_FORMATS = [4]; // parscale.json format_version this page runs (older exports: re-export)
// The first WebGPU failure of this page: onnxruntime-web's module may be left broken by it (a trap
// inside WebAssembly), so WebGPU is not tried again until the page is reloaded.
let webgpuFailure = null;
// WASM threads per onnxruntime-web build, fixed when its WebAssembly starts (later settings are ignored).
const startedThreads = new Map();

/**
 * Where to run: WebGPU when navigator.gpu gives an adapter, WASM otherwise, with the reason;
 * `fallback`: whether a failing WebGPU session may still fall back to WASM ("auto" only).
 */
export async function chooseBackend(requested = 'auto', nav = globalThis.navigator) {
  if (!['auto', 'wasm', 'webgpu'].includes(requested)) {
    throw new Error(`backend must be "auto", "wasm" or "webgpu", got ${JSON.stringify(requested)}`);
  }
  if (requested === 'wasm') return { backend: 'wasm', reason: 'WASM requested', fallback: false };
  let why;
  if (!nav?.gpu) {
    why = 'navigator.gpu is absent (no WebGPU in this browser or context)';
  } else {
    try {
      const adapter = await nav.gpu.requestAdapter();
      if (adapter) return { backend: 'webgpu', reason: 'navigator.gpu gave an adapter', fallback: requested === 'auto' };
      why = 'navigator.gpu gave no adapter';
    } catch (e) {
      why = `navigator.gpu.requestAdapter failed: ${e?.message ?? e}`;
    }
  }
  if (requested === 'webgpu') throw new Error(`WebGPU was requested but ${why}`);
  return { backend: 'wasm', reason: why, fallback: false };
}

async function fetchOk(url, what) {
  let response;
  try {
    response = await fetch(url);
  } catch (e) {
    throw new Error(`cannot fetch ${what} (${url}): ${e.message}`);
  }
  if (!response.ok) throw new Error(`cannot fetch ${what} (${url}): HTTP ${response.status}`);
  return response;
}

async function fetchJson(url, what) {
  const response = await fetchOk(url, what);
  try {
    return await response.json();
  } catch (e) {
    throw new Error(`${what} (${url}) is not valid JSON: ${e.message}`);
  }
}

async function fetchBytes(url, what, onProgress) {
  const response = await fetchOk(url, what);
  const total = Number(response.headers.get('Content-Length')) || 0;
  if (!response.body || !onProgress) return new Uint8Array(await response.arrayBuffer());
  const out = total ? new Uint8Array(total) : null;
  const parts = [];
  let got = 0;
  for (const reader = response.body.getReader(); ;) {
    const { done, value } = await reader.read();
    if (done) break;
    if (out && got + value.length <= total) out.set(value, got); else parts.push(value);
    got += value.length;
    onProgress(what, got, total);
  }
  if (out && got === total && parts.length === 0) return out;
  const joined = new Uint8Array(got);
  let at = 0;
  for (const p of out ? [out.subarray(0, Math.min(got, total)), ...parts] : parts) { joined.set(p, at); at += p.length; }
  return joined;
}

/** What the graph needs from parscale.json: names, sizes, the P it serves; refuses what the page cannot run. */
export function describeExport(manifest, url = 'parscale.json') {
  if (manifest?.format !== 'parscale-export') throw new Error(`${url} is not a parscale export manifest`);
  if (!SUPPORTED_FORMATS.includes(manifest.format_version)) {
    throw new Error(`${url}: export format ${manifest.format_version} is not one this page runs ` +
      `(${SUPPORTED_FORMATS.join(', ')}); re-export it with this parscale`);
  }
  const web = manifest.web;
  if (web && web.runs === false) {
    throw new Error(`this export cannot run in the browser: ${(web.problems ?? []).join('; ')}`);
  }
  const m = manifest.model;
  const cache = manifest.io?.cache ?? {};
  const streams = Array.isArray(cache.streams) && cache.streams.length ? cache.streams : [m.P];
  const kvHeads = cache.kv_heads_per_stream ?? m.num_key_value_heads;
  const files = Object.keys(manifest.files ?? {});
  return {
    streams, kvHeads, defaultP: m.P, layers: m.num_hidden_layers, headDim: m.head_dim, vocab: m.vocab_size,
    prefixRows: cache.prefix_rows ?? 0, maxPositions: m.max_position_embeddings,
    cacheType: manifest.dtype === 'fp16' ? 'float16' : 'float32', dtype: manifest.dtype,
    quantization: manifest.quantization?.scheme ? `int${manifest.quantization.scheme.bits}` : 'none',
    externalData: files.includes('model.onnx.data') ? 'model.onnx.data' : null,
    hasTokenizer: files.includes('tokenizer.json'),
    warnings: web?.warnings ?? [],
  };
}

function eosIds(generationConfig, config) {
  const eos = generationConfig?.eos_token_id ?? config?.eos_token_id;
  return new Set((Array.isArray(eos) ? eos : eos == null ? [] : [eos]).map(Number));
}

/** Byte-level BPE tokens can end inside a character: emit text only up to a clean boundary (as text.py). */
class IncrementalDecoder {
  constructor(tokenizer) { Object.assign(this, { tokenizer, ids: [], prefix: 0, read: 0 }); }

  decode(ids) { return ids.length ? this.tokenizer.decode(ids, { skip_special_tokens: true }) : ''; }

  push(token) {
    this.ids.push(token);
    const before = this.decode(this.ids.slice(this.prefix, this.read));
    const window = this.decode(this.ids.slice(this.prefix));
    if (window.length <= before.length || window.endsWith('\uFFFD')) return '';
    [this.prefix, this.read] = [this.read, this.ids.length];
    const piece = window.slice(before.length);
    this.emitted = (this.emitted ?? '') + piece;
    return piece;
  }

  /** Whatever text is left at the end (e.g. a truly invalid byte sequence shown as U+FFFD). */
  flush() {
    const full = this.decode(this.ids);
    const emitted = this.emitted ?? '';
    return full.startsWith(emitted) ? full.slice(emitted.length) : '';
  }
}

/** A small seeded generator (mulberry32), so that a sampled run can be repeated. */
function rng(seed) {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6D2B79F5) >>> 0;
    let t = Math.imul(a ^ (a >>> 15), 1 | a);
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

function argmax(row) {
  let best = 0;
  for (let i = 1; i < row.length; i++) if (row[i] > row[best]) best = i;
  return best;
}

function sample(row, temperature, topP, random) {
  const top = row[argmax(row)]; // subtracted before exp(): no overflow
  const order = Array.from(row.keys());
  // Sorted only for nucleus sampling: sorting a 150k vocabulary every step costs more than the step.
  if (topP < 1) order.sort((a, b) => row[b] - row[a]);
  const weights = order.map((i) => Math.exp((row[i] - top) / temperature));
  let keep = order.length;
  if (topP < 1) {
    const sum = weights.reduce((a, b) => a + b, 0);
    for (let i = 0, mass = 0; i < order.length; i++) {
      mass += weights[i] / sum;
      if (mass >= topP) { keep = i + 1; break; }
    }
  }
  const kept = weights.slice(0, keep).reduce((a, b) => a + b, 0);
  let r = random() * kept;
  for (let i = 0; i < keep; i++) { r -= weights[i]; if (r <= 0) return order[i]; }
  return order[keep - 1];
}

/** A loaded export: one InferenceSession for every P it serves (P is chosen by the cache it is fed). */
export class ParScaleModel {
  static async load(url, { backend = 'auto', threads, onProgress } = {}) {
    const base = new URL(url.endsWith('/') ? url : `${url}/`, location.href);
    const manifest = await fetchJson(new URL('parscale.json', base), 'the export manifest');
    const info = describeExport(manifest, new URL('parscale.json', base).href);
    const [config, generationConfig] = await Promise.all([
      fetchJson(new URL('config.json', base), 'config.json'),
      manifest.files?.['generation_config.json'] ? fetchJson(new URL('generation_config.json', base), 'generation_config.json') : null,
    ]);
    let tokenizer = null;
    if (info.hasTokenizer) {
      const { Tokenizer } = await import(new URL('tokenizers/tokenizers.min.mjs', VENDOR).href);
      const [json, cfg] = await Promise.all([
        fetchJson(new URL('tokenizer.json', base), 'tokenizer.json'),
        manifest.files?.['tokenizer_config.json'] ? fetchJson(new URL('tokenizer_config.json', base), 'tokenizer_config.json') : {},
      ]);
      tokenizer = new Tokenizer(json, cfg);
    }
    const choice = await chooseBackend(backend);
    const bytes = await fetchBytes(new URL('model.onnx', base), 'model.onnx', onProgress);
    const externalData = info.externalData
      ? [{ path: info.externalData, data: await fetchBytes(new URL(info.externalData, base), info.externalData, onProgress) }]
      : undefined;
    const model = new ParScaleModel({ base: base.href, manifest, info, config, eos: eosIds(generationConfig, config), tokenizer });
    await model.#start(choice, { bytes, externalData, threads });
    return model;
  }

  constructor(fields) {
    Object.assign(this, fields);
    this.busy = false;
  }

  /**
   * Open the session on the chosen backend. In "auto" mode a WebGPU session must also pass a probe
   * (two steps at every P) or the page falls back to WASM, saying why: WebGPU kernels may lack cases
   * that WASM has (onnxruntime-web 1.31's RotaryEmbedding divides by zero on the empty prefix rows of
   * a decode step at P > 1), and a failure at load is better than one in the middle of a reply.
   */
  async #start(choice, weights) {
    let reason = choice.reason;
    if (choice.backend === 'webgpu' && webgpuFailure) {
      if (!choice.fallback) throw new Error(`WebGPU failed earlier in this page (${webgpuFailure}); reload the page to try it again`);
      reason = `WebGPU failed earlier in this page (${webgpuFailure}); WASM until the page is reloaded`;
    } else if (choice.backend === 'webgpu') {
      try {
        await this.#open('webgpu', weights);
        if (choice.fallback) for (const P of [...this.info.streams].reverse()) await this.#run([0], P, 2, { greedy: true, ignoreEos: true });
        this.backendReason = reason;
        return;
      } catch (e) {
        webgpuFailure ??= firstLine(e);
        await this.session?.release?.().catch(() => {}); // the WebGPU session is not used again
        if (!choice.fallback) throw new Error(`WebGPU cannot run this export: ${firstLine(e)}`);
        reason = `WebGPU failed (${firstLine(e)}); fell back to WASM`;
      }
    }
    await this.#open('wasm', weights);
    this.backendReason = reason;
  }

  async #open(backend, { bytes, externalData, threads }) {
    // The WASM fallback loads the WASM build: the WebGPU build's own CPU kernels lack some operators our
    // int8 exports use (GatherBlockQuantized, checked with onnxruntime-web 1.31).
    const ort = await import(new URL(ORT_BUILDS[backend], VENDOR).href);
    ort.env.wasm.wasmPaths = new URL('onnxruntime-web/', VENDOR).href;
    ort.env.logLevel = 'error';
    if (threads != null) ort.env.wasm.numThreads = threads;
    // logSeverityLevel 3 (errors only): ONNX Runtime prints its warnings with console.error, e.g. that
    // the optional num_logits_to_keep is an initializer listed as an input (by design, contract.py).
    const options = {
      executionProviders: [backend], graphOptimizationLevel: 'all', logSeverityLevel: 3, ...(externalData ? { externalData } : {}),
    };
    try {
      this.session = await ort.InferenceSession.create(bytes, options);
    } catch (e) {
      throw new Error(`onnxruntime-web (${backend}) cannot run this export: ${firstLine(e)}`);
    }
    if (!startedThreads.has(backend)) startedThreads.set(backend, ort.env.wasm.numThreads);
    Object.assign(this, { ort, backend, feedsKeep: this.session.inputNames.includes('num_logits_to_keep') });
  }

  /** WASM threads in use (null on WebGPU). */
  get threads() { return this.backend === 'wasm' ? startedThreads.get('wasm') : null; }

  /** Free the session's memory; the model cannot generate afterwards. */
  async release() {
    const session = this.session;
    this.session = null;
    await session?.release();
  }

  encode(text) {
    if (!this.tokenizer) throw new Error('this export has no tokenizer.json: pass promptIds instead of a prompt');
    return this.tokenizer.encode(text).ids;
  }

  decode(ids) {
    if (!this.tokenizer) return null;
    return ids.length ? this.tokenizer.decode(ids, { skip_special_tokens: true }) : ''; // it refuses an empty list
  }

  checkP(P) {
    const p = P ?? this.info.defaultP;
    if (!this.info.streams.includes(p)) {
      throw new Error(`this export serves P = ${this.info.streams.join(', ')}; got P=${P}`);
    }
    return p;
  }

  /**
   * Generate from one prompt (text or ids). `onToken({tokenId, text})` streams each new token and the
   * text it completes. Returns {generatedIds, text, msPerToken, prefillMs, P, finishReason, ...}.
   */
  async generate({ prompt, promptIds, maxNewTokens = 64, P, greedy = true, temperature = 1, topP = 1,
    seed, ignoreEos = false, onToken } = {}) {
    if (!this.session) throw new Error('this model was released: load the export again');
    if (this.busy) throw new Error('a generation is already running on this model; wait for it to finish');
    const p = this.checkP(P);
    if ((prompt == null) === (promptIds == null)) throw new Error('pass exactly one of prompt and promptIds');
    const ids = promptIds != null ? Array.from(promptIds, Number) : this.encode(String(prompt));
    if (!ids.length) throw new Error('the prompt is empty');
    const bad = ids.find((t) => !Number.isInteger(t) || t < 0 || t >= this.info.vocab);
    if (bad !== undefined) throw new Error(`token id ${bad} is outside the vocabulary (0..${this.info.vocab - 1})`);
    if (!Number.isInteger(maxNewTokens) || maxNewTokens < 1) throw new Error(`maxNewTokens must be a positive integer, got ${maxNewTokens}`);
    if (ids.length + maxNewTokens > this.info.maxPositions) {
      throw new Error(`prompt (${ids.length} tokens) + maxNewTokens (${maxNewTokens}) exceeds the context of ${this.info.maxPositions}`);
    }
    if (!greedy && !(temperature > 0 && topP > 0 && topP <= 1)) throw new Error('sampling needs temperature > 0 and 0 < topP <= 1');
    this.busy = true;
    try {
      return await this.#run(ids, p, maxNewTokens, { greedy, temperature, topP, seed, ignoreEos, onToken });
    } finally {
      this.busy = false;
    }
  }

  async #run(ids, P, maxNewTokens, { greedy, temperature, topP, seed, ignoreEos = false, onToken }) {
    const { ort } = this;
    const { layers, headDim, kvHeads, cacheType } = this.info;
    const heads = P * kvHeads; // the graph reads P from the cache heads it is fed
    const empty = cacheType === 'float16' ? new Uint16Array(0) : new Float32Array(0);
    const past = {};
    for (let i = 0; i < layers; i++) {
      for (const kind of ['key', 'value']) past[`past_key_values.${i}.${kind}`] = new ort.Tensor(cacheType, empty, [1, heads, 0, headDim]);
    }
    const random = rng(seed ?? Math.floor(Math.random() * 2 ** 32)); // a seed repeats a sampled reply
    const decoder = this.tokenizer ? new IncrementalDecoder(this.tokenizer) : null;
    const pick = (logits) => {
      // Only the last position's logits: prefill may return one row or every prompt position.
      const [, rows, vocab] = logits.dims;
      const row = logits.data.subarray((rows - 1) * vocab, rows * vocab);
      return greedy ? argmax(row) : sample(row, temperature, topP, random);
    };
    const int64 = (values) => BigInt64Array.from(values, BigInt);
    const generatedIds = [];
    let finishReason = 'length';
    let feeds = {
      input_ids: new ort.Tensor('int64', int64(ids), [1, ids.length]),
      attention_mask: new ort.Tensor('int64', int64(ids.map(() => 1)), [1, ids.length]),
      position_ids: new ort.Tensor('int64', int64(ids.map((_, j) => j)), [1, ids.length]),
    };
    if (this.feedsKeep) feeds.num_logits_to_keep = new ort.Tensor('int64', int64([1]), []);
    let t0 = performance.now();
    let out = await this.session.run({ ...feeds, ...past });
    const prefillMs = performance.now() - t0;
    const rows = out['present.0.key'].dims[2];
    if (rows !== this.info.prefixRows + ids.length) {
      throw new Error(`the graph returned a cache of ${rows} rows for ${ids.length} prompt tokens and ` +
        `${this.info.prefixRows} prefix rows: this export does not follow the graph contract the page drives`);
    }
    let decodeMs = 0;
    let length = ids.length;
    for (let step = 0; ; step++) {
      const token = pick(out.logits);
      generatedIds.push(token);
      const eos = !ignoreEos && this.eos.has(token);
      const last = eos || step === maxNewTokens - 1;
      let piece = eos ? '' : decoder?.push(token) ?? '';
      if (last && decoder) piece += decoder.flush();
      onToken?.({ tokenId: token, text: piece, P });
      if (eos) finishReason = 'eos';
      if (last) break;
      // present.* of this step is the next step's past (no shared buffer in the browser).
      for (let i = 0; i < layers; i++) {
        for (const kind of ['key', 'value']) past[`past_key_values.${i}.${kind}`] = out[`present.${i}.${kind}`];
      }
      length += 1;
      feeds = {
        input_ids: new ort.Tensor('int64', int64([token]), [1, 1]),
        attention_mask: new ort.Tensor('int64', new BigInt64Array(length).fill(1n), [1, length]),
        position_ids: new ort.Tensor('int64', int64([length - 1]), [1, 1]),
      };
      if (this.feedsKeep) feeds.num_logits_to_keep = new ort.Tensor('int64', int64([1]), []);
      t0 = performance.now();
      out = await this.session.run({ ...feeds, ...past });
      decodeMs += performance.now() - t0;
    }
    const steps = generatedIds.length - 1; // graph runs after prefill
    return {
      generatedIds, text: this.decode(generatedIds.filter((t) => ignoreEos || !this.eos.has(t))), finishReason, P,
      promptIds: ids, promptTokens: ids.length, prefillMs, msPerToken: steps ? decodeMs / steps : null, decodeSteps: steps,
      backend: this.backend,
    };
  }
}

function firstLine(e) { return String(e?.message ?? e).split('\n')[0]; }
