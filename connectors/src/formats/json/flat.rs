//! The fast path of [`super::JsonDecoder`]: records that are flat JSON objects of scalars,
//! decoded straight into Arrow arrays, one pass over each record.
//!
//! arrow-json first tokenises the records onto a tape (copying every string and field name),
//! then builds each column from the tape, looking each field name up again. For the shape
//! most sources carry — one object per record whose declared columns are booleans, numbers,
//! strings and timestamps — this decoder reads each record once and appends each value to
//! its column as it goes.
//!
//! It has no rules of its own. It accepts a strict subset of JSON and of arrow-json's
//! conversions and answers `None` ("not sure") for anything else, and the caller then
//! decodes the whole input with arrow-json, which stays the reference and words every error.
//! Outside the subset:
//! - a column type other than boolean, integer, float, text or timestamp (without a time zone
//!   or in UTC), or more than 64 columns (then the fast path is off for the schema);
//! - a nested object or array, even in a field that is not declared; a duplicate field; an
//!   escape in a field name; a control character in a string;
//! - a value of another JSON type than its column's (a number in a string, a string for a
//!   number, `1.0` or `1e3` for an integer column), an integer of more than 18 digits, an
//!   out-of-range integer, a float that overflows;
//! - a timestamp other than `YYYY-MM-DD[T| ]HH:MM:SS[.fraction of 1 to 9 digits][Z]`, or a
//!   number for a timestamp column;
//! - a missing or `null` value for a `NOT NULL` column, and anything that is not valid JSON
//!   or UTF-8 (errors: arrow-json says why).
//!
//! The tests decode generated records both ways and check that wherever this decoder
//! answers, arrow-json gives the same batch.

use std::sync::Arc;

use arrow::array::{
    ArrayRef, BooleanBuilder, Float32Builder, Float64Builder, Int64Builder, StringBuilder,
    UInt64Builder,
};
use arrow::datatypes::{DataType, SchemaRef, TimeUnit};
use arrow::record_batch::RecordBatch;

/// Decodes flat JSON objects of one schema; see the module docs.
#[derive(Debug)]
pub(super) struct FlatDecoder {
    schema: SchemaRef,
    columns: Vec<Column>,
    /// One bit per column, all set.
    all: u64,
}

#[derive(Debug)]
struct Column {
    name: Box<[u8]>,
    /// The name's first 8 bytes (zero-padded), little-endian, and which of them count:
    /// a record's key is matched against the expected column with one load and compare.
    head: u64,
    head_mask: u64,
    /// The name appears verbatim in a record (no quote, backslash or control character):
    /// it can be matched in place, before the key is scanned.
    verbatim: bool,
    kind: Kind,
    nullable: bool,
}

impl Column {
    fn new(name: &str, kind: Kind, nullable: bool) -> Self {
        let name = name.as_bytes();
        let mut head = [0u8; 8];
        let n = name.len().min(8);
        head[..n].copy_from_slice(&name[..n]);
        Column {
            name: name.into(),
            head: u64::from_le_bytes(head),
            head_mask: if n == 8 {
                u64::MAX
            } else {
                (1u64 << (8 * n)) - 1
            },
            verbatim: name.iter().all(|b| *b != b'"' && *b != b'\\' && *b >= 0x20),
            kind,
            nullable,
        }
    }
}

/// What decoding one batch keeps between records.
#[derive(Default)]
struct Scratch {
    /// A string with escapes, unescaped.
    text: String,
    /// The last timestamp's date (`YYYY-MM-DD`) and its day number: records of a batch
    /// mostly share it.
    date: Option<([u8; 10], i64)>,
}

/// What a column's values are read as.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Bool,
    /// A signed integer column of this range.
    Int {
        min: i64,
        max: i64,
    },
    /// An unsigned integer column of this maximum.
    UInt {
        max: u64,
    },
    F32,
    F64,
    Utf8,
    Timestamp(TimeUnit),
}

impl Kind {
    fn of(t: &DataType) -> Option<Kind> {
        Some(match t {
            DataType::Boolean => Kind::Bool,
            DataType::Int8 => Kind::Int {
                min: i8::MIN.into(),
                max: i8::MAX.into(),
            },
            DataType::Int16 => Kind::Int {
                min: i16::MIN.into(),
                max: i16::MAX.into(),
            },
            DataType::Int32 => Kind::Int {
                min: i32::MIN.into(),
                max: i32::MAX.into(),
            },
            DataType::Int64 => Kind::Int {
                min: i64::MIN,
                max: i64::MAX,
            },
            DataType::UInt8 => Kind::UInt {
                max: u8::MAX.into(),
            },
            DataType::UInt16 => Kind::UInt {
                max: u16::MAX.into(),
            },
            DataType::UInt32 => Kind::UInt {
                max: u32::MAX.into(),
            },
            DataType::UInt64 => Kind::UInt { max: u64::MAX },
            DataType::Float32 => Kind::F32,
            DataType::Float64 => Kind::F64,
            DataType::Utf8 => Kind::Utf8,
            DataType::Timestamp(unit, None) => Kind::Timestamp(*unit),
            DataType::Timestamp(unit, Some(tz)) if tz.as_ref() == "UTC" => Kind::Timestamp(*unit),
            _ => return None,
        })
    }
}

/// The values of one column of the batch being decoded.
enum Builder {
    Bool(BooleanBuilder),
    /// Signed integers and timestamps, cast to the column's type at the end.
    Int(Int64Builder),
    UInt(UInt64Builder),
    F32(Float32Builder),
    F64(Float64Builder),
    Utf8(StringBuilder),
}

impl Builder {
    fn new(kind: Kind, rows: usize) -> Self {
        match kind {
            Kind::Bool => Builder::Bool(BooleanBuilder::with_capacity(rows)),
            Kind::Int { .. } | Kind::Timestamp(_) => {
                Builder::Int(Int64Builder::with_capacity(rows))
            }
            Kind::UInt { .. } => Builder::UInt(UInt64Builder::with_capacity(rows)),
            Kind::F32 => Builder::F32(Float32Builder::with_capacity(rows)),
            Kind::F64 => Builder::F64(Float64Builder::with_capacity(rows)),
            Kind::Utf8 => Builder::Utf8(StringBuilder::with_capacity(rows, rows * 16)),
        }
    }

    fn append_null(&mut self) {
        match self {
            Builder::Bool(b) => b.append_null(),
            Builder::Int(b) => b.append_null(),
            Builder::UInt(b) => b.append_null(),
            Builder::F32(b) => b.append_null(),
            Builder::F64(b) => b.append_null(),
            Builder::Utf8(b) => b.append_null(),
        }
    }

    /// The column, of type `t`.
    fn finish(self, t: &DataType) -> Option<ArrayRef> {
        let array: ArrayRef = match self {
            Builder::Bool(mut b) => Arc::new(b.finish()),
            Builder::Int(mut b) => Arc::new(b.finish()),
            Builder::UInt(mut b) => Arc::new(b.finish()),
            Builder::F32(mut b) => Arc::new(b.finish()),
            Builder::F64(mut b) => Arc::new(b.finish()),
            Builder::Utf8(mut b) => Arc::new(b.finish()),
        };
        if array.data_type() == t {
            Some(array)
        } else {
            // Narrower integers (their range was checked value by value) and timestamps.
            arrow::compute::cast(&array, t).ok()
        }
    }
}

impl FlatDecoder {
    /// The fast path for `schema`, or `None` if its columns are outside it.
    pub(super) fn new(schema: &SchemaRef) -> Option<Self> {
        let n = schema.fields().len();
        if n > 64 {
            return None;
        }
        let columns = schema
            .fields()
            .iter()
            .map(|f| {
                Some(Column::new(
                    f.name(),
                    Kind::of(f.data_type())?,
                    f.is_nullable(),
                ))
            })
            .collect::<Option<Vec<_>>>()?;
        Some(Self {
            schema: Arc::clone(schema),
            columns,
            all: if n == 64 { u64::MAX } else { (1u64 << n) - 1 },
        })
    }

    /// Decodes `records` (one JSON object each) into one batch, or says `None` if one of
    /// them is outside the fast path.
    pub(super) fn decode(&self, records: &[&[u8]]) -> Option<RecordBatch> {
        let mut out: Vec<Builder> = self
            .columns
            .iter()
            .map(|c| Builder::new(c.kind, records.len()))
            .collect();
        let mut scratch = Scratch::default();
        for r in records {
            self.record(r, &mut out, &mut scratch)?;
        }
        let arrays = out
            .into_iter()
            .zip(self.schema.fields())
            .map(|(b, f)| b.finish(f.data_type()))
            .collect::<Option<Vec<_>>>()?;
        let options =
            arrow::record_batch::RecordBatchOptions::new().with_row_count(Some(records.len()));
        RecordBatch::try_new_with_options(Arc::clone(&self.schema), arrays, &options).ok()
    }

    /// Appends one record's values to `out`, one per column.
    fn record(&self, r: &[u8], out: &mut [Builder], scratch: &mut Scratch) -> Option<()> {
        let mut c = Cursor { b: r, i: 0 };
        c.ws();
        c.expect(b'{')?;
        c.ws();
        let mut seen = 0u64;
        let mut next = 0;
        if !c.eat(b'}') {
            loop {
                c.expect(b'"')?;
                let column = match self.expected_key(&mut c, next) {
                    Some(k) => Some(k),
                    None => self.find(c.plain_string()?.as_bytes(), next),
                };
                c.ws();
                c.expect(b':')?;
                c.ws();
                match column {
                    Some(k) => {
                        let bit = 1u64 << k;
                        if seen & bit != 0 {
                            return None;
                        }
                        seen |= bit;
                        let column = &self.columns[k];
                        value(column, &mut out[k], &mut c, scratch)?;
                        next = k + 1;
                    }
                    None => c.skip_scalar(&mut scratch.text)?,
                }
                c.ws();
                match c.next()? {
                    b',' => c.ws(),
                    b'}' => break,
                    _ => return None,
                }
            }
        }
        c.ws();
        if c.i != r.len() {
            return None;
        }
        if seen != self.all {
            for (k, column) in self.columns.iter().enumerate() {
                if seen & (1 << k) == 0 {
                    if !column.nullable {
                        return None;
                    }
                    out[k].append_null();
                }
            }
        }
        Some(())
    }

    /// Reads the key at the cursor (after its opening quote) if it is the name of column
    /// `next`, the one after the last: most records list the fields in column order.
    fn expected_key(&self, c: &mut Cursor<'_>, next: usize) -> Option<usize> {
        let column = self.columns.get(next).filter(|c| c.verbatim)?;
        let (b, at, n) = (c.b, c.i, column.name.len());
        let word = b.get(at..at + 8)?;
        let word = u64::from_le_bytes(word.try_into().expect("8 bytes"));
        if word & column.head_mask != column.head
            || b.get(at + n) != Some(&b'"')
            || (n > 8 && b[at + 8..at + n] != column.name[8..])
        {
            return None;
        }
        c.i = at + n + 1;
        Some(next)
    }

    /// The column named `key`: the one after the last first, as in [`Self::expected_key`].
    fn find(&self, key: &[u8], next: usize) -> Option<usize> {
        if let Some(c) = self.columns.get(next)
            && *c.name == *key
        {
            return Some(next);
        }
        self.columns.iter().position(|c| *c.name == *key)
    }
}

/// Reads one value of `column` into `out`.
fn value(
    column: &Column,
    out: &mut Builder,
    c: &mut Cursor<'_>,
    scratch: &mut Scratch,
) -> Option<()> {
    if c.peek() == Some(b'n') {
        c.literal(b"null")?;
        if !column.nullable {
            return None;
        }
        out.append_null();
        return Some(());
    }
    match (column.kind, out) {
        (Kind::Bool, Builder::Bool(b)) => {
            let v = if c.peek() == Some(b't') {
                c.literal(b"true")?;
                true
            } else {
                c.literal(b"false")?;
                false
            };
            b.append_value(v);
        }
        (Kind::Int { min, max }, Builder::Int(b)) => {
            let v = c.int()?;
            if v < min || v > max {
                return None;
            }
            b.append_value(v);
        }
        (Kind::UInt { max }, Builder::UInt(b)) => {
            let v = c.uint()?;
            if v > max {
                return None;
            }
            b.append_value(v);
        }
        (Kind::F32, Builder::F32(b)) => {
            let v: f32 = c.number()?.parse().ok()?;
            if !v.is_finite() {
                return None;
            }
            b.append_value(v);
        }
        (Kind::F64, Builder::F64(b)) => {
            let v: f64 = c.number()?.parse().ok()?;
            if !v.is_finite() {
                return None;
            }
            b.append_value(v);
        }
        (Kind::Utf8, Builder::Utf8(b)) => {
            c.expect(b'"')?;
            b.append_value(c.string(&mut scratch.text)?);
        }
        (Kind::Timestamp(unit), Builder::Int(b)) => {
            c.expect(b'"')?;
            let text = c.plain_string()?.as_bytes();
            b.append_value(timestamp(text, unit, &mut scratch.date)?);
        }
        _ => return None,
    }
    Some(())
}

/// A position in one record. Bytes at or above 0x80 are only taken inside strings, where
/// they are checked to be UTF-8.
struct Cursor<'a> {
    b: &'a [u8],
    i: usize,
}

/// `s` as text; `high` says whether it has a byte at or above 0x80.
///
/// The fast path's one `unsafe` block (`unsafe_code` is denied elsewhere): the strings of
/// most records are ASCII, found so eight bytes at a time while they are scanned for their
/// end, and need no second pass to be known to be UTF-8.
#[allow(unsafe_code)]
fn text(s: &[u8], high: bool) -> Option<&str> {
    if high {
        std::str::from_utf8(s).ok()
    } else {
        debug_assert!(s.is_ascii());
        // SAFETY: `s` has no byte at or above 0x80, so it is ASCII, which is UTF-8.
        Some(unsafe { std::str::from_utf8_unchecked(s) })
    }
}

/// Eight copies of byte `b`.
const fn splat(b: u8) -> u64 {
    u64::from_le_bytes([b; 8])
}

/// The bytes of `w` that are zero, flagged by their high bit; exact up to the first zero
/// byte (a borrow may flag bytes after it).
const fn zero_bytes(w: u64) -> u64 {
    w.wrapping_sub(splat(1)) & !w & splat(0x80)
}

impl<'a> Cursor<'a> {
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    fn next(&mut self) -> Option<u8> {
        let b = self.peek()?;
        self.i += 1;
        Some(b)
    }

    fn eat(&mut self, b: u8) -> bool {
        let yes = self.peek() == Some(b);
        self.i += usize::from(yes);
        yes
    }

    fn expect(&mut self, b: u8) -> Option<()> {
        self.eat(b).then_some(())
    }

    /// Skips JSON whitespace.
    fn ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.peek() {
            self.i += 1;
        }
    }

    fn literal(&mut self, word: &[u8]) -> Option<()> {
        let end = self.i + word.len();
        let at = self.b.get(self.i..end)?;
        at.iter()
            .zip(word)
            .all(|(a, w)| a == w)
            .then(|| self.i = end)
    }

    /// The end of the run of plain string bytes from the cursor: the next quote, backslash
    /// or control character (or the end of the record); and whether the run has a byte at
    /// or above 0x80. Eight bytes at a time.
    fn plain_end(&self) -> (usize, bool) {
        let b = self.b;
        let mut j = self.i;
        let mut high = 0u64;
        while let Some(chunk) = b.get(j..j + 8) {
            let w = u64::from_le_bytes(chunk.try_into().expect("8 bytes"));
            // Quotes, backslashes, and bytes below 0x20 (a byte at or above 0x80 is not).
            let stop = zero_bytes(w ^ splat(b'"'))
                | zero_bytes(w ^ splat(b'\\'))
                | (w.wrapping_sub(splat(0x20)) & !w & splat(0x80));
            if stop != 0 {
                let before = stop.trailing_zeros() / 8;
                high |= w & splat(0x80) & ((1u64 << (8 * before)) - 1);
                return (j + before as usize, high != 0);
            }
            high |= w & splat(0x80);
            j += 8;
        }
        while j < b.len() && b[j] != b'"' && b[j] != b'\\' && b[j] >= 0x20 {
            high |= u64::from(b[j] & 0x80);
            j += 1;
        }
        (j, high != 0)
    }

    /// A string without escapes whose opening quote was read; `None` if it has one.
    fn plain_string(&mut self) -> Option<&'a str> {
        let start = self.i;
        let (end, high) = self.plain_end();
        if self.b.get(end) != Some(&b'"') {
            return None;
        }
        self.i = end + 1;
        text(&self.b[start..end], high)
    }

    /// A string whose opening quote was read: a slice of the record or, when it has
    /// escapes, `scratch` holding it unescaped.
    fn string<'s>(&mut self, scratch: &'s mut String) -> Option<&'s str>
    where
        'a: 's,
    {
        let start = self.i;
        let (end, high) = self.plain_end();
        match self.b.get(end) {
            Some(b'"') => {
                self.i = end + 1;
                return text(&self.b[start..end], high);
            }
            Some(b'\\') => {}
            _ => return None,
        }
        scratch.clear();
        scratch.push_str(text(&self.b[start..end], high)?);
        self.i = end;
        loop {
            match self.next()? {
                b'"' => return Some(scratch),
                b'\\' => {
                    let c = match self.next()? {
                        b'"' => '"',
                        b'\\' => '\\',
                        b'/' => '/',
                        b'b' => '\u{8}',
                        b'f' => '\u{c}',
                        b'n' => '\n',
                        b'r' => '\r',
                        b't' => '\t',
                        b'u' => {
                            let hex = self.b.get(self.i..self.i + 4)?;
                            if !hex.iter().all(|b| b.is_ascii_hexdigit()) {
                                return None;
                            }
                            self.i += 4;
                            let hex = text(hex, false)?;
                            // A surrogate (half of a pair) is left to arrow-json.
                            char::from_u32(u32::from_str_radix(hex, 16).ok()?)?
                        }
                        _ => return None,
                    };
                    scratch.push(c);
                }
                _ => {
                    self.i -= 1;
                    let (run, high) = self.plain_end();
                    if run == self.i {
                        return None; // a control character
                    }
                    scratch.push_str(text(&self.b[self.i..run], high)?);
                    self.i = run;
                }
            }
        }
    }

    /// The digits of an integer, without sign; `None` if there are none, if there is a
    /// leading zero, or if a fraction or exponent follows.
    fn digits(&mut self) -> Option<(u64, usize)> {
        let b = self.b;
        let start = self.i;
        let mut v = 0u64;
        while let Some(d) = b
            .get(self.i)
            .map(|b| b.wrapping_sub(b'0'))
            .filter(|d| *d < 10)
        {
            v = v.wrapping_mul(10).wrapping_add(u64::from(d));
            self.i += 1;
        }
        let n = self.i - start;
        if n == 0 || (n > 1 && b[start] == b'0') || matches!(self.peek(), Some(b'.' | b'e' | b'E'))
        {
            return None;
        }
        Some((v, n))
    }

    fn int(&mut self) -> Option<i64> {
        let negative = self.eat(b'-');
        let (v, n) = self.digits()?;
        if n > 18 {
            return None;
        }
        let v = v as i64; // below 10^18
        Some(if negative { -v } else { v })
    }

    fn uint(&mut self) -> Option<u64> {
        let (v, n) = self.digits()?;
        (n <= 19).then_some(v)
    }

    /// The text of a JSON number, checked against JSON's grammar.
    fn number(&mut self) -> Option<&'a str> {
        let start = self.i;
        self.eat(b'-');
        let int_start = self.i;
        let run = |c: &mut Self| {
            let from = c.i;
            while c.peek().is_some_and(|b| b.is_ascii_digit()) {
                c.i += 1;
            }
            c.i - from
        };
        let n = run(self);
        if n == 0 || (n > 1 && self.b[int_start] == b'0') {
            return None;
        }
        if self.eat(b'.') && run(self) == 0 {
            return None;
        }
        if self.eat(b'e') || self.eat(b'E') {
            if !self.eat(b'+') {
                self.eat(b'-');
            }
            if run(self) == 0 {
                return None;
            }
        }
        // Digits, signs, dots and exponents: ASCII.
        text(&self.b[start..self.i], false)
    }

    /// Skips the scalar value of a field that is not declared.
    fn skip_scalar(&mut self, scratch: &mut String) -> Option<()> {
        match self.peek()? {
            b'"' => {
                self.i += 1;
                self.string(scratch).map(|_| ())
            }
            b'-' | b'0'..=b'9' => self.number().map(|_| ()),
            b't' => self.literal(b"true"),
            b'f' => self.literal(b"false"),
            b'n' => self.literal(b"null"),
            _ => None,
        }
    }
}

/// `YYYY-MM-DD[T| ]HH:MM:SS[.fraction][Z]` as a count of `unit` since the epoch. `date`
/// caches the last date read and its day number.
fn timestamp(s: &[u8], unit: TimeUnit, date: &mut Option<([u8; 10], i64)>) -> Option<i64> {
    let digit = |i: usize| -> Option<u32> {
        let d = s.get(i)?.wrapping_sub(b'0');
        (d < 10).then_some(u32::from(d))
    };
    let two = |i: usize| Some(digit(i)? * 10 + digit(i + 1)?);
    let (hour, minute, second) = (two(11)?, two(14)?, two(17)?);
    if s.len() < 19
        || !matches!(s[10], b'T' | b't' | b' ')
        || s[13] != b':'
        || s[16] != b':'
        || hour > 23
        || minute > 59
        || second > 59
    {
        return None;
    }
    let ymd: [u8; 10] = s[..10].try_into().expect("10 bytes");
    let days = match date {
        Some((last, days)) if *last == ymd => *days,
        _ => {
            let year = two(0)? * 100 + two(2)?;
            let (month, day) = (two(5)?, two(8)?);
            if s[4] != b'-'
                || s[7] != b'-'
                || !(1..=12).contains(&month)
                || day == 0
                || day > days_in_month(year, month)
            {
                return None;
            }
            let days = days_from_civil(year, month, day);
            *date = Some((ymd, days));
            days
        }
    };
    let mut i = 19;
    let mut nanos = 0u32;
    if s.get(i) == Some(&b'.') {
        i += 1;
        let start = i;
        while let Some(d) = digit(i) {
            if i - start == 9 {
                return None; // more than nanoseconds
            }
            nanos = nanos * 10 + d;
            i += 1;
        }
        let n = i - start;
        if n == 0 {
            return None;
        }
        nanos *= 10u32.pow(9 - n as u32);
    }
    if matches!(s.get(i), Some(b'Z' | b'z')) {
        i += 1;
    }
    if i != s.len() {
        return None;
    }
    let seconds = days * 86_400 + i64::from(hour * 3600 + minute * 60 + second);
    let nanos = i64::from(nanos);
    match unit {
        TimeUnit::Second => Some(seconds),
        TimeUnit::Millisecond => Some(seconds * 1_000 + nanos / 1_000_000),
        TimeUnit::Microsecond => Some(seconds * 1_000_000 + nanos / 1_000),
        TimeUnit::Nanosecond => seconds.checked_mul(1_000_000_000)?.checked_add(nanos),
    }
}

fn days_in_month(year: u32, month: u32) -> u32 {
    match month {
        2 if year.is_multiple_of(4) && (!year.is_multiple_of(100) || year.is_multiple_of(400)) => {
            29
        }
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days from 1970-01-01 to a date of the proleptic Gregorian calendar (Howard Hinnant's
/// `days_from_civil`).
fn days_from_civil(year: u32, month: u32, day: u32) -> i64 {
    let y = i64::from(year) - i64::from(month <= 2);
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(month);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    //! Differential tests: the fast path against arrow-json (`JsonDecoder::decode_all`).

    use arrow::datatypes::{Field, Schema};
    use proptest::prelude::*;

    use super::super::JsonDecoder;
    use super::*;

    /// A column of every kind, some `NOT NULL`.
    fn schema() -> SchemaRef {
        let ts = |unit, tz: Option<&str>| DataType::Timestamp(unit, tz.map(Into::into));
        Arc::new(Schema::new(vec![
            Field::new("b", DataType::Boolean, true),
            Field::new("i8", DataType::Int8, true),
            Field::new("i32", DataType::Int32, true),
            Field::new("i64", DataType::Int64, false),
            Field::new("u16", DataType::UInt16, true),
            Field::new("u64", DataType::UInt64, true),
            Field::new("f32", DataType::Float32, true),
            Field::new("f64", DataType::Float64, true),
            Field::new("s", DataType::Utf8, true),
            Field::new("name", DataType::Utf8, false),
            Field::new("ts", ts(TimeUnit::Microsecond, Some("UTC")), true),
            Field::new("ts_ns", ts(TimeUnit::Nanosecond, None), true),
            Field::new("ts_s", ts(TimeUnit::Second, None), true),
            Field::new("ts_ms", ts(TimeUnit::Millisecond, Some("UTC")), true),
        ]))
    }

    /// Timestamps from parts, in and out of range, in the formats arrow-json knows and not.
    fn timestamp_text() -> impl Strategy<Value = String> {
        (
            prop_oneof![1960u32..2100, 0u32..=9999],
            0u32..=13,
            0u32..=32,
            prop_oneof![0u32..24, 0u32..=25],
            prop_oneof![0u32..60, 0u32..=61],
            prop_oneof![0u32..60, 0u32..=61],
            prop::sample::select(vec!["T", "t", " ", "x"]),
            prop::collection::vec(0u8..10, 0..=11),
            prop::bool::ANY,
            prop::sample::select(vec!["", "Z", "z", "+02:00", " ", "-0530", "Zz", "x"]),
        )
            .prop_map(|(y, mo, d, h, mi, s, sep, frac, dot, suffix)| {
                let frac: String = frac.iter().map(|d| char::from(b'0' + d)).collect();
                let dot = if dot || !frac.is_empty() { "." } else { "" };
                format!("{y:04}-{mo:02}-{d:02}{sep}{h:02}:{mi:02}:{s:02}{dot}{frac}{suffix}")
            })
    }

    /// JSON text of a string: a mix of plain characters, escapes of every kind (surrogates
    /// too) and raw control characters.
    fn string_text() -> impl Strategy<Value = String> {
        let piece = prop_oneof![
            12 => "[a-zA-Z0-9 :/._-]{0,6}",
            3 => Just("é😀".to_string()),
            6 => prop::sample::select(vec!["\\\"", "\\\\", "\\/", "\\b", "\\f", "\\n", "\\r", "\\t"])
                .prop_map(String::from),
            3 => prop_oneof![0u32..0x80, 0u32..0x10000].prop_map(|c| format!("\\u{c:04x}")),
            1 => prop::sample::select(vec!["\\x", "\\", "\\ud800", "\\udc00\\ud800", "\\u12"])
                .prop_map(String::from),
            1 => Just("\u{1}".to_string()),
            1 => Just("\t".to_string()),
        ];
        prop::collection::vec(piece, 0..5).prop_map(|p| format!("\"{}\"", p.concat()))
    }

    /// Any value, of any column's type or none.
    fn value_text() -> impl Strategy<Value = String> {
        prop_oneof![
            any::<i64>().prop_map(|v| v.to_string()),
            (-300i64..300).prop_map(|v| v.to_string()),
            any::<u64>().prop_map(|v| v.to_string()),
            any::<f64>().prop_map(|v| v.to_string()),
            any::<f64>().prop_map(|v| format!("{v:e}")),
            any::<f32>().prop_map(|v| v.to_string()),
            prop::sample::select(vec![
                "-0",
                "01",
                "1.0",
                "1e3",
                "1E+2",
                "2.5e-3",
                "1e-400",
                "1e400",
                ".5",
                "5.",
                "-",
                "-0.0",
                "123456789012345678",
                "1234567890123456789",
                "99999999999999999999",
                "true",
                "false",
                "null",
                "nul",
                "tru",
                "{}",
                "{\"a\":1}",
                "[1,2]",
                "[]",
                "\"123\"",
                "\"true\"",
                "\"\"",
                "\"2024-05-01\"",
            ])
            .prop_map(String::from),
            string_text(),
            timestamp_text().prop_map(|t| format!("\"{t}\"")),
        ]
    }

    fn key_text() -> impl Strategy<Value = String> {
        let names = vec![
            "b",
            "i8",
            "i32",
            "i64",
            "u16",
            "u64",
            "f32",
            "f64",
            "s",
            "name",
            "ts",
            "ts_ns",
            "ts_s",
            "ts_ms",
            "I64",
            "other",
            "",
            "n\\u0061me",
            "na\"me",
        ];
        prop::sample::select(names).prop_map(|k| format!("\"{k}\""))
    }

    /// Whitespace, mostly none.
    fn ws() -> impl Strategy<Value = &'static str> {
        prop::sample::select(vec!["", "", "", " ", "\n", "\t ", "\r\n", "\u{c}"])
    }

    /// Records of random fields, then maybe cut short or with a byte changed.
    fn any_record() -> impl Strategy<Value = Vec<u8>> {
        (
            prop::collection::vec((key_text(), value_text(), ws(), ws()), 0..8),
            ws(),
            ws(),
            prop_oneof![
                3 => Just(None),
                1 => (any::<prop::sample::Index>(), any::<u8>()).prop_map(Some),
            ],
            prop_oneof![3 => Just(None), 1 => any::<prop::sample::Index>().prop_map(Some)],
        )
            .prop_map(|(fields, lead, trail, change, cut)| {
                let body: Vec<String> = fields
                    .into_iter()
                    .map(|(k, v, a, b)| format!("{k}{a}:{b}{v}"))
                    .collect();
                let mut r = format!("{lead}{{{}}}{trail}", body.join(",")).into_bytes();
                if let Some((at, byte)) = change {
                    let at = at.index(r.len());
                    r[at] = byte;
                }
                if let Some(at) = cut {
                    r.truncate(at.index(r.len()));
                }
                r
            })
    }

    /// A good value of each column, in canonical JSON, by column name.
    fn good_values() -> impl Strategy<Value = Vec<(&'static str, String)>> {
        let ts = (
            1900u32..2200,
            1u32..=12,
            1u32..=28,
            0u32..24,
            0u32..60,
            0u32..60,
        )
            .prop_flat_map(|(y, mo, d, h, mi, s)| {
                (
                    prop::sample::select(vec!["T", "t", " "]),
                    prop::sample::select(vec!["", ".5", ".123", ".000010", ".123456789"]),
                    prop::sample::select(vec!["", "Z", "z"]),
                )
                    .prop_map(move |(sep, frac, z)| {
                        format!("\"{y:04}-{mo:02}-{d:02}{sep}{h:02}:{mi:02}:{s:02}{frac}{z}\"")
                    })
            });
        let text = any::<String>().prop_map(|s| serde_json::to_string(&s).unwrap());
        (
            (
                any::<bool>(),
                any::<i8>(),
                any::<i32>(),
                -999_999_999_999_999_999i64..=999_999_999_999_999_999,
                any::<u16>(),
                0u64..=9_999_999_999_999_999_999,
                any::<f32>().prop_filter("finite", |v| v.is_finite()),
                any::<f64>().prop_filter("finite", |v| v.is_finite()),
                prop::bool::ANY,
            ),
            (text.clone(), text, ts.clone(), ts.clone(), ts.clone(), ts),
        )
            .prop_map(
                |((b, i8, i32, i64, u16, u64, f32, f64, e), (s, name, t1, t2, t3, t4))| {
                    let f64 = if e {
                        format!("{f64:e}")
                    } else {
                        f64.to_string()
                    };
                    vec![
                        ("b", b.to_string()),
                        ("i8", i8.to_string()),
                        ("i32", i32.to_string()),
                        ("i64", i64.to_string()),
                        ("u16", u16.to_string()),
                        ("u64", u64.to_string()),
                        ("f32", f32.to_string()),
                        ("f64", f64),
                        ("s", s),
                        ("name", name),
                        ("ts", t1),
                        ("ts_ns", t2),
                        ("ts_s", t3),
                        ("ts_ms", t4),
                    ]
                },
            )
    }

    /// Records with every column a good value, in column order.
    fn good_record() -> impl Strategy<Value = Vec<u8>> {
        good_values().prop_map(|fields| {
            let body: Vec<String> = fields
                .into_iter()
                .map(|(k, v)| format!("\"{k}\":{v}"))
                .collect();
            format!("{{{}}}", body.join(",")).into_bytes()
        })
    }

    /// Values near the edges of what each column takes, in column order.
    fn odd_values() -> impl Strategy<Value = Vec<String>> {
        let int = || {
            prop_oneof![
                any::<i64>().prop_map(|v| v.to_string()),
                (-200i64..70_000).prop_map(|v| v.to_string()),
                prop::sample::select(vec!["-0", "01", "1.0", "1e3", "-", "18446744073709551615"])
                    .prop_map(String::from),
            ]
        };
        let float = || {
            prop_oneof![
                any::<f64>().prop_map(|v| format!("{v:e}")),
                any::<f32>().prop_map(|v| v.to_string()),
                prop::sample::select(vec![
                    "0", "-0.0", "1E+2", "2.5e-3", "1e-400", "1e400", "3.4e39", ".5", "5."
                ])
                .prop_map(String::from),
            ]
        };
        let ts = || timestamp_text().prop_map(|t| format!("\"{t}\""));
        (
            (
                prop::sample::select(vec!["true", "false", "tru", "1"]).prop_map(String::from),
                int(),
                int(),
                int(),
                int(),
                int(),
                float(),
                float(),
            ),
            (string_text(), string_text(), ts(), ts(), ts(), ts()),
        )
            .prop_map(|((a, b, c, d, e, f, g, h), (i, j, k, l, m, n))| {
                vec![a, b, c, d, e, f, g, h, i, j, k, l, m, n]
            })
    }

    /// Good records changed: fields shuffled, left out, given an odd value, any value or
    /// `null`, undeclared ones added, whitespace between the tokens, something after the end.
    fn changed_record() -> impl Strategy<Value = Vec<u8>> {
        #[derive(Debug, Clone)]
        enum Change {
            Keep,
            Drop,
            Odd,
            Any(String),
        }
        let change = prop_oneof![
            24 => Just(Change::Keep),
            1 => Just(Change::Drop),
            4 => Just(Change::Odd),
            1 => value_text().prop_map(Change::Any),
        ];
        (
            (good_values(), odd_values()),
            prop::collection::vec(change, 14),
            prop::collection::vec((key_text(), value_text()), 0..2),
            prop::collection::vec(prop::sample::select(vec!["", "", " ", "\n\t", "\r\n "]), 4),
            prop::sample::select(vec!["", "", "", "", "", "", "}", ",", "x", " {}", "\u{0}"]),
        )
            .prop_flat_map(|((good, odd), changes, extra, ws, after)| {
                let mut fields: Vec<(String, String)> = Vec::new();
                for (((k, v), odd), change) in good.into_iter().zip(odd).zip(changes) {
                    let v = match change {
                        Change::Keep => v,
                        Change::Drop => continue,
                        Change::Odd => odd,
                        Change::Any(other) => other,
                    };
                    fields.push((format!("\"{k}\""), v));
                }
                fields.extend(extra);
                (Just(fields).prop_shuffle(), Just(ws), Just(after))
            })
            .prop_map(|(fields, ws, after)| {
                let body: Vec<String> = fields
                    .into_iter()
                    .map(|(k, v)| format!("{k}{}:{}{v}", ws[0], ws[1]))
                    .collect();
                format!("{}{{{}}}{}{after}", ws[2], body.join(","), ws[3]).into_bytes()
            })
    }

    /// Where the fast path answers, arrow-json's answer is the same batch.
    fn agree(records: &[Vec<u8>]) -> Result<bool, TestCaseError> {
        agree_on(schema(), records)
    }

    fn agree_on(schema: SchemaRef, records: &[Vec<u8>]) -> Result<bool, TestCaseError> {
        let flat = FlatDecoder::new(&schema).expect("every kind is in the fast path");
        let records: Vec<&[u8]> = records.iter().map(Vec::as_slice).collect();
        let Some(fast) = flat.decode(&records) else {
            return Ok(false);
        };
        let reference = JsonDecoder::new(schema).decode_all(&records);
        prop_assert_eq!(
            Ok(&fast),
            reference.as_ref(),
            "records: {:?}",
            records
                .iter()
                .map(|r| String::from_utf8_lossy(r))
                .collect::<Vec<_>>()
        );
        Ok(true)
    }

    /// The fast path's batch for `records`, checked to be arrow-json's.
    fn same_as_arrow_json(schema: &SchemaRef, records: &[&[u8]]) -> RecordBatch {
        let fast = FlatDecoder::new(schema)
            .expect("a schema of the subset")
            .decode(records)
            .expect("records of the subset");
        let reference = JsonDecoder::new(Arc::clone(schema)).decode_all(records);
        assert_eq!(Ok(&fast), reference.as_ref());
        fast
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(3000))]

        #[test]
        fn agrees_with_arrow_json_wherever_it_answers(
            records in prop::collection::vec(prop_oneof![any_record(), changed_record(), good_record()], 1..4)
        ) {
            agree(&records)?;
        }

        #[test]
        fn agrees_on_strings(values in prop::collection::vec(string_text(), 1..4)) {
            let schema = Arc::new(Schema::new(vec![Field::new("s", DataType::Utf8, true)]));
            let records: Vec<Vec<u8>> =
                values.iter().map(|s| format!(r#"{{"s":{s}}}"#).into_bytes()).collect();
            agree_on(schema, &records)?;
        }

        #[test]
        fn agrees_on_timestamps(values in prop::collection::vec(timestamp_text(), 1..4)) {
            let t = DataType::Timestamp(TimeUnit::Nanosecond, None);
            let schema = Arc::new(Schema::new(vec![Field::new("t", t, true)]));
            let records: Vec<Vec<u8>> =
                values.iter().map(|t| format!(r#"{{"t":"{t}"}}"#).into_bytes()).collect();
            agree_on(schema, &records)?;
        }

        #[test]
        fn takes_every_record_of_the_subset(
            records in prop::collection::vec(good_record(), 1..4)
        ) {
            prop_assert!(agree(&records)?, "the fast path turned down good records");
        }
    }

    #[test]
    fn schemas_outside_the_subset_have_no_fast_path() {
        for t in [
            DataType::Date32,
            DataType::Decimal128(10, 2),
            DataType::Timestamp(TimeUnit::Microsecond, Some("+02:00".into())),
            DataType::List(Arc::new(Field::new("item", DataType::Int64, true))),
        ] {
            let schema = Arc::new(Schema::new(vec![Field::new("c", t.clone(), true)]));
            assert!(FlatDecoder::new(&schema).is_none(), "{t}");
        }
    }

    #[test]
    fn strings_are_checked_to_be_utf8_wherever_they_are() {
        let schema = Arc::new(Schema::new(vec![
            Field::new("name", DataType::Utf8, true),
            Field::new("a_much_longer_name", DataType::Utf8, true),
        ]));
        let flat = FlatDecoder::new(&schema).unwrap();
        // Multi-byte characters before, across and after 8-byte boundaries, with escapes.
        let good: Vec<&[u8]> = vec![
            "{\"name\":\"é\",\"a_much_longer_name\":\"abcdefgé😀hij\"}".as_bytes(),
            "{\"name\":\"abcdefghé\\n😀\",\"other\":\"ü\"}".as_bytes(),
            "{\"a_much_longer_name\":\"x\",\"name\":\"\\u00e9abcdefghijklmnop\"}".as_bytes(),
        ];
        same_as_arrow_json(&schema, &good);
        // Invalid UTF-8 in a declared string, after an escape, in an undeclared field, in a
        // key, or outside a string: never taken.
        for bad in [
            &b"{\"name\":\"abcdefgh\xff\"}"[..],
            b"{\"name\":\"\xc3\"}",
            b"{\"name\":\"a\\n\xe9t\xe9\"}",
            b"{\"other\":\"\xff\",\"name\":\"a\"}",
            b"{\"na\xffme\":\"a\"}",
            b"{\"name\":\"a\"}\xff",
        ] {
            assert!(
                flat.decode(&[bad]).is_none(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn timestamps_of_one_date_differ_by_their_time() {
        let t = DataType::Timestamp(TimeUnit::Microsecond, None);
        let schema = Arc::new(Schema::new(vec![Field::new("t", t, true)]));
        let flat = FlatDecoder::new(&schema).unwrap();
        let records: Vec<&[u8]> = vec![
            br#"{"t":"2024-02-29T10:00:00Z"}"#,
            br#"{"t":"2024-02-29T23:59:59.999999"}"#,
            br#"{"t":"2024-02-29 00:00:00.5"}"#,
            br#"{"t":"2024-03-01T00:00:00Z"}"#,
            br#"{"t":"2024-02-29T00:00:01"}"#,
        ];
        same_as_arrow_json(&schema, &records);
        // A date that is not one is refused even right after a good one.
        let records: Vec<&[u8]> = vec![
            br#"{"t":"2023-02-28T10:00:00Z"}"#,
            br#"{"t":"2023-02-29T10:00:00Z"}"#,
        ];
        assert!(flat.decode(&records).is_none());
    }

    #[test]
    fn records_with_fields_out_of_order_missing_or_unknown_decode() {
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Utf8, false),
            Field::new("n", DataType::Int64, true),
        ]));
        let flat = FlatDecoder::new(&schema).unwrap();
        let records: Vec<&[u8]> = vec![
            br#"{"n":1,"id":"a"}"#,
            br#" { "id" : "b\n\u00e9" , "x" : [1] } "#,
            br#"{"id":"c","extra":"\"q\"","more":-1.5e3,"z":null}"#,
        ];
        // A nested value, even in an undeclared field, is left to arrow-json.
        assert!(flat.decode(&records).is_none());
        let records = [records[0], records[2]];
        let batch = same_as_arrow_json(&schema, &records);
        assert_eq!(batch.num_rows(), 2);
        assert_eq!(batch.column(1).null_count(), 1);
    }
}
