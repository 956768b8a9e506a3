"""The official `anthropic` Python package against Weir's `/v1/messages`, unchanged: plain
and streamed messages, tools, and the errors it raises. `gpt` exercises translation to an
OpenAI upstream, `claude` an Anthropic upstream, `mock` the built-in provider."""

from __future__ import annotations

import anthropic
import pytest

TOOLS = [
    {"name": "get_weather", "description": "Current weather for a city.",
     "input_schema": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"type": "string"}},
                      "required": ["city"]}},
    {"name": "get_time", "description": "Current time in a timezone.",
     "input_schema": {"type": "object", "properties": {"timezone": {"type": "string"}}, "required": ["timezone"]}},
]
EXPECTED_INPUT = {"get_weather": {"city": "Paris", "unit": "celsius"}, "get_time": {"timezone": "Europe/Paris"}}


@pytest.mark.parametrize("model", ["gpt", "claude", "mock"])
def test_messages_create(claude, model):
    m = claude.messages.create(
        model=model, max_tokens=64, system="Be brief.", messages=[{"role": "user", "content": "hello messages"}]
    )
    assert m.role == "assistant"
    assert [b.type for b in m.content] == ["text"]
    assert m.content[0].text == "Echo: hello messages"
    assert m.stop_reason == "end_turn"
    assert m.usage.input_tokens > 0 and m.usage.output_tokens > 0


@pytest.mark.parametrize("model", ["gpt", "claude", "mock"])
def test_messages_stream(claude, model):
    with claude.messages.stream(
        model=model, max_tokens=64, messages=[{"role": "user", "content": "stream these words"}]
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "Echo: stream these words"
    assert final.content[0].text == "Echo: stream these words"
    assert final.stop_reason == "end_turn"
    assert final.usage.output_tokens > 0


@pytest.mark.parametrize("model", ["gpt", "claude"])
def test_messages_tool_round_trip(claude, model):
    messages = [{"role": "user", "content": "Weather and time in Paris?"}]
    first = claude.messages.create(model=model, max_tokens=128, tools=TOOLS, messages=messages)
    assert first.stop_reason == "tool_use"
    uses = [b for b in first.content if b.type == "tool_use"]
    assert [u.name for u in uses] == ["get_weather", "get_time"]
    for u in uses:
        assert u.id
        assert u.input == EXPECTED_INPUT[u.name]

    messages.append({"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]})
    messages.append({"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": uses[0].id, "content": "18C"},
        {"type": "tool_result", "tool_use_id": uses[1].id, "content": "14:05"},
    ]})
    second = claude.messages.create(model=model, max_tokens=128, tools=TOOLS, messages=messages)
    assert second.stop_reason == "end_turn"
    assert "".join(b.text for b in second.content if b.type == "text") == "Tool results: 18C; 14:05"


@pytest.mark.parametrize("model", ["gpt", "claude"])
def test_messages_stream_tools(claude, model):
    with claude.messages.stream(
        model=model, max_tokens=128, tools=TOOLS, messages=[{"role": "user", "content": "Weather and time?"}]
    ) as stream:
        final = stream.get_final_message()
    uses = [b for b in final.content if b.type == "tool_use"]
    assert [u.name for u in uses] == ["get_weather", "get_time"]
    assert [u.input for u in uses] == [EXPECTED_INPUT["get_weather"], EXPECTED_INPUT["get_time"]]
    assert final.stop_reason == "tool_use"


def test_messages_create_with_stream_true(claude):
    events = list(claude.messages.create(
        model="gpt", max_tokens=64, stream=True, messages=[{"role": "user", "content": "raw events"}]
    ))
    types = [e.type for e in events]
    assert types[0] == "message_start" and types[-1] == "message_stop"
    text = "".join(e.delta.text for e in events if e.type == "content_block_delta" and e.delta.type == "text_delta")
    assert text == "Echo: raw events"


def test_unknown_model_raises_not_found(claude):
    with pytest.raises(anthropic.NotFoundError) as e:
        claude.messages.create(model="no-such-model", max_tokens=10, messages=[{"role": "user", "content": "x"}])
    assert "no-such-model" in str(e.value)


def test_bad_input_raises_bad_request(claude):
    with pytest.raises(anthropic.BadRequestError):
        claude.messages.create(model="gpt", max_tokens=10, messages="not a list")


def test_count_tokens_passes_through_to_anthropic(claude, upstream):
    counted = claude.messages.count_tokens(
        model="claude", system="Be brief.", messages=[{"role": "user", "content": "count these"}]
    )
    assert counted.input_tokens == 17
    sent = upstream.last("/v1/messages/count_tokens")
    assert sent["body"]["model"] == "claude-up"
    assert sent["body"]["system"] == "Be brief."
    assert sent["headers"]["anthropic-version"]


@pytest.mark.parametrize("model", ["gpt", "mock"])
def test_count_tokens_is_estimated_elsewhere(claude, model):
    raw = claude.messages.with_raw_response.count_tokens(
        model=model, messages=[{"role": "user", "content": "hello world"}]
    )
    assert raw.headers.get("x-weir-token-estimate") == "true"
    assert raw.parse().input_tokens > 0


def test_messages_stream_with_thinking(claude, upstream):
    with claude.messages.stream(
        model="claude", max_tokens=2048, thinking={"type": "enabled", "budget_tokens": 1024},
        messages=[{"role": "user", "content": "think first"}],
        extra_headers={"anthropic-beta": "interleaved-thinking-2025-05-14"},
    ) as stream:
        events = list(stream)
        final = stream.get_final_message()
    assert [b.type for b in final.content] == ["thinking", "text"]
    assert final.content[0].thinking == "Let me think about that."
    assert final.content[0].signature == "sig-py"
    assert final.content[1].text == "Echo: think first"
    assert any(e.type == "thinking" for e in events), "thinking deltas reach the client"
    sent = upstream.last("/v1/messages")
    assert sent["body"]["thinking"] == {"type": "enabled", "budget_tokens": 1024}
    assert sent["headers"]["anthropic-beta"] == "interleaved-thinking-2025-05-14"
