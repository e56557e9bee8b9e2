//! Discovery (`/api`, `/apis`, group versions), `/version`, and the minimal OpenAPI v3 that
//! lets `kubectl create -f` and `apply -f` run under their default strict validation.

use http::{header, Response, StatusCode};
use serde_json::{json, Value};

use super::resources::{self, Resource};
use super::status::KubeError;
use crate::http::{full, Body};

/// The Kubernetes version reported (kubectl's dispatcher picks its client by `minor`).
pub const MINOR: &str = "32";

/// Aggregated discovery's content type; kubectl only reads it under exactly this type.
const AGGREGATED: &str = "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList";

fn json_response(value: &Value, content_type: &str) -> Response<Body> {
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, content_type)
        .body(full(serde_json::to_vec(value).expect("JSON serializes")))
        .expect("static response parts are valid")
}

/// `GET /version`.
pub fn version() -> Response<Body> {
    json_response(
        &json!({
            "major": "1",
            "minor": MINOR,
            "gitVersion": format!("v1.{MINOR}.0-flotilla.{}", env!("CARGO_PKG_VERSION")),
            "gitCommit": "",
            "gitTreeState": "clean",
            "buildDate": "",
            "goVersion": "",
            "compiler": "rustc",
            "platform": format!("{}/{}", std::env::consts::OS, if cfg!(target_arch = "x86_64") { "amd64" } else { std::env::consts::ARCH }),
        }),
        "application/json",
    )
}

fn aggregated_resource(r: &Resource) -> Value {
    let mut v = json!({
        "resource": r.plural,
        "responseKind": {"group": r.group, "version": r.version, "kind": r.kind},
        "scope": if r.namespaced { "Namespaced" } else { "Cluster" },
        "singularResource": r.singular,
        "verbs": r.verbs(),
    });
    if !r.short_names.is_empty() {
        v["shortNames"] = json!(r.short_names);
    }
    if !r.categories.is_empty() {
        v["categories"] = json!(r.categories);
    }
    if !r.subresources.is_empty() {
        v["subresources"] = json!(r
            .subresources
            .iter()
            .map(|sub| {
                let (kind, verbs) = subresource(r, sub);
                json!({"subresource": sub, "responseKind": {"group": kind.0, "version": kind.1, "kind": kind.2}, "verbs": verbs})
            })
            .collect::<Vec<_>>());
    }
    v
}

/// The response kind (group, version, kind) and verbs of a subresource.
fn subresource(
    r: &Resource,
    sub: &str,
) -> (
    (&'static str, &'static str, &'static str),
    &'static [&'static str],
) {
    match sub {
        "binding" => (("", "v1", "Binding"), &["create"]),
        "eviction" => (("policy", "v1", "Eviction"), &["create"]),
        "log" => (("", "v1", "Pod"), &["get"]),
        "exec" => (("", "v1", "PodExecOptions"), &["create", "get"]),
        "scale" => (("autoscaling", "v1", "Scale"), &["get", "patch", "update"]),
        _ => ((r.group, r.version, r.kind), &["get", "patch", "update"]),
    }
}

fn aggregated_group(group: &str) -> Value {
    let versions: Vec<&str> = {
        let mut vs: Vec<&str> = resources::RESOURCES
            .iter()
            .filter(|r| r.group == group)
            .map(|r| r.version)
            .collect();
        vs.dedup();
        vs
    };
    json!({
        "metadata": {"name": group},
        "versions": versions.iter().map(|v| json!({
            "version": v,
            "freshness": "Current",
            "resources": resources::of(group, v).into_iter().map(aggregated_resource).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    })
}

/// `GET /api` and `GET /apis`, aggregated when the client asks for it.
pub fn root(core: bool, accept: &str) -> Response<Body> {
    if accept.contains("as=APIGroupDiscoveryList") {
        let items: Vec<Value> = if core {
            vec![aggregated_group("")]
        } else {
            resources::groups()
                .into_iter()
                .map(aggregated_group)
                .collect()
        };
        return json_response(
            &json!({"kind": "APIGroupDiscoveryList", "apiVersion": "apidiscovery.k8s.io/v2", "metadata": {}, "items": items}),
            AGGREGATED,
        );
    }
    if core {
        json_response(
            &json!({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": ""}]}),
            "application/json",
        )
    } else {
        let groups: Vec<Value> = resources::groups().into_iter().map(api_group).collect();
        json_response(
            &json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}),
            "application/json",
        )
    }
}

fn api_group(group: &str) -> Value {
    let version = resources::RESOURCES
        .iter()
        .find(|r| r.group == group)
        .map_or("v1", |r| r.version);
    let gv = json!({"groupVersion": format!("{group}/{version}"), "version": version});
    json!({"kind": "APIGroup", "apiVersion": "v1", "name": group, "versions": [gv.clone()], "preferredVersion": gv})
}

/// `GET /apis/<group>`.
pub fn group(group: &str) -> Result<Response<Body>, KubeError> {
    if !resources::groups().contains(&group) {
        return Err(KubeError::no_route());
    }
    Ok(json_response(&api_group(group), "application/json"))
}

/// `GET /api/v1` and `GET /apis/<group>/<version>`.
pub fn group_version(group: &str, version: &str) -> Result<Response<Body>, KubeError> {
    let list = resources::of(group, version);
    if list.is_empty() {
        return Err(KubeError::no_route());
    }
    let gv = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    let mut subs = Vec::new();
    for r in &list {
        for sub in r.subresources {
            let (kind, verbs) = subresource(r, sub);
            let mut v = json!({
                "name": format!("{}/{sub}", r.plural),
                "singularName": "",
                "namespaced": r.namespaced,
                "kind": kind.2,
                "verbs": verbs,
            });
            if kind.0 != r.group {
                v["group"] = json!(kind.0);
                v["version"] = json!(kind.1);
            }
            subs.push(v);
        }
    }
    let mut resources: Vec<Value> = list
        .into_iter()
        .map(|r| {
            let mut v = json!({
                "name": r.plural,
                "singularName": r.singular,
                "namespaced": r.namespaced,
                "kind": r.kind,
                "verbs": r.verbs(),
            });
            if !r.short_names.is_empty() {
                v["shortNames"] = json!(r.short_names);
            }
            if !r.categories.is_empty() {
                v["categories"] = json!(r.categories);
            }
            v
        })
        .collect();
    resources.extend(subs);
    Ok(json_response(
        &json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources}),
        "application/json",
    ))
}

fn gv_path(group: &str, version: &str) -> String {
    if group.is_empty() {
        format!("api/{version}")
    } else {
        format!("apis/{group}/{version}")
    }
}

/// `GET /openapi/v3`: one document per served group version.
pub fn openapi_index() -> Response<Body> {
    let mut paths = serde_json::Map::new();
    let mut seen = Vec::new();
    for r in resources::RESOURCES {
        let p = gv_path(r.group, r.version);
        if !seen.contains(&p) {
            paths.insert(p.clone(), json!({"serverRelativeURL": format!("/openapi/v3/{p}?hash={}", env!("CARGO_PKG_VERSION"))}));
            seen.push(p);
        }
    }
    json_response(&json!({"paths": paths}), "application/json")
}

/// `GET /openapi/v3/<gv path>`: a `patch` operation per kind carrying its
/// group-version-kind and the `fieldValidation` parameter, which tells kubectl that this
/// server validates fields itself (so kubectl sends `fieldValidation=Strict`).
pub fn openapi_doc(path: &str) -> Result<Response<Body>, KubeError> {
    let mut paths = serde_json::Map::new();
    let mut found = false;
    for r in resources::RESOURCES {
        if gv_path(r.group, r.version) != path {
            continue;
        }
        found = true;
        let url = if r.namespaced {
            format!("/{path}/namespaces/{{namespace}}/{}/{{name}}", r.plural)
        } else {
            format!("/{path}/{}/{{name}}", r.plural)
        };
        paths.insert(
            url,
            json!({"patch": {
                "x-kubernetes-group-version-kind": {"group": r.group, "version": r.version, "kind": r.kind},
                "parameters": [{"name": "fieldValidation", "in": "query", "schema": {"type": "string"}}],
                "responses": {"200": {"description": "OK"}},
            }}),
        );
    }
    if !found {
        return Err(KubeError::no_route());
    }
    Ok(json_response(
        &json!({"openapi": "3.0.0", "info": {"title": "Kubernetes", "version": format!("v1.{MINOR}.0")}, "paths": paths}),
        "application/json",
    ))
}
