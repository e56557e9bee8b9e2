//! The chaos suite as CI runs it: short seeded runs against real clusters. A correct build
//! passes under every fault built so far; a build with a planted stale-read bug is caught.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The `flotilla` binary of this workspace build (next to `flotilla-chaos`).
fn flotilla() -> PathBuf {
    let chaos = Path::new(env!("CARGO_BIN_EXE_flotilla-chaos"));
    let bin = chaos.parent().unwrap().join("flotilla");
    assert!(
        bin.is_file(),
        "{} is missing: build the workspace (cargo build --workspace) before these tests",
        bin.display()
    );
    bin
}

/// No iptables rule of any chaos run is left in the host's INPUT chain.
fn assert_no_rules_left() {
    let rules = Command::new("iptables")
        .args(["-w", "-S", "INPUT"])
        .output()
        .unwrap();
    let rules = String::from_utf8_lossy(&rules.stdout);
    assert!(
        !rules.contains("flotilla-chaos-"),
        "rules left behind: {rules}"
    );
}

/// Replica 1 announced an API address starting with `prefix` (its log is in `out`).
fn assert_replica_listened_on(out: &Path, prefix: &str) {
    let log = std::fs::read_to_string(out.join("replica-1.log")).unwrap();
    // What follows the message is the address field (colour codes and all).
    let announced = log.lines().any(|l| {
        l.split("announced API address")
            .nth(1)
            .is_some_and(|rest| rest.contains(prefix))
    });
    assert!(
        announced,
        "replica 1 did not announce a {prefix}x address: {log}"
    );
}

/// Copies a run that should have passed but did not out of the test's folder (removed
/// when the test ends), so its history, report and logs stay for diagnosis; returns where.
fn keep_failed(out: &Path, code: i32) -> String {
    if code == 0 {
        return String::new();
    }
    let keep = std::env::temp_dir().join(format!(
        "flotilla-chaos-failed-{}",
        out.file_name().unwrap().to_string_lossy()
    ));
    let _ = Command::new("cp").arg("-r").arg(out).arg(&keep).status();
    format!("\n(the run is kept in {})", keep.display())
}

/// Runs `flotilla-chaos` with `args` against `bin`; returns its exit code and report.
fn chaos(bin: &Path, out: &Path, args: &[&str]) -> (i32, serde_json::Value, String) {
    let run = Command::new(env!("CARGO_BIN_EXE_flotilla-chaos"))
        .args(args)
        .arg("--out")
        .arg(out)
        .arg("--flotilla")
        .arg(bin)
        .env("RUST_LOG", "warn")
        .output()
        .expect("flotilla-chaos runs");
    let stdout = String::from_utf8_lossy(&run.stdout).into_owned();
    let text = format!("{stdout}{}", String::from_utf8_lossy(&run.stderr));
    let report = std::fs::read(out.join("report.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or(serde_json::Value::Null);

    (run.status.code().unwrap_or(-1), report, text)
}

#[test]
fn a_seeded_run_with_every_built_fault_finds_nothing_wrong() {
    let out = tempfile::tempdir().unwrap();
    let (code, report, text) = chaos(
        &flotilla(),
        out.path(),
        &[
            "--seed",
            "42",
            "--duration",
            "30",
            "--faults",
            "kill,pause,partition,loss,disk-full,clock-skew,wipe,membership",
        ],
    );
    let text = text + &keep_failed(out.path(), code);
    assert_eq!(code, 0, "{text}");
    assert_eq!(report["violations"], serde_json::json!([]), "{text}");
    assert_eq!(report["state_identical"], true, "{text}");
    // As root, each replica ran in its own network namespace (the default, auto), on the
    // namespaces' addresses, and the namespaces are gone.
    assert!(text.contains("--network netns"), "{text}");
    assert_replica_listened_on(out.path(), "10.99.");
    // Left behind: a run's namespaces whose process is gone (this run's, now; a run of
    // another test still going owns its own).
    let left = Command::new("ip").args(["netns", "list"]).output().unwrap();
    let left = String::from_utf8_lossy(&left.stdout);
    let orphans: Vec<&str> = left
        .lines()
        .filter(|l| {
            l.strip_prefix("flc").is_some_and(|rest| {
                let pid: String = rest.chars().take_while(char::is_ascii_digit).collect();
                !Path::new(&format!("/proc/{pid}")).exists()
            })
        })
        .collect();
    assert!(orphans.is_empty(), "namespaces left behind: {orphans:?}");
    // The run did real work under real faults.
    let faults = report["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| {
            let e = e["event"].as_str().unwrap_or("");
            [
                "kill",
                "SIGSTOP",
                "partition",
                "disk full",
                "clock skewed",
                "member remove",
            ]
            .iter()
            .any(|p| e.starts_with(p))
                || e.contains("packet loss")
        })
        .count();
    assert!(faults >= 4, "at least four faults in 30 s: {text}");
    // Every rule the run inserted is gone.
    assert_no_rules_left();
    // And every tmpfs it mounted.
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
    assert!(
        !mounts.contains(out.path().to_str().unwrap()),
        "mounts left behind: {mounts}"
    );
    // The watch workload ran and matched the reference history (any mismatch would be a
    // violation above).
    assert_eq!(report["watchers"].as_array().unwrap().len(), 3, "{text}");
    // So did the Kubernetes workload: Deployments were scaled and pods bound (and they
    // converged after recovery, or there would be a violation).
    assert!(report["k8s"]["scales"].as_u64().unwrap() > 10, "{text}");
    assert!(report["k8s"]["pods_seen"].as_u64().unwrap() > 5, "{text}");
    assert!(
        report["watch_reference_events"].as_u64().unwrap() > 100,
        "{text}"
    );
    assert!(report["requests"]["ok"].as_u64().unwrap() > 500, "{text}");
    assert!(report["operations"].as_u64().unwrap() > 500, "{text}");
    for key in ["chaos/0", "chaos/1", "chaos/2", "chaos/3"] {
        assert_eq!(report["verdicts"][key], "Linearizable", "{text}");
    }
    assert!(
        text.contains("reproduce: flotilla-chaos --seed 42"),
        "{text}"
    );
    for file in ["history.json", "report.json", "summary.txt"] {
        assert!(out.path().join(file).is_file(), "{file} written");
    }
}

#[test]
fn a_run_on_loopback_addresses_passes_and_cleans_up() {
    let out = tempfile::tempdir().unwrap();
    let (code, report, text) = chaos(
        &flotilla(),
        out.path(),
        &[
            "--network",
            "loopback",
            "--seed",
            "7",
            "--duration",
            "20",
            "--faults",
            "partition,loss,kill,pause",
            "--workload",
            "kv,watch",
        ],
    );
    let text = text + &keep_failed(out.path(), code);
    assert_eq!(code, 0, "{text}");
    assert_eq!(report["violations"], serde_json::json!([]), "{text}");
    assert!(text.contains("--network loopback"), "{text}");
    // The replicas really were on loopback addresses of their own.
    assert_replica_listened_on(out.path(), "127.");
    assert_no_rules_left();
}

#[test]
fn bad_flags_are_refused_before_anything_starts() {
    let out = tempfile::tempdir().unwrap();
    let (code, _, text) = chaos(&flotilla(), out.path(), &["--faults", "meteor"]);
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("unknown fault"), "{text}");
    let (code, _, text) = chaos(&flotilla(), out.path(), &["--faults", ""]);
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("no faults"), "{text}");
    let (code, _, text) = chaos(&flotilla(), out.path(), &["--network", "carrier-pigeon"]);
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("unknown --network"), "{text}");
    let (code, _, text) = chaos(&flotilla(), out.path(), &["--workload", "bogus"]);
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("unknown workload"), "{text}");
    // Nothing ran: no report.
    assert!(!out.path().join("report.json").exists());
}

/// Builds `flotilla` with the planted stale-read bug into its own target folder (so the
/// workspace's binaries are untouched).
fn buggy_flotilla() -> PathBuf {
    let target = Path::new(env!("CARGO_BIN_EXE_flotilla-chaos"))
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("chaos-bug");
    let manifest = concat!(env!("CARGO_MANIFEST_DIR"), "/../Cargo.toml");
    let status = Command::new(env!("CARGO"))
        .args(["build", "--quiet", "--bin", "flotilla", "--features"])
        .arg("chaos-bug-stale-read")
        .arg("--manifest-path")
        .arg(manifest)
        .arg("--target-dir")
        .arg(&target)
        .status()
        .expect("cargo runs");
    assert!(status.success(), "building the stale-read build failed");
    target.join("debug").join("flotilla")
}

#[test]
fn a_build_serving_stale_reads_is_caught() {
    let bin = buggy_flotilla();
    // Kills and pauses of followers leave them behind; without the read barrier they
    // answer "linearizable" reads from old state. A few seeds, each a short run: the bug
    // shows within the first.
    for seed in ["1", "2", "3"] {
        let out = tempfile::tempdir().unwrap();
        let (code, report, text) = chaos(
            &bin,
            out.path(),
            &["--seed", seed, "--duration", "20", "--faults", "kill,pause"],
        );
        if code == 1 {
            let violations = report["violations"].as_array().unwrap();
            assert!(
                violations
                    .iter()
                    .any(|v| v.as_str().unwrap_or("").contains("not linearizable")),
                "{text}"
            );
            return;
        }
        assert_eq!(code, 0, "the run itself failed: {text}");
    }
    panic!("three runs against a build that skips the read barrier found nothing");
}
