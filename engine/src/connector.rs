//! Connectors as the runtime sees them: factories that validate `WITH (…)` options into a
//! configured source or sink, and what a configured one opens. The server works with these
//! traits and a [`ConnectorRegistry`] only; it names no connector.
//!
//! ```text
//!  ConnectorRegistry ── connector = 'x' ──► SourceConnector::configure(options, schema)
//!                                             └─► SourceSpec ── open(name, schema, ctx) ──► SourceFeed
//!                                                                   PerStream | Shared | Push
//!                   ── connector = 'y' ──► SinkConnector::configure(options, schema)
//!                                             └─► SinkSpec ── open(name, checkpoint) ──► Sink
//! ```
//!
//! A source feeds streams in one of three ways ([`SourceFeed`]): a reader per stream
//! (a generator, which every stream reads from its start), one shared reader publishing to
//! the source's hub (a log: kafka, kinesis, an object-store landing zone; streams created
//! while it runs may first catch up with a backfill reader, [`ReaderFactory`]), or rows pushed to the
//! server's front door ([`PushSource`]).
//!
//! A source's input is made of splits — a Kafka topic's partitions, a Kinesis stream's shards —
//! each read in order by one reader ([`SourceSpec::splits`]). A source opens for all of them or
//! for a subset ([`Splits`]), so that readers of one source can be spread over processes, each
//! reading its own splits. Sources without several (an HTTP endpoint, a landing prefix whose
//! objects are taken one by one, a generator) have one, [`ONE_SPLIT`].

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use arrow::datatypes::{Schema, SchemaRef};
use futures::future::BoxFuture;

use crate::checkpoint::SinkCheckpoint;
use crate::error::{EngineError, Result};
use crate::options::WithOptions;
use crate::push::PushSource;
use crate::sink::Sink;
use crate::source::{SourceContext, SourceReader};

/// A kind of source (`WITH (connector = '…')`): validates options into a [`SourceSpec`].
pub trait SourceConnector: Send + Sync {
    /// Its name in `WITH (connector = '…')`, lower case.
    fn name(&self) -> &'static str;

    /// Takes this connector's options from `opts` (the registry fails on any left over) for
    /// a source of rows of `schema`, whose metadata columns it checks.
    fn configure(&self, opts: &mut WithOptions, schema: &SchemaRef) -> Result<Arc<dyn SourceSpec>>;
}

/// The name of the split of a source that has only one.
pub const ONE_SPLIT: &str = "all";

/// Which of a source's splits (see [`SourceSpec::splits`]) its readers read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Splits {
    /// Every split, also those that appear while the source runs (a partition added to a
    /// topic, the shards a Kinesis reshard creates).
    #[default]
    All,
    /// The splits named, and the splits that descend from them (the children of a Kinesis
    /// shard that is split or merged), so that the keys of a split stay with one reader.
    Only(BTreeSet<String>),
}

impl Splits {
    /// The splits named.
    pub fn only<S: Into<String>>(splits: impl IntoIterator<Item = S>) -> Self {
        Splits::Only(splits.into_iter().map(Into::into).collect())
    }

    /// Whether `split` is one of them.
    pub fn contains(&self, split: &str) -> bool {
        match self {
            Splits::All => true,
            Splits::Only(set) => set.contains(split),
        }
    }

    /// For a source with only [`ONE_SPLIT`]: fails unless that split is among these.
    pub fn check_one(&self, owner: &str) -> Result<()> {
        if self.contains(ONE_SPLIT) {
            return Ok(());
        }
        Err(EngineError::InvalidOption(format!(
            "{owner} has one split, `{ONE_SPLIT}`, which {self:?} does not name"
        )))
    }
}

/// A configured source: validated options, ready to open.
pub trait SourceSpec: Send + Sync + std::fmt::Debug {
    /// The connector's name.
    fn connector(&self) -> &'static str;

    /// The source's splits as they are now, sorted: what [`Splits::Only`] names. A source
    /// whose input is not split has one, [`ONE_SPLIT`].
    fn splits(&self) -> BoxFuture<'_, Result<Vec<String>>> {
        Box::pin(async { Ok(vec![ONE_SPLIT.to_string()]) })
    }

    /// How source `name`, producing `schema`, feeds streams from `splits`. `ctx` is the
    /// source's context (its hub, counters, errors channel, cancellation); a push source
    /// keeps it, readers get theirs when they run. When `splits` names none of the
    /// source's, it fails here if the splits are known without asking the service (a source
    /// with one split), else its reader fails when it starts, listing the splits there are.
    fn open_splits(
        &self,
        name: &str,
        schema: SchemaRef,
        ctx: SourceContext,
        splits: &Splits,
    ) -> Result<SourceFeed>;

    /// [`Self::open_splits`] for all splits.
    fn open(&self, name: &str, schema: SchemaRef, ctx: SourceContext) -> Result<SourceFeed> {
        self.open_splits(name, schema, ctx, &Splits::All)
    }
}

/// How a source feeds the streams that read it.
pub enum SourceFeed {
    /// Every stream reads with a reader of its own, from the source's start.
    PerStream(ReaderFactory),
    /// One reader for every stream, started with the source, publishing to its hub.
    Shared {
        /// The reader.
        reader: Box<dyn SourceReader>,
        /// How a stream that starts while the reader runs catches up with it; `None` when
        /// streams start where the reader is.
        backfill: Option<ReaderFactory>,
    },
    /// Rows pushed to the server, one request at a time.
    Push(Arc<dyn PushSource>),
}

impl std::fmt::Debug for SourceFeed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SourceFeed::PerStream(_) => f.write_str("PerStream"),
            SourceFeed::Shared { backfill, .. } => f
                .debug_struct("Shared")
                .field("backfill", &backfill.is_some())
                .finish(),
            SourceFeed::Push(p) => f.debug_tuple("Push").field(p).finish(),
        }
    }
}

/// Makes a stream's own reader of a source: the reader of a source read per stream, or the
/// backfill reader with which a stream that starts while the source's shared reader runs
/// reads what that reader has read already, then joins it.
#[derive(Clone)]
pub struct ReaderFactory(Arc<dyn Fn() -> Box<dyn SourceReader> + Send + Sync>);

impl ReaderFactory {
    /// A factory of the readers `make` makes.
    pub fn new(make: impl Fn() -> Box<dyn SourceReader> + Send + Sync + 'static) -> Self {
        Self(Arc::new(make))
    }

    /// A reader for one stream (or sink).
    pub fn reader(&self) -> Box<dyn SourceReader> {
        (self.0)()
    }
}

impl std::fmt::Debug for ReaderFactory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ReaderFactory")
    }
}

/// A kind of sink (`CREATE SINK … WITH (connector = '…')`): validates options into a
/// [`SinkSpec`].
pub trait SinkConnector: Send + Sync {
    /// Its name in `WITH (connector = '…')`, lower case.
    fn name(&self) -> &'static str;

    /// Takes this connector's options from `opts` (the registry fails on any left over) for
    /// a sink of rows of `schema`.
    fn configure(&self, opts: &mut WithOptions, schema: &Schema) -> Result<Arc<dyn SinkSpec>>;
}

/// A configured sink.
pub trait SinkSpec: Send + Sync + std::fmt::Debug {
    /// The connector's name.
    fn connector(&self) -> &'static str;

    /// Whether the sink can deliver exactly once (given a [`SinkCheckpoint`]), and whether
    /// it was asked to: `Some(true)` asked, `Some(false)` declined, `None` left to the
    /// default (exactly once when its input checkpoints).
    fn exactly_once(&self) -> (bool, Option<bool>) {
        (false, None)
    }

    /// The running sink, named `name`; exactly once when given `checkpoint`.
    fn open(&self, name: &str, checkpoint: Option<SinkCheckpoint>) -> Result<Box<dyn Sink>>;
}

/// The connectors a build provides, by name.
#[derive(Clone, Default)]
pub struct ConnectorRegistry {
    sources: BTreeMap<&'static str, Arc<dyn SourceConnector>>,
    sinks: BTreeMap<&'static str, Arc<dyn SinkConnector>>,
}

impl std::fmt::Debug for ConnectorRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectorRegistry")
            .field("sources", &self.sources.keys())
            .field("sinks", &self.sinks.keys())
            .finish()
    }
}

impl ConnectorRegistry {
    /// Adds a source connector.
    pub fn with_source(mut self, connector: impl SourceConnector + 'static) -> Self {
        self.sources.insert(connector.name(), Arc::new(connector));
        self
    }

    /// Adds a sink connector.
    pub fn with_sink(mut self, connector: impl SinkConnector + 'static) -> Self {
        self.sinks.insert(connector.name(), Arc::new(connector));
        self
    }

    /// The source connectors' names, sorted.
    pub fn source_names(&self) -> Vec<&'static str> {
        self.sources.keys().copied().collect()
    }

    /// The sink connectors' names, sorted.
    pub fn sink_names(&self) -> Vec<&'static str> {
        self.sinks.keys().copied().collect()
    }

    /// Validates the options of a source of `schema`: takes `connector` and that
    /// connector's options from `opts`, then fails on any option left over.
    pub fn source(&self, mut opts: WithOptions, schema: &SchemaRef) -> Result<Arc<dyn SourceSpec>> {
        let connector = pick(&mut opts, &self.sources, "connector")?;
        let spec = connector.configure(&mut opts, schema)?;
        opts.finish()?;
        Ok(spec)
    }

    /// Validates the options of a sink of rows of `schema`, as [`Self::source`].
    pub fn sink(&self, mut opts: WithOptions, schema: &Schema) -> Result<Arc<dyn SinkSpec>> {
        let connector = pick(&mut opts, &self.sinks, "sink connector")?;
        let spec = connector.configure(&mut opts, schema)?;
        opts.finish()?;
        Ok(spec)
    }
}

/// The connector named by option `connector` in `opts`, among `known`.
fn pick<'a, C: ?Sized>(
    opts: &mut WithOptions,
    known: &'a BTreeMap<&'static str, Arc<C>>,
    what: &str,
) -> Result<&'a Arc<C>> {
    let names = || known.keys().copied().collect::<Vec<_>>().join(", ");
    let owner = opts.owner().to_string();
    let Some(name) = opts.take_str("connector") else {
        return Err(EngineError::InvalidOption(format!(
            "{owner}: option `connector` is required (one of: {})",
            names()
        )));
    };
    known
        .get(name.to_ascii_lowercase().as_str())
        .ok_or_else(|| {
            EngineError::InvalidOption(format!(
                "{owner}: {what} `{name}` is not known (available: {})",
                names()
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Nothing;

    impl SinkSpec for Nothing {
        fn connector(&self) -> &'static str {
            "nothing"
        }

        fn open(&self, _: &str, _: Option<SinkCheckpoint>) -> Result<Box<dyn Sink>> {
            Err(EngineError::Internal("not opened in this test".into()))
        }
    }

    struct NothingConnector;

    impl SinkConnector for NothingConnector {
        fn name(&self) -> &'static str {
            "nothing"
        }

        fn configure(&self, opts: &mut WithOptions, _: &Schema) -> Result<Arc<dyn SinkSpec>> {
            opts.take_str("level");
            Ok(Arc::new(Nothing))
        }
    }

    fn options(pairs: &[(&str, &str)]) -> WithOptions {
        WithOptions::new(
            "sink `s`",
            pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())),
        )
    }

    #[test]
    fn the_registry_picks_by_name_and_rejects_what_is_left() {
        let registry = ConnectorRegistry::default().with_sink(NothingConnector);
        let schema = Schema::empty();
        let spec = registry
            .sink(
                options(&[("connector", "NOTHING"), ("level", "1")]),
                &schema,
            )
            .unwrap();
        assert_eq!(spec.connector(), "nothing");
        let err = |pairs: &[(&str, &str)]| {
            registry
                .sink(options(pairs), &schema)
                .unwrap_err()
                .to_string()
        };
        assert!(err(&[]).contains("option `connector` is required (one of: nothing)"));
        assert!(
            err(&[("connector", "kafkaa")])
                .contains("sink connector `kafkaa` is not known (available: nothing)")
        );
        assert!(err(&[("connector", "nothing"), ("levle", "1")]).contains("did you mean `level`"));
    }
}
