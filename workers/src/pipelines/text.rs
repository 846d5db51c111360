//! The text pipeline: a prompt becomes a Markdown text, written by a language
//! model behind an OpenAI-compatible chat completions endpoint, or composed
//! locally by the offline provider.
//!
//! Settings (read by [`LlmProvider::from_env`]):
//!
//! | variable | meaning |
//! |---|---|
//! | `LLM_PROVIDER` | `openai` (any OpenAI-compatible endpoint: OpenAI, Ollama, vLLM, …), `deepseek`, or `offline` (the default) |
//! | `LLM_BASE_URL` | `openai`: the API root, default `https://api.openai.com/v1`; `deepseek`: default `https://api.deepseek.com` |
//! | `LLM_API_KEY` | `openai`: bearer token, optional (local servers need none) |
//! | `DEEPSEEK_API_KEY` | `deepseek`: bearer token, required (`LLM_API_KEY` is the fallback) |
//! | `LLM_MODEL` | `openai`: required; `deepseek`: default `deepseek-chat` |
//! | `LLM_TIMEOUT_SECONDS` | whole-request timeout, default 120 |
//! | `LLM_MAX_ATTEMPTS` | attempts per call including retries on 408/429/5xx, default 4 |

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::http::{self, RetryPolicy, Secret};
use crate::pipelines::JobInput;
use crate::{Error, Result};

/// Which prompt templates a job uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PromptKind {
    /// A piece to be typeset and read aloud (`reading` jobs).
    Reading,
    /// A text on its own (`text` jobs).
    Text,
}

impl PromptKind {
    pub fn for_job(job_type: queue::JobType) -> Self {
        match job_type {
            queue::JobType::Reading => PromptKind::Reading,
            _ => PromptKind::Text,
        }
    }

    fn templates(self) -> PromptTemplates {
        match self {
            PromptKind::Reading => PromptTemplates {
                system: include_str!("../../prompts/reading.system.md"),
                user: include_str!("../../prompts/reading.user.md"),
            },
            PromptKind::Text => PromptTemplates {
                system: include_str!("../../prompts/text.system.md"),
                user: include_str!("../../prompts/text.user.md"),
            },
        }
    }
}

struct PromptTemplates {
    system: &'static str,
    user: &'static str,
}

/// The offline provider's output, with `{title}`, `{prompt}`, `{terms}` and `{topic}`.
const OFFLINE_TEMPLATE: &str = include_str!("../../prompts/offline.md");

/// What to write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TextRequest {
    pub kind: PromptKind,
    pub prompt: String,
    pub title: Option<String>,
    /// The job's `lang` (an ISO 639 code, validated at creation): the
    /// language the text is asked for in. The PDF is hyphenated and the
    /// audio spoken in it, so a text in another would be set and read wrong.
    pub lang: Option<String>,
}

impl TextRequest {
    /// The request a `reading` or `text` job's input describes.
    pub fn from_input(kind: PromptKind, input: &JobInput) -> Result<Self> {
        let prompt = input.prompt().map(str::trim).unwrap_or_default();
        if prompt.is_empty() {
            return Err(Error::InvalidInput("`prompt` is missing or empty".into()));
        }
        Ok(TextRequest {
            kind,
            prompt: prompt.to_owned(),
            title: input
                .title()
                .map(str::trim)
                .filter(|t| !t.is_empty())
                .map(str::to_owned),
            lang: input.lang().map(str::to_owned),
        })
    }
}

/// Token counts a provider reports, recorded on the task.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenUsage {
    #[serde(default)]
    pub prompt_tokens: u64,
    #[serde(default)]
    pub completion_tokens: u64,
    #[serde(default)]
    pub total_tokens: u64,
}

/// The text pipeline's output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GeneratedText {
    #[serde(skip)]
    pub markdown: String,
    /// `openai`, `deepseek` or `offline`.
    pub provider: &'static str,
    pub model: Option<String>,
    /// `None` when the provider reports none (always, offline).
    pub usage: Option<TokenUsage>,
}

#[derive(Debug, Clone)]
pub enum LlmProvider {
    Chat(ChatClient),
    Offline,
}

impl LlmProvider {
    /// The provider the `LLM_*` variables describe (see the module docs).
    pub fn from_env() -> Result<Self> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// As [`from_env`](Self::from_env), reading variables through `get`.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let get = |name: &str| get(name).map(|v| v.trim().to_owned()).filter(|v| !v.is_empty());
        let provider = get("LLM_PROVIDER").unwrap_or_else(|| "offline".into());
        let (service, default_base, api_key, model) = match provider.as_str() {
            "offline" => return Ok(LlmProvider::Offline),
            "openai" => (
                "openai",
                "https://api.openai.com/v1",
                get("LLM_API_KEY"),
                get("LLM_MODEL")
                    .ok_or_else(|| Error::Config("LLM_PROVIDER=openai needs LLM_MODEL".into()))?,
            ),
            "deepseek" => (
                "deepseek",
                "https://api.deepseek.com",
                Some(
                    get("DEEPSEEK_API_KEY")
                        .or_else(|| get("LLM_API_KEY"))
                        .ok_or_else(|| {
                            Error::Config("LLM_PROVIDER=deepseek needs DEEPSEEK_API_KEY".into())
                        })?,
                ),
                get("LLM_MODEL").unwrap_or_else(|| "deepseek-chat".into()),
            ),
            other => {
                return Err(Error::Config(format!(
                    "LLM_PROVIDER={other:?} is not one of openai, deepseek, offline"
                )))
            }
        };
        let number = |name: &str, default: u64| -> Result<u64> {
            get(name).map_or(Ok(default), |v| {
                v.parse()
                    .map_err(|_| Error::Config(format!("{name}={v:?} is not a whole number")))
            })
        };
        let config = ChatConfig {
            service,
            base_url: get("LLM_BASE_URL").unwrap_or_else(|| default_base.into()),
            api_key: api_key.map(Secret::new),
            model,
            timeout: match number("LLM_TIMEOUT_SECONDS", 120)? {
                // Zero would time every request out at once.
                0 => return Err(Error::Config("LLM_TIMEOUT_SECONDS=0: must be at least 1".into())),
                seconds => Duration::from_secs(seconds),
            },
            retry: RetryPolicy {
                max_attempts: number("LLM_MAX_ATTEMPTS", 4)?.clamp(1, 20) as u32,
                ..RetryPolicy::default()
            },
        };
        Ok(LlmProvider::Chat(ChatClient::new(config)?))
    }

    pub fn name(&self) -> &'static str {
        match self {
            LlmProvider::Chat(client) => client.config.service,
            LlmProvider::Offline => "offline",
        }
    }

    /// Writes the text `request` asks for, as Markdown.
    pub async fn generate(&self, request: &TextRequest) -> Result<GeneratedText> {
        match self {
            LlmProvider::Chat(client) => {
                let templates = request.kind.templates();
                let title = request
                    .title
                    .as_deref()
                    .unwrap_or("none given; choose a fitting one");
                let language = match &request.lang {
                    Some(tag) => format!("the language whose ISO 639 code is `{tag}`; write all of it, title included, in that language"),
                    None => "English, unless the request asks for another".to_owned(),
                };
                let values = [
                    ("title", title),
                    ("prompt", request.prompt.as_str()),
                    ("language", language.as_str()),
                ];
                let system = fill_template(templates.system, &values);
                let user = fill_template(templates.user, &values);
                let (markdown, usage) = client.complete(&system, &user).await?;
                Ok(GeneratedText {
                    markdown,
                    provider: client.config.service,
                    model: Some(client.config.model.clone()),
                    usage,
                })
            }
            LlmProvider::Offline => Ok(GeneratedText {
                markdown: compose_offline(request),
                provider: "offline",
                model: None,
                usage: None,
            }),
        }
    }
}

/// Where and how to reach an OpenAI-compatible endpoint.
#[derive(Debug, Clone)]
pub struct ChatConfig {
    /// Names the provider in errors and on the task: `openai` or `deepseek`.
    pub service: &'static str,
    /// The API root; `/chat/completions` is appended.
    pub base_url: String,
    pub api_key: Option<Secret>,
    pub model: String,
    pub timeout: Duration,
    pub retry: RetryPolicy,
}

/// A client for `POST {base_url}/chat/completions`.
#[derive(Debug, Clone)]
pub struct ChatClient {
    config: ChatConfig,
    http: reqwest::Client,
}

#[derive(Deserialize)]
struct ChatResponse {
    choices: Vec<ChatChoice>,
    usage: Option<TokenUsage>,
}

#[derive(Deserialize)]
struct ChatChoice {
    message: ChatMessage,
    /// `stop` for a whole reply; `length` when the model's token limit cut
    /// it off; `content_filter` when the provider withheld some of it.
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct ChatMessage {
    content: Option<String>,
    /// Set, with no content, when the model declined (OpenAI's structured
    /// refusals): its reason, for the task's error.
    refusal: Option<String>,
}

impl ChatClient {
    pub fn new(config: ChatConfig) -> Result<Self> {
        let http = http::client(config.timeout)?;
        Ok(ChatClient { config, http })
    }

    /// A 404 from an API root without its version (`https://api.openai.com`
    /// for `https://api.openai.com/v1`) says only "not found": name the
    /// likely cause. The URL itself stays out of the message, as in every
    /// error (an endpoint id can be part of it).
    fn explain_not_found(&self, error: Error) -> Error {
        match error {
            Error::Remote {
                service,
                message,
                retryable,
                retry_after,
            } if message.starts_with("HTTP 404")
                && !self.config.base_url.trim_end_matches('/').ends_with("/v1") =>
            {
                Error::Remote {
                    service,
                    message: format!(
                        "{message}; LLM_BASE_URL does not end in /v1, where OpenAI-compatible APIs serve \
                         /chat/completions (https://api.openai.com/v1, http://localhost:11434/v1 for Ollama)"
                    ),
                    retryable,
                    retry_after,
                }
            }
            other => other,
        }
    }

    /// One chat completion: the assistant's reply and the reported usage.
    pub async fn complete(&self, system: &str, user: &str) -> Result<(String, Option<TokenUsage>)> {
        let service = self.config.service;
        let url = format!("{}/chat/completions", self.config.base_url.trim_end_matches('/'));
        let body = json!({
            "model": self.config.model,
            "messages": [
                {"role": "system", "content": system},
                {"role": "user", "content": user},
            ],
        });
        let response = http::send_with_retries(service, &self.config.retry, || {
            let request = self.http.post(&url).json(&body);
            match &self.config.api_key {
                Some(key) => request.bearer_auth(key.expose()),
                None => request,
            }
        })
        .await
        .map_err(|error| self.explain_not_found(error))?;
        let raw = http::read_body(service, "the response", response).await?;
        let parsed: ChatResponse = serde_json::from_slice(&raw).map_err(|e| {
            // What answered, for whoever reads the error: an HTML page
            // means LLM_BASE_URL points at a web app, not the API.
            let body = http::excerpt(&String::from_utf8_lossy(&raw));
            Error::malformed(service, format!("{e}; the body began: {body}"))
        })?;
        let choice = parsed
            .choices
            .into_iter()
            .next()
            .ok_or_else(|| Error::malformed(service, "no choices"))?;
        // A reply cut short would be typeset and read aloud as if whole; the
        // same request would be cut the same way again, so the job fails now.
        match choice.finish_reason.as_deref() {
            Some("length") => {
                return Err(Error::remote(
                    service,
                    "the reply was cut off at the model's token limit (finish_reason \"length\"): \
                     raise the server's limit for this model, or ask for a shorter text",
                    false,
                ))
            }
            Some("content_filter") => {
                return Err(Error::remote(
                    service,
                    "the provider's content filter withheld the reply (finish_reason \"content_filter\")",
                    false,
                ))
            }
            _ => {}
        }
        let ChatMessage { content, refusal } = choice.message;
        let content = content
            .map(|content| content.trim().to_owned())
            .filter(|content| !content.is_empty());
        let content = match (content, refusal) {
            (Some(content), _) => content,
            // Asked again, the model declines again: the job fails now.
            (None, Some(refusal)) => {
                return Err(Error::remote(
                    service,
                    format!("the model declined: {}", refusal.trim()),
                    false,
                ))
            }
            (None, None) => return Err(Error::malformed(service, "no message content in choices[0]")),
        };
        Ok((content, parsed.usage))
    }
}

/// Replaces each `{name}` in `template` with its value in one pass: text that
/// comes from a value is never scanned again, so a prompt containing
/// `{title}` stays as written. Unknown placeholders are left alone.
fn fill_template(template: &str, values: &[(&str, &str)]) -> String {
    let mut out = String::with_capacity(template.len() + values.iter().map(|(_, v)| v.len()).sum::<usize>());
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        let value = after.find('}').and_then(|close| {
            let name = &after[..close];
            values.iter().find(|(n, _)| *n == name).map(|(_, v)| (*v, close))
        });
        match value {
            Some((value, close)) => {
                out.push_str(value);
                rest = &after[close + 1..];
            }
            None => {
                out.push('{');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// The offline provider: the offline template filled from the request.
/// Deterministic, and its text says it was not written by a model.
fn compose_offline(request: &TextRequest) -> String {
    // One line, so nothing in the prompt can start a Markdown heading or list.
    let prompt = request.prompt.split_whitespace().collect::<Vec<_>>().join(" ");
    let title = request
        .title
        .clone()
        .unwrap_or_else(|| title_from_prompt(&prompt));
    let terms = key_terms(&prompt);
    let terms = if terms.is_empty() {
        "the subject itself".to_owned()
    } else {
        terms.join(", ")
    };
    let topic = format!("“{title}”");
    fill_template(
        OFFLINE_TEMPLATE,
        &[
            ("title", &title),
            ("prompt", &prompt),
            ("terms", &terms),
            ("topic", &topic),
        ],
    )
}

/// The prompt's first sentence, at most eight words, capitalised.
fn title_from_prompt(prompt: &str) -> String {
    let sentence = prompt.split(['.', '!', '?', '\n']).next().unwrap_or(prompt);
    let words: Vec<&str> = sentence.split_whitespace().take(8).collect();
    let title = words.join(" ");
    let title = title.trim_end_matches([',', ';', ':']);
    let mut chars = title.chars();
    match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect(),
        None => super::document::UNTITLED.to_owned(),
    }
}

/// Up to three distinct longer words of the prompt, longest first (ties in
/// order of appearance): a crude but stable stand-in for its key terms.
fn key_terms(prompt: &str) -> Vec<String> {
    let mut words: Vec<String> = Vec::new();
    for word in prompt.split(|c: char| !c.is_alphanumeric() && c != '-') {
        let word = word.trim_matches('-').to_lowercase();
        if word.chars().count() >= 5 && !words.contains(&word) {
            words.push(word);
        }
    }
    // A stable sort keeps first-appearance order among equal lengths.
    words.sort_by_key(|w| std::cmp::Reverse(w.chars().count()));
    words.truncate(3);
    words
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn provider(vars: &[(&str, &str)]) -> Result<LlmProvider> {
        let vars: HashMap<String, String> =
            vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        LlmProvider::from_lookup(|name| vars.get(name).cloned())
    }

    #[test]
    fn templates_fill_once_and_leave_unknown_braces() {
        let filled = fill_template(
            "T={title} P={prompt} {other} {",
            &[("title", "{prompt}"), ("prompt", "x")],
        );
        assert_eq!(filled, "T={prompt} P=x {other} {");
    }

    #[test]
    fn template_files_carry_their_placeholders() {
        for kind in [PromptKind::Reading, PromptKind::Text] {
            let templates = kind.templates();
            assert!(templates.user.contains("{prompt}") && templates.user.contains("{title}"));
            assert!(!templates.system.trim().is_empty());
        }
    }

    #[test]
    fn providers_from_variables() {
        assert_eq!(provider(&[]).unwrap().name(), "offline");

        let LlmProvider::Chat(deepseek) =
            provider(&[("LLM_PROVIDER", "deepseek"), ("DEEPSEEK_API_KEY", "k")]).unwrap()
        else {
            panic!("deepseek is a chat provider")
        };
        assert_eq!(deepseek.config.base_url, "https://api.deepseek.com");
        assert_eq!(deepseek.config.model, "deepseek-chat");
        assert!(
            !format!("{deepseek:?}").contains("\"k\""),
            "the key must not print"
        );

        assert!(matches!(
            provider(&[("LLM_PROVIDER", "deepseek")]),
            Err(Error::Config(_))
        ));
        assert!(matches!(
            provider(&[("LLM_PROVIDER", "openai")]),
            Err(Error::Config(_))
        ));
        assert!(matches!(
            provider(&[("LLM_PROVIDER", "gpt")]),
            Err(Error::Config(_))
        ));
        let ollama = provider(&[
            ("LLM_PROVIDER", "openai"),
            ("LLM_BASE_URL", "http://127.0.0.1:11434/v1"),
            ("LLM_MODEL", "llama3"),
            ("LLM_MAX_ATTEMPTS", "2"),
        ])
        .unwrap();
        let LlmProvider::Chat(ollama) = ollama else {
            panic!("openai is a chat provider")
        };
        assert!(ollama.config.api_key.is_none());
        assert_eq!(ollama.config.retry.max_attempts, 2);

        let Err(Error::Config(zero)) = provider(&[
            ("LLM_PROVIDER", "openai"),
            ("LLM_BASE_URL", "http://127.0.0.1:11434/v1"),
            ("LLM_MODEL", "llama3"),
            ("LLM_TIMEOUT_SECONDS", "0"),
        ]) else {
            panic!("a zero timeout is refused")
        };
        assert!(zero.contains("LLM_TIMEOUT_SECONDS=0"), "{zero}");
    }

    #[test]
    fn missing_prompt_is_permanent() {
        let pdf_input = JobInput::parse(queue::JobType::Pdf, &serde_json::json!({"text": "x"})).unwrap();
        let error = TextRequest::from_input(PromptKind::Text, &pdf_input).unwrap_err();
        assert!(!error.is_retryable());
    }

    #[test]
    fn titles_and_terms_from_the_prompt() {
        assert_eq!(
            title_from_prompt("the history of tea in china and japan over time. More."),
            "The history of tea in china and japan"
        );
        assert_eq!(
            key_terms("Tea, tea ceremonies and Japanese tea-houses"),
            ["ceremonies", "tea-houses", "japanese"]
        );
    }
}
