//! The official Python client (kubernetes 37.x, with pydantic-validated models) against a
//! three-replica cluster: typed CRUD, the scale subresource, and watches from a list's
//! resourceVersion. The script is `tests/python/client_smoke.py`.

mod common;

use std::process::Command;

use common::*;

/// The interpreter with the `kubernetes` package: `.ci/setup.sh` makes a virtualenv under the
/// cache directory; `FLOTILLA_PYTHON` overrides.
fn python() -> String {
    if let Ok(p) = std::env::var("FLOTILLA_PYTHON") {
        return p;
    }
    let cache = std::env::var("FLOTILLA_CACHE").unwrap_or_else(|_| "/var/cache/flotilla".into());
    format!("{cache}/venv/bin/python")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_python_client_works_against_a_follower() {
    let c = Cluster::start(3, &[]).await;
    let leader = c.wait_leader().await;
    let follower = (1..=3).find(|&id| id != leader).unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/client_smoke.py");
    let out = Command::new(python())
        .arg(script)
        .env(
            "FLOTILLA_SERVER",
            format!("http://{}", c.replica(follower).api()),
        )
        .output()
        .expect("python with the kubernetes package (made by .ci/setup.sh)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "python client checks failed:\n{stdout}\n{stderr}"
    );
    assert!(
        stdout.contains("all Python client checks passed"),
        "{stdout}"
    );
}
