//! `flotilla certs init`: a cluster CA and the certificates of its replicas, agents and an
//! admin, with the identities the API reads from them (CN = user, O = groups):
//!
//! | file | CN | O | used for |
//! |---|---|---|---|
//! | `ca.crt`, `ca.key` | `flotilla-ca` | | signs everything below |
//! | `replica-<id>.crt/.key` | `system:flotilla:replica:<id>` | `system:flotilla:replicas` | the API's and the peer listener's certificate, the peer client's, and the client certificate replicas show agents |
//! | `agent-<name>.crt/.key` | `system:node:<name>` | `system:nodes` | the agent's client certificate and its endpoint's certificate |
//! | `admin.crt/.key` | `admin` | `system:masters` | an administrator (`admin.kubeconfig`) |
//! | `sa.key` | | | signs ServiceAccount tokens (`--service-account-signing-key-file`) |
//!
//! Owns the files of `--dir`. Invariants: an existing CA is reused (so agents can be added
//! later) and never overwritten; keys are written mode 0600; every certificate names its
//! host (IP or DNS name) and `localhost`/`127.0.0.1` among its subject alternative names.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

/// The group of replica certificates: what an agent's endpoint lets in.
pub const REPLICAS_GROUP: &str = "system:flotilla:replicas";
/// The group of node agents' certificates.
pub const NODES_GROUP: &str = "system:nodes";
/// Certificates are valid this long.
const VALID_DAYS: i64 = 365;

/// Flags of `flotilla certs`.
#[derive(Debug, clap::Args)]
pub struct CertsArgs {
    #[command(subcommand)]
    pub command: CertsCmd,
}

/// `flotilla certs` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum CertsCmd {
    /// Create (or extend) a cluster CA and the certificates of replicas, agents and an admin.
    Init(InitArgs),
}

/// Flags of `flotilla certs init`.
#[derive(Debug, Clone, clap::Args)]
pub struct InitArgs {
    /// Where the files go (created if missing; an existing `ca.crt`/`ca.key` is reused).
    #[arg(long)]
    pub dir: PathBuf,
    /// The replicas, `id=host` (an IP address or DNS name) each.
    #[arg(long, value_delimiter = ',')]
    pub replicas: Vec<String>,
    /// The node agents, `name=host` each.
    #[arg(long, value_delimiter = ',')]
    pub agents: Vec<String>,
    /// The API URL written into `admin.kubeconfig` (default: the first replica's host, port
    /// 6443).
    #[arg(long)]
    pub server: Option<String>,
}

/// Runs `flotilla certs`.
pub fn run(args: CertsArgs) -> Result<()> {
    match args.command {
        CertsCmd::Init(a) => {
            let written = init(&a)?;
            for f in written {
                println!("{}", f.display());
            }
            Ok(())
        }
    }
}

fn pairs(items: &[String], what: &str) -> Result<Vec<(String, String)>> {
    items
        .iter()
        .filter(|s| !s.trim().is_empty())
        .map(|s| {
            let (k, v) = s
                .split_once('=')
                .with_context(|| format!("--{what} takes name=host, not {s:?}"))?;
            if k.is_empty() || v.is_empty() {
                bail!("--{what} takes name=host, not {s:?}");
            }
            Ok((k.trim().to_string(), v.trim().to_string()))
        })
        .collect()
}

fn validity(params: &mut CertificateParams) {
    let now = time::OffsetDateTime::now_utc();
    // A little slack for clocks slightly behind.
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(VALID_DAYS);
}

/// Writes a file only its owner may read (keys, kubeconfigs with credentials), synced.
pub fn write_private(path: &Path, text: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    // An existing file keeps its mode on open: narrow it.
    f.set_permissions(std::fs::Permissions::from_mode(0o600))
        .and_then(|()| f.write_all(text.as_bytes()))
        .and_then(|()| f.sync_all())
        .with_context(|| format!("writing {}", path.display()))
}

/// The CA: read from `dir` if there, else made and written.
fn ca(dir: &Path, written: &mut Vec<PathBuf>) -> Result<(rcgen::Certificate, KeyPair)> {
    let (crt, key) = (dir.join("ca.crt"), dir.join("ca.key"));
    if crt.exists() || key.exists() {
        let key_pem = std::fs::read_to_string(&key)
            .with_context(|| format!("reading the existing CA key {}", key.display()))?;
        let crt_pem = std::fs::read_to_string(&crt)
            .with_context(|| format!("reading the existing CA {}", crt.display()))?;
        let key_pair = KeyPair::from_pem(&key_pem)
            .with_context(|| format!("{} is not a private key", key.display()))?;
        let params = CertificateParams::from_ca_cert_pem(&crt_pem)
            .with_context(|| format!("{} is not a CA certificate", crt.display()))?;
        // The same subject and key: what it signs verifies against the file on disk.
        let cert = params.self_signed(&key_pair)?;
        return Ok((cert, key_pair));
    }
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "flotilla-ca");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(10 * VALID_DAYS);
    let key_pair = KeyPair::generate()?;
    let cert = params.self_signed(&key_pair)?;
    write_private(&key, &key_pair.serialize_pem())?;
    std::fs::write(&crt, cert.pem()).with_context(|| format!("writing {}", crt.display()))?;
    written.extend([crt, key]);
    Ok((cert, key_pair))
}

/// One leaf certificate, written as `<name>.crt`/`<name>.key`.
#[allow(clippy::too_many_arguments)]
fn leaf(
    dir: &Path,
    name: &str,
    cn: &str,
    groups: &[&str],
    hosts: &[&str],
    server: bool,
    ca: &(rcgen::Certificate, KeyPair),
    written: &mut Vec<PathBuf>,
) -> Result<()> {
    let mut sans: Vec<String> = hosts.iter().map(|h| h.to_string()).collect();
    if server {
        for h in ["localhost", "127.0.0.1"] {
            if !sans.iter().any(|s| s == h) {
                sans.push(h.to_string());
            }
        }
    }
    let mut params = CertificateParams::new(sans)?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    for g in groups {
        dn.push(DnType::OrganizationName, *g);
    }
    params.distinguished_name = dn;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = if server {
        vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ]
    } else {
        vec![ExtendedKeyUsagePurpose::ClientAuth]
    };
    validity(&mut params);
    let key_pair = KeyPair::generate()?;
    let cert = params.signed_by(&key_pair, &ca.0, &ca.1)?;
    let (crt, key) = (
        dir.join(format!("{name}.crt")),
        dir.join(format!("{name}.key")),
    );
    write_private(&key, &key_pair.serialize_pem())?;
    std::fs::write(&crt, cert.pem()).with_context(|| format!("writing {}", crt.display()))?;
    written.extend([crt, key]);
    Ok(())
}

/// A kubeconfig for `server` with the client certificate `cert`/`key` (or none) and the
/// CA `ca`, all by path.
pub fn kubeconfig(server: &str, ca: Option<&Path>, cert: Option<(&Path, &Path)>) -> String {
    let mut cluster = format!("    server: {server}\n");
    if let Some(ca) = ca {
        cluster.push_str(&format!("    certificate-authority: {}\n", ca.display()));
    }
    let user = match cert {
        Some((c, k)) => format!(
            "- name: flotilla\n  user:\n    client-certificate: {}\n    client-key: {}\n",
            c.display(),
            k.display()
        ),
        None => "- name: flotilla\n  user: {}\n".to_string(),
    };
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: flotilla\n  cluster:\n{cluster}users:\n{user}contexts:\n- name: flotilla\n  context:\n    cluster: flotilla\n    user: flotilla\ncurrent-context: flotilla\n"
    )
}

/// Writes the CA (unless there) and every certificate `args` names; returns the files
/// written.
pub fn init(args: &InitArgs) -> Result<Vec<PathBuf>> {
    let replicas = pairs(&args.replicas, "replicas")?;
    let agents = pairs(&args.agents, "agents")?;
    for (id, _) in &replicas {
        if id.parse::<u64>().map_or(true, |n| n == 0) {
            bail!("--replicas: the id {id:?} is not a positive integer");
        }
    }
    for (name, _) in &agents {
        if !name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
        {
            bail!("--agents: {name:?} is not a node name (lowercase letters, digits, '-', '.')");
        }
    }
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("creating {}", args.dir.display()))?;
    let dir = args.dir.canonicalize()?;
    let mut written = Vec::new();
    let ca = ca(&dir, &mut written)?;
    for (id, host) in &replicas {
        leaf(
            &dir,
            &format!("replica-{id}"),
            &format!("system:flotilla:replica:{id}"),
            &[REPLICAS_GROUP],
            &[host],
            true,
            &ca,
            &mut written,
        )?;
    }
    for (name, host) in &agents {
        leaf(
            &dir,
            &format!("agent-{name}"),
            &format!("system:node:{name}"),
            &[NODES_GROUP],
            &[host],
            true,
            &ca,
            &mut written,
        )?;
    }
    leaf(
        &dir,
        "admin",
        "admin",
        &["system:masters"],
        &[],
        false,
        &ca,
        &mut written,
    )?;
    // The ServiceAccount token signing key: kept (tokens stay valid across runs).
    let sa = dir.join("sa.key");
    if !sa.exists() {
        write_private(&sa, &KeyPair::generate()?.serialize_pem())?;
        written.push(sa);
    }
    let server = args.server.clone().unwrap_or_else(|| {
        let host = replicas.first().map_or("127.0.0.1", |(_, h)| h.as_str());
        format!("https://{host}:6443")
    });
    let config = kubeconfig(
        &server,
        Some(&dir.join("ca.crt")),
        Some((&dir.join("admin.crt"), &dir.join("admin.key"))),
    );
    let path = dir.join("admin.kubeconfig");
    write_private(&path, &config)?;
    written.push(path);
    Ok(written)
}
