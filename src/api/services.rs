//! Service address allocation: cluster IPs from the service CIDR and node ports from their
//! range. Each allocation is a key (`/registry/ranges/serviceips/<ip>`,
//! `/registry/ranges/servicenodeports/<port>`) taken in the same transaction that writes the
//! Service, so two Services can never get the same address, and it is released in the
//! transaction that deletes the Service (or stops using it).

use crate::api::meta::Ptr;
use std::net::Ipv4Addr;

use rand::Rng;
use serde_json::{json, Value};

use super::status::{Cause, KubeError};

/// Where Service addresses come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ranges {
    /// First address of the service CIDR.
    pub cidr_base: u32,
    /// Addresses in the CIDR.
    pub cidr_size: u32,
    /// Node port range, inclusive.
    pub node_ports: (u16, u16),
}

impl Default for Ranges {
    fn default() -> Ranges {
        Ranges::parse("10.96.0.0/12", "30000-32767").expect("valid defaults")
    }
}

impl Ranges {
    /// Parses `a.b.c.d/n` and `lo-hi`.
    pub fn parse(cidr: &str, ports: &str) -> Result<Ranges, String> {
        let (ip, bits) = cidr
            .split_once('/')
            .ok_or_else(|| format!("service CIDR {cidr:?} is not ip/prefix"))?;
        let ip: Ipv4Addr = ip
            .parse()
            .map_err(|_| format!("service CIDR {cidr:?} has a bad address"))?;
        let bits: u32 = bits
            .parse()
            .map_err(|_| format!("service CIDR {cidr:?} has a bad prefix"))?;
        if !(8..=28).contains(&bits) {
            return Err(format!(
                "service CIDR prefix /{bits} must be between /8 and /28"
            ));
        }
        let size = 1u32 << (32 - bits);
        let base = u32::from(ip) & !(size - 1);
        let (lo, hi) = ports
            .split_once('-')
            .and_then(|(a, b)| Some((a.trim().parse::<u16>().ok()?, b.trim().parse::<u16>().ok()?)))
            .filter(|(a, b)| a < b)
            .ok_or_else(|| format!("node port range {ports:?} is not lo-hi"))?;
        Ok(Ranges {
            cidr_base: base,
            cidr_size: size,
            node_ports: (lo, hi),
        })
    }

    fn contains(&self, ip: Ipv4Addr) -> bool {
        let v = u32::from(ip);
        v > self.cidr_base && v < self.cidr_base + self.cidr_size - 1
    }

    /// A random assignable IP (the first address after the network one is reserved for the
    /// `kubernetes` Service, as Kubernetes does).
    fn random_ip(&self) -> Ipv4Addr {
        let off = rand::thread_rng().gen_range(2..self.cidr_size - 1);
        Ipv4Addr::from(self.cidr_base + off)
    }

    fn random_port(&self) -> u16 {
        rand::thread_rng().gen_range(self.node_ports.0..=self.node_ports.1)
    }
}

/// The allocation key of a cluster IP.
pub fn ip_key(ip: &str) -> String {
    format!("/registry/ranges/serviceips/{ip}")
}

/// The allocation key of a node port.
pub fn port_key(port: i64) -> String {
    format!("/registry/ranges/servicenodeports/{port}")
}

fn needs_cluster_ip(svc: &Value) -> bool {
    svc.ptr("/spec/type").and_then(Value::as_str) != Some("ExternalName")
        && svc.ptr("/spec/clusterIP").and_then(Value::as_str) != Some("None")
}

fn needs_node_ports(svc: &Value) -> bool {
    matches!(
        svc.ptr("/spec/type").and_then(Value::as_str),
        Some("NodePort" | "LoadBalancer")
    )
}

/// The allocation keys a Service holds.
pub fn claims_of(svc: &Value) -> Vec<String> {
    let mut out = Vec::new();
    if needs_cluster_ip(svc) {
        if let Some(ip) = svc
            .ptr("/spec/clusterIP")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
        {
            out.push(ip_key(ip));
        }
    }
    if needs_node_ports(svc) {
        for p in svc
            .ptr("/spec/ports")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if let Some(n) = p.get("nodePort").and_then(Value::as_i64) {
                out.push(port_key(n));
            }
        }
    }
    out
}

fn invalid(field: &str, message: String) -> Cause {
    Cause {
        reason: "FieldValueInvalid".into(),
        message,
        field: field.into(),
    }
}

/// Which allocations of `svc` the user asked for (they fail rather than being re-drawn).
#[derive(Debug, Default, Clone)]
pub struct Requested {
    /// The cluster IP was given.
    pub ip: bool,
    /// Node ports that were given.
    pub ports: Vec<i64>,
}

/// Fills in the addresses `svc` lacks, drawing at random; `prev` (on update) keeps what the
/// Service already had. Returns the causes of invalid requests, and what was requested.
pub fn assign(
    svc: &mut Value,
    prev: Option<&Value>,
    ranges: &Ranges,
) -> Result<Requested, Vec<Cause>> {
    let mut req = Requested::default();
    let mut causes = Vec::new();
    if needs_cluster_ip(svc) {
        let given = svc
            .ptr("/spec/clusterIP")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let before = prev
            .and_then(|p| p.ptr("/spec/clusterIP"))
            .and_then(Value::as_str)
            .unwrap_or("");
        let ip = if given.is_empty() && !before.is_empty() {
            before.to_string()
        } else if given.is_empty() {
            ranges.random_ip().to_string()
        } else {
            if !before.is_empty() && before != given {
                causes.push(invalid(
                    "spec.clusterIP",
                    format!("Invalid value: \"{given}\": field is immutable"),
                ));
            }
            match given.parse::<Ipv4Addr>() {
                Ok(ip) if ranges.contains(ip) => {}
                _ => causes.push(invalid(
                    "spec.clusterIP",
                    format!("Invalid value: \"{given}\": provided IP is not in the valid range"),
                )),
            }
            req.ip = before.is_empty();
            given
        };
        svc["spec"]["clusterIP"] = json!(ip);
        svc["spec"]["clusterIPs"] = json!([ip]);
        svc["spec"]["ipFamilies"] = json!(["IPv4"]);
        svc["spec"]["ipFamilyPolicy"] = json!("SingleStack");
    }
    if needs_node_ports(svc) {
        let prev_ports = prev
            .and_then(|p| p.ptr("/spec/ports"))
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let mut used: Vec<i64> = Vec::new();
        if let Some(Value::Array(ports)) = svc.pointer_mut("/spec/ports") {
            for (i, p) in ports.iter_mut().enumerate() {
                let port = p.get("port").cloned();
                let np = match p.get("nodePort").and_then(Value::as_i64) {
                    Some(n) => {
                        if !(i64::from(ranges.node_ports.0)..=i64::from(ranges.node_ports.1))
                            .contains(&n)
                        {
                            causes.push(invalid(
                                &format!("spec.ports[{i}].nodePort"),
                                format!("Invalid value: {n}: provided port is not in the valid range. The range of valid ports is {}-{}", ranges.node_ports.0, ranges.node_ports.1),
                            ));
                        }
                        if !prev_ports
                            .iter()
                            .any(|q| q.get("nodePort").and_then(Value::as_i64) == Some(n))
                        {
                            req.ports.push(n);
                        }
                        n
                    }
                    None => prev_ports
                        .iter()
                        .find(|q| q.get("port") == port.as_ref())
                        .and_then(|q| q.get("nodePort").and_then(Value::as_i64))
                        .unwrap_or_else(|| loop {
                            let n = i64::from(ranges.random_port());
                            if !used.contains(&n) {
                                break n;
                            }
                        }),
                };
                if used.contains(&np) {
                    causes.push(Cause {
                        reason: "FieldValueDuplicate".into(),
                        message: format!("Duplicate value: {np}"),
                        field: format!("spec.ports[{i}].nodePort"),
                    });
                }
                used.push(np);
                p["nodePort"] = json!(np);
            }
        }
    } else if let Some(Value::Array(ports)) = svc.pointer_mut("/spec/ports") {
        for p in ports.iter_mut().filter_map(Value::as_object_mut) {
            p.remove("nodePort");
        }
    }
    if causes.is_empty() {
        Ok(req)
    } else {
        Err(causes)
    }
}

/// The 422 for an address the user asked for that another Service holds.
pub fn taken(r: &super::resources::Resource, name: &str, key: &str) -> KubeError {
    let (field, what) = match key.strip_prefix("/registry/ranges/serviceips/") {
        Some(ip) => (
            "spec.clusterIP",
            format!("\"{ip}\": provided IP is already allocated"),
        ),
        None => (
            "spec.ports[0].nodePort",
            format!(
                "{}: provided port is already allocated",
                key.rsplit('/').next().unwrap_or("")
            ),
        ),
    };
    KubeError::invalid(
        r,
        name,
        vec![invalid(field, format!("Invalid value: {what}"))],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_parse_and_assignments_stay_inside_them() {
        let r = Ranges::parse("10.96.0.0/12", "30000-32767").unwrap();
        assert_eq!(r.cidr_size, 1 << 20);
        for _ in 0..100 {
            let mut svc =
                json!({"spec": {"type": "NodePort", "ports": [{"port": 80}, {"port": 443}]}});
            assign(&mut svc, None, &r).unwrap();
            let ip: Ipv4Addr = svc["spec"]["clusterIP"].as_str().unwrap().parse().unwrap();
            assert!(r.contains(ip) && ip != Ipv4Addr::new(10, 96, 0, 1));
            let a = svc["spec"]["ports"][0]["nodePort"].as_i64().unwrap();
            let b = svc["spec"]["ports"][1]["nodePort"].as_i64().unwrap();
            assert!(a != b && (30000..=32767).contains(&a));
            assert_eq!(claims_of(&svc).len(), 3);
        }
        let mut bad = json!({"spec": {"clusterIP": "192.168.0.1", "ports": [{"port": 80}]}});
        assert!(assign(&mut bad, None, &r).is_err());
        let mut headless = json!({"spec": {"clusterIP": "None", "ports": [{"port": 80}]}});
        assign(&mut headless, None, &r).unwrap();
        assert!(claims_of(&headless).is_empty());
    }
}
