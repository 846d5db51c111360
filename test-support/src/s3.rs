//! moto's S3 server (PyPI `moto[server]`, which `make test` installs through
//! scripts/ensure-tools.sh) on a free loopback port: a real S3 API for the
//! artifact store's tests. Stopped when dropped.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub struct MotoS3 {
    child: Child,
    port: u16,
    /// `http://127.0.0.1:PORT`, for `AWS_ENDPOINT_URL`.
    pub endpoint: String,
}

impl Drop for MotoS3 {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl MotoS3 {
    /// Start the server and wait until it answers. Panics, saying how to
    /// install moto, when it is missing.
    pub async fn start() -> MotoS3 {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let child = Command::new("python3")
            .args(["-m", "moto.server", "-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 runs");
        let server = MotoS3 {
            child,
            port,
            endpoint: format!("http://127.0.0.1:{port}"),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while server.request("GET", "/").await.is_err() {
            let installed = Command::new("python3")
                .args(["-c", "import moto.server"])
                .status()
                .is_ok_and(|s| s.success());
            assert!(
                installed,
                "moto is not installed: run `make test` (scripts/ensure-tools.sh installs it) \
                 or `pip install 'moto[server]'`"
            );
            assert!(
                Instant::now() < deadline,
                "moto's S3 server did not answer on {}",
                server.endpoint
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        server
    }

    /// S3 CreateBucket (`PUT /BUCKET`; moto accepts it unsigned).
    pub async fn create_bucket(&self, bucket: &str) {
        let status = self
            .request("PUT", &format!("/{bucket}"))
            .await
            .expect("moto answers");
        assert_eq!(status, 200, "creating bucket {bucket}");
    }

    /// One HTTP/1.1 request without a body; the response's status code.
    async fn request(&self, method: &str, path: &str) -> std::io::Result<u16> {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await?;
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            self.port
        );
        stream.write_all(request.as_bytes()).await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        let head = String::from_utf8_lossy(&response);
        head.split_whitespace()
            .nth(1)
            .and_then(|code| code.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("not an HTTP response: {head:.80}")))
    }
}
