"""The official `openai` Python package's Responses API against Weir, unchanged:
`responses.create` (plain and streamed) through an OpenAI chat upstream, an Anthropic
upstream and the mock; a function-call round trip continued with `previous_response_id`;
`responses.retrieve` and `responses.delete`; and the other default paths of the SDK
(`models.retrieve`, base64 embeddings)."""

from __future__ import annotations

import json

import openai
import pytest

TOOLS = [
    {"type": "function", "name": "get_weather", "description": "Current weather for a city.",
     "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"type": "string"}},
                    "required": ["city"]}},
    {"type": "function", "name": "get_time", "description": "Current time in a timezone.",
     "parameters": {"type": "object", "properties": {"timezone": {"type": "string"}}, "required": ["timezone"]}},
]
EXPECTED_ARGS = {"get_weather": {"city": "Paris", "unit": "celsius"}, "get_time": {"timezone": "Europe/Paris"}}


@pytest.mark.parametrize("model", ["gpt", "claude", "mock"])
def test_responses_create(oai, model):
    r = oai.responses.create(model=model, input="hello responses", instructions="Be brief.",
                             max_output_tokens=200)
    assert r.id.startswith("resp_")
    assert r.status == "completed"
    assert r.output_text == "Echo: hello responses"
    assert r.usage is not None and r.usage.input_tokens > 0 and r.usage.output_tokens > 0


@pytest.mark.parametrize("model", ["gpt", "claude", "mock"])
def test_responses_stream(oai, model):
    stream = oai.responses.create(model=model, input="stream responses please", stream=True,
                                  max_output_tokens=200)
    kinds, text, final = [], "", None
    for event in stream:
        kinds.append(event.type)
        if event.type == "response.output_text.delta":
            text += event.delta
        if event.type == "response.completed":
            final = event.response
    assert kinds[0] == "response.created"
    assert kinds[-1] == "response.completed"
    assert text == "Echo: stream responses please"
    assert final is not None and final.output_text == text


def test_responses_stream_helper(oai):
    with oai.responses.stream(model="gpt", input="helper stream") as stream:
        for _ in stream:
            pass
        final = stream.get_final_response()
    assert final.output_text == "Echo: helper stream"


@pytest.mark.parametrize("model", ["gpt", "claude"])
@pytest.mark.parametrize("streamed", [False, True])
def test_responses_tool_round_trip_with_previous_response_id(oai, model, streamed):
    if streamed:
        first = None
        for event in oai.responses.create(model=model, input="Weather and time in Paris?", tools=TOOLS,
                                          max_output_tokens=300, stream=True):
            if event.type == "response.completed":
                first = event.response
        assert first is not None
    else:
        first = oai.responses.create(model=model, input="Weather and time in Paris?", tools=TOOLS,
                                     max_output_tokens=300)
    calls = [item for item in first.output if item.type == "function_call"]
    assert [c.name for c in calls] == ["get_weather", "get_time"]
    assert [json.loads(c.arguments) for c in calls] == [EXPECTED_ARGS["get_weather"], EXPECTED_ARGS["get_time"]]
    assert all(c.call_id for c in calls)

    outputs = [{"type": "function_call_output", "call_id": c.call_id, "output": f"{c.name} ok"} for c in calls]
    second = oai.responses.create(model=model, previous_response_id=first.id, input=outputs, tools=TOOLS,
                                  max_output_tokens=300)
    assert second.previous_response_id == first.id
    assert second.output_text == "Tool results: get_weather ok; get_time ok"


def test_responses_retrieve_and_delete(oai):
    r = oai.responses.create(model="mock", input="keep me")
    again = oai.responses.retrieve(r.id)
    assert again.id == r.id and again.output_text == "Echo: keep me"
    oai.responses.delete(r.id)
    with pytest.raises(openai.NotFoundError):
        oai.responses.retrieve(r.id)
    with pytest.raises(openai.BadRequestError) as e:
        oai.responses.create(model="mock", input="x", previous_response_id=r.id)
    assert e.value.code == "previous_response_not_found"


def test_responses_structured_output(oai, upstream):
    oai.responses.create(
        model="gpt", input="json please",
        text={"format": {"type": "json_schema", "name": "answer", "strict": True,
                         "schema": {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"],
                                    "additionalProperties": False}}},
    )
    sent = upstream.last("/chat/completions")["body"]
    assert sent["response_format"]["type"] == "json_schema"
    assert sent["response_format"]["json_schema"]["name"] == "answer"


def test_models_retrieve(oai):
    m = oai.models.retrieve("mock")
    assert m.id == "mock" and m.object == "model"
    with pytest.raises(openai.NotFoundError):
        oai.models.retrieve("no-such-model")


def test_embeddings_default_base64_decodes_to_the_upstream_floats(oai, upstream):
    # The SDK asks for base64 by default and decodes it itself: the floats must be the
    # upstream's, not garbage.
    r = oai.embeddings.create(model="gpt", input="one")
    assert r.data[0].embedding == [0.25, -0.5, 0.75, 0.0]
    assert upstream.last("/embeddings")["body"].get("encoding_format") in ("base64", None)
