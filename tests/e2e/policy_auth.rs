//! The `auth` policy (plugins/auth, Rust/WASM): virtual keys created, changed and revoked
//! through the admin API and the `weir keys` CLI, both credential headers, every rejection in
//! both dialects, credentials stripped before the provider, persistence across a restart,
//! and hot reload of the plugin's config.
//!
//! Also home of [`PolicyGateway`], the gateway the four policy test files share: unlike
//! `TestGateway` it keeps its config file and state directory, so a test can restart the
//! gateway on the same state or rewrite the config for a hot reload, and it turns on the
//! admin API (keys, usage) with a known token.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use serde_json::{Value, json};
use tempfile::TempDir;

use crate::support::client::Client;
use crate::support::gateway::{WEIR, free_addr};
use crate::support::{MockUpstream, Resp, anthropic_error, bounded, chat_body, openai_error};

/// The admin token of every policy gateway.
pub const ADMIN_TOKEN: &str = "e2e-admin-token-0123456789";

/// The repository root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

static BUILT: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());

/// The folder of first-party plugin `name`; a Rust plugin's `plugin.wasm` is built on
/// first use (`scripts/build-plugins.sh`).
pub fn plugin_dir(name: &str) -> PathBuf {
    let dir = root().join("plugins").join(name);
    if dir.join("Cargo.toml").is_file() {
        let mut built = BUILT
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if !built.contains(name) {
            let status = Command::new(root().join("scripts/build-plugins.sh"))
                .arg(&dir)
                .status()
                .expect("run scripts/build-plugins.sh");
            assert!(status.success(), "building plugin {name} failed");
            built.insert(name.to_owned());
        }
    }
    dir
}

/// A `[[plugins]]` entry for first-party plugin `name` with TOML `config` lines (may be
/// empty).
pub fn plugin_entry(name: &str, config: &str) -> String {
    let dir = plugin_dir(name);
    let mut s = format!("\n[[plugins]]\npath = \"{}\"\n", dir.display());
    if !config.trim().is_empty() {
        s.push_str("[plugins.config]\n");
        s.push_str(config);
        s.push('\n');
    }
    s
}

/// The offline `mock` provider and models `mock` and `gpt-4o` on it.
pub const MOCK_MODELS: &str = r#"
[log]
format = "pretty"
level = "info"

[providers.mock]
kind = "mock"
stream_chunks = 5

[[models]]
name = "mock"
targets = [{ provider = "mock", model = "mock-1" }]

[[models]]
name = "gpt-4o"
targets = [{ provider = "mock", model = "mock-1" }]
"#;

/// A real `weir serve` with its config file and state in a directory this test owns.
pub struct PolicyGateway {
    dir: TempDir,
    child: Option<Child>,
    /// The API client.
    pub client: Client,
    /// The admin API client.
    pub admin: Admin,
    body: String,
    /// Extra lines of `[state]` (e.g. `backend = "redis"` and a `[state.redis]` table).
    state: String,
}

impl PolicyGateway {
    /// Starts a gateway with `body` (providers, models, plugins) plus `[state]` and
    /// `[admin]` sections pointing at this gateway's directory and a free port.
    pub async fn start(body: &str) -> PolicyGateway {
        Self::start_with_state(body, "").await
    }

    /// Like [`PolicyGateway::start`], with `state` appended to the `[state]` section (it may
    /// open `[state.redis]`).
    pub async fn start_with_state(body: &str, state: &str) -> PolicyGateway {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut gw = PolicyGateway {
            dir,
            child: None,
            client: Client::new(String::new()),
            admin: Admin::new(String::new()),
            body: body.to_owned(),
            state: state.to_owned(),
        };
        gw.spawn().await;
        gw
    }

    /// A gateway not started yet, its config written (state in its own directory), so a
    /// test can prepare that state first (`weir state import`); [`PolicyGateway::launch`]
    /// starts it.
    pub fn unstarted(body: &str) -> PolicyGateway {
        Self::unstarted_with_state(body, "")
    }

    /// Like [`PolicyGateway::unstarted`], with `state` appended to the `[state]` section.
    pub fn unstarted_with_state(body: &str, state: &str) -> PolicyGateway {
        let gw = PolicyGateway {
            dir: tempfile::tempdir().expect("tempdir"),
            child: None,
            client: Client::new(String::new()),
            admin: Admin::new(String::new()),
            body: body.to_owned(),
            state: state.to_owned(),
        };
        gw.write_config(&free_addr().to_string());
        gw
    }

    /// Starts a gateway made by [`PolicyGateway::unstarted`].
    pub async fn launch(&mut self) {
        self.spawn().await;
    }

    /// The config file (its `[state]` names this gateway's directory).
    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("weir.toml")
    }

    /// The gateway's output so far.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("weir.log")).unwrap_or_default()
    }

    fn write_config(&self, admin: &str) {
        let text = format!(
            "{}\n[state]\npath = \"{}\"\n{}\n\n[admin]\nlisten = \"{admin}\"\ntoken = \"{ADMIN_TOKEN}\"\n",
            self.body,
            self.dir.path().join("state").display(),
            self.state,
        );
        // Write then rename, as editors do: the watcher must never read half a file.
        let tmp = self.dir.path().join("weir.toml.tmp");
        std::fs::write(&tmp, text).expect("write config");
        std::fs::rename(&tmp, self.config_path()).expect("rename config");
    }

    async fn spawn(&mut self) {
        for _ in 0..4 {
            let addr = free_addr();
            let admin = free_addr();
            self.write_config(&admin.to_string());
            let log = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(self.dir.path().join("weir.log"))
                .expect("log file");
            // WEIR_POLICY_BIN runs the same tests against another build (e.g. release).
            let bin = std::env::var("WEIR_POLICY_BIN").unwrap_or_else(|_| WEIR.to_owned());
            let mut child = Command::new(bin)
                .arg("serve")
                .arg("--config")
                .arg(self.config_path())
                .arg("--listen")
                .arg(addr.to_string())
                .env_remove("RUST_LOG")
                .env("NO_COLOR", "1")
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("log file"))
                .stderr(log)
                .spawn()
                .expect("spawn weir");
            self.client = Client::new(format!("http://{addr}"));
            self.admin = Admin::new(format!("http://{admin}"));
            let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
            while tokio::time::Instant::now() < deadline {
                if child.try_wait().expect("try_wait").is_some() {
                    break;
                }
                let ready = self.client.get_status("/readyz").await == Some(200);
                if ready {
                    self.child = Some(child);
                    return;
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            let _ = child.kill();
            let _ = child.wait();
            if !self.logs().to_lowercase().contains("in use") {
                break;
            }
        }
        panic!("weir did not start. Its output:\n{}", self.logs());
    }

    /// Stops the gateway gracefully (SIGTERM) and starts it again on the same config and
    /// state.
    pub async fn restart(&mut self) {
        if let Some(mut child) = self.child.take() {
            // sled syncs every 500 ms; give the last writes time before stopping.
            tokio::time::sleep(Duration::from_millis(700)).await;
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(child.id().to_string())
                .status();
            let deadline = std::time::Instant::now() + Duration::from_secs(15);
            while child.try_wait().expect("try_wait").is_none() {
                if std::time::Instant::now() > deadline {
                    let _ = child.kill();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.wait();
        }
        self.spawn().await;
    }

    /// Rewrites the config with a new body (same state, same admin address) for the file
    /// watcher to pick up.
    pub fn rewrite(&mut self, body: &str) {
        self.body = body.to_owned();
        let admin = self.admin.base.trim_start_matches("http://").to_owned();
        self.write_config(&admin);
    }

    /// The state directory.
    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// Creates a key through the admin API; returns `(id, secret)`.
    pub async fn create_key(&self, body: Value) -> (String, String) {
        let resp = self
            .admin
            .call("POST", "/admin/plugins/auth/keys", Some(&body))
            .await;
        assert_eq!(resp.status, 201, "create key: {}", resp.text);
        let v = resp.json();
        (
            v["id"].as_str().expect("id").to_owned(),
            v["secret"].as_str().expect("secret").to_owned(),
        )
    }

    /// Runs the `weir` CLI against this gateway's admin API; panics unless it succeeds, and
    /// returns its standard output.
    pub fn weir(&self, args: &[&str]) -> String {
        let out = Command::new(WEIR)
            .args(args)
            .env("WEIR_ADMIN", self.admin.addr())
            .env("WEIR_ADMIN_TOKEN", ADMIN_TOKEN)
            .output()
            .expect("run weir");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "weir {args:?} failed: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    }

    /// A chat request with `Authorization: Bearer <secret>`.
    pub async fn chat(&self, secret: &str, body: &Value) -> Resp {
        self.client
            .post_json_with(
                "/v1/chat/completions",
                body,
                &[("authorization", &format!("Bearer {secret}"))],
            )
            .await
    }
}

impl Drop for PolicyGateway {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!("---- weir output ----\n{}", self.logs());
        }
    }
}

/// Polls `f` every 50 ms until it returns true, for up to `timeout`.
pub async fn eventually<F, Fut>(timeout: Duration, what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if f().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not within {timeout:?}: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A client of the admin API with the test token.
#[derive(Clone)]
pub struct Admin {
    base: String,
    http: reqwest::Client,
}

impl Admin {
    fn new(base: String) -> Admin {
        crate::support::client::init_tls();
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .no_proxy()
            .build()
            .expect("client");
        Admin { base, http }
    }

    /// The `host:port` of the admin listener.
    pub fn addr(&self) -> &str {
        self.base.trim_start_matches("http://")
    }

    /// Sends an admin call with the token.
    pub async fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Resp {
        self.call_with_token(method, path, body, Some(ADMIN_TOKEN))
            .await
    }

    /// Sends an admin call with any token (or none).
    pub async fn call_with_token(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
        token: Option<&str>,
    ) -> Resp {
        let method = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req
                .header("content-type", "application/json")
                .body(b.to_string());
        }
        let resp = req.send().await.expect("admin call");
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let text = resp.text().await.expect("admin body");
        Resp {
            status,
            headers,
            text,
        }
    }
}

trait StatusProbe {
    async fn get_status(&self, path: &str) -> Option<u16>;
}

impl StatusProbe for Client {
    async fn get_status(&self, path: &str) -> Option<u16> {
        let fut = self.http().get(self.url(path)).send();
        match tokio::time::timeout(Duration::from_secs(2), fut).await {
            Ok(Ok(r)) => Some(r.status().as_u16()),
            _ => None,
        }
    }
}

fn auth_config(extra: &str) -> String {
    format!("{MOCK_MODELS}{}", plugin_entry("auth", extra))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_authenticate_in_both_dialects_and_never_reach_the_provider() {
    bounded(async {
        let up = MockUpstream::start().await;
        let body = format!(
            "[providers.up]\nkind = \"openai\"\nbase_url = \"{}\"\napi_key = \"sk-provider-secret\"\n\n\
             [[models]]\nname = \"up\"\ntargets = [{{ provider = \"up\", model = \"upstream-model\" }}]\n{}",
            up.url("/v1"),
            auth_config("")
        );
        let gw = PolicyGateway::start(&body).await;
        let (id, secret) = gw
            .create_key(json!({"name": "ci", "tenant": "acme", "metadata": {"team": "core"}}))
            .await;
        assert!(secret.starts_with("wk-") && id.starts_with("key_"));

        // OpenAI style.
        let resp = gw.chat(&secret, &chat_body("up", "hello")).await;
        assert_eq!(resp.status, 200, "{}", resp.text);
        let sent = up.single_request();
        assert_eq!(sent.header("authorization"), "Bearer sk-provider-secret");
        assert!(!format!("{:?}", sent).contains(&secret), "the client's key went upstream");

        // Anthropic style, on the Anthropic endpoint.
        let resp = gw
            .client
            .post_json_with(
                "/v1/messages",
                &json!({"model": "mock", "max_tokens": 20, "messages": [{"role": "user", "content": "hi"}]}),
                &[("x-api-key", &secret), ("anthropic-version", "2023-06-01")],
            )
            .await;
        assert_eq!(resp.status, 200, "{}", resp.text);
        assert_eq!(resp.json()["type"], "message");

        // The secret is stored only as a hash: it appears nowhere in the state directory.
        let needle = &secret[3..];
        for entry in walk(&gw.state_dir()) {
            let bytes = std::fs::read(&entry).unwrap_or_default();
            assert!(
                !bytes.windows(needle.len()).any(|w| w == needle.as_bytes()),
                "secret found in {}",
                entry.display()
            );
        }
        // ...nor in the gateway's logs.
        assert!(!gw.logs().contains(needle));
    })
    .await;
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rejection_has_its_status_and_body_in_the_callers_dialect() {
    bounded(async {
        let gw = PolicyGateway::start(&auth_config("")).await;
        let body = chat_body("mock", "hi");

        // Missing credential.
        let resp = gw.client.post_json("/v1/chat/completions", &body).await;
        let err = openai_error(&resp, 401);
        assert_eq!(err["code"], "missing_api_key");
        assert_eq!(resp.header("www-authenticate"), "Bearer");

        // Unknown key, and a provider key that is not a virtual key.
        let resp = gw.chat("wk-not-a-real-key", &body).await;
        assert_eq!(openai_error(&resp, 401)["code"], "invalid_api_key");
        let resp = gw.chat("sk-proj-provider-key", &body).await;
        assert_eq!(openai_error(&resp, 401)["code"], "invalid_api_key");

        // Anthropic dialect.
        let anthropic = json!({"model": "mock", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]});
        let resp = gw
            .client
            .post_json_with("/v1/messages", &anthropic, &[("x-api-key", "wk-nope")])
            .await;
        assert_eq!(
            anthropic_error(&resp, 401)["type"],
            "authentication_error"
        );

        // Model not allowed: 403 in both dialects.
        let (_, secret) = gw
            .create_key(json!({"name": "gpt only", "models": ["gpt-*"]}))
            .await;
        assert_eq!(gw.chat(&secret, &chat_body("gpt-4o", "hi")).await.status, 200);
        let resp = gw.chat(&secret, &body).await;
        let err = openai_error(&resp, 403);
        assert_eq!(err["code"], "model_not_allowed");
        let resp = gw
            .client
            .post_json_with("/v1/messages", &anthropic, &[("x-api-key", &secret)])
            .await;
        assert_eq!(anthropic_error(&resp, 403)["type"], "permission_error");

        // Expired.
        let (_, expired) = gw
            .create_key(json!({"name": "old", "expires_at": 1_000}))
            .await;
        let resp = gw.chat(&expired, &body).await;
        assert_eq!(openai_error(&resp, 401)["code"], "expired_api_key");

        // Revoked, through the admin API; takes effect on the next request.
        let (id, secret) = gw.create_key(json!({"name": "short-lived"})).await;
        assert_eq!(gw.chat(&secret, &body).await.status, 200);
        let resp = gw
            .admin
            .call("POST", &format!("/admin/plugins/auth/keys/{id}/revoke"), None)
            .await;
        assert_eq!(resp.status, 200, "{}", resp.text);
        assert_eq!(resp.json()["revoked"], true);
        let resp = gw.chat(&secret, &body).await;
        assert_eq!(openai_error(&resp, 401)["code"], "revoked_api_key");

        // The admin API itself refuses calls without the admin token.
        let resp = gw
            .admin
            .call_with_token("GET", "/admin/plugins/auth/keys", None, None)
            .await;
        assert_eq!(resp.status, 401);
        let resp = gw
            .admin
            .call_with_token("POST", "/admin/plugins/auth/keys", Some(&json!({"name": "x"})), Some("wrong-token-wrong-token"))
            .await;
        assert_eq!(resp.status, 401);
        // Bad requests to the key API.
        let resp = gw.admin.call("POST", "/admin/plugins/auth/keys", Some(&json!({"name": ""}))).await;
        assert_eq!(resp.status, 400, "{}", resp.text);
        let resp = gw.admin.call("GET", "/admin/plugins/auth/keys/key_missing", None).await;
        assert_eq!(resp.status, 404, "{}", resp.text);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn updates_take_effect_and_keys_survive_a_restart() {
    bounded(async {
        let mut gw = PolicyGateway::start(&auth_config("")).await;
        let (id, secret) = gw
            .create_key(json!({"name": "narrow", "models": ["gpt-4o"]}))
            .await;
        let (revoked_id, revoked) = gw.create_key(json!({"name": "gone"})).await;
        gw.admin
            .call(
                "DELETE",
                &format!("/admin/plugins/auth/keys/{revoked_id}"),
                None,
            )
            .await;
        assert_eq!(gw.chat(&secret, &chat_body("mock", "hi")).await.status, 403);

        let resp = gw
            .admin
            .call(
                "PATCH",
                &format!("/admin/plugins/auth/keys/{id}"),
                Some(&json!({"models": ["*"], "tenant": "acme"})),
            )
            .await;
        assert_eq!(resp.status, 200, "{}", resp.text);
        assert_eq!(resp.json()["tenant"], "acme");
        assert_eq!(gw.chat(&secret, &chat_body("mock", "hi")).await.status, 200);

        gw.restart().await;
        assert_eq!(gw.chat(&secret, &chat_body("mock", "hi")).await.status, 200);
        assert_eq!(
            gw.chat(&revoked, &chat_body("mock", "hi")).await.status,
            401
        );
        let list = gw
            .admin
            .call("GET", "/admin/plugins/auth/keys?include_revoked=true", None)
            .await;
        let keys = list.json()["keys"].as_array().unwrap().clone();
        assert_eq!(keys.len(), 2, "{keys:?}");
        assert!(keys.iter().all(|k| k.get("secret").is_none()));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weir_keys_cli_creates_lists_and_revokes() {
    bounded(async {
        let gw = PolicyGateway::start(&auth_config("")).await;
        let cli = |args: &[&str]| gw.weir(args);
        let created = cli(&[
            "keys",
            "create",
            "--name",
            "from-cli",
            "--tenant",
            "acme",
            "--models",
            "mock,gpt-*",
            "--rpm",
            "100",
            "--expires-in",
            "30d",
            "--meta",
            "team=core",
            "--json",
        ]);
        let v: Value = serde_json::from_str(&created).expect("JSON");
        let secret = v["secret"].as_str().unwrap().to_owned();
        let id = v["id"].as_str().unwrap().to_owned();
        assert_eq!(v["models"], json!(["mock", "gpt-*"]));
        assert_eq!(v["metadata"]["team"], "core");
        assert_eq!(gw.chat(&secret, &chat_body("mock", "hi")).await.status, 200);

        let listed = cli(&["keys", "list"]);
        assert!(
            listed.contains(&id) && listed.contains("from-cli") && listed.contains("active"),
            "{listed}"
        );
        assert!(!listed.contains(&secret));

        cli(&["keys", "revoke", &id]);
        assert_eq!(gw.chat(&secret, &chat_body("mock", "hi")).await.status, 401);
        let listed = cli(&["keys", "list", "--all"]);
        assert!(listed.contains("revoked"), "{listed}");
    })
    .await;
}

/// The auth plugin owns its keys: renamed instance, another `key_prefix`, and `weir keys`
/// still finds it (by manifest name) and manages its keys; the old core `/admin/keys` is
/// gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weir_keys_works_with_the_auth_instance_renamed() {
    bounded(async {
        let entry = plugin_entry("auth", "key_prefix = \"acme-\"").replacen(
            "[[plugins]]\n",
            "[[plugins]]\nname = \"gatekeeper\"\n",
            1,
        );
        let gw = PolicyGateway::start(&format!("{MOCK_MODELS}{entry}")).await;
        let cli = |args: &[&str]| gw.weir(args);
        let created = cli(&["keys", "create", "--name", "renamed", "--json"]);
        let v: Value = serde_json::from_str(&created).expect("JSON");
        let secret = v["secret"].as_str().unwrap().to_owned();
        let id = v["id"].as_str().unwrap().to_owned();
        assert!(secret.starts_with("acme-"), "{secret}");
        assert_eq!(gw.chat(&secret, &chat_body("mock", "hi")).await.status, 200);
        let listed = cli(&["keys", "list"]);
        assert!(listed.contains(&id), "{listed}");
        // Named explicitly too.
        let listed = cli(&["keys", "--plugin", "gatekeeper", "list"]);
        assert!(listed.contains(&id), "{listed}");
        cli(&["keys", "revoke", &id]);
        assert_eq!(gw.chat(&secret, &chat_body("mock", "hi")).await.status, 401);

        // The endpoint is the instance's; the gateway has no key routes of its own.
        let resp = gw
            .admin
            .call("GET", "/admin/plugins/gatekeeper/keys", None)
            .await;
        assert_eq!(resp.status, 200);
        let resp = gw.admin.call("GET", "/admin/plugins/auth/keys", None).await;
        assert_eq!(resp.status, 404, "no instance named auth");
        let resp = gw.admin.call("GET", "/admin/keys", None).await;
        assert_eq!(resp.status, 404);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_change_is_hot_reloaded() {
    bounded(async {
        let mut gw = PolicyGateway::start(&auth_config("")).await;
        let body = chat_body("mock", "hi");
        assert_eq!(
            gw.client
                .post_json("/v1/chat/completions", &body)
                .await
                .status,
            401
        );
        gw.rewrite(&auth_config("allow_anonymous = true"));
        let client = gw.client.clone();
        eventually(
            Duration::from_secs(10),
            "anonymous requests allowed after reload",
            || {
                let client = client.clone();
                let body = body.clone();
                async move { client.post_json("/v1/chat/completions", &body).await.status == 200 }
            },
        )
        .await;
        // A wrong key is still refused.
        assert_eq!(gw.chat("wk-wrong", &body).await.status, 401);
    })
    .await;
}

#[test]
fn fixtures_pass() {
    weir::plugin::harness::assert_fixtures_pass(&plugin_dir("auth"));
}

/// p50 and p99 of `samples` (ms), sorted in place.
fn percentiles(samples: &mut [f64]) -> (f64, f64) {
    samples.sort_by(f64::total_cmp);
    let at = |q: f64| samples[((samples.len() as f64 - 1.0) * q).round() as usize];
    (at(0.50), at(0.99))
}

/// Sends `n` chat requests at once, request `i` with `keys[i % len]` (or none), and returns
/// (p50 ms, p99 ms, wall ms); every request must succeed.
async fn burst(base: &str, keys: &[String], n: usize, model: &str) -> (f64, f64, f64) {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(n)
        .no_proxy()
        .build()
        .expect("client");
    let started = std::time::Instant::now();
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let http = http.clone();
            let url = format!("{base}/v1/chat/completions");
            let key = (!keys.is_empty()).then(|| keys[i % keys.len()].clone());
            let body = json!({"model": model, "max_tokens": 16, "messages": [{"role": "user", "content": format!("request {i}")}]});
            tokio::spawn(async move {
                let t = std::time::Instant::now();
                let mut req = http.post(url).header("content-type", "application/json").body(body.to_string());
                if let Some(k) = key {
                    req = req.bearer_auth(k);
                }
                let resp = req.send().await.expect("send");
                let status = resp.status().as_u16();
                let text = resp.text().await.expect("body");
                assert_eq!(status, 200, "{text}");
                t.elapsed().as_secs_f64() * 1000.0
            })
        })
        .collect();
    let mut lat = Vec::with_capacity(n);
    for t in tasks {
        lat.push(t.await.expect("request task"));
    }
    let wall = started.elapsed().as_secs_f64() * 1000.0;
    let (p50, p99) = percentiles(&mut lat);
    (p50, p99, wall)
}

/// 10,000 keys and 1,000 concurrent requests through the whole default chain (auth,
/// rate-limit, routing, budget) on sled. Prints the numbers (run with `--nocapture`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_keys_and_a_thousand_concurrent_requests() {
    bounded(async {
        const KEYS: usize = 10_000;
        const CONCURRENT: usize = 1_000;
        // A thousand requests at once on a debug build: deadlines fit that, not the
        // manifests' 25 ms (this test is about keys and concurrency, not deadlines).
        let roomy = |entry: String| entry.replacen("\"\n", "\"\ndeadline_ms = 1000\n", 1);
        let chain = format!(
            "{MOCK_MODELS}{}{}{}{}",
            roomy(plugin_entry("auth", "")),
            roomy(plugin_entry("rate-limit", "key = { rpm = 1000, tpm = 1000000 }")),
            roomy(plugin_entry("routing", "aliases.fast = { strategy = \"weighted\", targets = [{ provider = \"mock\", model = \"m1\", weight = 1 }, { provider = \"mock\", model = \"m2\", weight = 1 }] }")),
            roomy(plugin_entry("budget", "prices = { m1 = { input = 1, output = 2 }, m2 = { input = 1, output = 2 } }\nkey_default = { usd = 100, period = \"month\" }")),
        );
        let gw = PolicyGateway::start(&chain).await;

        // 10,000 keys through the admin API, 50 at a time.
        let started = std::time::Instant::now();
        let mut secrets = Vec::with_capacity(KEYS);
        for batch in 0..KEYS / 50 {
            let calls: Vec<_> = (0..50)
                .map(|i| {
                    let admin = gw.admin.clone();
                    let body = json!({"name": format!("key-{batch}-{i}"), "tenant": format!("t{}", i % 10)});
                    tokio::spawn(async move { admin.call("POST", "/admin/plugins/auth/keys", Some(&body)).await })
                })
                .collect();
            for c in calls {
                let resp = c.await.expect("create task");
                assert_eq!(resp.status, 201, "{}", resp.text);
                secrets.push(resp.json()["secret"].as_str().unwrap().to_owned());
            }
        }
        let create_ms = started.elapsed().as_secs_f64() * 1000.0;
        let started = std::time::Instant::now();
        let list = gw.admin.call("GET", "/admin/plugins/auth/keys?limit=20000", None).await;
        let list_ms = started.elapsed().as_secs_f64() * 1000.0;
        assert_eq!(list.json()["keys"].as_array().unwrap().len(), KEYS);

        // Warm up (VMs and instances per worker), then 1,000 at once, each its own key.
        burst(&gw.client.url(""), &secrets[..50], 50, "fast").await;
        let keys: Vec<String> = secrets.iter().step_by(KEYS / CONCURRENT).cloned().collect();
        let (p50, p99, wall) = burst(&gw.client.url(""), &keys, CONCURRENT, "fast").await;

        // The same burst against a gateway without plugins.
        let bare = PolicyGateway::start(MOCK_MODELS).await;
        burst(&bare.client.url(""), &[], 50, "mock").await;
        let (b50, b99, bwall) = burst(&bare.client.url(""), &[], CONCURRENT, "mock").await;

        // Every admitted request was settled into the usage counters.
        let started = std::time::Instant::now();
        let mut lines = 0;
        while started.elapsed() < Duration::from_secs(20) {
            let resp = gw.admin.call("GET", "/admin/plugins/budget/usage?scope=key&period=total", None).await;
            lines = resp.json()["usage"].as_array().map_or(0, Vec::len);
            if lines >= CONCURRENT {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert!(lines >= CONCURRENT, "only {lines} keys settled");
        eprintln!(
            "scale: created {KEYS} keys in {create_ms:.0} ms ({:.0}/s), listed them in {list_ms:.0} ms; \
             {CONCURRENT} concurrent requests, full chain: p50 {p50:.1} ms, p99 {p99:.1} ms, wall {wall:.0} ms; \
             no plugins: p50 {b50:.1} ms, p99 {b99:.1} ms, wall {bwall:.0} ms",
            KEYS as f64 / (create_ms / 1000.0)
        );
    })
    .await;
}
