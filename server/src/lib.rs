//! The `sluice` server: a Postgres-wire endpoint for DDL and ad-hoc SQL, an HTTP endpoint
//! for ingestion and health, the catalog in the lake, and the running pipelines.
//!
//! [`Sluice`] is the instance every connection shares; [`pg`] and [`http`] are its two
//! front doors; [`start`] binds both and opens the lake.

pub mod access;
pub mod adhoc;
pub mod catalog;
pub mod connections;
pub mod copy;
pub mod error;
pub mod http;
pub mod instance;
pub mod lake_tables;
pub mod lease;
pub mod metrics;
pub mod node;
pub mod pg;
pub mod pg_compat;
pub mod query_runtime;
pub mod runtime;
pub mod scram;
pub mod server;
pub mod session;
pub mod show;
pub mod system;
pub mod tls;

pub use error::{Result, ServerError};
pub use instance::{Outcome, Sluice};
pub use node::Node;
pub use server::{RunningServer, ServerConfig, start};
