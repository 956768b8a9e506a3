//! `weir plugin new --lang rust|lua NAME`: writes a small working plugin (manifest, code,
//! README, fixtures) that passes `weir plugin test` as generated, for authors to edit.
//!
//! Both languages get the same policy, so the generated fixtures are identical: the plugin
//! reads the team from the `x-team` header into the request metadata (`team`), and with
//! `required = true` in its config rejects requests without it (400).

use std::path::{Path, PathBuf};

use super::manifest::validate_name;

/// The language of a new plugin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lang {
    /// A Rust crate built to a WASM component with `weir-sdk`.
    Rust,
    /// A Luau script.
    Lua,
}

impl std::str::FromStr for Lang {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "rust" => Ok(Lang::Rust),
            "lua" => Ok(Lang::Lua),
            other => Err(format!("unknown language '{other}' (expected rust or lua)")),
        }
    }
}

/// Error creating a plugin folder.
#[derive(Debug, thiserror::Error)]
pub enum ScaffoldError {
    /// The name is not a valid plugin name.
    #[error("plugin name: {0}")]
    Name(String),
    /// The folder exists already.
    #[error("{} already exists", .0.display())]
    Exists(PathBuf),
    /// Writing failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// Creates `parent/NAME/` with a plugin in `lang`; returns the folder.
pub fn new_plugin(lang: Lang, name: &str, parent: &Path) -> Result<PathBuf, ScaffoldError> {
    validate_name(name).map_err(ScaffoldError::Name)?;
    let dir = parent.join(name);
    if dir.exists() {
        return Err(ScaffoldError::Exists(dir));
    }
    let mut files: Vec<(PathBuf, String)> = vec![
        (PathBuf::from("fixtures/config.json"), FIXTURE_CONFIG.into()),
        (
            PathBuf::from("fixtures/tags-the-team.json"),
            FIXTURE_TAGS.into(),
        ),
        (
            PathBuf::from("fixtures/rejects-missing-team.json"),
            FIXTURE_MISSING.into(),
        ),
        (
            PathBuf::from("fixtures/optional-team.json"),
            FIXTURE_OPTIONAL.into(),
        ),
    ];
    match lang {
        Lang::Lua => {
            files.push(("plugin.toml".into(), fill(LUA_MANIFEST, name)));
            files.push(("plugin.lua".into(), fill(LUA_SOURCE, name)));
            files.push(("README.md".into(), fill(LUA_README, name)));
        }
        Lang::Rust => {
            files.push(("plugin.toml".into(), fill(RUST_MANIFEST, name)));
            files.push((
                "Cargo.toml".into(),
                fill(RUST_CARGO, name).replace("{{sdk}}", &sdk_dependency()),
            ));
            files.push(("src/lib.rs".into(), fill(RUST_SOURCE, name)));
            files.push(("README.md".into(), fill(RUST_README, name)));
            files.push((".gitignore".into(), "/target\n/plugin.wasm\n".into()));
        }
    }
    for (rel, text) in files {
        let path = dir.join(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|source| ScaffoldError::Io {
                path: parent.to_owned(),
                source,
            })?;
        }
        std::fs::write(&path, text).map_err(|source| ScaffoldError::Io { path, source })?;
    }
    Ok(dir)
}

fn fill(template: &str, name: &str) -> String {
    template
        .replace("{{name}}", name)
        .replace("{{crate}}", &name.replace('-', "_"))
}

/// The `weir-sdk` dependency line: this checkout's `sdk/` when it exists (a development
/// build), else the published crate.
fn sdk_dependency() -> String {
    let sdk = Path::new(env!("CARGO_MANIFEST_DIR")).join("../sdk");
    match sdk.canonicalize() {
        Ok(p) if p.join("Cargo.toml").exists() => {
            format!("weir-sdk = {{ path = {:?} }}", p.display().to_string())
        }
        _ => format!("weir-sdk = \"{}\"", env!("CARGO_PKG_VERSION")),
    }
}

const FIXTURE_CONFIG: &str = r#"{ "required": true }
"#;

const FIXTURE_TAGS: &str = r#"{
  "description": "The x-team header becomes the `team` metadata entry.",
  "request": {
    "headers": { "x-team": "search" },
    "body": { "model": "gpt-4o-mini", "messages": [{ "role": "user", "content": "hi" }] }
  },
  "expect": { "decision": "continue", "metadata": { "team": "search" } }
}
"#;

const FIXTURE_MISSING: &str = r#"{
  "description": "Without the header, a required team means a 400.",
  "request": {
    "body": { "model": "gpt-4o-mini", "messages": [{ "role": "user", "content": "hi" }] }
  },
  "expect": {
    "decision": "reply",
    "status": 400,
    "body": { "error": { "message": "missing x-team header", "type": "invalid_request_error" } }
  }
}
"#;

const FIXTURE_OPTIONAL: &str = r#"{
  "description": "With required = false, requests without the header go through untagged.",
  "config": { "required": false },
  "request": {
    "body": { "model": "gpt-4o-mini", "messages": [{ "role": "user", "content": "hi" }] }
  },
  "expect": { "decision": "continue", "metadata": {} }
}
"#;

const LUA_MANIFEST: &str = r#"# The manifest: what the gateway needs to know to run this plugin.
name = "{{name}}"
version = "0.1.0"
description = "Tags requests with the team from the x-team header."
kind = "lua"
entry = "plugin.lua"
hooks = ["on-request"]
headers = ["x-team"]     # the only headers the plugin sees
failure = "closed"       # a failing plugin fails the request (503); "open" skips it

[limits]
deadline_ms = 5

[config_schema]
type = "object"
additionalProperties = false
properties.required = { type = "boolean" }
"#;

const LUA_SOURCE: &str = r#"-- {{name}}: tags each request with the team from the x-team header.
-- Test: weir plugin test .      Types for your editor: sdk/lua/weir.d.lua

local required = false

--- Called once per VM with the instance's `config` table from weir.toml.
---@param config { required: boolean? }
function init(config)
	required = config.required == true
end

--- Called for every request: return nil (go on), a table of changes, or a reply.
---@param req weir.Request
---@return weir.Decision?
function on_request(req)
	local team = req.header("x-team")
	if team == nil then
		if required then
			return weir.error_reply(req.dialect, 400, "missing x-team header")
		end
		return nil
	end
	return weir.continue({ set_metadata = { team = team } })
end
"#;

const LUA_README: &str = r#"# {{name}}

A Weir plugin in Lua (Luau): tags each request with the team from the `x-team` header
(`team` in the request metadata, seen by later plugins and in logs); with
`required = true`, requests without the header get a 400.

```sh
weir plugin test {{name}}     # runs fixtures/*.json against plugin.lua
```

Enable it in `weir.toml`:

```toml
[[plugins]]
path = "{{name}}"
config = { required = true }
```

Files: `plugin.toml` (manifest: hooks, headers, limits, config schema), `plugin.lua` (the
hooks), `fixtures/` (a request and the expected decision each; `config.json` is the default
config). Editor completion for the `weir` global: point LuaLS at `sdk/lua/weir.d.lua`.
"#;

const RUST_MANIFEST: &str = r#"# The manifest: what the gateway needs to know to run this plugin.
name = "{{name}}"
version = "0.1.0"
description = "Tags requests with the team from the x-team header."
kind = "wasm"
entry = "plugin.wasm"    # built from src/ (see README); never committed
hooks = ["on-request"]
headers = ["x-team"]     # the only headers the plugin sees
failure = "closed"       # a failing plugin fails the request (503); "open" skips it

[limits]
deadline_ms = 5

[config_schema]
type = "object"
additionalProperties = false
properties.required = { type = "boolean" }
"#;

const RUST_CARGO: &str = r#"# Build: cargo build --release --target wasm32-wasip2 && cp target/wasm32-wasip2/release/{{crate}}.wasm plugin.wasm
[package]
name = "{{name}}"
version = "0.1.0"
edition = "2024"
publish = false

# Its own workspace: plugins build for wasm32-wasip2, apart from the gateway.
[workspace]

[lib]
crate-type = ["cdylib", "rlib"]

[dependencies]
{{sdk}}
serde = { version = "1", features = ["derive"] }
serde_json = "1"

[profile.release]
opt-level = "s"
lto = true
codegen-units = 1
strip = true
panic = "abort"
"#;

const RUST_SOURCE: &str = r#"//! {{name}}: tags each request with the team from the x-team header.

use serde::Deserialize;
use weir_sdk::{Decision, Plugin, Request};

/// The instance's `config` table from weir.toml.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Reject requests without the header (400).
    #[serde(default)]
    pub required: bool,
}

/// The plugin.
pub struct TeamTagger {
    config: Config,
}

impl Plugin for TeamTagger {
    type Config = Config;

    fn new(config: Config) -> Result<Self, String> {
        Ok(TeamTagger { config })
    }

    fn on_request(&self, req: &Request) -> Decision {
        // The request is lazy: only the header asked for is copied into the plugin.
        match req.header("x-team") {
            Some(team) => Decision::cont().set_metadata("team", &team),
            None if self.config.required => Decision::error(400, "missing x-team header"),
            None => Decision::cont(),
        }
    }
}

weir_sdk::export!(TeamTagger);
"#;

const RUST_README: &str = r#"# {{name}}

A Weir plugin in Rust, compiled to a WebAssembly component: tags each request with the team
from the `x-team` header (`team` in the request metadata); with `required = true`, requests
without the header get a 400.

```sh
cargo build --release --target wasm32-wasip2
cp target/wasm32-wasip2/release/{{crate}}.wasm plugin.wasm
weir plugin test .            # runs fixtures/*.json against plugin.wasm
```

Enable it in `weir.toml`:

```toml
[[plugins]]
path = "{{name}}"
config = { required = true }
```

Files: `plugin.toml` (manifest), `src/lib.rs` (implement `weir_sdk::Plugin`, then
`weir_sdk::export!`), `fixtures/` (a request and the expected decision each; `config.json`
is the default config).
"#;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plugin::harness::run_fixtures;

    #[test]
    fn lua_scaffold_passes_its_fixtures() {
        let parent = tempfile::tempdir().unwrap();
        let dir = new_plugin(Lang::Lua, "team-tagger", parent.path()).unwrap();
        let report = run_fixtures(&dir).unwrap();
        let mut table = Vec::new();
        report.print(&mut table).unwrap();
        assert!(report.passed(), "{}", String::from_utf8_lossy(&table));
        assert_eq!(report.cases.len(), 3);
    }

    #[test]
    fn rust_scaffold_writes_a_crate() {
        let parent = tempfile::tempdir().unwrap();
        let dir = new_plugin(Lang::Rust, "team-tagger", parent.path()).unwrap();
        let cargo = std::fs::read_to_string(dir.join("Cargo.toml")).unwrap();
        assert!(cargo.contains("weir-sdk"));
        assert!(cargo.contains("name = \"team-tagger\""));
        crate::plugin::manifest::Manifest::load(&dir).unwrap();
        assert!(matches!(
            new_plugin(Lang::Rust, "team-tagger", parent.path()),
            Err(ScaffoldError::Exists(_))
        ));
        assert!(matches!(
            new_plugin(Lang::Lua, "Bad Name", parent.path()),
            Err(ScaffoldError::Name(_))
        ));
    }
}
