//! The workspace states its lints and its minimum Rust version once, every
//! member inherits both, the README says the same version, and it is the
//! version the locked dependencies need (clippy's `incompatible_msrv`
//! checks our own code against it in `make lint`).

use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn manifest(path: &Path) -> toml::Table {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    toml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn version(text: &str) -> Vec<u64> {
    text.split('.').map(|part| part.parse().unwrap()).collect()
}

#[test]
fn lints_and_the_minimum_rust_version_are_stated_once_and_inherited() {
    let workspace = manifest(&root().join("Cargo.toml"));
    let rust_version = workspace["workspace"]["package"]["rust-version"]
        .as_str()
        .expect("workspace.package.rust-version");
    let lints = workspace["workspace"]["lints"]
        .as_table()
        .expect("[workspace.lints]");
    assert!(lints.contains_key("rust") && lints.contains_key("clippy"));

    let members = workspace["workspace"]["members"].as_array().unwrap();
    assert!(!members.is_empty());
    for member in members {
        let member = member.as_str().unwrap();
        let package = manifest(&root().join(member).join("Cargo.toml"));
        assert_eq!(
            package["package"]["rust-version"]["workspace"].as_bool(),
            Some(true),
            "{member}: rust-version.workspace = true, no version of its own"
        );
        assert_eq!(
            package
                .get("lints")
                .and_then(|l| l.get("workspace"))
                .and_then(toml::Value::as_bool),
            Some(true),
            "{member}: [lints] workspace = true"
        );
    }

    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    assert!(
        readme.contains(&format!("Rust toolchain ({rust_version}+)")),
        "the README's prerequisites say Rust {rust_version}+"
    );
}

/// The highest `rust-version` among the locked registry packages whose
/// sources cargo has unpacked (all of them, once the workspace has built).
fn highest_dependency_rust_version() -> Option<(Vec<u64>, String)> {
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| Path::new(&home).join(".cargo")))?;
    let registries: Vec<PathBuf> = std::fs::read_dir(cargo_home.join("registry/src"))
        .ok()?
        .flatten()
        .map(|e| e.path())
        .collect();
    let lock = manifest(&root().join("Cargo.lock"));
    let mut highest: Option<(Vec<u64>, String)> = None;
    for package in lock["package"].as_array().unwrap() {
        if package.get("source").is_none() {
            continue; // a workspace member
        }
        let id = format!(
            "{}-{}",
            package["name"].as_str().unwrap(),
            package["version"].as_str().unwrap()
        );
        let Some(path) = registries
            .iter()
            .map(|r| r.join(&id).join("Cargo.toml"))
            .find(|p| p.exists())
        else {
            continue;
        };
        let found = manifest(&path);
        let Some(required) = found["package"].get("rust-version").and_then(toml::Value::as_str) else {
            continue;
        };
        let required = version(required);
        if highest.as_ref().is_none_or(|(v, _)| required > *v) {
            highest = Some((required, id));
        }
    }
    highest
}

#[test]
fn the_minimum_rust_version_is_what_the_dependencies_need() {
    let workspace = manifest(&root().join("Cargo.toml"));
    let stated = version(
        workspace["workspace"]["package"]["rust-version"]
            .as_str()
            .unwrap(),
    );
    let (needed, by) = highest_dependency_rust_version().expect("the registry sources cargo unpacked");
    assert_eq!(
        stated, needed,
        "rust-version {stated:?}, while {by} needs {needed:?}: state what the build needs"
    );
}
