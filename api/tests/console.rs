//! The web console at `/ui`: its headers, and a real headless Chromium
//! driving it against the real API (sign in, submit a job, watch it
//! complete, open its artifacts). Screenshots go to
//! `<target>/ui-screenshots/` for review.

mod common;
#[path = "console/webdriver.rs"]
mod webdriver;

use std::path::PathBuf;
use std::time::Duration;

use api::depth_history::HistorySettings;
use api::state::Settings;
use api::streams::StreamLimits;
use common::{test_settings, TestServer};
use queue::{ApiKeyRole, ArtifactKind, Failure, JobStatus, NewArtifact, PoolStatus, Task, TaskType};
use reqwest::header::{
    CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE, ETAG, IF_NONE_MATCH, LOCATION,
    X_CONTENT_TYPE_OPTIONS,
};
use serde_json::json;
use webdriver::Browser;

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn the_console_is_served_without_a_key_under_a_strict_content_security_policy(pool: sqlx::PgPool) {
    let server = TestServer::start(pool).await;
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();

    let bare = client.get(server.url("/ui")).send().await.unwrap();
    assert_eq!(bare.status(), 308);
    assert_eq!(bare.headers()[LOCATION], "/ui/");

    for (path, content_type) in [
        ("/ui/", "text/html; charset=utf-8"),
        ("/ui/app.js", "text/javascript; charset=utf-8"),
        ("/ui/style.css", "text/css; charset=utf-8"),
        ("/ui/favicon.svg", "image/svg+xml"),
    ] {
        let response = client.get(server.url(path)).send().await.unwrap();
        assert_eq!(response.status(), 200, "{path} needs no key");
        let headers = response.headers().clone();
        assert_eq!(headers[CONTENT_TYPE], content_type, "{path}");
        assert_eq!(headers[X_CONTENT_TYPE_OPTIONS], "nosniff", "{path}");
        assert_eq!(headers["referrer-policy"], "no-referrer", "{path}");
        assert_eq!(headers["x-frame-options"], "DENY", "{path}");
        assert_eq!(headers[CACHE_CONTROL], "no-cache", "{path}");
        assert!(headers.get("set-cookie").is_none(), "{path} sets no cookie");
        let csp = headers[CONTENT_SECURITY_POLICY].to_str().unwrap();
        for directive in [
            "default-src 'none'",
            "script-src 'self'",
            "style-src 'self'",
            "connect-src 'self'",
            "frame-ancestors 'none'",
        ] {
            assert!(csp.contains(directive), "{path}: {directive} missing from {csp}");
        }
        assert!(!csp.contains("unsafe"), "{path}: {csp}");

        // Unchanged since the browser's copy: 304, no body.
        let etag = headers[ETAG].clone();
        let again = client
            .get(server.url(path))
            .header(IF_NONE_MATCH, etag)
            .send()
            .await
            .unwrap();
        assert_eq!(again.status(), 304, "{path}");
        assert_eq!(again.headers()[CONTENT_SECURITY_POLICY], csp);
        assert!(again.bytes().await.unwrap().is_empty());
        let stale = client
            .get(server.url(path))
            .header(IF_NONE_MATCH, "\"something-else\"")
            .send()
            .await
            .unwrap();
        assert_eq!(stale.status(), 200, "{path}");
    }

    // The page loads its script from a file: nothing inline for the CSP to
    // have to allow.
    let html = client
        .get(server.url("/ui/"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(html.contains(r#"<script src="/ui/app.js" defer></script>"#));
    assert_eq!(html.matches("<script").count(), 1, "{html}");
    assert!(!html.contains("style="), "no inline styles: {html}");

    // The redirect and the refusals carry the same headers as the files.
    let unknown = client.get(server.url("/ui/secrets.txt")).send().await.unwrap();
    assert_eq!(unknown.status(), 404);
    let post = client.post(server.url("/ui/")).send().await.unwrap();
    assert_eq!(post.status(), 405);
    for (response, what) in [(&bare, "the redirect"), (&unknown, "a 404"), (&post, "a 405")] {
        let headers = response.headers();
        assert_eq!(
            headers.get(CONTENT_SECURITY_POLICY).map(|v| v.to_str().unwrap()),
            Some(api::ui::CONTENT_SECURITY_POLICY),
            "{what}"
        );
        assert_eq!(headers[X_CONTENT_TYPE_OPTIONS], "nosniff", "{what}");
        assert_eq!(headers["x-frame-options"], "DENY", "{what}");
    }
    server.stop().await;
}

/// Where the screenshots go: `<target>/ui-screenshots`, beside the test
/// executable's `<target>/<profile>/deps`.
fn screenshot_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let target = exe.ancestors().nth(3).expect("<target>/<profile>/deps/<test>");
    let dir = target.join("ui-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Instruments the page's `fetch` (once per page load): every call is
/// recorded as "METHOD path?query"; a call matches "METHOD path" with any
/// query or none, and "METHOD path*" when it starts with "METHOD path". The next call matching a hold is held
/// until the test releases it. A hold of the `request` is released by
/// sending it ("send") or failing it as a network error would ("fail"); a
/// hold of the `answer` sends the request at once and keeps its answer
/// (state "arrived") until released, then delivers it ("deliver", state
/// "consumed" once the page has read its body) or loses it ("fail").
const FETCH_PROBE: &str = r#"
if (!window.probe) {
  const fetchBefore = window.fetch;
  const probe = { calls: [], holds: {} };
  probe.matches = (call, wanted) => wanted.endsWith("*")
    ? call.startsWith(wanted.slice(0, -1))
    : call === wanted || call.startsWith(wanted + "?");
  probe.count = (wanted) => probe.calls.filter((call) => probe.matches(call, wanted)).length;
  window.probe = probe;
  window.fetch = async function (input, init) {
    const method = (init && init.method) || "GET";
    const call = `${method} ${String(input)}`;
    probe.calls.push(call);
    const hold = Object.values(probe.holds).find((h) => h.state === "waiting" && probe.matches(call, h.call));
    if (!hold) return fetchBefore.apply(this, arguments);
    const released = new Promise((resolve) => { hold.release = resolve; });
    hold.state = "caught";
    if (hold.what === "request") {
      if ((await released) === "fail") throw new TypeError("Failed to fetch");
      return fetchBefore.apply(this, arguments);
    }
    const response = await fetchBefore.apply(this, arguments);
    const body = await response.text();
    hold.state = "arrived";
    if ((await released) === "fail") throw new TypeError("Failed to fetch");
    const copy = new Response(body, { status: response.status, headers: response.headers });
    const json = copy.json.bind(copy);
    copy.json = () => json().then((value) => { hold.state = "consumed"; return value; });
    return copy;
  };
}
"#;

/// The page's fetch calls, watched and held through [`FETCH_PROBE`].
struct Probe<'a>(&'a Browser);

impl<'a> Probe<'a> {
    async fn install(browser: &'a Browser) -> Probe<'a> {
        browser.eval(FETCH_PROBE, json!([])).await;
        Probe(browser)
    }

    /// How many calls so far match `call` ("GET /v1/jobs/<id>").
    async fn count(&self, call: &str) -> u64 {
        let count = self
            .0
            .eval("return window.probe.count(arguments[0])", json!([call]))
            .await;
        count.as_u64().unwrap()
    }

    /// Wait until `n` more calls matching `call` have been made.
    async fn wait_for_calls(&self, n: u64, call: &str) {
        let target = self.count(call).await + n;
        self.0
            .wait_for(
                &format!("{n} more calls of {call}"),
                "return window.probe.count(arguments[0]) >= arguments[1]",
                json!([call, target]),
            )
            .await;
    }

    /// Hold the next call matching `call`: its `what` ("request" or
    /// "answer"), under `name`.
    async fn hold(&self, name: &str, call: &str, what: &str) {
        self.0
            .eval(
                "window.probe.holds[arguments[0]] = { call: arguments[1], what: arguments[2], state: 'waiting' }",
                json!([name, call, what]),
            )
            .await;
    }

    async fn wait_until(&self, name: &str, state: &str) {
        self.0
            .wait_for(
                &format!("hold {name} {state}"),
                "return window.probe.holds[arguments[0]].state === arguments[1]",
                json!([name, state]),
            )
            .await;
    }

    async fn release(&self, name: &str, outcome: &str) {
        self.0
            .eval(
                "window.probe.holds[arguments[0]].release(arguments[1])",
                json!([name, outcome]),
            )
            .await;
    }

    /// Check the element `css` is still the one in the page after the page
    /// has made `call` and drawn what it read twice more (the third call
    /// starts after the second is drawn): a refresh that replaces a link
    /// or button under the pointer between press and release loses the
    /// user's click.
    async fn assert_outlives_refreshes(&self, css: &str, call: &str) {
        self.0
            .eval(
                "window.watched = document.querySelector(arguments[0])",
                json!([css]),
            )
            .await;
        self.wait_for_calls(3, call).await;
        assert_eq!(
            self.0
                .eval(
                    "return window.watched !== null && window.watched.isConnected && \
                     window.watched === document.querySelector(arguments[0])",
                    json!([css])
                )
                .await,
            json!(true),
            "{css} was replaced by a refresh that changed nothing it shows"
        );
    }
}

/// Sign in to the console at `server` with `key`, from its front page.
async fn sign_in(browser: &Browser, server: &TestServer, key: &str) {
    browser.goto(&server.url("/ui/")).await;
    browser.type_into("#api-key", key).await;
    browser.click("#sign-in").await;
    browser.find("#jobs-body").await;
}

/// Claim the one runnable task of `task_type`, waiting for it (a retry
/// backs off for a few seconds).
async fn claim(server: &TestServer, worker: &str, task_type: TaskType) -> Task {
    for _ in 0..300 {
        let mut claimed = server.queue.claim(worker, &[task_type], 1).await.unwrap();
        if let Some(task) = claimed.pop() {
            return task;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("no {task_type} task became runnable within 30 s");
}

/// Store `bytes` in the artifact store and record them for `task`, as a
/// worker does, then complete the task.
async fn complete_with_artifact(
    server: &TestServer,
    worker: &str,
    task: &Task,
    kind: ArtifactKind,
    content_type: &str,
    bytes: &[u8],
) {
    let storage_key = format!("jobs/{}/{}", task.job_id, kind.as_str());
    let path = server.artifacts.path().join(&storage_key);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, bytes).unwrap();
    let sha256: String = {
        use sha2::Digest;
        sha2::Sha256::digest(bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    };
    server
        .queue
        .record_artifact(
            worker,
            task.lease(),
            &NewArtifact {
                job_id: task.job_id,
                kind,
                content_type: content_type.into(),
                storage_key,
                bytes: bytes.len() as i64,
                sha256,
                metadata: json!({}),
            },
        )
        .await
        .unwrap();
    server
        .queue
        .complete(worker, task.lease(), json!({}))
        .await
        .unwrap();
}

/// A one-page PDF showing `lines` in Helvetica, with a correct xref table.
fn tiny_pdf(lines: &[&str]) -> Vec<u8> {
    let mut content = String::from("BT /F1 26 Tf 72 760 Td 32 TL\n");
    for (i, line) in lines.iter().enumerate() {
        if i == 1 {
            content.push_str("/F1 13 Tf 18 TL\n");
        }
        let escaped = line.replace('\\', "\\\\").replace('(', "\\(").replace(')', "\\)");
        content.push_str(&format!("({escaped}) Tj T*\n"));
    }
    content.push_str("ET\n");
    let objects = [
        "<< /Type /Catalog /Pages 2 0 R >>".to_string(),
        "<< /Type /Pages /Kids [3 0 R] /Count 1 >>".to_string(),
        "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 595 842] /Contents 4 0 R \
         /Resources << /Font << /F1 5 0 R >> >> >>"
            .to_string(),
        format!("<< /Length {} >>\nstream\n{content}endstream", content.len()),
        "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>".to_string(),
    ];
    let mut pdf = b"%PDF-1.4\n".to_vec();
    let mut offsets = Vec::new();
    for (i, object) in objects.iter().enumerate() {
        offsets.push(pdf.len());
        pdf.extend_from_slice(format!("{} 0 obj\n{object}\nendobj\n", i + 1).as_bytes());
    }
    let xref = pdf.len();
    let mut table = format!("xref\n0 {}\n0000000000 65535 f \n", objects.len() + 1);
    for offset in offsets {
        table.push_str(&format!("{offset:010} 00000 n \n"));
    }
    table.push_str(&format!(
        "trailer\n<< /Size {} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n",
        objects.len() + 1
    ));
    pdf.extend_from_slice(table.as_bytes());
    pdf
}

/// `seconds` of a 440 Hz tone as 16-bit mono WAV.
fn tone_wav(seconds: f32) -> Vec<u8> {
    const RATE: u32 = 16_000;
    let samples = (RATE as f32 * seconds) as u32;
    let mut wav = Vec::with_capacity(44 + samples as usize * 2);
    wav.extend_from_slice(b"RIFF");
    wav.extend_from_slice(&(36 + samples * 2).to_le_bytes());
    wav.extend_from_slice(b"WAVEfmt ");
    wav.extend_from_slice(&16u32.to_le_bytes());
    wav.extend_from_slice(&1u16.to_le_bytes()); // PCM
    wav.extend_from_slice(&1u16.to_le_bytes()); // mono
    wav.extend_from_slice(&RATE.to_le_bytes());
    wav.extend_from_slice(&(RATE * 2).to_le_bytes());
    wav.extend_from_slice(&2u16.to_le_bytes());
    wav.extend_from_slice(&16u16.to_le_bytes());
    wav.extend_from_slice(b"data");
    wav.extend_from_slice(&(samples * 2).to_le_bytes());
    for n in 0..samples {
        let t = n as f32 / RATE as f32;
        let sample = (t * 440.0 * std::f32::consts::TAU).sin() * 0.2 * i16::MAX as f32;
        wav.extend_from_slice(&(sample as i16).to_le_bytes());
    }
    wav
}

const STORY: &str = "The lighthouse keeper counted the ships each night.\n\nOne night a ship counted back.";

#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn a_browser_signs_in_submits_a_job_and_watches_it_complete_with_its_artifacts(pool: sqlx::PgPool) {
    let settings = Settings {
        depth_history: Some(HistorySettings {
            interval: Duration::from_millis(250),
            ..HistorySettings::default()
        }),
        ..test_settings()
    };
    let server = TestServer::start_with(pool, settings).await;
    let key = server.key("acme", ApiKeyRole::Admin).await;
    let shots = screenshot_dir();
    eprintln!("console screenshots: {}", shots.display());

    // Other jobs, so the list and its filters have something to show: one
    // queued (behind the job under test: lower priority), one failed.
    let (status, _) = server
        .post_json(
            &key,
            "/v1/jobs",
            &json!({"type": "text", "input": {"prompt": "a poem about rain"}, "priority": -1}),
        )
        .await;
    assert_eq!(status, 201);
    let (_, failing) = server
        .post_json(&key, "/v1/jobs", &json!({"type": "pdf", "input": {"text": "x"}}))
        .await;
    let task = claim(&server, "w-pdf", TaskType::PdfGeneration).await;
    server
        .queue
        .fail(
            "w-pdf",
            task.lease(),
            &Failure::permanent("typst: unknown font family"),
        )
        .await
        .unwrap();
    server
        .queue
        .put_pool_status(&PoolStatus {
            pool: "text".into(),
            backend: "kubernetes".into(),
            desired_replicas: 2,
            current_replicas: 2,
            ready_replicas: 1,
            busy_replicas: 1,
            pending: 1,
            in_flight: 1,
            conditions: json!([
                {"type": "Ready", "status": "True", "reason": "ReplicasReady", "message": "1 of 2 ready"},
                {"type": "Active", "status": "True", "reason": "Work", "message": "pending work"},
                {"type": "Fallback", "status": "False", "reason": "QueueRead", "message": "queue read ok"},
            ]),
            last_decision: Some("scale up 1 -> 2: 1 pending over target 1 per replica".into()),
            last_scale_at: Some(chrono::Utc::now()),
            task_types: vec!["text_generation".into()],
            created_at: None,
        })
        .await
        .unwrap();

    let browser = Browser::start(1360, 1000).await;
    browser.goto(&server.url("/ui/")).await;

    // A wrong key is refused, in words; the right one signs in.
    browser
        .type_into("#api-key", &format!("bk_{}", "x".repeat(43)))
        .await;
    browser.click("#sign-in").await;
    browser
        .wait_for(
            "the refusal",
            "const e = document.getElementById('sign-in-error'); return !e.hidden && e.textContent",
            json!([]),
        )
        .await;
    assert_eq!(
        browser
            .eval(
                "return document.getElementById('sign-in-error').getAttribute('role')",
                json!([])
            )
            .await,
        json!("alert"),
        "the refusal is announced"
    );
    browser.screenshot(&shots.join("01-sign-in-refused.png")).await;
    browser.type_into("#api-key", &key).await;
    browser.click("#sign-in").await;
    browser.find("#jobs-body tr[data-job]").await;
    let stored = browser
        .eval(
            "return [sessionStorage.getItem('backlog.apiKey'), document.cookie]",
            json!([]),
        )
        .await;
    assert_eq!(
        stored,
        json!([key, ""]),
        "the key is in session storage, no cookie"
    );
    assert_eq!(
        browser
            .eval("return document.getElementById('nav-queue').hidden", json!([]))
            .await,
        json!(false),
        "an admin key sees the Queue tab"
    );

    // Submit a reading job through the form. The first answer is lost on
    // the way back (the job was made): the form says so, and pressing again
    // gets that job, not a second one.
    let probe = Probe::install(&browser).await;
    browser.select("#new-type", "reading").await;
    browser
        .type_into("#new-input", "A story about a lighthouse")
        .await;
    probe.hold("submit", "POST /v1/jobs", "answer").await;
    browser.click("#submit-job").await;
    probe.wait_until("submit", "arrived").await;
    probe.release("submit", "fail").await;
    browser
        .wait_for(
            "the lost answer, in words",
            "const e = document.querySelector('#new-job .error-text'); \
             return !e.hidden && e.textContent.includes('could not be reached')",
            json!([]),
        )
        .await;
    browser.click("#submit-job").await;
    let id = browser
        .wait_for(
            "the job's page",
            "return location.hash.startsWith('#/jobs/') && location.hash.slice(7)",
            json!([]),
        )
        .await;
    let id = id.as_str().unwrap().to_string();
    let (_, readings) = server.get_json(&key, "/v1/jobs?type=reading").await;
    assert_eq!(
        readings["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|j| &j["id"])
            .collect::<Vec<_>>(),
        [&json!(id)],
        "the press after the lost answer made no second job"
    );
    let state_of = "const n = document.querySelector(`#task-graph [data-task=\"${arguments[0]}\"]`); \
                    return n && n.dataset.state === arguments[1]";
    browser
        .wait_for("text pending", state_of, json!(["text_generation", "pending"]))
        .await;
    browser
        .wait_for("pdf blocked", state_of, json!(["pdf_generation", "blocked"]))
        .await;
    browser.screenshot(&shots.join("02-job-queued.png")).await;

    // A worker takes the text task: the page follows.
    let text = claim(&server, "w-text", TaskType::TextGeneration).await;
    assert_eq!(text.job_id.to_string(), id);
    browser
        .wait_for("text claimed", state_of, json!(["text_generation", "claimed"]))
        .await;
    browser
        .wait_for(
            "processing",
            "return document.querySelector('.page-head .badge').textContent === 'processing'",
            json!([]),
        )
        .await;
    // The first download of the text fails as a network error would: its
    // card says so, and offers to try again.
    probe
        .hold(
            "text download",
            &format!("GET /v1/jobs/{id}/artifacts/*"),
            "request",
        )
        .await;
    complete_with_artifact(
        &server,
        "w-text",
        &text,
        ArtifactKind::Text,
        "text/plain; charset=utf-8",
        STORY.as_bytes(),
    )
    .await;
    probe.wait_until("text download", "caught").await;
    probe.release("text download", "fail").await;
    browser
        .wait_for(
            "the failed download, in words",
            "const c = document.querySelector('.artifact.text .error-text'); \
             return c && c.textContent.includes('could not be reached')",
            json!([]),
        )
        .await;
    browser.click("#reload-text").await;

    // The audio fails once (retryable), then both media tasks complete.
    // Its retry backs off 5 to 10 s (a base of 10 s), long enough for the
    // page to show it waiting.
    let slow_retries = queue::Queue::new(server.pool.clone()).with_config(queue::QueueConfig {
        retry_base: Duration::from_secs(10),
        ..queue::QueueConfig::default()
    });
    let audio = claim(&server, "w-audio", TaskType::AudioGeneration).await;
    slow_retries
        .fail(
            "w-audio",
            audio.lease(),
            &Failure::retryable("tts provider: 503 Service Unavailable"),
        )
        .await
        .unwrap();
    let pdf = claim(&server, "w-pdf", TaskType::PdfGeneration).await;
    browser
        .wait_for(
            "audio backing off",
            state_of,
            json!(["audio_generation", "scheduled"]),
        )
        .await;
    browser.find("#text-artifact").await;
    // Cards that arrive later are put beside the ones shown, which stay in
    // the page (a PDF frame taken out and put back reloads at page 1).
    browser
        .eval(
            "window.cardsRemoved = 0; \
             new MutationObserver((changes) => changes.forEach((c) => { \
               window.cardsRemoved += c.removedNodes.length; \
             })).observe(document.getElementById('artifacts'), { childList: true }); \
             return true",
            json!([]),
        )
        .await;
    browser.screenshot(&shots.join("03-job-running.png")).await;
    complete_with_artifact(
        &server,
        "w-pdf",
        &pdf,
        ArtifactKind::Pdf,
        "application/pdf",
        &tiny_pdf(&[
            "The Lighthouse",
            "The lighthouse keeper counted the ships each night.",
        ]),
    )
    .await;
    let audio = claim(&server, "w-audio", TaskType::AudioGeneration).await;
    complete_with_artifact(
        &server,
        "w-audio",
        &audio,
        ArtifactKind::Audio,
        "audio/wav",
        &tone_wav(2.0),
    )
    .await;

    browser
        .wait_for(
            "complete, and the stream finished",
            "return document.querySelector('.page-head .badge').textContent === 'complete' \
             && document.getElementById('job-live').textContent === 'finished'",
            json!([]),
        )
        .await;
    for task in ["text_generation", "pdf_generation", "audio_generation"] {
        browser.wait_for(task, state_of, json!([task, "complete"])).await;
    }
    // The finished page reads nothing more, yet "finished 1 s ago" ages.
    let finished_ago = browser
        .eval(
            "return document.querySelector('.meta time[datetime]').textContent",
            json!([]),
        )
        .await;
    browser
        .wait_for(
            "the times to age",
            "return document.querySelector('.meta time[datetime]').textContent !== arguments[0]",
            json!([finished_ago]),
        )
        .await;
    let attempts = browser
        .eval(
            "return document.querySelector('#task-rows tr[data-task=\"audio_generation\"]').innerText",
            json!([]),
        )
        .await;
    assert!(
        attempts.as_str().unwrap().contains("2 / 5")
            && attempts.as_str().unwrap().contains("503 Service Unavailable"),
        "the audio task shows its two attempts and the first one's error: {attempts}"
    );

    // The artifacts, in place: the text, the PDF in a frame, and
    // an audio player that plays; each with a download link.
    let shown = browser
        .wait_for(
            "the text artifact",
            "const t = document.getElementById('text-artifact'); return t && t.textContent",
            json!([]),
        )
        .await;
    assert_eq!(shown, json!(STORY));
    // Chromium opens the bytes as a PDF document in the frame (headless
    // Chromium does not draw its viewer's pages, so the screenshot shows the
    // viewer's empty frame).
    browser
        .wait_for(
            "the PDF opened as a PDF document",
            "const f = document.getElementById('pdf-frame'); \
             return f && f.src.startsWith('blob:') && f.contentDocument \
             && f.contentDocument.contentType === 'application/pdf'",
            json!([]),
        )
        .await;
    browser
        .wait_for(
            "the audio's length",
            "const a = document.getElementById('audio-player'); \
             return a && a.src.startsWith('blob:') && a.duration > 1.9 && a.duration < 2.1",
            json!([]),
        )
        .await;
    assert_eq!(
        browser.eval("return window.cardsRemoved", json!([])).await,
        json!(0),
        "a card was taken out of the page when another arrived"
    );
    browser
        .eval(
            "document.getElementById('audio-player').play(); return true",
            json!([]),
        )
        .await;
    browser
        .wait_for(
            "the audio playing",
            "const a = document.getElementById('audio-player'); return !a.paused && a.currentTime > 0",
            json!([]),
        )
        .await;
    let downloads = browser
        .eval(
            "return ['text', 'pdf', 'audio'].map(k => document.getElementById('download-' + k))\
             .map(a => a && a.href.startsWith('blob:') && a.getAttribute('download'))",
            json!([]),
        )
        .await;
    assert_eq!(
        downloads,
        json!([
            format!("text-{}.txt", &id[..8]),
            format!("pdf-{}.pdf", &id[..8]),
            format!("audio-{}.wav", &id[..8])
        ])
    );
    // Let the PDF viewer draw before the picture.
    tokio::time::sleep(Duration::from_secs(2)).await;
    browser.screenshot(&shots.join("04-job-complete.png")).await;

    // The list, live, and its filters.
    browser.goto(&server.url("/ui/#/jobs")).await;
    browser
        .wait_for(
            "the completed job in the list",
            "const r = document.querySelector(`tr[data-job=\"${arguments[0]}\"] .badge`); \
             return r && r.textContent === 'complete'",
            json!([id]),
        )
        .await;
    assert_eq!(
        browser
            .eval(
                "return document.querySelectorAll('#jobs-body tr[data-job]').length",
                json!([])
            )
            .await,
        json!(3)
    );
    browser.screenshot(&shots.join("05-jobs.png")).await;
    let probe = Probe::install(&browser).await;
    probe
        .assert_outlives_refreshes("#jobs-body tr[data-job] a", "GET /v1/jobs")
        .await;
    // A filter narrows the rows in place: the rows that stay are the same
    // (a link under the pointer keeps its click), and a half-typed new job
    // is not wiped.
    let failed_id = failing["id"].as_str().unwrap();
    browser.type_into("#new-input", "half a prompt").await;
    browser
        .eval(
            "window.failedLink = document.querySelector(`tr[data-job=\"${arguments[0]}\"] a`); return true",
            json!([failed_id]),
        )
        .await;
    browser.select("#filter-status", "failed").await;
    browser
        .wait_for(
            "only the failed job",
            "const rows = [...document.querySelectorAll('#jobs-body tr[data-job]')]; \
             return rows.length === 1 && rows[0].dataset.job === arguments[0]",
            json!([failed_id]),
        )
        .await;
    assert_eq!(
        browser
            .eval(
                "return [window.failedLink.isConnected, document.getElementById('new-input').value]",
                json!([])
            )
            .await,
        json!([true, "half a prompt"])
    );
    browser.select("#filter-age", "900").await;
    browser
        .wait_for(
            "the age filter kept in the address",
            "return location.hash.includes('status=failed') && location.hash.includes('age=900') \
             && document.querySelectorAll('#jobs-body tr[data-job]').length === 1",
            json!([]),
        )
        .await;
    browser
        .screenshot(&shots.join("06-jobs-failed-last-15-min.png"))
        .await;
    // A link with an age that is no number is read as no age, not a list
    // left empty for good (an invalid date threw before the first read).
    browser
        .eval(
            "location.hash = '#/jobs?status=failed&age=abc'; return true",
            json!([]),
        )
        .await;
    browser
        .wait_for(
            "the list under a malformed age",
            "return location.hash.includes('age=abc') \
             && document.querySelectorAll('#jobs-body tr[data-job]').length === 1",
            json!([]),
        )
        .await;

    // The failed job's page: retried, then cancelled, with its buttons.
    let failed_uuid: uuid::Uuid = failed_id.parse().unwrap();
    let badge_is = "const b = document.querySelector('.page-head .badge'); \
                    return location.hash === '#/jobs/' + arguments[0] && b && b.textContent === arguments[1]";
    browser
        .goto(&server.url(&format!("/ui/#/jobs/{failed_id}")))
        .await;
    browser
        .wait_for("the failed job's page", badge_is, json!([failed_id, "failed"]))
        .await;
    browser.click("#retry-job").await;
    browser
        .wait_for("queued again", badge_is, json!([failed_id, "queued"]))
        .await;
    assert_eq!(
        server.queue.job_by_id(failed_uuid).await.unwrap().status,
        JobStatus::Queued
    );
    // The page re-reads an unfinished job every few seconds; its Cancel
    // button must outlive those reads, or a press that spans one is lost.
    let probe = Probe::install(&browser).await;
    let read_job = format!("GET /v1/jobs/{failed_id}");
    let cancel = format!("POST /v1/jobs/{failed_id}/cancel");
    let follow = format!("GET /v1/jobs/{failed_id}/events");
    probe.assert_outlives_refreshes("#cancel-job", &read_job).await;

    // While the cancel is on its way the button stays disabled, through
    // the page's reads; the request fails as a network error would: the
    // toast says so and the button can be pressed again.
    probe.hold("cancel", &cancel, "request").await;
    browser.click("#cancel-job").await;
    probe.wait_until("cancel", "caught").await;
    probe.wait_for_calls(2, &read_job).await;
    assert_eq!(
        browser
            .eval("return document.getElementById('cancel-job').disabled", json!([]))
            .await,
        json!(true),
        "a read drawn while the cancel was in flight enabled its button"
    );
    probe.release("cancel", "fail").await;
    browser
        .wait_for(
            "the failed cancel, in words, and the button back",
            "const t = document.querySelector('.toast'); const b = document.getElementById('cancel-job'); \
             return t && t.textContent.includes('could not be reached') && b && !b.disabled",
            json!([]),
        )
        .await;
    assert_eq!(
        server.queue.job_by_id(failed_uuid).await.unwrap().status,
        JobStatus::Queued
    );

    // A read that left before the cancel and answers after it is not drawn
    // over the cancelled job; the job, finished, is not followed again.
    probe.hold("stale read", &read_job, "answer").await;
    probe.wait_until("stale read", "arrived").await;
    let follows = probe.count(&follow).await;
    browser.click("#cancel-job").await;
    browser
        .wait_for("cancelled", badge_is, json!([failed_id, "cancelled"]))
        .await;
    probe.release("stale read", "deliver").await;
    probe.wait_until("stale read", "consumed").await;
    // The page drew what it read (or not) before this script runs: both
    // happen in the same turn of its event loop.
    assert_eq!(
        browser.eval(badge_is, json!([failed_id, "cancelled"])).await,
        json!(true),
        "an older read was drawn over the cancelled job"
    );
    assert_eq!(
        probe.count(&follow).await,
        follows,
        "a finished job was followed again"
    );
    assert_eq!(
        server.queue.job_by_id(failed_uuid).await.unwrap().status,
        JobStatus::Cancelled
    );
    assert_eq!(
        browser
            .eval(
                "return [...document.querySelectorAll('.toast')].map(t => t.textContent)",
                json!([])
            )
            .await,
        json!(["Job cancelled"]),
        "one toast, the latest, not one over another"
    );
    // Said to screen readers (the status pill and the toasts are live
    // regions from the start) and focus kept on the page, at the job's
    // title, where the Cancel button that had it went away (once the
    // cancel's own read is drawn; the event stream may draw the badge first).
    assert_eq!(
        browser
            .eval(
                "const t = document.getElementById('toasts'); \
                 return [document.getElementById('job-live').getAttribute('role'), \
                         t.getAttribute('aria-live'), t.textContent]",
                json!([])
            )
            .await,
        json!(["status", "polite", "Job cancelled"])
    );
    browser
        .wait_for(
            "focus on the job's title",
            "return document.activeElement.id === 'job-title'",
            json!([]),
        )
        .await;
    browser
        .screenshot(&shots.join("07-job-retried-then-cancelled.png"))
        .await;

    // The queue page: depth now, the sampled chart, the pools.
    browser.click("#nav-queue").await;
    browser
        .find("#depth-rows tr[data-task-type=\"text_generation\"]")
        .await;
    browser
        .find("#charts [data-chart=\"text_generation\"] path.series")
        .await;
    browser.find("#pool-rows tr[data-pool=\"text\"]").await;
    let pool_row = browser
        .eval(
            "return document.querySelector('#pool-rows tr[data-pool=\"text\"]').innerText",
            json!([]),
        )
        .await;
    let pool_row = pool_row.as_str().unwrap();
    assert!(
        pool_row.contains("2 / 2 / 1")
            && pool_row.contains("scale up 1 -> 2")
            && pool_row.contains("text_generation"),
        "{pool_row}"
    );
    browser.screenshot(&shots.join("08-queue.png")).await;

    // A key revoked under an open page: the sign-in form says why.
    browser
        .eval(
            "sessionStorage.setItem('backlog.apiKey', 'bk_' + 'y'.repeat(43))",
            json!([]),
        )
        .await;
    browser
        .wait_for(
            "the reason for signing out",
            "const e = document.getElementById('sign-in-error'); \
             return e && !e.hidden && e.textContent.includes('refused the key')",
            json!([]),
        )
        .await;
    // The address's change (routed by its event, a task after the first
    // drawing) draws nothing over it.
    assert_eq!(
        browser
            .eval(
                "return location.hash === '#/jobs' && !document.getElementById('sign-in-error').hidden",
                json!([])
            )
            .await,
        json!(true)
    );
    browser.type_into("#api-key", &key).await;
    browser.click("#sign-in").await;
    browser.find("#jobs-body tr[data-job]").await;

    // Signing out forgets the key.
    browser.click("#sign-out").await;
    browser.find("#api-key").await;
    assert_eq!(
        browser.eval("return sessionStorage.length", json!([])).await,
        json!(0)
    );
    browser.quit().await;
    server.stop().await;
}

/// Over its tenant's limit of event streams, a job's page says so, follows
/// the job by polling, and asks for a stream again only after the
/// `Retry-After` the server gave (10 s), not every second.
#[sqlx::test(migrator = "queue::MIGRATOR")]
async fn a_job_page_over_the_stream_limit_polls_and_asks_again_when_told(pool: sqlx::PgPool) {
    let settings = Settings {
        streams: StreamLimits {
            per_tenant: 0,
            ..StreamLimits::default()
        },
        ..test_settings()
    };
    let server = TestServer::start_with(pool, settings).await;
    let key = server.key("acme", ApiKeyRole::Client).await;
    let id = server.create_text_job(&key, "a poem about rain").await;
    let browser = Browser::start(1360, 1000).await;
    sign_in(&browser, &server, &key).await;
    let probe = Probe::install(&browser).await;
    browser.goto(&server.url(&format!("/ui/#/jobs/{id}"))).await;
    browser
        .wait_for(
            "the refused stream, in words",
            "return document.getElementById('job-live').textContent === 'too many streams; polling'",
            json!([]),
        )
        .await;
    let follow = format!("GET /v1/jobs/{id}/events");
    assert_eq!(probe.count(&follow).await, 1);
    probe.wait_for_calls(2, &format!("GET /v1/jobs/{id}")).await;
    assert_eq!(
        probe.count(&follow).await,
        1,
        "asked for a stream again before its Retry-After"
    );
    // Polled, the page still follows the job.
    claim(&server, "w-text", TaskType::TextGeneration).await;
    browser
        .wait_for(
            "processing, by polling",
            "return document.querySelector('.page-head .badge').textContent === 'processing'",
            json!([]),
        )
        .await;
    browser.quit().await;
    server.stop().await;
}
