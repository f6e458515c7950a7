//! `burst-qemu top`: a live full-screen view of the fleet's credits (ratatui over crossterm).
//!
//! Each second it reads what the agent publishes (`credits.json` of each running VM) and the
//! ledgers of stopped VMs; the balance sparklines start from each VM's saved 10-second history
//! and go on with what `top` itself reads. The terminal is restored on every way out: `q`,
//! Esc or Ctrl-C, SIGTERM/SIGINT/SIGHUP (caught and turned into a quit), an error, and a panic
//! (a hook restores it before the message is printed).

use std::collections::{HashMap, VecDeque};
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use burst_qemu::agent::history_file::{self, history_path};
use burst_qemu::base::unix_now;
use burst_qemu::view::CreditsView;
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
use ratatui::crossterm::terminal::{
    disable_raw_mode, enable_raw_mode, EnterAlternateScreen, LeaveAlternateScreen,
};
use ratatui::crossterm::{cursor, execute};
use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Color, Modifier, Style};
use ratatui::symbols;
use ratatui::text::Line;
use ratatui::widgets::{Axis, Block, Chart, Dataset, GraphType, Paragraph, Row, Table, TableState};
use ratatui::Terminal;

use super::observe::fleet;
use super::Failure;

const REFRESH: Duration = Duration::from_secs(1);
const HOUR_S: u64 = 3600;
const BAR: usize = 20;
const SPARK: usize = 24;

static QUIT: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    QUIT.store(true, Ordering::Relaxed);
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Sort {
    Name,
    Balance,
    Usage,
    Empty,
}

impl Sort {
    fn label(self) -> &'static str {
        match self {
            Sort::Name => "name",
            Sort::Balance => "balance",
            Sort::Usage => "usage",
            Sort::Empty => "time to empty",
        }
    }
}

/// Restores the terminal when dropped.
struct Restore;

fn restore_terminal() {
    let _ = disable_raw_mode();
    let _ = execute!(io::stdout(), LeaveAlternateScreen, cursor::Show);
}

impl Drop for Restore {
    fn drop(&mut self) {
        restore_terminal();
    }
}

struct App {
    views: Vec<CreditsView>,
    curves: HashMap<String, VecDeque<(u64, f64)>>,
    sort: Sort,
    table: TableState,
}

impl App {
    fn refresh(&mut self, state_dir: &Path, data_dir: &Path) {
        let selected = self
            .table
            .selected()
            .and_then(|i| self.views.get(i))
            .map(|v| v.name.clone());
        let mut views = fleet(state_dir, data_dir);
        let now = unix_now();
        for v in &views {
            let curve = self.curves.entry(v.name.clone()).or_insert_with(|| {
                history_file::load(&history_path(data_dir, &v.name))
                    .ok()
                    .flatten()
                    .map(|h| {
                        h.since(now.saturating_sub(HOUR_S))
                            .iter()
                            .map(|s| (s.t, s.p.balance_mc as f64 / 1000.0))
                            .collect()
                    })
                    .unwrap_or_default()
            });
            if v.state == "running" {
                curve.push_back((now, v.balance));
            }
            while curve.front().is_some_and(|(t, _)| t + HOUR_S < now) {
                curve.pop_front();
            }
        }
        let key = |v: &CreditsView| -> f64 {
            match self.sort {
                Sort::Name => 0.0,
                Sort::Balance => -v.balance,
                Sort::Usage => -v.usage_pct.unwrap_or(-1.0),
                Sort::Empty => v.time_to_empty_s.unwrap_or(f64::INFINITY),
            }
        };
        views.sort_by(|a, b| key(a).total_cmp(&key(b)).then(a.name.cmp(&b.name)));
        let index = selected
            .and_then(|n| views.iter().position(|v| v.name == n))
            .or(if views.is_empty() { None } else { Some(0) });
        self.table.select(index);
        self.views = views;
    }
}

/// The usage bar: `█` up to the usage, `░` on to the grant, `|` at the baseline.
fn bar(v: &CreditsView) -> String {
    let cell = |pct: f64| ((pct / 100.0 * BAR as f64).round() as usize).min(BAR);
    let used = cell(v.usage_pct.unwrap_or(0.0));
    let grant = cell(v.grant_pct.unwrap_or(0.0));
    let base = cell(v.baseline).min(BAR - 1);
    (0..BAR)
        .map(|i| match i {
            i if i == base => '|',
            i if i < used => '█',
            i if i < grant => '░',
            _ => '·',
        })
        .collect()
}

fn sparkline(curve: &VecDeque<(u64, f64)>) -> String {
    const LEVELS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];
    let pts: Vec<f64> = curve.iter().map(|(_, b)| *b).collect();
    if pts.is_empty() {
        return String::new();
    }
    let max = pts.iter().copied().fold(0.0, f64::max).max(1e-9);
    (0..SPARK.min(pts.len()))
        .map(|i| {
            let j = i * pts.len() / SPARK.min(pts.len());
            LEVELS[((pts[j] / max) * 7.0).round().clamp(0.0, 7.0) as usize]
        })
        .collect()
}

fn duration(s: Option<f64>) -> String {
    s.map_or("-".into(), |s| {
        let s = s.round() as u64;
        format!("{}h{:02}m{:02}s", s / 3600, s / 60 % 60, s % 60)
    })
}

fn draw(f: &mut ratatui::Frame, app: &mut App) {
    let [head, table_area, detail] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Min(4),
        Constraint::Length(12),
    ])
    .areas(f.area());
    f.render_widget(
        Paragraph::new(format!(
            "burst-qemu top: {} VMs   sort: {}   keys: n b u e sort, ↑↓ select, q quit",
            app.views.len(),
            app.sort.label()
        ))
        .style(Style::default().add_modifier(Modifier::BOLD)),
        head,
    );
    draw_table(f, app, table_area);
    let Some(v) = app.table.selected().and_then(|i| app.views.get(i)) else {
        f.render_widget(
            Paragraph::new("no VMs").block(Block::bordered().title("detail")),
            detail,
        );
        return;
    };
    draw_detail(f, v, app.curves.get(&v.name), detail);
}

/// The fleet's table, one row per VM.
fn draw_table(f: &mut ratatui::Frame, app: &mut App, table_area: ratatui::layout::Rect) {
    let rows: Vec<Row> = app
        .views
        .iter()
        .map(|v| {
            Row::new(vec![
                v.name.clone(),
                v.state.clone(),
                v.mode.to_string(),
                format!("{:.3}", v.balance),
                bar(v),
                v.usage_pct.map_or("-".into(), |u| format!("{u:.1}%")),
                v.grant_pct.map_or("-".into(), |g| format!("{g:.1}%")),
                duration(v.time_to_empty_s),
                app.curves.get(&v.name).map(sparkline).unwrap_or_default(),
            ])
        })
        .collect();
    let widths = [
        Constraint::Length(14),
        Constraint::Length(8),
        Constraint::Length(9),
        Constraint::Length(10),
        Constraint::Length(BAR as u16),
        Constraint::Length(7),
        Constraint::Length(7),
        Constraint::Length(10),
        Constraint::Length(SPARK as u16),
    ];
    let table = Table::new(rows, widths)
        .header(
            Row::new(vec![
                "NAME",
                "STATE",
                "MODE",
                "BALANCE",
                "USAGE|GRANT",
                "USAGE",
                "GRANT",
                "EMPTY IN",
                "BALANCE 1h",
            ])
            .style(Style::default().add_modifier(Modifier::BOLD)),
        )
        .row_highlight_style(Style::default().add_modifier(Modifier::REVERSED))
        .block(Block::bordered().title("VMs"));
    f.render_stateful_widget(table, table_area, &mut app.table);
}

/// The selected VM's figures and its balance over the last hour.
fn draw_detail(
    f: &mut ratatui::Frame,
    v: &CreditsView,
    curve: Option<&VecDeque<(u64, f64)>>,
    detail: ratatui::layout::Rect,
) {
    let [text, chart] =
        Layout::horizontal([Constraint::Length(36), Constraint::Min(10)]).areas(detail);
    let lines = vec![
        Line::from(format!("{} ({}, {})", v.name, v.state, v.mode)),
        Line::from(format!("balance  {:.3} credits", v.balance)),
        Line::from(format!("surplus  {:.3}", v.surplus)),
        Line::from(format!("charged  {:.3}", v.charged)),
        Line::from(format!("earn     {:.3} credits/h", v.earn_per_hour)),
        Line::from(format!(
            "usage    {} of grant {}",
            v.usage_pct.map_or("-".into(), |u| format!("{u:.1}%")),
            v.grant_pct.map_or("-".into(), |g| format!("{g:.1}%"))
        )),
        Line::from(format!("baseline {} % x {} vCPU", v.baseline, v.vcpus)),
        Line::from(format!("empty in {}", duration(v.time_to_empty_s))),
        Line::from(
            v.config_error
                .clone()
                .map_or(String::new(), |e| format!("config: {e}")),
        ),
    ];
    f.render_widget(
        Paragraph::new(lines).block(Block::bordered().title("detail")),
        text,
    );
    let now = unix_now() as f64;
    let pts: Vec<(f64, f64)> = curve
        .map(|c| {
            c.iter()
                .map(|(t, b)| ((*t as f64 - now) / 60.0, *b))
                .collect()
        })
        .unwrap_or_default();
    let max = pts.iter().map(|p| p.1).fold(1.0, f64::max) * 1.1;
    let chart_widget = Chart::new(vec![Dataset::default()
        .name("balance")
        .marker(symbols::Marker::Braille)
        .graph_type(GraphType::Line)
        .style(Style::default().fg(Color::Cyan))
        .data(&pts)])
    .block(Block::bordered().title(format!("{}: balance, last hour", v.name)))
    .x_axis(
        Axis::default()
            .bounds([-60.0, 0.0])
            .labels(["-60 min", "-30", "now"]),
    )
    .y_axis(
        Axis::default()
            .bounds([0.0, max])
            .labels(["0".to_string(), format!("{max:.1}")]),
    );
    f.render_widget(chart_widget, chart);
}

/// Ends the process when the terminal hangs up, or when a signal's quit is not taken up
/// within a second: crossterm's reader spins on a closed terminal inside `poll` and would
/// never return to the loop.
fn watch_terminal() {
    std::thread::spawn(|| {
        let mut quit_seen: Option<Instant> = None;
        loop {
            let mut fd = libc::pollfd {
                fd: 0,
                events: 0,
                revents: 0,
            };
            // SAFETY: one valid pollfd, count 1; poll only writes its revents.
            let n = unsafe { libc::poll(&mut fd, 1, 200) };
            let hung_up =
                n > 0 && fd.revents & (libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0;
            if QUIT.load(Ordering::Relaxed) {
                quit_seen.get_or_insert_with(Instant::now);
            }
            if hung_up || quit_seen.is_some_and(|t| t.elapsed() > Duration::from_secs(1)) {
                restore_terminal();
                std::process::exit(0);
            }
            if n != 0 {
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    });
}

/// Runs `top` until `q`, Esc, Ctrl-C or a signal.
pub fn run(state_dir: &Path, data_dir: &Path) -> Result<(), Failure> {
    for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe {
            libc::signal(sig, on_signal as *const () as libc::sighandler_t);
        }
    }
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        restore_terminal();
        default_hook(info);
    }));
    enable_raw_mode()
        .context("putting the terminal in raw mode (top needs a terminal)")
        .map_err(Failure::host)?;
    let _restore = Restore;
    execute!(io::stdout(), EnterAlternateScreen, cursor::Hide)
        .context("entering the alternate screen")
        .map_err(Failure::host)?;
    watch_terminal();
    let mut terminal = Terminal::new(ratatui::backend::CrosstermBackend::new(io::stdout()))
        .context("opening the terminal")
        .map_err(Failure::host)?;
    let mut app = App {
        views: Vec::new(),
        curves: HashMap::new(),
        sort: Sort::Name,
        table: TableState::default(),
    };
    let mut next = Instant::now();
    while !QUIT.load(Ordering::Relaxed) {
        if Instant::now() >= next {
            app.refresh(state_dir, data_dir);
            terminal
                .draw(|f| draw(f, &mut app))
                .context("drawing")
                .map_err(Failure::host)?;
            // The panic path's test (tests/observe.rs): a panic with the first frame shown.
            if std::env::var_os("BURST_QEMU_TOP_TEST_PANIC").is_some() {
                panic!("BURST_QEMU_TOP_TEST_PANIC: a panic in top, for the tests");
            }
            next = Instant::now() + REFRESH;
        }
        let wait = next
            .saturating_duration_since(Instant::now())
            .min(Duration::from_millis(200));
        if !event::poll(wait)
            .context("reading keys")
            .map_err(Failure::host)?
        {
            continue;
        }
        let Event::Key(k) = event::read()
            .context("reading keys")
            .map_err(Failure::host)?
        else {
            continue;
        };
        if k.kind != KeyEventKind::Press {
            continue;
        }
        let n = app.views.len();
        let sel = app.table.selected().unwrap_or(0);
        match k.code {
            KeyCode::Char('q') | KeyCode::Esc => break,
            KeyCode::Char('c') if k.modifiers.contains(KeyModifiers::CONTROL) => break,
            KeyCode::Down | KeyCode::Char('j') if n > 0 => app.table.select(Some((sel + 1) % n)),
            KeyCode::Up | KeyCode::Char('k') if n > 0 => app.table.select(Some((sel + n - 1) % n)),
            KeyCode::Char('n') => app.sort = Sort::Name,
            KeyCode::Char('b') => app.sort = Sort::Balance,
            KeyCode::Char('u') => app.sort = Sort::Usage,
            KeyCode::Char('e') => app.sort = Sort::Empty,
            _ => continue,
        }
        next = Instant::now(); // show the change at once
    }
    Ok(())
}
