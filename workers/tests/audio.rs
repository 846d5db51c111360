//! The audio pipeline: real espeak-ng speech decoded by an independent MP3
//! decoder (symphonia), and the RunPod client against a fake of its API.

mod common;

use std::io::Cursor;
use std::process::Command;
use std::time::Duration;

use axum::http::{Method, StatusCode};
use base64::Engine;
use common::{json_response, FakeServer, Recorded};
use serde_json::json;
use symphonia::core::codecs::DecoderOptions;
use symphonia::core::formats::FormatOptions;
use symphonia::core::io::MediaSourceStream;
use symphonia::core::meta::MetadataOptions;
use symphonia::core::probe::Hint;
use workers::pipelines::audio::{
    Espeak, Narrator, Pcm, RunPodClient, RunPodConfig, TtsProvider, BLOCK_PAUSE, MP3_CONTENT_TYPE,
};
use workers::pipelines::document::Document;
use workers::{Error, RetryPolicy, Secret};

/// Decodes an MP3 completely and returns its duration in seconds.
fn decoded_mp3_seconds(mp3: &[u8]) -> f64 {
    let source = MediaSourceStream::new(Box::new(Cursor::new(mp3.to_vec())), Default::default());
    let mut hint = Hint::new();
    hint.with_extension("mp3");
    let options = FormatOptions {
        enable_gapless: true,
        ..Default::default()
    };
    let mut format = symphonia::default::get_probe()
        .format(&hint, source, &options, &MetadataOptions::default())
        .expect("an MP3 stream")
        .format;
    let track = format.default_track().expect("one audio track").clone();
    let sample_rate = track.codec_params.sample_rate.expect("a sample rate");
    let mut decoder = symphonia::default::get_codecs()
        .make(&track.codec_params, &DecoderOptions::default())
        .unwrap();
    let mut frames = 0u64;
    loop {
        match format.next_packet() {
            Ok(packet) => frames += decoder.decode(&packet).expect("a decodable frame").frames() as u64,
            Err(symphonia::core::errors::Error::IoError(e))
                if e.kind() == std::io::ErrorKind::UnexpectedEof =>
            {
                break
            }
            Err(e) => panic!("reading the MP3: {e}"),
        }
    }
    frames as f64 / f64::from(sample_rate)
}

fn espeak_narrator() -> Narrator {
    Narrator::new(TtsProvider::Espeak(Espeak::default()), 2)
}

#[tokio::test]
async fn espeak_speech_decodes_and_lasts_as_long_as_the_text() {
    let short = Document::parse("# Weather\n\nIt is sunny today. The wind is calm.", None);
    let paragraph = "The river runs through the old town, past the market and the mill. \
        In spring the water rises, and the children watch the boats go by from the bridge. ";
    let long_text: String = (1..=6)
        .map(|i| format!("## Part {i}\n\n{}\n\n", paragraph.repeat(2)))
        .collect();
    let long = Document::parse(&long_text, Some("The River"));

    let mut durations = Vec::new();
    for document in [&short, &long] {
        let narration = espeak_narrator().narrate(document, None).await.unwrap();
        assert_eq!(narration.content_type, MP3_CONTENT_TYPE);
        assert_eq!(narration.sample_rate, 22050, "espeak-ng speaks at 22.05 kHz");

        let decoded = decoded_mp3_seconds(&narration.bytes);
        assert!(
            (decoded - narration.duration_seconds).abs() < 0.2,
            "decoded {decoded:.2}s, reported {:.2}s",
            narration.duration_seconds
        );
        let words_per_minute = document.word_count() as f64 / (narration.duration_seconds / 60.0);
        assert!(
            (80.0..=300.0).contains(&words_per_minute),
            "{words_per_minute:.0} words a minute ({} words in {:.1}s)",
            document.word_count(),
            narration.duration_seconds
        );
        durations.push(narration.duration_seconds);
    }
    assert!(durations[1] > durations[0] * 5.0, "{durations:?}");
}

/// Wiki-style links are spoken as words: espeak-ng reads `[[...]]` as
/// phoneme codes, and the bracketed words went missing from the audio (a
/// third of the plain text's length).
#[tokio::test]
async fn words_in_double_brackets_are_spoken() {
    let narrate = async |text: &str| {
        let document = Document::parse(text, None);
        espeak_narrator()
            .narrate(&document, None)
            .await
            .unwrap()
            .duration_seconds
    };
    let bracketed = narrate("[[Main Page]], [[Main Page]] and [[Main Page]].").await;
    let plain = narrate("Main Page, Main Page and Main Page.").await;
    assert!(bracketed > plain * 0.8, "{bracketed:.2}s against {plain:.2}s");
}

#[tokio::test]
async fn espeak_voices_from_the_job() {
    let greek = Document::parse("Καλημέρα σας. Πώς είστε σήμερα;", Some("Ελληνικά"));
    let narration = espeak_narrator().narrate(&greek, Some("el")).await.unwrap();
    assert!(narration.duration_seconds > 1.0);

    let error = espeak_narrator()
        .narrate(&greek, Some("nosuchvoice"))
        .await
        .unwrap_err();
    assert!(!error.is_retryable(), "{error}");
    let error = espeak_narrator()
        .narrate(&greek, Some("--stdout"))
        .await
        .unwrap_err();
    assert!(matches!(error, Error::InvalidInput(_)), "{error}");
}

/// Real speech as a WAV file, as a RunPod handler would return it.
fn speech_wav(text: &str) -> Vec<u8> {
    let output = Command::new("espeak-ng")
        .args(["--stdout", text])
        .output()
        .expect("espeak-ng runs");
    assert!(output.status.success());
    output.stdout
}

fn runpod_client(server: &FakeServer, job_timeout: Duration) -> RunPodClient {
    let mut config = RunPodConfig::new("endpoint-1", Secret::new("rp-key"));
    config.base_url = format!("{}/v2", server.base_url);
    config.voice_sample_url = Some("https://example.test/voice.wav".into());
    config.job_timeout = job_timeout;
    config.first_poll = Duration::from_millis(10);
    config.max_poll = Duration::from_millis(40);
    config.retry = RetryPolicy {
        initial_backoff: Duration::from_millis(5),
        ..RetryPolicy::default()
    };
    RunPodClient::new(config).unwrap()
}

/// A fake RunPod endpoint: each job is queued on its first poll, in progress
/// on its second, and then finishes as `finish` says.
async fn fake_runpod(finish: impl Fn(&str) -> serde_json::Value + Send + Sync + 'static) -> FakeServer {
    FakeServer::start(move |request: &Recorded, earlier: &[Recorded]| {
        if request.authorization() != Some("Bearer rp-key") {
            return json_response(StatusCode::UNAUTHORIZED, json!({"error": "bad key"}));
        }
        let path = request.path.as_str();
        if request.method == Method::POST && path == "/v2/endpoint-1/run" {
            let submitted = earlier.iter().filter(|r| r.path == path).count();
            return json_response(
                StatusCode::OK,
                json!({"id": format!("job-{submitted}"), "status": "IN_QUEUE"}),
            );
        }
        if let Some(id) = path.strip_prefix("/v2/endpoint-1/status/") {
            let body = match earlier.iter().filter(|r| r.path == path).count() {
                0 => json!({"id": id, "status": "IN_QUEUE"}),
                1 => json!({"id": id, "status": "IN_PROGRESS"}),
                _ => finish(id),
            };
            return json_response(StatusCode::OK, body);
        }
        if path.starts_with("/v2/endpoint-1/cancel/") {
            return json_response(StatusCode::OK, json!({"status": "CANCELLED"}));
        }
        json_response(StatusCode::NOT_FOUND, json!({"error": "no such route"}))
    })
    .await
}

#[tokio::test]
async fn runpod_jobs_are_submitted_polled_and_joined() {
    let wav = speech_wav("hello");
    let chunk_seconds = Pcm::from_wav(&wav).unwrap().duration().as_secs_f64();
    let encoded = base64::engine::general_purpose::STANDARD.encode(&wav);
    let server =
        fake_runpod(move |id| json!({"id": id, "status": "COMPLETED", "output": {"audio_base64": encoded}}))
            .await;
    let narrator = Narrator::new(
        TtsProvider::RunPod(runpod_client(&server, Duration::from_secs(10))),
        2,
    );

    let document = Document::parse("# Greeting\n\nHello there, and welcome.", None);
    let narration = narrator.narrate(&document, Some("narrator-1")).await.unwrap();

    // Two chunks (the title, the paragraph), each the fake's WAV, a pause between.
    assert_eq!(narration.chunks, 2);
    let expected = 2.0 * chunk_seconds + BLOCK_PAUSE.as_secs_f64();
    assert!(
        (narration.duration_seconds - expected).abs() < 0.001,
        "{} vs {expected}",
        narration.duration_seconds
    );
    assert!((decoded_mp3_seconds(&narration.bytes) - expected).abs() < 0.2);

    let requests = server.requests();
    let runs: Vec<&Recorded> = requests.iter().filter(|r| r.path.ends_with("/run")).collect();
    assert_eq!(runs.len(), 2);
    let mut texts: Vec<String> = runs
        .iter()
        .map(|r| r.json()["input"]["text"].as_str().unwrap().to_owned())
        .collect();
    texts.sort();
    assert_eq!(texts, ["Greeting.", "Hello there, and welcome."]);
    let input = &runs[0].json()["input"];
    assert_eq!(input["voice"], "narrator-1");
    assert_eq!(input["voice_sample_url"], "https://example.test/voice.wav");
    let polls = requests.iter().filter(|r| r.path.contains("/status/")).count();
    assert_eq!(
        polls, 6,
        "each job polled through IN_QUEUE, IN_PROGRESS, COMPLETED"
    );
}

#[tokio::test]
async fn runpod_audio_can_come_from_a_url_fetched_without_the_key() {
    let wav = speech_wav("hi");
    let server = FakeServer::start(move |request: &Recorded, _: &[Recorded]| {
        let body = match request.path.as_str() {
            "/v2/endpoint-1/run" => json!({"id": "job-1", "status": "IN_PROGRESS"}),
            "/v2/endpoint-1/status/job-1" => json!({
                "status": "COMPLETED",
                "output": {"audio_url": format!("http://{}/files/job-1.wav", request.headers["host"].to_str().unwrap())}
            }),
            "/files/job-1.wav" => return axum::response::IntoResponse::into_response(wav.clone()),
            _ => return json_response(StatusCode::NOT_FOUND, json!({})),
        };
        json_response(StatusCode::OK, body)
    })
    .await;
    let pcm = runpod_client(&server, Duration::from_secs(10))
        .synthesize("hi", None)
        .await
        .unwrap();
    assert!(pcm.duration() > Duration::from_millis(200));

    let download = server
        .requests()
        .into_iter()
        .find(|r| r.path == "/files/job-1.wav")
        .expect("audio fetched");
    assert_eq!(
        download.authorization(),
        None,
        "the RunPod key must not go to the audio host"
    );
}

#[tokio::test]
async fn a_failed_runpod_job_is_permanent() {
    let server =
        fake_runpod(|id| json!({"id": id, "status": "FAILED", "error": "text too long for model"})).await;
    let error = runpod_client(&server, Duration::from_secs(10))
        .synthesize("x", None)
        .await
        .unwrap_err();
    assert!(!error.is_retryable(), "{error}");
    assert!(error.to_string().contains("text too long for model"), "{error}");
}

#[tokio::test]
async fn a_runpod_job_past_its_deadline_is_cancelled_and_retryable() {
    let server = fake_runpod(|id| json!({"id": id, "status": "IN_QUEUE"})).await;
    let error = runpod_client(&server, Duration::from_millis(300))
        .synthesize("x", None)
        .await
        .unwrap_err();
    assert!(error.is_retryable(), "{error}");
    assert!(
        server
            .requests()
            .iter()
            .any(|r| r.method == Method::POST && r.path == "/v2/endpoint-1/cancel/job-0"),
        "the abandoned job is cancelled"
    );
}

#[tokio::test]
async fn a_runpod_job_no_longer_waited_for_is_cancelled() {
    let server = fake_runpod(|id| json!({"id": id, "status": "IN_PROGRESS"})).await;
    let client = runpod_client(&server, Duration::from_secs(600));
    // The task's timeout, a lost lease or another chunk's failure drops the
    // wait long before the job's own deadline.
    let waited = tokio::time::timeout(Duration::from_millis(300), client.synthesize("x", None)).await;
    assert!(waited.is_err(), "still running");
    let cancelled = |server: &FakeServer| {
        server
            .requests()
            .iter()
            .any(|r| r.method == Method::POST && r.path == "/v2/endpoint-1/cancel/job-0")
    };
    // Sent from a task of its own, after the drop.
    for _ in 0..250 {
        if cancelled(&server) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(cancelled(&server), "the job left running is cancelled");

    // A job that ended (here, failed) is not cancelled.
    let server = fake_runpod(|id| json!({"id": id, "status": "FAILED", "error": "bad voice"})).await;
    runpod_client(&server, Duration::from_secs(600))
        .synthesize("x", None)
        .await
        .unwrap_err();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!cancelled(&server), "an ended job is left alone");
}

#[tokio::test]
async fn runpod_output_without_audio_is_malformed() {
    let server =
        fake_runpod(|id| json!({"id": id, "status": "COMPLETED", "output": {"note": "no audio"}})).await;
    let error = runpod_client(&server, Duration::from_secs(10))
        .synthesize("x", None)
        .await
        .unwrap_err();
    assert!(matches!(error, Error::MalformedResponse { .. }), "{error}");
}

/// A job that names no voice is read in its language's voice, where
/// espeak-ng has one: a Greek text in the English voice came out as the
/// names of its letters.
#[tokio::test]
async fn the_jobs_language_picks_the_voice_when_it_names_none() {
    let narrator = espeak_narrator();
    assert_eq!(narrator.voice_for(None, Some("el")).await.as_deref(), Some("el"));
    assert_eq!(
        narrator.voice_for(None, Some("en-GB")).await.as_deref(),
        Some("en-gb")
    );
    assert_eq!(
        narrator.voice_for(None, Some("pt_BR")).await.as_deref(),
        Some("pt-br")
    );
    assert_eq!(
        narrator.voice_for(None, Some("xx")).await,
        None,
        "no such voice: the default"
    );
    assert_eq!(
        narrator.voice_for(Some("de"), Some("el")).await.as_deref(),
        Some("de"),
        "a named voice wins"
    );
    assert_eq!(narrator.voice_for(None, None).await, None);

    // Read in Greek, the text is about as long as in its own voice, not the
    // three times an English voice spelling it out takes.
    let greek = Document::parse("Καλημέρα σας. Ο καιρός είναι καλός σήμερα.", Some("Καιρός"));
    let voice = narrator.voice_for(None, Some("el")).await;
    let in_greek = narrator.narrate(&greek, voice.as_deref()).await.unwrap();
    let in_english = narrator.narrate(&greek, None).await.unwrap();
    assert!(
        in_english.duration_seconds > in_greek.duration_seconds * 1.5,
        "Greek voice {:.1} s, English voice {:.1} s",
        in_greek.duration_seconds,
        in_english.duration_seconds
    );
}
