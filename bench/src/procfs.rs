//! Readers for `/proc/<pid>`: CPU time (user + system) and resident memory.

use std::fs;

/// Clock ticks per second for `/proc/<pid>/stat` times. Linux fixes `USER_HZ` at 100 on
/// every architecture Weir runs on.
pub const CLOCK_TICKS: u64 = 100;

/// CPU time (utime + stime) of a process, all its threads included (dead threads too), in
/// microseconds. Resolution is one clock tick (10 ms): runs must burn well over a second of
/// CPU for a per-request figure to be meaningful, which a 5 s run at thousands of requests per
/// second does.
pub fn cpu_micros(pid: u32) -> anyhow::Result<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name (field 2) may contain spaces; fields after it start after ')'.
    let after = stat
        .rfind(')')
        .map(|i| &stat[i + 2..])
        .ok_or_else(|| anyhow::anyhow!("unexpected /proc/{pid}/stat"))?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // After ')': field 3 (state) is index 0, so utime (14) is index 11 and stime (15) is 12.
    let ticks: u64 = fields
        .get(11..13)
        .ok_or_else(|| anyhow::anyhow!("short /proc/{pid}/stat"))?
        .iter()
        .map(|f| f.parse::<u64>())
        .sum::<Result<u64, _>>()?;
    Ok(ticks * 1_000_000 / CLOCK_TICKS)
}

/// Sum of [`cpu_micros`] over several processes (nginx master and workers, say).
pub fn cpu_micros_all(pids: &[u32]) -> anyhow::Result<u64> {
    pids.iter().map(|&p| cpu_micros(p)).sum()
}

/// A field of `/proc/<pid>/status` in KiB (`VmRSS`, `VmHWM`).
pub fn status_kib(pid: u32, field: &str) -> anyhow::Result<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field).and_then(|r| r.strip_prefix(':')))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no {field} in /proc/{pid}/status"))
}

/// Resident set size in KiB.
pub fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    status_kib(pid, "VmRSS")
}

/// Number of threads of a process.
pub fn threads(pid: u32) -> anyhow::Result<u64> {
    status_kib(pid, "Threads")
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_own_process() {
        let me = std::process::id();
        assert!(super::rss_kib(me).expect("rss") > 0);
        assert!(super::cpu_micros(me).is_ok());
        assert!(super::threads(me).expect("threads") >= 1);
    }
}
