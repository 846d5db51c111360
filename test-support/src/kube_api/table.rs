//! The Table form of objects (`Accept: application/json;as=Table;v=v1;g=meta.k8s.io`),
//! as `kubectl get` asks for it: a Name column, then a CRD's
//! `additionalPrinterColumns` (or Age for types without any).

use serde_json::{json, Value};

use super::select::{human_duration, json_path};
use super::ResourceType;

fn columns(rt: &ResourceType) -> Vec<Value> {
    let name = json!({"name": "Name", "type": "string", "format": "name", "priority": 0,
        "description": "Name must be unique within a namespace. More info: https://kubernetes.io/docs/concepts/overview/working-with-objects/names#names"});
    let mut columns = vec![name];
    if rt.printer_columns.is_empty() {
        columns.push(json!({"name": "Age", "type": "date", "format": "", "priority": 0,
            "description": "CreationTimestamp is a timestamp representing the server time when this object was created."}));
    } else {
        for c in &rt.printer_columns {
            columns.push(json!({
                "name": c["name"], "type": c["type"], "format": c["format"].as_str().unwrap_or(""),
                "description": c["description"].as_str().unwrap_or(""),
                "priority": c["priority"].as_i64().unwrap_or(0),
            }));
        }
    }
    columns
}

fn age(timestamp: &Value) -> Value {
    match timestamp
        .as_str()
        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
    {
        Some(t) => json!(human_duration(
            (chrono::Utc::now() - t.with_timezone(&chrono::Utc)).num_seconds()
        )),
        None => json!("<unknown>"),
    }
}

fn cell(object: &Value, column: &Value) -> Value {
    let Some(value) = json_path(object, column["jsonPath"].as_str().unwrap_or("")) else {
        return Value::Null;
    };
    match column["type"].as_str() {
        Some("date") => age(value),
        Some("string") => match value {
            Value::String(s) => json!(s),
            other => json!(other.to_string()),
        },
        _ => value.clone(),
    }
}

fn row(rt: &ResourceType, object: &Value) -> Value {
    let mut cells = vec![object["metadata"]["name"].clone()];
    if rt.printer_columns.is_empty() {
        cells.push(age(&object["metadata"]["creationTimestamp"]));
    } else {
        cells.extend(rt.printer_columns.iter().map(|c| cell(object, c)));
    }
    let mut metadata = object["metadata"].clone();
    if let Some(m) = metadata.as_object_mut() {
        m.remove("managedFields");
    }
    json!({
        "cells": cells,
        "object": {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": metadata},
    })
}

pub fn list_table(rt: &ResourceType, list: &Value) -> Value {
    let rows: Vec<Value> = list["items"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|o| row(rt, o))
        .collect();
    json!({
        "kind": "Table", "apiVersion": "meta.k8s.io/v1",
        "metadata": {"resourceVersion": list["metadata"]["resourceVersion"]},
        "columnDefinitions": columns(rt), "rows": rows,
    })
}

pub fn object_table(rt: &ResourceType, object: &Value) -> Value {
    json!({
        "kind": "Table", "apiVersion": "meta.k8s.io/v1",
        "metadata": {"resourceVersion": object["metadata"]["resourceVersion"]},
        "columnDefinitions": columns(rt), "rows": [row(rt, object)],
    })
}
