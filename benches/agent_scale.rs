//! The agent's loop beyond this machine: one agent second (a rescan and five ticks: measure,
//! charge, contend, enforce, publish, persist, history, metrics) for 100 to 10 000 VMs, on a
//! synthetic host.
//!
//! ```sh
//! flock /work/.cpu.lock cargo bench --bench agent_scale
//! BQ_SCALE_VMS=500,1000 BQ_SCALE_SVG=docs/agent-scale.svg cargo bench --bench agent_scale
//! ```
//!
//! For each N a host is built under `/var/tmp` (on disk, as the ≤ 3 % target at 500 VMs asks):
//! - a state dir with N runtime dirs, each VM placed as `burst-qemu adopt` places one
//!   ([`state::place_foreign`]: an adopted QEMU, live while its pid and start time match) and a
//!   config file per VM written by [`config::save`], so neither format can drift;
//! - a `/proc` of plain files: per VM a QEMU pid (above any real `pid_max`, so nothing could
//!   ever act on a real process) with its `stat` (start time), two vCPU threads with `comm` and
//!   `schedstat`, and the boot id. Before every tick each thread's counters move on by its load
//!   times the time that passed (most VMs near idle, some busy, one in twenty spending a low
//!   balance, so quotas decline and get rewritten; with `BQ_SCALE_FLEET=idle` every thread is
//!   halted, as the real VMs of `examples/scale.rs`);
//! - a cgroup v2 tree of plain files that the real [`CgroupEnforcer`] writes into; after the
//!   adoption each VM's `cgroup.threads` lists both threads, as the kernel's would (a plain
//!   file keeps only the last write).
//!
//! The agent runs with contention on (2 CPUs) and metrics kept (see `agent::sim`). Criterion
//! times one agent second in **CPU time of the process** (all its threads, user and system:
//! what `examples/scale.rs` reads from the real agent's `schedstat`), not wall time: the ledger
//! fsyncs wait on the disk without using a core. The table printed at the end splits the second
//! into rescan, the tick that publishes and persists, and the four plain ticks, with the wall
//! time beside; `BQ_SCALE_SVG=PATH` also draws CPU per second and per plain tick against N,
//! log-log, with a line of slope 1 through the smallest N (growth beyond linear rises above it).
//!
//! Left out: QEMU itself, the launchers (which wait on the agent's pidfd, and probe its lock
//! every 10 s), libvirt, `credits --set` and config edits, metrics scrapes, the balancers.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use burst_qemu::agent::sim::{Driver, SyntheticHost};
use burst_qemu::agent::Settings;
use burst_qemu::config::VmConfig;
use burst_qemu::credit::{Baseline, Credits, Policy, Rate, PPM_PER_CPU};
use burst_qemu::enforce::cgroup::{self, CgroupEnforcer, Version};
use criterion::{BenchmarkId, Criterion, SamplingMode};

/// The fleet sizes, unless `BQ_SCALE_VMS` lists others.
const SIZES: [usize; 5] = [100, 500, 1_000, 5_000, 10_000];
/// The first synthetic pid: above the kernel's largest `pid_max` (2^22).
const PID_BASE: u32 = 5_000_000;
/// The descriptor limit of a systemd service (its default hard `LimitNOFILE`), to which the
/// agent raises its soft limit: it keeps each vCPU's `schedstat` open up to half of it.
const SERVICE_NOFILE: u64 = 524_288;

/// One synthetic VM: its QEMU pid, its two vCPU threads' counters, and its load.
struct SimVm {
    pid: u32,
    run: [u64; 2],
    wait: [u64; 2],
    /// CPU per vCPU thread, in millionths of a CPU.
    load_ppm: u64,
}

impl SimVm {
    fn tid(&self, k: usize) -> u32 {
        self.pid + 1 + k as u32
    }
}

/// The synthetic host of one fleet.
struct Host {
    host: SyntheticHost,
    cgroup_dir: PathBuf,
    vms: Vec<SimVm>,
    /// When the counters last moved on.
    advanced: Instant,
}

fn name(i: usize) -> String {
    format!("vm{i:05}")
}

impl Host {
    /// Builds the host of `n` VMs (see the module's docs).
    fn build(n: usize) -> Host {
        let host = SyntheticHost::new(Path::new(&format!(
            "/var/tmp/bq-agent-scale-{}-{n}",
            std::process::id()
        )));
        let cgroup_dir = host.root.join("cgroup");
        fs::create_dir_all(&cgroup_dir).unwrap();
        let mut host = Host {
            host,
            cgroup_dir,
            vms: Vec::with_capacity(n),
            advanced: Instant::now(),
        };
        for i in 0..n {
            let vm = SimVm {
                pid: PID_BASE + 3 * i as u32,
                run: [1_000_000_000; 2],
                wait: [1_000_000; 2],
                load_ppm: load_ppm(i),
            };
            let policy = Policy::new(
                2,
                Baseline::from_percent([10.0, 20.0, 40.0][i % 3]).unwrap(),
            )
            .unwrap();
            let cfg = VmConfig {
                initial_credits: Policy::default_initial_credits(2),
                // The busy ones start nearly empty: they decline, and their quotas move.
                credits: (i % 20 == 0).then(|| Credits::from_credits(1.0).unwrap()),
                policy,
                disk_share: None,
                cpus: None,
                memory: None,
            };
            let tids = [vm.tid(0), vm.tid(1)];
            host.host
                .add_vm(&name(i), vm.pid, 1_000 + i as u64, &tids, &cfg);
            host.write_schedstat(&vm);
            host.vms.push(vm);
        }
        host
    }

    fn write_schedstat(&self, vm: &SimVm) {
        for k in 0..2 {
            self.host
                .write_schedstat(vm.pid, vm.tid(k), vm.run[k], vm.wait[k]);
        }
    }

    /// Moves every thread's counters on by its load over the time since the last call (and
    /// its run-queue wait by a tenth of that).
    fn advance(&mut self) {
        let ns = self.advanced.elapsed().as_nanos() as u64;
        self.advanced = Instant::now();
        for i in 0..self.vms.len() {
            let vm = &mut self.vms[i];
            let ran = ns * vm.load_ppm / PPM_PER_CPU;
            for k in 0..2 {
                vm.run[k] += ran;
                vm.wait[k] += ran / 10;
            }
            self.write_schedstat(&self.vms[i]);
        }
    }

    /// What the kernel does on each write to `cgroup.threads` and a plain file does not: every
    /// VM's group lists both its vCPU threads (else every verification would "repair" it).
    fn settle_cgroups(&self, instance_root: &Path) {
        for (i, vm) in self.vms.iter().enumerate() {
            let threads = instance_root.join(name(i)).join("vcpus/cgroup.threads");
            fs::write(threads, format!("{}\n{}\n", vm.tid(0), vm.tid(1))).unwrap();
        }
    }

    fn settings(&self) -> Settings {
        Settings {
            contention: Some(Rate(2 * PPM_PER_CPU)),
            ..self.host.settings()
        }
    }
}

/// This process's CPU time (all threads, user and system).
fn cpu_now() -> Duration {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_PROCESS_CPUTIME_ID).unwrap();
    Duration::new(t.tv_sec() as u64, t.tv_nsec() as u32)
}

/// CPU and wall time of the parts of the agent seconds run for one fleet.
#[derive(Default, Clone, Copy)]
struct Costs {
    vms: usize,
    seconds: u32,
    rescan: Duration,
    due_tick: Duration,
    plain_ticks: Duration,
    wall: Duration,
}

impl Costs {
    fn per_second(&self) -> Duration {
        (self.rescan + self.due_tick + self.plain_ticks) / self.seconds.max(1)
    }
    fn plain_tick(&self) -> Duration {
        self.plain_ticks / (4 * self.seconds.max(1))
    }
}

/// One agent second: a rescan and the tick that finds publish, persist and contention due,
/// then four plain ticks; the counters move on before each tick, and the driver is told what is
/// due (neither timed).
fn second(d: &mut Driver, host: &mut Host, costs: &mut Costs) -> Duration {
    let mut cpu = Duration::ZERO;
    let mut timed = |f: &mut dyn FnMut(), into: &mut Duration, wall: &mut Duration| {
        let (c, w) = (cpu_now(), Instant::now());
        f();
        let spent = cpu_now() - c;
        *wall += w.elapsed();
        *into += spent;
        cpu += spent;
    };
    host.advance();
    d.due(true);
    let mut stop = false;
    timed(
        &mut || stop = !d.rescan(),
        &mut costs.rescan,
        &mut costs.wall,
    );
    if stop {
        // SIGINT or SIGTERM: exit skips the destructors, so the host goes first.
        let _ = fs::remove_dir_all(&host.host.root);
        std::process::exit(130);
    }
    timed(&mut || d.tick(), &mut costs.due_tick, &mut costs.wall);
    for _ in 0..4 {
        host.advance();
        d.due(false);
        timed(&mut || d.tick(), &mut costs.plain_ticks, &mut costs.wall);
    }
    costs.seconds += 1;
    cpu
}

/// Builds the fleet of `n` VMs, has the agent adopt it, and benchmarks its seconds.
fn fleet(c: &mut Criterion, n: usize) -> Option<Costs> {
    let mut costs = Costs {
        vms: n,
        ..Costs::default()
    };
    let mut group = c.benchmark_group("agent second");
    group
        .sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .warm_up_time(Duration::from_secs(if n >= 5_000 { 1 } else { 2 }))
        .measurement_time(Duration::from_secs(if n >= 5_000 { 4 } else { 8 }));
    // Criterion calls the routine once per sample: the fleet is built at the first call.
    let mut fleet: Option<(Host, Driver)> = None;
    group.bench_function(BenchmarkId::from_parameter(n), |b| {
        let (host, d) = fleet.get_or_insert_with(|| adopted(n));
        b.iter_custom(|iters| (0..iters).map(|_| second(d, host, &mut costs)).sum());
    });
    let (_, d) = fleet.as_ref()?;
    assert_eq!(d.vms(), n, "no VM lost on the way");
    assert_eq!(d.save_failures(), 0);
    group.finish();
    Some(costs)
}

/// The host of `n` VMs, and an agent that has adopted them and run eleven seconds.
fn adopted(n: usize) -> (Host, Driver) {
    let built = Instant::now();
    let mut host = Host::build(n);
    let settings = host.settings();
    let enforcer = CgroupEnforcer::new(
        Version::V2,
        &host.cgroup_dir,
        &cgroup::instance_name(&settings.state_dir),
    )
    .unwrap();
    let instance_root = enforcer.root().to_owned();
    let built_s = built.elapsed().as_secs_f64();
    let mut d = Driver::start(settings, Box::new(enforcer)).unwrap();
    assert_eq!(d.vms(), n, "every synthetic VM adopted");
    host.settle_cgroups(&instance_root);
    // Eleven seconds before timing: what adoption left due is done, and the first 10-second
    // history sample has closed, whose tail files' companions are created once per VM.
    for _ in 0..11 {
        second(&mut d, &mut host, &mut Costs::default());
    }
    let ledgers = fs::read_dir(burst_qemu::state::ledger_dir(&host.host.data_dir))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .is_ok_and(|e| e.path().extension().is_some_and(|x| x == "json"))
        })
        .count();
    assert_eq!(ledgers, n, "a ledger per VM");
    eprintln!(
        "{n} VMs: host built in {built_s:.1} s, adopted (and 11 seconds run) in {:.1} s",
        built.elapsed().as_secs_f64() - built_s
    );
    (host, d)
}

/// Raises this process's descriptor limit to a service's (root only; else it stays).
fn raise_limit() {
    let lim = libc::rlimit {
        rlim_cur: SERVICE_NOFILE,
        rlim_max: SERVICE_NOFILE,
    };
    // SAFETY: setrlimit reads one rlimit through a valid pointer.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
        eprintln!(
            "cannot raise the descriptor limit to {SERVICE_NOFILE} (not root?): beyond half the \
             limit in vCPU threads, schedstat is read by path"
        );
    }
    burst_qemu::procfs::raise_nofile();
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn print_table(all: &[Costs]) {
    println!(
        "\n| VMs | rescan | tick with publish + persist | plain tick | agent second (CPU) | % of a core | wall per second |"
    );
    println!("|---|---|---|---|---|---|---|");
    for c in all {
        let s = c.seconds.max(1);
        println!(
            "| {} | {:.2} ms | {:.2} ms | {:.3} ms | {:.2} ms | {:.2} % | {:.2} ms |",
            c.vms,
            ms(c.rescan / s),
            ms(c.due_tick / s),
            ms(c.plain_tick()),
            ms(c.per_second()),
            ms(c.per_second()) / 10.0,
            ms(c.wall / s),
        );
    }
}

/// The load of VM `i`'s threads: the mixed fleet (most near idle, three in twenty at 30 %, one
/// in twenty busy), or with `BQ_SCALE_FLEET=idle` none at all (halted guests, as the VMs of
/// `examples/scale.rs`).
fn load_ppm(i: usize) -> u64 {
    if std::env::var("BQ_SCALE_FLEET").is_ok_and(|f| f == "idle") {
        return 0;
    }
    match i % 20 {
        0 => PPM_PER_CPU,
        5 | 10 | 15 => PPM_PER_CPU * 3 / 10,
        _ => PPM_PER_CPU / 50,
    }
}

fn main() {
    raise_limit();
    match std::env::var("BQ_SCALE_FLEET").as_deref() {
        Err(_) | Ok("mixed") => println!("fleet: mixed (BQ_SCALE_FLEET=idle: all halted)"),
        Ok("idle") => println!("fleet: idle, every vCPU thread halted"),
        Ok(other) => panic!("BQ_SCALE_FLEET={other}: mixed or idle"),
    }
    let sizes: Vec<usize> = match std::env::var("BQ_SCALE_VMS") {
        Ok(list) => list
            .split(',')
            .map(|n| {
                n.trim()
                    .parse()
                    .expect("BQ_SCALE_VMS: comma-separated VM counts")
            })
            .collect(),
        Err(_) => SIZES.to_vec(),
    };
    let mut c = Criterion::default().configure_from_args();
    let all: Vec<Costs> = sizes.iter().filter_map(|&n| fleet(&mut c, n)).collect();
    c.final_summary();
    print_table(&all);
    if let Ok(path) = std::env::var("BQ_SCALE_SVG") {
        plot::draw(Path::new(&path), &all);
        println!("drawn: {path}");
    }
}

mod plot {
    //! CPU per agent second and per plain tick against the VM count, log-log, each with a
    //! line of slope 1 (cost proportional to N) through its smallest N.

    use std::path::Path;

    use plotters::prelude::*;

    use super::{ms, Costs};

    /// A named, coloured line of (VMs, ms) points.
    type Series = (&'static str, RGBColor, Vec<(f64, f64)>);

    pub fn draw(path: &Path, all: &[Costs]) {
        let series: [Series; 2] = [
            (
                "agent second (rescan + 5 ticks)",
                BLUE,
                all.iter()
                    .map(|c| (c.vms as f64, ms(c.per_second())))
                    .collect(),
            ),
            (
                "plain tick",
                RED,
                all.iter()
                    .map(|c| (c.vms as f64, ms(c.plain_tick())))
                    .collect(),
            ),
        ];
        let points = || series.iter().flat_map(|s| s.2.iter().copied());
        let (x0, x1) = points().fold((f64::MAX, 0f64), |(a, b), (x, _)| (a.min(x), b.max(x)));
        let (y0, y1) = points().fold((f64::MAX, 0f64), |(a, b), (_, y)| (a.min(y), b.max(y)));
        let root = SVGBackend::new(path, (900, 600)).into_drawing_area();
        root.fill(&WHITE).unwrap();
        let mut chart = ChartBuilder::on(&root)
            .caption(
                "burst-qemu agent, simulated host: CPU against VM count",
                ("sans-serif", 20),
            )
            .margin(15)
            .x_label_area_size(45)
            .y_label_area_size(70)
            .build_cartesian_2d(
                (x0 * 0.8..x1 * 1.25).log_scale(),
                (y0 * 0.5..y1 * 2.0).log_scale(),
            )
            .unwrap();
        chart
            .configure_mesh()
            .x_desc("VMs (2 vCPUs each)")
            .y_desc("CPU, ms (per second: 10 ms = 1 % of a core)")
            .draw()
            .unwrap();
        for (label, color, pts) in &series {
            let Some(&(n0, c0)) = pts.first() else {
                continue;
            };
            let linear: Vec<(f64, f64)> = pts.iter().map(|&(n, _)| (n, c0 * n / n0)).collect();
            chart
                .draw_series(LineSeries::new(linear, color.mix(0.35)))
                .unwrap()
                .label(format!("{label}: linear from {n0}"))
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color.mix(0.35)));
            chart
                .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
                .unwrap()
                .label(*label)
                .legend(move |(x, y)| {
                    PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2))
                });
            chart
                .draw_series(pts.iter().map(|&p| Circle::new(p, 4, color.filled())))
                .unwrap();
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .unwrap();
        root.present().unwrap();
    }
}
