//! The reply generator shared by `chatfleet mock-llm` and the built-in stand-in model, and the
//! fault directives that let tests make either of them fail on purpose.
//!
//! A reply opens with an echo of the start of the last user message, so a test that sends many
//! conversations at once can prove that each one got its own reply, and continues with filler
//! words up to a configured length. Everything here is deterministic: the same text and settings
//! always give the same tokens.
//!
//! # Fault directives
//!
//! A last user message may carry directives of the form `[mock:<kind>=<value>,times=<n>]`:
//!
//! * `[mock:status=<code>,times=<n>]` — the request fails with HTTP `<code>` and an
//!   OpenAI-shaped error body. For 429 and 503 the mock server also sends
//!   `retry-after-ms: 50` and `Retry-After: 1`; an extra `retry_after_ms=<ms>` key changes the
//!   milliseconds (`Retry-After` is that value rounded up to whole seconds).
//! * `[mock:cut=<k>,times=<n>]` — the reply streams `<k>` tokens and then the connection is
//!   dropped, with no finish chunk and no `[DONE]`.
//! * `[mock:stall=<ms>,times=<n>]` — the first token comes `<ms>` milliseconds later than usual.
//! * `[mock:reply=markdown,times=<n>]` — the reply is [`MARKDOWN_SAMPLE`] instead of the echo
//!   and filler (for the web page's rendering tests), streamed a word at a time as usual.
//!
//! `times` is optional and defaults to 1. A directive applies to the first `n` requests whose
//! last user message is exactly the same text; the count is kept per text in a [`FaultBook`]
//! owned by the server or the stand-in. Several directives may share one message (a stall and a
//! cut, say); each counts against its own `times`. If a status fault applies, it wins. Malformed
//! directives are ignored as plain text. Directive text stays part of the message, and so of the
//! echo.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use schemas::{FinishReason, Usage};

/// How the mock server and the stand-in reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MockSettings {
    /// Time from the request to the first token.
    pub first_token_delay: Duration,
    /// Time between one token and the next.
    pub token_delay: Duration,
    /// Least number of tokens in a reply (the echo alone may make it longer).
    pub reply_tokens: usize,
    /// How many characters of the user's message the reply echoes.
    pub echo_chars: usize,
}

impl Default for MockSettings {
    fn default() -> Self {
        Self {
            first_token_delay: Duration::from_millis(200),
            token_delay: Duration::from_millis(20),
            reply_tokens: 32,
            echo_chars: 48,
        }
    }
}

/// The reply `[mock:reply=markdown]` asks for: Markdown with a list, a code block, links (one
/// of them to a `javascript:` URL) and raw HTML, which a client must show as text.
pub const MARKDOWN_SAMPLE: &str =
    "Here is **a list**, some `inline <b>code</b>` and a [link](https://example.com/docs):

- first item
- second item with *emphasis*

1. one
2. two

```rust
fn main() { println!(\"<script>alert(1)</script>\"); }
```

> A quote with [a bad link](javascript:alert(1)) and <img src=x onerror=alert(2)>.";

/// Words that pad a reply after the echo, cycled in order.
const FILLER: &str = "This is a stand-in reply, streamed one word at a time so the whole fleet can \
                      be exercised without a real model behind it.";

/// The tokens of the reply to `last_user_text`, in order. Concatenated, they form the reply.
///
/// The reply begins `You said: "<echo>". ` where `<echo>` is the first `echo_chars` characters
/// of the text with its whitespace collapsed to single spaces. Every token is a word carrying
/// its trailing space, except the last, which has none.
pub fn reply_tokens(last_user_text: &str, settings: &MockSettings) -> Vec<String> {
    let collapsed = last_user_text.split_whitespace().collect::<Vec<_>>().join(" ");
    let echoed: String = collapsed.chars().take(settings.echo_chars).collect();
    let echo = format!("You said: \"{}\". ", echoed.trim_end());

    let mut tokens: Vec<String> = echo.split_inclusive(' ').map(str::to_owned).collect();
    let mut filler = FILLER.split_whitespace().cycle();
    while tokens.len() < settings.reply_tokens {
        // The cycle never ends, so there is always a next word.
        let word = filler.next().unwrap_or("more");
        tokens.push(format!("{word} "));
    }
    if let Some(last) = tokens.last_mut() {
        let trimmed_len = last.trim_end().len();
        last.truncate(trimmed_len);
    }
    tokens
}

/// A rough token count for a piece of text: one token per four characters, rounded up.
///
/// The mock server and the stand-in report usage with it, so both report the same numbers.
pub fn estimate_tokens(text: &str) -> u32 {
    let chars = u32::try_from(text.chars().count()).unwrap_or(u32::MAX);
    chars.div_ceil(4)
}

/// A rough prompt size: [`estimate_tokens`] of each message plus four tokens of framing each,
/// about what OpenAI's chat format adds.
pub fn estimate_prompt_tokens<'a>(message_texts: impl IntoIterator<Item = &'a str>) -> u32 {
    message_texts.into_iter().map(|text| estimate_tokens(text).saturating_add(4)).fold(0u32, u32::saturating_add)
}

/// One parsed `[mock:...]` directive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultDirective {
    /// Fail with this HTTP status.
    Status { status: u16, retry_after: Duration, times: u32 },
    /// Stream this many tokens, then drop the connection.
    Cut { after_tokens: usize, times: u32 },
    /// Delay the first token by this much more.
    Stall { delay: Duration, times: u32 },
    /// Reply with [`MARKDOWN_SAMPLE`].
    Markdown { times: u32 },
}

impl FaultDirective {
    fn times(&self) -> u32 {
        match *self {
            Self::Status { times, .. }
            | Self::Cut { times, .. }
            | Self::Stall { times, .. }
            | Self::Markdown { times } => times,
        }
    }
}

/// What a 429 or 503 tells the client to wait when the directive does not say.
pub const DEFAULT_RETRY_AFTER: Duration = Duration::from_millis(50);

/// Every well-formed fault directive in `text`, in order of appearance.
pub fn parse_directives(text: &str) -> Vec<FaultDirective> {
    const OPEN: &str = "[mock:";
    let mut found = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find(OPEN) {
        let body_and_more = &rest[start + OPEN.len()..];
        let Some(end) = body_and_more.find(']') else {
            break;
        };
        if let Some(directive) = parse_directive_body(&body_and_more[..end]) {
            found.push(directive);
        }
        rest = &body_and_more[end + 1..];
    }
    found
}

/// Parses the `key=value,...` inside one `[mock:...]`; `None` if it is not a valid directive.
fn parse_directive_body(body: &str) -> Option<FaultDirective> {
    let mut status = None;
    let mut cut = None;
    let mut stall = None;
    let mut markdown = false;
    let mut times = 1u32;
    let mut retry_after_ms = None;
    for pair in body.split(',') {
        let (key, value) = pair.split_once('=')?;
        let value = value.trim();
        match key.trim() {
            "status" => status = Some(value.parse::<u16>().ok().filter(|s| (100..600).contains(s))?),
            "cut" => cut = Some(value.parse::<usize>().ok()?),
            "stall" => stall = Some(value.parse::<u64>().ok()?),
            "reply" if value == "markdown" => markdown = true,
            "times" => times = value.parse::<u32>().ok()?,
            "retry_after_ms" => retry_after_ms = Some(value.parse::<u64>().ok()?),
            _ => return None,
        }
    }
    if markdown {
        return (status.is_none() && cut.is_none() && stall.is_none() && retry_after_ms.is_none())
            .then_some(FaultDirective::Markdown { times });
    }
    match (status, cut, stall) {
        (Some(status), None, None) => Some(FaultDirective::Status {
            status,
            retry_after: retry_after_ms.map_or(DEFAULT_RETRY_AFTER, Duration::from_millis),
            times,
        }),
        (None, Some(after_tokens), None) if retry_after_ms.is_none() => {
            Some(FaultDirective::Cut { after_tokens, times })
        }
        (None, None, Some(ms)) if retry_after_ms.is_none() => {
            Some(FaultDirective::Stall { delay: Duration::from_millis(ms), times })
        }
        _ => None,
    }
}

/// An HTTP failure a request must end in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusFault {
    pub status: u16,
    /// What to put in the response's retry headers (used for 429 and 503 only).
    pub retry_after: Duration,
}

/// The faults that apply to one request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Faults {
    /// Fail the request outright with this status.
    pub status: Option<StatusFault>,
    /// Drop the connection after this many tokens.
    pub cut_after: Option<usize>,
    /// Extra delay before the first token.
    pub stall: Option<Duration>,
    /// Reply with [`MARKDOWN_SAMPLE`].
    pub markdown: bool,
}

/// Counts, per exact last-user-message text, how many requests have carried it, so that a
/// directive's `times` can be honoured. Texts without directives are never recorded, so ordinary
/// traffic does not grow the book.
#[derive(Debug, Default)]
pub struct FaultBook {
    seen: Mutex<HashMap<String, u32>>,
}

impl FaultBook {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records one request with this last user message and returns the faults it must suffer.
    pub fn record(&self, last_user_text: &str) -> Faults {
        let directives = parse_directives(last_user_text);
        if directives.is_empty() {
            return Faults::default();
        }
        let earlier = {
            // A poisoned lock only means another request panicked mid-count; the count is
            // still usable.
            let mut seen = self.seen.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            let count = seen.entry(last_user_text.to_owned()).or_insert(0);
            let earlier = *count;
            *count = count.saturating_add(1);
            earlier
        };

        let mut faults = Faults::default();
        for directive in directives.into_iter().filter(|d| earlier < d.times()) {
            match directive {
                FaultDirective::Status { status, retry_after, .. } => {
                    faults.status.get_or_insert(StatusFault { status, retry_after });
                }
                FaultDirective::Cut { after_tokens, .. } => {
                    faults.cut_after.get_or_insert(after_tokens);
                }
                FaultDirective::Stall { delay, .. } => {
                    faults.stall.get_or_insert(delay);
                }
                FaultDirective::Markdown { .. } => faults.markdown = true,
            }
        }
        faults
    }
}

/// Everything about one reply that does not depend on how it is delivered: the mock server
/// turns it into SSE, the stand-in into [`crate::ChatChunk`]s, and both keep the same timing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplyPlan {
    /// The tokens to send, already cut to the request's token limit.
    pub tokens: Vec<String>,
    /// `Stop`, or `Length` when the token limit cut the reply short.
    pub finish_reason: FinishReason,
    pub usage: Usage,
    /// Wait before the first token, stall included.
    pub first_token_delay: Duration,
    /// Wait between tokens.
    pub token_delay: Duration,
    /// Drop the connection after this many tokens instead of finishing.
    pub cut_after: Option<usize>,
}

impl ReplyPlan {
    /// Plans the reply to `last_user_text`, given the prompt's size, the request's token limit
    /// (if any) and the faults that apply.
    pub fn new(
        last_user_text: &str,
        prompt_tokens: u32,
        max_tokens: Option<u32>,
        faults: &Faults,
        settings: &MockSettings,
    ) -> Self {
        let mut tokens = if faults.markdown {
            MARKDOWN_SAMPLE.split_inclusive([' ', '\n']).map(str::to_owned).collect()
        } else {
            reply_tokens(last_user_text, settings)
        };
        let mut finish_reason = FinishReason::Stop;
        if let Some(limit) = max_tokens.map(|m| usize::try_from(m).unwrap_or(usize::MAX))
            && tokens.len() > limit
        {
            tokens.truncate(limit);
            finish_reason = FinishReason::Length;
        }
        let completion_tokens = u32::try_from(tokens.len()).unwrap_or(u32::MAX);
        Self {
            tokens,
            finish_reason,
            usage: Usage { prompt_tokens, completion_tokens },
            first_token_delay: settings.first_token_delay + faults.stall.unwrap_or_default(),
            token_delay: settings.token_delay,
            cut_after: faults.cut_after,
        }
    }

    /// How long the whole reply takes to generate, for replies that are not streamed.
    pub fn total_delay(&self) -> Duration {
        let gaps = u32::try_from(self.tokens.len().saturating_sub(1)).unwrap_or(u32::MAX);
        self.first_token_delay + self.token_delay.saturating_mul(gaps)
    }

    /// The full text of the reply.
    pub fn text(&self) -> String {
        self.tokens.concat()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(reply_tokens: usize, echo_chars: usize) -> MockSettings {
        MockSettings { reply_tokens, echo_chars, ..MockSettings::default() }
    }

    #[test]
    fn a_reply_begins_with_the_collapsed_start_of_the_user_message() {
        let text = "  hello\n\tthere   fleet, how are you today? ";

        let reply = reply_tokens(text, &settings(32, 20)).concat();

        assert!(reply.starts_with("You said: \"hello there fleet, h\". "), "{reply}");
    }

    #[test]
    fn a_reply_is_padded_to_the_configured_length_and_ends_without_a_space() {
        let tokens = reply_tokens("hi", &settings(32, 48));

        assert_eq!(tokens.len(), 32);
        assert!(tokens[..31].iter().all(|t| t.ends_with(' ') && !t.trim().is_empty()));
        assert!(!tokens[31].ends_with(' '));
    }

    #[test]
    fn a_long_echo_is_never_cut_to_fit_the_reply_length() {
        let text = "one two three four five six seven eight nine ten";

        let reply = reply_tokens(text, &settings(3, 100)).concat();

        assert_eq!(reply, format!("You said: \"{text}\"."));
    }

    #[test]
    fn the_same_text_always_gives_the_same_tokens() {
        let first = reply_tokens("same words", &MockSettings::default());

        let second = reply_tokens("same words", &MockSettings::default());

        assert_eq!(first, second);
    }

    #[test]
    fn an_empty_message_still_gets_a_reply() {
        let tokens = reply_tokens("", &settings(4, 48));

        assert_eq!(tokens.concat(), "You said: \"\". This");
    }

    #[test]
    fn token_estimates_round_up_per_four_characters() {
        assert_eq!(estimate_tokens(""), 0);
        assert_eq!(estimate_tokens("abcd"), 1);
        assert_eq!(estimate_tokens("abcde"), 2);
        assert_eq!(estimate_prompt_tokens(["abcd", "abcde"]), 11);
    }

    #[test]
    fn directives_are_parsed_with_times_defaulting_to_one() {
        let text = "x [mock:status=429,times=2,retry_after_ms=7] y [mock:cut=3] [mock:stall=40,times=5]";

        let directives = parse_directives(text);

        assert_eq!(
            directives,
            vec![
                FaultDirective::Status { status: 429, retry_after: Duration::from_millis(7), times: 2 },
                FaultDirective::Cut { after_tokens: 3, times: 1 },
                FaultDirective::Stall { delay: Duration::from_millis(40), times: 5 },
            ]
        );
    }

    #[test]
    fn malformed_directives_are_ignored() {
        let text = "[mock:status=abc] [mock:cut=2,stall=3] [mock:teapot=1] [mock:status=99] [mock:cut=1";

        assert!(parse_directives(text).is_empty());
    }

    #[test]
    fn the_fault_book_applies_a_directive_only_to_the_first_n_requests_with_that_text() {
        let book = FaultBook::new();
        let text = "please fail [mock:status=503,times=2]";

        let outcomes: Vec<Option<u16>> = (0..3).map(|_| book.record(text).status.map(|s| s.status)).collect();

        assert_eq!(outcomes, vec![Some(503), Some(503), None]);
        assert_eq!(book.record("another text").status, None);
    }

    #[test]
    fn the_fault_book_counts_each_text_separately() {
        let book = FaultBook::new();

        let first = book.record("a [mock:cut=1]");
        let other = book.record("b [mock:cut=1]");
        let first_again = book.record("a [mock:cut=1]");

        assert_eq!(first.cut_after, Some(1));
        assert_eq!(other.cut_after, Some(1));
        assert_eq!(first_again.cut_after, None);
    }

    #[test]
    fn a_plan_honours_the_token_limit_and_the_stall() {
        let faults = Faults { stall: Some(Duration::from_millis(30)), ..Faults::default() };
        let settings = MockSettings {
            first_token_delay: Duration::from_millis(5),
            token_delay: Duration::from_millis(2),
            ..settings(32, 48)
        };

        let plan = ReplyPlan::new("hi", 9, Some(4), &faults, &settings);

        assert_eq!(plan.tokens.len(), 4);
        assert_eq!(plan.finish_reason, FinishReason::Length);
        assert_eq!(plan.usage, Usage { prompt_tokens: 9, completion_tokens: 4 });
        assert_eq!(plan.first_token_delay, Duration::from_millis(35));
        assert_eq!(plan.total_delay(), Duration::from_millis(41));
    }

    #[test]
    fn a_markdown_directive_makes_the_reply_the_markdown_sample_word_by_word() {
        let text = "[mock:reply=markdown] show me";
        let faults = FaultBook::new().record(text);

        let plan = ReplyPlan::new(text, 9, None, &faults, &settings(32, 48));

        assert_eq!(plan.text(), MARKDOWN_SAMPLE);
        assert!(plan.tokens.len() > 20, "streamed a word at a time: {:?}", plan.tokens);
        assert_eq!(parse_directives("[mock:reply=markdown,cut=3] [mock:reply=html]"), []);
    }
}
