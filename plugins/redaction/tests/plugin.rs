//! The plugin's hooks, run natively with `weir_sdk::testing::Harness`: request rewriting,
//! blocking in both dialects, and restoring pseudonyms in responses and streams, with the
//! gateway's hold semantics replayed for every way of cutting the stream into chunks.

#![allow(clippy::unwrap_used)]

use weir_plugin_redaction::{FINDINGS_KEY, PSEUDONYMS_KEY, Redaction};
use weir_sdk::testing::{self, Harness};
use weir_sdk::{
    ChoiceView, ChunkAction, Decision, Dialect, ResponseDecision, ResponseView, StreamEvent,
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

fn sent_messages(decision: &Decision) -> Vec<String> {
    match decision {
        Decision::Continue(m) => m
            .set_messages
            .as_ref()
            .map(|ms| ms.iter().map(|m| m.content.clone()).collect())
            .unwrap_or_default(),
        Decision::Reply(r) => panic!("unexpected reply {}", String::from_utf8_lossy(&r.body)),
    }
}

#[test]
fn request_is_rewritten_and_map_is_sealed() {
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
    let sealed = meta.get(PSEUDONYMS_KEY).unwrap();
    assert!(
        !sealed.contains("ann@") && !sealed.contains("415"),
        "the map is sealed"
    );
    assert_eq!(
        meta.get(FINDINGS_KEY).map(String::as_str),
        Some("email=2,phone=1,ssn=1,employee_id=1")
    );
    // The same SSN always hashes the same (stable across requests).
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
/// delta, and handed back once more at the finish (released as is if held again).
fn stream(h: &Harness<Redaction>, pieces: &[&str]) -> String {
    let mut held: Option<String> = None;
    let mut out = String::new();
    let mut emit =
        |action: ChunkAction, text: String, held: &mut Option<String>, last: bool| match action {
            ChunkAction::Pass => out.push_str(&text),
            ChunkAction::Replace(events) => {
                for e in events {
                    if let StreamEvent::TextDelta(d) = e {
                        out.push_str(&d.text);
                    }
                }
            }
            ChunkAction::Hold if !last => *held = Some(text),
            ChunkAction::Hold => out.push_str(&text),
            ChunkAction::Abort(m) => panic!("abort {m}"),
        };
    for p in pieces {
        let text = held.take().unwrap_or_default() + p;
        let action = h.on_response_chunk(&testing::text_delta(0, &text));
        emit(action, text, &mut held, false);
    }
    if let Some(text) = held.take() {
        let action = h.on_response_chunk(&testing::text_delta(0, &text));
        emit(action, text, &mut held, true);
    }
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
fn bad_config_fails_init() {
    assert!(Harness::<Redaction>::new(r#"{"detectors": {"email": "pseudonymize"}}"#).is_err());
    assert!(Harness::<Redaction>::new(r#"{"detectors": {"mail": "mask"}}"#).is_err());
}
