// The Vercel AI SDK (`ai` + `@ai-sdk/openai`, pinned in package.json) on its default path
// against a real weir serving the offline `mock` provider. `openai('mock')` from
// `createOpenAI` uses the OpenAI Responses API (`POST /v1/responses`); `openai.chat('mock')`
// uses chat completions.

import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { generateText, streamText } from 'ai';
import { createOpenAI } from '@ai-sdk/openai';
import { startWeir } from './support.mjs';

let weir;
let openai;

before(async () => {
  weir = await startWeir(`
[providers.local]
kind = "mock"

[[models]]
name = "mock"
targets = [{ provider = "local", model = "mock-1" }]
`);
  openai = createOpenAI({ baseURL: `${weir.base}/v1`, apiKey: 'sk-weir-ai-sdk-test' });
});

after(async () => {
  if (!weir) return;
  const code = await weir.stop();
  assert.equal(code, 0, `weir exited with ${code} after SIGTERM:\n${weir.log()}`);
});

test('AI SDK: generateText with the default openai() model (Responses API)', async () => {
  const res = await generateText({ model: openai('mock'), prompt: 'hello responses', maxRetries: 0 });
  assert.equal(res.text, 'Echo: hello responses');
  assert.equal(res.finishReason, 'stop');
  assert.ok(res.usage.inputTokens > 0, `usage: ${JSON.stringify(res.usage)}`);
});

test('AI SDK: streamText with the default openai() model (Responses API)', async () => {
  let error = null;
  const result = streamText({
    model: openai('mock'),
    prompt: 'hello streamed responses',
    maxRetries: 0,
    onError: ({ error: e }) => {
      error = e;
    },
  });
  let text = '';
  for await (const delta of result.textStream) text += delta;
  assert.equal(error, null, `stream error: ${error}`);
  assert.equal(text, 'Echo: hello streamed responses');
  assert.equal(await result.finishReason, 'stop');
});

test('AI SDK: generateText and streamText with openai.chat() (chat completions)', async () => {
  const res = await generateText({ model: openai.chat('mock'), prompt: 'hello chat', maxRetries: 0 });
  assert.equal(res.text, 'Echo: hello chat');
  const result = streamText({ model: openai.chat('mock'), prompt: 'hello chat stream', maxRetries: 0 });
  let text = '';
  for await (const delta of result.textStream) text += delta;
  assert.equal(text, 'Echo: hello chat stream');
});
