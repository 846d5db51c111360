//! WorkerPool manifests of text workers run as local processes, for tests
//! that start the real controller:
//!
//! ```ignore
//! LocalTextPool::new(&worker, &database_url, &store)
//!     .env("WORKER_HEARTBEAT_SECONDS", "0.5")
//!     .spec("maxReplicas", 3)
//!     .write_to(dir.path())
//! ```

use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};

/// A pool named `text` serving `text_generation` with the offline LLM
/// provider, its workers quiet (`RUST_LOG=warn`) and logging plain text.
pub struct LocalTextPool {
    env: Map<String, Value>,
    command: String,
    spec: Map<String, Value>,
}

impl LocalTextPool {
    /// `store` is the artifact store's URL, e.g. `file:///tmp/x`.
    pub fn new(worker: &Path, database_url: &str, store: &str) -> LocalTextPool {
        let mut env = Map::new();
        for (key, value) in [
            ("DATABASE_URL", database_url),
            ("LLM_PROVIDER", "offline"),
            ("ARTIFACT_STORE", store),
            ("LOG_FORMAT", "text"),
            ("RUST_LOG", "warn"),
        ] {
            env.insert(key.into(), value.into());
        }
        LocalTextPool {
            env,
            command: worker.display().to_string(),
            spec: Map::new(),
        }
    }

    /// One more variable in the workers' environment.
    pub fn env(mut self, key: &str, value: &str) -> LocalTextPool {
        self.env.insert(key.into(), value.into());
        self
    }

    /// One more field of the spec, e.g. `("cooldownPeriod", json!(2))`.
    pub fn spec(mut self, field: &str, value: impl Into<Value>) -> LocalTextPool {
        self.spec.insert(field.into(), value.into());
        self
    }

    pub fn yaml(&self) -> String {
        let mut spec = Map::new();
        spec.insert("taskTypes".into(), json!(["text_generation"]));
        spec.insert(
            "target".into(),
            json!({"local": {"command": [self.command], "env": self.env}}),
        );
        spec.extend(self.spec.clone());
        let manifest = json!({
            "apiVersion": "backlog.dev/v1alpha1",
            "kind": "WorkerPool",
            "metadata": {"name": "text"},
            "spec": spec,
        });
        serde_yaml_ng::to_string(&manifest).expect("a JSON value renders as YAML")
    }

    /// Writes `pools.yaml` in `dir` and returns its path.
    pub fn write_to(&self, dir: &Path) -> PathBuf {
        let path = dir.join("pools.yaml");
        std::fs::write(&path, self.yaml()).expect("the manifest is written");
        path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_manifest_carries_the_worker_its_environment_and_the_spec_fields() {
        let yaml = LocalTextPool::new(Path::new("/bin/text-worker"), "postgres://db/x", "file:///s")
            .env("WORKER_HEARTBEAT_SECONDS", "0.5")
            .spec("maxReplicas", 3)
            .spec("scaleDown", json!({"stabilizationWindowSeconds": 0}))
            .yaml();
        let parsed: Value = serde_yaml_ng::from_str(&yaml).unwrap();
        assert_eq!(parsed["kind"], "WorkerPool");
        let spec = &parsed["spec"];
        assert_eq!(spec["target"]["local"]["command"], json!(["/bin/text-worker"]));
        let env = &spec["target"]["local"]["env"];
        assert_eq!(env["DATABASE_URL"], "postgres://db/x");
        assert_eq!(env["ARTIFACT_STORE"], "file:///s");
        assert_eq!(env["WORKER_HEARTBEAT_SECONDS"], "0.5");
        assert_eq!(spec["maxReplicas"], 3);
        assert_eq!(spec["scaleDown"]["stabilizationWindowSeconds"], 0);
    }
}
