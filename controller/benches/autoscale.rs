//! Replays the checked-in arrival trace through the simulator, under
//! backlog's default policy and under an HPA/KEDA-style baseline, and
//! prints replica-seconds and queue waits. The last line of output is one
//! JSON object with every figure, for scripts to compare runs.
//!
//! ```text
//! cargo bench -p controller --bench autoscale
//! ```

use controller::sim::{parse_trace, simulate, Arrival, Backlog, HpaKeda, Report, World};
use controller::spec::WorkerPoolSpec;
use serde_json::json;

const TRACE_PATH: &str = "controller/testdata/arrivals.csv";
const TRACE: &str = include_str!("../testdata/arrivals.csv");

const WORLD: World = World {
    startup_seconds: 20,
    service_seconds: 30,
    concurrency: 4,
    tail_seconds: 1800,
};
const MAX_REPLICAS: u32 = 20;
/// The reconcile loop's tick; a pool at zero is also woken by NOTIFY.
const TICK_SECONDS: u64 = 5;

/// The target: p95 no worse with at least 30 % fewer replica-seconds, or no
/// more replica-seconds with at most half the p95 wait.
fn target_met(backlog: &Report, baseline: &Report) -> bool {
    let (cost, base_cost) = (backlog.replica_seconds as f64, baseline.replica_seconds as f64);
    let (p95, base_p95) = (backlog.wait_p95_seconds, baseline.wait_p95_seconds);
    (p95 <= base_p95 && cost <= 0.7 * base_cost) || (cost <= base_cost && 2 * p95 <= base_p95)
}

fn ratio(value: u64, base: u64) -> Option<f64> {
    (base > 0).then(|| (value as f64 / base as f64 * 1000.0).round() / 1000.0)
}

fn main() -> anyhow::Result<()> {
    let arrivals = parse_trace(TRACE)?;
    // Only the fields without a default: the rest is backlog's defaults.
    let spec: WorkerPoolSpec = serde_json::from_value(json!({
        "taskTypes": ["text_generation"],
        "target": { "local": { "command": ["text-worker"] } },
        "maxReplicas": MAX_REPLICAS,
        "tasksPerReplica": WORLD.concurrency,
    }))?;
    let backlog = simulate(&WORLD, &arrivals, &mut Backlog::new(spec, TICK_SECONDS));
    let baseline = simulate(
        &WORLD,
        &arrivals,
        &mut HpaKeda::new(u64::from(WORLD.concurrency), MAX_REPLICAS),
    );

    let tasks: u64 = arrivals.iter().map(|a: &Arrival| u64::from(a.tasks)).sum();
    let last = arrivals.last().map_or(0, |a| a.second);
    println!(
        "trace: {TRACE_PATH}: {tasks} tasks over {last} s, then {} s of tail",
        WORLD.tail_seconds
    );
    println!(
        "world: a replica starts in {} s and runs {} tasks at a time, {} s each; at most {MAX_REPLICAS} replicas",
        WORLD.startup_seconds, WORLD.concurrency, WORLD.service_seconds
    );
    println!(
        "backlog: defaults, {TICK_SECONDS} s tick + wake on new work; baseline: KEDA 30 s poll and 300 s cooldown, \
         HPA 15 s sync, 10 % tolerance, 300 s scale-down window"
    );
    println!();
    println!(
        "{:<18} {:>10} {:>9} {:>9} {:>9} {:>5} {:>8} {:>10}",
        "policy", "replica-s", "wait p50", "wait p95", "wait max", "peak", "changes", "unfinished"
    );
    for (name, report) in [("backlog defaults", &backlog), ("hpa/keda baseline", &baseline)] {
        println!(
            "{:<18} {:>10} {:>7} s {:>7} s {:>7} s {:>5} {:>8} {:>10}",
            name,
            report.replica_seconds,
            report.wait_p50_seconds,
            report.wait_p95_seconds,
            report.wait_max_seconds,
            report.peak_replicas,
            report.scale_changes,
            report.unfinished
        );
    }

    let cost_ratio = ratio(backlog.replica_seconds, baseline.replica_seconds);
    let p95_ratio = ratio(backlog.wait_p95_seconds, baseline.wait_p95_seconds);
    let shown = |r: Option<f64>| r.map_or("n/a".to_string(), |r| format!("{r:.3}"));
    println!();
    println!(
        "backlog / baseline: replica-seconds {}, p95 wait {}, max wait {}",
        shown(cost_ratio),
        shown(p95_ratio),
        shown(ratio(backlog.wait_max_seconds, baseline.wait_max_seconds)),
    );
    let met = target_met(&backlog, &baseline);
    println!(
        "target (p95 no worse with >= 30 % fewer replica-seconds, or no more replica-seconds with half the p95): {}",
        if met { "met" } else { "NOT met" }
    );
    println!(
        "{}",
        json!({
            "trace": { "path": TRACE_PATH, "tasks": tasks, "last_arrival_second": last },
            "world": WORLD,
            "max_replicas": MAX_REPLICAS,
            "tick_seconds": TICK_SECONDS,
            "backlog": backlog,
            "baseline": baseline,
            "ratios": {
                "replica_seconds": cost_ratio,
                "wait_p95": p95_ratio,
                "wait_max": ratio(backlog.wait_max_seconds, baseline.wait_max_seconds),
            },
            "target_met": met,
        })
    );
    Ok(())
}
