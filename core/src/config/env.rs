//! `${VAR}` interpolation in config string values.
//!
//! Forms: `${VAR}` (an error if unset), `${VAR:-default}` (the default if unset or empty),
//! `$$` for a literal `$`. Interpolation runs on parsed TOML string values, never on the raw
//! text, so a secret containing quotes cannot break the file's syntax. A provider whose
//! `api_key` interpolates to an empty string is reported as disabled (so one quickstart file
//! serves the mock offline and real providers once their keys are exported).

use super::ConfigError;

/// Interpolates every string in `value`; returns the names of providers whose `api_key`
/// came out empty.
pub fn interpolate(
    value: &mut toml::Value,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<Vec<String>, ConfigError> {
    walk(value, &mut String::new(), lookup)?;
    let mut disabled = Vec::new();
    if let Some(toml::Value::Table(providers)) = value.get("providers") {
        for (name, p) in providers {
            if let Some(toml::Value::String(key)) = p.get("api_key")
                && key.is_empty()
            {
                disabled.push(name.clone());
            }
        }
    }
    Ok(disabled)
}

fn walk(
    value: &mut toml::Value,
    path: &mut String,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<(), ConfigError> {
    match value {
        toml::Value::String(s) if s.contains('$') => {
            *s = expand(s, path, lookup)?;
        }
        toml::Value::Array(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                let len = path.len();
                path.push_str(&format!("[{i}]"));
                walk(item, path, lookup)?;
                path.truncate(len);
            }
        }
        toml::Value::Table(table) => {
            for (k, v) in table.iter_mut() {
                let len = path.len();
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(k);
                walk(v, path, lookup)?;
                path.truncate(len);
            }
        }
        _ => {}
    }
    Ok(())
}

/// Expands one string.
pub fn expand(
    s: &str,
    key: &str,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<String, ConfigError> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(r) = after.strip_prefix('$') {
            out.push('$');
            rest = r;
        } else if let Some(r) = after.strip_prefix('{') {
            let end = r.find('}').ok_or_else(|| {
                ConfigError::invalid(key, "unterminated '${' (write '$$' for a literal '$')")
            })?;
            let expr = &r[..end];
            let (name, default) = match expr.split_once(":-") {
                Some((n, d)) => (n, Some(d)),
                None => (expr, None),
            };
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(ConfigError::invalid(
                    key,
                    format!("'${{{expr}}}' is not a valid variable reference"),
                ));
            }
            match (
                lookup(name).filter(|v| !v.is_empty() || default.is_none()),
                default,
            ) {
                (Some(v), _) => out.push_str(&v),
                (None, Some(d)) => out.push_str(d),
                (None, None) => {
                    return Err(ConfigError::invalid(
                        key,
                        format!(
                            "environment variable {name} is not set (use ${{{name}:-}} to allow it to be empty)"
                        ),
                    ));
                }
            }
            rest = &r[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(k: &str) -> Option<String> {
        match k {
            "KEY" => Some("sk-123".into()),
            "EMPTY" => Some(String::new()),
            _ => None,
        }
    }

    #[test]
    fn expands_forms() {
        assert_eq!(
            expand("Bearer ${KEY}", "k", &env).expect("ok"),
            "Bearer sk-123"
        );
        assert_eq!(expand("${NOPE:-dflt}", "k", &env).expect("ok"), "dflt");
        assert_eq!(expand("${EMPTY:-dflt}", "k", &env).expect("ok"), "dflt");
        assert_eq!(expand("${NOPE:-}", "k", &env).expect("ok"), "");
        assert_eq!(expand("a$$b $x", "k", &env).expect("ok"), "a$b $x");
    }

    #[test]
    fn missing_variable_names_key_and_variable() {
        let err = expand("${NOPE}", "providers.openai.api_key", &env).expect_err("missing");
        let msg = err.to_string();
        assert!(
            msg.contains("providers.openai.api_key") && msg.contains("NOPE"),
            "{msg}"
        );
        assert!(expand("${KEY", "k", &env).is_err());
        assert!(expand("${BAD NAME}", "k", &env).is_err());
    }

    #[test]
    fn empty_api_key_disables_provider() {
        let mut v: toml::Value = toml::from_str(
            "[providers.a]\napi_key = \"${NOPE:-}\"\n[providers.b]\napi_key = \"${KEY}\"",
        )
        .expect("toml");
        let disabled = interpolate(&mut v, &env).expect("ok");
        assert_eq!(disabled, vec!["a".to_owned()]);
    }
}
