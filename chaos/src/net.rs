//! Network faults between replicas: iptables DROP rules.
//!
//! On loopback (the default) the rules sit on `lo` in the host's namespace: replicas listen
//! on their own loopback addresses and bind them as the source of their peer connections,
//! so a rule naming a source and a destination address cuts exactly one direction between
//! two replicas, and clients, connecting from 127.0.0.1, are never cut. With network
//! namespaces ([`crate::netns`]) a rule sits in the receiving replica's own namespace and
//! names the sender; clients, on the bridge's address, are never cut either.
//!
//! Owns the rules it inserted; every rule carries the comment `flotilla-chaos-<pid>`.
//! Invariants: [`Net::heal`] (and dropping the [`Net`]) removes all of them; a new `Net`
//! first removes rules left by a `flotilla-chaos` process that no longer exists (killed
//! before it could clean up). Rules only ever name this run's own 127.a.b.x addresses.

use std::process::Command;

/// The iptables rules of one run.
pub struct Net {
    tag: String,
    /// Each rule, with the namespace it is in (`None`: the host's).
    rules: Vec<(Option<String>, Vec<String>)>,
    /// With network namespaces: each replica address's namespace.
    namespaces: Option<std::collections::HashMap<String, String>>,
}

fn iptables(ns: Option<&str>, args: &[String]) -> std::io::Result<std::process::Output> {
    match ns {
        Some(ns) => Command::new("ip")
            .args(["netns", "exec", ns, "iptables", "-w"])
            .args(args)
            .output(),
        None => Command::new("iptables").arg("-w").args(args).output(),
    }
}

impl Net {
    /// Checks that iptables works here and sweeps rules left by dead runs.
    pub fn new() -> anyhow::Result<Net> {
        let listed = iptables(None, &["-S".into(), "INPUT".into()]).map_err(|e| {
            anyhow::anyhow!("network faults need iptables (apt-get install iptables): {e}")
        })?;
        if !listed.status.success() {
            anyhow::bail!(
                "network faults need iptables as root: {}",
                String::from_utf8_lossy(&listed.stderr).trim()
            );
        }
        for line in String::from_utf8_lossy(&listed.stdout).lines() {
            let Some(pid) = line
                .split("flotilla-chaos-")
                .nth(1)
                .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
                .and_then(|p| p.parse::<u32>().ok())
            else {
                continue;
            };
            if std::path::Path::new(&format!("/proc/{pid}")).exists() {
                continue;
            }
            // "-A INPUT ..." → "-D INPUT ...", split as the shell would (the comment is
            // one word here, so plain whitespace splitting is exact).
            let mut args: Vec<String> = line.split_whitespace().map(str::to_string).collect();
            if args.first().map(String::as_str) == Some("-A") {
                args[0] = "-D".into();
                let _ = iptables(None, &args);
            }
        }
        Ok(Net {
            tag: format!("flotilla-chaos-{}", std::process::id()),
            rules: Vec::new(),
            namespaces: None,
        })
    }

    /// Rules inside the replicas' own namespaces: `namespaces` maps each replica address to
    /// its namespace.
    pub fn in_namespaces(
        namespaces: std::collections::HashMap<String, String>,
    ) -> anyhow::Result<Net> {
        for ns in namespaces.values() {
            let listed = iptables(Some(ns), &["-S".into(), "INPUT".into()])?;
            if !listed.status.success() {
                anyhow::bail!(
                    "network faults need iptables in {ns}: {}",
                    String::from_utf8_lossy(&listed.stderr).trim()
                );
            }
        }
        Ok(Net {
            tag: format!("flotilla-chaos-{}", std::process::id()),
            rules: Vec::new(),
            namespaces: Some(namespaces),
        })
    }

    fn insert(&mut self, src: &str, dst: &str, extra: &[&str]) -> anyhow::Result<()> {
        let ns = match &self.namespaces {
            Some(map) => Some(
                map.get(dst)
                    .ok_or_else(|| anyhow::anyhow!("no namespace for {dst}"))?
                    .clone(),
            ),
            None => None,
        };
        let head: &[&str] = if ns.is_some() {
            &["INPUT", "-s", src]
        } else {
            &["INPUT", "-i", "lo", "-s", src, "-d", dst]
        };
        let mut rule: Vec<String> = head.iter().map(|s| s.to_string()).collect();
        rule.extend(extra.iter().map(|s| s.to_string()));
        rule.extend(
            ["-m", "comment", "--comment", &self.tag, "-j", "DROP"]
                .iter()
                .map(|s| s.to_string()),
        );
        let mut args = vec!["-I".to_string()];
        args.extend(rule.iter().cloned());
        let out = iptables(ns.as_deref(), &args)?;
        if !out.status.success() {
            anyhow::bail!(
                "iptables {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        self.rules.push((ns, rule));
        Ok(())
    }

    /// Drops every packet from `src` to `dst` (one direction).
    pub fn cut_one_way(&mut self, src: &str, dst: &str) -> anyhow::Result<()> {
        self.insert(src, dst, &[])
    }

    /// Drops every packet between `a` and `b`.
    pub fn cut(&mut self, a: &str, b: &str) -> anyhow::Result<()> {
        self.cut_one_way(a, b)?;
        self.cut_one_way(b, a)
    }

    /// Drops packets between `a` and `b` at random with probability `p` (each direction).
    pub fn lossy(&mut self, a: &str, b: &str, p: f64) -> anyhow::Result<()> {
        let p = format!("{p:.3}");
        let extra = ["-m", "statistic", "--mode", "random", "--probability", &p];
        self.insert(a, b, &extra)?;
        self.insert(b, a, &extra)
    }

    /// Removes every rule this run inserted.
    pub fn heal(&mut self) {
        for (ns, rule) in self.rules.drain(..) {
            let mut args = vec!["-D".to_string()];
            args.extend(rule);
            while iptables(ns.as_deref(), &args).is_ok_and(|o| o.status.success()) {}
        }
    }

    /// Whether any rule is in place.
    pub fn is_cut(&self) -> bool {
        !self.rules.is_empty()
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        self.heal();
    }
}
