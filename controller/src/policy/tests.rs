use std::collections::BTreeMap;

use proptest::prelude::*;
use queue::TaskType;

use super::*;
use crate::spec::{Fallback, LocalTarget, ScalingRules, Target};

fn at(seconds: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(1_750_000_000 + seconds, 0).expect("in range")
}

/// 10 tasks per replica, 0..=10 replicas, every other setting at its default.
fn spec() -> WorkerPoolSpec {
    WorkerPoolSpec {
        task_types: vec![TaskType::TextGeneration],
        target: Target::Local(LocalTarget {
            command: vec!["text-worker".into()],
            env: BTreeMap::new(),
        }),
        min_replicas: 0,
        max_replicas: 10,
        tasks_per_replica: 10,
        activation_tasks: 1,
        target_queue_seconds: None,
        cooldown_period: 300,
        scale_up: ScalingRules::default(),
        scale_down: ScalingRules::default(),
        fallback: None,
        paused: false,
    }
}

fn no_windows() -> WorkerPoolSpec {
    WorkerPoolSpec {
        scale_down: ScalingRules {
            stabilization_window_seconds: Some(0),
            ..ScalingRules::default()
        },
        ..spec()
    }
}

fn load(pending: u64, in_flight: u64) -> QueueLoad {
    QueueLoad {
        pending,
        in_flight,
        ..QueueLoad::default()
    }
}

/// A pool as the reconcile loop drives it: decide, record, and a backend
/// that applies every decision at once.
struct Pool {
    spec: WorkerPoolSpec,
    history: History,
    replicas: u32,
}

impl Pool {
    fn new(spec: WorkerPoolSpec) -> Pool {
        Pool {
            spec,
            history: History::default(),
            replicas: 0,
        }
    }

    fn running(mut self, replicas: u32) -> Pool {
        self.replicas = replicas;
        self
    }

    fn clone_pool(&self) -> Pool {
        Pool {
            spec: self.spec.clone(),
            history: self.history.clone(),
            replicas: self.replicas,
        }
    }

    fn tick(&mut self, seconds: i64, load: QueueLoad) -> Decision {
        self.observe(seconds, QueueReading::Read(load))
    }

    fn fail(&mut self, seconds: i64) -> Decision {
        let error = "connection refused".to_string();
        self.observe(seconds, QueueReading::Failed { error })
    }

    fn observe(&mut self, seconds: i64, queue: QueueReading) -> Decision {
        let observation = Observation {
            current_replicas: self.replicas,
            ready_replicas: self.replicas,
            queue,
        };
        let decision = decide(&self.spec, &observation, &self.history, at(seconds));
        self.history.record(&decision, at(seconds));
        self.replicas = decision.replicas;
        decision
    }
}

#[test]
fn replicas_follow_pending_plus_in_flight_over_tasks_per_replica() {
    let decision = Pool::new(spec()).running(1).tick(0, load(37, 3));
    assert_eq!(decision.replicas, 4);
    assert_eq!(decision.phase, Phase::Serving);
    assert_eq!(
        decision.reason,
        "scale up 1→4: 37 pending + 3 in flight at 10 per replica"
    );
}

/// Feeds the same load every 5 s from `from` to `to` seconds.
fn steady(pool: &mut Pool, from: i64, to: i64, load: QueueLoad) {
    for second in (from..=to).step_by(5) {
        pool.tick(second, load);
    }
}

fn latency_spec(tasks_per_replica: i32) -> WorkerPoolSpec {
    WorkerPoolSpec {
        target_queue_seconds: Some(60),
        tasks_per_replica,
        max_replicas: 20,
        ..spec()
    }
}

#[test]
fn a_latency_target_sizes_by_arrivals_and_task_duration() {
    // A minute of 1 task/s, 10 in flight: tasks take 10 s (Little's law).
    let mut pool = Pool::new(latency_spec(4)).running(3);
    let settled = QueueLoad {
        completions_per_minute: 60,
        busy_replicas: 3,
        ..load(0, 10)
    };
    steady(&mut pool, 0, 60, settled);
    assert_eq!(pool.replicas, 3, "10 busy slots at 4 per replica");
    assert_eq!(pool.history.service_seconds(), Some(10.0));

    // 40 more arrive: the minute's 100 arrivals (1.67/s) move the 2-minute
    // average of the rate only to 1.03/s (10.3 busy slots), and 40 pending
    // need 40 × 10/60 = 6.7 slots to start within 60 s: 5 replicas where
    // the queue-length rule would start 13.
    let burst = QueueLoad {
        oldest_pending_seconds: 5.0,
        ..QueueLoad {
            pending: 40,
            ..settled
        }
    };
    let decision = pool.clone_pool().tick(65, burst);
    assert_eq!(decision.replicas, 5, "{}", decision.reason);
    assert!(
        decision.reason.contains("arrivals 1.03/s, tasks take 10.0 s: 10.3 busy slots; 40 pending to start within targetQueueSeconds 60: 6.7 slots"),
        "{}",
        decision.reason
    );

    // Once the oldest has waited the target, every pending task gets a slot.
    let late = QueueLoad {
        oldest_pending_seconds: 60.0,
        ..burst
    };
    let decision = pool.clone_pool().tick(65, late);
    assert_eq!(decision.replicas, 7, "+4 per 15 s from 3: {}", decision.reason);
    assert!(decision.reason.contains("a slot each"), "{}", decision.reason);
}

#[test]
fn a_scale_up_does_not_dilute_the_measured_throughput() {
    // Two replicas did a minute's work; six more just became ready. The
    // completions say nothing about the new ones: the recommendation must
    // not change with them.
    let mut pool = Pool::new(latency_spec(10)).running(2);
    let slow = QueueLoad {
        completions_per_minute: 12,
        busy_replicas: 2,
        oldest_pending_seconds: 20.0,
        ..load(30, 2)
    };
    steady(&mut pool, 0, 60, slow);
    let recommended = |ready: u32| {
        let observation = Observation {
            current_replicas: 8,
            ready_replicas: ready,
            queue: QueueReading::Read(slow),
        };
        match decide(&pool.spec, &observation, &pool.history, at(65))
            .memo
            .reading
        {
            Reading::Read { recommendation, .. } => recommendation,
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(recommended(8), recommended(2));
}

#[test]
fn without_a_measured_duration_the_latency_target_falls_back_to_the_load_rule() {
    let spec = WorkerPoolSpec {
        target_queue_seconds: Some(1),
        ..spec()
    };
    let decision = Pool::new(spec).running(2).tick(0, load(30, 2));
    assert_eq!(decision.replicas, 4);
    assert_eq!(
        decision.reason,
        "scale up 2→4: 30 pending + 2 in flight at 10 per replica (task duration not measured yet)"
    );
}

#[test]
fn a_change_within_the_tolerance_holds() {
    // 105 tasks at 10 per replica is 5 % over 10 replicas: HPA holds.
    let spec = WorkerPoolSpec {
        max_replicas: 20,
        ..spec()
    };
    let decision = Pool::new(spec.clone()).running(10).tick(0, load(100, 5));
    assert_eq!(decision.replicas, 10);
    assert!(
        decision.reason.ends_with("within tolerance 0.1 of 10 replicas"),
        "{}",
        decision.reason
    );
    let exact = WorkerPoolSpec {
        scale_up: ScalingRules {
            tolerance: Some(0.0),
            ..ScalingRules::default()
        },
        ..spec.clone()
    };
    assert_eq!(Pool::new(exact).running(10).tick(0, load(100, 5)).replicas, 11);
    // 8.5 replicas' worth is 15 % under 10: outside the band, down to 9
    // (with every removal step allowed).
    let mut any_step = no_windows();
    any_step.scale_down.min_percent_per_step = Some(0);
    assert_eq!(Pool::new(any_step).running(10).tick(0, load(80, 5)).replicas, 9);
}

#[test]
fn busy_replicas_are_never_scaled_away() {
    let busy = QueueLoad {
        busy_replicas: 5,
        ..load(0, 5)
    };
    let decision = Pool::new(no_windows()).running(7).tick(0, busy);
    assert_eq!(decision.replicas, 5, "2 of 7 is a large enough step");
    assert!(
        decision.reason.contains("kept at 5 busy replicas"),
        "{}",
        decision.reason
    );
}

#[test]
fn min_replicas_is_a_floor_even_when_idle() {
    let spec = WorkerPoolSpec {
        min_replicas: 2,
        ..no_windows()
    };
    let mut pool = Pool::new(spec).running(3);
    let decision = pool.tick(0, load(0, 0));
    assert_eq!((decision.replicas, decision.phase), (2, Phase::Serving));
    assert!(
        decision.reason.ends_with("raised to minReplicas 2"),
        "{}",
        decision.reason
    );
    assert_eq!(
        pool.tick(10_000, load(0, 0)).replicas,
        2,
        "and never goes to zero"
    );
}

#[test]
fn max_replicas_is_a_ceiling() {
    let mut pool = Pool::new(spec()).running(8);
    let decision = pool.tick(0, load(500, 0));
    assert_eq!(decision.replicas, 10);
    assert!(
        decision.reason.ends_with("wants 50; capped at maxReplicas 10"),
        "{}",
        decision.reason
    );
}

#[test]
fn a_pool_at_zero_wakes_as_soon_as_activation_tasks_are_pending() {
    let spec = WorkerPoolSpec {
        activation_tasks: 5,
        ..spec()
    };
    let mut pool = Pool::new(spec);
    let below = pool.tick(0, load(4, 0));
    assert_eq!((below.replicas, below.phase), (0, Phase::Dormant));
    assert_eq!(below.reason, "hold 0: 4 pending, activationTasks is 5");

    let woken = pool.tick(1, load(5, 0));
    assert_eq!((woken.replicas, woken.phase), (1, Phase::Activating));
    assert_eq!(
        woken.reason,
        "scale up 0→1: 5 pending + 0 in flight at 10 per replica"
    );
}

#[test]
fn below_activation_tasks_a_pool_with_min_replicas_still_starts_them() {
    let spec = WorkerPoolSpec {
        activation_tasks: 5,
        min_replicas: 1,
        ..spec()
    };
    let decision = Pool::new(spec).tick(0, load(0, 0));
    assert_eq!((decision.replicas, decision.phase), (1, Phase::Activating));
}

#[test]
fn activation_skips_the_scale_up_window_but_not_the_rate_limit() {
    let spec = WorkerPoolSpec {
        scale_up: ScalingRules {
            stabilization_window_seconds: Some(300),
            ..ScalingRules::default()
        },
        ..spec()
    };
    let mut pool = Pool::new(spec);
    pool.tick(0, load(0, 0));
    let decision = pool.tick(5, load(100, 0));
    assert_eq!(
        decision.replicas, 4,
        "HPA's default: 4 replicas per 15 s from zero"
    );
    assert!(
        decision
            .reason
            .ends_with("wants 10; limited to 4 by scaleUp (4 replicas or 100% per 15 s)"),
        "{}",
        decision.reason
    );
}

#[test]
fn the_scale_up_window_ignores_a_short_spike() {
    let spec = WorkerPoolSpec {
        scale_up: ScalingRules {
            stabilization_window_seconds: Some(60),
            ..ScalingRules::default()
        },
        ..spec()
    };
    let mut pool = Pool::new(spec).running(2);
    pool.tick(0, load(15, 0));
    let spike = pool.tick(15, load(80, 0));
    assert_eq!(spike.replicas, 2);
    assert!(
        spike.reason.contains("kept at 2 by the 60 s scaleUp window"),
        "{}",
        spike.reason
    );
    assert_eq!(
        pool.tick(61, load(80, 0)).replicas,
        6,
        "sustained past the window: +4"
    );
}

#[test]
fn the_scale_down_window_holds_the_highest_recent_recommendation() {
    let spec = WorkerPoolSpec {
        scale_down: ScalingRules {
            stabilization_window_seconds: Some(120),
            ..ScalingRules::default()
        },
        ..spec()
    };
    let mut pool = Pool::new(spec).running(8);
    pool.tick(0, load(70, 10));
    let dip = pool.tick(60, load(10, 10));
    assert_eq!(dip.replicas, 8);
    assert!(
        dip.reason.contains("kept at 8 by the 120 s scaleDown window"),
        "{}",
        dip.reason
    );
    assert_eq!(
        pool.tick(119, load(10, 10)).replicas,
        8,
        "still within 120 s of 8"
    );
    assert_eq!(pool.tick(121, load(10, 10)).replicas, 2, "the window has passed");
}

#[test]
fn scale_up_is_limited_per_period_from_the_count_at_its_start() {
    let mut pool = Pool::new(spec()).running(2);
    assert_eq!(pool.tick(0, load(200, 0)).replicas, 6, "+4 beats +100 % of 2");
    assert_eq!(
        pool.tick(5, load(200, 0)).replicas,
        6,
        "the period that started at 2 is used up"
    );
    assert_eq!(
        pool.tick(15, load(200, 0)).replicas,
        10,
        "next period: +100 % of 6, capped at max"
    );
}

#[test]
fn a_running_pool_takes_one_scale_up_step_per_period() {
    let mut pool = Pool::new(spec()).running(2);
    assert_eq!(pool.tick(0, load(25, 0)).replicas, 3, "the batch's first part");
    let rest = pool.tick(5, load(60, 0));
    assert_eq!(
        rest.replicas, 3,
        "the period's budget would allow 6, but one step per period"
    );
    assert!(
        rest.reason
            .ends_with("wants 6; held at 3: replicas were added 5 s ago, one scale-up step per 15 s period"),
        "{}",
        rest.reason
    );
    assert_eq!(pool.tick(15, load(60, 0)).replicas, 6, "the next period's step");
}

#[test]
fn activation_is_not_held_by_the_scale_up_step() {
    let mut pool = Pool::new(spec()).running(3);
    pool.tick(0, load(35, 0));
    pool.tick(5, load(0, 0));
    let mut pool = Pool { replicas: 0, ..pool };
    assert_eq!(
        pool.tick(10, load(30, 0)).replicas,
        3,
        "a pool at zero starts at once, 10 s after the last step up"
    );
}

/// Ten replicas all busy, then fewer as tasks finish, nothing pending.
fn tailing_off(busy_replicas: u32) -> QueueLoad {
    QueueLoad {
        busy_replicas,
        ..load(0, u64::from(busy_replicas))
    }
}

#[test]
fn a_removal_under_min_percent_per_step_waits_for_more_idle_replicas() {
    let mut pool = Pool::new(no_windows()).running(10);
    let one_idle = pool.tick(0, tailing_off(9));
    assert_eq!(one_idle.replicas, 10);
    assert!(
        one_idle.reason.ends_with(
            "held at 10: removing 1 of 10 is less than scaleDown.minPercentPerStep 20 %, waiting for more idle replicas"
        ),
        "{}",
        one_idle.reason
    );
    assert_eq!(pool.tick(15, tailing_off(8)).replicas, 8, "2 of 10 is a step");
    assert_eq!(pool.tick(30, tailing_off(7)).replicas, 8, "1 of 8 is not");
    assert_eq!(pool.tick(45, tailing_off(6)).replicas, 6);
}

#[test]
fn min_percent_per_step_zero_removes_each_idle_replica() {
    let mut spec = no_windows();
    spec.scale_down.min_percent_per_step = Some(0);
    let mut pool = Pool::new(spec).running(10);
    assert_eq!(pool.tick(0, tailing_off(9)).replicas, 9);
    assert_eq!(pool.tick(15, tailing_off(8)).replicas, 8);
}

#[test]
fn min_percent_per_step_never_holds_a_pool_above_max_replicas() {
    let spec = WorkerPoolSpec {
        max_replicas: 9,
        ..no_windows()
    };
    let decision = Pool::new(spec).running(10).tick(0, tailing_off(10));
    assert_eq!(decision.replicas, 9, "{}", decision.reason);
}

#[test]
fn a_single_scale_down_limit_replaces_the_defaults() {
    let spec = WorkerPoolSpec {
        scale_down: ScalingRules {
            stabilization_window_seconds: Some(0),
            max_replicas_per_step: Some(1),
            max_percent_per_step: None,
            min_percent_per_step: None,
            period_seconds: Some(60),
            tolerance: None,
        },
        ..spec()
    };
    let mut pool = Pool::new(spec).running(5);
    assert_eq!(pool.tick(0, load(10, 0)).replicas, 4);
    assert_eq!(pool.tick(30, load(10, 0)).replicas, 4);
    assert_eq!(pool.tick(61, load(10, 0)).replicas, 3);
}

#[test]
fn a_percent_only_scale_up_still_wakes_a_pool_from_zero() {
    let spec = WorkerPoolSpec {
        scale_up: ScalingRules {
            max_percent_per_step: Some(50),
            ..ScalingRules::default()
        },
        ..spec()
    };
    let mut pool = Pool::new(spec);
    assert_eq!(pool.tick(0, load(100, 0)).replicas, 1);
    assert_eq!(pool.tick(15, load(100, 0)).replicas, 2);
}

#[test]
fn an_idle_pool_goes_to_zero_only_after_the_cooldown() {
    let mut pool = Pool::new(spec()).running(3);
    pool.tick(0, load(0, 20));
    let cooling = pool.tick(150, load(0, 0));
    assert_eq!((cooling.replicas, cooling.phase), (1, Phase::CoolingDown));
    assert!(
        cooling
            .reason
            .ends_with("kept at 1: idle for 0 s, zero after cooldownPeriod 300"),
        "{}",
        cooling.reason
    );
    assert_eq!(pool.tick(449, load(0, 0)).replicas, 1);
    let zero = pool.tick(450, load(0, 0));
    assert_eq!((zero.replicas, zero.phase), (0, Phase::Deactivating));
    assert_eq!(zero.reason, "scale down 1→0: idle for 300 s (cooldownPeriod 300)");
    assert_eq!(pool.tick(460, load(0, 0)).phase, Phase::Dormant);
}

#[test]
fn work_in_flight_restarts_the_cooldown() {
    let mut pool = Pool::new(no_windows()).running(1);
    pool.tick(0, load(0, 0));
    pool.tick(200, load(0, 1));
    assert_eq!(pool.tick(400, load(0, 0)).replicas, 1, "idle only since 400");
    assert_eq!(pool.tick(700, load(0, 0)).replicas, 0);
}

#[test]
fn the_cooldown_starts_when_the_controller_first_sees_idleness() {
    // After a restart the history is empty: idle since now, not since ever.
    let mut pool = Pool::new(spec()).running(2);
    assert_eq!(pool.tick(0, load(0, 0)).replicas, 1);
    assert_eq!(pool.tick(299, load(0, 0)).replicas, 1);
    assert_eq!(pool.tick(300, load(0, 0)).replicas, 0);
}

#[test]
fn a_failed_read_holds_until_the_fallback_threshold() {
    let spec = WorkerPoolSpec {
        fallback: Some(Fallback {
            failure_threshold: 3,
            replicas: 2,
        }),
        ..spec()
    };
    let mut pool = Pool::new(spec).running(6);
    let first = pool.fail(0);
    assert_eq!(
        (first.replicas, first.phase),
        (6, Phase::Unobserved { failures: 1 })
    );
    assert_eq!(
        first.reason,
        "hold 6: queue unreadable (1 of 3 before fallback): connection refused"
    );
    assert_eq!(pool.fail(5).replicas, 6);
    let third = pool.fail(10);
    assert_eq!(
        (third.replicas, third.phase),
        (6, Phase::Fallback { failures: 3 }),
        "a fallback below the current count holds: removal needs the registry"
    );
    assert_eq!(
        third.reason,
        "hold 6: fallback after 3 failed queue reads (failureThreshold 3): connection refused; \
         fallback is 2, but replicas are only removed once the queue and the registry can be read"
    );
    pool.tick(15, load(0, 30));
    assert_eq!(
        pool.history.consecutive_failures(),
        0,
        "a good read resets the count"
    );
    assert_eq!(pool.fail(20).phase, Phase::Unobserved { failures: 1 });
}

#[test]
fn a_fallback_above_the_current_count_raises_it() {
    let spec = WorkerPoolSpec {
        fallback: Some(Fallback {
            failure_threshold: 1,
            replicas: 3,
        }),
        ..spec()
    };
    let decision = Pool::new(spec).running(1).fail(0);
    assert_eq!(
        (decision.replicas, decision.phase),
        (3, Phase::Fallback { failures: 1 })
    );
}

#[test]
fn without_a_fallback_a_failed_read_holds_for_as_long_as_it_lasts() {
    let mut pool = Pool::new(spec()).running(3);
    for tick in 0..100 {
        assert_eq!(pool.fail(tick * 5).replicas, 3);
    }
    assert_eq!(pool.history.consecutive_failures(), 100);
}

#[test]
fn a_failed_read_restarts_the_idle_time() {
    let mut pool = Pool::new(spec()).running(1);
    pool.tick(0, load(0, 0));
    pool.fail(400);
    assert_eq!(pool.history.idle_since(), None, "the outage hides what happened");
    assert_eq!(pool.fail(1000).replicas, 1, "failed reads hold");
    let first = pool.tick(1005, load(0, 0));
    assert_eq!(
        (first.replicas, first.phase),
        (1, Phase::CoolingDown),
        "idle since this read, not since before the outage"
    );
    assert_eq!(pool.history.idle_since(), Some(at(1005)));
    assert_eq!(pool.tick(1305, load(0, 0)).replicas, 0);
}

#[test]
fn deactivation_obeys_the_scale_down_rate_limit() {
    let spec = WorkerPoolSpec {
        cooldown_period: 0,
        scale_down: ScalingRules {
            stabilization_window_seconds: Some(0),
            max_replicas_per_step: Some(1),
            period_seconds: Some(60),
            ..ScalingRules::default()
        },
        ..spec()
    };
    let mut pool = Pool::new(spec).running(3);
    let first = pool.tick(0, load(0, 0));
    assert_eq!((first.replicas, first.phase), (2, Phase::Deactivating));
    assert_eq!(
        first.reason,
        "scale down 3→2: idle for 0 s (cooldownPeriod 0); limited to 2 by scaleDown (1 replicas per 60 s)"
    );
    assert_eq!(pool.tick(30, load(0, 0)).replicas, 2);
    assert_eq!(pool.tick(61, load(0, 0)).replicas, 1);
    assert_eq!(pool.tick(122, load(0, 0)).replicas, 0);
}

#[test]
fn a_retry_due_within_the_cooldown_keeps_a_replica() {
    let mut pool = Pool::new(spec()).running(1);
    pool.tick(0, load(0, 0));
    let retry = |seconds: f64| QueueLoad {
        scheduled: 2,
        next_scheduled_seconds: Some(seconds),
        ..load(0, 0)
    };
    let held = pool.tick(300, retry(30.0));
    assert_eq!((held.replicas, held.phase), (1, Phase::CoolingDown));
    assert!(
        held.reason
            .ends_with("kept at 1: a retry falls due in 30 s, within cooldownPeriod 300"),
        "{}",
        held.reason
    );
    // Due after the cooldown: zero now, and told when to look again.
    let zero = pool.tick(310, retry(900.0));
    assert_eq!((zero.replicas, zero.phase), (0, Phase::Deactivating));
    assert_eq!(zero.wake_at, Some(at(1210)));
    assert!(
        zero.reason
            .ends_with("; 2 retries waiting, the next due in 900 s"),
        "{}",
        zero.reason
    );
    let dormant = pool.tick(320, retry(890.0));
    assert_eq!((dormant.phase, dormant.wake_at), (Phase::Dormant, Some(at(1210))));
    assert_eq!(pool.tick(320, load(0, 0)).wake_at, None);
}

#[test]
fn a_capped_reading_never_shrinks_the_pool() {
    let capped = QueueLoad {
        capped: true,
        ..load(0, 10)
    };
    let decision = Pool::new(no_windows()).running(5).tick(0, capped);
    assert_eq!(decision.replicas, 5);
    assert!(
        decision.reason.contains("(counts capped: at least this)")
            && decision.reason.ends_with("held at 5: the depth counts reached their cap, so the load is at least this and no reason to shrink"),
        "{}",
        decision.reason
    );
    let more = QueueLoad {
        capped: true,
        ..load(1000, 10)
    };
    assert_eq!(
        Pool::new(no_windows()).running(5).tick(0, more).replicas,
        10,
        "it still grows"
    );
}

#[test]
fn blocked_tasks_are_reported_and_do_not_wake_a_pool() {
    let blocked = QueueLoad {
        blocked: 3,
        ..load(0, 0)
    };
    let decision = Pool::new(spec()).tick(0, blocked);
    assert_eq!(
        decision.reason,
        "hold 0: nothing pending; 3 blocked on other tasks (their runnable notification wakes the pool)"
    );
}

#[test]
fn history_survives_a_round_trip_through_json() {
    let mut pool = Pool::new(latency_spec(4)).running(3);
    steady(
        &mut pool,
        0,
        90,
        QueueLoad {
            completions_per_minute: 60,
            ..load(5, 10)
        },
    );
    pool.fail(95);
    let json = serde_json::to_string(&pool.history).expect("serialises");
    let back: History = serde_json::from_str(&json).expect("deserialises");
    assert_eq!(back, pool.history);
    let empty: History = serde_json::from_str("{}").expect("missing parts default");
    assert_eq!(empty, History::default());
}

#[test]
fn paused_holds_whatever_the_load() {
    let spec = WorkerPoolSpec {
        paused: true,
        ..spec()
    };
    let mut pool = Pool::new(spec).running(3);
    let decision = pool.tick(0, load(1000, 0));
    assert_eq!((decision.replicas, decision.phase), (3, Phase::Paused));
    assert_eq!(decision.reason, "hold 3: paused");
    assert_eq!(pool.tick(10_000, load(0, 0)).replicas, 3);
    assert_eq!(pool.fail(20_000).replicas, 3);
}

#[test]
fn history_keeps_only_what_its_windows_can_see() {
    let spec = WorkerPoolSpec {
        scale_down: ScalingRules {
            stabilization_window_seconds: Some(120),
            ..ScalingRules::default()
        },
        ..spec()
    };
    let mut pool = Pool::new(spec).running(1);
    for tick in 0..2000 {
        // Alternate so equal runs cannot be merged.
        pool.tick(tick * 5, load(10 + (tick as u64 % 2) * 10, 0));
    }
    // 120 s window at one entry per 5 s, rate-limited scale events, and a
    // minute of load samples.
    assert!(
        pool.history.len() <= 2 * (120 / 5 + 1) + (60 / 5 + 1),
        "{}",
        pool.history.len()
    );
}

#[test]
fn equal_recommendations_in_a_row_take_one_entry() {
    let mut pool = Pool::new(spec()).running(2);
    for tick in 0..20 {
        pool.tick(tick, load(20, 0));
    }
    assert_eq!(pool.history.recommendations.len(), 1);
    assert_eq!(pool.history.recommendations[0], (at(19), 2));
}

// Properties over arbitrary specs and load sequences.

#[derive(Clone, Debug)]
struct Tick {
    after_seconds: i64,
    reading: Option<QueueLoad>,
}

fn arb_spec() -> impl Strategy<Value = WorkerPoolSpec> {
    (
        0..4i32,
        1..30i32,
        1..8i32,
        1..5i32,
        0..600i32,
        (0..120i32, 0..300i32),
        prop::option::of((1..8i32, 1..300i32, 1..60i32, 0..=100i32)),
        prop::option::of((1..4i32, 1..30i32)),
        prop::option::of(1..120i32),
    )
        .prop_map(
            |(min, extra, per_replica, activation, cooldown, windows, limits, fallback, target)| {
                let (up_limits, down_limits) = match limits {
                    Some((replicas, percent, period, min_percent)) => (
                        ScalingRules {
                            stabilization_window_seconds: Some(windows.0),
                            max_replicas_per_step: Some(replicas),
                            max_percent_per_step: Some(percent),
                            min_percent_per_step: None,
                            period_seconds: Some(period),
                            tolerance: None,
                        },
                        ScalingRules {
                            stabilization_window_seconds: Some(windows.1),
                            max_replicas_per_step: Some(replicas),
                            max_percent_per_step: Some(percent.min(100)),
                            min_percent_per_step: Some(min_percent),
                            period_seconds: Some(period),
                            tolerance: None,
                        },
                    ),
                    None => (ScalingRules::default(), ScalingRules::default()),
                };
                let max = min + extra;
                WorkerPoolSpec {
                    min_replicas: min,
                    max_replicas: max,
                    tasks_per_replica: per_replica,
                    activation_tasks: activation,
                    cooldown_period: cooldown,
                    scale_up: up_limits,
                    scale_down: down_limits,
                    fallback: fallback.map(|(threshold, replicas)| Fallback {
                        failure_threshold: threshold,
                        replicas: replicas.clamp(min.max(1), max),
                    }),
                    target_queue_seconds: target,
                    ..spec()
                }
            },
        )
}

fn arb_load() -> impl Strategy<Value = QueueLoad> {
    (0..300u64, 0..100u64, 0..200u32, 0..600u64, 0..40u32).prop_map(
        |(pending, in_flight, oldest, completions, busy)| QueueLoad {
            pending,
            in_flight,
            oldest_pending_seconds: f64::from(oldest),
            completions_per_minute: completions,
            busy_replicas: busy,
            ..QueueLoad::default()
        },
    )
}

fn arb_ticks() -> impl Strategy<Value = Vec<Tick>> {
    prop::collection::vec(
        (1..90i64, prop::option::weighted(0.9, arb_load())).prop_map(|(after_seconds, reading)| Tick {
            after_seconds,
            reading,
        }),
        1..80,
    )
}

/// Runs a pool through the ticks, handing each decision and its time to `check`.
fn run(
    spec: &WorkerPoolSpec,
    ticks: &[Tick],
    mut check: impl FnMut(DateTime<Utc>, &Observation, &Decision) -> Result<(), TestCaseError>,
) -> Result<(), TestCaseError> {
    let mut pool = Pool::new(spec.clone());
    let mut now = 0;
    for tick in ticks {
        now += tick.after_seconds;
        let queue = match tick.reading {
            Some(load) => QueueReading::Read(load),
            None => QueueReading::Failed {
                error: "timeout".into(),
            },
        };
        let observation = Observation {
            current_replicas: pool.replicas,
            ready_replicas: pool.replicas,
            queue,
        };
        let decision = decide(&pool.spec, &observation, &pool.history, at(now));
        check(at(now), &observation, &decision)?;
        pool.history.record(&decision, at(now));
        pool.replicas = decision.replicas;
    }
    Ok(())
}

proptest! {
    #[test]
    fn replicas_stay_within_bounds(spec in arb_spec(), ticks in arb_ticks()) {
        let (min, max) = (spec.min_replicas as u32, spec.max_replicas as u32);
        run(&spec, &ticks, |_, observation, decision| {
            prop_assert!(decision.replicas <= max, "{decision:?}");
            if let QueueReading::Read(load) = &observation.queue {
                let floor = min.max(load.busy_replicas).min(max);
                prop_assert!(decision.replicas >= floor, "{decision:?} below {floor}");
            }
            Ok(())
        })?;
    }

    #[test]
    fn a_running_pool_never_goes_to_zero_with_tasks_in_flight(spec in arb_spec(), ticks in arb_ticks()) {
        run(&spec, &ticks, |_, observation, decision| {
            if let QueueReading::Read(load) = &observation.queue {
                if observation.current_replicas > 0 && load.in_flight > 0 {
                    prop_assert!(decision.replicas > 0, "{decision:?}");
                }
            }
            Ok(())
        })?;
    }

    #[test]
    fn a_failed_read_never_scales_to_zero(spec in arb_spec(), ticks in arb_ticks()) {
        run(&spec, &ticks, |_, observation, decision| {
            if matches!(observation.queue, QueueReading::Failed { .. }) && observation.current_replicas > 0 {
                prop_assert!(decision.replicas > 0, "{decision:?}");
            }
            Ok(())
        })?;
    }

    #[test]
    fn scale_up_respects_the_rate_limits(spec in arb_spec(), ticks in arb_ticks()) {
        // Floors may exceed a rate limit on purpose; leave them out here.
        let spec = WorkerPoolSpec { min_replicas: 0, fallback: None, ..spec };
        let limits = spec.rate_limits(Direction::Up);
        let ticks: Vec<Tick> = ticks
            .into_iter()
            .map(|tick| Tick { reading: tick.reading.map(|load| QueueLoad { busy_replicas: 0, ..load }), ..tick })
            .collect();
        let mut changes: Vec<(DateTime<Utc>, i64)> = Vec::new();
        run(&spec, &ticks, |now, observation, decision| {
            let cutoff = now - TimeDelta::seconds(i64::from(limits.period_seconds));
            let added: i64 = changes.iter().filter(|(t, _)| *t > cutoff).map(|(_, c)| c).sum();
            let start = (i64::from(observation.current_replicas) - added).max(0) as u64;
            let by_count = limits.replicas_per_step.map(|n| start + u64::from(n));
            let by_percent = limits.percent_per_step.map(|p| start + (start * u64::from(p)).div_ceil(100).max(1));
            let limit = by_count.into_iter().chain(by_percent).max().unwrap_or(u64::MAX);
            if decision.replicas > observation.current_replicas {
                prop_assert!(u64::from(decision.replicas) <= limit, "{decision:?} over {limit}");
            }
            changes.push((now, i64::from(decision.replicas) - i64::from(decision.from)));
            Ok(())
        })?;
    }

    #[test]
    fn a_running_pool_steps_up_at_most_once_per_period(spec in arb_spec(), ticks in arb_ticks()) {
        // Floors may raise a count on purpose; leave them out here.
        let spec = WorkerPoolSpec { min_replicas: 0, fallback: None, ..spec };
        let period = TimeDelta::seconds(i64::from(spec.rate_limits(Direction::Up).period_seconds));
        let ticks: Vec<Tick> = ticks
            .into_iter()
            .map(|tick| Tick { reading: tick.reading.map(|load| QueueLoad { busy_replicas: 0, ..load }), ..tick })
            .collect();
        let mut last_step_up: Option<DateTime<Utc>> = None;
        run(&spec, &ticks, |now, observation, decision| {
            if decision.replicas > observation.current_replicas {
                if observation.current_replicas > 0 {
                    let ago = last_step_up.map(|at| now - at);
                    prop_assert!(ago.is_none_or(|ago| ago >= period), "{decision:?} {ago:?} after the last step up");
                }
                last_step_up = Some(now);
            }
            Ok(())
        })?;
    }

    #[test]
    fn more_pending_never_means_fewer_replicas(
        spec in arb_spec(),
        ticks in arb_ticks(),
        base in arb_load(),
        extra in 0..500u64,
    ) {
        let mut pool = Pool::new(spec.clone());
        let mut now = 0;
        for tick in &ticks {
            now += tick.after_seconds;
            match tick.reading {
                Some(load) => pool.tick(now, load),
                None => pool.fail(now),
            };
        }
        let observe = |pending| Observation {
            current_replicas: pool.replicas,
            ready_replicas: pool.replicas,
            queue: QueueReading::Read(QueueLoad { pending, ..base }),
        };
        let fewer = decide(&spec, &observe(base.pending), &pool.history, at(now + 5));
        let more = decide(&spec, &observe(base.pending + extra), &pool.history, at(now + 5));
        prop_assert!(more.replicas >= fewer.replicas, "{fewer:?} then {more:?}");
    }

    #[test]
    fn a_constant_load_settles_without_oscillating(spec in arb_spec(), load in arb_load()) {
        // Throughput-driven targets depend on the replica count; keep to the load rule.
        let spec = WorkerPoolSpec { target_queue_seconds: None, ..spec };
        let load = QueueLoad { busy_replicas: load.busy_replicas.min(spec.max_replicas as u32), ..load };
        let mut pool = Pool::new(spec);
        // From zero, the slowest climb allowed is one replica per 60 s period.
        let replicas: Vec<u32> = (0..800).map(|tick| pool.tick(tick * 5, load).replicas).collect();
        prop_assert!(replicas.windows(2).all(|w| w[0] <= w[1]), "moved both ways: {replicas:?}");
        prop_assert!(replicas[700..].iter().all(|r| *r == replicas[700]), "unsettled: {replicas:?}");
    }
}
