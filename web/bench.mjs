// Decode speed of an export with transformers.js on Node (onnxruntime-node): benchmarks/web_speed.py.
//
//   node web/bench.mjs EXPORT_DIR '[1,2,3]' NEW_TOKENS THREADS
//
// Loads the folder as the model card tells users to (transformers_js_config.json; a single-P export:
// transformers.js cannot size a multi-P export's cache), runs one warm-up generation, then one timed
// greedy generation of exactly NEW_TOKENS tokens (min_new_tokens: EOS cannot end it early). Times
// come from a streamer, which generate() calls once per step. Prints one JSON line.
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { env, AutoModelForCausalLM, BaseStreamer, Tensor } from '@huggingface/transformers';

const [dirArg, promptArg, newArg, threadsArg] = process.argv.slice(2);
const dir = path.resolve(dirArg);
const prompt = JSON.parse(promptArg);
const newTokens = Number(newArg);
const threads = Number(threadsArg);

env.allowRemoteModels = false;
env.localModelPath = path.dirname(dir);
const config = JSON.parse(readFileSync(path.join(dir, 'transformers_js_config.json'), 'utf8'));
const model = await AutoModelForCausalLM.from_pretrained(path.basename(dir), {
  config, subfolder: '', device: 'cpu', session_options: { intraOpNumThreads: threads, interOpNumThreads: 1 },
});

class Clock extends BaseStreamer {
  constructor() { super(); this.times = []; }
  put() { this.times.push(performance.now()); } // the prompt first, then one call per new token
  end() {}
}

async function run(n) {
  const ids = new Tensor('int64', BigInt64Array.from(prompt, BigInt), [1, prompt.length]);
  const mask = new Tensor('int64', new BigInt64Array(prompt.length).fill(1n), [1, prompt.length]);
  const clock = new Clock();
  await model.generate({ input_ids: ids, attention_mask: mask, max_new_tokens: n, min_new_tokens: n, do_sample: false, streamer: clock });
  return clock.times;
}

await run(Math.min(4, newTokens)); // warm-up: first-run allocations and kernel set-up
const t = await run(newTokens);
const steps = t.length - 2; // graph runs after prefill
console.log(JSON.stringify({
  prefill_ms: t[1] - t[0], decode_ms_per_token: steps > 0 ? (t[t.length - 1] - t[1]) / steps : null,
  new_tokens: t.length - 1, transformers_js: env.version,
}));
await model.dispose();
