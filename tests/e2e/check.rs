//! `weir check --config FILE`: exit 0 on a valid config, non-zero with a message naming the
//! file and the key otherwise.

use crate::policy_auth::{MOCK_MODELS, plugin_entry};
use crate::support::gateway::check;
use crate::support::{ConfigBuilder, bounded};

fn good() -> ConfigBuilder {
    ConfigBuilder::new()
        .provider("local", "mock", "stream_chunks = 2")
        .openai("oa", "http://127.0.0.1:9/v1", "sk-x", None)
        .model("mock", &[("local", "mock-1")])
        .model("both", &[("oa", "gpt"), ("local", "mock-1")])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_accepts_a_good_config() {
    bounded(async {
        let run = check(&good().build()).await;
        assert!(
            run.output.status.success(),
            "weir check failed on a good config:\n{}",
            run.text()
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_accepts_the_quickstart() {
    bounded(async {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../examples/quickstart/weir.toml"
        );
        let run = check(&std::fs::read_to_string(path).expect("quickstart config")).await;
        assert!(
            run.output.status.success(),
            "weir check failed on the quickstart:\n{}",
            run.text()
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_names_an_unknown_key() {
    bounded(async {
        let cfg = good()
            .provider(
                "bad",
                "openai",
                "base_url = \"http://127.0.0.1:9/v1\"\nbogus_key = 1",
            )
            .build();
        let run = check(&cfg).await;
        assert!(
            !run.output.status.success(),
            "an unknown key must fail the check"
        );
        let text = run.text();
        assert!(
            text.contains("bogus_key"),
            "the message names the unknown key:\n{text}"
        );
        assert!(
            text.contains(&run.path.display().to_string()),
            "the message names the file:\n{text}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_names_a_bad_reference_and_bad_syntax() {
    bounded(async {
        let cfg = good().model("orphan", &[("missing-provider", "x")]).build();
        let run = check(&cfg).await;
        assert!(!run.output.status.success());
        let text = run.text();
        assert!(
            text.contains("missing-provider") && text.contains("models[2]"),
            "{text}"
        );

        let run = check("[server\nlisten = ").await;
        assert!(!run.output.status.success());
        assert!(
            run.text().contains(&run.path.display().to_string()),
            "{}",
            run.text()
        );

        let run = check(&good().server("max_body_bytes = \"big\"").build()).await;
        assert!(!run.output.status.success());
        assert!(run.text().contains("max_body_bytes"), "{}", run.text());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_refuses_rate_limit_before_auth_naming_both() {
    bounded(async {
        let limits = "key = { rpm = 60 }";
        let misordered = format!(
            "{MOCK_MODELS}{}{}",
            plugin_entry("rate-limit", limits),
            plugin_entry("auth", "")
        );
        let run = check(&misordered).await;
        let text = run.text();
        assert!(
            !run.output.status.success(),
            "a chain reading the key before auth sets it must fail the check:\n{text}"
        );
        assert!(
            text.contains("plugin 'rate-limit'")
                && text.contains("metadata 'key'")
                && text.contains("which 'auth' provides")
                && text.contains("put 'auth' first"),
            "the message names both plugins and the fix:\n{text}"
        );
        assert!(text.contains("plugins:"), "and the config key:\n{text}");

        let ordered = format!(
            "{MOCK_MODELS}{}{}",
            plugin_entry("auth", ""),
            plugin_entry("rate-limit", limits)
        );
        let run = check(&ordered).await;
        assert!(run.output.status.success(), "{}", run.text());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_refuses_an_out_of_range_instance_deadline() {
    bounded(async {
        let cfg = format!(
            "{MOCK_MODELS}{}deadline_ms = 0\n",
            plugin_entry("rate-limit", "")
        );
        let run = check(&cfg).await;
        let text = run.text();
        assert!(!run.output.status.success(), "{text}");
        assert!(
            text.contains("plugins[0].deadline_ms") && text.contains("1 to 10000 ms"),
            "{text}"
        );
    })
    .await;
}
