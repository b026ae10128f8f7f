//! The catalog as stored in the lake: `_sluice/catalog.json`.
//!
//! It lists the `CREATE SOURCE` and `CREATE STREAM` statements that are in force, in the
//! order they were made; a server starting on the lake runs them again. It is rewritten
//! whole (one PUT, atomic on both back ends) after every DDL statement.

use object_store::path::Path;
use serde::{Deserialize, Serialize};
use sluice_connectors::lake::{Lake, Zone};

use crate::error::{Result, ServerError};

/// The catalog format version this build writes and reads.
pub const CATALOG_VERSION: u32 = 1;

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

#[derive(Debug, Serialize, Deserialize)]
struct CatalogFile {
    version: u32,
    entries: Vec<Entry>,
}

fn path(lake: &Lake) -> Path {
    lake.dir(Zone::Internal, "").join("catalog.json")
}

/// Reads the catalog. An absent file is an empty catalog — unless the lake holds data
/// (`processed/` or `raw/`): then the catalog was lost, and starting an empty server over
/// that data would hide it; that is an error.
pub async fn load(lake: &Lake) -> Result<Vec<Entry>> {
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
            Ok(vec![])
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

/// The entries of a catalog file's bytes (none for empty bytes).
pub fn parse(bytes: &[u8]) -> Result<Vec<Entry>> {
    if bytes.is_empty() {
        return Ok(vec![]);
    }
    let file: CatalogFile = serde_json::from_slice(bytes)
        .map_err(|e| ServerError::External(format!("unreadable catalog: {e}")))?;
    if file.version > CATALOG_VERSION {
        return Err(ServerError::External(format!(
            "catalog version {} was written by a newer Sluice (this one reads up to {CATALOG_VERSION})",
            file.version
        )));
    }
    Ok(file.entries)
}

/// Replaces the catalog with `entries`.
pub async fn store(lake: &Lake, entries: &[Entry]) -> Result<()> {
    let file = CatalogFile {
        version: CATALOG_VERSION,
        entries: entries.to_vec(),
    };
    let bytes = serde_json::to_vec_pretty(&file).expect("the catalog serialises");
    lake.put(&path(lake), bytes).await?;
    Ok(())
}
