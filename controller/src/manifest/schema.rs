//! Checks a WorkerPool's `spec` against the CRD's own OpenAPI schema, as
//! the Kubernetes API server would, and reports every violation with its
//! field path — where deserialisation stops at the first one.
//!
//! Only what the generated schema uses is understood: `type`, `nullable`,
//! `properties`, `additionalProperties`, `required`, `oneOf`, `enum`,
//! `items`, `minimum`/`maximum`, `format: int32`, `minItems` and
//! `minLength`. Unknown fields are errors (kubectl's strict validation).

use std::sync::LazyLock;

use kube::CustomResourceExt;
use serde_json::Value;

use crate::spec::{FieldError, WorkerPool};

/// The `spec` schema of the CRD `controller crd` prints.
static SPEC_SCHEMA: LazyLock<Value> = LazyLock::new(|| {
    let crd = WorkerPool::crd();
    let schema = crd.spec.versions[0]
        .schema
        .as_ref()
        .and_then(|s| s.open_api_v3_schema.as_ref())
        .and_then(|s| s.properties.as_ref())
        .and_then(|p| p.get("spec"))
        .expect("the CRD has a spec schema");
    serde_json::to_value(schema).expect("a schema is JSON")
});

/// Fields renamed to HPA's and KEDA's names for the same knob: an old
/// manifest is told the new name, not just that the old one is unknown.
const RENAMED_FIELDS: [(&str, &str); 2] = [
    ("stabilizationSeconds", "stabilizationWindowSeconds"),
    ("cooldownSeconds", "cooldownPeriod"),
];

/// Every way `spec` breaks the CRD's schema, in document order.
pub fn check_spec(spec: &Value) -> Vec<FieldError> {
    let mut problems = Vec::new();
    check(spec, &SPEC_SCHEMA, "spec", &mut problems);
    problems
}

fn push(problems: &mut Vec<FieldError>, path: &str, message: String) {
    problems.push(FieldError {
        path: path.to_string(),
        message,
    });
}

fn check(value: &Value, schema: &Value, path: &str, problems: &mut Vec<FieldError>) {
    if value.is_null() {
        if !schema["nullable"].as_bool().unwrap_or(false) && schema.get("type").is_some() {
            push(
                problems,
                path,
                format!("must not be null, expected {}", expected(schema)),
            );
        }
        return;
    }
    if let Some(kind) = schema["type"].as_str() {
        if !has_type(value, kind) {
            push(
                problems,
                path,
                format!(
                    "invalid type: {}, expected {}",
                    described(value),
                    expected(schema)
                ),
            );
            return;
        }
    }
    if let Some(allowed) = schema["enum"].as_array() {
        if !allowed.contains(value) {
            let names: Vec<String> = allowed.iter().map(|v| format!("`{}`", plain(v))).collect();
            push(
                problems,
                path,
                format!(
                    "unknown variant `{}`, expected one of {}",
                    plain(value),
                    names.join(", ")
                ),
            );
        }
    }
    match value {
        Value::Object(fields) => check_object(fields, schema, path, problems),
        Value::Array(items) => {
            if let Some(min) = schema["minItems"].as_u64() {
                if (items.len() as u64) < min {
                    push(problems, path, format!("must have at least {min} item(s)"));
                }
            }
            if let Some(item_schema) = schema.get("items") {
                for (i, item) in items.iter().enumerate() {
                    check(item, item_schema, &format!("{path}[{i}]"), problems);
                }
            }
        }
        Value::Number(number) => check_number(number, schema, path, problems),
        Value::String(text) => {
            if let Some(min) = schema["minLength"].as_u64() {
                if (text.chars().count() as u64) < min {
                    push(
                        problems,
                        path,
                        format!("must be at least {min} character(s) long"),
                    );
                }
            }
        }
        Value::Bool(_) | Value::Null => {}
    }
}

fn check_object(
    fields: &serde_json::Map<String, Value>,
    schema: &Value,
    path: &str,
    problems: &mut Vec<FieldError>,
) {
    let child = |key: &str| format!("{path}.{key}");
    let properties = schema["properties"].as_object();
    for (key, value) in fields {
        match (
            properties.and_then(|p| p.get(key)),
            schema.get("additionalProperties"),
        ) {
            (Some(property), _) => check(value, property, &child(key), problems),
            (None, Some(additional)) if additional.is_object() => {
                check(value, additional, &child(key), problems)
            }
            (None, _) if properties.is_some() => {
                let known: Vec<String> = properties
                    .into_iter()
                    .flat_map(|p| p.keys())
                    .map(|k| format!("`{k}`"))
                    .collect();
                let renamed = RENAMED_FIELDS
                    .iter()
                    .find(|(old, _)| old == key)
                    .map(|(_, new)| format!(" (renamed `{new}`, the name HPA and KEDA use)"))
                    .unwrap_or_default();
                push(
                    problems,
                    &child(key),
                    format!(
                        "unknown field `{key}`{renamed}, expected one of {}",
                        known.join(", ")
                    ),
                );
            }
            (None, _) => {}
        }
    }
    for required in schema["required"].as_array().into_iter().flatten() {
        if let Some(name) = required.as_str() {
            if !fields.contains_key(name) {
                push(problems, &child(name), "is required".to_string());
            }
        }
    }
    if let Some(forms) = schema["oneOf"].as_array() {
        check_one_of(fields, forms, path, problems);
    }
}

/// `oneOf`, as the schema of an enum such as `target` uses it: each form
/// requires one field, and exactly one form must match.
fn check_one_of(
    fields: &serde_json::Map<String, Value>,
    forms: &[Value],
    path: &str,
    problems: &mut Vec<FieldError>,
) {
    let required = |form: &Value| -> Vec<String> {
        form["required"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|r| r.as_str().map(str::to_string))
            .collect()
    };
    let matching: Vec<&Value> = forms
        .iter()
        .filter(|form| required(form).iter().all(|name| fields.contains_key(name)))
        .collect();
    if matching.len() == 1 {
        return;
    }
    let names: Vec<String> = forms
        .iter()
        .flat_map(required)
        .map(|n| format!("`{n}`"))
        .collect();
    let given: Vec<String> = forms
        .iter()
        .flat_map(required)
        .filter(|name| fields.contains_key(name))
        .map(|n| format!("`{n}`"))
        .collect();
    let got = if given.is_empty() {
        "none".to_string()
    } else {
        given.join(" and ")
    };
    push(
        problems,
        path,
        format!("must set exactly one of {}, got {got}", names.join(", ")),
    );
}

fn check_number(number: &serde_json::Number, schema: &Value, path: &str, problems: &mut Vec<FieldError>) {
    let Some(value) = number.as_f64() else {
        return;
    };
    if schema["format"] == "int32" && (value < f64::from(i32::MIN) || value > f64::from(i32::MAX)) {
        push(problems, path, format!("must fit in 32 bits, got {number}"));
        return;
    }
    let shown = |bound: f64| format!("{bound}");
    match (schema["minimum"].as_f64(), schema["maximum"].as_f64()) {
        (Some(min), Some(max)) if value < min || value > max => push(
            problems,
            path,
            format!("must be between {} and {}, got {number}", shown(min), shown(max)),
        ),
        (Some(min), None) if value < min => {
            push(problems, path, format!("must be >= {}, got {number}", shown(min)))
        }
        (None, Some(max)) if value > max => {
            push(problems, path, format!("must be <= {}, got {number}", shown(max)))
        }
        _ => {}
    }
}

fn has_type(value: &Value, kind: &str) -> bool {
    match kind {
        "object" => value.is_object(),
        "array" => value.is_array(),
        "string" => value.is_string(),
        "boolean" => value.is_boolean(),
        "integer" => value.is_i64() || value.is_u64(),
        "number" => value.is_number(),
        _ => true,
    }
}

/// What was expected, in serde's words.
fn expected(schema: &Value) -> &'static str {
    match schema["type"].as_str() {
        Some("object") => "a map",
        Some("array") => "a sequence",
        Some("string") => "a string",
        Some("boolean") => "a boolean",
        Some("integer") => "an integer",
        Some("number") => "a number",
        _ => "a value",
    }
}

/// What was found, in serde's words.
fn described(value: &Value) -> String {
    match value {
        Value::Null => "null".into(),
        Value::Bool(b) => format!("boolean `{b}`"),
        Value::Number(n) if n.is_f64() => format!("floating point `{n}`"),
        Value::Number(n) => format!("integer `{n}`"),
        Value::String(s) => format!("string {s:?}"),
        Value::Array(_) => "sequence".into(),
        Value::Object(_) => "map".into(),
    }
}

/// A scalar as the user wrote it (strings without quotes).
fn plain(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}
