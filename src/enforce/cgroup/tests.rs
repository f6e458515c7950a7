use super::*;

fn record() -> VmRecord {
    VmRecord {
        name: "web".into(),
        pid: 100,
        wrapper_pid: 99,
        vcpus: 2,
        baseline: 10.0,
        mode: crate::credit::Mode::Standard,
        vcpu_tids: vec![101, 102],
        config: "/vms/web.toml".into(),
        qmp_socket: "/run/web/qmp.sock".into(),
        qemu_start: 0,
        boot_id: String::new(),
        source: Default::default(),
        agent_socket: None,
    }
}

const FULL: Rate = Rate(2_000_000);

#[test]
fn bandwidth_keeps_the_rate_and_the_kernels_minimum_quota() {
    assert_eq!(bandwidth(Rate(200_000), FULL), (Some(20_000), 100_000));
    assert_eq!(bandwidth(FULL, FULL), (None, 100_000));
    assert_eq!(bandwidth(Rate(1_500_000), FULL), (Some(150_000), 100_000));
    // 0.5 % of one CPU: 0.5 ms per 100 ms is below the minimum: 1 ms per 200 ms instead.
    assert_eq!(bandwidth(Rate(5_000), FULL), (Some(1_000), 200_000));
    // Below 0.1 %: the longest period and the smallest quota.
    assert_eq!(bandwidth(Rate(500), FULL), (Some(1_000), 1_000_000));
}

#[test]
fn detection_prefers_a_v2_hierarchy_with_cpu_and_falls_back_to_v1() {
    let hybrid = "\
30 23 0:26 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
31 30 0:27 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw
33 30 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
34 30 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
";
    let none = |_: &Path| Some("hugetlb".to_owned());
    assert_eq!(
        detect(hybrid, none),
        Some((Version::V1, PathBuf::from("/sys/fs/cgroup/cpu")))
    );
    let v2_only = "31 23 0:27 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n";
    let cpu = |_: &Path| Some("cpuset cpu io memory pids".to_owned());
    assert_eq!(
        detect(v2_only, cpu),
        Some((Version::V2, PathBuf::from("/sys/fs/cgroup")))
    );
    assert_eq!(detect(v2_only, none), None);
    // cpuacct alone is not cpu.
    assert_eq!(
        detect("34 30 0:30 / /x rw - cgroup cgroup rw,cpuacct\n", none),
        None
    );
    let joint = "33 30 0:29 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n";
    assert_eq!(
        detect(joint, none).unwrap().1,
        PathBuf::from("/sys/fs/cgroup/cpu,cpuacct")
    );
}

#[test]
fn instance_names_are_one_path_component() {
    assert_eq!(
        instance_name(Path::new("/run/burst-qemu")),
        "run-burst-qemu"
    );
    assert_eq!(instance_name(Path::new("/tmp/a b/c")), "tmp-a-b-c");
    assert_eq!(instance_name(Path::new("/")), "root");
}

fn written(e: &CgroupEnforcer, mount: &Path) -> Vec<(String, String)> {
    e.journal
        .iter()
        .map(|(p, v)| {
            (
                p.strip_prefix(mount).unwrap().display().to_string(),
                v.clone(),
            )
        })
        .collect()
}

fn pairs(v: &[(&str, &str)]) -> Vec<(String, String)> {
    v.iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
}

#[test]
fn v1_moves_each_vcpu_thread_and_writes_period_and_quota() {
    let mount = tempfile::tempdir().unwrap();
    let mut e = CgroupEnforcer::new(Version::V1, mount.path(), "i").unwrap();
    e.attach(&record()).unwrap();
    e.apply("web", Rate(200_000), FULL).unwrap();
    e.apply("web", Rate(200_000), FULL).unwrap(); // unchanged: no write
    e.apply("web", Rate(209_000), FULL).unwrap(); // under 0.5 % of full: no write
    e.apply("web", Rate(300_000), FULL).unwrap(); // same period: quota only
    e.apply("web", FULL, FULL).unwrap();
    assert_eq!(
        written(&e, mount.path()),
        pairs(&[
            ("burst-qemu/i/web/tasks", "101"),
            ("burst-qemu/i/web/tasks", "102"),
            ("burst-qemu/i/web/cpu.cfs_quota_us", "-1"),
            ("burst-qemu/i/web/cpu.cfs_period_us", "100000"),
            ("burst-qemu/i/web/cpu.cfs_quota_us", "20000"),
            ("burst-qemu/i/web/cpu.cfs_quota_us", "30000"),
            ("burst-qemu/i/web/cpu.cfs_quota_us", "-1"),
        ])
    );
    e.detach("web").unwrap();
    assert!(!mount.path().join("burst-qemu/i/web").exists());
}

#[test]
fn v2_builds_a_threaded_subtree_and_writes_cpu_max() {
    let mount = tempfile::tempdir().unwrap();
    let mut e = CgroupEnforcer::new(Version::V2, mount.path(), "i").unwrap();
    e.attach(&record()).unwrap();
    e.apply("web", Rate(200_000), FULL).unwrap();
    e.apply("web", Rate(5_000), FULL).unwrap();
    e.apply("web", FULL, FULL).unwrap();
    assert_eq!(
        written(&e, mount.path()),
        pairs(&[
            ("cgroup.subtree_control", "+cpu"),
            ("burst-qemu/cgroup.subtree_control", "+cpu"),
            ("burst-qemu/i/cgroup.subtree_control", "+cpu"),
            ("burst-qemu/i/web/vcpus/cgroup.type", "threaded"),
            ("burst-qemu/i/web/cgroup.subtree_control", "+cpu"),
            ("burst-qemu/i/web/cgroup.procs", "100"),
            ("burst-qemu/i/web/vcpus/cgroup.threads", "101"),
            ("burst-qemu/i/web/vcpus/cgroup.threads", "102"),
            ("burst-qemu/i/web/vcpus/cpu.max", "20000 100000"),
            ("burst-qemu/i/web/vcpus/cpu.max", "1000 200000"),
            ("burst-qemu/i/web/vcpus/cpu.max", "max 100000"),
        ])
    );
    e.detach("web").unwrap();
    assert!(!mount.path().join("burst-qemu/i/web").exists());
}

#[test]
fn a_new_agent_finds_the_vm_in_place_and_writes_nothing() {
    // What a predecessor left, as the kernel shows it: the VM's threads in place and its
    // quota in force. Re-adopting it must not move QEMU or rewrite the quota (each move or
    // write lets the VM run unheld for a moment).
    for version in [Version::V1, Version::V2] {
        let mount = tempfile::tempdir().unwrap();
        let mut first = CgroupEnforcer::new(version, mount.path(), "i").unwrap();
        first.attach(&record()).unwrap();
        first.apply("web", Rate(200_000), FULL).unwrap();
        let web = mount.path().join("burst-qemu/i/web");
        match version {
            Version::V1 => fs::write(web.join("tasks"), "101\n102\n").unwrap(),
            Version::V2 => fs::write(web.join("vcpus/cgroup.threads"), "101\n102\n").unwrap(),
        }
        let mut next = CgroupEnforcer::new(version, mount.path(), "i").unwrap();
        next.journal.clear();
        next.attach(&record()).unwrap();
        next.apply("web", Rate(200_000), FULL).unwrap();
        assert_eq!(written(&next, mount.path()), pairs(&[]), "{version}");
        // A different grant is written as usual, and only once.
        next.apply("web", Rate(300_000), FULL).unwrap();
        assert_eq!(written(&next, mount.path()).len(), 1, "{version}");
    }
}

#[test]
fn weights_follow_the_allocation_and_small_changes_are_not_written() {
    for (version, file, values) in [
        (Version::V1, "burst-qemu/i/web/cpu.shares", ["819", "2048"]),
        (Version::V2, "burst-qemu/i/web/cpu.weight", ["80", "200"]),
    ] {
        let mount = tempfile::tempdir().unwrap();
        let mut e = CgroupEnforcer::new(version, mount.path(), "i").unwrap();
        e.attach(&record()).unwrap();
        e.journal.clear();
        e.weigh("web", Rate(800_000)).unwrap();
        e.weigh("web", Rate(805_000)).unwrap(); // within 2 %: not written
        e.weigh("web", Rate(2_000_000)).unwrap();
        let w: Vec<(String, String)> = written(&e, mount.path());
        assert_eq!(
            w,
            pairs(&[(file, values[0]), (file, values[1])]),
            "{version}"
        );
    }
}

#[test]
fn attach_evicts_threads_that_are_not_the_vms() {
    let mount = tempfile::tempdir().unwrap();
    let mut e = CgroupEnforcer::new(Version::V1, mount.path(), "i").unwrap();
    let dir = mount.path().join("burst-qemu/i/web");
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join("tasks"), "55\n").unwrap();
    e.attach(&record()).unwrap();
    let root_tasks = mount.path().join("tasks");
    let moved: Vec<&String> = e
        .journal
        .iter()
        .filter(|(p, _)| *p == root_tasks)
        .map(|(_, v)| v)
        .collect();
    assert_eq!(moved, ["55"]);
}

#[test]
fn cleanup_removes_only_dead_vms_cgroups() {
    let mount = tempfile::tempdir().unwrap();
    let mut e = CgroupEnforcer::new(Version::V1, mount.path(), "i").unwrap();
    e.attach(&record()).unwrap();
    fs::create_dir_all(mount.path().join("burst-qemu/i/gone")).unwrap();
    e.cleanup(&["web"]);
    assert!(mount.path().join("burst-qemu/i/web").exists());
    assert!(!mount.path().join("burst-qemu/i/gone").exists());
}

fn domain_record(dir: &str) -> VmRecord {
    VmRecord {
        source: crate::state::Source::Libvirt {
            uri: "qemu:///system".into(),
            uuid: "u".into(),
            cgroup: Some(dir.into()),
        },
        ..record()
    }
}

#[test]
fn a_libvirt_domains_threads_go_into_one_pooled_group_and_back_to_their_vcpu_groups() {
    let dir = "/machine/qemu-3-web.libvirt-qemu";
    // v2: a threaded child of the domain's cgroup; QEMU's process is not moved.
    let mount = tempfile::tempdir().unwrap();
    let domain = mount.path().join(&dir[1..]);
    for n in ["vcpu0", "vcpu1", "emulator"] {
        fs::create_dir_all(domain.join(n)).unwrap();
    }
    let mut e = CgroupEnforcer::new(Version::V2, mount.path(), "i").unwrap();
    e.journal.clear();
    e.attach(&domain_record(dir)).unwrap();
    e.apply("web", Rate(400_000), FULL).unwrap();
    e.weigh("web", Rate(400_000)).unwrap(); // libvirt's own weight: not written
    e.detach("web").unwrap();
    let d = "machine/qemu-3-web.libvirt-qemu";
    assert_eq!(
        written(&e, mount.path()),
        pairs(&[
            (&format!("{d}/burst-qemu/cgroup.type"), "threaded"),
            (&format!("{d}/burst-qemu/cgroup.threads"), "101"),
            (&format!("{d}/burst-qemu/cgroup.threads"), "102"),
            (&format!("{d}/burst-qemu/cpu.max"), "40000 100000"),
            (&format!("{d}/vcpu0/cgroup.threads"), "101"),
            (&format!("{d}/vcpu1/cgroup.threads"), "102"),
        ])
    );
    assert!(!domain.join("burst-qemu").exists());
    // A domain whose cgroup is gone (stopped) is an error at attach, not a stray mkdir.
    fs::remove_dir_all(mount.path().join("machine")).unwrap();
    assert!(e.attach(&domain_record(dir)).is_err());
    assert!(!domain.exists());

    // v1: our own group in the cpu hierarchy, as for any VM; home again on detach.
    let mount = tempfile::tempdir().unwrap();
    let domain = mount.path().join(&dir[1..]);
    fs::create_dir_all(domain.join("vcpu0")).unwrap();
    let mut e = CgroupEnforcer::new(Version::V1, mount.path(), "i").unwrap();
    e.attach(&domain_record(dir)).unwrap();
    e.journal.clear();
    e.detach("web").unwrap();
    let w = written(&e, mount.path());
    assert_eq!(
        w[0],
        (format!("{d}/vcpu0/tasks"), "101".to_owned()),
        "{w:?}"
    );
    assert!(!mount.path().join("burst-qemu/i/web").exists());
}

#[test]
fn applying_to_an_unattached_vm_is_an_error() {
    let mount = tempfile::tempdir().unwrap();
    let mut e = CgroupEnforcer::new(Version::V1, mount.path(), "i").unwrap();
    assert!(e.apply("nope", Rate(1), FULL).is_err());
}
