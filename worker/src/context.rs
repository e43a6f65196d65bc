//! What the model sees: the system prompt and the most recent messages that fit a token
//! budget.

use llm::{ChatMessage, ChatRole};
use store::{Role, StoredMessage};

/// How the model's context is assembled.
#[derive(Debug, Clone)]
pub struct ContextSettings {
    /// Sent first in every request.
    pub system_prompt: String,
    /// Estimated tokens the prompt may take (system prompt and history together).
    pub token_budget: usize,
    /// How many recent messages are read from the store at most.
    pub history_limit: usize,
}

impl Default for ContextSettings {
    fn default() -> Self {
        Self { system_prompt: "You are a helpful assistant.".into(), token_budget: 3000, history_limit: 64 }
    }
}

/// A conservative token estimate that needs no tokenizer: about four bytes of text per
/// token, plus the few tokens of per-message framing chat formats add.
pub fn estimate_tokens(text: &str) -> usize {
    text.len().div_ceil(4) + 4
}

/// Builds the model's messages from `history` (conversation order, ending with the message
/// to answer). The newest messages are kept while they fit; the message being answered is
/// always kept, even alone over budget, because without it there is nothing to answer.
/// User messages that failed, and so have no reply, are left out, and so are replies with no
/// text (interrupted by a newer message before the model said anything), which some endpoints
/// refuse.
pub fn build(settings: &ContextSettings, history: &[StoredMessage]) -> Vec<ChatMessage> {
    let mut budget = settings.token_budget.saturating_sub(estimate_tokens(&settings.system_prompt));
    let mut kept = Vec::new();
    for (i, message) in history.iter().rev().enumerate() {
        let is_current = i == 0;
        let empty_reply = message.role == Role::Assistant && message.text.is_empty();
        if !is_current && (message.failure.is_some() || empty_reply) {
            continue;
        }
        let cost = estimate_tokens(&message.text);
        if !is_current && cost > budget {
            break;
        }
        budget = budget.saturating_sub(cost);
        kept.push(ChatMessage {
            role: match message.role {
                Role::User => ChatRole::User,
                Role::Assistant => ChatRole::Assistant,
            },
            content: message.text.clone(),
        });
    }
    let mut messages = Vec::with_capacity(kept.len() + 1);
    if !settings.system_prompt.is_empty() {
        messages.push(ChatMessage { role: ChatRole::System, content: settings.system_prompt.clone() });
    }
    messages.extend(kept.into_iter().rev());
    messages
}

#[cfg(test)]
mod tests {
    use super::*;
    use schemas::SessionId;

    fn msg(turn: u64, role: Role, text: &str) -> StoredMessage {
        StoredMessage {
            id: format!("m{turn}{role:?}"),
            session_id: SessionId::parse("s").unwrap(),
            turn,
            role,
            text: text.into(),
            created_at: time::OffsetDateTime::UNIX_EPOCH,
            reply_to: None,
            finish_reason: None,
            usage: None,
            failure: None,
            starts: 0,
        }
    }

    #[test]
    fn context_starts_with_the_system_prompt_and_keeps_conversation_order() {
        let settings = ContextSettings { system_prompt: "sys".into(), token_budget: 1000, history_limit: 10 };
        let history = [msg(1, Role::User, "a"), msg(1, Role::Assistant, "b"), msg(2, Role::User, "c")];
        let out = build(&settings, &history);
        let texts: Vec<_> = out.iter().map(|m| m.content.as_str()).collect();
        assert_eq!(texts, ["sys", "a", "b", "c"]);
        assert_eq!(out[0].role, ChatRole::System);
        assert_eq!(out[3].role, ChatRole::User);
    }

    #[test]
    fn oldest_messages_are_dropped_first_when_over_budget() {
        let long = "x".repeat(400); // about 104 tokens each
        let settings = ContextSettings { system_prompt: String::new(), token_budget: 250, history_limit: 10 };
        let history = [msg(1, Role::User, &long), msg(1, Role::Assistant, &long), msg(2, Role::User, &long)];
        let out = build(&settings, &history);
        assert_eq!(out.len(), 2);
    }

    #[test]
    fn replies_without_text_are_left_out_and_partial_ones_kept() {
        let settings = ContextSettings { system_prompt: String::new(), token_budget: 1000, history_limit: 10 };
        let history = [
            msg(1, Role::User, "a"),
            msg(1, Role::Assistant, "half an ans"),
            msg(2, Role::User, "b"),
            msg(2, Role::Assistant, ""),
            msg(3, Role::User, "c"),
        ];

        let out = build(&settings, &history);

        let texts: Vec<_> = out.iter().map(|m| m.content.as_str()).collect();
        assert_eq!(texts, ["a", "half an ans", "b", "c"]);
    }

    #[test]
    fn the_message_being_answered_is_kept_even_over_budget() {
        let settings = ContextSettings { system_prompt: "s".into(), token_budget: 1, history_limit: 10 };
        let out = build(&settings, &[msg(1, Role::User, &"y".repeat(100))]);
        assert_eq!(out.last().unwrap().content.len(), 100);
    }
}
