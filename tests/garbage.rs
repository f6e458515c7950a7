//! Garbage in, an error out, never a panic: arbitrary bytes fed to the config parser, the
//! ledger loader and the QMP reader (the three places where burst-qemu reads what others
//! wrote: operators, a crashed or full disk, a misbehaving QEMU).

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use burst_qemu::agent::LedgerFile;
use burst_qemu::config;
use proptest::prelude::*;

const GREETING: &str = r#"{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": ""}, "capabilities": []}}"#;

/// Bytes that are mostly near-misses of what the reader expects: valid text cut, spliced and
/// sprinkled with arbitrary bytes, plus fully arbitrary bytes.
fn near(valid: &'static str) -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..600),
        (0..=valid.len(), prop::collection::vec(any::<u8>(), 0..40)).prop_map(
            move |(cut, junk)| {
                let mut v = valid.as_bytes()[..cut].to_vec();
                v.extend(junk);
                v
            }
        ),
        (0..valid.len(), any::<u8>()).prop_map(move |(at, b)| {
            let mut v = valid.as_bytes().to_vec();
            v[at] = b;
            v
        }),
    ]
}

const CONFIG: &str = "vcpus = 2\nbaseline = 10\nmode = \"unlimited\"\nmax_credits = 100\n\
    max_surplus = 50\ndecline_minutes = 20\ninitial_credits = 30\ncredits = 5\n";

const LEDGER: &str = r#"{"name":"a","vcpus":1,"policy":{"vcpus":1,"baseline":100000,"mode":"standard","max_credits":8640000000000,"max_surplus":8640000000000,"decline_ns":1200000000000},"balances":{"earned":1,"launch":2,"surplus":0,"charged":0,"earn_remainder":0,"debt":0},"credits_applied":null,"used_total":3,"checkpoint":{"boot_id":"b","boottime_ns":1,"qemu_pid":2,"qemu_start":3,"cpu_ns":[[4,5]]}}"#;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn the_config_parser_answers_garbage_with_an_error_naming_the_file(bytes in near(CONFIG)) {
        let text = String::from_utf8_lossy(&bytes);
        if let Err(e) = config::from_text(Path::new("vms/x.toml"), &text) {
            prop_assert!(e.to_string().contains("vms/x.toml"), "{e}");
        }
    }

    #[test]
    fn the_ledger_loader_answers_garbage_with_an_error(bytes in near(LEDGER)) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.json");
        std::fs::write(&path, &bytes).unwrap();
        // Ok for the rare mutation that is still a ledger; never a panic.
        let _ = LedgerFile::load(&path);
    }

    #[test]
    fn the_qmp_reader_answers_a_garbage_greeting_with_an_error(bytes in near(GREETING)) {
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        let writer = std::thread::spawn(move || {
            let _ = theirs.write_all(&bytes);
            // Then EOF, as from a QEMU that died.
        });
        let result = qmp::Client::handshake(ours, Duration::from_millis(500));
        writer.join().unwrap();
        // Even a greeting that survived the mutation is followed by EOF where the reply to
        // qmp_capabilities should be: the handshake must fail, and say so.
        prop_assert!(result.is_err());
    }

    #[test]
    fn the_qmp_reader_answers_a_garbage_reply_with_an_error(bytes in near(r#"{"return": {"running": true, "singlestep": false, "status": "running"}, "id": 1}"#)) {
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        let fake = std::thread::spawn(move || {
            use std::io::{BufRead, BufReader};
            let mut reader = BufReader::new(theirs.try_clone().unwrap());
            let _ = writeln!(theirs, "{GREETING}\r");
            let mut line = String::new();
            let _ = reader.read_line(&mut line); // qmp_capabilities
            let id: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
            let _ = writeln!(theirs, "{{\"return\": {{}}, \"id\": {}}}\r", id["id"]);
            line.clear();
            let _ = reader.read_line(&mut line); // query-status
            let _ = theirs.write_all(&bytes);
        });
        let mut client = qmp::Client::handshake(ours, Duration::from_millis(500)).unwrap();
        // An error for garbage; Ok only for a mutation that is still a valid reply.
        let _ = client.execute(qmp::qapi::qmp::query_status {});
        fake.join().unwrap();
    }
}
