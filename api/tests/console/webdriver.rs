//! Just enough of the W3C WebDriver protocol to drive headless Chromium
//! through chromedriver: it is JSON over HTTP, and the tests already have
//! an HTTP client, so a dozen calls cost no new dependency.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use reqwest::Client;
use serde_json::{json, Value};

/// The key under which WebDriver returns an element reference.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// Debian's `chromium` is a shell wrapper; chromedriver is given the real
/// program.
const CHROMIUM_CANDIDATES: &[&str] = &["/usr/lib/chromium/chromium", "/usr/bin/chromium"];

/// A chromedriver process and one browser session; both end on drop.
pub struct Browser {
    driver: Child,
    client: Client,
    session: String,
    _profile: tempfile::TempDir,
}

fn find_chromium() -> Option<&'static str> {
    CHROMIUM_CANDIDATES
        .iter()
        .copied()
        .find(|p| Path::new(p).exists())
}

fn missing(what: &str) -> ! {
    panic!(
        "{what} is not installed: the console's browser test needs Chromium and chromedriver. \
         Install them with `scripts/ensure-tools.sh` (Debian: apt-get install chromium chromium-driver)."
    )
}

impl Browser {
    /// Start chromedriver and a headless Chromium of `width`×`height`.
    pub async fn start(width: u32, height: u32) -> Browser {
        let chromium = find_chromium().unwrap_or_else(|| missing("chromium"));
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let driver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|_| missing("chromedriver"));
        let profile = tempfile::tempdir().unwrap();
        let mut browser = Browser {
            driver,
            client: super::common::http_client(),
            session: String::new(),
            _profile: profile,
        };
        let base = format!("http://127.0.0.1:{port}");
        let started = Instant::now();
        loop {
            let ready = browser
                .client
                .get(format!("{base}/status"))
                .send()
                .await
                .ok()
                .filter(|r| r.status().is_success());
            if ready.is_some() {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "chromedriver did not answer on port {port} within 20 s"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let args = [
            "--headless=new".to_string(),
            // Tests run as root in containers, where Chromium's sandbox cannot start.
            "--no-sandbox".into(),
            "--disable-dev-shm-usage".into(),
            "--disable-gpu".into(),
            "--hide-scrollbars".into(),
            "--autoplay-policy=no-user-gesture-required".into(),
            format!("--window-size={width},{height}"),
            format!("--user-data-dir={}", browser._profile.path().display()),
        ];
        let created = browser
            .client
            .post(format!("{base}/session"))
            .json(&json!({"capabilities": {"alwaysMatch": {
                "browserName": "chrome",
                "goog:chromeOptions": {"binary": chromium, "args": args},
            }}}))
            .send()
            .await
            .expect("chromedriver answers");
        let status = created.status();
        let body: Value = created.json().await.unwrap();
        assert!(status.is_success(), "no browser session: {body}");
        browser.session = format!(
            "{base}/session/{}",
            body["value"]["sessionId"].as_str().expect("a session id")
        );
        browser
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let mut request = self.client.request(method, format!("{}{path}", self.session));
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.expect("chromedriver answers");
        let status = response.status();
        let body: Value = response.json().await.expect("WebDriver answers JSON");
        assert!(status.is_success(), "WebDriver {path}: {body}");
        body["value"].clone()
    }

    async fn post(&self, path: &str, body: Value) -> Value {
        self.call(reqwest::Method::POST, path, Some(body)).await
    }

    pub async fn goto(&self, url: &str) {
        self.post("/url", json!({"url": url})).await;
    }

    /// Run `script` (a function body; `arguments` holds `args`) in the page.
    pub async fn eval(&self, script: &str, args: Value) -> Value {
        self.post("/execute/sync", json!({"script": script, "args": args}))
            .await
    }

    /// Wait until `script` returns something truthy, and return it.
    pub async fn wait_for(&self, what: &str, script: &str, args: Value) -> Value {
        let started = Instant::now();
        loop {
            let value = self.eval(script, args.clone()).await;
            let truthy = !matches!(&value, Value::Null | Value::Bool(false))
                && value != json!("")
                && value != json!(0);
            if truthy {
                return value;
            }
            if started.elapsed() > Duration::from_secs(30) {
                let page = self.eval("return document.body.innerText", json!([])).await;
                panic!("waited 30 s for {what}; the page reads:\n{page}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Wait for the element `css` to be in the page, and return its reference.
    pub async fn find(&self, css: &str) -> String {
        self.wait_for(
            &format!("element {css}"),
            "return document.querySelector(arguments[0]) !== null",
            json!([css]),
        )
        .await;
        let found = self
            .post("/element", json!({"using": "css selector", "value": css}))
            .await;
        found[ELEMENT]
            .as_str()
            .unwrap_or_else(|| panic!("no element reference for {css}: {found}"))
            .to_string()
    }

    /// Type `text` into the element `css`, as a user would.
    pub async fn type_into(&self, css: &str, text: &str) {
        let element = self.find(css).await;
        self.post(&format!("/element/{element}/clear"), json!({})).await;
        self.post(&format!("/element/{element}/value"), json!({"text": text}))
            .await;
    }

    pub async fn click(&self, css: &str) {
        let element = self.find(css).await;
        self.post(&format!("/element/{element}/click"), json!({})).await;
    }

    /// Choose the option whose value is `value` in the select `css`.
    pub async fn select(&self, css: &str, value: &str) {
        self.click(&format!("{css} option[value=\"{value}\"]")).await;
    }

    /// Save the page as a PNG at `path`, the window grown to show the whole
    /// page first (WebDriver screenshots only the viewport).
    pub async fn screenshot(&self, path: &Path) {
        let height = self
            .eval("return document.body.scrollHeight", json!([]))
            .await
            .as_u64()
            .unwrap_or(1000);
        let width = self
            .eval("return window.outerWidth", json!([]))
            .await
            .as_u64()
            .unwrap_or(1360);
        self.post(
            "/window/rect",
            // The window's frame takes some of its height even headless.
            json!({"width": width, "height": height.clamp(600, 4000) + 200}),
        )
        .await;
        let png = self.call(reqwest::Method::GET, "/screenshot", None).await;
        let png = STANDARD
            .decode(png.as_str().expect("base64 PNG"))
            .expect("base64 PNG");
        std::fs::write(path, png).unwrap();
    }

    /// End the session (closing the browser) and chromedriver.
    pub async fn quit(mut self) {
        let _ = self.client.delete(&self.session).send().await;
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // A failed test still leaves no chromedriver behind (its browser
        // goes with it when its connection closes).
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}
