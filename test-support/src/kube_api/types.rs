//! The resource types the emulator serves: the built-in ones the
//! controller, its manifests and kubectl touch, and CustomResourceDefinitions.

use serde_json::{json, Value};

/// One resource type, as discovery describes it.
#[derive(Debug, Clone)]
pub struct ResourceType {
    /// `""` for the core group.
    pub group: String,
    pub version: String,
    pub plural: String,
    pub singular: String,
    pub kind: String,
    pub namespaced: bool,
    pub short_names: Vec<String>,
    /// Has a `/status` subresource: the main resource ignores status writes.
    pub status: bool,
    /// Has a `/scale` subresource.
    pub scale: bool,
    /// A CRD's `additionalPrinterColumns`, for the Table form of lists.
    pub printer_columns: Vec<Value>,
    /// Fields a `fieldSelector` may name.
    pub selectable_fields: Vec<&'static str>,
}

impl ResourceType {
    fn builtin(group: &str, version: &str, plural: &str, kind: &str, namespaced: bool) -> Self {
        ResourceType {
            group: group.into(),
            version: version.into(),
            plural: plural.into(),
            singular: kind.to_lowercase(),
            kind: kind.into(),
            namespaced,
            short_names: vec![],
            status: false,
            scale: false,
            printer_columns: vec![],
            selectable_fields: vec!["metadata.name", "metadata.namespace"],
        }
    }

    fn short(mut self, names: &[&str]) -> Self {
        self.short_names = names.iter().map(|s| s.to_string()).collect();
        self
    }

    fn with_status(mut self) -> Self {
        self.status = true;
        self
    }

    fn with_scale(mut self) -> Self {
        self.scale = true;
        self
    }

    fn fields(mut self, fields: &[&'static str]) -> Self {
        self.selectable_fields.extend_from_slice(fields);
        self
    }

    /// `group/plural`: where objects of this type are kept.
    pub fn key(&self) -> String {
        format!("{}/{}", self.group, self.plural)
    }

    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// `deployments.apps`, as error messages name a resource.
    pub fn qualified(&self) -> String {
        if self.group.is_empty() {
            self.plural.clone()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }

    /// The types of a CustomResourceDefinition object (one per served version).
    pub fn from_crd(crd: &Value) -> Result<Vec<ResourceType>, String> {
        let spec = &crd["spec"];
        let names = &spec["names"];
        let field = |v: &Value, name: &str| {
            v[name]
                .as_str()
                .map(str::to_string)
                .ok_or_else(|| format!("spec.names.{name}: Required value"))
        };
        let group = spec["group"].as_str().ok_or("spec.group: Required value")?;
        let plural = field(names, "plural")?;
        let kind = field(names, "kind")?;
        let singular = names["singular"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| kind.to_lowercase());
        let short_names: Vec<String> = names["shortNames"]
            .as_array()
            .map(|a| a.iter().filter_map(|s| s.as_str().map(str::to_string)).collect())
            .unwrap_or_default();
        let namespaced = spec["scope"].as_str() != Some("Cluster");
        let versions = spec["versions"]
            .as_array()
            .ok_or("spec.versions: Required value")?;
        Ok(versions
            .iter()
            .filter(|v| v["served"].as_bool().unwrap_or(true))
            .map(|v| ResourceType {
                group: group.into(),
                version: v["name"].as_str().unwrap_or("v1").into(),
                plural: plural.clone(),
                singular: singular.clone(),
                kind: kind.clone(),
                namespaced,
                short_names: short_names.clone(),
                status: v["subresources"].get("status").is_some(),
                scale: v["subresources"].get("scale").is_some(),
                printer_columns: v["additionalPrinterColumns"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default(),
                selectable_fields: vec!["metadata.name", "metadata.namespace"],
            })
            .collect())
    }

    /// This type's entry (and its subresources') in an APIResourceList.
    pub fn discovery(&self) -> Vec<Value> {
        let verbs = json!([
            "create",
            "delete",
            "deletecollection",
            "get",
            "list",
            "patch",
            "update",
            "watch"
        ]);
        let mut entries = vec![json!({
            "name": self.plural,
            "singularName": self.singular,
            "namespaced": self.namespaced,
            "kind": self.kind,
            "verbs": verbs,
            "shortNames": self.short_names,
        })];
        if self.status {
            entries.push(json!({
                "name": format!("{}/status", self.plural),
                "singularName": "",
                "namespaced": self.namespaced,
                "kind": self.kind,
                "verbs": ["get", "patch", "update"],
            }));
        }
        if self.scale {
            entries.push(json!({
                "name": format!("{}/scale", self.plural),
                "singularName": "",
                "namespaced": self.namespaced,
                "group": "autoscaling",
                "version": "v1",
                "kind": "Scale",
                "verbs": ["get", "patch", "update"],
            }));
        }
        entries
    }
}

/// What a fresh server serves before any CRD is added.
pub fn builtin_types() -> Vec<ResourceType> {
    type R = ResourceType;
    vec![
        R::builtin("", "v1", "namespaces", "Namespace", false)
            .short(&["ns"])
            .with_status()
            .fields(&["status.phase"]),
        R::builtin("", "v1", "pods", "Pod", true)
            .short(&["po"])
            .with_status()
            .fields(&["spec.nodeName", "status.phase"]),
        R::builtin("", "v1", "events", "Event", true)
            .short(&["ev"])
            .fields(&[
                "involvedObject.kind",
                "involvedObject.namespace",
                "involvedObject.name",
                "involvedObject.uid",
                "involvedObject.apiVersion",
                "involvedObject.resourceVersion",
                "involvedObject.fieldPath",
                "reason",
                "reportingComponent",
                "source",
                "type",
            ]),
        R::builtin("", "v1", "serviceaccounts", "ServiceAccount", true).short(&["sa"]),
        R::builtin("", "v1", "services", "Service", true)
            .short(&["svc"])
            .with_status(),
        R::builtin("", "v1", "configmaps", "ConfigMap", true).short(&["cm"]),
        R::builtin("", "v1", "secrets", "Secret", true),
        R::builtin("apps", "v1", "deployments", "Deployment", true)
            .short(&["deploy"])
            .with_status()
            .with_scale(),
        R::builtin("apps", "v1", "statefulsets", "StatefulSet", true)
            .short(&["sts"])
            .with_status()
            .with_scale(),
        R::builtin("coordination.k8s.io", "v1", "leases", "Lease", true),
        R::builtin("rbac.authorization.k8s.io", "v1", "roles", "Role", true),
        R::builtin(
            "rbac.authorization.k8s.io",
            "v1",
            "rolebindings",
            "RoleBinding",
            true,
        ),
        R::builtin(
            "rbac.authorization.k8s.io",
            "v1",
            "clusterroles",
            "ClusterRole",
            false,
        ),
        R::builtin(
            "rbac.authorization.k8s.io",
            "v1",
            "clusterrolebindings",
            "ClusterRoleBinding",
            false,
        ),
        R::builtin(
            "apiextensions.k8s.io",
            "v1",
            "customresourcedefinitions",
            "CustomResourceDefinition",
            false,
        )
        .short(&["crd", "crds"])
        .with_status(),
    ]
}
