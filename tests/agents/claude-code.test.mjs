// Claude Code (@anthropic-ai/claude-code, pinned in package.json) completes a non-interactive
// session through a real weir: one Bash tool call, its result, and a final answer.
// (a) weir's offline `mock` provider drives the loop; (b) a local fake OpenAI
// chat-completions upstream does, with weir translating Anthropic Messages <-> OpenAI, streamed;
// (c) a local fake Anthropic upstream does, with weir passing Anthropic Messages through.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, mkdirSync } from 'node:fs';
import path from 'node:path';
import { BIN_DIR, agentEnv, describeRun, run, startFakeAnthropic, startFakeOpenAI, startWeir, tempDir, tomlStr } from './support.mjs';

const MODEL = 'weir-agent';
const FINAL = 'WEIR-CLAUDE-FINAL-ANSWER';

function bashArgs(marker) {
  return { command: `touch ${marker} && echo tool-ran`, description: 'Create the marker file' };
}

async function runClaude(base, work, home) {
  const env = agentEnv(home, {
    ANTHROPIC_BASE_URL: base,
    ANTHROPIC_API_KEY: 'sk-ant-weir-agent-test',
    ANTHROPIC_MODEL: MODEL,
    ANTHROPIC_SMALL_FAST_MODEL: MODEL,
    ANTHROPIC_DEFAULT_HAIKU_MODEL: MODEL,
    ANTHROPIC_DEFAULT_SONNET_MODEL: MODEL,
    ANTHROPIC_DEFAULT_OPUS_MODEL: MODEL,
    CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC: '1',
    DISABLE_AUTOUPDATER: '1',
    DISABLE_TELEMETRY: '1',
    DISABLE_ERROR_REPORTING: '1',
  });
  return run(
    path.join(BIN_DIR, 'claude'),
    ['-p', 'Create the marker file with the Bash tool, then say you are done.', '--output-format', 'json', '--allowedTools', 'Bash', '--model', MODEL, '--max-turns', '4'],
    { env, cwd: work, timeoutMs: 240_000 },
  );
}

/** Asserts a successful session: result JSON without is_error, the tool ran, the final text arrived. */
function assertSession(r, marker, weirLog) {
  const dump = `${describeRun('claude', r)}\n--- weir log\n${weirLog().slice(-6000)}`;
  assert.equal(r.timedOut, false, `claude timed out\n${dump}`);
  assert.doesNotMatch(r.stdout + r.stderr, /API Error/i, `claude printed an API error\n${dump}`);
  const line = r.stdout.trim().split('\n').filter((l) => l.startsWith('{')).pop();
  assert.ok(line, `claude printed no result JSON\n${dump}`);
  let result;
  try {
    result = JSON.parse(line);
  } catch (err) {
    assert.fail(`claude result is not JSON (${err.message})\n${dump}`);
  }
  assert.notEqual(result.is_error, true, `claude reported is_error: true (terminal_reason ${result.terminal_reason})\n${dump}`);
  assert.equal(result.api_error_status ?? null, null, `claude reported an API error status\n${dump}`);
  assert.equal(r.code, 0, `claude exited non-zero\n${dump}`);
  assert.ok(existsSync(marker), `the Bash tool did not run (no ${marker})\n${dump}`);
  assert.match(String(result.result), new RegExp(FINAL), `the final answer did not arrive\n${dump}`);
}

test('Claude Code: a tool-call session against the mock provider', async () => {
  const { dir, cleanup } = tempDir('claude-mock');
  const marker = path.join(dir, 'work', 'marker-mock');
  const weir = await startWeir(`
[providers.local]
kind = "mock"
tool_name = "Bash"
tool_arguments_by_name = { Bash = ${tomlStr(JSON.stringify(bashArgs(marker)))} }
reply_after_tool = ${tomlStr(FINAL)}

[[models]]
name = "${MODEL}"
targets = [{ provider = "local", model = "mock-1" }]
`);
  try {
    const work = path.join(dir, 'work');
    const home = path.join(dir, 'home');
    mkdirSync(work, { recursive: true });
    mkdirSync(home, { recursive: true });
    const r = await runClaude(weir.base, work, home);
    assertSession(r, marker, weir.log);
  } finally {
    await weir.stop();
    cleanup();
  }
});

test('Claude Code: a streamed tool-call session through a fake OpenAI upstream', async () => {
  const { dir, cleanup } = tempDir('claude-openai');
  const marker = path.join(dir, 'work', 'marker-openai');
  const up = await startFakeOpenAI({ argsByName: { Bash: bashArgs(marker) }, finalText: FINAL });
  const weir = await startWeir(`
[retry]
attempts_per_target = 1

[providers.up]
kind = "openai"
base_url = "${up.base}/v1"
api_key = "sk-fake-openai-upstream"

[[models]]
name = "${MODEL}"
targets = [{ provider = "up", model = "fake-gpt" }]
`);
  try {
    const work = path.join(dir, 'work');
    const home = path.join(dir, 'home');
    mkdirSync(work, { recursive: true });
    mkdirSync(home, { recursive: true });
    const r = await runClaude(weir.base, work, home);
    assertSession(r, marker, weir.log);
    const chats = up.requests.filter((q) => q.url.startsWith('/v1/chat/completions'));
    assert.ok(chats.some((q) => q.body?.stream === true), 'weir did not stream from the upstream');
    assert.ok(
      chats.some((q) => (q.body?.messages || []).some((m) => m.role === 'tool')),
      'the tool result never reached the upstream as a role "tool" message',
    );
  } finally {
    await weir.stop();
    await up.close();
    cleanup();
  }
});

test('Claude Code: a streamed tool-call session passed through to a fake Anthropic upstream', async () => {
  const { dir, cleanup } = tempDir('claude-anthropic');
  const marker = path.join(dir, 'work', 'marker-anthropic');
  const up = await startFakeAnthropic({ argsByName: { Bash: bashArgs(marker) }, finalText: FINAL });
  const weir = await startWeir(`
[retry]
attempts_per_target = 1

[providers.up]
kind = "anthropic"
base_url = "${up.base}"
api_key = "sk-ant-fake-upstream"

[[models]]
name = "${MODEL}"
targets = [{ provider = "up", model = "fake-claude" }]
`);
  try {
    const work = path.join(dir, 'work');
    const home = path.join(dir, 'home');
    mkdirSync(work, { recursive: true });
    mkdirSync(home, { recursive: true });
    const r = await runClaude(weir.base, work, home);
    assertSession(r, marker, weir.log);
    const msgs = up.requests.filter((q) => q.url.startsWith('/v1/messages') && !q.url.includes('count_tokens'));
    assert.ok(msgs.some((q) => q.body?.stream === true), 'weir did not stream from the upstream');
    assert.ok(
      msgs.some((q) => (q.body?.messages || []).some((m) => Array.isArray(m.content) && m.content.some((b) => b.type === 'tool_result'))),
      'the tool result never reached the upstream as a tool_result block',
    );
  } finally {
    await weir.stop();
    await up.close();
    cleanup();
  }
});
