//! Unit tests of the harness: the fixture keys, matching and the table.
use super::*;

#[test]
fn prompt_guard_example_passes_its_fixtures() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/prompt-guard");
    assert_fixtures_pass(&dir);
    assert!(run_fixtures(&dir).unwrap().cases.len() >= 6);
}

#[test]
fn failing_fixtures_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    crate::plugin::scaffold::new_plugin(crate::plugin::scaffold::Lang::Lua, "p", dir.path())
        .unwrap();
    let p = dir.path().join("p");
    std::fs::write(
        p.join("fixtures/wrong.json"),
        r#"{"request": {"body": {"model": "m", "messages": []}}, "expect": {"status": 418}}"#,
    )
    .unwrap();
    let report = run_fixtures(&p).unwrap();
    assert!(!report.passed());
    let mut table = Vec::new();
    report.print(&mut table).unwrap();
    let table = String::from_utf8(table).unwrap();
    assert!(table.contains("FAIL"), "{table}");
    assert!(table.contains("3 passed, 1 failed"), "{table}");
}

#[test]
fn subset_matching() {
    let actual = json!({"decision": "reply", "status": 400, "body": {"error": {"message": "x", "code": 400}}});
    assert_eq!(
        subset_mismatch(&json!({"status": 400}), &actual, "expect"),
        None
    );
    assert_eq!(
        subset_mismatch(
            &json!({"body": {"error": {"message": "x"}}}),
            &actual,
            "expect"
        ),
        None
    );
    assert_eq!(
        subset_mismatch(&json!({"status": 401}), &actual, "expect").unwrap(),
        "expect.status: expected 401, got 400"
    );
    assert!(subset_mismatch(&json!({"targets": 1}), &actual, "expect").is_some());
}

/// A Lua plugin `probe` in a temporary folder: it counts requests in kv, reads the clock,
/// target stats and prices, keeps the model in scratch for on_log, fails on_log on status
/// 500, and serves an admin endpoint.
fn probe() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("plugin.toml"),
        r#"name = "probe"
version = "0.1.0"
kind = "lua"
hooks = ["on-request", "on-log", "admin"]
headers = ["x-who"]

[capabilities]
kv = true
"#,
    )
    .unwrap();
    std::fs::write(
        dir.path().join("plugin.lua"),
        r#"
function on_request(req)
    local n = (tonumber(weir.kv.get("n")) or 0) + 1
    weir.kv.set("n", tostring(n))
    weir.scratch_set("model", req.model)
    local s = weir.target_stats("mock", "m1")
    local p = weir.price(req.model)
    return { set_metadata = {
        n = tostring(n),
        now = tostring(weir.now_ms()),
        who = req.header("x-who") or "nobody",
        in_flight = if s then tostring(s.in_flight) else "none",
        price = if p then tostring(p.input) else "none",
    } }
end

function on_log(entry)
    if entry.status == 500 then
        error("boom")
    end
    weir.kv.set("logged", weir.scratch_get("model") .. " " .. tostring(entry.cost_usd))
    weir.kv.set("record", weir.json.encode({ status = entry.status, attempts = #entry.attempts }))
end

function admin(req)
    return { status = 200, body = { method = req.method, path = req.path, body = req.body, n = tonumber(weir.kv.get("n")) or 0 } }
end
"#,
    )
    .unwrap();
    std::fs::create_dir(dir.path().join(FIXTURES_DIR)).unwrap();
    dir
}

fn write_fixture(dir: &Path, name: &str, fixture: &Value) {
    std::fs::write(
        dir.join(FIXTURES_DIR).join(format!("{name}.json")),
        serde_json::to_string_pretty(fixture).unwrap(),
    )
    .unwrap();
}

fn request(who: &str) -> Value {
    json!({
        "headers": { "x-who": who },
        "body": { "model": "m1", "messages": [{ "role": "user", "content": "hi" }] }
    })
}

/// The only case of the plugin in `dir` (panics on a harness error).
fn only_case(dir: &Path) -> CaseResult {
    let mut report = run_fixtures(dir).unwrap();
    assert_eq!(report.cases.len(), 1);
    report.cases.remove(0)
}

#[test]
fn unknown_expect_key_fails_the_fixture_naming_it() {
    let dir = probe();
    write_fixture(
        dir.path(),
        "typo",
        &json!({ "request": request("a"), "expect": { "decision": "continue", "metdata": {} } }),
    );
    let case = only_case(dir.path());
    let m = case.mismatch.expect("an unknown key must fail");
    assert!(m.starts_with("expect: unknown key 'metdata'"), "{m}");
    assert!(m.contains("metadata"), "the known keys are listed: {m}");

    // In a step, with the step's position; `log` points at expect_log.
    write_fixture(
        dir.path(),
        "typo",
        &json!({ "state": {}, "requests": [
            { "request": request("a"), "expect": {} },
            { "request": request("a"), "log": {}, "expect": { "log": {} } }
        ] }),
    );
    let m = only_case(dir.path()).mismatch.unwrap();
    assert!(
        m.starts_with("requests[1].expect: unknown key 'log'"),
        "{m}"
    );
    assert!(m.contains("expect_log"), "{m}");

    write_fixture(
        dir.path(),
        "typo",
        &json!({ "request": request("a"), "log": {}, "expect": {}, "expect_log": { "costs": 1 } }),
    );
    let m = only_case(dir.path()).mismatch.unwrap();
    assert!(m.starts_with("expect_log: unknown key 'costs'"), "{m}");
}

#[test]
fn unknown_fixture_fields_are_errors_everywhere() {
    let dir = probe();
    let cases = [
        (
            json!({ "request": request("a"), "expect": {}, "expected": {} }),
            "expected",
        ),
        (
            json!({ "requests": [{ "request": request("a"), "expect": {}, "advance": 1 }] }),
            "requests[0]",
        ),
        (
            json!({ "state": { "kv": {}, "ledger": {} }, "request": request("a"), "expect": {} }),
            "state",
        ),
        (
            json!({ "request": request("a"), "log": { "statuss": 200 }, "expect": {} }),
            "log",
        ),
        (
            json!({ "request": request("a"), "log": { "attempts": [{ "latency": 1 }] }, "expect": {} }),
            "log.attempts[0]",
        ),
        (
            json!({ "prices": { "m1": { "in": 1 } }, "request": request("a"), "expect": {} }),
            "prices.m1",
        ),
        (
            json!({ "target_stats": { "mock": { "m1": { "p99": 1 } } }, "request": request("a"), "expect": {} }),
            "target_stats.mock.m1",
        ),
        (
            json!({ "admin": { "path": "/x", "verb": "GET" }, "expect": {} }),
            "admin",
        ),
    ];
    for (fixture, path) in cases {
        write_fixture(dir.path(), "bad", &fixture);
        let err = run_fixtures(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains(path) && err.contains("unknown field"),
            "{fixture}: {err}"
        );
    }
}

#[test]
fn malformed_sequences_are_errors() {
    let dir = probe();
    let cases = [
        (
            json!({ "request": request("a"), "requests": [{ "request": request("a"), "expect": {} }] }),
            "with `requests`",
        ),
        (json!({ "requests": [] }), "at least one step"),
        (
            json!({ "requests": [{ "expect": {} }] }),
            "requests[0].a step needs `request` or `admin`",
        ),
        (json!({ "request": request("a") }), "expect: missing"),
        (
            json!({ "request": request("a"), "expect": {}, "expect_log": {} }),
            "expect_log: needs `log`",
        ),
        (
            json!({ "admin": { "path": "x" }, "expect": {} }),
            "must start with '/'",
        ),
        (
            json!({ "admin": { "path": "/x" }, "log": {}, "expect": {} }),
            "no response, stream or log",
        ),
    ];
    for (fixture, want) in cases {
        write_fixture(dir.path(), "bad", &fixture);
        let err = run_fixtures(dir.path()).unwrap_err().to_string();
        assert!(err.contains(want), "{fixture}: {err}");
    }
}

#[test]
fn seeded_state_sequence_and_fixed_clock() {
    let dir = probe();
    write_fixture(
        dir.path(),
        "seq",
        &json!({
            "state": { "kv": { "n": 41, "other": "kept", "json": { "a": [1, 2] } } },
            "clock_ms": 1_700_000_000_000_u64,
            "requests": [
                { "request": request("a"), "expect": {
                    "metadata": { "n": "42", "now": "1700000000000", "who": "a" },
                    "decisions": [{ "plugin": "probe", "decision": "continue" }],
                    "kv": { "n": "42", "other": "kept", "json": { "a": [1, 2] }, "absent": null }
                } },
                { "advance_ms": 2500, "request": request("b"), "expect": {
                    "metadata": { "n": "43", "now": "1700000002500", "who": "b" },
                    "kv": { "n": 43 }
                } },
                { "admin": { "method": "post", "path": "/x", "query": "q=1", "body": { "k": "v" } }, "expect": {
                    "status": 200, "body": { "method": "POST", "path": "/x", "body": "{\"k\":\"v\"}", "n": 43 }
                } }
            ]
        }),
    );
    let case = only_case(dir.path());
    assert_eq!(case.mismatch, None, "{}", case.outcome);
    let steps = case.outcome.as_array().unwrap();
    assert_eq!(steps.len(), 3);
    assert_eq!(steps[2]["kv"]["n"], "43");

    // A mismatch names the step and the key.
    write_fixture(
        dir.path(),
        "seq",
        &json!({ "state": {}, "requests": [
            { "request": request("a"), "expect": { "kv": { "n": "1" } } },
            { "request": request("a"), "expect": { "kv": { "n": "3" } } }
        ] }),
    );
    let m = only_case(dir.path()).mismatch.unwrap();
    assert_eq!(m, r#"requests[1].expect.kv.n: expected "3", got "2""#);
    write_fixture(
        dir.path(),
        "seq",
        &json!({ "state": {}, "request": request("a"), "expect": { "kv": { "n": null } } }),
    );
    let m = only_case(dir.path()).mismatch.unwrap();
    assert_eq!(m, r#"expect.kv.n: expected absent, got "1""#);
}

#[test]
fn fixtures_with_state_are_fresh_and_others_share_their_config() {
    let dir = probe();
    let counts = |n: &str| json!({ "request": request("a"), "expect": { "metadata": { "n": n } } });
    write_fixture(dir.path(), "1-shared", &counts("1"));
    write_fixture(dir.path(), "2-shared", &counts("2"));
    let mut fresh = counts("1");
    fresh["state"] = json!({});
    write_fixture(dir.path(), "3-fresh", &fresh);
    write_fixture(dir.path(), "4-shared", &counts("3"));
    let mut other_config = counts("1");
    other_config["config"] = json!({ "x": 1 });
    write_fixture(dir.path(), "5-other-config", &other_config);
    let report = run_fixtures(dir.path()).unwrap();
    let mut table = Vec::new();
    report.print(&mut table).unwrap();
    assert!(report.passed(), "{}", String::from_utf8_lossy(&table));
}

#[test]
fn on_log_runs_with_the_request_scratch_prices_and_attempts() {
    let dir = probe();
    write_fixture(
        dir.path(),
        "log",
        &json!({
            "state": {},
            "prices": { "m1": { "input": 2.0, "output": 4.0 } },
            "target_stats": { "mock": { "m1": { "in_flight": 3, "latency_ewma_ms": 120.5 } } },
            "request": request("a"),
            "log": {
                "usage": { "prompt_tokens": 1_000_000, "completion_tokens": 500_000 },
                "attempts": [
                    { "provider": "other", "target_model": "x", "status": 502, "error": "status" },
                    { "provider": "mock", "target_model": "m1", "status": 200, "latency_ms": 30 }
                ]
            },
            "expect": {
                "metadata": { "in_flight": "3", "price": "2" },
                "kv": { "logged": "m1 4", "record": { "status": 200, "attempts": 2 } }
            },
            "expect_log": {
                "failure": null,
                "status": 200,
                "provider": "mock",
                "target_model": "m1",
                "cost_usd": 4,
                "usage": { "prompt_tokens": 1_000_000, "completion_tokens": 500_000, "cached_tokens": 0 },
                "attempts": [{ "provider": "other", "status": 502, "error": "status" }, { "latency_ms": 30 }],
                "decisions": [{ "plugin": "probe", "decision": "continue" }],
                "metadata": { "n": "1" }
            }
        }),
    );
    let case = only_case(dir.path());
    assert_eq!(case.mismatch, None, "{}", case.outcome);

    // Without stats and prices the plugin sees none, and cost_usd is null.
    write_fixture(
        dir.path(),
        "log",
        &json!({ "state": {}, "request": request("a"), "log": { "cost_usd": 0.25 },
                 "expect": { "metadata": { "in_flight": "none", "price": "none" }, "kv": { "logged": "m1 0.25" } },
                 "expect_log": { "cost_usd": 0.25, "provider": "", "attempts": [] } }),
    );
    let case = only_case(dir.path());
    assert_eq!(case.mismatch, None, "{}", case.outcome);
}

#[test]
fn an_on_log_failure_fails_the_step_unless_expected() {
    let dir = probe();
    let mut fixture = json!({ "state": {}, "request": request("a"), "log": { "status": 500 }, "expect": { "decision": "continue" } });
    write_fixture(dir.path(), "log", &fixture);
    let m = only_case(dir.path()).mismatch.unwrap();
    // `trap` (a Lua error); `timeout` only on a machine too loaded for the deadline.
    assert!(
        m.starts_with("log: on_log failed (trap)") || m.starts_with("log: on_log failed (timeout)"),
        "{m}"
    );
    fixture["expect_log"] = json!({ "failure": "trap" });
    write_fixture(dir.path(), "log", &fixture);
    let case = only_case(dir.path());
    if case.outcome["log"]["failure"] == "trap" {
        assert_eq!(case.mismatch, None, "{}", case.outcome);
    }
}

#[test]
fn admin_without_the_hook_is_a_failure_outcome() {
    let dir = tempfile::tempdir().unwrap();
    crate::plugin::scaffold::new_plugin(crate::plugin::scaffold::Lang::Lua, "p", dir.path())
        .unwrap();
    let p = dir.path().join("p");
    for f in fixture_files(&p).unwrap() {
        std::fs::remove_file(f).unwrap();
    }
    write_fixture(
        &p,
        "admin",
        &json!({ "admin": { "path": "/x" }, "expect": { "decision": "failure", "kind": "error" } }),
    );
    let case = only_case(&p);
    assert_eq!(case.mismatch, None, "{}", case.outcome);
    assert!(
        case.outcome["error"]
            .as_str()
            .unwrap()
            .contains("no admin endpoint"),
        "{}",
        case.outcome
    );
}

#[test]
fn numbers_match_by_value() {
    assert_eq!(subset_mismatch(&json!(2), &json!(2.0), "x"), None);
    assert_eq!(
        subset_mismatch(&json!({ "a": 0.5 }), &json!({ "a": 0.5 }), "x"),
        None
    );
    assert!(subset_mismatch(&json!(2), &json!(2.5), "x").is_some());
    assert!(subset_mismatch(&json!(2), &json!("2"), "x").is_some());
}

#[test]
fn arrays_match_element_by_element() {
    let actual =
        json!([{ "role": "user", "content": "a" }, { "role": "assistant", "content": "b" }]);
    assert_eq!(
        subset_mismatch(&json!([{ "role": "user" }, {}]), &actual, "m"),
        None
    );
    assert_eq!(
        subset_mismatch(&json!([{}, { "content": "c" }]), &actual, "m").unwrap(),
        r#"m[1].content: expected "c", got "b""#
    );
    assert!(
        subset_mismatch(&json!([{}]), &actual, "m").is_some(),
        "lengths must agree"
    );
}
