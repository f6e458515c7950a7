//! A VM's credit history: pure ring buffers, downsampling and a compact encoding.
//!
//! This module does no I/O and reads no clock. The agent hands [`History::record`] one
//! [`Point`] per tick with the wall-clock time it was measured at; the history keeps two rings:
//!
//! * **fine**: one [`Sample`] per 10 seconds for the last hour ([`FINE_PERIOD_S`] × [`FINE_LEN`]);
//! * **coarse**: one sample per minute for the last 8 days ([`COARSE_PERIOD_S`] × [`COARSE_LEN`]),
//!   a day more than the 7 promised, so a week is always whole.
//!
//! Space is bounded by the ring lengths whatever the VM does.
//!
//! # Downsampling
//!
//! A sample stands for the bucket `[t, t + period)` (`t` a multiple of the period, Unix
//! seconds). The stocks — balance, surplus, charged, baseline — are their values at the last
//! tick in the bucket (where the curve *is*); the flows — usage and grant — are the mean over the
//! bucket's ticks (the agent's ticks are of equal length, so this is the time average). A bucket
//! is closed when a tick of a later bucket arrives, or by [`History::flush`] (when the VM ends or
//! the agent stops); a tick that lands in an already closed bucket (a VM started again within
//! the same minute) replaces that bucket's sample rather than going back in time.
//!
//! # Encoding
//!
//! [`History::encode`] writes `BQH1`, then each ring as `period, count, samples`; a sample is
//! its fields as differences from the previous sample's (zigzag LEB128 varints), so a steady
//! VM costs a few bytes a sample: about 1.5 bytes per field measured (see `examples/history_size.rs`).
//! [`History::decode`] rejects garbage with an error naming what was wrong; it never panics.

use std::collections::VecDeque;

use thiserror::Error;

/// Seconds per fine sample.
pub const FINE_PERIOD_S: u64 = 10;
/// Fine samples kept: one hour.
pub const FINE_LEN: usize = 360;
/// Seconds per coarse sample.
pub const COARSE_PERIOD_S: u64 = 60;
/// Coarse samples kept: eight days.
pub const COARSE_LEN: usize = 8 * 24 * 60;

const MAGIC: &[u8; 4] = b"BQH1";

/// What the agent measured at one tick. Credits are in thousandths of a credit (as shown),
/// rates in millionths of one CPU (ppm, of all the VM's vCPUs together).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Point {
    /// Spendable balance, millicredits.
    pub balance_mc: u64,
    /// Surplus outstanding, millicredits.
    pub surplus_mc: u64,
    /// Surplus charged so far, millicredits.
    pub charged_mc: u64,
    /// CPU used, ppm of one CPU.
    pub usage_ppm: u64,
    /// The grant, ppm of one CPU.
    pub grant_ppm: u64,
    /// The baseline of the whole VM, ppm of one CPU.
    pub baseline_ppm: u64,
}

/// One bucket of history.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sample {
    /// The bucket's start, Unix seconds.
    pub t: u64,
    /// The values (stocks at the bucket's end, flows averaged over it).
    pub p: Point,
}

/// A bucket being filled.
#[derive(Clone, Copy, Debug)]
struct Open {
    t: u64,
    n: u64,
    usage_sum: u64,
    grant_sum: u64,
    last: Point,
}

impl Open {
    fn sample(&self) -> Sample {
        Sample {
            t: self.t,
            p: Point {
                usage_ppm: self.usage_sum / self.n,
                grant_ppm: self.grant_sum / self.n,
                ..self.last
            },
        }
    }
}

/// A ring of samples at one resolution.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ring {
    period_s: u64,
    cap: usize,
    samples: VecDeque<Sample>,
}

impl Ring {
    fn new(period_s: u64, cap: usize) -> Self {
        Ring {
            period_s,
            cap,
            samples: VecDeque::new(),
        }
    }

    fn push(&mut self, s: Sample) {
        match self.samples.back_mut() {
            Some(last) if last.t >= s.t => *last = Sample { t: last.t, p: s.p },
            _ => {
                if self.samples.len() == self.cap {
                    self.samples.pop_front();
                }
                self.samples.push_back(s);
            }
        }
    }

    /// The samples, oldest first.
    pub fn samples(&self) -> impl Iterator<Item = &Sample> {
        self.samples.iter()
    }
}

/// Which buckets a tick closed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Closed {
    /// A 10-second sample.
    pub fine: bool,
    /// A minute: the moment to save.
    pub minute: bool,
}

/// A VM's history at both resolutions, with the buckets being filled.
#[derive(Clone, Debug)]
pub struct History {
    fine: Ring,
    coarse: Ring,
    open: [Option<Open>; 2],
}

impl Default for History {
    fn default() -> Self {
        Self::new()
    }
}

impl History {
    /// An empty history.
    pub fn new() -> Self {
        History {
            fine: Ring::new(FINE_PERIOD_S, FINE_LEN),
            coarse: Ring::new(COARSE_PERIOD_S, COARSE_LEN),
            open: [None, None],
        }
    }

    /// Records the tick measured at `t` (Unix seconds). Returns which buckets it closed.
    pub fn record(&mut self, t: u64, p: Point) -> Closed {
        let mut closed = Closed::default();
        for (i, ring) in [&mut self.fine, &mut self.coarse].into_iter().enumerate() {
            let start = t - t % ring.period_s;
            match &mut self.open[i] {
                Some(o) if o.t == start => {
                    o.n += 1;
                    o.usage_sum += p.usage_ppm;
                    o.grant_sum += p.grant_ppm;
                    o.last = p;
                    continue;
                }
                Some(o) if o.t > start => continue, // the clock stepped back: ignore the tick
                Some(o) => {
                    ring.push(o.sample());
                    if i == 0 {
                        closed.fine = true;
                    } else {
                        closed.minute = true;
                    }
                }
                None => {}
            }
            self.open[i] = Some(Open {
                t: start,
                n: 1,
                usage_sum: p.usage_ppm,
                grant_sum: p.grant_ppm,
                last: p,
            });
        }
        closed
    }

    /// Adds 10-second samples closed after the newest one kept (a running VM's tail, written
    /// by the agent between saves), so [`since`](Self::since) shows them.
    pub fn extend_fine(&mut self, samples: &[Sample]) {
        let newest = self.fine.samples.back().map_or(0, |s| s.t);
        for s in samples.iter().filter(|s| s.t > newest) {
            self.fine.push(*s);
        }
    }

    /// Closes the open buckets (the VM ended, or the agent stops).
    pub fn flush(&mut self) {
        for (i, ring) in [&mut self.fine, &mut self.coarse].into_iter().enumerate() {
            if let Some(o) = self.open[i].take() {
                ring.push(o.sample());
            }
        }
    }

    /// The 10-second ring (last hour).
    pub fn fine(&self) -> &Ring {
        &self.fine
    }

    /// The 1-minute ring (last 8 days).
    pub fn coarse(&self) -> &Ring {
        &self.coarse
    }

    /// The samples at or after `since` (Unix seconds), oldest first, each at the finest
    /// resolution kept for its time; the open buckets are included as they stand.
    pub fn since(&self, since: u64) -> Vec<Sample> {
        let mut fine: Vec<Sample> = self.fine.samples().copied().collect();
        if let Some(o) = &self.open[0] {
            fine.push(o.sample());
        }
        let fine_start = fine.first().map_or(u64::MAX, |s| s.t);
        let mut out: Vec<Sample> = self
            .coarse
            .samples()
            .copied()
            .chain(self.open[1].map(|o| o.sample()))
            .filter(|s| s.t + COARSE_PERIOD_S <= fine_start)
            .collect();
        out.extend(fine);
        out.retain(|s| s.t >= since);
        out
    }

    /// The compact encoding (see the module doc). Open buckets are not included: call
    /// [`flush`](Self::flush) first to keep them.
    pub fn encode(&self) -> Vec<u8> {
        let mut out =
            Vec::with_capacity(16 + 12 * (self.fine.samples.len() + self.coarse.samples.len()));
        out.extend_from_slice(MAGIC);
        for ring in [&self.fine, &self.coarse] {
            put_uvar(&mut out, ring.period_s);
            put_uvar(&mut out, ring.samples.len() as u64);
            let mut prev = [0u64; 7];
            for s in &ring.samples {
                let cur = fields(s);
                for (c, p) in cur.iter().zip(prev.iter()) {
                    put_uvar(&mut out, zigzag(c.wrapping_sub(*p) as i64));
                }
                prev = cur;
            }
        }
        out
    }

    /// Decodes [`encode`](Self::encode)'s output.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        if bytes.get(..4) != Some(MAGIC.as_slice()) {
            return Err(DecodeError("does not start with BQH1".into()));
        }
        let mut at = 4;
        let mut h = History::new();
        for (name, ring) in [("fine", &mut h.fine), ("coarse", &mut h.coarse)] {
            let period = get_uvar(bytes, &mut at, name, "period")?;
            if period != ring.period_s {
                return Err(DecodeError(format!(
                    "{name} ring: period {period} s, expected {} s",
                    ring.period_s
                )));
            }
            let count = get_uvar(bytes, &mut at, name, "count")?;
            if count > ring.cap as u64 {
                return Err(DecodeError(format!(
                    "{name} ring: {count} samples, more than its {}",
                    ring.cap
                )));
            }
            let mut prev = [0u64; 7];
            for _ in 0..count {
                let mut cur = [0u64; 7];
                for (c, p) in cur.iter_mut().zip(prev.iter()) {
                    let d = unzigzag(get_uvar(bytes, &mut at, name, "sample")?);
                    *c = p.wrapping_add(d as u64);
                }
                let s = Sample {
                    t: cur[0],
                    p: Point {
                        balance_mc: cur[1],
                        surplus_mc: cur[2],
                        charged_mc: cur[3],
                        usage_ppm: cur[4],
                        grant_ppm: cur[5],
                        baseline_ppm: cur[6],
                    },
                };
                if ring.samples.back().is_some_and(|l| l.t >= s.t) {
                    return Err(DecodeError(format!(
                        "{name} ring: time goes back at {}",
                        s.t
                    )));
                }
                ring.samples.push_back(s);
                prev = cur;
            }
        }
        if at != bytes.len() {
            return Err(DecodeError(format!(
                "{} bytes of trailing garbage",
                bytes.len() - at
            )));
        }
        Ok(h)
    }
}

/// A history file that cannot be read.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("bad history: {0}")]
pub struct DecodeError(String);

fn fields(s: &Sample) -> [u64; 7] {
    let p = &s.p;
    [
        s.t,
        p.balance_mc,
        p.surplus_mc,
        p.charged_mc,
        p.usage_ppm,
        p.grant_ppm,
        p.baseline_ppm,
    ]
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

fn put_uvar(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn get_uvar(bytes: &[u8], at: &mut usize, ring: &str, what: &str) -> Result<u64, DecodeError> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let Some(&b) = bytes.get(*at) else {
            return Err(DecodeError(format!(
                "{ring} ring: truncated {what} at byte {at}",
                at = *at
            )));
        };
        *at += 1;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err(DecodeError(format!(
        "{ring} ring: {what} varint longer than 10 bytes at byte {at}",
        at = *at
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn point(balance_mc: u64, usage_ppm: u64) -> Point {
        Point {
            balance_mc,
            usage_ppm,
            grant_ppm: 2_000_000,
            baseline_ppm: 200_000,
            ..Point::default()
        }
    }

    #[test]
    fn buckets_keep_the_last_stock_and_the_mean_flow() {
        let mut h = History::new();
        assert_eq!(h.record(100, point(10, 100)), Closed::default());
        h.record(105, point(9, 300));
        assert_eq!(
            h.record(110, point(8, 500)), // closes fine bucket 100
            Closed {
                fine: true,
                minute: false
            }
        );
        assert_eq!(
            h.fine().samples().copied().collect::<Vec<_>>(),
            vec![Sample {
                t: 100,
                p: point(9, 200)
            }]
        );
        assert!(h.record(120, point(7, 0)).minute); // closes minute 60
        let minute = h.coarse().samples().next().unwrap();
        assert_eq!(
            (minute.t, minute.p.balance_mc, minute.p.usage_ppm),
            (60, 8, 300)
        );
    }

    #[test]
    fn rings_are_bounded_and_since_prefers_fine_samples() {
        let mut h = History::new();
        let week = 9 * 24 * 3600;
        for t in (0..week).step_by(5) {
            h.record(t, point(t, 1));
        }
        // The promise, in literals (not the constants under test): an hour of 10-second
        // samples, 8 days of minutes (a day more than the week promised).
        assert_eq!(h.fine().samples().count(), 3600 / 10);
        assert_eq!(h.coarse().samples().count(), 8 * 24 * 60);
        // The last tick (week − 5 s) is in the open buckets that start at week − 10 s and
        // week − 60 s; the newest closed ones start a period earlier, the oldest kept 359 fine
        // and 11 519 coarse periods before those.
        assert_eq!(h.fine().samples().next().unwrap().t, week - 20 - 359 * 10);
        assert_eq!(
            h.coarse().samples().next().unwrap().t,
            week - 120 - 11_519 * 60
        );
        let s = h.since(week - 2 * 3600);
        // An hour of minutes, then an hour of 10-second samples (the open one included).
        assert_eq!(s.first().unwrap().t, week - 2 * 3600);
        assert!(s.windows(2).all(|w| w[0].t < w[1].t));
        let fine_start = h.fine().samples().next().unwrap().t;
        assert_eq!(s.iter().filter(|x| x.t >= fine_start).count(), 360 + 1);
    }

    #[test]
    fn a_restart_within_a_bucket_replaces_it_and_a_clock_step_back_is_ignored() {
        let mut h = History::new();
        h.record(100, point(5, 0));
        h.flush();
        h.record(101, point(6, 0));
        h.record(50, point(1, 0));
        h.flush();
        let fine: Vec<_> = h.fine().samples().collect();
        assert_eq!(fine.len(), 1);
        assert_eq!(fine[0].p.balance_mc, 6);
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(History::decode(b"").is_err());
        assert!(History::decode(b"BQH1").is_err());
        assert!(History::decode(b"BQH1\x0a\xff\xff").is_err());
        let mut good = History::new().encode();
        good.push(0);
        assert!(History::decode(&good)
            .unwrap_err()
            .to_string()
            .contains("trailing"));
    }

    proptest! {
        #[test]
        fn encoding_round_trips(ticks in prop::collection::vec((0u64..40, any::<u32>(), 0u64..3_000_000), 0..400)) {
            let mut h = History::new();
            let mut t = 1_700_000_000;
            for (dt, bal, usage) in ticks {
                t += dt;
                h.record(t, point(u64::from(bal), usage));
            }
            h.flush();
            let d = History::decode(&h.encode()).unwrap();
            prop_assert_eq!(&d.fine, &h.fine);
            prop_assert_eq!(&d.coarse, &h.coarse);
        }

        #[test]
        fn decoding_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
            let mut b = MAGIC.to_vec();
            b.extend(bytes);
            let _ = History::decode(&b);
        }
    }
}
