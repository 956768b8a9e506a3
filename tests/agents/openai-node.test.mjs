// The official `openai` node SDK (pinned in package.json) on its default paths against a real
// weir serving the offline `mock` provider: chat completions (JSON and stream),
// models.retrieve, and embeddings (whose default wire encoding is base64).

import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import OpenAI from 'openai';
import { startWeir } from './support.mjs';

let weir;
let client;

before(async () => {
  weir = await startWeir(`
[providers.local]
kind = "mock"

[[models]]
name = "mock"
targets = [{ provider = "local", model = "mock-1" }]
`);
  client = new OpenAI({ baseURL: `${weir.base}/v1`, apiKey: 'sk-weir-node-test', maxRetries: 0, timeout: 20_000 });
});

after(async () => {
  if (!weir) return;
  const code = await weir.stop();
  assert.equal(code, 0, `weir exited with ${code} after SIGTERM:\n${weir.log()}`);
});

test('openai-node: chat.completions.create', async () => {
  const res = await client.chat.completions.create({ model: 'mock', messages: [{ role: 'user', content: 'hello node' }] });
  assert.equal(res.object, 'chat.completion');
  assert.equal(res.choices[0].message.role, 'assistant');
  assert.equal(res.choices[0].message.content, 'Echo: hello node');
  assert.equal(res.choices[0].finish_reason, 'stop');
  assert.ok(res.usage.total_tokens > 0, 'usage is reported');
});

test('openai-node: chat.completions.create with stream: true', async () => {
  const stream = await client.chat.completions.create({
    model: 'mock',
    messages: [{ role: 'user', content: 'hello stream' }],
    stream: true,
    stream_options: { include_usage: true },
  });
  let text = '';
  let finish = null;
  let usage = null;
  for await (const chunk of stream) {
    assert.equal(chunk.object, 'chat.completion.chunk');
    for (const c of chunk.choices) {
      text += c.delta?.content ?? '';
      finish = c.finish_reason ?? finish;
    }
    usage = chunk.usage ?? usage;
  }
  assert.equal(text, 'Echo: hello stream');
  assert.equal(finish, 'stop');
  assert.ok(usage?.total_tokens > 0, 'the usage chunk arrived');
});

test('openai-node: models.retrieve', async () => {
  const model = await client.models.retrieve('mock');
  assert.equal(model.id, 'mock');
  assert.equal(model.object, 'model');
});

test('openai-node: embeddings.create on its default (base64) path decodes to the float vector', async () => {
  const input = 'weir embeddings';
  // The SDK's default: it asks for base64 and decodes the float32 bytes itself.
  const byDefault = await client.embeddings.create({ model: 'mock', input });
  const floats = await client.embeddings.create({ model: 'mock', input, encoding_format: 'float' });
  const a = byDefault.data[0].embedding;
  const b = floats.data[0].embedding;
  assert.ok(Array.isArray(a) && a.length > 0, `a float array came back: ${JSON.stringify(a)}`);
  assert.equal(a.length, b.length);
  for (let i = 0; i < a.length; i++) {
    assert.ok(Number.isFinite(a[i]), `element ${i} is a number`);
    assert.ok(Math.abs(a[i] - b[i]) < 1e-6, `element ${i}: base64 ${a[i]} vs float ${b[i]}`);
  }
  // And the wire really carried base64: a little-endian float32 array of the same values.
  const raw = await fetch(`${weir.base}/v1/embeddings`, {
    method: 'POST',
    headers: { 'content-type': 'application/json', authorization: 'Bearer sk-weir-node-test' },
    body: JSON.stringify({ model: 'mock', input, encoding_format: 'base64' }),
  });
  assert.equal(raw.status, 200);
  const body = await raw.json();
  const encoded = body.data[0].embedding;
  assert.equal(typeof encoded, 'string', 'encoding_format base64 returns a string');
  const bytes = Buffer.from(encoded, 'base64');
  assert.equal(bytes.length, b.length * 4);
  for (let i = 0; i < b.length; i++) {
    assert.ok(Math.abs(bytes.readFloatLE(i * 4) - b[i]) < 1e-6, `wire element ${i}`);
  }
});
