//! The plugin's hooks, run natively with `weir_sdk::testing::Harness`: request rewriting
//! (message text and tool-call arguments), blocking in both dialects, and restoring
//! pseudonyms in responses (text and tool calls) and streams, with the gateway's hold
//! semantics (held text handed back with `last`) replayed for every way of cutting the
//! stream into chunks.

#![allow(clippy::unwrap_used)]

use weir_plugin_redaction::{FINDINGS_KEY, PSEUDONYMS_KEY, Redaction};
use weir_sdk::testing::{self, Harness};
use weir_sdk::{
    ChoiceView, ChunkAction, Decision, Dialect, MessageView, Mutations, ResponseDecision,
    ResponseView, StreamEvent, ToolCallEdit, ToolCallView,
};

const CONFIG: &str = r#"{
    "salt": "test-salt-0123456789",
    "detectors": {
        "email": "pseudonymize",
        "phone": "pseudonymize",
        "credit_card": "block",
        "secrets": "block",
        "ssn": {"mode": "hash", "output": "mask"}
    },
    "output": "mask",
    "custom": [{"name": "employee_id", "pattern": "EMP-[0-9]{6}", "mode": "mask"}]
}"#;

fn harness() -> Harness<Redaction> {
    Harness::new(CONFIG).unwrap()
}

fn mutations(decision: &Decision) -> &Mutations {
    match decision {
        Decision::Continue(m) => m,
        Decision::Reply(r) => panic!("unexpected reply {}", String::from_utf8_lossy(&r.body)),
    }
}

/// The new texts, by message index (the plugin edits text per message, never the whole
/// message list).
fn sent_messages(decision: &Decision) -> Vec<String> {
    let m = mutations(decision);
    assert_eq!(m.set_messages, None, "text is edited per message");
    let mut texts = m.set_message_text.clone();
    texts.sort_by_key(|(i, _)| *i);
    texts.into_iter().map(|(_, t)| t).collect()
}

fn assistant_call(arguments: &str) -> MessageView {
    MessageView {
        role: "assistant".into(),
        content: String::new(),
        tool_calls: vec![ToolCallView {
            id: "call_1".into(),
            name: "send_mail".into(),
            arguments: arguments.into(),
        }],
        other_parts: 0,
    }
}

#[test]
fn request_is_rewritten_and_map_stays_private() {
    let h = harness();
    let req = testing::request()
        .system("You help ann@corp.example.")
        .user("Mail ann@corp.example, call +1 415 555 0132, SSN 123-45-6789, badge EMP-004211.")
        .build();
    let d = h.on_request(&req);
    let sent = sent_messages(&d);
    assert_eq!(sent[0], "You help <EMAIL_1>.");
    assert!(
        sent[1].starts_with("Mail <EMAIL_1>, call <PHONE_1>, SSN [SSN:"),
        "{}",
        sent[1]
    );
    assert!(sent[1].ends_with(", badge [EMPLOYEE_ID]."), "{}", sent[1]);
    let meta = testing::metadata();
    assert!(
        meta.values()
            .all(|v| !v.contains("ann@") && !v.contains("415")),
        "no PII in the metadata bag (it is logged): {meta:?}"
    );
    assert_eq!(
        meta.get(FINDINGS_KEY).map(String::as_str),
        Some("email=2,phone=1,ssn=1,employee_id=1")
    );
    // The map is in the plugin's private scratch.
    let map = testing::scratch();
    let map = String::from_utf8_lossy(map.get(PSEUDONYMS_KEY).unwrap());
    assert!(map.contains("ann@corp.example"), "{map}");
    // The same SSN always hashes the same (stable across requests).
    testing::next_request();
    let again = h.on_request(&testing::request().user("SSN 123-45-6789").build());
    let hash = &sent_messages(&again)[0];
    assert!(sent[1].contains(hash.trim_start_matches("SSN ")));
}

#[test]
fn block_replies_in_the_callers_dialect() {
    let h = harness();
    for (dialect, shape) in [
        (Dialect::Openai, "openai"),
        (Dialect::Anthropic, "anthropic"),
    ] {
        let req = testing::request()
            .dialect(dialect)
            .user("charge 4111 1111 1111 1111")
            .build();
        let Decision::Reply(reply) = h.on_request(&req) else {
            panic!("expected a reply");
        };
        assert_eq!(reply.status, 400);
        let body: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
        let message = match shape {
            "openai" => {
                assert_eq!(body["error"]["code"], "pii_detected");
                body["error"]["message"].as_str().unwrap().to_owned()
            }
            _ => {
                assert_eq!(body["type"], "error");
                body["error"]["message"].as_str().unwrap().to_owned()
            }
        };
        assert!(message.contains("credit_card"), "{message}");
        assert!(!message.contains("4111"), "the value is never echoed");
    }
    let key = testing::request()
        .user("my key sk-proj-4fT9xQ2mLz8vR1nB6cW3yK7pD0sJ5hG2aE9u")
        .build();
    assert!(h.on_request(&key).is_reply());
}

fn response(text: &str) -> ResponseView {
    ResponseView {
        request_id: "req-test".into(),
        model: "gpt-4o-mini".into(),
        status: 200,
        choices: vec![ChoiceView {
            index: 0,
            text: text.into(),
            tool_calls: vec![],
            finish_reason: Some("stop".into()),
        }],
        usage: None,
    }
}

#[test]
fn response_restores_and_masks() {
    let h = harness();
    h.on_request(&testing::request().user("write to ann@corp.example").build());
    let d = h.on_response(&response(
        "Sure, I wrote to <EMAIL_1>. Also reach eve@evil.example or SSN 123-45-6789.",
    ));
    let ResponseDecision::Continue(m) = d else {
        panic!()
    };
    assert_eq!(
        m.set_choice_text,
        vec![(
            0,
            "Sure, I wrote to ann@corp.example. Also reach [EMAIL] or SSN [SSN].".to_owned()
        )]
    );
}

/// Replays the gateway's chunk filter for one plugin: held text is merged with the next
/// delta, and handed back once more, marked `last`, at the finish (the harness fails the
/// test if the plugin holds it then).
fn stream(h: &Harness<Redaction>, pieces: &[&str]) -> String {
    let mut held: Option<String> = None;
    let mut out = String::new();
    let mut emit = |action: ChunkAction, text: String, held: &mut Option<String>| match action {
        ChunkAction::Pass => out.push_str(&text),
        ChunkAction::Replace(events) => {
            for e in events {
                if let StreamEvent::TextDelta(d) = e {
                    out.push_str(&d.text);
                }
            }
        }
        ChunkAction::Hold => *held = Some(text),
        ChunkAction::Abort(m) => panic!("abort {m}"),
    };
    for p in pieces {
        let text = held.take().unwrap_or_default() + p;
        let action = h.on_response_chunk(&testing::text_delta(0, &text));
        emit(action, text, &mut held);
    }
    if let Some(text) = held.take() {
        let action = h.on_response_chunk(&testing::last_text_delta(0, &text));
        emit(action, text, &mut held);
    }
    assert_eq!(held, None);
    out
}

#[test]
fn streams_restore_placeholders_split_anywhere() {
    let h = harness();
    h.on_request(
        &testing::request()
            .user("Email ann@corp.example and call +1 415 555 0132")
            .build(),
    );
    let model_text = "Done: I emailed <EMAIL_1> and will call <PHONE_1>, ok? Bye <EMAIL_1>";
    let expected =
        "Done: I emailed ann@corp.example and will call +1 415 555 0132, ok? Bye ann@corp.example";
    // Every cut into two and three pieces (on char boundaries).
    let cuts: Vec<usize> = (1..model_text.len()).collect();
    for &a in &cuts {
        let got = stream(&h, &[&model_text[..a], &model_text[a..]]);
        assert_eq!(got, expected, "cut at {a}");
        for &b in cuts.iter().filter(|&&b| b > a).step_by(7) {
            let got = stream(&h, &[&model_text[..a], &model_text[a..b], &model_text[b..]]);
            assert_eq!(got, expected, "cuts at {a}, {b}");
        }
    }
    // Token-sized pieces, the usual case.
    let tokens: Vec<&str> = [
        "Done",
        ": I",
        " emailed",
        " <",
        "EMA",
        "IL",
        "_1",
        ">",
        " and",
        " will call <PHONE_",
        "1>, ok? Bye <EMAIL_1>",
    ]
    .to_vec();
    assert_eq!(stream(&h, &tokens), expected);
}

#[test]
fn streams_mask_output_split_anywhere() {
    let h = harness();
    h.on_request(&testing::request().user("hello").build());
    let model_text = "Reach eve@evil.example or 123-45-6789 today.";
    let expected = "Reach [EMAIL] or [SSN] today.";
    for a in 1..model_text.len() {
        for b in (a + 1)..model_text.len() {
            let got = stream(&h, &[&model_text[..a], &model_text[a..b], &model_text[b..]]);
            assert_eq!(got, expected, "cuts at {a}, {b}");
        }
    }
}

#[test]
fn nothing_to_do_passes_untouched() {
    let h = Harness::<Redaction>::new(r#"{"default_mode": "mask"}"#).unwrap();
    let d = h.on_request(&testing::request().user("what is 2 + 2?").build());
    assert_eq!(d, Decision::cont());
    assert_eq!(
        h.on_response_chunk(&testing::text_delta(0, "a <b> c")),
        ChunkAction::Pass
    );
}

#[test]
fn email_in_tool_call_arguments_is_redacted() {
    let h = Harness::<Redaction>::new(r#"{"default_mode": "mask"}"#).unwrap();
    let req = testing::request()
        .user("send the report")
        .message_view(assistant_call(
            r#"{"to": "ann@corp.example", "cc": ["bob@corp.example"], "n": 2}"#,
        ))
        .build();
    let d = h.on_request(&req);
    let m = mutations(&d);
    assert_eq!(m.set_messages, None);
    assert!(m.set_message_text.is_empty(), "{:?}", m.set_message_text);
    assert_eq!(
        m.set_tool_call_arguments,
        vec![ToolCallEdit {
            owner: 1,
            index: 0,
            arguments: r#"{"to": "[EMAIL]", "cc": ["[EMAIL]"], "n": 2}"#.into(),
        }]
    );
    let args: serde_json::Value =
        serde_json::from_str(&m.set_tool_call_arguments[0].arguments).unwrap();
    assert_eq!(args["to"], "[EMAIL]");
    assert_eq!(
        testing::metadata().get(FINDINGS_KEY).map(String::as_str),
        Some("email=2")
    );
}

#[test]
fn tool_call_arguments_from_a_fixture_are_scanned() {
    // The canonical body the gateway shows plugins (an Anthropic client's `tool_use.input`
    // arrives as these arguments too).
    let fixture = r#"{"body": {"model": "gpt-4o-mini", "messages": [
        {"role": "user", "content": "mail ann"},
        {"role": "assistant", "content": "Sending.", "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "send_mail", "arguments": "{\"to\":\"ann@corp.example\"}"}}
        ]}
    ]}}"#;
    let req = testing::request_from_fixture(fixture, false).unwrap();
    let h = harness();
    let d = h.on_request(&req);
    let m = mutations(&d);
    assert!(m.set_message_text.is_empty());
    assert_eq!(m.set_tool_call_arguments.len(), 1);
    assert_eq!(m.set_tool_call_arguments[0].owner, 1);
    assert_eq!(
        m.set_tool_call_arguments[0].arguments,
        r#"{"to":"<EMAIL_1>"}"#
    );
}

#[test]
fn a_card_in_tool_call_arguments_blocks_even_as_a_number() {
    let h = harness();
    let req = testing::request()
        .message_view(assistant_call(r#"{"card": 4111111111111111}"#))
        .build();
    assert!(h.on_request(&req).is_reply());
}

#[test]
fn placeholders_are_shared_by_text_and_arguments_and_restored_in_tool_calls() {
    let h = harness();
    let req = testing::request()
        .user("Mail ann@corp.example")
        .message_view(assistant_call(r#"{"to":"ann@corp.example"}"#))
        .build();
    let d = h.on_request(&req);
    let m = mutations(&d);
    assert_eq!(m.set_message_text, vec![(0, "Mail <EMAIL_1>".to_owned())]);
    assert_eq!(
        m.set_tool_call_arguments[0].arguments,
        r#"{"to":"<EMAIL_1>"}"#
    );

    // The model calls a tool with the placeholder: the client gets the real value back,
    // and new PII the model produced is masked (output = mask).
    let mut resp = response("");
    resp.choices[0].tool_calls = vec![ToolCallView {
        id: "call_2".into(),
        name: "send_mail".into(),
        arguments: r#"{"to": "<EMAIL_1>", "bcc": "eve@evil.example"}"#.into(),
    }];
    let ResponseDecision::Continue(rm) = h.on_response(&resp) else {
        panic!("expected continue")
    };
    assert_eq!(
        rm.set_tool_call_arguments,
        vec![ToolCallEdit {
            owner: 0,
            index: 0,
            arguments: r#"{"to": "ann@corp.example", "bcc": "[EMAIL]"}"#.into(),
        }]
    );
}

#[test]
fn a_message_with_an_image_gets_its_text_edited_not_replaced() {
    let h = harness();
    let req = testing::request()
        .message_view(MessageView {
            role: "user".into(),
            content: "Who is ann@corp.example in this photo?".into(),
            tool_calls: vec![],
            other_parts: 1,
        })
        .build();
    let d = h.on_request(&req);
    let m = mutations(&d);
    assert_eq!(m.set_messages, None, "never a whole-message replacement");
    assert_eq!(
        m.set_message_text,
        vec![(0, "Who is <EMAIL_1> in this photo?".to_owned())]
    );
}

#[test]
fn a_held_tail_marked_last_is_processed() {
    let h = harness();
    h.on_request(&testing::request().user("write to ann@corp.example").build());
    // Mid-stream, an open placeholder is held...
    assert_eq!(
        h.on_response_chunk(&testing::text_delta(0, "Sent to <EMAIL_1")),
        ChunkAction::Hold
    );
    // ...but handed back as `last` (the stream ended) it is processed, not held.
    assert_eq!(
        h.on_response_chunk(&testing::last_text_delta(0, "Sent to <EMAIL_1>")),
        ChunkAction::replace_text(0, "Sent to ann@corp.example")
    );
    // A tail that still looks incomplete is released as it is (masked if needed).
    assert_eq!(
        h.on_response_chunk(&testing::last_text_delta(0, "call +1 415")),
        ChunkAction::Pass
    );
    assert_eq!(
        h.on_response_chunk(&testing::last_text_delta(0, "mail eve@evil.example")),
        ChunkAction::replace_text(0, "mail [EMAIL]")
    );
}

#[test]
fn streamed_tool_call_fragments_are_restored_json_escaped() {
    let h = Harness::<Redaction>::new(
        r#"{"salt": "test-salt-0123456789", "default_mode": "off",
            "custom": [{"name": "quoted", "pattern": "Q\"[0-9]{3}", "mode": "pseudonymize"}]}"#,
    )
    .unwrap();
    h.on_request(&testing::request().user("ref Q\"123 please").build());
    let event = StreamEvent::ToolCallDelta(weir_sdk::ToolCallDelta {
        choice: 0,
        index: 0,
        id: None,
        name: None,
        arguments: r#"{"ref": "<QUOTED_1>"}"#.into(),
    });
    let ChunkAction::Replace(events) = h.on_response_chunk(&event) else {
        panic!("expected a replace")
    };
    let StreamEvent::ToolCallDelta(call) = &events[0] else {
        panic!("expected a tool-call delta")
    };
    assert_eq!(call.arguments, r#"{"ref": "Q\"123"}"#);
    let v: serde_json::Value = serde_json::from_str(&call.arguments).unwrap();
    assert_eq!(v["ref"], "Q\"123");
}

#[test]
fn bad_config_fails_init() {
    assert!(Harness::<Redaction>::new(r#"{"detectors": {"email": "pseudonymize"}}"#).is_err());
    assert!(Harness::<Redaction>::new(r#"{"detectors": {"mail": "mask"}}"#).is_err());
}
