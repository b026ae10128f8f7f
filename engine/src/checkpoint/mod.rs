//! Aligned-barrier checkpoints (Chandy–Lamport, as Flink, Arroyo and RisingWave do them) and
//! the two-phase commit of what streams write to the lake.
//!
//! ```text
//!            request epoch e (watch)                   reports (positions, state, staged files)
//!  Coordinator ──────────────► readers ─► Barrier(e) ─► stream task ─► Barrier(e) ─► lake writer
//!       ▲                        │                        │                            │
//!       └────────────────────────┴────────────────────────┴────────────────────────────┘
//! ```
//!
//! One [`Coordinator`] serves a whole server (the RisingWave model: one epoch for every
//! stream, so a stream reading another stream restores to the same cut as its input).
//! Every `interval` it requests epoch `e`; each reader of a registered stream, between two
//! batches, reports its position and sends `Barrier(e)`; a stream task aligns the barrier
//! over its inputs (holding back the inputs that delivered it), reports a copy of its
//! operators' state and forwards it; the lake writer closes the files it staged during the
//! epoch and reports them. When every participant has reported, the coordinator writes the
//! state files and then `manifest.json` under `_sluice/checkpoints/<epoch>/` — the commit
//! point — and only then moves the staged files to their place in the lake (phase two).
//! A participant whose input ended reports once more, with its final position and state;
//! that report stands for it in every later epoch.
//!
//! On start, [`Coordinator::open`] reads the newest manifest, finishes its phase two (moving
//! any staged file it lists that is still staged), claims the next epoch (see *Fencing*),
//! deletes every other staged file (epochs that never committed) and hands each stream its
//! positions and state when it registers again with the same SQL.
//!
//! # Fencing
//!
//! One process writes a lake (the server holds a lease; see [`Fence`]). Every commit first
//! asks the fence whether this process still holds it, and writes its manifest only if no
//! manifest of that epoch exists ([`CheckpointStore::put_new`]: `If-None-Match` on S3). A
//! process taking over claims the epoch after the newest manifest at once, by writing a copy
//! of it under that epoch: a paused old writer that wakes up and tries to commit the epoch it
//! had in flight finds it taken, and stops (`EngineError::Fenced`) without publishing. State is stored as Arrow IPC files per operator table, with the
//! format version in the manifest, so a newer Sluice knows what an older one wrote.
//!
//! # Retention
//!
//! The newest [`DEFAULT_RETENTION`] checkpoints are kept (their folders, and every state
//! file their manifests name; [`Coordinator::set_retention`]). When the newest manifest is
//! unreadable (a disk fault, a hand edit), [`Coordinator::open`] starts from the newest one
//! that reads, says so in the log, and claims an epoch past every existing one: the sources
//! replay from that older checkpoint's positions, rather than from their beginning.
//!
//! # Layout
//!
//! - `participant.rs`: what readers, stream tasks and writers use — their handles, the
//!   reports they make, the state they hand over.
//! - `coordinator.rs`: the [`Coordinator`]: epochs, registration, commit, timeout, retention.
//! - `manifest.rs`: what a committed checkpoint is on storage, and how it is read back.
//! - `store.rs`: what the coordinator needs of the lake ([`CheckpointStore`], [`Fence`]).

mod coordinator;
mod manifest;
mod participant;
mod store;

pub use coordinator::*;
pub use manifest::*;
pub use participant::*;
pub use store::*;

/// How many checkpoints are kept by default.
pub const DEFAULT_RETENTION: usize = 3;

/// Where checkpoints live, relative to the lake's root.
pub const CHECKPOINTS_DIR: &str = "_sluice/checkpoints";

/// Where lake writers stage the files of epochs not yet committed.
pub const STAGING_DIR: &str = "_sluice/staging";
