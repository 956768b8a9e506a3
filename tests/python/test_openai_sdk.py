"""The official `openai` Python package against Weir, unchanged: chat (plain, streamed, with
tools), embeddings, models, and the errors it raises."""

from __future__ import annotations

import json

import openai
import pytest

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather for a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"type": "string"}},
                       "required": ["city"]}}},
    {"type": "function", "function": {
        "name": "get_time", "description": "Current time in a timezone.",
        "parameters": {"type": "object", "properties": {"timezone": {"type": "string"}}, "required": ["timezone"]}}},
]
EXPECTED_ARGS = {"get_weather": {"city": "Paris", "unit": "celsius"}, "get_time": {"timezone": "Europe/Paris"}}


@pytest.mark.parametrize("model", ["gpt", "claude", "mock"])
def test_chat(oai, model):
    r = oai.chat.completions.create(model=model, messages=[{"role": "user", "content": "hello sdk"}])
    assert r.choices[0].message.content == "Echo: hello sdk"
    assert r.choices[0].finish_reason == "stop"
    assert r.usage is not None and r.usage.prompt_tokens > 0 and r.usage.completion_tokens > 0


@pytest.mark.parametrize("model", ["gpt", "claude", "mock"])
def test_chat_stream(oai, model):
    stream = oai.chat.completions.create(
        model=model,
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "stream to me please"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    text, finish, usage = "", None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
    assert text == "Echo: stream to me please"
    assert finish == "stop"
    assert usage is not None and usage.completion_tokens > 0


@pytest.mark.parametrize("model", ["gpt", "claude"])
def test_chat_tool_round_trip(oai, upstream, model):
    messages = [{"role": "user", "content": "Weather and time in Paris?"}]
    first = oai.chat.completions.create(model=model, messages=messages, tools=TOOLS)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls
    assert [c.function.name for c in calls] == ["get_weather", "get_time"]
    for c in calls:
        assert c.id
        assert json.loads(c.function.arguments) == EXPECTED_ARGS[c.function.name]

    messages.append(choice.message.model_dump(exclude_none=True))
    messages.append({"role": "tool", "tool_call_id": calls[0].id, "content": "18C"})
    messages.append({"role": "tool", "tool_call_id": calls[1].id, "content": "14:05"})
    second = oai.chat.completions.create(model=model, messages=messages, tools=TOOLS)
    assert second.choices[0].message.content == "Tool results: 18C; 14:05"
    assert second.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("model", ["gpt", "claude"])
def test_chat_stream_tools_with_stream_helper(oai, model):
    with oai.chat.completions.stream(
        model=model, messages=[{"role": "user", "content": "Weather and time?"}], tools=TOOLS
    ) as stream:
        for _ in stream:
            pass
        final = stream.get_final_completion()
    calls = final.choices[0].message.tool_calls
    assert [c.function.name for c in calls] == ["get_weather", "get_time"]
    assert [json.loads(c.function.arguments) for c in calls] == [EXPECTED_ARGS["get_weather"], EXPECTED_ARGS["get_time"]]
    assert final.choices[0].finish_reason == "tool_calls"


@pytest.mark.parametrize("model", ["gpt", "mock"])
def test_embeddings(oai, model):
    r = oai.embeddings.create(model=model, input=["one", "two"])
    assert len(r.data) == 2
    assert [d.index for d in r.data] == [0, 1]
    assert all(len(d.embedding) > 0 and all(isinstance(x, float) for x in d.embedding) for d in r.data)


def test_embeddings_float_encoding(oai, upstream):
    r = oai.embeddings.create(model="gpt", input="one", encoding_format="float")
    assert r.data[0].embedding == [0.25, -0.5, 0.75, 0.0]
    sent = upstream.last("/embeddings")["body"]
    assert sent["model"] == "gpt-up"
    assert sent["encoding_format"] == "float"


def test_models_list(oai):
    ids = [m.id for m in oai.models.list()]
    assert ids == ["gpt", "claude", "mock"]


def test_unknown_model_raises_not_found(oai):
    with pytest.raises(openai.NotFoundError) as e:
        oai.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    assert "no-such-model" in str(e.value)


def test_bad_input_raises_bad_request(oai):
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(model="gpt", messages=[{"role": "user", "content": "x"}], temperature="hot")
    assert "temperature" in str(e.value)
    with pytest.raises(openai.BadRequestError):
        oai.chat.completions.create(model="gpt", messages="not a list")


def test_request_id_round_trips_through_the_sdk(oai):
    raw = oai.chat.completions.with_raw_response.create(
        model="mock", messages=[{"role": "user", "content": "x"}], extra_headers={"x-request-id": "py-sdk-1"}
    )
    assert raw.headers.get("x-request-id") == "py-sdk-1"
    assert raw.parse().choices[0].message.content == "Echo: x"
