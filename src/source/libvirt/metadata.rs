//! burst-qemu's elements in a libvirt domain's `<metadata>`: the opt-in settings and the
//! credit checkpoint.
//!
//! Two elements, each under its own namespace, so that an operator's `virsh metadata` edit of
//! the settings and the agent's checkpoint writes never overwrite each other (libvirt keeps one
//! element per namespace URI and replaces it whole):
//!
//! ```text
//! virsh metadata web1 --uri urn:burst-qemu:config:1 --key burst-qemu --live --config \
//!     --set '<config baseline="20" mode="unlimited" max_credits="100"/>'
//! ```
//!
//! stores `<burst-qemu:config xmlns:burst-qemu="urn:burst-qemu:config:1" baseline="20" …/>`
//! in the domain XML (libvirt 9.0 accepts a URN; `virDomainGetMetadata` hands the element back
//! without its prefix, as `<config baseline="20" …/>`).
//!
//! **Settings** (`<config>`): one attribute per key of `vms/NAME.toml`, same names, same
//! meaning, same validation: the attributes become TOML text that [`crate::config::from_text`] (parse, then validate)
//! parses, so the two opt-in paths cannot drift apart. Numbers are written as numbers
//! (`baseline="20"`), `cpus="0-1,3"` as in the file's string form, `balance_memory="true"`.
//! `vcpus` may be left out: it is the domain's own vCPU count, and when given it must match
//! (as the launcher refuses a `-smp` that contradicts the file).
//!
//! **Checkpoint** (`<checkpoint>`, namespace [`CHECKPOINT_NS`]): the ledger's balances in
//! exact integers (vCPU-nanoseconds, as the ledger keeps them), the mode, the VM's grant when
//! written, the domain's UUID and the wall-clock time. It travels inside the domain XML: with
//! `virsh save`/`restore`, `dumpxml`/`define` on another host and live migration. A domain
//! arriving with a checkpoint continues from it; the time between the checkpoint and the
//! arrival, during which nobody measured the domain, is charged at the grant it had, up to a
//! bound ([`Checkpoint::gap_charge`]): never given away, never billed for days a saved image
//! sat on disk. A checkpoint whose UUID is not the domain's (an XML copied to define a clone)
//! is not the domain's and is ignored ([`Checkpoint::belongs_to`]).

use std::path::Path;

use roxmltree::{Document, Node};
use thiserror::Error;

use crate::config::{self, ConfigError, VmConfig};
use crate::credit::{Balances, Credits, Mode, Rate};

/// The namespace of the settings element.
pub const CONFIG_NS: &str = "urn:burst-qemu:config:1";
/// The namespace of the checkpoint element.
pub const CHECKPOINT_NS: &str = "urn:burst-qemu:checkpoint:1";
/// The prefix (libvirt's "key") both elements are stored under.
pub const KEY: &str = "burst-qemu";

/// Settings that cannot be used.
#[derive(Debug, Error)]
#[error("domain {domain}: <metadata> {CONFIG_NS}: {problem}")]
pub struct ConfigElementError {
    /// The domain's name.
    pub domain: String,
    /// What is wrong.
    pub problem: ElementProblem,
}

/// What is wrong with an element.
#[derive(Debug, Error, PartialEq)]
pub enum ElementProblem {
    /// Not well-formed XML.
    #[error("not XML: {0}")]
    Xml(String),
    /// Another element than expected.
    #[error("the element is <{found}>, not <{expected}>")]
    Element {
        /// Its name.
        found: String,
        /// The one expected.
        expected: &'static str,
    },
    /// An attribute is missing or wrong.
    #[error("{field}: {message}")]
    Field {
        /// The attribute (the `vms/NAME.toml` key).
        field: String,
        /// What is wrong.
        message: String,
    },
}

fn field(field: &str, message: impl Into<String>) -> ElementProblem {
    ElementProblem::Field {
        field: field.to_owned(),
        message: message.into(),
    }
}

/// The type `vms/NAME.toml` gives each key (see `config::Raw`).
enum Kind {
    Integer,
    Float,
    Bool,
    Text,
}

fn kind(key: &str) -> Kind {
    match key {
        "vcpus" | "memory_min" | "memory_max" | "memory_start" | "memory_shares" => Kind::Integer,
        "baseline" | "initial_credits" | "max_credits" | "max_surplus" | "decline_minutes"
        | "credits" | "disk_share" => Kind::Float,
        "balance_memory" => Kind::Bool,
        // mode, cpus, and unknown keys (which config::parse refuses by name).
        _ => Kind::Text,
    }
}

/// The TOML value of attribute `key`: typed when it reads as its key's type, else a string
/// (which `config::parse` then refuses with the key's name and the type it wanted).
fn toml_value(key: &str, text: &str) -> toml::Value {
    let t = text.trim();
    match kind(key) {
        Kind::Integer => t.parse::<i64>().map(toml::Value::Integer).ok(),
        Kind::Float => t
            .parse::<f64>()
            .ok()
            .filter(|f| f.is_finite())
            .map(toml::Value::Float),
        Kind::Bool => t.parse::<bool>().map(toml::Value::Boolean).ok(),
        Kind::Text => None,
    }
    .unwrap_or_else(|| toml::Value::String(text.to_owned()))
}

/// The root element of `xml`, checked to be `<expected>`.
fn element<'a, 'i>(
    doc: &'a Document<'i>,
    expected: &'static str,
) -> Result<Node<'a, 'i>, ElementProblem> {
    let root = doc.root_element();
    if root.tag_name().name() != expected {
        return Err(ElementProblem::Element {
            found: root.tag_name().name().to_owned(),
            expected,
        });
    }
    Ok(root)
}

/// Parses the settings element (as `virDomainGetMetadata` returns it) of domain `domain`,
/// which has `domain_vcpus` vCPUs, into the same validated config a `vms/NAME.toml` gives.
pub fn parse_config(
    domain: &str,
    xml: &str,
    domain_vcpus: u32,
) -> Result<VmConfig, ConfigElementError> {
    let wrap = |problem| ConfigElementError {
        domain: domain.to_owned(),
        problem,
    };
    let doc = Document::parse(xml).map_err(|e| wrap(ElementProblem::Xml(e.to_string())))?;
    let root = element(&doc, "config").map_err(wrap)?;
    let mut table = toml::Table::new();
    for attr in root.attributes() {
        if attr.namespace().is_some() {
            continue; // xml:lang and friends: not ours
        }
        table.insert(
            attr.name().to_owned(),
            toml_value(attr.name(), attr.value()),
        );
    }
    match table.get("vcpus") {
        None => {
            table.insert("vcpus".into(), toml::Value::Integer(domain_vcpus.into()));
        }
        Some(toml::Value::Integer(n)) if *n != i64::from(domain_vcpus) => {
            return Err(wrap(field(
                "vcpus",
                format!("{n}, but the domain has {domain_vcpus} vCPUs (leave vcpus out to use the domain's)"),
            )));
        }
        Some(_) => {}
    }
    let text = toml::to_string(&table).map_err(|e| wrap(field("syntax", e.to_string())))?;
    config::from_text(Path::new("<metadata>"), &text).map_err(|e| {
        wrap(match e {
            ConfigError::Invalid { field, message, .. } => ElementProblem::Field { field, message },
            ConfigError::Io { source, .. } => ElementProblem::Xml(source.to_string()),
        })
    })
}

/// The settings element for `config`: the keys `config::render` writes for it, as attributes
/// (`vcpus` included).
pub fn render_config(config: &VmConfig) -> String {
    let table: toml::Table = config::render(config)
        .parse()
        .expect("config::render writes TOML that parses");
    let mut xml = String::from("<config");
    for (key, value) in &table {
        let text = match value {
            toml::Value::String(s) => s.clone(),
            toml::Value::Array(items) => items
                .iter()
                .map(|i| i.to_string())
                .collect::<Vec<_>>()
                .join(","),
            other => other.to_string(),
        };
        xml.push_str(&format!(" {key}=\"{}\"", escape(&text)));
    }
    xml.push_str("/>");
    xml
}

/// Whether XML 1.0 can hold `c` at all (`Char` in the spec: not NUL, not most C0 controls,
/// not U+FFFE/U+FFFF).
fn xml_char(c: char) -> bool {
    matches!(c, '\t' | '\n' | '\r') || (c >= ' ' && c != '\u{FFFE}' && c != '\u{FFFF}')
}

/// Escapes text for an XML attribute value in double quotes. Characters XML cannot hold
/// become U+FFFD; tab, newline and carriage return are kept as character references (a parser
/// would turn them into spaces otherwise).
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\t' | '\n' | '\r' => out.push_str(&format!("&#{};", c as u32)),
            c if !xml_char(c) => out.push('\u{FFFD}'),
            c => out.push(c),
        }
    }
    out
}

/// Where a domain's credits stood, as stored in its metadata.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checkpoint {
    /// The domain's UUID when written.
    pub uuid: String,
    /// The balances, exact.
    pub balances: Balances,
    /// CPU time charged since the ledger was created, vCPU-ns.
    pub used: Credits,
    /// The credit mode.
    pub mode: Mode,
    /// The VM's grant when written (millionths of one CPU, the whole VM).
    pub grant: Rate,
    /// Its vCPUs when written.
    pub vcpus: u32,
    /// Wall-clock time of the write, ns since the Unix epoch (`CLOCK_REALTIME`: the only
    /// clock two hosts share).
    pub at_unix_ns: u64,
    /// The host that wrote it (for people; not used in decisions).
    pub host: String,
    /// The last `credits = N` override applied (so that a domain arriving elsewhere does not
    /// have it applied again); absent in checkpoints that had none.
    pub credits_applied: Option<Credits>,
    /// Written when the domain stopped running (`departed="true"`): it covers the domain's
    /// whole run, so a domain started from it owes no gap.
    pub departed: bool,
}

impl Checkpoint {
    /// Whether this checkpoint was written for the domain with UUID `uuid` (libvirt prints
    /// UUIDs in lower case; compare without case).
    pub fn belongs_to(&self, uuid: &str) -> bool {
        self.uuid.eq_ignore_ascii_case(uuid)
    }

    /// What a domain arriving at `now_unix_ns` owes for the time since this checkpoint: the
    /// gap (at most `max_gap_ns`, and 0 when the clocks say the checkpoint is from the future)
    /// at the grant it had. `max_gap_ns` is the longest a domain can have run unmeasured since
    /// its last checkpoint: the checkpoint interval plus the agent's tick.
    pub fn gap_charge(&self, now_unix_ns: u64, max_gap_ns: u64) -> Credits {
        if self.departed {
            return Credits::ZERO;
        }
        let gap = now_unix_ns.saturating_sub(self.at_unix_ns).min(max_gap_ns);
        Credits(self.grant.over(gap))
    }
}

/// The checkpoint element.
pub fn render_checkpoint(c: &Checkpoint) -> String {
    let b = &c.balances;
    format!(
        "<checkpoint uuid=\"{}\" host=\"{}\" at_unix_ns=\"{}\" mode=\"{}\" vcpus=\"{}\" \
         grant_ppm=\"{}\" earned=\"{}\" launch=\"{}\" surplus=\"{}\" charged=\"{}\" debt=\"{}\" \
         earn_remainder=\"{}\" used=\"{}\"{}{}/>",
        escape(&c.uuid),
        escape(&c.host),
        c.at_unix_ns,
        c.mode,
        c.vcpus,
        c.grant.0,
        b.earned.0,
        b.launch.0,
        b.surplus.0,
        b.charged.0,
        b.debt.0,
        b.earn_remainder,
        c.used.0,
        c.credits_applied
            .map_or(String::new(), |a| format!(" credits_applied=\"{}\"", a.0)),
        if c.departed { " departed=\"true\"" } else { "" },
    )
}

/// Parses a checkpoint element. Attributes this version does not know are ignored (a newer
/// writer may add some); every one it needs must be present and exact.
pub fn parse_checkpoint(xml: &str) -> Result<Checkpoint, ElementProblem> {
    let doc = Document::parse(xml).map_err(|e| ElementProblem::Xml(e.to_string()))?;
    let root = element(&doc, "checkpoint")?;
    let text = |name: &str| root.attribute(name).ok_or_else(|| field(name, "missing"));
    let int = |name: &str| -> Result<u64, ElementProblem> {
        let v = text(name)?;
        v.parse()
            .map_err(|_| field(name, format!("{v:?} is not a whole number")))
    };
    let mode: Mode = text("mode")?
        .parse()
        .map_err(|e: String| field("mode", e))?;
    let vcpus = u32::try_from(int("vcpus")?).map_err(|_| field("vcpus", "out of range"))?;
    Ok(Checkpoint {
        uuid: text("uuid")?.to_owned(),
        host: root.attribute("host").unwrap_or_default().to_owned(),
        at_unix_ns: int("at_unix_ns")?,
        mode,
        vcpus,
        grant: Rate(int("grant_ppm")?),
        balances: Balances {
            earned: Credits(int("earned")?),
            launch: Credits(int("launch")?),
            surplus: Credits(int("surplus")?),
            charged: Credits(int("charged")?),
            debt: Credits(int("debt")?),
            earn_remainder: int("earn_remainder")?,
        },
        used: Credits(int("used")?),
        credits_applied: match root.attribute("credits_applied") {
            Some(_) => Some(Credits(int("credits_applied")?)),
            None => None,
        },
        departed: root.attribute("departed") == Some("true"),
    })
}

/// Our element with namespace `ns` inside a whole domain XML (`virsh dumpxml`, or the
/// `<domain>` in a status XML), as its own XML text, so that the operator's edit and the
/// running domain can be read from one document without a libvirt call.
pub fn find_in_domain_xml(domain_xml: &str, ns: &str) -> Option<String> {
    let doc = Document::parse(domain_xml).ok()?;
    let metadata = doc
        .descendants()
        .filter(|n| n.has_tag_name("metadata"))
        .find(|n| n.parent_element().is_some_and(|p| p.has_tag_name("domain")))?;
    let ours = metadata
        .children()
        .find(|n| n.is_element() && n.tag_name().namespace() == Some(ns))?;
    let mut xml = format!("<{}", ours.tag_name().name());
    for attr in ours.attributes().filter(|a| a.namespace().is_none()) {
        xml.push_str(&format!(" {}=\"{}\"", attr.name(), escape(attr.value())));
    }
    xml.push_str("/>");
    Some(xml)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::credit::{Baseline, Policy};
    use proptest::prelude::*;

    #[test]
    fn settings_give_the_same_config_as_the_toml_file() {
        let from_xml = parse_config(
            "web1",
            r#"<config baseline="20" mode="unlimited" max_credits="100" cpus="0-1" balance_memory="true" memory_min="256"/>"#,
            2,
        )
        .unwrap();
        let from_toml = config::from_text(
            Path::new("web1.toml"),
            "vcpus = 2\nbaseline = 20\nmode = \"unlimited\"\nmax_credits = 100\ncpus = \"0-1\"\n\
             balance_memory = true\nmemory_min = 256\n",
        )
        .unwrap();
        assert_eq!(from_xml, from_toml);
        assert_eq!(from_xml.policy.vcpus(), 2);
    }

    #[test]
    fn bad_settings_name_the_domain_and_the_attribute() {
        let cases = [
            (r#"<config/>"#, "baseline: missing"),
            (r#"<config baseline="x"/>"#, "baseline: "),
            (r#"<config baseline="101"/>"#, "baseline: "),
            (
                r#"<config baseline="5" mode="turbo"/>"#,
                "mode: unknown mode",
            ),
            (r#"<config baseline="5" colour="red"/>"#, "colour"),
            (
                r#"<config baseline="5" vcpus="4"/>"#,
                "vcpus: 4, but the domain has 2",
            ),
            (r#"<config baseline="5" vcpus="two"/>"#, "vcpus: "),
            (r#"<config baseline="5" memory_min="-1"/>"#, "memory_min"),
            (r#"<settings baseline="5"/>"#, "<settings>, not <config>"),
            (r#"<config baseline="5""#, "not XML"),
        ];
        for (xml, expected) in cases {
            let e = parse_config("web1", xml, 2).unwrap_err().to_string();
            assert!(
                e.starts_with("domain web1: <metadata> urn:burst-qemu:config:1: "),
                "{e}"
            );
            assert!(e.contains(expected), "{xml}: {e}");
        }
    }

    #[test]
    fn an_attribute_value_cannot_inject_toml() {
        let e = parse_config("d", "<config baseline=\"5&#10;mode = 'unlimited'\"/>", 1)
            .unwrap_err()
            .to_string();
        assert!(e.contains("baseline"), "{e}");
    }

    #[test]
    fn rendered_settings_parse_back_to_the_same_config() {
        let config = parse_config(
            "d",
            r#"<config baseline="12.5" mode="unlimited" credits="7" cpus="0,1" initial_credits="3"/>"#,
            2,
        )
        .unwrap();
        let xml = render_config(&config);
        assert!(
            xml.starts_with("<config ") && xml.contains(" baseline=\"12.5\""),
            "{xml}"
        );
        assert_eq!(parse_config("d", &xml, 2).unwrap(), config);
    }

    fn checkpoint() -> Checkpoint {
        Checkpoint {
            uuid: "4613142e-8033-458a-8bae-df609cea8603".into(),
            balances: Balances {
                earned: Credits(123_456_789_012),
                launch: Credits(7),
                surplus: Credits(0),
                charged: Credits(99),
                earn_remainder: 314_159,
                debt: Credits(5),
            },
            used: Credits(u64::MAX),
            mode: Mode::Unlimited,
            grant: Rate(400_000),
            vcpus: 2,
            at_unix_ns: 1_750_000_000_123_456_789,
            host: "host <a> & \"b\"".into(),
            credits_applied: Some(Credits(5_000_000_000)),
            departed: true,
        }
    }

    #[test]
    fn a_checkpoint_round_trips_exactly() {
        let c = checkpoint();
        assert_eq!(parse_checkpoint(&render_checkpoint(&c)).unwrap(), c);
        let none = Checkpoint {
            credits_applied: None,
            departed: false,
            ..checkpoint()
        };
        let xml = render_checkpoint(&none);
        assert!(
            !xml.contains("credits_applied") && !xml.contains("departed"),
            "{xml}"
        );
        assert_eq!(parse_checkpoint(&xml).unwrap(), none);
    }

    #[test]
    fn a_checkpoint_missing_or_mangling_a_field_is_refused_by_name() {
        let xml = render_checkpoint(&checkpoint());
        for name in [
            "uuid",
            "at_unix_ns",
            "earned",
            "launch",
            "used",
            "mode",
            "grant_ppm",
        ] {
            let without = xml.replacen(&format!(" {name}=\""), " x_unknown=\"", 1);
            let e = parse_checkpoint(&without).unwrap_err();
            assert_eq!(e, field(name, "missing"), "{name}");
        }
        let e = parse_checkpoint(&xml.replacen("earned=\"1", "earned=\"-1", 1)).unwrap_err();
        assert!(e.to_string().starts_with("earned: "), "{e}");
        assert!(parse_checkpoint("<config/>").is_err());
    }

    #[test]
    fn the_gap_is_charged_at_the_grant_and_bounded() {
        let departed = checkpoint();
        // Written as the domain stopped: it covers the whole run.
        assert_eq!(
            departed.gap_charge(departed.at_unix_ns + 10_000_000_000, 70_000_000_000),
            Credits::ZERO
        );
        let c = Checkpoint {
            departed: false,
            ..checkpoint()
        }; // grant 0.4 CPU
        let at = c.at_unix_ns;
        assert_eq!(
            c.gap_charge(at + 10_000_000_000, 70_000_000_000),
            Credits(4_000_000_000)
        );
        // A saved image restored a day later owes at most the bound.
        assert_eq!(
            c.gap_charge(at + 86_400_000_000_000, 70_000_000_000),
            Credits(28_000_000_000)
        );
        // A destination clock behind the source's owes nothing, and is no error.
        assert_eq!(c.gap_charge(at - 5, 70_000_000_000), Credits::ZERO);
    }

    #[test]
    fn a_checkpoint_belongs_to_its_uuid_only() {
        let c = checkpoint();
        assert!(c.belongs_to("4613142E-8033-458A-8BAE-DF609CEA8603"));
        assert!(!c.belongs_to("00000000-8033-458a-8bae-df609cea8603"));
    }

    #[test]
    fn our_elements_are_found_in_a_domain_xml_by_namespace() {
        let domain = format!(
            "<domain type='qemu'><name>a</name><metadata>\
             <nova:instance xmlns:nova='http://openstack.org/xmlns/libvirt/nova/1.1'/>\
             <burst-qemu:config xmlns:burst-qemu='{CONFIG_NS}' baseline='20' mode='standard'/>\
             <bq:checkpoint xmlns:bq='{CHECKPOINT_NS}' uuid='u'/>\
             </metadata></domain>"
        );
        assert_eq!(
            find_in_domain_xml(&domain, CONFIG_NS).as_deref(),
            Some(r#"<config baseline="20" mode="standard"/>"#)
        );
        assert_eq!(
            find_in_domain_xml(&domain, CHECKPOINT_NS).as_deref(),
            Some(r#"<checkpoint uuid="u"/>"#)
        );
        assert_eq!(find_in_domain_xml(&domain, "urn:other"), None);
        assert_eq!(find_in_domain_xml("<domain/>", CONFIG_NS), None);
        // The real status file has our element inside its <domain>.
        let status = include_str!("testdata/status-host-v1.xml");
        assert!(find_in_domain_xml(status, CONFIG_NS).is_none());
    }

    #[test]
    fn policy_defaults_match_the_file_defaults() {
        let c = parse_config("d", r#"<config baseline="5"/>"#, 2).unwrap();
        let p = Policy::new(2, Baseline::from_percent(5.0).unwrap()).unwrap();
        assert_eq!(c.policy, p);
    }

    proptest! {
        #[test]
        fn garbage_settings_and_checkpoints_never_panic(xml in ".{0,300}", n in 0u32..5000) {
            let _ = parse_config("d", &xml, n);
            let _ = parse_checkpoint(&xml);
            let _ = find_in_domain_xml(&xml, CONFIG_NS);
        }

        #[test]
        fn any_attribute_values_never_panic(
            attrs in proptest::collection::vec(
                (prop_oneof![
                    Just("vcpus"), Just("baseline"), Just("mode"), Just("cpus"),
                    Just("balance_memory"), Just("memory_max"), Just("credits"), Just("zz"),
                ], ".{0,12}"),
                0..6,
            ),
            n in 0u32..70,
        ) {
            let mut xml = String::from("<config");
            let mut seen = std::collections::HashSet::new();
            for (k, v) in attrs {
                if seen.insert(k) {
                    xml.push_str(&format!(" {k}=\"{}\"", escape(&v)));
                }
            }
            xml.push_str("/>");
            let _ = parse_config("d", &xml, n);
        }

        #[test]
        fn checkpoints_round_trip(
            earned in any::<u64>(), launch in any::<u64>(), used in any::<u64>(),
            at in any::<u64>(), grant in any::<u64>(), host in ".{0,20}",
        ) {
            let mut c = checkpoint();
            c.balances.earned = Credits(earned);
            c.balances.launch = Credits(launch);
            c.used = Credits(used);
            c.at_unix_ns = at;
            c.grant = Rate(grant);
            c.host = host;
            let back = parse_checkpoint(&render_checkpoint(&c)).unwrap();
            // What XML cannot hold in the host name is replaced; everything else is exact.
            let host: String = c.host.chars().map(|ch| if xml_char(ch) { ch } else { '\u{FFFD}' }).collect();
            c.host = host;
            prop_assert_eq!(back, c);
        }
    }
}
