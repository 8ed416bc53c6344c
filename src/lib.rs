//! berth: a declarative reconciliation agent for containers on one Linux host.
//!
//! The modules follow the seams in ARCHITECTURE.md: `manifest` (TOML → `Desired`), `observe`
//! (host → `Observed`), `plan` (pure diff → `Plan`), `apply` (execute a `Plan`), `store`
//! (content store and snapshots), `registry` (OCI distribution client), `runtime`, `net`,
//! `agent`, and `cli` (the binary's edge).
#![deny(unsafe_code)]

pub mod agent;
pub mod apply;
pub mod build;
pub mod cli;
pub mod config;
pub mod fault;
pub mod fsutil;
pub mod hash;
pub mod image;
pub mod manifest;
pub mod net;
pub mod observe;
pub mod plan;
pub mod reconcile;
pub mod registry;
pub mod runtime;
pub mod state;
pub mod store;
pub mod sys;
pub mod text;
