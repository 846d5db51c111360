//! WorkerPools from YAML files, for everywhere but Kubernetes.
//!
//! A path is a file or a folder of `.yaml`/`.yml` files (not recursive),
//! each holding any number of `---`-separated documents. Every problem is
//! reported with its file, line, document and field path — every problem
//! of a document, not only the first (the CRD's schema is checked before
//! the spec is read) — and a bad document never stops the others from
//! loading.

use std::fs;
use std::path::{Path, PathBuf};

use kube::Resource;
use serde_yaml_ng::{Mapping, Value};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::error::{Error, Location};
use crate::spec::{FieldError, WorkerPool, WorkerPoolSpec};

mod schema;

/// Top-level keys of a WorkerPool document. `status` is accepted (and
/// ignored by the controller) so `kubectl get -o yaml` output loads as is.
const TOP_LEVEL_FIELDS: [&str; 5] = ["apiVersion", "kind", "metadata", "spec", "status"];

/// A pool that loaded, with where it came from.
#[derive(Clone, Debug, PartialEq)]
pub struct LoadedPool {
    pub location: Location,
    pub pool: WorkerPool,
}

impl LoadedPool {
    pub fn name(&self) -> &str {
        self.pool.metadata.name.as_deref().unwrap_or_default()
    }
}

/// The outcome of loading: the pools that are valid, and every problem.
#[derive(Debug, Default)]
pub struct Manifests {
    pub pools: Vec<LoadedPool>,
    pub errors: Vec<Error>,
}

/// Loads every WorkerPool under `path` (a file, or a folder's YAML files in
/// name order).
pub fn load(path: &Path) -> Manifests {
    let mut manifests = Manifests::default();
    match manifest_files(path) {
        Ok(files) => {
            for file in files {
                match fs::read_to_string(&file) {
                    Ok(text) => manifests.add_file(&file, &text),
                    Err(source) => manifests.errors.push(Error::Read { path: file, source }),
                }
            }
        }
        Err(error) => manifests.errors.push(error),
    }
    manifests
}

fn manifest_files(path: &Path) -> Result<Vec<PathBuf>, Error> {
    let read_error = |source| Error::Read {
        path: path.to_path_buf(),
        source,
    };
    if !fs::metadata(path).map_err(read_error)?.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut files = Vec::new();
    for entry in fs::read_dir(path).map_err(read_error)? {
        let file = entry.map_err(read_error)?.path();
        let is_yaml = matches!(file.extension().and_then(|e| e.to_str()), Some("yaml" | "yml"));
        if is_yaml && file.is_file() {
            files.push(file);
        }
    }
    if files.is_empty() {
        return Err(Error::NoManifests {
            path: path.to_path_buf(),
        });
    }
    files.sort();
    Ok(files)
}

impl Manifests {
    /// Parses one file's documents and admits each valid pool whose name and
    /// task types no earlier pool has taken.
    pub fn add_file(&mut self, file: &Path, text: &str) {
        for document in documents(text) {
            match parse_document(file, &document) {
                Ok(loaded) => self.admit(loaded),
                Err(errors) => self.errors.extend(errors),
            }
        }
    }

    /// The first pool to claim a name or a task type keeps it, so adding a
    /// conflicting file never takes work away from a running pool.
    fn admit(&mut self, loaded: LoadedPool) {
        if let Some(first) = self.pools.iter().find(|p| p.name() == loaded.name()) {
            self.errors.push(Error::DuplicateName {
                location: loaded.location,
                first: Box::new(first.location.clone()),
            });
            return;
        }
        for &task_type in &loaded.pool.spec.task_types {
            if let Some(first) = self
                .pools
                .iter()
                .find(|p| p.pool.spec.task_types.contains(&task_type))
            {
                self.errors.push(Error::SharedTaskType {
                    location: loaded.location,
                    task_type,
                    first: Box::new(first.location.clone()),
                });
                return;
            }
        }
        self.pools.push(loaded);
    }
}

/// One `---`-separated document of a file.
struct Document<'a> {
    /// Line of the document's first line in the file, from 1.
    line: usize,
    /// Position among the file's non-empty documents, from 1.
    index: usize,
    text: &'a str,
}

/// Splits on `---` lines as kubectl does, so a syntax error stays inside
/// its document instead of ending the file. Documents holding only
/// comments or blank lines are skipped and not counted.
fn documents(text: &str) -> Vec<Document<'_>> {
    let mut chunks = Vec::new();
    let mut start = 0;
    let mut start_line = 1;
    let mut offset = 0;
    for (n, line) in text.split_inclusive('\n').enumerate() {
        if line.trim_end() == "---" {
            chunks.push((start_line, &text[start..offset]));
            start = offset + line.len();
            start_line = n + 2;
        }
        offset += line.len();
    }
    chunks.push((start_line, &text[start..]));

    let has_content = |chunk: &str| {
        chunk.lines().any(|line| {
            let line = line.trim();
            !line.is_empty() && !line.starts_with('#')
        })
    };
    chunks
        .into_iter()
        .filter(|(_, chunk)| has_content(chunk))
        .enumerate()
        .map(|(i, (line, text))| Document {
            line,
            index: i + 1,
            text,
        })
        .collect()
}

fn parse_document(file: &Path, document: &Document<'_>) -> Result<LoadedPool, Vec<Error>> {
    let mut location = Location {
        file: file.to_path_buf(),
        line: document.line,
        document: document.index,
        name: None,
    };
    // Leading newlines make the parser's line numbers those of the file.
    let padded = format!("{}{}", "\n".repeat(document.line - 1), document.text);
    let value: Value = serde_yaml_ng::from_str(&padded).map_err(|source| {
        vec![Error::Yaml {
            location: location.clone(),
            source,
        }]
    })?;
    let field_error = |location: &Location, path: &str, message: String| Error::Field {
        location: location.clone(),
        path: path.to_string(),
        message,
    };
    let Value::Mapping(document) = value else {
        let message = "must be a mapping with apiVersion, kind, metadata and spec".to_string();
        return Err(vec![field_error(&location, ".", message)]);
    };
    location.name = document
        .get("metadata")
        .and_then(|metadata| metadata.get("name"))
        .and_then(Value::as_str)
        .map(str::to_string);

    check_type(&document, &location)?;

    let mut errors: Vec<Error> = document
        .keys()
        .filter(|key| !key.as_str().is_some_and(|key| TOP_LEVEL_FIELDS.contains(&key)))
        .map(|key| {
            let key = key_name(key);
            let expected = TOP_LEVEL_FIELDS.map(|field| format!("`{field}`")).join(", ");
            field_error(
                &location,
                &key,
                format!("unknown field `{key}`, expected one of {expected}"),
            )
        })
        .collect();
    // Read the document as JSON, as the Kubernetes API server does: YAML's
    // own enum encoding (`!Local`) would otherwise be the only one accepted.
    let json = serde_json::to_value(Value::Mapping(document))
        .map_err(|error| vec![field_error(&location, ".", error.to_string())])?;

    // Each part is read on its own, so one bad field hides no other problem.
    let metadata = match json.get("metadata") {
        None => Some(ObjectMeta::default()),
        Some(metadata) => match serde_path_to_error::deserialize::<_, ObjectMeta>(metadata) {
            Ok(metadata) => Some(metadata),
            Err(error) => {
                let path = under("metadata", &error.path().to_string());
                errors.push(field_error(&location, &path, error.inner().to_string()));
                None
            }
        },
    };
    if let Some(metadata) = &metadata {
        match metadata.name.as_deref() {
            None => errors.push(field_error(&location, "metadata.name", "is required".to_string())),
            Some(name) if !is_dns_label(name) => errors.push(field_error(
                &location,
                "metadata.name",
                format!("{name:?} must be lowercase letters, digits and '-', at most 63, starting and ending alphanumeric"),
            )),
            Some(_) => {}
        }
    }
    let spec = match json.get("spec") {
        None => {
            errors.push(field_error(&location, "spec", "is required".to_string()));
            None
        }
        Some(spec) => {
            // The schema names every field that breaks it; the spec's own
            // checks (which need it read) add the rules a schema cannot
            // state, one problem per field path.
            let broken = schema::check_spec(spec);
            let read = serde_path_to_error::deserialize::<_, WorkerPoolSpec>(spec);
            let spec = match read {
                Ok(spec) => {
                    let rules = spec.validate();
                    let mut problems: Vec<FieldError> = rules.clone();
                    problems.extend(
                        broken
                            .into_iter()
                            .filter(|b| !rules.iter().any(|r| r.path == b.path)),
                    );
                    errors.extend(
                        problems
                            .into_iter()
                            .map(|p| field_error(&location, &p.path, p.message)),
                    );
                    Some(spec)
                }
                Err(error) if broken.is_empty() => {
                    let path = under("spec", &error.path().to_string());
                    errors.push(field_error(&location, &path, error.inner().to_string()));
                    None
                }
                Err(_) => {
                    // A field misspelt or renamed hides no rule: read the
                    // spec without the unknown fields and check the rest.
                    let rules = without_unknown_fields(spec, &broken)
                        .and_then(|known| serde_json::from_value::<WorkerPoolSpec>(known).ok())
                        .map(|spec| spec.validate())
                        .unwrap_or_default();
                    errors.extend(
                        broken
                            .iter()
                            .chain(rules.iter().filter(|r| !broken.iter().any(|b| b.path == r.path)))
                            .map(|p| field_error(&location, &p.path, p.message.clone())),
                    );
                    None
                }
            };
            spec
        }
    };
    match (metadata, spec) {
        (Some(metadata), Some(spec)) if errors.is_empty() => {
            let mut pool = WorkerPool::new(metadata.name.as_deref().unwrap_or_default(), spec);
            pool.metadata = metadata;
            Ok(LoadedPool { location, pool })
        }
        _ => Err(errors),
    }
}

/// `spec` without the fields `broken` names as unknown, when those are all
/// it breaks (`None` otherwise: a field of the wrong type, read as a
/// default, would make the rules report on a value nobody wrote).
fn without_unknown_fields(spec: &serde_json::Value, broken: &[FieldError]) -> Option<serde_json::Value> {
    let mut known = spec.clone();
    for problem in broken {
        if !problem.message.starts_with("unknown field") {
            return None;
        }
        let mut keys: Vec<&str> = problem.path.strip_prefix("spec.")?.split('.').collect();
        let last = keys.pop()?;
        let mut object = &mut known;
        for key in keys {
            object = object.get_mut(key)?;
        }
        object.as_object_mut()?.remove(last);
    }
    Some(known)
}

/// `serde_path_to_error`'s path of a part, as a path in the document.
fn under(part: &str, path: &str) -> String {
    if path == "." {
        part.to_string()
    } else {
        format!("{part}.{path}")
    }
}

/// A document of another type is not a broken WorkerPool: say only that.
fn check_type(document: &Mapping, location: &Location) -> Result<(), Vec<Error>> {
    let field = |name: &str| document.get(name).and_then(Value::as_str).map(str::to_string);
    let mut errors = Vec::new();
    let (api_version, kind) = (WorkerPool::api_version(&()), WorkerPool::kind(&()));
    let found = field("apiVersion");
    if found.as_deref() != Some(&*api_version) {
        errors.push(Error::ApiVersion {
            location: location.clone(),
            expected: api_version.into_owned(),
            found,
        });
    }
    let found = field("kind");
    if found.as_deref() != Some(&*kind) {
        errors.push(Error::Kind {
            location: location.clone(),
            expected: kind.into_owned(),
            found,
        });
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

fn key_name(key: &Value) -> String {
    match key {
        Value::String(key) => key.clone(),
        other => serde_yaml_ng::to_string(other)
            .map(|yaml| yaml.trim_end().to_string())
            .unwrap_or_else(|_| format!("{other:?}")),
    }
}

/// Pool names become replica names, labels and metric labels: RFC 1123 labels.
fn is_dns_label(name: &str) -> bool {
    let bytes = name.as_bytes();
    let alphanumeric = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    (1..=63).contains(&bytes.len())
        && bytes.iter().all(|b| alphanumeric(b) || *b == b'-')
        && bytes.first().is_some_and(alphanumeric)
        && bytes.last().is_some_and(alphanumeric)
}

#[cfg(test)]
mod tests;
