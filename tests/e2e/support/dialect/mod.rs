//! Canned upstream answers in each provider's dialect, as [`super::upstream::Reply`]s.
//!
//! Token counts are fixed (`PROMPT_TOKENS` in, `COMPLETION_TOKENS` out) so tests can check
//! that usage survives translation.

pub mod anthropic;
pub mod gemini;
pub mod openai;

/// Input tokens every canned answer reports.
pub const PROMPT_TOKENS: u64 = 11;
/// Output tokens every canned answer reports.
pub const COMPLETION_TOKENS: u64 = 7;

/// A tool call a canned answer makes: id, function name, JSON arguments.
#[derive(Debug, Clone, Copy)]
pub struct Call<'a> {
    /// Call id.
    pub id: &'a str,
    /// Function name.
    pub name: &'a str,
    /// Arguments as a JSON document.
    pub args: &'a str,
}

/// Two parallel calls used by the tool tests.
pub const TWO_CALLS: [Call<'static>; 2] = [
    Call {
        id: "call_weather_1",
        name: "get_weather",
        args: r#"{"city":"Paris","unit":"celsius"}"#,
    },
    Call {
        id: "call_time_2",
        name: "get_time",
        args: r#"{"timezone":"Europe/Paris"}"#,
    },
];

/// Splits a string in two halves on a char boundary (to stream arguments in pieces).
pub fn halves(s: &str) -> [String; 2] {
    let chars: Vec<char> = s.chars().collect();
    let mid = chars.len() / 2;
    [chars[..mid].iter().collect(), chars[mid..].iter().collect()]
}
