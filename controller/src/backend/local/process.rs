//! One process, told apart from any later process that reuses its pid: the
//! local backend records what it started so a restarted controller can
//! adopt those processes, and never signals a stranger.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// How often a process that is not our child is checked while it stops.
const POLL: Duration = Duration::from_millis(100);

/// A process as `/proc` shows it: its pid and when it started (clock ticks
/// since boot) in which boot, which tell it from any later process with the
/// same pid; and, for the operator, the command line it was started with.
/// The command line is not part of its identity: a wrapper that `exec`s the
/// worker (`sh -c`, `env`, a supervisor script) changes it but is the same
/// process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessRecord {
    pub pid: u32,
    pub start_ticks: u64,
    pub boot_id: String,
    pub cmdline: Vec<String>,
}

impl ProcessRecord {
    /// The running (not zombie) process `pid`, if there is one.
    pub fn of(pid: u32) -> Option<ProcessRecord> {
        let bytes = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        // Each argument ends with a NUL; empty arguments are arguments too.
        let argv = bytes
            .strip_suffix(&[0])
            .map(|args| {
                args.split(|b| *b == 0)
                    .map(|arg| String::from_utf8_lossy(arg).into_owned())
                    .collect()
            })
            .unwrap_or_default();
        Self::started(pid, argv)
    }

    /// The process `pid` just started with `argv`. Right after a spawn
    /// returns, the kernel may still be setting up the new program and show
    /// an empty command line, so the one asked for is recorded.
    pub fn started(pid: u32, argv: Vec<String>) -> Option<ProcessRecord> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // `pid (comm) state ppid …`: comm may hold spaces and parentheses,
        // so the fields are counted from the last `)`.
        let fields: Vec<&str> = stat.get(stat.rfind(')')? + 1..)?.split_whitespace().collect();
        let state = *fields.first()?;
        if state == "Z" || state == "X" {
            return None; // exited, not yet reaped
        }
        let start_ticks = fields.get(19)?.parse().ok()?; // field 22 of stat(5)
        let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
        Some(ProcessRecord {
            pid,
            start_ticks,
            boot_id: boot_id.trim().to_string(),
            cmdline: argv,
        })
    }

    /// Whether this very process still runs.
    pub fn is_alive(&self) -> bool {
        Self::of(self.pid)
            .is_some_and(|now| now.start_ticks == self.start_ticks && now.boot_id == self.boot_id)
    }

    /// Send `signal` if this very process still runs.
    pub fn signal(&self, signal: libc::c_int) {
        if self.is_alive() {
            // SAFETY: kill(2) with a pid just checked to be this process and
            // a valid signal number.
            unsafe { libc::kill(self.pid as libc::pid_t, signal) };
        }
    }

    /// Wait (polling: it need not be our child) until the process has
    /// exited, up to `grace`; then SIGKILL it. True when it exited in time.
    pub async fn wait_or_kill(&self, grace: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + grace;
        while self.is_alive() {
            if tokio::time::Instant::now() >= deadline {
                self.signal(libc::SIGKILL);
                return false;
            }
            tokio::time::sleep(POLL).await;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::ProcessRecord;

    #[test]
    fn a_process_is_its_pid_and_start_time() {
        let me = ProcessRecord::of(std::process::id()).expect("this process is in /proc");
        assert!(me.is_alive());
        assert!(!me.cmdline.is_empty());
        let reused = ProcessRecord {
            start_ticks: me.start_ticks + 1,
            ..me.clone()
        };
        assert!(
            !reused.is_alive(),
            "same pid, started at another time: another process"
        );
        let other_boot = ProcessRecord {
            boot_id: "another boot".into(),
            ..me
        };
        assert!(!other_boot.is_alive());
    }

    #[test]
    fn a_process_recorded_as_it_is_spawned_is_recognised_later() {
        let argv = ["sh", "-c", "sleep 5", ""].map(String::from).to_vec();
        let mut child = std::process::Command::new(&argv[0])
            .args(&argv[1..])
            .spawn()
            .unwrap();
        let record = ProcessRecord::started(child.id(), argv).expect("just started");
        std::thread::sleep(std::time::Duration::from_millis(100));
        assert!(
            record.is_alive(),
            "{record:?} vs {:?}",
            ProcessRecord::of(child.id())
        );
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(!record.is_alive());
    }

    #[test]
    fn a_process_that_execs_another_program_is_still_itself() {
        // The wrapper replaces itself with `sleep`: same pid, same start.
        let argv = ["sh", "-c", "exec sleep 5"].map(String::from).to_vec();
        let mut child = std::process::Command::new(&argv[0])
            .args(&argv[1..])
            .spawn()
            .unwrap();
        let record = ProcessRecord::started(child.id(), argv).expect("just started");
        for _ in 0..100 {
            if ProcessRecord::of(child.id()).is_some_and(|p| p.cmdline.first().is_some_and(|a| a == "sleep"))
            {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(record.is_alive(), "the exec'd worker was taken for a stranger");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    #[test]
    fn a_zombie_is_not_alive() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        // Not reaped yet: a zombie once it exits.
        for _ in 0..100 {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
            if stat.contains(") Z ") {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert_eq!(ProcessRecord::of(pid), None);
        child.wait().unwrap();
    }
}
