//! The lanyard server: configuration, the runtime (exchange, renew, release flows), the
//! gRPC services and HTTP endpoints, the one registry of destination adapters, and the
//! one place errors become wire statuses. Only this crate sees every other crate.

pub mod audit;
pub mod audit_svc;
pub mod coalesce;
pub mod commit;
pub mod config;
pub mod convert;
pub mod dev;
pub mod dry_run;
pub mod error;
pub mod http;
pub mod introspect;
pub mod inventory;
pub mod metrics;
pub mod policy_store;
pub mod proxy;
pub mod registry;
pub mod replay;
pub mod revoke;
pub mod runtime;
pub mod serve;
pub mod services;
pub mod telemetry;

pub use config::{Config, FileConfig, FlagOverrides};
pub use serve::{ServeOptions, serve};
