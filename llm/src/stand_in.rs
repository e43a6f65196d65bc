//! [`StandInModel`]: the built-in stand-in model. It answers in-process, with no HTTP, exactly as
//! `chatfleet mock-llm` would: the same reply tokens, the same timing, the same fault directives
//! (counted in its own [`FaultBook`]), and the same error classification as [`crate::openai`].

use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;

use crate::mock_reply::{FaultBook, MockSettings, ReplyPlan, estimate_prompt_tokens};
use crate::openai::error_for_status;
use crate::{ChatChunk, ChatModel, ChatRequest, ChatRole, ChunkStream, LlmError};

/// A model that echoes the start of the last user message and pads it with filler words.
#[derive(Debug, Default)]
pub struct StandInModel {
    settings: MockSettings,
    faults: FaultBook,
}

impl StandInModel {
    pub fn new(settings: MockSettings) -> Self {
        Self { settings, faults: FaultBook::new() }
    }
}

/// One step of a stand-in reply, delivered after its delay.
enum Step {
    Chunk(ChatChunk),
    Cut,
}

#[async_trait]
impl ChatModel for StandInModel {
    async fn stream(&self, request: ChatRequest) -> Result<ChunkStream, LlmError> {
        let last_user_text = request
            .messages
            .iter()
            .rev()
            .find(|message| message.role == ChatRole::User)
            .map_or("", |message| message.content.as_str());
        let faults = self.faults.record(last_user_text);
        if let Some(fault) = faults.status {
            // The mock server sends retry headers with 429 and 503 only; the same here.
            let retry_after = matches!(fault.status, 429 | 503).then_some(fault.retry_after);
            return Err(error_for_status(fault.status, "mock fault", None, retry_after));
        }

        let prompt_tokens = estimate_prompt_tokens(request.messages.iter().map(|m| m.content.as_str()));
        let plan = ReplyPlan::new(last_user_text, prompt_tokens, request.max_tokens, &faults, &self.settings);

        let ReplyPlan { tokens, finish_reason, usage, first_token_delay, token_delay, cut_after } = plan;
        let keep = cut_after.map_or(tokens.len(), |k| k.min(tokens.len()));
        let mut steps: Vec<(Duration, Step)> = Vec::with_capacity(keep + 1);
        for (i, token) in tokens.into_iter().take(keep).enumerate() {
            let delay = if i == 0 { first_token_delay } else { token_delay };
            steps.push((delay, Step::Chunk(ChatChunk::Delta(token))));
        }
        // Timing as the server's: the reply ends right after its last token, or is cut when
        // the next token would have come; with no tokens at all, both wait the first-token
        // delay.
        let (end, mut end_delay) = match cut_after {
            Some(_) => (Step::Cut, token_delay),
            None => (Step::Chunk(ChatChunk::Finished { finish_reason, usage: Some(usage) }), Duration::ZERO),
        };
        if keep == 0 {
            end_delay += first_token_delay;
        }
        steps.push((end_delay, end));

        Ok(futures::stream::iter(steps)
            .then(|(delay, step)| async move {
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                match step {
                    Step::Chunk(chunk) => Ok(chunk),
                    Step::Cut => Err(LlmError::Transient {
                        message: "mock fault: the stand-in model's stream was cut".into(),
                        retry_after: None,
                    }),
                }
            })
            .boxed())
    }

    fn describe(&self) -> String {
        "the built-in stand-in model (echoes the user, no real model)".to_owned()
    }
}
