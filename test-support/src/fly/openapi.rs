//! Checks JSON against the schemas of Fly's published OpenAPI document:
//! a small validator for the subset the spec uses (`$ref`, `allOf`, `type`,
//! `properties`, `items`, `additionalProperties`, `enum`).

use std::path::{Path, PathBuf};

use serde_json::Value;

pub struct Spec {
    doc: Value,
}

/// Where the official spec lives: a copy in `test-support/contracts/`.
pub fn spec_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("contracts/fly-machines-openapi-2024-02.json")
}

impl Spec {
    /// Loads the spec, or panics with where it was expected.
    pub fn load() -> Spec {
        let path = spec_path();
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!(
                "the Fly Machines OpenAPI spec is missing at {} ({e})",
                path.display()
            )
        });
        Spec {
            doc: serde_json::from_str(&text).expect("the Fly spec is JSON"),
        }
    }

    /// The schema of a named component, as a `$ref`.
    pub fn component(name: &str) -> Value {
        serde_json::json!({"$ref": format!("#/components/schemas/{name}")})
    }

    /// The request body schema of an operation; `path` is as in the spec (no `/v1`).
    pub fn request_schema(&self, path: &str, method: &str) -> Option<Value> {
        self.doc["paths"][path][method]["requestBody"]["content"]["application/json"]["schema"]
            .as_object()
            .map(|o| Value::Object(o.clone()))
    }

    /// The response schema of an operation for a status, if the spec gives one.
    pub fn response_schema(&self, path: &str, method: &str, status: u16) -> Option<Value> {
        self.doc["paths"][path][method]["responses"][status.to_string()]["content"]["application/json"]
            ["schema"]
            .as_object()
            .map(|o| Value::Object(o.clone()))
    }

    /// Every way `value` breaks `schema`, each with its JSON path.
    pub fn validate(&self, schema: &Value, value: &Value) -> Vec<String> {
        let mut problems = Vec::new();
        self.check(schema, value, "$", &mut problems);
        problems
    }

    fn resolve<'a>(&'a self, schema: &'a Value) -> &'a Value {
        match schema.get("$ref").and_then(Value::as_str) {
            Some(reference) => {
                let pointer = reference.trim_start_matches('#');
                let target = self
                    .doc
                    .pointer(pointer)
                    .unwrap_or_else(|| panic!("unresolvable $ref {reference}"));
                self.resolve(target)
            }
            None => schema,
        }
    }

    fn check(&self, schema: &Value, value: &Value, at: &str, problems: &mut Vec<String>) {
        let schema = self.resolve(schema);
        if let Some(all) = schema.get("allOf").and_then(Value::as_array) {
            for part in all {
                self.check(part, value, at, problems);
            }
        }
        if let Some(allowed) = schema.get("enum").and_then(Value::as_array) {
            if !allowed.contains(value) {
                problems.push(format!("{at}: {value} is not one of {allowed:?}"));
            }
        }
        let kind = schema.get("type").and_then(Value::as_str);
        let fits = match kind {
            None => true,
            Some("object") => value.is_object(),
            Some("array") => value.is_array(),
            Some("string") => value.is_string(),
            Some("integer") => value.is_i64() || value.is_u64(),
            Some("number") => value.is_number(),
            Some("boolean") => value.is_boolean(),
            Some(other) => panic!("schema type {other} not handled"),
        };
        if !fits {
            problems.push(format!("{at}: expected {}, got {value}", kind.unwrap_or("?")));
            return;
        }
        if let (Some(items), Some(array)) = (schema.get("items"), value.as_array()) {
            for (i, item) in array.iter().enumerate() {
                self.check(items, item, &format!("{at}[{i}]"), problems);
            }
        }
        if let Some(object) = value.as_object() {
            let properties = schema.get("properties").and_then(Value::as_object);
            let additional = schema.get("additionalProperties");
            for (key, field) in object {
                let path = format!("{at}.{key}");
                match (properties.and_then(|p| p.get(key)), additional) {
                    (Some(property), _) => self.check(property, field, &path, problems),
                    (None, Some(extra)) if extra.is_object() => self.check(extra, field, &path, problems),
                    // An object schema with properties names every field the API knows.
                    (None, _) if properties.is_some() => {
                        problems.push(format!("{path}: not a field of this schema"))
                    }
                    _ => {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_validator_finds_wrong_types_unknown_fields_and_enums() {
        let spec = Spec::load();
        let machine = Spec::component("Machine");
        let good = serde_json::json!({"id": "1", "state": "started", "config": {"image": "x", "metadata": {"a": "b"}}});
        assert_eq!(spec.validate(&machine, &good), Vec::<String>::new());
        let bad = serde_json::json!({"id": 1, "colour": "red", "config": {"metadata": {"a": 2}}});
        let problems = spec.validate(&machine, &bad);
        assert_eq!(problems.len(), 3, "{problems:?}");
        let error = serde_json::json!({"error": "x", "status": "name_of_nothing"});
        assert_eq!(spec.validate(&Spec::component("ErrorResponse"), &error).len(), 1);
    }
}
