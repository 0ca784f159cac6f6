// The page: loads an export (from ?model=, default model/ as `parscale web` serves it), streams
// generations into the page, and exposes window.parscale for apps and tests:
//
//   await parscale.load(url, {backend: 'auto' | 'wasm' | 'webgpu', threads})
//   await parscale.generate({prompt | promptIds, maxNewTokens, P, greedy, temperature, topP, seed})
//     -> {generatedIds, text, msPerToken, prefillMs, P, finishReason, backend}
//
// Every failure is shown on the page and thrown from the call.
import { ParScaleModel, chooseBackend } from './parscale.js';

const $ = (id) => document.getElementById(id);
let model = null;

function showError(error) {
  const box = $('error');
  box.textContent = `Error: ${error?.message ?? error}`;
  box.hidden = false;
}

function clearError() { $('error').hidden = true; $('error').textContent = ''; }

async function shown(work) {
  clearError();
  try {
    return await work();
  } catch (e) {
    showError(e);
    throw e;
  }
}

function mb(bytes) { return `${(bytes / 1e6).toFixed(1)} MB`; }

async function load(url = 'model/', { backend = 'auto', threads } = {}) {
  return shown(async () => {
    const previous = model;
    model = null;
    for (const id of ['generate', 'P']) $(id).disabled = true;
    await previous?.release(); // its weights leave memory before the next ones arrive
    $('load-status').textContent = `loading ${url} ...`;
    const onProgress = (what, got, total) => {
      $('load-status').textContent = `loading ${what}: ${mb(got)}${total ? ` of ${mb(total)}` : ''}`;
    };
    try {
      model = await ParScaleModel.load(url, { backend, threads, onProgress });
    } catch (e) {
      $('load-status').textContent = 'not loaded';
      $('backend').textContent = 'no model loaded';
      throw e;
    }
    const { info } = model;
    const select = $('P');
    select.replaceChildren(...info.streams.map((p) => new Option(`P=${p}`, String(p), p === info.defaultP, p === info.defaultP)));
    select.disabled = info.streams.length < 2;
    $('generate').disabled = false;
    const engine = model.backend === 'webgpu' ? 'WebGPU' : `WASM (${model.threads} thread${model.threads === 1 ? '' : 's'})`;
    $('backend').textContent = `${engine}: ${model.backendReason}`;
    $('backend').dataset.backend = model.backend;
    $('load-status').textContent = `loaded ${url}`;
    const panel = $('model-info');
    panel.hidden = false;
    const weights = info.quantization === 'none' ? info.dtype : `${info.dtype}, ${info.quantization} weights`;
    panel.textContent = `${info.layers} layers, ${weights}; serves P = ${info.streams.join(', ')}`
      + ` (one session: switching P does not reload the weights)${model.tokenizer ? '' : '; no tokenizer: prompts are token ids'}`;
    for (const w of info.warnings) {
      const p = document.createElement('div');
      p.className = 'warning';
      p.textContent = `warning: ${w}`;
      panel.append(p);
    }
    return { streams: info.streams, P: info.defaultP, backend: model.backend, backendReason: model.backendReason, threads: model.threads };
  });
}

async function generate(options = {}) {
  return shown(async () => {
    if (!model) throw new Error('no export loaded: call parscale.load(url) first');
    const P = model.checkP(options.P ?? Number($('P').value)); // before the selector shows it
    $('P').value = String(P);
    const prompt = options.promptIds == null ? (options.prompt ?? $('prompt').value) : undefined;
    const output = $('output');
    const head = document.createElement('span');
    head.className = 'prompt';
    head.textContent = prompt ?? (model.decode(options.promptIds) ?? options.promptIds.join(','));
    const body = document.createElement('span');
    body.className = 'generated';
    output.replaceChildren(head, body);
    $('stats').textContent = `generating at P=${P} ...`;
    $('generate').disabled = true;
    try {
      const result = await model.generate({
        ...options, P, prompt, onToken: ({ tokenId, text }) => { body.textContent += model.tokenizer ? text : `${tokenId},`; },
      });
      const speed = result.msPerToken == null ? 'one token' : `${result.msPerToken.toFixed(1)} ms/token`;
      const engine = result.backend === 'webgpu' ? 'WebGPU' : 'WASM';
      $('stats').textContent = `P=${result.P} · ${engine} · ${result.generatedIds.length} tokens (${result.finishReason}) · `
        + `${speed} · prefill ${result.prefillMs.toFixed(0)} ms for ${result.promptTokens} tokens`;
      $('stats').dataset.p = String(result.P);
      return result;
    } finally {
      $('generate').disabled = false;
    }
  });
}

function onGenerateClick() {
  const greedy = $('greedy').checked;
  generate({
    prompt: $('prompt').value, maxNewTokens: Number($('max-new-tokens').value), greedy,
    temperature: Number($('temperature').value),
  }).catch(() => {}); // already shown on the page by generate()
}

window.addEventListener('error', (e) => showError(e.error ?? e.message));
window.addEventListener('unhandledrejection', (e) => showError(e.reason));
$('generate').addEventListener('click', onGenerateClick);
$('load').addEventListener('click', () => {
  load($('url').value, { backend: $('backend-choice').value }).catch(() => {});
});

const params = new URLSearchParams(location.search);
const initial = params.get('model') ?? 'model/';
$('url').value = initial;
$('backend-choice').value = params.get('backend') ?? 'auto';
const threads = params.has('threads') ? Number(params.get('threads')) : undefined;
const ready = params.get('autoload') === '0'
  ? Promise.resolve(null)
  : load(initial, { backend: $('backend-choice').value, threads });
ready.catch(() => {}); // shown on the page; callers awaiting parscale.ready see the rejection

window.parscale = { load, generate, ready, chooseBackend, get model() { return model; } };
