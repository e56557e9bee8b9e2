//! The cluster DNS each agent serves (`flotilla agent --cluster-dns`), against a real
//! three-replica cluster with the real endpoints controller: service, headless, SRV,
//! ExternalName and pod names, NXDOMAIN and NODATA, forwarding to the host's resolvers, a
//! pod resolving names through its resolv.conf and search path with the Kubernetes service
//! environment, answers following a scale-down, and answers kept (and caught up) while the
//! replica the agent watches is killed.
//!
//! Needs root (port 53, the pod's mount namespace). Every address is inside the test's own
//! loopback block `127.X.Y.0/24`: replicas on `.1`–`.5`, service IPs `.64/28`, the cluster
//! DNS on `.53`, a stand-in upstream resolver on `.54`, pods on `.128/25`.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{RData, Record, RecordType};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

/// One UDP query to `server`: the answer, or `None` after a second of silence.
async fn ask(server: SocketAddr, name: &str, qtype: RecordType) -> Option<Message> {
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let id = rand::random::<u16>();
    sock.send_to(&flotilla::agent::dns::query(id, name, qtype), server)
        .await
        .unwrap();
    let mut buf = vec![0u8; 65535];
    let (n, _) = tokio::time::timeout(Duration::from_secs(1), sock.recv_from(&mut buf))
        .await
        .ok()?
        .ok()?;
    let m = Message::from_vec(&buf[..n]).unwrap();
    assert_eq!(m.id(), id, "the answer carries the query's id");
    Some(m)
}

/// The answer's records' data, sorted.
fn data(m: &Message) -> Vec<String> {
    let mut v: Vec<String> = m.answers().iter().map(|r| r.data().to_string()).collect();
    v.sort();
    v
}

/// Waits until `name` answers `want` (sorted record data).
async fn until_answers(server: SocketAddr, name: &str, qtype: RecordType, want: &[String]) {
    wait_for(
        Duration::from_secs(60),
        &format!("{name} {qtype} to answer {want:?}"),
        || async {
            let m = ask(server, name, qtype).await?;
            (data(&m) == want).then_some(())
        },
    )
    .await
}

/// A stand-in for the host's resolver: `www.example.com` is 192.0.2.7, nothing else exists
/// (so a search-path try that leaves the cluster domain gets NXDOMAIN, as on the Internet).
async fn upstream(addr: SocketAddr) -> tokio::task::JoinHandle<()> {
    let sock = UdpSocket::bind(addr)
        .await
        .expect("the upstream binds port 53");
    tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        loop {
            let Ok((n, peer)) = sock.recv_from(&mut buf).await else {
                return;
            };
            let Ok(q) = Message::from_vec(&buf[..n]) else {
                continue;
            };
            let mut m = Message::new();
            m.set_id(q.id())
                .set_message_type(MessageType::Response)
                .set_recursion_available(true);
            m.add_queries(q.queries().iter().cloned());
            match q.queries().first() {
                Some(query)
                    if query
                        .name()
                        .to_ascii()
                        .eq_ignore_ascii_case("www.example.com.") =>
                {
                    m.add_answer(Record::from_rdata(
                        query.name().clone(),
                        60,
                        RData::A(A("192.0.2.7".parse().unwrap())),
                    ));
                }
                _ => {
                    m.set_response_code(ResponseCode::NXDomain);
                }
            }
            let _ = sock.send_to(&m.to_vec().unwrap(), peer).await;
        }
    })
}

async fn get(c: &Cluster, id: u64, path: &str) -> (u16, Value) {
    req(
        &[c.replica(id).api()],
        http::Method::GET,
        path,
        "application/json",
        &Value::Null,
    )
    .await
}

/// The addresses of the running pods labelled `app=web`, sorted.
async fn web_ips(c: &Cluster, id: u64) -> Vec<String> {
    let (_, list) = get(
        c,
        id,
        "/api/v1/namespaces/default/pods?labelSelector=app%3Dweb",
    )
    .await;
    let mut ips: Vec<String> = list["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["metadata"]["deletionTimestamp"].is_null())
        .filter(|p| p["status"]["phase"] == "Running")
        .filter_map(|p| p["status"]["podIP"].as_str().map(str::to_string))
        .collect();
    ips.sort();
    ips
}

const MANIFESTS: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  replicas: 3
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      terminationGracePeriodSeconds: 1
      containers:
      - name: c
        image: busybox
        command: ["sleep", "600"]
        ports: [{name: http, containerPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  selector: {app: web}
  ports:
  - {name: http, port: 80, targetPort: http}
  - {name: metrics, port: 9090, protocol: UDP}
---
apiVersion: v1
kind: Service
metadata: {name: web-headless}
spec:
  clusterIP: None
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: http}]
---
apiVersion: v1
kind: Service
metadata: {name: docs}
spec:
  type: ExternalName
  externalName: docs.example.org
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cluster_dns_answers_as_coredns_and_pods_resolve_through_it() {
    if !nix::unistd::geteuid().is_root() {
        panic!("this test needs root (port 53 and mount namespaces)");
    }
    let mut c = Cluster::new(3, &[]);
    let prefix = c.prefix.clone();
    c.args = vec![
        "--service-cluster-ip-range".into(),
        format!("{prefix}.64/28"),
    ];
    for id in 1..=3 {
        c.launch(id, &[]);
    }
    c.wait_leader().await;
    c.wait_bootstrapped().await;
    let dns: SocketAddr = format!("{prefix}.53:53").parse().unwrap();
    let _upstream = upstream(format!("{prefix}.54:53").parse().unwrap()).await;
    let resolv = c.dir.path().join("host-resolv.conf");
    std::fs::write(
        &resolv,
        format!("search corp.example\nnameserver {prefix}.54\n"),
    )
    .unwrap();
    let _agent = Agent::start(
        &c,
        "n1",
        &c.dir.path().join("agent-n1"),
        &[
            "--pod-cidr",
            &format!("{prefix}.128/25"),
            "--cluster-dns",
            &dns.ip().to_string(),
            "--resolv-conf",
            resolv.to_str().unwrap(),
        ],
    );
    let manifests = c.dir.path().join("dns.yaml");
    std::fs::write(&manifests, MANIFESTS).unwrap();
    let kubectl = Kubectl::new(&c, 2);
    kubectl.ok(&["apply", "-f", manifests.to_str().unwrap()]);
    let (_, svc) = get(&c, 2, "/api/v1/namespaces/default/services/web").await;
    let cluster_ip = svc["spec"]["clusterIP"].as_str().unwrap().to_string();
    assert!(cluster_ip.starts_with(&prefix), "{svc}");

    // A service's name: its cluster IP, authoritative, with the short TTL.
    until_answers(
        dns,
        "web.default.svc.cluster.local",
        RecordType::A,
        std::slice::from_ref(&cluster_ip),
    )
    .await;
    let m = ask(dns, "web.default.svc.cluster.local", RecordType::A)
        .await
        .unwrap();
    assert!(m.authoritative());
    assert_eq!(m.answers()[0].ttl(), 5);
    // Headless: the three running pods' own addresses, once they are ready.
    let ips = wait_for(
        Duration::from_secs(60),
        "three web pods running",
        || async {
            let ips = web_ips(&c, 2).await;
            (ips.len() == 3).then_some(ips)
        },
    )
    .await;
    until_answers(
        dns,
        "web-headless.default.svc.cluster.local",
        RecordType::A,
        &ips,
    )
    .await;
    // SRV of a named port: per endpoint for the headless service, the service for the other.
    let m = ask(
        dns,
        "_http._tcp.web-headless.default.svc.cluster.local",
        RecordType::SRV,
    )
    .await
    .unwrap();
    assert_eq!(m.answers().len(), 3, "{m}");
    for r in m.answers() {
        let RData::SRV(srv) = r.data() else {
            panic!("{r}")
        };
        assert_eq!(srv.port(), 8080, "the endpoints' port");
        assert!(srv
            .target()
            .to_ascii()
            .ends_with(".web-headless.default.svc.cluster.local."));
    }
    assert_eq!(
        m.additionals().len(),
        3,
        "the targets' addresses come along"
    );
    let m = ask(
        dns,
        "_metrics._udp.web.default.svc.cluster.local",
        RecordType::SRV,
    )
    .await
    .unwrap();
    assert_eq!(data(&m), ["0 100 9090 web.default.svc.cluster.local."]);
    // ExternalName: a CNAME.
    let m = ask(dns, "docs.default.svc.cluster.local", RecordType::A)
        .await
        .unwrap();
    assert_eq!(data(&m), ["docs.example.org."]);
    // A pod name; then what does not exist, and what exists without the asked type.
    let m = ask(dns, "10-1-2-3.default.pod.cluster.local", RecordType::A)
        .await
        .unwrap();
    assert_eq!(data(&m), ["10.1.2.3"]);
    let m = ask(dns, "nope.default.svc.cluster.local", RecordType::A)
        .await
        .unwrap();
    assert_eq!(m.response_code(), ResponseCode::NXDomain);
    assert_eq!(
        m.name_servers()[0].record_type(),
        RecordType::SOA,
        "negative answers carry the SOA"
    );
    let m = ask(dns, "web.default.svc.cluster.local", RecordType::AAAA)
        .await
        .unwrap();
    assert_eq!(
        (m.response_code(), m.answers().len()),
        (ResponseCode::NoError, 0),
        "NODATA"
    );
    // Other names go to the host's resolvers.
    let m = ask(dns, "www.example.com", RecordType::A).await.unwrap();
    assert_eq!(data(&m), ["192.0.2.7"]);
    // TCP too.
    let mut s = TcpStream::connect(dns).await.unwrap();
    let q = flotilla::agent::dns::query(77, "web.default.svc.cluster.local", RecordType::A);
    s.write_all(&(q.len() as u16).to_be_bytes()).await.unwrap();
    s.write_all(&q).await.unwrap();
    let mut len = [0u8; 2];
    s.read_exact(&mut len).await.unwrap();
    let mut buf = vec![0u8; u16::from_be_bytes(len) as usize];
    s.read_exact(&mut buf).await.unwrap();
    assert_eq!(
        data(&Message::from_vec(&buf).unwrap()),
        std::slice::from_ref(&cluster_ip)
    );

    // A pod resolves through its resolv.conf (a full name, a short one through the search
    // path, an outside one forwarded) and gets the services' environment.
    let client = c.dir.path().join("client.yaml");
    std::fs::write(
        &client,
        r#"
apiVersion: v1
kind: Pod
metadata: {name: client}
spec:
  restartPolicy: Never
  containers:
  - name: c
    image: python
    command:
    - python3
    - -c
    - |
      import os, socket
      print("full", socket.gethostbyname("web.default.svc.cluster.local"))
      print("short", socket.gethostbyname("web"))
      print("headless", " ".join(sorted(socket.gethostbyname_ex("web-headless")[2])))
      print("outside", socket.gethostbyname("www.example.com"))
      print("env", os.environ["WEB_SERVICE_HOST"], os.environ["WEB_SERVICE_PORT_HTTP"])
      print(open("/etc/resolv.conf").read())
"#,
    )
    .unwrap();
    kubectl.ok(&["apply", "-f", client.to_str().unwrap()]);
    wait_for(
        Duration::from_secs(60),
        "the client pod to finish",
        || async {
            let (_, p) = get(&c, 2, "/api/v1/namespaces/default/pods/client").await;
            let phase = p["status"]["phase"].as_str().unwrap_or("").to_string();
            (phase == "Succeeded" || phase == "Failed").then_some(())
        },
    )
    .await;
    let logs = kubectl.ok(&["logs", "client"]);
    assert!(logs.contains(&format!("full {cluster_ip}\n")), "{logs}");
    assert!(logs.contains(&format!("short {cluster_ip}\n")), "{logs}");
    assert!(
        logs.contains(&format!("headless {}\n", ips.join(" "))),
        "{logs}"
    );
    assert!(logs.contains("outside 192.0.2.7\n"), "{logs}");
    assert!(logs.contains(&format!("env {cluster_ip} 80\n")), "{logs}");
    assert!(
        logs.contains(
            "search default.svc.cluster.local svc.cluster.local cluster.local corp.example"
        ),
        "{logs}"
    );
    assert!(logs.contains("options ndots:5"), "{logs}");
    // The host's own resolv.conf is untouched.
    assert!(!std::fs::read_to_string("/etc/resolv.conf")
        .unwrap()
        .contains(&dns.ip().to_string()));

    // Scaled to one: the headless name follows the endpoints within about a second of the
    // EndpointSlice changing.
    kubectl.ok(&["scale", "deploy/web", "--replicas=1"]);
    wait_for(Duration::from_secs(60), "the web EndpointSlice to hold one ready endpoint", || async {
        let (_, list) = get(
            &c,
            2,
            "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices?labelSelector=kubernetes.io%2Fservice-name%3Dweb-headless",
        )
        .await;
        let ready = list["items"]
            .as_array()?
            .iter()
            .flat_map(|s| s["endpoints"].as_array().into_iter().flatten())
            .filter(|e| e["conditions"]["ready"] == true)
            .count();
        (ready == 1).then_some(())
    })
    .await;
    let changed = Instant::now();
    wait_for(
        Duration::from_secs(3),
        "DNS to follow the scale-down",
        || async {
            let m = ask(dns, "web-headless.default.svc.cluster.local", RecordType::A).await?;
            (m.answers().len() == 1).then_some(())
        },
    )
    .await;
    eprintln!("DNS followed the EndpointSlice in {:?}", changed.elapsed());

    // The replica the agent watches (the first it was given) dies: answers keep coming from
    // the cache at once, and a service created afterwards resolves once the agent has moved
    // to another replica.
    c.kill(1);
    let m = ask(dns, "web.default.svc.cluster.local", RecordType::A)
        .await
        .unwrap();
    assert_eq!(data(&m), std::slice::from_ref(&cluster_ip));
    c.wait_leader().await;
    Kubectl::new(&c, 3).ok(&["create", "service", "clusterip", "late", "--tcp=80:8080"]);
    let (_, late) = get(&c, 3, "/api/v1/namespaces/default/services/late").await;
    let late_ip = late["spec"]["clusterIP"].as_str().unwrap().to_string();
    until_answers(
        dns,
        "late.default.svc.cluster.local",
        RecordType::A,
        &[late_ip],
    )
    .await;
    // Deleted: NXDOMAIN.
    Kubectl::new(&c, 3).ok(&["delete", "service", "late"]);
    wait_for(
        Duration::from_secs(30),
        "a deleted service to be gone",
        || async {
            let m = ask(dns, "late.default.svc.cluster.local", RecordType::A).await?;
            (m.response_code() == ResponseCode::NXDomain).then_some(())
        },
    )
    .await;
    Kubectl::new(&c, 3).ok(&["delete", "-f", manifests.to_str().unwrap(), "--wait=false"]);
}
