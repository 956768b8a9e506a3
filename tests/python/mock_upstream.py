"""A small provider stand-in for the real-client tests: OpenAI and Anthropic dialects, JSON
and server-sent events, on 127.0.0.1 with a port from the OS. Stdlib only.

Behaviour, chosen so a tool-call round trip can be checked end to end:
- a request offering tools whose last turn is not a tool result calls every offered tool
  (in parallel) with the arguments in ``TOOL_ARGS``;
- a request whose last turn carries tool results answers ``Tool results: <r1>; <r2>``;
- anything else answers ``Echo: <last user text>``.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

TOOL_ARGS = {
    "get_weather": {"city": "Paris", "unit": "celsius"},
    "get_time": {"timezone": "Europe/Paris"},
}
PROMPT_TOKENS = 11
COMPLETION_TOKENS = 7
COUNTED_TOKENS = 17
THINKING = "Let me think about that."


def _text(content) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        out = []
        for part in content:
            if isinstance(part, dict) and part.get("type") == "text":
                out.append(part.get("text", ""))
            elif isinstance(part, dict) and part.get("type") == "tool_result":
                out.append(_text(part.get("content", "")))
        return "".join(out)
    return ""


def _words(text: str) -> list[str]:
    words = text.split(" ")
    return [w + (" " if i < len(words) - 1 else "") for i, w in enumerate(words)]


class Upstream:
    """The running server and what it received."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self._lock = threading.Lock()
        upstream = self

        class Handler(_Handler):
            owner = upstream

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def record(self, path: str, headers: dict, body) -> None:
        with self._lock:
            self.requests.append({"path": path, "headers": headers, "body": body})

    def last(self, suffix: str) -> dict:
        with self._lock:
            for r in reversed(self.requests):
                if r["path"].endswith(suffix):
                    return r
        raise AssertionError(f"no upstream request to *{suffix}")

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    owner: Upstream

    def log_message(self, format, *args):  # noqa: A002 - stdlib signature
        pass

    # ---- plumbing -------------------------------------------------------------------------

    def _json(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _sse(self, events: list[tuple[str | None, object]]) -> None:
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("cache-control", "no-cache")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        for name, data in events:
            payload = data if isinstance(data, str) else json.dumps(data)
            frame = (f"event: {name}\n" if name else "") + f"data: {payload}\n\n"
            raw = frame.encode()
            self.wfile.write(f"{len(raw):x}\r\n".encode() + raw + b"\r\n")
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def do_POST(self) -> None:  # noqa: N802 - stdlib name
        length = int(self.headers.get("content-length") or 0)
        raw = self.rfile.read(length)
        try:
            body = json.loads(raw or b"null")
        except json.JSONDecodeError:
            body = None
        path = self.path.split("?", 1)[0]
        self.owner.record(path, {k.lower(): v for k, v in self.headers.items()}, body)
        if not isinstance(body, dict):
            return self._json(400, {"error": {"message": "body must be a JSON object", "type": "invalid_request_error"}})
        if path.endswith("/chat/completions"):
            return self._openai_chat(body)
        if path.endswith("/embeddings"):
            return self._openai_embeddings(body)
        if path.endswith("/messages"):
            return self._anthropic_messages(body)
        if path.endswith("/messages/count_tokens"):
            return self._json(200, {"input_tokens": COUNTED_TOKENS})
        return self._json(404, {"error": {"message": f"no route {path}", "type": "not_found"}})

    # ---- OpenAI ---------------------------------------------------------------------------

    def _openai_chat(self, req: dict) -> None:
        messages = req.get("messages") or []
        last = messages[-1] if messages else {}
        tools = req.get("tools") or []
        calls, text = [], None
        if last.get("role") == "tool":
            results = []
            for m in reversed(messages):
                if m.get("role") != "tool":
                    break
                results.insert(0, _text(m.get("content")))
            text = "Tool results: " + "; ".join(results)
        elif tools:
            for i, t in enumerate(tools):
                name = t["function"]["name"]
                calls.append({"id": f"call_{i}_{name}", "type": "function",
                              "function": {"name": name, "arguments": json.dumps(TOOL_ARGS.get(name, {}))}})
        else:
            user = [m for m in messages if m.get("role") == "user"]
            text = "Echo: " + (_text(user[-1].get("content")) if user else "")
        usage = {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": COMPLETION_TOKENS,
                 "total_tokens": PROMPT_TOKENS + COMPLETION_TOKENS}
        finish = "tool_calls" if calls else "stop"
        base = {"id": "chatcmpl-py-1", "created": 1_700_000_000, "model": req.get("model", "")}
        if not req.get("stream"):
            message = {"role": "assistant", "content": text}
            if calls:
                message["tool_calls"] = calls
            return self._json(200, {**base, "object": "chat.completion", "usage": usage,
                                    "choices": [{"index": 0, "message": message, "finish_reason": finish}]})

        def chunk(delta, finish_reason=None):
            return {**base, "object": "chat.completion.chunk",
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}

        events = [(None, chunk({"role": "assistant", "content": ""}))]
        if calls:
            for i, c in enumerate(calls):
                args = c["function"]["arguments"]
                mid = len(args) // 2
                events.append((None, chunk({"tool_calls": [{"index": i, "id": c["id"], "type": "function",
                                                            "function": {"name": c["function"]["name"], "arguments": ""}}]})))
                for piece in (args[:mid], args[mid:]):
                    events.append((None, chunk({"tool_calls": [{"index": i, "function": {"arguments": piece}}]})))
        else:
            events += [(None, chunk({"content": w})) for w in _words(text)]
        events.append((None, chunk({}, finish)))
        if (req.get("stream_options") or {}).get("include_usage"):
            events.append((None, {**base, "object": "chat.completion.chunk", "choices": [], "usage": usage}))
        events.append((None, "[DONE]"))
        return self._sse(events)

    def _openai_embeddings(self, req: dict) -> None:
        inputs = req.get("input")
        inputs = inputs if isinstance(inputs, list) else [inputs]
        data = [{"object": "embedding", "index": i, "embedding": [0.25, -0.5, 0.75, float(i)]} for i in range(len(inputs))]
        return self._json(200, {"object": "list", "data": data, "model": req.get("model", ""),
                                "usage": {"prompt_tokens": PROMPT_TOKENS, "total_tokens": PROMPT_TOKENS}})

    # ---- Anthropic ------------------------------------------------------------------------

    def _anthropic_messages(self, req: dict) -> None:
        messages = req.get("messages") or []
        last = messages[-1] if messages else {}
        content = last.get("content")
        results = [b for b in content if isinstance(b, dict) and b.get("type") == "tool_result"] \
            if isinstance(content, list) else []
        blocks = []
        if results:
            blocks.append({"type": "text", "text": "Tool results: " + "; ".join(_text(r.get("content")) for r in results)})
            stop = "end_turn"
        elif req.get("tools"):
            blocks.append({"type": "text", "text": "Let me check."})
            for i, t in enumerate(req["tools"]):
                blocks.append({"type": "tool_use", "id": f"toolu_{i}_{t['name']}", "name": t["name"],
                               "input": TOOL_ARGS.get(t["name"], {})})
            stop = "tool_use"
        else:
            user = [m for m in messages if m.get("role") == "user"]
            blocks.append({"type": "text", "text": "Echo: " + (_text(user[-1].get("content")) if user else "")})
            stop = "end_turn"
        if (req.get("thinking") or {}).get("type") in ("enabled", "adaptive"):
            blocks.insert(0, {"type": "thinking", "thinking": THINKING, "signature": "sig-py"})
        message = {"id": "msg_py_1", "type": "message", "role": "assistant", "model": req.get("model", ""),
                   "content": blocks, "stop_reason": stop, "stop_sequence": None,
                   "usage": {"input_tokens": PROMPT_TOKENS, "output_tokens": COMPLETION_TOKENS}}
        if not req.get("stream"):
            return self._json(200, message)
        start = {**message, "content": [], "stop_reason": None,
                 "usage": {"input_tokens": PROMPT_TOKENS, "output_tokens": 1}}
        events = [("message_start", {"type": "message_start", "message": start})]
        for i, b in enumerate(blocks):
            if b["type"] == "thinking":
                events.append(("content_block_start", {"type": "content_block_start", "index": i,
                                                       "content_block": {"type": "thinking", "thinking": "",
                                                                         "signature": ""}}))
                for w in _words(b["thinking"]):
                    events.append(("content_block_delta", {"type": "content_block_delta", "index": i,
                                                           "delta": {"type": "thinking_delta", "thinking": w}}))
                events.append(("content_block_delta", {"type": "content_block_delta", "index": i,
                                                       "delta": {"type": "signature_delta",
                                                                 "signature": b["signature"]}}))
            elif b["type"] == "text":
                events.append(("content_block_start", {"type": "content_block_start", "index": i,
                                                       "content_block": {"type": "text", "text": ""}}))
                for w in _words(b["text"]):
                    events.append(("content_block_delta", {"type": "content_block_delta", "index": i,
                                                           "delta": {"type": "text_delta", "text": w}}))
            else:
                events.append(("content_block_start", {"type": "content_block_start", "index": i,
                                                       "content_block": {**b, "input": {}}}))
                args = json.dumps(b["input"])
                mid = len(args) // 2
                for piece in (args[:mid], args[mid:]):
                    events.append(("content_block_delta", {"type": "content_block_delta", "index": i,
                                                           "delta": {"type": "input_json_delta", "partial_json": piece}}))
            events.append(("content_block_stop", {"type": "content_block_stop", "index": i}))
        events.append(("message_delta", {"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": None},
                                         "usage": {"output_tokens": COMPLETION_TOKENS}}))
        events.append(("message_stop", {"type": "message_stop"}))
        return self._sse(events)
