// Codex CLI (@openai/codex, pinned in package.json) completes a non-interactive
// `codex exec` session through a real weir over the Responses API: one shell tool call, its
// result, and a final answer. (a) weir's offline `mock` provider drives the loop; (b) a local
// fake Anthropic Messages upstream does (streamed SSE with tool_use blocks), with weir
// translating Responses <-> Anthropic.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, mkdirSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { BIN_DIR, agentEnv, describeRun, run, startFakeAnthropic, startWeir, tempDir, tomlStr } from './support.mjs';

const MODEL = 'weir-agent';
const FINAL = 'WEIR-CODEX-FINAL-ANSWER';

/** Arguments for each shell tool Codex may offer (its current one is `exec_command`). */
function toolArgs(marker) {
  const cmd = `touch ${marker} && echo tool-ran`;
  return {
    exec_command: { cmd },
    shell_command: { command: cmd },
    shell: { command: ['bash', '-lc', cmd] },
  };
}

function mockArgsToml(marker) {
  const entries = Object.entries(toolArgs(marker)).map(([k, v]) => `${k} = ${tomlStr(JSON.stringify(v))}`);
  return `{ ${entries.join(', ')} }`;
}

async function runCodex(base, dir) {
  const work = path.join(dir, 'work');
  const home = path.join(dir, 'home');
  const codexHome = path.join(home, '.codex');
  mkdirSync(work, { recursive: true });
  mkdirSync(codexHome, { recursive: true });
  writeFileSync(
    path.join(codexHome, 'config.toml'),
    `model = "${MODEL}"
model_provider = "weir"
approval_policy = "never"
sandbox_mode = "danger-full-access"

[model_providers.weir]
name = "weir"
base_url = "${base}/v1"
env_key = "WEIR_KEY"
wire_api = "responses"
request_max_retries = 0
stream_max_retries = 0
`,
  );
  const env = agentEnv(home, { CODEX_HOME: codexHome, WEIR_KEY: 'sk-weir-codex-test' });
  return run(
    path.join(BIN_DIR, 'codex'),
    ['exec', '--skip-git-repo-check', '--json', 'Create the marker file with your shell tool, then say you are done.'],
    { env, cwd: work, timeoutMs: 240_000 },
  );
}

/** Asserts a successful session: no error event, the command ran, the final message arrived. */
function assertSession(r, marker, weirLog) {
  const dump = `${describeRun('codex', r)}\n--- weir log\n${weirLog().slice(-6000)}`;
  assert.equal(r.timedOut, false, `codex timed out\n${dump}`);
  const events = [];
  for (const line of r.stdout.split('\n')) {
    if (!line.startsWith('{')) continue;
    try {
      events.push(JSON.parse(line));
    } catch {
      // not an event line
    }
  }
  const errors = events.filter((e) => e.type === 'error' || e.type === 'turn.failed');
  assert.deepEqual(errors, [], `codex reported an error\n${dump}`);
  assert.equal(r.code, 0, `codex exited non-zero\n${dump}`);
  assert.ok(existsSync(marker), `the shell tool did not run (no ${marker})\n${dump}`);
  const messages = events
    .filter((e) => e.type === 'item.completed' && e.item?.type === 'agent_message')
    .map((e) => e.item.text);
  assert.ok(messages.some((t) => String(t).includes(FINAL)), `the final answer did not arrive\n${dump}`);
  assert.ok(events.some((e) => e.type === 'turn.completed'), `no turn.completed event\n${dump}`);
}

test('Codex: a tool-call session against the mock provider', async () => {
  const { dir, cleanup } = tempDir('codex-mock');
  const marker = path.join(dir, 'work', 'marker-mock');
  const weir = await startWeir(`
[providers.local]
kind = "mock"
tool_name = "exec_command"
tool_arguments_by_name = ${mockArgsToml(marker)}
reply_after_tool = ${tomlStr(FINAL)}

[[models]]
name = "${MODEL}"
targets = [{ provider = "local", model = "mock-1" }]
`);
  try {
    const r = await runCodex(weir.base, dir);
    assertSession(r, marker, weir.log);
  } finally {
    await weir.stop();
    cleanup();
  }
});

test('Codex: a streamed tool-call session through a fake Anthropic upstream', async () => {
  const { dir, cleanup } = tempDir('codex-anthropic');
  const marker = path.join(dir, 'work', 'marker-anthropic');
  const up = await startFakeAnthropic({ argsByName: toolArgs(marker), finalText: FINAL });
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
    const r = await runCodex(weir.base, dir);
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
