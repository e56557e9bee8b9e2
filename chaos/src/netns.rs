//! Network namespaces for a run (`--network netns`): each replica on its own host.
//!
//! Owns four namespaces named `flc<pid>b` (the bridge, where the chaos process itself and
//! so every client lives) and `flc<pid>r1`–`r3` (one per replica slot), a bridge `br0` in
//! the first and a veth pair from each replica namespace to it, on `10.99.<n>.0/24`
//! (replica slot `i` is `.i`, the clients `.254`). These addresses exist only inside the
//! namespaces. Invariants: dropping a [`Netns`] deletes every namespace it created (and with
//! them their interfaces and iptables rules); [`Netns::create`] first deletes namespaces
//! left by a `flotilla-chaos` process that no longer exists.

use std::os::fd::AsFd;
use std::process::Command;

use anyhow::{bail, Context};
use rand::Rng;

/// The namespaces of one run.
#[derive(Debug)]
pub struct Netns {
    tag: String,
    subnet: u8,
    created: Vec<String>,
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip (package iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

impl Netns {
    /// Creates the namespaces, the bridge and the links (root needed).
    pub fn create() -> anyhow::Result<Netns> {
        sweep();
        let mut ns = Netns {
            tag: format!("flc{}", std::process::id()),
            subnet: rand::thread_rng().gen_range(1..=254),
            created: Vec::new(),
        };
        let bridge = ns.client_ns();
        ip(&["netns", "add", &bridge]).context("network namespaces need root (ip netns add)")?;
        ns.created.push(bridge.clone());
        ip(&["-n", &bridge, "link", "set", "lo", "up"])?;
        ip(&["-n", &bridge, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &bridge, "link", "set", "br0", "up"])?;
        let client = format!("{}/24", ns.client_ip());
        ip(&["-n", &bridge, "addr", "add", &client, "dev", "br0"])?;
        for slot in 1..=3 {
            let rns = ns.replica_ns(slot);
            ip(&["netns", "add", &rns])?;
            ns.created.push(rns.clone());
            let (inner, outer) = (format!("{}v{slot}", ns.tag), format!("{}b{slot}", ns.tag));
            ip(&[
                "link", "add", &inner, "netns", &rns, "type", "veth", "peer", "name", &outer,
                "netns", &bridge,
            ])?;
            ip(&["-n", &rns, "link", "set", "lo", "up"])?;
            let addr = format!("{}/24", ns.replica_ip(slot));
            ip(&["-n", &rns, "addr", "add", &addr, "dev", &inner])?;
            ip(&["-n", &rns, "link", "set", &inner, "up"])?;
            ip(&["-n", &bridge, "link", "set", &outer, "master", "br0"])?;
            ip(&["-n", &bridge, "link", "set", &outer, "up"])?;
        }
        Ok(ns)
    }

    /// The namespace of the bridge and the clients.
    pub fn client_ns(&self) -> String {
        format!("{}b", self.tag)
    }

    /// The clients' address.
    pub fn client_ip(&self) -> String {
        format!("10.99.{}.254", self.subnet)
    }

    /// Replica slot `slot`'s namespace (1-based).
    pub fn replica_ns(&self, slot: usize) -> String {
        format!("{}r{slot}", self.tag)
    }

    /// Replica slot `slot`'s address (1-based).
    pub fn replica_ip(&self, slot: usize) -> String {
        format!("10.99.{}.{slot}", self.subnet)
    }

    /// Moves the calling thread (and the threads it starts from now on: call it before the
    /// async runtime starts) into the clients' namespace.
    pub fn enter_client(&self) -> anyhow::Result<()> {
        let path = format!("/var/run/netns/{}", self.client_ns());
        let f = std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
        nix::sched::setns(f.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
            .with_context(|| format!("entering {path}"))?;
        Ok(())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for name in self.created.drain(..).rev() {
            let _ = ip(&["netns", "del", &name]);
        }
    }
}

/// Deletes namespaces of dead runs (`flc<pid>...` whose process is gone).
fn sweep() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(rest) = name.strip_prefix("flc") else {
            continue;
        };
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        let Ok(pid) = digits.parse::<u32>() else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = ip(&["netns", "del", name]);
        }
    }
}
