//! The benchmark's traces, generated from fixed seeds so every run and
//! every machine replays the same tasks.

use super::{parse_trace, Task, TraceError};

/// SplitMix64: a few lines, the same numbers everywhere (a library's
/// generator may change its stream between versions).
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform integer in `low..=high`.
    pub fn between(&mut self, low: u64, high: u64) -> u64 {
        low + self.next_u64() % (high - low + 1)
    }

    /// Log-uniform in [low, high], rounded up to whole seconds: as many
    /// tasks of 2-4 s as of 30-60 s, a heavy right tail in seconds.
    pub fn log_uniform(&mut self, low: f64, high: f64) -> u64 {
        let (a, b) = (low.ln(), high.ln());
        (a + self.unit() * (b - a)).exp().ceil() as u64
    }

    /// Poisson-distributed count with this mean (Knuth; means here are small).
    pub fn poisson(&mut self, mean: f64) -> u32 {
        let limit = (-mean).exp();
        let (mut count, mut product) = (0, self.unit());
        while product > limit {
            count += 1;
            product *= self.unit();
        }
        count
    }
}

/// A named list of tasks, arrival times ascending.
#[derive(Clone, Debug)]
pub struct Trace {
    pub name: &'static str,
    pub description: &'static str,
    /// Arrivals at a constant rate: a fixed pool sized in hindsight is
    /// then close to the cheapest way to a given wait.
    pub stationary: bool,
    pub tasks: Vec<Task>,
}

/// Task durations per task type, as the issue describes the workers.
#[derive(Clone, Copy, Debug)]
enum Kind {
    /// LLM calls: 2-60 s.
    Text,
    /// PDFs: about 1 s.
    Pdf,
    /// Speech: 10-120 s.
    Audio,
}

impl Kind {
    fn duration(self, rng: &mut Rng) -> u64 {
        match self {
            Kind::Text => rng.log_uniform(2.0, 60.0),
            Kind::Pdf => 1,
            Kind::Audio => rng.log_uniform(10.0, 120.0),
        }
    }
}

/// Poisson arrivals at `rate(second)` tasks/s for `seconds`, each of a kind
/// drawn by `kind`.
fn poisson_trace(
    seed: u64,
    seconds: u64,
    rate: impl Fn(u64) -> f64,
    kind: impl Fn(&mut Rng) -> Kind,
) -> Vec<Task> {
    let mut rng = Rng::new(seed);
    let mut tasks = Vec::new();
    for second in 0..seconds {
        for _ in 0..rng.poisson(rate(second)) {
            let service_seconds = kind(&mut rng).duration(&mut rng);
            tasks.push(Task {
                arrival: second,
                service_seconds,
            });
        }
    }
    tasks
}

/// Two hours at 1 task/s, LLM calls of 2-60 s (about 17 busy slots).
pub fn steady() -> Trace {
    Trace {
        name: "steady",
        description: "2 h of Poisson arrivals at 1/s, LLM calls of 2-60 s",
        stationary: true,
        tasks: poisson_trace(0x5EED_0001, 7200, |_| 1.0, |_| Kind::Text),
    }
}

/// A compressed day: four hours from a trickle to 1.5 tasks/s and back.
pub fn diurnal() -> Trace {
    let day = 14_400.0;
    let rate = move |second: u64| {
        let phase = std::f64::consts::TAU * second as f64 / day;
        0.05 + 1.45 * (1.0 - phase.cos()) / 2.0
    };
    Trace {
        name: "diurnal",
        description: "a 4 h day of Poisson arrivals from 0.05/s to 1.5/s and back, LLM calls of 2-60 s",
        stationary: false,
        tasks: poisson_trace(0x5EED_0002, 14_400, rate, |_| Kind::Text),
    }
}

/// Batches of reading jobs (speech, 10-120 s) with idle gaps between them.
pub fn bursts() -> Trace {
    let mut rng = Rng::new(0x5EED_0003);
    let mut tasks = Vec::new();
    let mut second = 60;
    while second < 10_800 {
        let batch = rng.between(30, 200);
        let spread = rng.between(1, 20);
        for _ in 0..batch {
            let arrival = second + rng.between(0, spread - 1);
            let service_seconds = Kind::Audio.duration(&mut rng);
            tasks.push(Task {
                arrival,
                service_seconds,
            });
        }
        second += spread + rng.between(300, 1500);
    }
    tasks.sort_by_key(|t| t.arrival);
    Trace {
        name: "bursts",
        description:
            "3 h of batches of 30-200 reading tasks (speech, 10-120 s) within 20 s, then 5-25 idle minutes",
        stationary: false,
        tasks,
    }
}

/// One pool serving every task type: 60 % LLM calls, 25 % PDFs, 15 % speech.
pub fn mixed() -> Trace {
    let kind = |rng: &mut Rng| match rng.unit() {
        u if u < 0.60 => Kind::Text,
        u if u < 0.85 => Kind::Pdf,
        _ => Kind::Audio,
    };
    Trace {
        name: "mixed",
        description: "2 h of Poisson arrivals at 0.8/s: 60 % LLM calls (2-60 s), 25 % PDFs (1 s), 15 % speech (10-120 s)",
        stationary: true,
        tasks: poisson_trace(0x5EED_0004, 7200, |_| 0.8, kind),
    }
}

/// `controller/testdata/arrivals.csv` (bursts, a ramp, long gaps), 30 s per task.
pub fn recorded() -> Result<Trace, TraceError> {
    let arrivals = parse_trace(include_str!("../../testdata/arrivals.csv"))?;
    let tasks = arrivals
        .iter()
        .flat_map(|a| {
            std::iter::repeat_n(
                Task {
                    arrival: a.second,
                    service_seconds: 30,
                },
                a.tasks as usize,
            )
        })
        .collect();
    Ok(Trace {
        name: "recorded",
        description: "controller/testdata/arrivals.csv: 2 h of bursts, a ramp and long gaps, 30 s per task",
        stationary: false,
        tasks,
    })
}

/// Every trace of the benchmark.
pub fn all() -> Result<Vec<Trace>, TraceError> {
    Ok(vec![steady(), diurnal(), bursts(), mixed(), recorded()?])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_generator_is_fixed_by_its_seed() {
        let mut a = Rng::new(7);
        let first: Vec<u64> = (0..3).map(|_| a.next_u64()).collect();
        let mut b = Rng::new(7);
        assert_eq!(first, (0..3).map(|_| b.next_u64()).collect::<Vec<_>>());
        // SplitMix64's published first output for seed 0.
        assert_eq!(Rng::new(0).next_u64(), 0xE220_A839_7B1D_CDAF);
    }

    #[test]
    fn traces_have_the_shapes_they_claim() {
        let steady = steady();
        let rate = steady.tasks.len() as f64 / 7200.0;
        assert!((0.95..1.05).contains(&rate), "{rate}");
        assert!(steady.tasks.iter().all(|t| (2..=60).contains(&t.service_seconds)));

        let diurnal = diurnal();
        let in_hour = |h: u64| diurnal.tasks.iter().filter(|t| t.arrival / 3600 == h).count();
        assert!(
            in_hour(0) * 3 < in_hour(1) && in_hour(3) * 3 < in_hour(2),
            "a day's shape"
        );

        let bursts = bursts();
        let longest_gap = bursts.tasks.windows(2).map(|w| w[1].arrival - w[0].arrival).max();
        assert!(longest_gap.is_some_and(|gap| gap >= 300));
        assert!(bursts
            .tasks
            .iter()
            .all(|t| (10..=120).contains(&t.service_seconds)));

        let mixed = mixed();
        let pdfs = mixed.tasks.iter().filter(|t| t.service_seconds == 1).count();
        let share = pdfs as f64 / mixed.tasks.len() as f64;
        assert!((0.2..0.35).contains(&share), "{share}");
        assert!(mixed.tasks.iter().any(|t| t.service_seconds > 60));

        let recorded = recorded().expect("the checked-in trace parses");
        assert!(recorded.tasks.windows(2).all(|w| w[0].arrival <= w[1].arrival));
    }
}
