//! Export and import of state, to move a gateway from one store to another (sled to Redis,
//! Redis to sled, one sled directory to another): `weir state export` / `weir state import`
//! and `GET /admin/state/export` (see docs/operations.md, "Moving to shared state").
//!
//! # Format
//! JSON Lines, one object per line:
//!
//! ```text
//! {"format":"weir-state","version":1,"source_backend":"sled","exported_ms":1767225600000,"reserved_kept":false}
//! {"ns":"plugin/auth","key":"key/...","value_b64":"eyJ...","expires_ms":null}
//! {"ns":"plugin/budget","key":"led/key/k1/total","value_b64":"MTIzIDA=","expires_ms":null}
//! {"end":{"entries":2}}
//! ```
//!
//! The header names the format, its version and the store it came from. Each entry is one
//! key of one namespace with its value (base64: values are bytes) and its absolute expiry
//! (ms since the Unix epoch, `null` = never). The closing line counts the entries, so an
//! import can tell a complete export from a truncated one; a failure while exporting writes
//! `{"error":"..."}` instead, and the import refuses the file.
//!
//! # What is exported
//! Every namespace that holds an entry (plugin kv: keys, spend ledgers, limiters, the cache;
//! the generation history), except the request log ([`LOCAL_NAMESPACES`]), which stays with
//! the instance that wrote it; `--namespace` picks namespaces explicitly (the request log
//! included, if named). Ledger accounts (`led/...`) are exported with their reserved amount
//! set to 0 unless `keep_reserved`: a reservation belongs to a request in flight on the
//! source, and that request will settle on the source, never on the target, so a kept
//! reservation would hold budget on the target forever.
//!
//! # Import
//! The whole input is read and checked (header, every line, the closing line) before
//! anything is written. Entries already expired are skipped; an entry whose key the target
//! already holds is skipped unless `overwrite`. [`StateStore::put_entry`] stores ledger
//! accounts in the target's own form.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::io::BufRead;
use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::primitives::{account_without_reserved, is_ledger_key};
use super::{Backend, Entry, StateError, StateStore, now_ms};

/// The `format` of the header line.
pub const FORMAT: &str = "weir-state";
/// The format version this build writes and reads.
pub const VERSION: u32 = 1;
/// Namespaces an export leaves out unless named: what stays with one instance.
pub const LOCAL_NAMESPACES: &[&str] = &[crate::requestlog::NAMESPACE];
/// Entries read from the store per call.
const PAGE: usize = 1_000;

/// Error of an export or an import.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// The store failed.
    #[error(transparent)]
    State(#[from] StateError),
    /// The input could not be read.
    #[error("cannot read the export: {0}")]
    Read(std::io::Error),
    /// A line of the input is not what the format says.
    #[error("line {line}: {reason}")]
    Format {
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        reason: String,
    },
    /// The input ends without its closing line, or has entries after it.
    #[error("the export is incomplete: {0}")]
    Incomplete(String),
    /// The exporter reported a failure in the stream.
    #[error("the export failed at its source: {0}")]
    Source(String),
}

/// The first line of an export.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Header {
    /// Always [`FORMAT`].
    pub format: String,
    /// [`VERSION`].
    pub version: u32,
    /// The backend the entries came from (`sled`, `redis`).
    pub source_backend: String,
    /// When the export started, ms since the Unix epoch.
    pub exported_ms: u64,
    /// Whether ledger reservations were kept (`--keep-reserved`) or zeroed.
    pub reserved_kept: bool,
}

/// One entry line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Record {
    /// The namespace.
    pub ns: String,
    /// The key.
    pub key: String,
    /// The value, base64 (standard alphabet, padded).
    pub value_b64: String,
    /// Absolute expiry, ms since the Unix epoch; `null` = never.
    pub expires_ms: Option<u64>,
}

/// The closing line: `{"end":{"entries":N}}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct EndLine {
    end: End,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct End {
    entries: u64,
}

/// What to export.
#[derive(Debug, Clone, Default)]
pub struct ExportOptions {
    /// Only these namespaces; empty = every namespace but [`LOCAL_NAMESPACES`].
    pub namespaces: Vec<String>,
    /// Keep ledger reservations instead of writing them as 0 (see the module docs).
    pub keep_reserved: bool,
}

/// An export in progress: an iterator of chunks of the output (whole lines, each ending in
/// `\n`): the header, a chunk per page of entries, then the closing line. After an error it
/// ends. Blocking (it reads the store): run it off the async workers.
pub struct Export {
    store: Arc<dyn StateStore>,
    header: Option<Header>,
    namespaces: VecDeque<String>,
    /// The key after which the current namespace continues.
    after: Option<String>,
    keep_reserved: bool,
    entries: u64,
    done: bool,
}

impl std::fmt::Debug for Export {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Export")
            .field("namespaces", &self.namespaces)
            .field("entries", &self.entries)
            .finish_non_exhaustive()
    }
}

impl Export {
    /// Starts an export of `store` (a `backend` store): lists its namespaces now, so a store
    /// that cannot be read fails here, before any output.
    pub fn new(
        store: Arc<dyn StateStore>,
        backend: Backend,
        opts: &ExportOptions,
    ) -> Result<Export, MigrateError> {
        let namespaces: BTreeSet<String> = if opts.namespaces.is_empty() {
            store
                .namespaces()?
                .into_iter()
                .filter(|ns| !LOCAL_NAMESPACES.contains(&ns.as_str()))
                .collect()
        } else {
            opts.namespaces.iter().cloned().collect()
        };
        Ok(Export {
            store,
            header: Some(Header {
                format: FORMAT.to_owned(),
                version: VERSION,
                source_backend: backend.as_str().to_owned(),
                exported_ms: now_ms(),
                reserved_kept: opts.keep_reserved,
            }),
            namespaces: namespaces.into_iter().collect(),
            after: None,
            keep_reserved: opts.keep_reserved,
            entries: 0,
            done: false,
        })
    }

    /// The namespaces this export covers, in order.
    pub fn namespaces(&self) -> impl Iterator<Item = &str> {
        self.namespaces.iter().map(String::as_str)
    }

    /// Entries written so far (all of them once the iterator has ended).
    pub fn entries(&self) -> u64 {
        self.entries
    }

    /// The next page of entry lines; `None` once every namespace is done.
    fn page(&mut self) -> Result<Option<String>, MigrateError> {
        while let Some(ns) = self.namespaces.front() {
            let page = self.store.entries(ns, self.after.as_deref(), PAGE)?;
            let Some(last) = page.last() else {
                self.namespaces.pop_front();
                self.after = None;
                continue;
            };
            self.after = Some(last.key.clone());
            let mut out = String::new();
            for entry in &page {
                out.push_str(&line(&self.record(ns, entry)));
            }
            self.entries += page.len() as u64;
            return Ok(Some(out));
        }
        Ok(None)
    }

    fn record(&self, ns: &str, entry: &Entry) -> Record {
        let zeroed = (!self.keep_reserved && is_ledger_key(&entry.key))
            .then(|| account_without_reserved(&entry.value))
            .flatten();
        Record {
            ns: ns.to_owned(),
            key: entry.key.clone(),
            value_b64: BASE64.encode(zeroed.as_deref().unwrap_or(&entry.value)),
            expires_ms: entry.expires_ms,
        }
    }
}

impl Iterator for Export {
    type Item = Result<String, MigrateError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        if let Some(header) = self.header.take() {
            return Some(Ok(line(&header)));
        }
        match self.page() {
            Ok(Some(chunk)) => Some(Ok(chunk)),
            Ok(None) => {
                self.done = true;
                Some(Ok(line(&EndLine {
                    end: End {
                        entries: self.entries,
                    },
                })))
            }
            Err(e) => {
                self.done = true;
                Some(Err(e))
            }
        }
    }
}

/// The line an exporter writes in place of the rest of the stream when it fails.
pub fn error_line(e: &MigrateError) -> String {
    line(&serde_json::json!({ "error": e.to_string() }))
}

/// `value` as one JSON line.
fn line(value: &impl Serialize) -> String {
    // Serializing these plain structs cannot fail; an empty object would be refused on
    // import rather than silently taken.
    let mut s = serde_json::to_string(value).unwrap_or_else(|_| "{}".to_owned());
    s.push('\n');
    s
}

/// A whole export, read and checked: its header and its entries by namespace.
#[derive(Debug, Clone)]
pub struct Parsed {
    /// The header.
    pub header: Header,
    /// `(namespace, entry)` in file order.
    pub entries: Vec<(String, Entry)>,
}

/// Reads an export and checks every line: the header first (a format and version this
/// build reads), entries, then the closing line with the right count and nothing after it.
pub fn parse(input: impl BufRead) -> Result<Parsed, MigrateError> {
    let mut header = None;
    let mut entries = Vec::new();
    let mut ended = false;
    for (i, text) in input.lines().enumerate() {
        let n = i + 1;
        let text = text.map_err(MigrateError::Read)?;
        if text.trim().is_empty() {
            continue;
        }
        let bad = |reason: String| MigrateError::Format { line: n, reason };
        if ended {
            return Err(MigrateError::Incomplete(format!(
                "line {n} follows the closing line"
            )));
        }
        let value: Value =
            serde_json::from_str(&text).map_err(|e| bad(format!("not JSON: {e}")))?;
        if value.get("error").is_some() {
            return Err(MigrateError::Source(error_text(&value)));
        }
        if header.is_none() {
            let h: Header = serde_json::from_value(value)
                .map_err(|e| bad(format!("not an export header: {e}")))?;
            if h.format != FORMAT || h.version != VERSION {
                return Err(bad(format!(
                    "format '{}' version {} is not one this build reads ('{FORMAT}' version {VERSION})",
                    h.format, h.version
                )));
            }
            header = Some(h);
            continue;
        }
        if value.get("end").is_some() {
            let end: EndLine = serde_json::from_value(value)
                .map_err(|e| bad(format!("not a closing line: {e}")))?;
            if end.end.entries != entries.len() as u64 {
                return Err(MigrateError::Incomplete(format!(
                    "the closing line counts {} entries, the file has {}",
                    end.end.entries,
                    entries.len()
                )));
            }
            ended = true;
            continue;
        }
        let r: Record =
            serde_json::from_value(value).map_err(|e| bad(format!("not an entry: {e}")))?;
        let value = BASE64
            .decode(&r.value_b64)
            .map_err(|e| bad(format!("value_b64 is not base64: {e}")))?;
        entries.push((
            r.ns,
            Entry {
                key: r.key,
                value,
                expires_ms: r.expires_ms,
            },
        ));
    }
    let Some(header) = header else {
        return Err(MigrateError::Incomplete("the input is empty".into()));
    };
    if !ended {
        return Err(MigrateError::Incomplete(
            "no closing line ({\"end\":...}): the export was cut short".into(),
        ));
    }
    Ok(Parsed { header, entries })
}

fn error_text(value: &Value) -> String {
    match value.get("error") {
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
        None => String::new(),
    }
}

/// How to import.
#[derive(Debug, Clone, Copy, Default)]
pub struct ImportOptions {
    /// Count what would happen, write nothing.
    pub dry_run: bool,
    /// Replace keys the target already holds (default: skip them).
    pub overwrite: bool,
}

/// What an import did (or, dry, would do), per namespace.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    /// Written to a key the target did not hold.
    pub imported: u64,
    /// Written over a key the target held (`overwrite`).
    pub replaced: u64,
    /// Left alone: the target holds the key.
    pub skipped_existing: u64,
    /// Left out: expired since the export.
    pub skipped_expired: u64,
}

impl Counts {
    fn add(&mut self, other: Counts) {
        self.imported += other.imported;
        self.replaced += other.replaced;
        self.skipped_existing += other.skipped_existing;
        self.skipped_expired += other.skipped_expired;
    }
}

/// The report of an import.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ImportReport {
    /// Per namespace.
    pub namespaces: BTreeMap<String, Counts>,
    /// All namespaces together.
    pub total: Counts,
}

/// Writes the entries of `parsed` into `store` (see the module docs).
pub fn import(
    store: &dyn StateStore,
    parsed: &Parsed,
    opts: ImportOptions,
) -> Result<ImportReport, MigrateError> {
    let mut report = ImportReport::default();
    for (ns, entry) in &parsed.entries {
        let mut one = Counts::default();
        if entry.expires_ms.is_some_and(|e| e <= now_ms()) {
            one.skipped_expired = 1;
        } else {
            let exists = store.get(ns, &entry.key)?.is_some();
            match (exists, opts.overwrite) {
                (true, false) => one.skipped_existing = 1,
                (true, true) => one.replaced = 1,
                (false, _) => one.imported = 1,
            }
            if !opts.dry_run && (!exists || opts.overwrite) {
                store.put_entry(ns, entry)?;
            }
        }
        report.namespaces.entry(ns.clone()).or_default().add(one);
        report.total.add(one);
    }
    if !opts.dry_run {
        store.flush()?;
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::MemoryStore;
    use std::time::Duration;

    fn export_text(store: &Arc<MemoryStore>, opts: &ExportOptions) -> String {
        let store: Arc<dyn StateStore> = store.clone();
        Export::new(store, Backend::Sled, opts)
            .unwrap()
            .collect::<Result<String, _>>()
            .unwrap()
    }

    fn source() -> Arc<MemoryStore> {
        let s = Arc::new(MemoryStore::new());
        s.set("plugin/auth", "key/a", b"{\"id\":\"a\"}", None)
            .unwrap();
        s.set("plugin/auth", "bin", &[0, 255, 10], None).unwrap();
        s.set(
            "plugin/cache",
            "c/1",
            b"x",
            Some(Duration::from_secs(3_600)),
        )
        .unwrap();
        s.ledger_reserve("plugin/budget", "k/total", 1_000, 300, None)
            .unwrap();
        s.ledger_settle("plugin/budget", "k/total", 100, 40, None)
            .unwrap();
        s.set(crate::requestlog::NAMESPACE, "r/1", b"{}", None)
            .unwrap();
        s
    }

    #[test]
    fn round_trip_zeroes_reservations_and_leaves_the_request_log() {
        let src = source();
        let text = export_text(&src, &ExportOptions::default());
        let lines: Vec<&str> = text.lines().collect();
        assert!(
            lines[0].starts_with(
                "{\"format\":\"weir-state\",\"version\":1,\"source_backend\":\"sled\""
            ),
            "{text}"
        );
        assert_eq!(*lines.last().unwrap(), "{\"end\":{\"entries\":4}}");
        assert!(!text.contains("request-log"), "{text}");

        let parsed = parse(text.as_bytes()).unwrap();
        assert!(!parsed.header.reserved_kept);
        let dst = MemoryStore::new();
        let report = import(&dst, &parsed, ImportOptions::default()).unwrap();
        assert_eq!(report.total.imported, 4);
        assert_eq!(report.namespaces["plugin/auth"].imported, 2);
        assert_eq!(
            dst.get("plugin/auth", "bin").unwrap().unwrap(),
            [0, 255, 10]
        );
        let b = dst.ledger_balance("plugin/budget", "k/total").unwrap();
        assert_eq!((b.spent_micros, b.reserved_micros), (40, 0));
        let exp = dst.entries("plugin/cache", None, 1).unwrap()[0].expires_ms;
        assert_eq!(
            exp,
            src.entries("plugin/cache", None, 1).unwrap()[0].expires_ms
        );
        assert_eq!(dst.get(crate::requestlog::NAMESPACE, "r/1").unwrap(), None);

        // Kept on request; and a named namespace is exported even when it is local.
        let opts = ExportOptions {
            namespaces: vec!["plugin/budget".into(), crate::requestlog::NAMESPACE.into()],
            keep_reserved: true,
        };
        let parsed = parse(export_text(&src, &opts).as_bytes()).unwrap();
        assert!(parsed.header.reserved_kept);
        let dst = MemoryStore::new();
        import(&dst, &parsed, ImportOptions::default()).unwrap();
        let b = dst.ledger_balance("plugin/budget", "k/total").unwrap();
        assert_eq!((b.spent_micros, b.reserved_micros), (40, 200));
        assert!(
            dst.get(crate::requestlog::NAMESPACE, "r/1")
                .unwrap()
                .is_some()
        );
        assert_eq!(dst.namespaces().unwrap().len(), 2);
    }

    #[test]
    fn existing_keys_are_skipped_unless_overwrite_and_dry_runs_write_nothing() {
        let parsed = parse(export_text(&source(), &ExportOptions::default()).as_bytes()).unwrap();
        let dst = MemoryStore::new();
        dst.set("plugin/auth", "key/a", b"mine", None).unwrap();
        let dry = ImportOptions {
            dry_run: true,
            overwrite: false,
        };
        let report = import(&dst, &parsed, dry).unwrap();
        assert_eq!(report.total.imported, 3);
        assert_eq!(report.total.skipped_existing, 1);
        assert_eq!(dst.namespaces().unwrap(), ["plugin/auth"]);
        import(&dst, &parsed, ImportOptions::default()).unwrap();
        assert_eq!(dst.get("plugin/auth", "key/a").unwrap().unwrap(), b"mine");
        let over = ImportOptions {
            dry_run: false,
            overwrite: true,
        };
        let report = import(&dst, &parsed, over).unwrap();
        assert_eq!(report.total.replaced, 4);
        assert_eq!(
            dst.get("plugin/auth", "key/a").unwrap().unwrap(),
            b"{\"id\":\"a\"}"
        );
    }

    #[test]
    fn broken_inputs_are_refused_before_anything_is_written() {
        let good = export_text(&source(), &ExportOptions::default());
        let cut: String = good.lines().take(3).map(|l| format!("{l}\n")).collect();
        assert!(matches!(
            parse(cut.as_bytes()),
            Err(MigrateError::Incomplete(_))
        ));
        assert!(matches!(parse(&b""[..]), Err(MigrateError::Incomplete(_))));
        let failed = format!("{cut}{}", error_line(&MigrateError::Source("disk".into())));
        let err = parse(failed.as_bytes()).unwrap_err();
        assert!(
            matches!(err, MigrateError::Source(ref m) if m.contains("disk")),
            "{err}"
        );
        let extra = good.replace("\"expires_ms\":null}", "\"expires_ms\":null,\"x\":1}");
        let err = parse(extra.as_bytes()).unwrap_err();
        assert!(matches!(err, MigrateError::Format { line: 2, .. }), "{err}");
        let v2 = good.replace("\"version\":1", "\"version\":2");
        assert!(matches!(
            parse(v2.as_bytes()),
            Err(MigrateError::Format { line: 1, .. })
        ));
        let miscount = good.replace("{\"end\":{\"entries\":4}}", "{\"end\":{\"entries\":5}}");
        assert!(matches!(
            parse(miscount.as_bytes()),
            Err(MigrateError::Incomplete(_))
        ));
        let after = format!("{good}{}", good.lines().nth(1).unwrap());
        assert!(matches!(
            parse(after.as_bytes()),
            Err(MigrateError::Incomplete(_))
        ));
    }

    #[test]
    fn expired_entries_are_skipped() {
        let text = format!(
            "{}{}{}",
            line(&Header {
                format: FORMAT.into(),
                version: VERSION,
                source_backend: "redis".into(),
                exported_ms: 0,
                reserved_kept: false,
            }),
            line(&Record {
                ns: "n".into(),
                key: "k".into(),
                value_b64: BASE64.encode(b"v"),
                expires_ms: Some(1),
            }),
            "{\"end\":{\"entries\":1}}\n"
        );
        let dst = MemoryStore::new();
        let report = import(
            &dst,
            &parse(text.as_bytes()).unwrap(),
            ImportOptions::default(),
        )
        .unwrap();
        assert_eq!(report.total.skipped_expired, 1);
        assert!(dst.namespaces().unwrap().is_empty());
    }
}
