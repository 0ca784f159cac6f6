// Greedy generation from a parscale export folder with transformers.js (Node, onnxruntime-node).
//
//   node web/generate.mjs EXPORT_DIR '[[1,2,3],[4,5]]' MAX_NEW_TOKENS [--source-config]
//
// Prints one JSON line: {"tokens": [[...], ...]}, the new tokens of each prompt (prompts are
// left-padded into one batch, as transformers.js does). Used by tests/test_web.py as the reference;
// it loads the folder exactly as the model card tells users to (transformers_js_config.json).
// --source-config loads it the plain way instead (config.json), which transformers.js refuses.
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { env, AutoModelForCausalLM, Tensor } from '@huggingface/transformers';

const [dirArg, promptsArg, maxArg, mode] = process.argv.slice(2);
const dir = path.resolve(dirArg);
const prompts = JSON.parse(promptsArg);
const maxNewTokens = Number(maxArg ?? 16);

env.allowRemoteModels = false;
env.localModelPath = path.dirname(dir);
const id = path.basename(dir);
const options = { subfolder: '', device: 'cpu' };
if (mode !== '--source-config') {
  options.config = JSON.parse(readFileSync(path.join(dir, 'transformers_js_config.json'), 'utf8'));
}
const model = await AutoModelForCausalLM.from_pretrained(id, options);

const width = Math.max(...prompts.map((p) => p.length));
const ids = new BigInt64Array(prompts.length * width);
const mask = new BigInt64Array(prompts.length * width);
prompts.forEach((p, row) => {
  p.forEach((token, j) => {
    const at = row * width + (width - p.length) + j;
    ids[at] = BigInt(token);
    mask[at] = 1n;
  });
});
const dims = [prompts.length, width];
const output = await model.generate({
  input_ids: new Tensor('int64', ids, dims),
  attention_mask: new Tensor('int64', mask, dims),
  max_new_tokens: maxNewTokens,
  do_sample: false,
});
const total = output.dims[1];
const data = Array.from(output.data, Number);
const tokens = prompts.map((_, row) => data.slice(row * total + width, (row + 1) * total));
console.log(JSON.stringify({ tokens, transformers_js: env.version }));
await model.dispose();
