//! The `datagen` reader: builds whole columns per batch (no per-row `RecordBatch` work).

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::split_clock::{OneSplit, SourceClock};
use arrow::array::{
    ArrayRef, BooleanArray, Date32Array, Float64Array, Int64Array, StringArray,
    TimestampMicrosecondArray, UInt32Array,
};
use arrow::buffer::{NullBuffer, ScalarBuffer};
use arrow::compute::{cast, take};
use arrow::datatypes::{DataType, SchemaRef};
use arrow::record_batch::RecordBatch;
use async_trait::async_trait;
use sluice_engine::{SourceContext, SourceReader};

use super::DatagenConfig;

/// SplitMix64: tiny, fast, and stable across versions (so a seed always means the same rows).
#[derive(Debug, Clone)]
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in [0, n).
    fn below(&mut self, n: u64) -> u64 {
        ((self.next() as u128 * n as u128) >> 64) as u64
    }
}

#[derive(Debug)]
enum Kind {
    Int { min: i64, span: u64 },
    Float { min: f64, width: f64 },
    Bool,
    Text { pool: ArrayRef },
    EventTime,
    EventDate,
}

#[derive(Debug)]
struct ColumnGen {
    kind: Kind,
    data_type: DataType,
    nullable: bool,
    rng: SplitMix64,
}

/// Generates rows for a schema. See the [module docs](super).
#[derive(Debug)]
pub struct DatagenReader {
    config: DatagenConfig,
    schema: SchemaRef,
    columns: Vec<ColumnGen>,
    null_rng: SplitMix64,
    generated: u64,
}

impl DatagenReader {
    /// A generator for `schema` (already validated by [`DatagenConfig::try_new`]).
    pub fn new(config: DatagenConfig, schema: SchemaRef) -> Self {
        let columns = schema
            .fields()
            .iter()
            .enumerate()
            .map(|(i, f)| {
                let spec = config.fields.get(f.name()).cloned().unwrap_or_default();
                let mut rng =
                    SplitMix64(config.seed ^ (i as u64 + 1).wrapping_mul(0xA24B_AED4_963E_E407));
                let kind = match f.data_type() {
                    DataType::Timestamp(..) => Kind::EventTime,
                    DataType::Date32 => Kind::EventDate,
                    DataType::Boolean => Kind::Bool,
                    DataType::Float32 | DataType::Float64 => {
                        let min = spec.min.unwrap_or(0.0);
                        let max = spec.max.unwrap_or(1000.0);
                        Kind::Float {
                            min,
                            width: max - min,
                        }
                    }
                    DataType::Utf8 => {
                        let len = spec.length.unwrap_or(8);
                        let n = spec.cardinality.unwrap_or(10_000);
                        Kind::Text {
                            pool: text_pool(&mut rng, n, len),
                        }
                    }
                    _ => {
                        let min = spec.min.unwrap_or(0.0) as i64;
                        let max = spec.max.unwrap_or(1000.0) as i64;
                        Kind::Int {
                            min,
                            span: (max - min) as u64 + 1,
                        }
                    }
                };
                ColumnGen {
                    kind,
                    data_type: f.data_type().clone(),
                    nullable: f.is_nullable(),
                    rng,
                }
            })
            .collect();
        Self {
            null_rng: SplitMix64(config.seed ^ 0x5851_F42D_4C95_7F2D),
            config,
            schema,
            columns,
            generated: 0,
        }
    }

    /// Event time of row number `i` (deterministic mode) or now.
    fn event_times(&self, n: usize) -> Vec<i64> {
        match self.config.start_time {
            Some(start) => {
                let step = self.config.time_step;
                (0..n as i64)
                    .map(|k| start + (self.generated as i64 + k) * step)
                    .collect()
            }
            None => vec![sluice_engine::EventTime::now().micros(); n],
        }
    }

    /// Generates the next `n` rows.
    pub fn next_batch(&mut self, n: usize) -> sluice_engine::Result<RecordBatch> {
        // One buffer, shared (not copied) by every timestamp column.
        let times: ScalarBuffer<i64> = self.event_times(n).into();
        let null_rate = self.config.null_rate;
        let mut arrays = Vec::with_capacity(self.columns.len());
        for c in &mut self.columns {
            let array: ArrayRef = match &c.kind {
                Kind::EventTime => Arc::new(
                    TimestampMicrosecondArray::new(times.clone(), None).with_timezone("UTC"),
                ),
                Kind::EventDate => Arc::new(Date32Array::from_iter_values(
                    times.iter().map(|t| t.div_euclid(86_400_000_000) as i32),
                )),
                Kind::Bool => Arc::new(BooleanArray::from_iter(
                    (0..n).map(|_| Some(c.rng.next() & 1 == 1)),
                )),
                Kind::Int { min, span } => Arc::new(Int64Array::from_iter_values(
                    (0..n).map(|_| min.wrapping_add(c.rng.below(*span) as i64)),
                )),
                Kind::Float { min, width } => Arc::new(Float64Array::from_iter_values(
                    (0..n).map(|_| min + c.rng.unit() * width),
                )),
                Kind::Text { pool } => {
                    let len = pool.len() as u64;
                    let idx =
                        UInt32Array::from_iter_values((0..n).map(|_| c.rng.below(len) as u32));
                    take(pool.as_ref(), &idx, None)?
                }
            };
            let array = if array.data_type() == &c.data_type {
                array
            } else {
                cast(&array, &c.data_type)?
            };
            let array = if c.nullable && null_rate > 0.0 {
                let valid =
                    NullBuffer::from_iter((0..n).map(|_| self.null_rng.unit() >= null_rate));
                let data = array.to_data().into_builder().nulls(Some(valid)).build()?;
                arrow::array::make_array(data)
            } else {
                array
            };
            arrays.push(array);
        }
        self.generated += n as u64;
        Ok(RecordBatch::try_new(Arc::clone(&self.schema), arrays)?)
    }
}

fn text_pool(rng: &mut SplitMix64, n: usize, len: usize) -> ArrayRef {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut s = String::with_capacity(len);
    let values = (0..n).map(|_| {
        s.clear();
        for _ in 0..len {
            s.push(ALPHABET[rng.below(ALPHABET.len() as u64) as usize] as char);
        }
        s.clone()
    });
    Arc::new(StringArray::from_iter_values(values))
}

#[async_trait]
impl SourceReader for DatagenReader {
    fn checkpointable(&self) -> bool {
        true
    }

    /// Position: `{"rows": n}`, the rows generated so far; resuming generates them again
    /// (the same seed gives the same rows) and drops them.
    fn restore(&mut self, position: &serde_json::Value) -> sluice_engine::Result<()> {
        let rows = position
            .get("rows")
            .and_then(|v| v.as_u64())
            .ok_or_else(|| {
                sluice_engine::EngineError::Checkpoint(format!(
                    "datagen position {position} has no `rows`"
                ))
            })?;
        while self.generated < rows {
            let n = (rows - self.generated).min(1 << 16) as usize;
            self.next_batch(n)?;
        }
        Ok(())
    }

    async fn run(mut self: Box<Self>, mut ctx: SourceContext) -> sluice_engine::Result<()> {
        // Generated rows carry no raw records to archive or decode: they only need the
        // watermark generator every source shares.
        let mut clock = SourceClock::default();
        clock.add(OneSplit);
        let rate = self.config.rows_per_second;
        let mut paced_since = Instant::now();
        let mut paced_rows: u64 = 0;
        loop {
            if let Some(ck) = &mut ctx.checkpoint
                && let Some(epoch) = ck.due()
            {
                let position = serde_json::json!({ "rows": self.generated });
                ck.barrier(&ctx.output, epoch, position).await;
            }
            let remaining = match self.config.max_rows {
                Some(max) if self.generated >= max => {
                    if let Some(ck) = &ctx.checkpoint {
                        ck.finish(serde_json::json!({ "rows": self.generated }));
                    }
                    return Ok(());
                }
                Some(max) => max - self.generated,
                None => u64::MAX,
            };
            if ctx.output.subscriber_count() == 0 {
                tokio::select! {
                    _ = ctx.cancel.cancelled() => return Ok(()),
                    _ = ctx.output.wait_for_subscriber() => {}
                }
                paced_since = Instant::now();
                paced_rows = 0;
            }
            let mut n = self.config.batch_size as u64;
            if rate > 0 {
                let due = (paced_since.elapsed().as_secs_f64() * rate as f64) as u64;
                if due > paced_rows + rate {
                    // More than a second behind (backpressure): do not burst to catch up.
                    paced_since = Instant::now();
                    paced_rows = 0;
                    continue;
                }
                if due <= paced_rows {
                    let wait = Duration::from_secs_f64(1.0 / rate as f64)
                        .clamp(Duration::from_millis(1), Duration::from_millis(20));
                    tokio::select! {
                        _ = ctx.cancel.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(wait) => continue,
                    }
                }
                n = n.min(due - paced_rows);
            }
            let n = n.min(remaining) as usize;
            let batch = self.next_batch(n)?;
            paced_rows += n as u64;
            tokio::select! {
                _ = ctx.cancel.cancelled() => return Ok(()),
                _ = clock.publish_one(&ctx, batch) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use arrow::datatypes::{Field, Schema, TimeUnit};
    use sluice_engine::WithOptions;

    use super::*;

    fn schema() -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new("user_id", DataType::Int64, false),
            Field::new("url", DataType::Utf8, true),
            Field::new("score", DataType::Int32, true),
            Field::new(
                "ts",
                DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
                false,
            ),
        ]))
    }

    fn reader(opts: &[(&str, &str)]) -> DatagenReader {
        let mut o = WithOptions::new(
            "source `t`",
            opts.iter().map(|(k, v)| (k.to_string(), v.to_string())),
        );
        let cfg = DatagenConfig::try_new(&mut o, &schema()).unwrap();
        o.finish().unwrap();
        DatagenReader::new(cfg, schema())
    }

    #[test]
    fn same_seed_same_rows() {
        let opts = [
            ("seed", "7"),
            ("start_time", "2024-01-01T00:00:00Z"),
            ("null_rate", "0.1"),
        ];
        let a = reader(&opts).next_batch(1000).unwrap();
        let b = reader(&opts).next_batch(1000).unwrap();
        assert_eq!(a, b);
        let c = reader(&[("seed", "8"), ("start_time", "2024-01-01T00:00:00Z")])
            .next_batch(1000)
            .unwrap();
        assert_ne!(a.column(0), c.column(0));
    }

    #[test]
    fn ranges_nulls_and_event_time_follow_the_options() {
        let mut r = reader(&[
            ("rows_per_second", "1000"),
            ("start_time", "2024-01-01T00:00:00Z"),
            ("fields.user_id.min", "10"),
            ("fields.user_id.max", "12"),
            ("null_rate", "0.5"),
        ]);
        let b = r.next_batch(4000).unwrap();
        let ids = b.column(0).as_any().downcast_ref::<Int64Array>().unwrap();
        assert!(ids.iter().all(|v| matches!(v, Some(10..=12))));
        assert_eq!(b.column(0).null_count(), 0, "NOT NULL columns get no nulls");
        let nulls = b.column(1).null_count();
        assert!((1000..3000).contains(&nulls), "about half: {nulls}");
        let ts = b
            .column(3)
            .as_any()
            .downcast_ref::<TimestampMicrosecondArray>()
            .unwrap();
        // 1000 rows/s: row 1 is 1 ms after row 0; the next batch continues the sequence.
        assert_eq!(ts.value(1) - ts.value(0), 1000);
        let next = r.next_batch(1).unwrap();
        let ts2 = next
            .column(3)
            .as_any()
            .downcast_ref::<TimestampMicrosecondArray>()
            .unwrap();
        assert_eq!(ts2.value(0) - ts.value(0), 4000 * 1000);
    }

    #[test]
    fn bad_field_options_name_the_problem() {
        let mut o = WithOptions::new(
            "source `t`",
            [("fields.nope.min".to_string(), "1".to_string())],
        );
        let err = DatagenConfig::try_new(&mut o, &schema())
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "source `t`: option `fields.nope.min` names column `nope`, which the source does not have"
        );
    }
}
