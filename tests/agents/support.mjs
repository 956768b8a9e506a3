// Shared helpers for the real-client tests: a real `weir` on a free 127.0.0.1 port with a
// temp config, local fake upstreams (OpenAI chat completions, Anthropic Messages) that drive
// a one-tool-call agent loop, and a bounded child-process runner.
//
// The binary is $WEIR_BIN (default: target/debug/weir at the repository root).

import { spawn } from 'node:child_process';
import { mkdtempSync, writeFileSync, readFileSync, rmSync } from 'node:fs';
import http from 'node:http';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const here = path.dirname(fileURLToPath(import.meta.url));
/** Repository root. */
export const ROOT = path.resolve(here, '..', '..');
/** The weir binary under test. */
export const WEIR_BIN = process.env.WEIR_BIN || path.join(ROOT, 'target', 'debug', 'weir');
/** Directory of the installed client binaries (`npm ci` in tests/agents). */
export const BIN_DIR = path.join(here, 'node_modules', '.bin');

const READY_TIMEOUT_MS = 30_000;
const START_ATTEMPTS = 4;

/** A fresh temp directory, removed by the returned `cleanup`. */
export function tempDir(prefix) {
  const dir = mkdtempSync(path.join(os.tmpdir(), `weir-agents-${prefix}-`));
  return { dir, cleanup: () => rmSync(dir, { recursive: true, force: true }) };
}

/** A TCP port on 127.0.0.1 that was free a moment ago. */
export function freePort() {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.on('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address();
      srv.close(() => resolve(port));
    });
  });
}

async function ready(base) {
  try {
    const res = await fetch(`${base}/readyz`, { signal: AbortSignal.timeout(2000) });
    return res.status === 200;
  } catch {
    return false;
  }
}

const delay = (ms) => new Promise((r) => setTimeout(r, ms));

/**
 * Starts `weir serve` with `configToml` (a TOML string) and waits for /readyz.
 * Returns `{ base, log(), stop() }`; `stop()` sends SIGTERM and waits for the exit.
 */
export async function startWeir(configToml) {
  const { dir, cleanup } = tempDir('weir');
  const config = path.join(dir, 'weir.toml');
  writeFileSync(config, configToml);
  const env = { ...process.env, NO_COLOR: '1' };
  delete env.RUST_LOG;
  for (let attempt = 0; attempt < START_ATTEMPTS; attempt++) {
    const port = await freePort();
    const base = `http://127.0.0.1:${port}`;
    let output = '';
    const child = spawn(WEIR_BIN, ['serve', '--config', config, '--listen', `127.0.0.1:${port}`], {
      stdio: ['ignore', 'pipe', 'pipe'],
      env,
    });
    child.stdout.on('data', (d) => (output += d));
    child.stderr.on('data', (d) => (output += d));
    let exited = false;
    const exit = new Promise((resolve) => {
      child.on('error', (err) => {
        output += `\nspawn error: ${err.message}`;
        exited = true;
        resolve(null);
      });
      child.on('exit', (code, signal) => {
        exited = true;
        resolve(code ?? signal);
      });
    });
    const deadline = Date.now() + READY_TIMEOUT_MS;
    let ok = false;
    while (Date.now() < deadline && !exited) {
      if (await ready(base)) {
        ok = true;
        break;
      }
      await delay(50);
    }
    if (ok) {
      return {
        base,
        log: () => output,
        async stop() {
          if (!exited) child.kill('SIGTERM');
          const code = await exit;
          cleanup();
          return code;
        },
      };
    }
    if (!exited) child.kill('SIGKILL');
    await exit;
    if (!/in use/i.test(output)) {
      cleanup();
      throw new Error(`weir (${WEIR_BIN}) did not become ready on ${base}:\n${output}`);
    }
  }
  cleanup();
  throw new Error('weir could not bind a free port');
}

/**
 * Runs `cmd args` with `env` and `cwd`, stdin closed, killed after `timeoutMs`.
 * Resolves `{ code, signal, stdout, stderr, timedOut }`.
 */
export function run(cmd, args, { env, cwd, timeoutMs = 180_000 } = {}) {
  return new Promise((resolve) => {
    const child = spawn(cmd, args, { env, cwd, stdio: ['ignore', 'pipe', 'pipe'], detached: true });
    let stdout = '';
    let stderr = '';
    let timedOut = false;
    child.stdout.on('data', (d) => (stdout += d));
    child.stderr.on('data', (d) => (stderr += d));
    const timer = setTimeout(() => {
      timedOut = true;
      try {
        process.kill(-child.pid, 'SIGKILL');
      } catch {
        child.kill('SIGKILL');
      }
    }, timeoutMs);
    child.on('error', (err) => {
      clearTimeout(timer);
      resolve({ code: null, signal: null, stdout, stderr: `${stderr}\nspawn error: ${err.message}`, timedOut });
    });
    child.on('close', (code, signal) => {
      clearTimeout(timer);
      resolve({ code, signal, stdout, stderr, timedOut });
    });
  });
}

/** A readable dump of a finished process for assertion messages. */
export function describeRun(name, r) {
  const cut = (s) => (s.length > 6000 ? `${s.slice(0, 3000)}\n...\n${s.slice(-3000)}` : s);
  return `${name}: exit ${r.code}${r.signal ? ` (signal ${r.signal})` : ''}${r.timedOut ? ' TIMED OUT' : ''}\n--- stdout\n${cut(r.stdout)}\n--- stderr\n${cut(r.stderr)}`;
}

/**
 * Environment for an agent process: a temp HOME, no proxy or key variables inherited, and
 * (when the suite is not inside a loopback-only network namespace) proxies pointing at a
 * closed local port so nothing reaches the internet.
 */
export function agentEnv(home, extra = {}) {
  const env = {};
  for (const k of ['PATH', 'LANG', 'TERM', 'TMPDIR', 'SHELL']) {
    if (process.env[k]) env[k] = process.env[k];
  }
  env.PATH = `${BIN_DIR}:${env.PATH || '/usr/bin:/bin'}`;
  env.HOME = home;
  env.XDG_CONFIG_HOME = path.join(home, '.config');
  env.NO_COLOR = '1';
  if (process.env.WEIR_AGENTS_NETNS !== '1') {
    // Fallback when no network namespace could be made: a proxy nobody listens on.
    const closed = 'http://127.0.0.1:9';
    Object.assign(env, { HTTPS_PROXY: closed, HTTP_PROXY: closed, https_proxy: closed, http_proxy: closed, NO_PROXY: '127.0.0.1,localhost', no_proxy: '127.0.0.1,localhost' });
  }
  return { ...env, ...extra };
}

/** Reads a JSON body. */
function readBody(req) {
  return new Promise((resolve, reject) => {
    const chunks = [];
    req.on('data', (c) => chunks.push(c));
    req.on('end', () => resolve(Buffer.concat(chunks).toString('utf8')));
    req.on('error', reject);
  });
}

function sse(res) {
  res.writeHead(200, { 'content-type': 'text/event-stream', 'cache-control': 'no-cache' });
}

/**
 * Starts an HTTP server on 127.0.0.1 whose handler is `async (req, body, res)`.
 * Returns `{ base, requests, close() }`; `requests` collects `{ method, url, headers, body }`.
 */
async function startServer(handler) {
  const requests = [];
  const server = http.createServer(async (req, res) => {
    try {
      const raw = await readBody(req);
      let body = null;
      try {
        body = raw ? JSON.parse(raw) : null;
      } catch {
        body = raw;
      }
      requests.push({ method: req.method, url: req.url, headers: req.headers, body });
      await handler(req, body, res);
    } catch (err) {
      if (!res.headersSent) res.writeHead(500, { 'content-type': 'application/json' });
      res.end(JSON.stringify({ error: { message: String(err) } }));
    }
  });
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address();
  return {
    base: `http://127.0.0.1:${port}`,
    requests,
    close: () =>
      new Promise((resolve) => {
        server.closeAllConnections?.();
        server.close(() => resolve());
      }),
  };
}

/** Picks the tool to call from the offered names: the first of `prefer` that is offered. */
function pickTool(offered, argsByName) {
  for (const name of Object.keys(argsByName)) {
    if (offered.includes(name)) return name;
  }
  return null;
}

/**
 * A fake OpenAI chat-completions upstream (`POST /v1/chat/completions`). Offered one of the
 * tools in `argsByName` and no tool result yet in the conversation, it calls that tool; after a
 * tool result it answers `finalText`; otherwise it answers "ok". Streams when asked.
 */
export async function startFakeOpenAI({ argsByName, finalText }) {
  let n = 0;
  return startServer(async (req, body, res) => {
    if (req.method === 'GET' && req.url.startsWith('/v1/models')) {
      res.writeHead(200, { 'content-type': 'application/json' });
      res.end(JSON.stringify({ object: 'list', data: [{ id: 'fake-gpt', object: 'model', owned_by: 'fake' }] }));
      return;
    }
    if (req.method !== 'POST' || !req.url.startsWith('/v1/chat/completions')) {
      res.writeHead(404, { 'content-type': 'application/json' });
      res.end(JSON.stringify({ error: { message: `fake openai: no route ${req.method} ${req.url}` } }));
      return;
    }
    n += 1;
    const id = `chatcmpl-fake-${n}`;
    const model = body.model || 'fake-gpt';
    const messages = Array.isArray(body.messages) ? body.messages : [];
    const hasToolResult = messages.some((m) => m.role === 'tool');
    const offered = (body.tools || []).map((t) => t.function?.name).filter(Boolean);
    const tool = hasToolResult ? null : pickTool(offered, argsByName);
    const text = hasToolResult ? finalText : 'ok';
    const usage = { prompt_tokens: 20, completion_tokens: 5, total_tokens: 25 };
    const callId = `call_fake_${n}`;
    const args = tool ? JSON.stringify(argsByName[tool]) : '';
    if (!body.stream) {
      const message = tool
        ? { role: 'assistant', content: null, tool_calls: [{ id: callId, type: 'function', function: { name: tool, arguments: args } }] }
        : { role: 'assistant', content: text };
      res.writeHead(200, { 'content-type': 'application/json' });
      res.end(JSON.stringify({ id, object: 'chat.completion', created: 1, model, choices: [{ index: 0, message, finish_reason: tool ? 'tool_calls' : 'stop' }], usage }));
      return;
    }
    sse(res);
    const chunk = (choices, extra = {}) => `data: ${JSON.stringify({ id, object: 'chat.completion.chunk', created: 1, model, choices, ...extra })}\n\n`;
    res.write(chunk([{ index: 0, delta: { role: 'assistant', content: '' }, finish_reason: null }]));
    if (tool) {
      const half = Math.floor(args.length / 2);
      res.write(chunk([{ index: 0, delta: { tool_calls: [{ index: 0, id: callId, type: 'function', function: { name: tool, arguments: args.slice(0, half) } }] }, finish_reason: null }]));
      res.write(chunk([{ index: 0, delta: { tool_calls: [{ index: 0, function: { arguments: args.slice(half) } }] }, finish_reason: null }]));
      res.write(chunk([{ index: 0, delta: {}, finish_reason: 'tool_calls' }]));
    } else {
      for (const word of text.split(/(?<= )/)) {
        res.write(chunk([{ index: 0, delta: { content: word }, finish_reason: null }]));
      }
      res.write(chunk([{ index: 0, delta: {}, finish_reason: 'stop' }]));
    }
    if (body.stream_options?.include_usage) res.write(chunk([], { usage }));
    res.end('data: [DONE]\n\n');
  });
}

/**
 * A fake Anthropic Messages upstream (`POST /v1/messages`). Offered one of the tools in
 * `argsByName` and no `tool_result` yet, it answers with a `tool_use` block; after a tool
 * result it answers `finalText`; otherwise "ok". Streams (SSE with typed events) when asked.
 */
export async function startFakeAnthropic({ argsByName, finalText }) {
  let n = 0;
  return startServer(async (req, body, res) => {
    if (req.method === 'POST' && req.url.startsWith('/v1/messages/count_tokens')) {
      res.writeHead(200, { 'content-type': 'application/json' });
      res.end(JSON.stringify({ input_tokens: 20 }));
      return;
    }
    if (req.method !== 'POST' || !req.url.startsWith('/v1/messages')) {
      res.writeHead(404, { 'content-type': 'application/json' });
      res.end(JSON.stringify({ type: 'error', error: { type: 'not_found_error', message: `fake anthropic: no route ${req.method} ${req.url}` } }));
      return;
    }
    n += 1;
    const id = `msg_fake_${n}`;
    const model = body.model || 'fake-claude';
    const messages = Array.isArray(body.messages) ? body.messages : [];
    const hasToolResult = messages.some((m) => Array.isArray(m.content) && m.content.some((b) => b?.type === 'tool_result'));
    const offered = (body.tools || []).map((t) => t.name).filter(Boolean);
    const tool = hasToolResult ? null : pickTool(offered, argsByName);
    const text = hasToolResult ? finalText : 'ok';
    const toolId = `toolu_fake_${n}`;
    const input = tool ? argsByName[tool] : null;
    const stopReason = tool ? 'tool_use' : 'end_turn';
    if (!body.stream) {
      const content = tool ? [{ type: 'tool_use', id: toolId, name: tool, input }] : [{ type: 'text', text }];
      res.writeHead(200, { 'content-type': 'application/json' });
      res.end(JSON.stringify({ id, type: 'message', role: 'assistant', model, content, stop_reason: stopReason, stop_sequence: null, usage: { input_tokens: 20, output_tokens: 5 } }));
      return;
    }
    sse(res);
    const ev = (type, data) => res.write(`event: ${type}\ndata: ${JSON.stringify({ type, ...data })}\n\n`);
    ev('message_start', { message: { id, type: 'message', role: 'assistant', model, content: [], stop_reason: null, stop_sequence: null, usage: { input_tokens: 20, output_tokens: 1 } } });
    if (tool) {
      const json = JSON.stringify(input);
      const half = Math.floor(json.length / 2);
      ev('content_block_start', { index: 0, content_block: { type: 'tool_use', id: toolId, name: tool, input: {} } });
      ev('content_block_delta', { index: 0, delta: { type: 'input_json_delta', partial_json: json.slice(0, half) } });
      ev('content_block_delta', { index: 0, delta: { type: 'input_json_delta', partial_json: json.slice(half) } });
      ev('content_block_stop', { index: 0 });
    } else {
      ev('content_block_start', { index: 0, content_block: { type: 'text', text: '' } });
      for (const word of text.split(/(?<= )/)) {
        ev('content_block_delta', { index: 0, delta: { type: 'text_delta', text: word } });
      }
      ev('content_block_stop', { index: 0 });
    }
    ev('message_delta', { delta: { stop_reason: stopReason, stop_sequence: null }, usage: { output_tokens: 5 } });
    ev('message_stop', {});
    res.end();
  });
}

/** TOML string literal. */
export function tomlStr(s) {
  return JSON.stringify(s);
}

/** Reads a file or returns null. */
export function readOrNull(p) {
  try {
    return readFileSync(p, 'utf8');
  } catch {
    return null;
  }
}
