use std::fs;

use queue::TaskType;

use super::*;
use crate::spec::Target;

const TEXT_POOL: &str = "\
apiVersion: backlog.dev/v1alpha1
kind: WorkerPool
metadata:
  name: text
spec:
  taskTypes: [text_generation, pdf_generation]
  target:
    local:
      command: [text-worker]
  maxReplicas: 4
";

const AUDIO_POOL: &str = "\
apiVersion: backlog.dev/v1alpha1
kind: WorkerPool
metadata:
  name: audio
spec:
  taskTypes: [audio_generation]
  target:
    fly: {app: backlog, processGroup: audiobook-worker}
  maxReplicas: 2
";

fn parse(text: &str) -> Manifests {
    let mut manifests = Manifests::default();
    manifests.add_file(Path::new("pools.yaml"), text);
    manifests
}

fn messages(manifests: &Manifests) -> Vec<String> {
    manifests.errors.iter().map(ToString::to_string).collect()
}

fn names(manifests: &Manifests) -> Vec<&str> {
    manifests.pools.iter().map(LoadedPool::name).collect()
}

/// The text pool with `field: value` added under `spec:`.
fn text_pool_with(spec_line: &str) -> String {
    TEXT_POOL.replace("spec:\n", &format!("spec:\n  {spec_line}\n"))
}

#[test]
fn documents_of_one_file_load_with_their_defaults() {
    let manifests = parse(&format!("---\n{TEXT_POOL}---\n{AUDIO_POOL}"));
    assert_eq!(messages(&manifests), Vec::<String>::new());
    assert_eq!(names(&manifests), ["text", "audio"]);

    let text = &manifests.pools[0];
    assert_eq!((text.location.line, text.location.document), (2, 1));
    let spec = &text.pool.spec;
    assert_eq!(
        spec.task_types,
        [TaskType::TextGeneration, TaskType::PdfGeneration]
    );
    assert_eq!(
        (
            spec.min_replicas,
            spec.tasks_per_replica,
            spec.activation_tasks,
            spec.cooldown_period
        ),
        (0, 1, 1, 120)
    );
    assert!(!spec.paused && spec.fallback.is_none() && spec.target_queue_seconds.is_none());
    assert!(matches!(manifests.pools[1].pool.spec.target, Target::Fly(_)));
    assert_eq!(manifests.pools[1].location.line, 13);
}

#[test]
fn empty_and_comment_only_documents_are_skipped_and_not_counted() {
    let manifests = parse(&format!("# pools\n---\n---\n# nothing here\n---\n{AUDIO_POOL}"));
    assert_eq!(names(&manifests), ["audio"]);
    assert_eq!(manifests.pools[0].location.document, 1);
    assert_eq!(manifests.pools[0].location.line, 6);
}

#[test]
fn an_unknown_spec_field_is_named_with_its_path() {
    let manifests = parse(&text_pool_with("maxReplica: 3"));
    let errors = messages(&manifests);
    assert_eq!(errors.len(), 1);
    assert!(
        errors[0].starts_with(
            "pools.yaml:1 (document 1, text): spec.maxReplica: unknown field `maxReplica`, expected one of"
        ),
        "{}",
        errors[0]
    );
    assert!(manifests.pools.is_empty());
}

#[test]
fn a_field_renamed_to_the_hpa_or_keda_name_says_its_new_name() {
    let manifests = parse(&text_pool_with(
        "cooldownSeconds: 60\n  scaleDown: {stabilizationSeconds: 30}",
    ));
    let errors = messages(&manifests);
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert!(
        errors[0].contains("spec.cooldownSeconds: unknown field `cooldownSeconds` (renamed `cooldownPeriod`"),
        "{errors:?}"
    );
    assert!(
        errors[1].contains(
            "spec.scaleDown.stabilizationSeconds: unknown field `stabilizationSeconds` \
             (renamed `stabilizationWindowSeconds`"
        ),
        "{errors:?}"
    );
}

/// A renamed field hides no other problem: the spec's own rules still run
/// over the fields it knows (they waited for the rename to be fixed).
#[test]
fn an_unknown_field_and_a_broken_rule_are_both_reported() {
    let manifests = parse(&text_pool_with("cooldownSeconds: 30\n  minReplicas: 5"));
    let errors = messages(&manifests);
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert!(
        errors[0].contains("spec.cooldownSeconds: unknown field"),
        "{errors:?}"
    );
    assert!(
        errors[1].contains("spec.maxReplicas: must be >= minReplicas (5)"),
        "{errors:?}"
    );
    // A field of the wrong type is not read as its default for the rules.
    let manifests = parse(&text_pool_with("minReplicas: many\n  cooldownSeconds: 30"));
    assert_eq!(messages(&manifests).len(), 2, "{:?}", messages(&manifests));
}

#[test]
fn an_unknown_nested_field_is_named_with_its_path() {
    let manifests = parse(&text_pool_with("scaleUp: {windowSeconds: 30}"));
    let errors = messages(&manifests);
    assert!(
        errors[0].starts_with(
            "pools.yaml:1 (document 1, text): spec.scaleUp.windowSeconds: unknown field `windowSeconds`"
        ),
        "{errors:?}"
    );
}

#[test]
fn an_unknown_top_level_field_is_named() {
    let manifests = parse(&format!("{TEXT_POOL}extra: true\n"));
    assert_eq!(
        messages(&manifests),
        ["pools.yaml:1 (document 1, text): extra: unknown field `extra`, expected one of `apiVersion`, `kind`, `metadata`, `spec`, `status`"]
    );
}

#[test]
fn an_unknown_task_type_is_named_at_its_index() {
    let manifests = parse(&TEXT_POOL.replace("pdf_generation", "pdf_rendering"));
    let errors = messages(&manifests);
    assert!(
        errors[0].starts_with(
            "pools.yaml:1 (document 1, text): spec.taskTypes[1]: unknown variant `pdf_rendering`, expected one of `text_generation`"
        ),
        "{errors:?}"
    );
}

#[test]
fn a_value_of_the_wrong_type_is_named_with_its_path() {
    let manifests = parse(&TEXT_POOL.replace("maxReplicas: 4", "maxReplicas: four"));
    let errors = messages(&manifests);
    assert!(
        errors[0]
            .starts_with("pools.yaml:1 (document 1, text): spec.maxReplicas: invalid type: string \"four\""),
        "{errors:?}"
    );
}

#[test]
fn a_target_must_be_exactly_one_kind() {
    let two = TEXT_POOL.replace(
        "      command: [text-worker]\n",
        "      command: [text-worker]\n    fly: {app: a, processGroup: worker}\n",
    );
    let errors = messages(&parse(&two));
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(errors[0].contains("spec.target"), "{errors:?}");

    let unknown = TEXT_POOL.replace(
        "    local:\n      command: [text-worker]\n",
        "    nomad: {job: x}\n",
    );
    assert_eq!(
        messages(&parse(&unknown)),
        [
            "pools.yaml:1 (document 1, text): spec.target.nomad: unknown field `nomad`, expected one of `fly`, `kubernetes`, `local`",
            "pools.yaml:1 (document 1, text): spec.target: must set exactly one of `kubernetes`, `fly`, `local`, got none",
        ]
    );
}

#[test]
fn every_problem_of_a_document_is_reported_with_its_path() {
    let broken = "\
apiVersion: backlog.dev/v1alpha1
kind: WorkerPool
metadata:
  name: Text
spec:
  taskTypes: [text_generation, pdf_rendering]
  target:
    local:
      command: []
      cwd: /tmp
  minReplicas: -1
  maxReplicas: many
  tasksPerReplica: 0
  scaleUp: {periodSeconds: 7200, window: 30}
  fallback: {replicas: 1}
  paused: sometimes
";
    assert_eq!(
        messages(&parse(broken)),
        [
            "pools.yaml:1 (document 1, Text): metadata.name: \"Text\" must be lowercase letters, digits and '-', at most 63, starting and ending alphanumeric",
            "pools.yaml:1 (document 1, Text): spec.fallback.failureThreshold: is required",
            "pools.yaml:1 (document 1, Text): spec.maxReplicas: invalid type: string \"many\", expected an integer",
            "pools.yaml:1 (document 1, Text): spec.minReplicas: must be >= 0, got -1",
            "pools.yaml:1 (document 1, Text): spec.paused: invalid type: string \"sometimes\", expected a boolean",
            "pools.yaml:1 (document 1, Text): spec.scaleUp.periodSeconds: must be between 1 and 1800, got 7200",
            "pools.yaml:1 (document 1, Text): spec.scaleUp.window: unknown field `window`, expected one of `maxPercentPerStep`, `maxReplicasPerStep`, `minPercentPerStep`, `periodSeconds`, `stabilizationWindowSeconds`, `tolerance`",
            "pools.yaml:1 (document 1, Text): spec.target.local.command: must have at least 1 item(s)",
            "pools.yaml:1 (document 1, Text): spec.target.local.cwd: unknown field `cwd`, expected one of `command`, `env`",
            "pools.yaml:1 (document 1, Text): spec.taskTypes[1]: unknown variant `pdf_rendering`, expected one of `text_generation`, `pdf_generation`, `audio_generation`",
            "pools.yaml:1 (document 1, Text): spec.tasksPerReplica: must be >= 1, got 0",
        ]
    );
}

#[test]
fn every_document_is_reported_and_the_valid_ones_load() {
    let second = TEXT_POOL
        .replace("name: text", "name: second")
        .replace("maxReplicas: 4", "maxReplicas: 0\n  cooldownPeriod: soon");
    let third = AUDIO_POOL.replace("maxReplicas: 2", "minReplicas: 3\n  maxReplicas: 2");
    let manifests = parse(&format!("{TEXT_POOL}---\n{second}---\n{third}"));
    assert_eq!(
        messages(&manifests),
        [
            "pools.yaml:12 (document 2, second): spec.cooldownPeriod: invalid type: string \"soon\", expected an integer",
            "pools.yaml:12 (document 2, second): spec.maxReplicas: must be >= 1, got 0",
            "pools.yaml:24 (document 3, audio): spec.maxReplicas: must be >= minReplicas (3)",
        ]
    );
    assert_eq!(names(&manifests), ["text"]);
}

#[test]
fn a_missing_spec_and_a_missing_required_field_are_named() {
    let no_spec = "apiVersion: backlog.dev/v1alpha1\nkind: WorkerPool\nmetadata: {name: a}\n";
    assert_eq!(
        messages(&parse(no_spec)),
        ["pools.yaml:1 (document 1, a): spec: is required"]
    );
    let no_max = TEXT_POOL.replace("  maxReplicas: 4\n", "");
    assert_eq!(
        messages(&parse(&no_max)),
        ["pools.yaml:1 (document 1, text): spec.maxReplicas: is required"]
    );
}

#[test]
fn spec_problems_are_all_reported_with_their_location() {
    let manifests = parse(&text_pool_with("minReplicas: 5\n  tasksPerReplica: 0"));
    assert_eq!(
        messages(&manifests),
        [
            "pools.yaml:1 (document 1, text): spec.maxReplicas: must be >= minReplicas (5)",
            "pools.yaml:1 (document 1, text): spec.tasksPerReplica: must be >= 1, got 0",
        ]
    );
}

#[test]
fn a_pool_needs_a_dns_label_name() {
    let missing = parse(&TEXT_POOL.replace("metadata:\n  name: text\n", "metadata: {}\n"));
    assert_eq!(
        messages(&missing),
        ["pools.yaml:1 (document 1): metadata.name: is required"]
    );
    let upper = parse(&TEXT_POOL.replace("name: text", "name: Text_Pool"));
    assert!(
        messages(&upper)[0]
            .starts_with("pools.yaml:1 (document 1, Text_Pool): metadata.name: \"Text_Pool\" must be"),
        "{:?}",
        messages(&upper)
    );
}

#[test]
fn another_kind_of_document_is_rejected_for_its_type_alone() {
    let deployment = "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\nspec: {replicas: 2}\n";
    let manifests = parse(&format!("{deployment}---\n{AUDIO_POOL}"));
    assert_eq!(
        messages(&manifests),
        [
            "pools.yaml:1 (document 1, web): apiVersion: must be \"backlog.dev/v1alpha1\", got \"apps/v1\"",
            "pools.yaml:1 (document 1, web): kind: must be \"WorkerPool\", got \"Deployment\"",
        ]
    );
    assert_eq!(names(&manifests), ["audio"], "the next document still loads");

    let missing = parse("metadata: {name: x}\n");
    assert_eq!(
        messages(&missing),
        [
            "pools.yaml:1 (document 1, x): apiVersion: must be \"backlog.dev/v1alpha1\", got nothing",
            "pools.yaml:1 (document 1, x): kind: must be \"WorkerPool\", got nothing",
        ]
    );
}

#[test]
fn a_document_that_is_not_a_mapping_is_rejected() {
    assert_eq!(
        messages(&parse("- a\n- b\n")),
        ["pools.yaml:1 (document 1): .: must be a mapping with apiVersion, kind, metadata and spec"]
    );
}

#[test]
fn a_syntax_error_stays_in_its_document_and_names_the_file_line() {
    let broken = "apiVersion: backlog.dev/v1alpha1\nkind: WorkerPool\nmetadata: {name: [oops\n";
    let manifests = parse(&format!("{TEXT_POOL}---\n{broken}---\n{AUDIO_POOL}"));
    assert_eq!(names(&manifests), ["text", "audio"]);
    let errors = messages(&manifests);
    assert_eq!(errors.len(), 1);
    assert!(
        errors[0].starts_with("pools.yaml:12 (document 2): not valid YAML: "),
        "{errors:?}"
    );
    assert!(
        errors[0].contains("line 15"),
        "the parser's line is the file's: {errors:?}"
    );
}

#[test]
fn a_duplicate_name_keeps_the_first_pool_and_names_both_places() {
    let mut manifests = parse(TEXT_POOL);
    let renamed = AUDIO_POOL.replace("name: audio", "name: text");
    manifests.add_file(Path::new("more.yaml"), &renamed);
    assert_eq!(
        messages(&manifests),
        ["more.yaml:1 (document 1, text): a WorkerPool with this name is already defined at pools.yaml:1 (document 1, text)"]
    );
    assert!(matches!(manifests.pools[0].pool.spec.target, Target::Local(_)));
}

#[test]
fn a_task_type_served_by_two_pools_is_rejected() {
    let manifests = parse(&format!(
        "{TEXT_POOL}---\n{}",
        AUDIO_POOL.replace("[audio_generation]", "[audio_generation, pdf_generation]")
    ));
    assert_eq!(
        messages(&manifests),
        ["pools.yaml:12 (document 2, audio): task type pdf_generation is already served by the WorkerPool at pools.yaml:1 (document 1, text)"]
    );
    assert_eq!(names(&manifests), ["text"]);
}

#[test]
fn a_folder_loads_its_yaml_files_in_name_order_and_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("b-audio.yml"), AUDIO_POOL).unwrap();
    fs::write(dir.path().join("a-text.yaml"), TEXT_POOL).unwrap();
    fs::write(dir.path().join("README.md"), "not a manifest").unwrap();
    fs::create_dir(dir.path().join("nested")).unwrap();
    fs::write(dir.path().join("nested/other.yaml"), "{ not: loaded").unwrap();

    let manifests = load(dir.path());
    assert_eq!(messages(&manifests), Vec::<String>::new());
    assert_eq!(names(&manifests), ["text", "audio"]);
    assert_eq!(manifests.pools[1].location.file, dir.path().join("b-audio.yml"));
}

#[test]
fn a_folder_without_manifests_and_a_missing_path_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let empty = load(dir.path());
    assert!(
        matches!(empty.errors[..], [Error::NoManifests { .. }]),
        "{:?}",
        empty.errors
    );

    let missing = load(&dir.path().join("nope.yaml"));
    assert!(
        matches!(missing.errors[..], [Error::Read { .. }]),
        "{:?}",
        missing.errors
    );
    assert!(messages(&missing)[0].ends_with("nope.yaml: cannot read: No such file or directory (os error 2)"));
}

#[test]
fn a_file_named_on_the_command_line_loads_whatever_its_extension() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pools.txt");
    fs::write(&file, TEXT_POOL).unwrap();
    assert_eq!(names(&load(&file)), ["text"]);
}
