//! The OpenAI Responses API (`/v1/responses`) through a real gateway, served by the mock and
//! translated to OpenAI chat completions, Anthropic Messages and Gemini: JSON and typed event
//! streams, function calls and their outputs, `previous_response_id` and `store`, `GET` and
//! `DELETE` scoped by credential, errors, and plugins (redaction) seeing it as a chat
//! request.

use serde_json::{Value, json};

use crate::policy_auth::plugin_dir;
use crate::support::client::named_events;
use crate::support::dialect::{TWO_CALLS, anthropic, gemini, halves, openai};
use crate::support::{ConfigBuilder, MockUpstream, TestGateway, bounded, openai_error};

const MOCK: &str = r#"
[providers.mock]
kind = "mock"
stream_chunks = 3
tool_arguments_by_name = { shell = '{"cmd":"ls"}' }

[[models]]
name = "mock"
targets = [{ provider = "mock", model = "mock-1" }]
"#;

/// The Responses function tools matching [`TWO_CALLS`].
fn tools() -> Value {
    json!([
        {"type": "function", "name": "get_weather", "description": "Current weather for a city.",
         "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"type": "string"}}, "required": ["city"]}},
        {"type": "function", "name": "get_time", "description": "Current time in a timezone.",
         "parameters": {"type": "object", "properties": {"timezone": {"type": "string"}}, "required": ["timezone"]}},
        {"type": "web_search"}
    ])
}

fn output_text(resp: &Value) -> String {
    resp["output"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|i| i["type"] == "message")
        .flat_map(|i| i["content"].as_array().cloned().unwrap_or_default())
        .filter_map(|c| c["text"].as_str().map(str::to_owned))
        .collect()
}

fn calls(resp: &Value) -> Vec<Value> {
    resp["output"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|i| i["type"] == "function_call")
        .cloned()
        .collect()
}

/// The event types of a stream, and the final `response` object.
fn stream(text: &str) -> (Vec<String>, Vec<Value>, Value) {
    let events = named_events(text);
    for (i, (name, data)) in events.iter().enumerate() {
        assert_eq!(data["type"], name.as_str(), "event name and type agree");
        assert_eq!(
            data["sequence_number"], i as u64,
            "sequence numbers count up"
        );
    }
    let last = events.last().expect("events").1["response"].clone();
    let names = events.iter().map(|(n, _)| n.clone()).collect();
    let datas = events.into_iter().map(|(_, d)| d).collect();
    (names, datas, last)
}

fn openai_gateway_config(up: &MockUpstream) -> String {
    ConfigBuilder::new()
        .openai("up", &up.url("/v1"), "sk-e2e-upstream", None)
        .model("m", &[("up", "upstream-model")])
        .build()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mock_answers_and_a_stored_response_can_be_read_continued_and_deleted() {
    bounded(async {
        let gw = TestGateway::start(MOCK).await;
        let resp = gw
            .client
            .post_json(
                "/v1/responses",
                &json!({"model": "mock", "input": "hello", "instructions": "be brief", "metadata": {"k": "v"}}),
            )
            .await;
        assert_eq!(resp.status, 200, "{}", resp.text);
        assert!(!resp.header("x-request-id").is_empty());
        let v = resp.json();
        let id = v["id"].as_str().expect("id").to_owned();
        assert!(id.starts_with("resp_"), "{id}");
        assert_eq!(v["object"], "response");
        assert_eq!(v["status"], "completed");
        assert_eq!(v["model"], "mock");
        assert_eq!(v["instructions"], "be brief");
        assert_eq!(v["metadata"], json!({"k": "v"}));
        assert_eq!(output_text(&v), "Echo: hello");
        assert!(v["usage"]["input_tokens"].as_u64().unwrap_or(0) > 0, "{v}");
        assert!(v["usage"]["output_tokens"].as_u64().unwrap_or(0) > 0, "{v}");

        let got = gw.client.get(&format!("/v1/responses/{id}")).await;
        assert_eq!(got.status, 200, "{}", got.text);
        assert_eq!(got.json(), v, "GET returns the response as it was sent");

        // Another credential cannot see it.
        let other = gw
            .client
            .http()
            .get(gw.client.url(&format!("/v1/responses/{id}")))
            .header("authorization", "Bearer someone-else")
            .send()
            .await
            .expect("get");
        assert_eq!(other.status(), 404);

        let next = gw
            .client
            .post_json(
                "/v1/responses",
                &json!({"model": "mock", "input": "again", "previous_response_id": id}),
            )
            .await;
        assert_eq!(next.status, 200, "{}", next.text);
        assert_eq!(next.json()["previous_response_id"], id.as_str());
        assert_eq!(output_text(&next.json()), "Echo: again");

        let del = gw
            .client
            .http()
            .delete(gw.client.url(&format!("/v1/responses/{id}")))
            .send()
            .await
            .expect("delete");
        assert_eq!(del.status(), 200);
        let body: Value = serde_json::from_str(&del.text().await.expect("body")).expect("json");
        assert_eq!(body, json!({"id": id, "object": "response.deleted", "deleted": true}));
        let gone = gw.client.get(&format!("/v1/responses/{id}")).await;
        let err = openai_error(&gone, 404);
        assert!(err["message"].as_str().unwrap_or_default().contains(&id), "{err}");

        let lost = gw
            .client
            .post_json(
                "/v1/responses",
                &json!({"model": "mock", "input": "x", "previous_response_id": id}),
            )
            .await;
        let err = openai_error(&lost, 400);
        assert_eq!(err["code"], "previous_response_not_found");
        assert_eq!(err["param"], "previous_response_id");

        // store: false keeps nothing.
        let unstored = gw
            .client
            .post_json("/v1/responses", &json!({"model": "mock", "input": "x", "store": false}))
            .await;
        assert_eq!(unstored.status, 200, "{}", unstored.text);
        let uid = unstored.json()["id"].as_str().unwrap_or_default().to_owned();
        assert_eq!(unstored.json()["store"], false);
        assert_eq!(gw.client.get(&format!("/v1/responses/{uid}")).await.status, 404);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mock_drives_a_streamed_tool_loop() {
    bounded(async {
        let gw = TestGateway::start(MOCK).await;
        let tool = json!([{"type": "function", "name": "shell", "parameters": {"type": "object", "properties": {"cmd": {"type": "string"}}}}]);
        let first = gw
            .client
            .post_json(
                "/v1/responses",
                &json!({"model": "mock", "stream": true, "input": [{"role": "user", "content": [{"type": "input_text", "text": "list files"}]}], "tools": tool}),
            )
            .await;
        assert_eq!(first.status, 200, "{}", first.text);
        assert!(first.header("content-type").starts_with("text/event-stream"));
        let (names, _, done) = stream(&first.text);
        assert_eq!(names.first().map(String::as_str), Some("response.created"));
        assert!(names.contains(&"response.function_call_arguments.delta".to_owned()), "{names:?}");
        assert_eq!(names.last().map(String::as_str), Some("response.completed"));
        let call = calls(&done).pop().expect("a function call");
        assert_eq!(call["name"], "shell");
        assert_eq!(call["arguments"], r#"{"cmd":"ls"}"#);
        let call_id = call["call_id"].as_str().expect("call_id").to_owned();

        // The tool's output, continued from the stored response.
        let second = gw
            .client
            .post_json(
                "/v1/responses",
                &json!({"model": "mock", "stream": true, "tools": tool,
                        "previous_response_id": done["id"],
                        "input": [{"type": "function_call_output", "call_id": call_id, "output": "a.txt b.txt"}]}),
            )
            .await;
        assert_eq!(second.status, 200, "{}", second.text);
        let (names, datas, done) = stream(&second.text);
        assert!(names.contains(&"response.output_text.delta".to_owned()), "{names:?}");
        let streamed: String = datas
            .iter()
            .filter(|d| d["type"] == "response.output_text.delta")
            .filter_map(|d| d["delta"].as_str())
            .collect();
        assert_eq!(streamed, output_text(&done));
        assert!(streamed.contains("a.txt b.txt"), "the answer follows the tool result: {streamed}");
        assert!(calls(&done).is_empty(), "one call per turn");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn translated_to_openai_chat_with_tools_history_and_formats() {
    bounded(async {
        let up = MockUpstream::start().await;
        let gw = TestGateway::start(&openai_gateway_config(&up)).await;
        up.push(openai::chat_tool_calls(&TWO_CALLS));
        let resp = gw
            .client
            .post_json(
                "/v1/responses",
                &json!({"model": "m", "instructions": "You are terse.", "input": "weather and time in Paris?",
                        "tools": tools(), "tool_choice": "auto", "max_output_tokens": 300,
                        "reasoning": {"effort": "low"}, "include": ["reasoning.encrypted_content"],
                        "text": {"format": {"type": "json_schema", "name": "answer", "schema": {"type": "object"}, "strict": true}}}),
            )
            .await;
        assert_eq!(resp.status, 200, "{}", resp.text);
        let sent = up.requests().remove(0);
        assert!(sent.path.ends_with("/v1/chat/completions"), "{}", sent.path);
        let b = &sent.body;
        assert_eq!(b["model"], "upstream-model");
        assert_eq!(b["messages"][0], json!({"role": "system", "content": "You are terse."}));
        assert_eq!(b["messages"][1], json!({"role": "user", "content": "weather and time in Paris?"}));
        assert_eq!(b["tools"].as_array().map(Vec::len), Some(2), "web_search is dropped: {b}");
        assert_eq!(b["tools"][0]["function"]["name"], "get_weather");
        assert_eq!(b["max_completion_tokens"], 300);
        assert_eq!(b["reasoning_effort"], "low");
        assert_eq!(b["response_format"]["type"], "json_schema");
        assert_eq!(b["response_format"]["json_schema"]["name"], "answer");
        assert!(b.get("include").is_none() && b.get("instructions").is_none(), "{b}");

        let v = resp.json();
        let got = calls(&v);
        assert_eq!(got.len(), 2);
        assert_eq!(got[0]["call_id"], TWO_CALLS[0].id);
        assert_eq!(got[0]["arguments"], TWO_CALLS[0].args);
        assert_eq!(got[1]["name"], "get_time");
        assert_eq!(v["usage"]["input_tokens"], 11);
        assert_eq!(v["usage"]["output_tokens"], 7);
        assert_eq!(v["usage"]["total_tokens"], 18);

        // The outputs, continuing the stored response: the upstream gets the whole history,
        // without the earlier instructions.
        up.push(openai::chat("Sunny, 3 pm."));
        let next = gw
            .client
            .post_json(
                "/v1/responses",
                &json!({"model": "m", "previous_response_id": v["id"], "tools": tools(),
                        "input": [
                            {"type": "function_call_output", "call_id": TWO_CALLS[0].id, "output": "sunny"},
                            {"type": "function_call_output", "call_id": TWO_CALLS[1].id, "output": "15:00"}
                        ]}),
            )
            .await;
        assert_eq!(next.status, 200, "{}", next.text);
        assert_eq!(output_text(&next.json()), "Sunny, 3 pm.");
        let sent = up.requests().remove(1).body;
        let msgs = sent["messages"].as_array().expect("messages");
        let roles: Vec<&str> = msgs.iter().filter_map(|m| m["role"].as_str()).collect();
        assert_eq!(roles, ["user", "assistant", "tool", "tool"], "{sent}");
        assert_eq!(msgs[1]["tool_calls"][1]["id"], TWO_CALLS[1].id);
        assert_eq!(msgs[3]["tool_call_id"], TWO_CALLS[1].id);
        assert_eq!(msgs[3]["content"], "15:00");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn translated_streams_from_openai_chat() {
    bounded(async {
        let up = MockUpstream::start().await;
        let gw = TestGateway::start(&openai_gateway_config(&up)).await;
        up.push(openai::stream_tool_calls(&TWO_CALLS));
        let resp = gw
            .client
            .post_json(
                "/v1/responses",
                &json!({"model": "m", "stream": true, "input": "weather?", "tools": tools()}),
            )
            .await;
        assert_eq!(resp.status, 200, "{}", resp.text);
        let (names, datas, done) = stream(&resp.text);
        assert_eq!(names.last().map(String::as_str), Some("response.completed"));
        let added: Vec<&Value> = datas
            .iter()
            .filter(|d| d["type"] == "response.output_item.added")
            .collect();
        assert_eq!(added.len(), 2);
        assert_eq!(added[0]["item"]["call_id"], TWO_CALLS[0].id);
        let args: String = datas
            .iter()
            .filter(|d| {
                d["type"] == "response.function_call_arguments.delta" && d["output_index"] == 1
            })
            .filter_map(|d| d["delta"].as_str())
            .collect();
        assert_eq!(args, TWO_CALLS[1].args);
        let got = calls(&done);
        assert_eq!(got.len(), 2);
        assert_eq!(got[0]["arguments"], TWO_CALLS[0].args);

        up.push(openai::stream_text(&halves("Hello there"), true));
        let resp = gw
            .client
            .post_json(
                "/v1/responses",
                &json!({"model": "m", "stream": true, "input": "hi"}),
            )
            .await;
        let (names, _, done) = stream(&resp.text);
        assert_eq!(
            names,
            [
                "response.created",
                "response.in_progress",
                "response.output_item.added",
                "response.content_part.added",
                "response.output_text.delta",
                "response.output_text.delta",
                "response.output_text.done",
                "response.content_part.done",
                "response.output_item.done",
                "response.completed",
            ]
        );
        assert_eq!(output_text(&done), "Hello there");
        assert_eq!(
            done["usage"]["input_tokens"], 11,
            "usage reaches the completed event"
        );
        assert_eq!(done["usage"]["output_tokens"], 7);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn translated_to_anthropic_json_and_stream_with_tools() {
    bounded(async {
        let up = MockUpstream::start().await;
        let cfg = ConfigBuilder::new()
            .anthropic("claude", &up.url(""), "sk-ant-e2e", None)
            .model("c", &[("claude", "claude-up")]);
        let gw = TestGateway::start(&cfg.build()).await;

        up.push(anthropic::message_tool_use(&TWO_CALLS));
        let resp = gw
            .client
            .post_json(
                "/v1/responses",
                &json!({"model": "c", "instructions": "Be terse.", "input": "weather?", "tools": tools(), "max_output_tokens": 200}),
            )
            .await;
        assert_eq!(resp.status, 200, "{}", resp.text);
        let sent = up.requests().remove(0);
        assert!(sent.path.ends_with("/v1/messages"), "{}", sent.path);
        assert_eq!(sent.body["max_tokens"], 200);
        assert_eq!(anthropic::last_user_text(&sent.body), "weather?");
        assert_eq!(sent.body["tools"].as_array().map(Vec::len), Some(2));
        let system = sent.body["system"].to_string();
        assert!(system.contains("Be terse."), "{system}");
        let got = calls(&resp.json());
        assert_eq!(got.len(), 2);
        assert_eq!(got[0]["call_id"], TWO_CALLS[0].id);
        let args: Value = serde_json::from_str(got[0]["arguments"].as_str().unwrap_or("{}")).expect("args");
        assert_eq!(args, serde_json::from_str::<Value>(TWO_CALLS[0].args).expect("json"));

        up.push(anthropic::stream_text(&halves("Bonjour Paris")));
        let resp = gw
            .client
            .post_json(
                "/v1/responses",
                &json!({"model": "c", "stream": true, "input": "hi", "max_output_tokens": 100}),
            )
            .await;
        assert_eq!(resp.status, 200, "{}", resp.text);
        let (names, _, done) = stream(&resp.text);
        assert_eq!(names.last().map(String::as_str), Some("response.completed"));
        assert_eq!(output_text(&done), "Bonjour Paris");
        assert_eq!(done["usage"]["output_tokens"], 7);

        up.push(anthropic::stream_tool_use(&TWO_CALLS));
        let resp = gw
            .client
            .post_json(
                "/v1/responses",
                &json!({"model": "c", "stream": true, "input": "weather?", "tools": tools(), "max_output_tokens": 100}),
            )
            .await;
        let (_, _, done) = stream(&resp.text);
        let got = calls(&done);
        assert_eq!(got.len(), 2, "{done}");
        assert_eq!(got[1]["name"], "get_time");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn translated_to_gemini() {
    bounded(async {
        let up = MockUpstream::start().await;
        let cfg = ConfigBuilder::new()
            .gemini("g", &up.url(""), "gem-key", None)
            .model("g", &[("g", "gemini-up")]);
        let gw = TestGateway::start(&cfg.build()).await;
        up.push(gemini::generate("Hallo"));
        let resp = gw
            .client
            .post_json("/v1/responses", &json!({"model": "g", "input": "hi"}))
            .await;
        assert_eq!(resp.status, 200, "{}", resp.text);
        assert_eq!(output_text(&resp.json()), "Hallo");
        assert_eq!(gemini::last_user_text(&up.single_request().body), "hi");

        up.push(gemini::generate_function_call(
            "get_weather",
            json!({"city": "Paris"}),
        ));
        let resp = gw
            .client
            .post_json(
                "/v1/responses",
                &json!({"model": "g", "input": "weather?", "tools": tools()}),
            )
            .await;
        let got = calls(&resp.json());
        assert_eq!(got.len(), 1, "{}", resp.text);
        assert_eq!(got[0]["name"], "get_weather");

        up.push(gemini::stream_text(&halves("Guten Tag")));
        let resp = gw
            .client
            .post_json(
                "/v1/responses",
                &json!({"model": "g", "stream": true, "input": "hi"}),
            )
            .await;
        let (_, _, done) = stream(&resp.text);
        assert_eq!(output_text(&done), "Guten Tag");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_and_upstream_errors_are_openai_shaped() {
    bounded(async {
        let up = MockUpstream::start().await;
        let gw = TestGateway::start(&openai_gateway_config(&up)).await;
        for (body, param) in [
            (json!({"model": "m"}), "input"),
            (
                json!({"model": "m", "input": [{"type": "function_call", "name": "f"}]}),
                "input[0].call_id",
            ),
            (
                json!({"model": "m", "input": [{"role": "robot", "content": "x"}]}),
                "input[0].role",
            ),
            (
                json!({"model": "m", "input": "x", "text": {"format": {"type": "yaml"}}}),
                "text.format.type",
            ),
        ] {
            let resp = gw.client.post_json("/v1/responses", &body).await;
            let err = openai_error(&resp, 400);
            assert_eq!(err["param"], param, "{body}: {err}");
        }
        let resp = gw
            .client
            .post_json("/v1/responses", &json!({"model": "nope", "input": "x"}))
            .await;
        assert_eq!(openai_error(&resp, 404)["code"], "model_not_found");
        assert_eq!(up.hits(), 0, "nothing invalid reached the upstream");

        up.set_default(crate::support::upstream::Reply::error(
            400,
            "context too long",
        ));
        let resp = gw
            .client
            .post_json("/v1/responses", &json!({"model": "m", "input": "x"}))
            .await;
        let err = openai_error(&resp, 400);
        assert!(
            err["message"]
                .as_str()
                .unwrap_or_default()
                .contains("context too long"),
            "{err}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugins_see_a_responses_request_as_chat_redaction_included() {
    bounded(async {
        let up = MockUpstream::start().await;
        let base = openai_gateway_config(&up);
        let cfg = format!(
            "{base}\n[[plugins]]\npath = \"{}\"\n[plugins.config]\nsalt = \"e2e-salt-0123456789abcdef\"\n[plugins.config.detectors]\nemail = \"pseudonymize\"\n",
            plugin_dir("redaction").display()
        );
        let gw = TestGateway::start(&cfg).await;
        up.push(openai::chat("I will write to <EMAIL_1>."));
        let resp = gw
            .client
            .post_json(
                "/v1/responses",
                &json!({"model": "m", "input": [{"role": "user", "content": [{"type": "input_text", "text": "Mail ann@corp.example please"}]}]}),
            )
            .await;
        assert_eq!(resp.status, 200, "{}", resp.text);
        let sent = openai::last_user_text(&up.single_request().body);
        assert_eq!(sent, "Mail <EMAIL_1> please", "the provider never sees the address");
        assert_eq!(output_text(&resp.json()), "I will write to ann@corp.example.");
    })
    .await;
}
