//! The checked-in manifests and the `controller` binary's file commands.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use controller::manifest;
use controller::spec;

fn repo_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(relative)
}

fn controller(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_controller"))
        .args(args)
        .output()
        .expect("controller runs")
}

#[test]
fn the_checked_in_crd_is_what_controller_crd_prints() {
    let generated = spec::crd_yaml().expect("the CRD renders");
    let checked_in = std::fs::read_to_string(repo_path("manifests/crd.yaml")).unwrap_or_default();
    assert!(
        checked_in == generated,
        "manifests/crd.yaml is out of date with the WorkerPool type; regenerate it with\n\
         \n    cargo run -p controller -- crd > manifests/crd.yaml\n"
    );
}

#[test]
fn controller_crd_prints_the_crd() {
    let output = controller(&["crd"]);
    assert!(output.status.success());
    assert_eq!(
        String::from_utf8(output.stdout).unwrap(),
        spec::crd_yaml().unwrap()
    );
}

#[test]
fn every_example_is_valid_and_uses_the_target_it_is_named_after() {
    for name in ["kubernetes", "fly", "local"] {
        let manifests = manifest::load(&repo_path(&format!("manifests/examples/{name}.yaml")));
        let errors: Vec<String> = manifests.errors.iter().map(ToString::to_string).collect();
        assert_eq!(errors, Vec::<String>::new(), "{name}.yaml");
        assert!(!manifests.pools.is_empty(), "{name}.yaml holds no pool");
        for loaded in &manifests.pools {
            assert_eq!(loaded.pool.spec.target.backend(), name, "{}", loaded.location);
        }
    }
}

#[test]
fn validate_lists_the_pools_of_a_valid_file_and_exits_0() {
    let file = repo_path("manifests/examples/local.yaml");
    let output = controller(&["validate", "-f", file.to_str().unwrap()]);
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert!(output.status.success(), "{stdout}");
    assert!(
        stdout.contains("WorkerPool text (local; text_generation; 0..4 replicas)"),
        "{stdout}"
    );
    assert!(stdout.ends_with("3 pool(s) valid, 0 problem(s)\n"), "{stdout}");
}

#[test]
fn validate_prints_every_problem_and_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pools.yaml");
    let good = std::fs::read_to_string(repo_path("manifests/examples/local.yaml")).unwrap();
    let bad = good
        .replace("maxReplicas: 4", "maxReplicas: 0")
        .replace("name: pdf", "name: PDF");
    std::fs::write(&file, bad).unwrap();

    let output = controller(&["validate", "--filename", file.to_str().unwrap()]);
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert_eq!(output.status.code(), Some(1), "{stdout}");
    let errors: Vec<&str> = stdout.lines().filter(|l| l.starts_with("error: ")).collect();
    assert_eq!(errors.len(), 2, "{stdout}");
    assert!(
        errors[0].ends_with("(document 1, text): spec.maxReplicas: must be >= 1"),
        "{stdout}"
    );
    assert!(errors[1].contains("(document 2, PDF): metadata.name"), "{stdout}");
    assert!(
        stdout.contains("WorkerPool audio"),
        "the valid pool still loads: {stdout}"
    );
}

/// `kubectl explain workerpool.spec...` prints each field's description:
/// every property of the spec in the CRD's schema must have one.
#[test]
fn every_spec_field_has_a_description_for_kubectl_explain() {
    fn walk(path: &str, schema: &serde_json::Value, missing: &mut Vec<String>) {
        if let Some(properties) = schema["properties"].as_object() {
            for (name, property) in properties {
                let path = format!("{path}.{name}");
                if property["description"]
                    .as_str()
                    .is_none_or(|d| d.trim().is_empty())
                {
                    missing.push(path.clone());
                }
                walk(&path, property, missing);
            }
        }
        if schema["items"].is_object() {
            walk(&format!("{path}[]"), &schema["items"], missing);
        }
    }
    let crd = serde_json::to_value(<spec::WorkerPool as kube::CustomResourceExt>::crd()).unwrap();
    let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
    let mut missing = Vec::new();
    walk("spec", &schema["properties"]["spec"], &mut missing);
    assert_eq!(missing, Vec::<String>::new(), "fields without a description");
}
