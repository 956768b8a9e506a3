//! What response hooks see: the response view built from the pipeline's types. (The
//! request view is [`RequestView`](crate::plugin::contract::RequestView), read lazily.)

use crate::api::openai::ChatResponse;
use crate::plugin::contract::{ChoiceView, ResponseView, ToolCallView, Usage, message_view};

/// The view of a complete response: choice text joined as the WIT says, tool calls.
pub(super) fn response_view(request_id: &str, resp: &ChatResponse) -> ResponseView {
    ResponseView {
        request_id: request_id.to_owned(),
        model: resp.model.clone(),
        status: 200,
        choices: resp
            .choices
            .iter()
            .map(|c| ChoiceView {
                index: c.index,
                text: message_view(&c.message).content,
                tool_calls: c
                    .message
                    .tool_calls
                    .iter()
                    .flatten()
                    .map(|t| ToolCallView {
                        id: t.id.clone(),
                        name: t.function.name.clone(),
                        arguments: t.function.arguments.clone(),
                    })
                    .collect(),
                finish_reason: c.finish_reason.clone(),
            })
            .collect(),
        usage: resp.usage.map(|u| Usage {
            prompt_tokens: u.prompt_tokens,
            completion_tokens: u.completion_tokens,
            cached_tokens: u.prompt_tokens_details.map_or(0, |d| d.cached_tokens),
            cache_write_tokens: 0,
        }),
    }
}
