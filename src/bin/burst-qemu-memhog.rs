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

// The hog's phases in order (wait, grow, hold, free, idle) over the memory it holds: a
// test program read top to bottom, each phase marked.
fn main() {
    let a = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("burst-qemu-memhog: {e}");
            std::process::exit(2);
        }
    };
    if a.after_total > 0 {
        // Like the published test scripts, which set every VM's memory before the programs
        // start: wait (at most 5 minutes) until the balloon has brought MemTotal down.
        let waited = Instant::now();
        while meminfo_mb("MemTotal:") > a.after_total && waited.elapsed() < Duration::from_secs(300)
        {
            std::thread::sleep(Duration::from_millis(200));
        }
        println!(
            "MemTotal {} MB after {:.1} s",
            meminfo_mb("MemTotal:"),
            waited.elapsed().as_secs_f64()
        );
    }
    let start = Instant::now();
    let mut held: Vec<Vec<u8>> = Vec::new();
    let mut last_report = Instant::now() - Duration::from_secs(1);
    let report = |held: &Vec<Vec<u8>>, last: &mut Instant| {
        if last.elapsed() >= Duration::from_secs(1) {
            *last = Instant::now();
            println!(
                "t={:.1} hog={} MB avail={} MB",
                start.elapsed().as_secs_f64(),
                held.len() as u64 * held.first().map_or(0, |c| c.len() / MB) as u64,
                mem_available_mb()
            );
        }
    };
    // Grow.
    let mut waiting_since: Option<Instant> = None;
    let grow_start = Instant::now();
    let mut outcome = "REACHED";
    while (held.len() as u64) * a.chunk < a.max {
        report(&held, &mut last_report);
        if a.grow_for > 0.0 && grow_start.elapsed().as_secs_f64() >= a.grow_for {
            outcome = "STOPPED at";
            break;
        }
        // Keep to the rate.
        let due = (held.len() as f64 + 1.0) * a.chunk as f64 / a.rate;
        let ahead = due - grow_start.elapsed().as_secs_f64();
        if ahead > 0.0 {
            std::thread::sleep(Duration::from_secs_f64(ahead.min(0.2)));
            continue;
        }
        if mem_available_mb() < a.margin + a.chunk {
            let since = *waiting_since.get_or_insert_with(Instant::now);
            if a.stall > 0.0 && since.elapsed().as_secs_f64() >= a.stall {
                outcome = "FAILED at";
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
            continue;
        }
        waiting_since = None;
        // Filled with a non-zero byte: every page is touched (zeroed memory may stay unbacked).
        held.push(vec![0x5a; a.chunk as usize * MB]);
    }
    println!(
        "{outcome} {} MB after {:.1} s",
        held.len() as u64 * a.chunk,
        start.elapsed().as_secs_f64()
    );
    // Hold (touching the memory every second when asked: an active working set).
    let hold_end = Instant::now() + Duration::from_secs_f64(a.hold);
    while Instant::now() < hold_end {
        report(&held, &mut last_report);
        if a.touch {
            for c in held.iter_mut() {
                for page in c.chunks_mut(4096) {
                    page[0] = page[0].wrapping_add(1);
                }
            }
        }
        std::thread::sleep(Duration::from_millis(200).min(hold_end - Instant::now().min(hold_end)));
    }
    // Free: at --free-rate, or all at once.
    let free_start = Instant::now();
    let mut freed = 0usize;
    while !held.is_empty() {
        report(&held, &mut last_report);
        if a.free_rate > 0.0 {
            let due = (freed as f64 + 1.0) * a.chunk as f64 / a.free_rate;
            let ahead = due - free_start.elapsed().as_secs_f64();
            if ahead > 0.0 {
                std::thread::sleep(Duration::from_secs_f64(ahead.min(0.2)));
                continue;
            }
            held.pop();
        } else {
            held.clear();
        }
        freed += 1;
    }
    held.shrink_to_fit();
    println!("FREED after {:.1} s", start.elapsed().as_secs_f64());
    let idle_end = Instant::now() + Duration::from_secs_f64(a.idle);
    while Instant::now() < idle_end {
        report(&held, &mut last_report);
        std::thread::sleep(Duration::from_millis(200));
    }
    println!("DONE after {:.1} s", start.elapsed().as_secs_f64());
}
