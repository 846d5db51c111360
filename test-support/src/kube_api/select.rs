//! Label and field selectors, JSON patches and the JSONPath subset of
//! printer columns: the parts of the API server's request handling that are
//! pure functions of JSON.

use serde_json::{Map, Value};

/// One requirement of a label selector (`app=worker`, `tier in (a,b)`, `!x`).
#[derive(Debug, Clone, PartialEq)]
enum Requirement {
    Equals(String, String),
    NotEquals(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

/// A parsed `labelSelector`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LabelSelector(Vec<Requirement>);

/// Split at commas outside parentheses.
fn split_top(text: &str) -> Vec<&str> {
    let (mut parts, mut depth, mut start) = (Vec::new(), 0i32, 0);
    for (i, c) in text.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&text[start..]);
    parts
        .into_iter()
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .collect()
}

fn valid_key(key: &str) -> bool {
    !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))
}

impl LabelSelector {
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut requirements = Vec::new();
        for part in split_top(text) {
            let set = |rest: &str| -> Result<Vec<String>, String> {
                let inner = rest
                    .trim()
                    .strip_prefix('(')
                    .and_then(|r| r.strip_suffix(')'))
                    .ok_or_else(|| format!("unable to parse requirement: {part:?}: expected a (set)"))?;
                Ok(inner.split(',').map(|v| v.trim().to_string()).collect())
            };
            let requirement = if let Some((key, values)) = part.split_once(" notin ") {
                Requirement::NotIn(key.trim().into(), set(values)?)
            } else if let Some((key, values)) = part.split_once(" in ") {
                Requirement::In(key.trim().into(), set(values)?)
            } else if let Some((key, value)) = part.split_once("!=") {
                Requirement::NotEquals(key.trim().into(), value.trim().into())
            } else if let Some((key, value)) = part.split_once("==").or_else(|| part.split_once('=')) {
                Requirement::Equals(key.trim().into(), value.trim().into())
            } else if let Some(key) = part.strip_prefix('!') {
                Requirement::NotExists(key.trim().into())
            } else {
                Requirement::Exists(part.into())
            };
            let key = match &requirement {
                Requirement::Equals(k, _)
                | Requirement::NotEquals(k, _)
                | Requirement::In(k, _)
                | Requirement::NotIn(k, _)
                | Requirement::Exists(k)
                | Requirement::NotExists(k) => k,
            };
            if !valid_key(key) {
                return Err(format!("unable to parse requirement: invalid label key {key:?}"));
            }
            requirements.push(requirement);
        }
        Ok(LabelSelector(requirements))
    }

    pub fn matches(&self, labels: Option<&Map<String, Value>>) -> bool {
        let get = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
        self.0.iter().all(|r| match r {
            Requirement::Equals(k, v) => get(k) == Some(v.as_str()),
            Requirement::NotEquals(k, v) => get(k) != Some(v.as_str()),
            Requirement::In(k, vs) => get(k).is_some_and(|x| vs.iter().any(|v| v == x)),
            Requirement::NotIn(k, vs) => !get(k).is_some_and(|x| vs.iter().any(|v| v == x)),
            Requirement::Exists(k) => get(k).is_some(),
            Requirement::NotExists(k) => get(k).is_none(),
        })
    }
}

/// A parsed `fieldSelector`: `path=value` / `path!=value` terms.
#[derive(Debug, Clone, Default)]
pub struct FieldSelector(Vec<(String, bool, String)>);

impl FieldSelector {
    /// `supported` lists the field paths this resource can be selected by,
    /// as the real server allows only some per resource.
    pub fn parse(text: &str, supported: &[&str]) -> Result<Self, String> {
        let mut terms = Vec::new();
        for part in split_top(text) {
            let (path, equal, value) = if let Some((p, v)) = part.split_once("!=") {
                (p, false, v)
            } else if let Some((p, v)) = part.split_once("==").or_else(|| part.split_once('=')) {
                (p, true, v)
            } else {
                return Err(format!("invalid selector: '{part}'; can't understand '{part}'"));
            };
            let path = path.trim();
            if !supported.contains(&path) {
                return Err(format!("field label not supported: {path}"));
            }
            terms.push((path.to_string(), equal, value.trim().to_string()));
        }
        Ok(FieldSelector(terms))
    }

    pub fn matches(&self, object: &Value) -> bool {
        self.0.iter().all(|(path, equal, value)| {
            let mut at = object;
            for segment in path.split('.') {
                at = at.get(segment).unwrap_or(&Value::Null);
            }
            let found = match at {
                Value::String(s) => s.clone(),
                Value::Null => String::new(),
                other => other.to_string(),
            };
            (found == *value) == *equal
        })
    }
}

/// RFC 7386 JSON merge patch.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let target = target.as_object_mut().expect("made an object above");
    for (key, value) in patch {
        if value.is_null() {
            target.remove(key);
        } else {
            merge_patch(target.entry(key.clone()).or_insert(Value::Null), value);
        }
    }
}

fn pointer_segments(path: &str) -> Result<Vec<String>, String> {
    if path.is_empty() {
        return Ok(vec![]);
    }
    let rest = path
        .strip_prefix('/')
        .ok_or_else(|| format!("invalid JSON pointer {path:?}"))?;
    Ok(rest
        .split('/')
        .map(|s| s.replace("~1", "/").replace("~0", "~"))
        .collect())
}

/// RFC 6902 JSON patch: add, remove, replace, test.
pub fn json_patch(target: &mut Value, ops: &Value) -> Result<(), String> {
    let ops = ops
        .as_array()
        .ok_or("a JSON patch must be an array of operations")?;
    for op in ops {
        let kind = op["op"].as_str().ok_or("an operation needs \"op\"")?;
        let path = op["path"].as_str().ok_or("an operation needs \"path\"")?;
        let mut segments = pointer_segments(path)?;
        let last = segments.pop().ok_or("the root cannot be patched")?;
        let mut parent = &mut *target;
        for segment in &segments {
            parent = match parent {
                Value::Object(m) => m.get_mut(segment),
                Value::Array(a) => segment.parse::<usize>().ok().and_then(|i| a.get_mut(i)),
                _ => None,
            }
            .ok_or_else(|| format!("path {path:?} does not exist"))?;
        }
        match (kind, parent) {
            ("add" | "replace", Value::Object(m)) => {
                if kind == "replace" && !m.contains_key(&last) {
                    return Err(format!("replace: path {path:?} does not exist"));
                }
                m.insert(last, op["value"].clone());
            }
            ("add", Value::Array(a)) if last == "-" => a.push(op["value"].clone()),
            ("add" | "replace", Value::Array(a)) => {
                let i: usize = last.parse().map_err(|_| format!("bad index in {path:?}"))?;
                if kind == "add" && i <= a.len() {
                    a.insert(i, op["value"].clone());
                } else if kind == "replace" && i < a.len() {
                    a[i] = op["value"].clone();
                } else {
                    return Err(format!("index out of range in {path:?}"));
                }
            }
            ("remove", Value::Object(m)) => {
                m.remove(&last)
                    .ok_or_else(|| format!("remove: path {path:?} does not exist"))?;
            }
            ("remove", Value::Array(a)) => {
                let i: usize = last.parse().map_err(|_| format!("bad index in {path:?}"))?;
                if i >= a.len() {
                    return Err(format!("remove: index out of range in {path:?}"));
                }
                a.remove(i);
            }
            ("test", parent) => {
                let found = match parent {
                    Value::Object(m) => m.get(&last),
                    Value::Array(a) => last.parse::<usize>().ok().and_then(|i| a.get(i)),
                    _ => None,
                };
                if found != Some(&op["value"]) {
                    return Err(format!("test failed at {path:?}"));
                }
            }
            (other, _) => return Err(format!("unsupported operation {other:?} at {path:?}")),
        }
    }
    Ok(())
}

/// The JSONPath subset of `additionalPrinterColumns`: `.a.b`, `[0]` and
/// `[?(@.field=="value")]`. The first result, if any.
pub fn json_path<'a>(object: &'a Value, path: &str) -> Option<&'a Value> {
    let mut at = object;
    let mut rest = path.trim().trim_start_matches('{').trim_end_matches('}');
    while !rest.is_empty() {
        if let Some(r) = rest.strip_prefix("[?(@.") {
            let (filter, after) = r.split_once(")]")?;
            let (field, value) = filter.split_once("==")?;
            let value = value.trim().trim_matches('"').trim_matches('\'');
            at = at
                .as_array()?
                .iter()
                .find(|item| item.get(field.trim()).and_then(Value::as_str) == Some(value))?;
            rest = after;
        } else if let Some(r) = rest.strip_prefix('[') {
            let (index, after) = r.split_once(']')?;
            at = at.as_array()?.get(index.trim().parse::<usize>().ok()?)?;
            rest = after;
        } else if let Some(r) = rest.strip_prefix('.') {
            let end = r.find(['.', '[']).unwrap_or(r.len());
            at = at.get(&r[..end])?;
            rest = &r[end..];
        } else {
            return None;
        }
    }
    Some(at)
}

/// Kubernetes' `duration.HumanDuration`, as `kubectl get` shows ages.
pub fn human_duration(seconds: i64) -> String {
    if seconds < -1 {
        return "<invalid>".into();
    }
    let s = seconds.max(0);
    let (m, h, d) = (s / 60, s / 3600, s / 86400);
    let y = d / 365;
    if s < 120 {
        format!("{s}s")
    } else if m < 10 {
        match s % 60 {
            0 => format!("{m}m"),
            r => format!("{m}m{r}s"),
        }
    } else if m < 180 {
        format!("{m}m")
    } else if h < 8 {
        match m % 60 {
            0 => format!("{h}h"),
            r => format!("{h}h{r}m"),
        }
    } else if h < 48 {
        format!("{h}h")
    } else if h < 24 * 8 {
        match h % 24 {
            0 => format!("{d}d"),
            r => format!("{d}d{r}h"),
        }
    } else if d < 365 * 2 {
        format!("{d}d")
    } else if d < 365 * 8 {
        match d % 365 {
            0 => format!("{y}y"),
            r => format!("{y}y{r}d"),
        }
    } else {
        format!("{y}y")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn label_selectors_match_equality_sets_and_existence() {
        let labels = json!({"app": "worker", "tier": "text"});
        let labels = labels.as_object();
        let yes = |s: &str| LabelSelector::parse(s).unwrap().matches(labels);
        assert!(yes("app=worker,tier in (text, pdf)"));
        assert!(yes("app==worker,!missing,tier"));
        assert!(!yes("app=worker,tier notin (text)"));
        assert!(!yes("app!=worker"));
        assert!(LabelSelector::parse("bad key=1").is_err());
    }

    #[test]
    fn field_selectors_reject_unsupported_fields() {
        let event = json!({"involvedObject": {"name": "text", "kind": "WorkerPool"}});
        let supported = ["involvedObject.name", "involvedObject.kind"];
        let s = FieldSelector::parse(
            "involvedObject.name=text,involvedObject.kind=WorkerPool",
            &supported,
        );
        assert!(s.unwrap().matches(&event));
        assert!(!FieldSelector::parse("involvedObject.name!=text", &supported)
            .unwrap()
            .matches(&event));
        assert_eq!(
            FieldSelector::parse("spec.x=1", &supported).unwrap_err(),
            "field label not supported: spec.x"
        );
    }

    #[test]
    fn patches_follow_their_rfcs() {
        let mut doc = json!({"a": {"b": 1, "c": 2}, "l": [1, 2]});
        merge_patch(&mut doc, &json!({"a": {"b": null, "d": 3}}));
        assert_eq!(doc, json!({"a": {"c": 2, "d": 3}, "l": [1, 2]}));
        json_patch(
            &mut doc,
            &json!([{"op": "replace", "path": "/a/c", "value": 5}, {"op": "add", "path": "/l/-", "value": 3}]),
        )
        .unwrap();
        assert_eq!(doc, json!({"a": {"c": 5, "d": 3}, "l": [1, 2, 3]}));
        assert!(json_patch(&mut doc, &json!([{"op": "replace", "path": "/x", "value": 1}])).is_err());
    }

    #[test]
    fn json_path_filters_conditions_by_type() {
        let pool = json!({"status": {"conditions": [{"type": "Ready", "status": "True"}, {"type": "Active", "status": "False"}]}});
        assert_eq!(
            json_path(&pool, ".status.conditions[?(@.type==\"Active\")].status"),
            Some(&json!("False"))
        );
        assert_eq!(
            json_path(&pool, ".status.conditions[0].type"),
            Some(&json!("Ready"))
        );
        assert_eq!(json_path(&pool, ".status.missing"), None);
    }

    #[test]
    fn ages_read_like_kubectl() {
        assert_eq!(human_duration(5), "5s");
        assert_eq!(human_duration(125), "2m5s");
        assert_eq!(human_duration(3 * 3600 + 60), "3h1m");
        assert_eq!(human_duration(3 * 86400), "3d");
    }
}
