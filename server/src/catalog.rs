//! The catalog as stored in the lake: `_sluice/catalog.json`.
//!
//! It lists the `CREATE SOURCE`, `CREATE STREAM` and `CREATE SINK` statements that are in
//! force, in the order they were made (a server starting on the lake runs them again), and
//! what access control stores: roles with their SCRAM verifiers, grants, owners, policies,
//! token hashes and sealed secrets ([`AccessState`]). It is rewritten whole (one PUT, atomic
//! on both back ends) after every DDL statement.

use object_store::path::Path;
use serde::{Deserialize, Serialize};
use sluice_connectors::lake::{Lake, Zone};

use crate::access::AccessState;
use crate::error::{Result, ServerError};

/// The newest catalog format version this build writes and reads: 2 holds access control
/// (written only when there is some, so that a build without access control refuses a
/// catalog that has it rather than ignoring it).
pub const CATALOG_VERSION: u32 = 2;

/// One catalog entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// `source` or `stream`.
    pub kind: String,
    /// The object's name.
    pub name: String,
    /// The statement that creates it.
    pub sql: String,
}

/// A catalog: its objects and its access control.
#[derive(Debug, Clone, Default)]
pub struct Catalog {
    /// The objects, in creation order.
    pub entries: Vec<Entry>,
    /// Roles, grants, owners, policies, tokens, secrets.
    pub access: AccessState,
}

#[derive(Debug, Serialize, Deserialize)]
struct CatalogFile {
    version: u32,
    entries: Vec<Entry>,
    #[serde(default, skip_serializing_if = "AccessState::is_empty")]
    access: AccessState,
}

fn path(lake: &Lake) -> Path {
    lake.dir(Zone::Internal, "").join("catalog.json")
}

/// Reads the catalog. An absent file is an empty catalog — unless the lake holds data
/// (`processed/` or `raw/`): then the catalog was lost, and starting an empty server over
/// that data would hide it; that is an error.
pub async fn load(lake: &Lake) -> Result<Catalog> {
    match raw(lake).await? {
        Some(bytes) => parse(&bytes).map_err(|e| {
            ServerError::External(format!("{}/{}: {e}", lake.location(), path_in_lake()))
        }),
        None => {
            for zone in [Zone::Processed, Zone::Raw] {
                if lake.any_object(&lake.dir(zone, "")).await? {
                    return Err(ServerError::External(format!(
                        "the lake holds data ({}/) but no catalog ({}): it was deleted or lost. \
                         Put the catalog file back (from a backup), or start on an empty lake",
                        zone.dir(),
                        path_in_lake()
                    )));
                }
            }
            Ok(Catalog::default())
        }
    }
}

/// The catalog's path inside the lake, for messages.
fn path_in_lake() -> String {
    format!("{}/catalog.json", Zone::Internal.dir())
}

/// The catalog file's bytes, if there is one.
pub async fn raw(lake: &Lake) -> Result<Option<Vec<u8>>> {
    Ok(lake.get_opt(&path(lake)).await?.map(|b| b.to_vec()))
}

/// The catalog a file's bytes hold (an empty one for empty bytes).
pub fn parse(bytes: &[u8]) -> Result<Catalog> {
    if bytes.is_empty() {
        return Ok(Catalog::default());
    }
    let file: CatalogFile = serde_json::from_slice(bytes)
        .map_err(|e| ServerError::External(format!("unreadable catalog: {e}")))?;
    if file.version > CATALOG_VERSION {
        return Err(ServerError::External(format!(
            "catalog version {} was written by a newer Sluice (this one reads up to {CATALOG_VERSION})",
            file.version
        )));
    }
    Ok(Catalog {
        entries: file.entries,
        access: file.access,
    })
}

/// Replaces the catalog with `entries` and `access`.
pub async fn store(lake: &Lake, entries: &[Entry], access: &AccessState) -> Result<()> {
    let file = CatalogFile {
        version: if access.is_empty() {
            1
        } else {
            CATALOG_VERSION
        },
        entries: entries.to_vec(),
        access: access.clone(),
    };
    let bytes = serde_json::to_vec_pretty(&file).expect("the catalog serialises");
    lake.put(&path(lake), bytes).await?;
    Ok(())
}
