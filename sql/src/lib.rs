//! Sluice's streaming SQL front end.
//!
//! - [`parser`] wraps DataFusion's `DFParser` (itself a wrapper of sqlparser) and adds
//!   `CREATE SOURCE`, `CREATE STREAM`, `DROP SOURCE|STREAM`, `SHOW SOURCES|STREAMS`,
//!   `DESCRIBE`; every other statement is handed to DataFusion untouched.
//! - [`source`] turns a parsed `CREATE SOURCE` into a validated [`SourceDef`]: Arrow schema,
//!   watermark, connector configuration.
//! - [`planner`] turns the query of a `CREATE STREAM` into a [`StreamPlan`]: DataFusion plans
//!   and optimises it, and each logical node becomes an operator spec of the runtime.
//! - [`access`] parses users, roles, grants, policies, tokens and secrets.
//! - [`window`] plans window table functions (`TUMBLE`, `HOP`, `SESSION`) in `FROM`.

pub mod access;
pub mod error;
pub mod join;
pub mod limits;
pub mod parser;
pub mod planner;
pub mod source;
pub mod temporal;
pub mod types;
pub mod window;

pub use error::{Result, SqlError};
pub use parser::{ObjectKind, SluiceStatement, parse_sql};
pub use planner::{OpSpec, Relation, StreamPlan, plan_stream};
pub use source::{SourceDef, source_def};
