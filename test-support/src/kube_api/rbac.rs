//! Authentication by bearer token and RBAC authorization, as the API server
//! does them: a token maps to a user (a service account's is
//! `system:serviceaccount:NAMESPACE:NAME`, in the groups
//! `system:serviceaccounts`, `system:serviceaccounts:NAMESPACE` and
//! `system:authenticated`); a resource request is allowed when a rule of a
//! Role bound in its namespace, or of a ClusterRole bound by a RoleBinding
//! there or by a ClusterRoleBinding, matches its API group, resource (with
//! subresource), verb and name. Roles and bindings are the objects stored in
//! the emulator, so a test loads them as an operator would apply them.
//! Discovery (`/api`, `/apis`, `/version`, ...) is open to every
//! authenticated user, as the `system:discovery` ClusterRole makes it.
//! Requests without a token are the cluster administrator's (the tests'
//! own setup and kubectl).

use axum::http::Method;
use serde_json::{json, Value};

use super::{ApiError, State};

/// Who made a request.
#[derive(Debug, Clone)]
pub struct UserInfo {
    pub name: String,
    pub groups: Vec<String>,
}

impl UserInfo {
    pub fn service_account(namespace: &str, name: &str) -> Self {
        UserInfo {
            name: format!("system:serviceaccount:{namespace}:{name}"),
            groups: vec![
                "system:serviceaccounts".into(),
                format!("system:serviceaccounts:{namespace}"),
                "system:authenticated".into(),
            ],
        }
    }
}

/// What RBAC authorizes: a resource request's attributes.
#[derive(Debug, PartialEq, Eq)]
pub struct ResourceAttributes {
    pub verb: &'static str,
    pub group: String,
    pub resource: String,
    pub subresource: String,
    pub namespace: String,
    pub name: String,
}

/// The attributes of a request, or `None` for a non-resource request
/// (discovery, `/version`, `/openapi`).
pub fn attributes(method: &Method, path: &str, is_watch: bool) -> Option<ResourceAttributes> {
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let (group, rest) = match segments.as_slice() {
        ["api", "v1", rest @ ..] if !rest.is_empty() => ("", rest),
        ["apis", group, _version, rest @ ..] if !rest.is_empty() => (*group, rest),
        _ => return None,
    };
    let (namespace, rest): (&str, &[&str]) = match rest {
        // A Namespace object: RBAC sees its name as the namespace too.
        ["namespaces", ns] | ["namespaces", ns, "status" | "finalize"] if group.is_empty() => (*ns, rest),
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (*ns, rest),
        _ => ("", rest),
    };
    let (resource, name, subresource) = match rest {
        [resource] => (*resource, "", ""),
        [resource, name] => (*resource, *name, ""),
        [resource, name, sub] => (*resource, *name, *sub),
        _ => return None,
    };
    let verb = match (method.as_str(), name.is_empty()) {
        ("GET" | "HEAD", true) if is_watch => "watch",
        ("GET" | "HEAD", true) => "list",
        ("GET" | "HEAD", false) if is_watch => "watch",
        ("GET" | "HEAD", false) => "get",
        ("POST", _) => "create",
        ("PUT", _) => "update",
        ("PATCH", _) => "patch",
        ("DELETE", true) => "deletecollection",
        ("DELETE", false) => "delete",
        _ => "unknown",
    };
    Some(ResourceAttributes {
        verb,
        group: group.to_string(),
        resource: resource.to_string(),
        subresource: subresource.to_string(),
        namespace: namespace.to_string(),
        name: name.to_string(),
    })
}

fn contains(list: &Value, wanted: &str) -> bool {
    list.as_array()
        .into_iter()
        .flatten()
        .any(|v| v.as_str().is_some_and(|s| s == wanted || s == "*"))
}

/// Whether one PolicyRule allows the request (RBAC's `RuleAllows`).
fn rule_allows(rule: &Value, request: &ResourceAttributes) -> bool {
    let combined = if request.subresource.is_empty() {
        request.resource.clone()
    } else {
        format!("{}/{}", request.resource, request.subresource)
    };
    let resource_matches = rule["resources"].as_array().into_iter().flatten().any(|r| {
        let r = r.as_str().unwrap_or_default();
        r == "*"
            || r == combined
            || (!request.subresource.is_empty() && r == format!("*/{}", request.subresource))
    });
    let names = rule["resourceNames"].as_array().map(Vec::as_slice).unwrap_or(&[]);
    let name_matches =
        names.is_empty() || (!request.name.is_empty() && names.iter().any(|n| n == request.name.as_str()));
    contains(&rule["verbs"], request.verb)
        && contains(&rule["apiGroups"], &request.group)
        && resource_matches
        && name_matches
}

fn subject_matches(subject: &Value, user: &UserInfo, binding_namespace: &str) -> bool {
    let name = subject["name"].as_str().unwrap_or_default();
    match subject["kind"].as_str() {
        Some("ServiceAccount") => {
            let namespace = subject["namespace"].as_str().unwrap_or(binding_namespace);
            user.name == format!("system:serviceaccount:{namespace}:{name}")
        }
        Some("User") => user.name == name,
        Some("Group") => user.groups.iter().any(|g| g == name),
        _ => false,
    }
}

impl State {
    fn objects_of(&self, plural: &str) -> Vec<&Value> {
        self.objects
            .get(&format!("rbac.authorization.k8s.io/{plural}"))
            .map(|o| o.values().collect())
            .unwrap_or_default()
    }

    fn rules_of(&self, role_ref: &Value, binding_namespace: &str) -> Vec<Value> {
        let name = role_ref["name"].as_str().unwrap_or_default();
        let role = match role_ref["kind"].as_str() {
            Some("Role") => self
                .objects_of("roles")
                .into_iter()
                .find(|r| r["metadata"]["name"] == name && r["metadata"]["namespace"] == binding_namespace),
            Some("ClusterRole") => self
                .objects_of("clusterroles")
                .into_iter()
                .find(|r| r["metadata"]["name"] == name),
            _ => None,
        };
        role.and_then(|r| r["rules"].as_array().cloned())
            .unwrap_or_default()
    }

    /// Whether RBAC allows `user` this request.
    pub(super) fn authorize(&self, user: &UserInfo, request: &ResourceAttributes) -> bool {
        let cluster = self
            .objects_of("clusterrolebindings")
            .into_iter()
            .map(|b| (b, ""));
        let namespaced = self
            .objects_of("rolebindings")
            .into_iter()
            .filter(|b| {
                !request.namespace.is_empty() && b["metadata"]["namespace"] == request.namespace.as_str()
            })
            .map(|b| (b, request.namespace.as_str()));
        cluster.chain(namespaced).any(|(binding, namespace)| {
            binding["subjects"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|s| subject_matches(s, user, namespace))
                && self
                    .rules_of(&binding["roleRef"], namespace)
                    .iter()
                    .any(|rule| rule_allows(rule, request))
        })
    }
}

/// `403 Forbidden`, worded as the API server words it.
pub fn forbidden(user: &UserInfo, request: &ResourceAttributes) -> ApiError {
    let resource = if request.subresource.is_empty() {
        request.resource.clone()
    } else {
        format!("{}/{}", request.resource, request.subresource)
    };
    let scope = if request.namespace.is_empty() {
        "at the cluster scope".to_string()
    } else {
        format!("in the namespace \"{}\"", request.namespace)
    };
    let reason = format!(
        "User \"{}\" cannot {} resource \"{resource}\" in API group \"{}\" {scope}",
        user.name, request.verb, request.group
    );
    let qualified = if request.group.is_empty() {
        request.resource.clone()
    } else {
        format!("{}.{}", request.resource, request.group)
    };
    let message = if request.name.is_empty() {
        format!("{qualified} is forbidden: {reason}")
    } else {
        format!("{qualified} \"{}\" is forbidden: {reason}", request.name)
    };
    let mut details = json!({"group": request.group, "kind": request.resource});
    if !request.name.is_empty() {
        details["name"] = json!(request.name);
    }
    ApiError {
        details,
        ..ApiError::new(403, "Forbidden", message)
    }
}

/// `401 Unauthorized`: a token the server does not know.
pub fn unauthorized() -> ApiError {
    ApiError::new(401, "Unauthorized", "Unauthorized")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_become_rbac_attributes() {
        let a = |m: Method, p: &str, w: bool| attributes(&m, p, w).unwrap();
        let scale = a(
            Method::PATCH,
            "/apis/apps/v1/namespaces/ns/deployments/w/scale",
            false,
        );
        assert_eq!(
            (
                scale.verb,
                scale.group.as_str(),
                scale.resource.as_str(),
                scale.subresource.as_str()
            ),
            ("patch", "apps", "deployments", "scale")
        );
        assert_eq!((scale.namespace.as_str(), scale.name.as_str()), ("ns", "w"));
        assert_eq!(a(Method::GET, "/api/v1/namespaces/ns/pods", false).verb, "list");
        assert_eq!(a(Method::GET, "/api/v1/namespaces/ns/pods", true).verb, "watch");
        let all = a(Method::GET, "/apis/backlog.dev/v1alpha1/workerpools", true);
        assert_eq!((all.namespace.as_str(), all.verb), ("", "watch"));
        let namespace = a(Method::GET, "/api/v1/namespaces/ns", false);
        assert_eq!(
            (
                namespace.resource.as_str(),
                namespace.name.as_str(),
                namespace.namespace.as_str()
            ),
            ("namespaces", "ns", "ns")
        );
        assert!(attributes(&Method::GET, "/apis/apps/v1", false).is_none());
        assert!(attributes(&Method::GET, "/version", false).is_none());
    }

    #[test]
    fn resource_names_limit_named_requests_only() {
        let rule = json!({"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
            "resourceNames": ["mine"], "verbs": ["get", "update", "create"]});
        let request = |verb, name: &str| ResourceAttributes {
            verb,
            group: "coordination.k8s.io".into(),
            resource: "leases".into(),
            subresource: String::new(),
            namespace: "ns".into(),
            name: name.into(),
        };
        assert!(rule_allows(&rule, &request("get", "mine")));
        assert!(!rule_allows(&rule, &request("get", "other")));
        assert!(
            !rule_allows(&rule, &request("create", "")),
            "a create has no name to match"
        );
    }

    #[test]
    fn a_subresource_needs_its_own_rule() {
        let rule = json!({"apiGroups": ["apps"], "resources": ["deployments"], "verbs": ["get", "patch"]});
        let scale = ResourceAttributes {
            verb: "patch",
            group: "apps".into(),
            resource: "deployments".into(),
            subresource: "scale".into(),
            namespace: "ns".into(),
            name: "w".into(),
        };
        assert!(!rule_allows(&rule, &scale));
        let wildcard = json!({"apiGroups": ["apps"], "resources": ["*/scale"], "verbs": ["patch"]});
        assert!(rule_allows(&wildcard, &scale));
    }
}
