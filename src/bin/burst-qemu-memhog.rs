//! `burst-qemu-memhog`: the memory hog the coordinator's acceptance tests run inside Linux
//! guests (like the GT project's `run`). It allocates and touches memory at a chosen rate up to
//! a size, or until allocation "fails", holds it, frees it on a schedule, then idles.
//!
//! Allocation fails when the guest's MemAvailable stays below `--margin` + one chunk for
//! `--stall` seconds (the coordinator did not grow the VM in time). A real malloc failure is
//! not how Linux says no — with overcommit it OOM-kills instead — so the hog asks first, as a
//! well-behaved program would. `--stall 0` never gives up (a hungry VM for the idle-tax test).
//!
//! ```text
//! burst-qemu-memhog [--rate MB/s] [--max MB] [--chunk MB] [--margin MB] [--stall S]
//!                   [--after-total MB] [--grow-for S] [--hold S] [--free-rate MB/s]
//!                   [--idle S] [--touch]
//! ```
//! Defaults: 64 MB/s in 4 MB chunks up to 1024 MB, margin 48 MB, stall 10 s, hold 5 s, free
//! at once, no idling. `--after-total` first waits until the guest's MemTotal is at most MB
//! (the balloon has brought the VM down to its start size). `--grow-for` ends the growth after
//! S seconds however far it got.
//! Prints one line a second (`t=… hog=… MB avail=… MB`) and `REACHED N MB`, `FAILED at N MB`
//! or `STOPPED at N MB`, then `FREED`, `DONE`.

use std::time::{Duration, Instant};

struct Args {
    rate: f64,
    max: u64,
    chunk: u64,
    margin: u64,
    stall: f64,
    hold: f64,
    free_rate: f64,
    idle: f64,
    grow_for: f64,
    after_total: u64,
    touch: bool,
}

fn parse() -> Result<Args, String> {
    let mut a = Args {
        rate: 64.0,
        max: 1024,
        chunk: 4,
        margin: 48,
        stall: 10.0,
        hold: 5.0,
        free_rate: 0.0,
        idle: 0.0,
        grow_for: 0.0,
        after_total: 0,
        touch: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--touch" {
            a.touch = true;
            continue;
        }
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let num = |v: &str| {
            v.parse::<f64>()
                .ok()
                .filter(|x| x.is_finite() && *x >= 0.0)
                .ok_or_else(|| format!("{flag} {v}: not a number ≥ 0"))
        };
        match flag.as_str() {
            "--rate" => a.rate = num(&value)?,
            "--max" => a.max = num(&value)? as u64,
            "--chunk" => a.chunk = (num(&value)? as u64).max(1),
            "--margin" => a.margin = num(&value)? as u64,
            "--stall" => a.stall = num(&value)?,
            "--hold" => a.hold = num(&value)?,
            "--free-rate" => a.free_rate = num(&value)?,
            "--idle" => a.idle = num(&value)?,
            "--grow-for" => a.grow_for = num(&value)?,
            "--after-total" => a.after_total = num(&value)? as u64,
            _ => return Err(format!("unknown flag {flag} (see the head of the source)")),
        }
    }
    if a.rate <= 0.0 {
        return Err("--rate must be > 0".into());
    }
    Ok(a)
}

fn meminfo_mb(key: &str) -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb / 1024)
}

fn mem_available_mb() -> u64 {
    meminfo_mb("MemAvailable:")
}

const MB: usize = 1 << 20;

/// The memory held, in chunks, and the once-a-second progress line.
struct Hog {
    held: Vec<Vec<u8>>,
    chunk: u64,
    start: Instant,
    last_report: Instant,
}

impl Hog {
    fn mb(&self) -> u64 {
        self.held.len() as u64 * self.chunk
    }

    fn report(&mut self) {
        if self.last_report.elapsed() >= Duration::from_secs(1) {
            self.last_report = Instant::now();
            println!(
                "t={:.1} hog={} MB avail={} MB",
                self.start.elapsed().as_secs_f64(),
                self.mb(),
                mem_available_mb()
            );
        }
    }

    /// Grows at `--rate` up to `--max`, waiting for memory to keep `--margin` available; stops
    /// after `--grow-for` s, or fails after waiting `--stall` s. Answers how it ended.
    fn grow(&mut self, a: &Args) -> &'static str {
        let mut waiting_since: Option<Instant> = None;
        let grow_start = Instant::now();
        while self.mb() < a.max {
            self.report();
            if a.grow_for > 0.0 && grow_start.elapsed().as_secs_f64() >= a.grow_for {
                return "STOPPED at";
            }
            // Keep to the rate.
            let due = (self.held.len() as f64 + 1.0) * a.chunk as f64 / a.rate;
            let ahead = due - grow_start.elapsed().as_secs_f64();
            if ahead > 0.0 {
                std::thread::sleep(Duration::from_secs_f64(ahead.min(0.2)));
                continue;
            }
            if mem_available_mb() < a.margin + a.chunk {
                let since = *waiting_since.get_or_insert_with(Instant::now);
                if a.stall > 0.0 && since.elapsed().as_secs_f64() >= a.stall {
                    return "FAILED at";
                }
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
            waiting_since = None;
            // Filled with a non-zero byte: every page is touched (zeroed memory may stay
            // unbacked).
            self.held.push(vec![0x5a; a.chunk as usize * MB]);
        }
        "REACHED"
    }

    /// Holds for `--hold` s, touching every page each round when asked (an active working set).
    fn hold(&mut self, a: &Args) {
        let hold_end = Instant::now() + Duration::from_secs_f64(a.hold);
        while Instant::now() < hold_end {
            self.report();
            if a.touch {
                for c in self.held.iter_mut() {
                    for page in c.chunks_mut(4096) {
                        page[0] = page[0].wrapping_add(1);
                    }
                }
            }
            std::thread::sleep(
                Duration::from_millis(200).min(hold_end - Instant::now().min(hold_end)),
            );
        }
    }

    /// Frees at `--free-rate`, or all at once.
    fn free(&mut self, a: &Args) {
        let free_start = Instant::now();
        let mut freed = 0usize;
        while !self.held.is_empty() {
            self.report();
            if a.free_rate > 0.0 {
                let due = (freed as f64 + 1.0) * a.chunk as f64 / a.free_rate;
                let ahead = due - free_start.elapsed().as_secs_f64();
                if ahead > 0.0 {
                    std::thread::sleep(Duration::from_secs_f64(ahead.min(0.2)));
                    continue;
                }
                self.held.pop();
            } else {
                self.held.clear();
            }
            freed += 1;
        }
        self.held.shrink_to_fit();
    }
}

/// Like the published test scripts, which set every VM's memory before the programs start:
/// waits (at most 5 minutes) until the balloon has brought MemTotal down to `after_total`.
fn wait_for_balloon(after_total: u64) {
    let waited = Instant::now();
    while meminfo_mb("MemTotal:") > after_total && waited.elapsed() < Duration::from_secs(300) {
        std::thread::sleep(Duration::from_millis(200));
    }
    println!(
        "MemTotal {} MB after {:.1} s",
        meminfo_mb("MemTotal:"),
        waited.elapsed().as_secs_f64()
    );
}

/// The hog's phases in order: wait, grow, hold, free, idle.
fn main() {
    let a = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("burst-qemu-memhog: {e}");
            std::process::exit(2);
        }
    };
    if a.after_total > 0 {
        wait_for_balloon(a.after_total);
    }
    let mut hog = Hog {
        held: Vec::new(),
        chunk: a.chunk,
        start: Instant::now(),
        last_report: Instant::now() - Duration::from_secs(1),
    };
    let outcome = hog.grow(&a);
    println!(
        "{outcome} {} MB after {:.1} s",
        hog.mb(),
        hog.start.elapsed().as_secs_f64()
    );
    hog.hold(&a);
    hog.free(&a);
    println!("FREED after {:.1} s", hog.start.elapsed().as_secs_f64());
    let idle_end = Instant::now() + Duration::from_secs_f64(a.idle);
    while Instant::now() < idle_end {
        hog.report();
        std::thread::sleep(Duration::from_millis(200));
    }
    println!("DONE after {:.1} s", hog.start.elapsed().as_secs_f64());
}
