//! Flotilla: a Kubernetes-style container orchestrator whose control-plane replicas embed
//! their own Raft-replicated key-value store.
//!
//! The binary (`src/main.rs`) is a thin command-line front end over these modules:
//! - [`server`]: `flotilla server`, one control-plane replica;
//! - [`api`]: the Kubernetes API every replica serves;
//! - [`gateway`]: the key-value API every replica serves (etcd's v3 JSON shapes);
//! - [`ctl`] and [`client`]: `flotilla ctl`, the operator CLI, and its failover client;
//! - [`up`]: `flotilla up`, a local cluster as child processes;
//! - [`metrics`]: Prometheus metrics; [`http`]: HTTP plumbing.

pub mod agent;
pub mod api;
pub mod audit;
pub mod auth;
pub mod certs;
pub mod client;
pub mod controllers;
pub mod ctl;
pub mod gateway;
pub mod http;
pub mod metrics;
pub mod scheduler;
pub mod server;
pub mod tls;
pub mod up;
