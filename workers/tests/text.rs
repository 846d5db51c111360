//! The text pipeline against a fake OpenAI-compatible server, and offline.

mod common;

use std::time::Duration;

use axum::http::StatusCode;
use axum::response::IntoResponse;
use common::{closed_port_url, json_response, silent_server_url, text_response, FakeServer};
use queue::{Failure, FailureKind};
use serde_json::json;
use workers::pipelines::document::{Block, Document};
use workers::pipelines::text::{ChatClient, ChatConfig, LlmProvider, PromptKind, TextRequest, TokenUsage};
use workers::{Error, RetryPolicy, Secret};

fn completion(content: &str) -> serde_json::Value {
    json!({
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 31, "completion_tokens": 12, "total_tokens": 43}
    })
}

fn provider(base_url: &str, max_attempts: u32) -> LlmProvider {
    let config = ChatConfig {
        service: "openai",
        base_url: format!("{base_url}/v1"),
        api_key: Some(Secret::new("test-key")),
        model: "test-model".into(),
        timeout: Duration::from_millis(800),
        retry: RetryPolicy {
            max_attempts,
            // Short enough that a test would notice a Retry-After being ignored.
            initial_backoff: Duration::from_millis(5),
            max_backoff: Duration::from_millis(20),
            max_retry_after: Duration::from_secs(5),
        },
    };
    LlmProvider::Chat(ChatClient::new(config).unwrap())
}

fn request(prompt: &str, title: Option<&str>) -> TextRequest {
    TextRequest {
        kind: PromptKind::Reading,
        prompt: prompt.into(),
        title: title.map(Into::into),
        lang: None,
    }
}

#[tokio::test]
async fn sends_model_messages_and_bearer_and_reads_usage() {
    let server =
        FakeServer::start(|_, _| json_response(StatusCode::OK, completion("# Tea\n\nA drink."))).await;
    let generated = provider(&server.base_url, 3)
        .generate(&request("Write about tea {title}", Some("Tea")))
        .await
        .unwrap();

    assert_eq!(generated.markdown, "# Tea\n\nA drink.");
    assert_eq!(generated.provider, "openai");
    assert_eq!(generated.model.as_deref(), Some("test-model"));
    assert_eq!(
        generated.usage,
        Some(TokenUsage {
            prompt_tokens: 31,
            completion_tokens: 12,
            total_tokens: 43
        })
    );

    let requests = server.requests();
    assert_eq!(requests.len(), 1);
    let sent = &requests[0];
    assert_eq!(sent.method, "POST");
    assert_eq!(sent.path, "/v1/chat/completions");
    assert_eq!(sent.authorization(), Some("Bearer test-key"));
    let body = sent.json();
    assert_eq!(body["model"], "test-model");
    let messages = body["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 2);
    assert_eq!(messages[0]["role"], "system");
    assert_eq!(messages[1]["role"], "user");
    let user = messages[1]["content"].as_str().unwrap();
    assert!(user.contains("Title: Tea"), "{user}");
    // The prompt is substituted once: its own `{title}` stays as written.
    assert!(user.contains("Write about tea {title}"), "{user}");
    assert!(messages[0]["content"].as_str().unwrap().contains("read aloud"));
    assert!(user.contains("Language: English"), "{user}");

    // The job's language is the text's: its PDF is hyphenated and its audio
    // spoken in it.
    let greek = TextRequest {
        lang: Some("el".into()),
        ..request("the life of tides", None)
    };
    provider(&server.base_url, 3).generate(&greek).await.unwrap();
    let body = server.requests()[1].json();
    let user = body["messages"][1]["content"].as_str().unwrap().to_owned();
    assert!(user.contains("ISO 639 code is `el`"), "{user}");
}

#[tokio::test]
async fn a_429_is_retried_after_the_pause_the_server_asks_for() {
    let server = FakeServer::start(|_, earlier| {
        if earlier.is_empty() {
            let mut busy = text_response(StatusCode::TOO_MANY_REQUESTS, "slow down").into_response();
            busy.headers_mut().insert("retry-after", "1".parse().unwrap());
            busy
        } else {
            json_response(StatusCode::OK, completion("after the wait"))
        }
    })
    .await;
    let generated = provider(&server.base_url, 3)
        .generate(&request("p", None))
        .await
        .unwrap();
    assert_eq!(generated.markdown, "after the wait");

    let requests = server.requests();
    assert_eq!(requests.len(), 2);
    let gap = requests[1].at - requests[0].at;
    assert!(
        gap >= Duration::from_millis(950),
        "retried after {gap:?}, not the 1 s asked for"
    );
}

#[tokio::test]
async fn a_reply_cut_off_or_filtered_fails_the_task_instead_of_passing_as_whole() {
    for (reason, said) in [("length", "token limit"), ("content_filter", "content filter")] {
        let server = FakeServer::start(move |_, _| {
            let mut cut = completion("Once upon a time, the lighthouse keeper");
            cut["choices"][0]["finish_reason"] = json!(reason);
            json_response(StatusCode::OK, cut)
        })
        .await;
        let error = provider(&server.base_url, 3)
            .generate(&request("p", None))
            .await
            .unwrap_err();
        assert_eq!(server.requests().len(), 1, "{reason}: not asked again");
        let failure = Failure::from(error);
        assert_eq!(failure.kind, FailureKind::Permanent, "{reason}");
        assert!(failure.message.contains(said), "{reason}: {}", failure.message);
    }
    // A refusal: no content, the model's reason in `refusal`.
    let server = FakeServer::start(|_, _| {
        let mut declined = completion("");
        declined["choices"][0]["message"] = json!({
            "role": "assistant", "content": null, "refusal": "I can't help with that request."
        });
        json_response(StatusCode::OK, declined)
    })
    .await;
    let error = provider(&server.base_url, 3)
        .generate(&request("p", None))
        .await
        .unwrap_err();
    let failure = Failure::from(error);
    assert_eq!(failure.kind, FailureKind::Permanent);
    assert!(
        failure
            .message
            .contains("declined: I can't help with that request."),
        "{}",
        failure.message
    );
    assert_eq!(server.requests().len(), 1, "not asked again");
    // A reply without a finish_reason (some servers leave it null) is whole.
    let server = FakeServer::start(|_, _| {
        let mut whole = completion("the end");
        whole["choices"][0]["finish_reason"] = json!(null);
        json_response(StatusCode::OK, whole)
    })
    .await;
    let generated = provider(&server.base_url, 3)
        .generate(&request("p", None))
        .await
        .unwrap();
    assert_eq!(generated.markdown, "the end");
}

#[tokio::test]
async fn a_429_asking_longer_than_a_worker_waits_goes_back_to_the_queue_with_that_wait() {
    let server = FakeServer::start(|_, _| {
        let mut busy = text_response(StatusCode::TOO_MANY_REQUESTS, "rate limited").into_response();
        busy.headers_mut().insert("retry-after", "120".parse().unwrap());
        busy
    })
    .await;
    let error = provider(&server.base_url, 3)
        .generate(&request("p", None))
        .await
        .unwrap_err();

    assert_eq!(server.requests().len(), 1, "not retried in place");
    let failure = Failure::from(error);
    assert_eq!(failure.kind, FailureKind::Retryable);
    assert_eq!(failure.retry_after, Some(Duration::from_secs(120)));
}

#[tokio::test]
async fn server_errors_until_attempts_run_out_are_retryable() {
    let server =
        FakeServer::start(|_, _| text_response(StatusCode::INTERNAL_SERVER_ERROR, "upstream exploded")).await;
    let error = provider(&server.base_url, 3)
        .generate(&request("p", None))
        .await
        .unwrap_err();

    assert_eq!(server.requests().len(), 3);
    assert!(error.is_retryable(), "{error}");
    let failure = Failure::from(error);
    assert_eq!(failure.kind, FailureKind::Retryable);
    assert!(failure.message.contains("500"), "{}", failure.message);
    assert!(
        failure.message.contains("upstream exploded"),
        "{}",
        failure.message
    );
    assert!(failure.message.contains("3 attempts"), "{}", failure.message);
}

#[tokio::test]
async fn a_malformed_response_is_permanent() {
    for body in [
        "this is not json",
        r#"{"choices": []}"#,
        r#"{"choices": [{"message": {"content": ""}}]}"#,
    ] {
        let server = FakeServer::start(move |_, _| text_response(StatusCode::OK, body)).await;
        let error = provider(&server.base_url, 3)
            .generate(&request("p", None))
            .await
            .unwrap_err();
        assert!(
            matches!(error, Error::MalformedResponse { .. }),
            "{body}: {error}"
        );
        assert_eq!(Failure::from(error).kind, FailureKind::Permanent);
        assert_eq!(
            server.requests().len(),
            1,
            "a malformed answer is not asked again"
        );
    }
    // A web page where the API should be says so in the error.
    let server =
        FakeServer::start(|_, _| text_response(StatusCode::OK, "<!doctype html><title>Open WebUI</title>"))
            .await;
    let error = provider(&server.base_url, 3)
        .generate(&request("p", None))
        .await
        .unwrap_err();
    assert!(
        error
            .to_string()
            .contains("the body began: <!doctype html><title>Open WebUI"),
        "{error}"
    );
}

#[tokio::test]
async fn a_400_is_permanent_and_not_retried() {
    let server = FakeServer::start(|_, _| {
        json_response(
            StatusCode::BAD_REQUEST,
            json!({"error": {"message": "model not found"}}),
        )
    })
    .await;
    let error = provider(&server.base_url, 3)
        .generate(&request("p", None))
        .await
        .unwrap_err();
    assert!(!error.is_retryable());
    assert!(error.to_string().contains("model not found"), "{error}");
    assert_eq!(server.requests().len(), 1);
}

#[tokio::test]
async fn a_404_from_a_base_url_without_v1_names_the_likely_cause() {
    // Serves /v1/chat/completions only, as OpenAI and Ollama do.
    let server = FakeServer::start(|request, _| {
        if request.path == "/v1/chat/completions" {
            json_response(StatusCode::OK, completion("# Found"))
        } else {
            json_response(StatusCode::NOT_FOUND, json!({"error": {"message": "Not Found"}}))
        }
    })
    .await;
    let without_v1 = |root: &str| {
        LlmProvider::Chat(
            ChatClient::new(ChatConfig {
                service: "openai",
                base_url: root.to_string(),
                api_key: None,
                model: "test-model".into(),
                timeout: Duration::from_secs(5),
                retry: RetryPolicy::default(),
            })
            .unwrap(),
        )
    };
    let error = without_v1(&server.base_url)
        .generate(&request("p", None))
        .await
        .unwrap_err();
    assert!(!error.is_retryable());
    let message = error.to_string();
    assert!(
        message.contains("HTTP 404") && message.contains("LLM_BASE_URL does not end in /v1"),
        "{message}"
    );
    assert!(!message.contains("127.0.0.1"), "the URL stays out: {message}");
    // With /v1, the same server answers.
    let found = without_v1(&format!("{}/v1/", server.base_url))
        .generate(&request("p", None))
        .await
        .unwrap();
    assert!(found.markdown.contains("Found"));
}

#[tokio::test]
async fn unreachable_and_slow_servers_are_retryable() {
    let error = provider(&closed_port_url().await, 2)
        .generate(&request("p", None))
        .await
        .unwrap_err();
    assert!(error.is_retryable(), "{error}");

    let error = provider(&silent_server_url().await, 1)
        .generate(&request("p", None))
        .await
        .unwrap_err();
    assert!(error.is_retryable(), "{error}");
    assert!(error.to_string().contains("timed out"), "{error}");
}

#[tokio::test]
async fn offline_text_is_structured_labelled_and_deterministic() {
    let offline = LlmProvider::Offline;
    let prompt = "Explain the history of tea ceremonies in Japan.\n# Injected heading\n- injected item";
    let first = offline.generate(&request(prompt, None)).await.unwrap();
    let second = offline.generate(&request(prompt, None)).await.unwrap();
    assert_eq!(first, second);
    assert_eq!(first.provider, "offline");
    assert_eq!(first.usage, None);
    assert!(first.markdown.contains("produced offline"));

    let document = Document::parse(&first.markdown, None);
    assert_eq!(document.title, "Explain the history of tea ceremonies in Japan");
    let headings: Vec<&str> = document
        .blocks
        .iter()
        .filter_map(|b| match b {
            Block::Heading { level: 2, text } => Some(text.as_str()),
            _ => None,
        })
        .collect();
    assert!(headings.len() >= 3, "{headings:?}");
    assert!(
        !headings.contains(&"Injected heading"),
        "the prompt cannot add structure"
    );
    let paragraphs = document
        .blocks
        .iter()
        .filter(|b| matches!(b, Block::Paragraph { .. }))
        .count();
    assert!(paragraphs >= headings.len());
    assert!(first.markdown.contains("ceremonies"));

    let titled = offline
        .generate(&request("anything", Some("My Title")))
        .await
        .unwrap();
    assert!(titled.markdown.starts_with("# My Title\n"));
}
