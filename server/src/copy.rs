//! `COPY (query) TO STDOUT`: a query's rows in Postgres' COPY text or CSV format, what
//! psql's `\copy … TO` and drivers' copy APIs (psycopg's `cursor.copy`) read.
//!
//! Values are written as Postgres writes them in text (the same encoding as query results,
//! `arrow_pg`'s), then escaped for the format: text format separates columns with a tab
//! (or the `DELIMITER`), writes NULL as `\N` and escapes backslash, tab, newline and carriage
//! return; CSV quotes a value holding the delimiter, a quote, a newline or nothing at all
//! (so an empty string differs from NULL, which is written as nothing), doubling quotes.

use datafusion::sql::sqlparser::ast::{CopyLegacyCsvOption, CopyLegacyOption, CopyOption};
use sluice_sql::SqlError;

/// How `COPY … TO STDOUT` writes rows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyFormat {
    /// CSV (else text).
    pub csv: bool,
    /// A first line with the column names (CSV only, as in Postgres).
    pub header: bool,
    /// Between columns.
    pub delimiter: char,
    /// What a NULL is written as.
    pub null: String,
}

impl CopyFormat {
    /// The format `options` (and the pre-9.0 `legacy` ones psql's `\copy` sends) ask for.
    pub fn from_options(
        options: &[CopyOption],
        legacy: &[CopyLegacyOption],
    ) -> Result<Self, SqlError> {
        let mut csv = false;
        let mut header = false;
        let mut delimiter = None;
        let mut null = None;
        let unsupported = |what: String| {
            Err(SqlError::NotSupported(format!(
                "COPY option {what} is not supported (FORMAT text or csv, HEADER, DELIMITER, NULL are)"
            )))
        };
        for o in options {
            match o {
                CopyOption::Format(f) => match f.value.to_ascii_lowercase().as_str() {
                    "csv" => csv = true,
                    "text" => csv = false,
                    other => return unsupported(format!("FORMAT {other}")),
                },
                CopyOption::Header(h) => header = *h,
                CopyOption::Delimiter(d) => delimiter = Some(*d),
                CopyOption::Null(n) => null = Some(n.clone()),
                other => return unsupported(other.to_string()),
            }
        }
        for o in legacy {
            match o {
                CopyLegacyOption::Csv(more) => {
                    csv = true;
                    for m in more {
                        match m {
                            CopyLegacyCsvOption::Header => header = true,
                            other => return unsupported(other.to_string()),
                        }
                    }
                }
                CopyLegacyOption::Delimiter(d) => delimiter = Some(*d),
                CopyLegacyOption::Null(n) => null = Some(n.clone()),
                CopyLegacyOption::Header => header = true,
                other => return unsupported(other.to_string()),
            }
        }
        if header && !csv {
            return Err(SqlError::InvalidOption(
                "COPY HEADER available only in CSV mode".into(),
            ));
        }
        Ok(Self {
            csv,
            header,
            delimiter: delimiter.unwrap_or(if csv { ',' } else { '\t' }),
            null: null.unwrap_or_else(|| if csv { String::new() } else { "\\N".into() }),
        })
    }

    /// One line: `values` (text as Postgres writes it; `None`: NULL), escaped, ending in a
    /// newline.
    pub fn line<'a>(&self, values: impl IntoIterator<Item = Option<&'a [u8]>>) -> Vec<u8> {
        let mut out = Vec::new();
        for (i, v) in values.into_iter().enumerate() {
            if i > 0 {
                push_char(&mut out, self.delimiter);
            }
            match v {
                None => out.extend_from_slice(self.null.as_bytes()),
                Some(v) if self.csv => self.csv_value(&mut out, v),
                Some(v) => self.text_value(&mut out, v),
            }
        }
        out.push(b'\n');
        out
    }

    fn text_value(&self, out: &mut Vec<u8>, v: &[u8]) {
        let delimiter = u8::try_from(self.delimiter).ok();
        for &b in v {
            match b {
                b'\\' => out.extend_from_slice(b"\\\\"),
                b'\n' => out.extend_from_slice(b"\\n"),
                b'\r' => out.extend_from_slice(b"\\r"),
                b'\t' => out.extend_from_slice(b"\\t"),
                b if Some(b) == delimiter => {
                    out.push(b'\\');
                    out.push(b);
                }
                b => out.push(b),
            }
        }
    }

    fn csv_value(&self, out: &mut Vec<u8>, v: &[u8]) {
        let delimiter = u8::try_from(self.delimiter).ok();
        let quote = v.is_empty()
            || v == self.null.as_bytes()
            || v.iter()
                .any(|b| matches!(b, b'"' | b'\n' | b'\r') || Some(*b) == delimiter);
        if !quote {
            out.extend_from_slice(v);
            return;
        }
        out.push(b'"');
        for &b in v {
            if b == b'"' {
                out.push(b'"');
            }
            out.push(b);
        }
        out.push(b'"');
    }
}

fn push_char(out: &mut Vec<u8>, c: char) {
    let mut buf = [0; 4];
    out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
}

/// The fields of an encoded `DataRow` (`data` holds each as a 4-byte length, -1 for NULL,
/// then its bytes).
pub fn data_row_fields(data: &[u8]) -> Vec<Option<&[u8]>> {
    let mut fields = Vec::new();
    let mut rest = data;
    while rest.len() >= 4 {
        let len = i32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]);
        rest = &rest[4..];
        if len < 0 {
            fields.push(None);
            continue;
        }
        let len = (len as usize).min(rest.len());
        fields.push(Some(&rest[..len]));
        rest = &rest[len..];
    }
    fields
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text() -> CopyFormat {
        CopyFormat::from_options(&[], &[]).unwrap()
    }

    fn csv() -> CopyFormat {
        CopyFormat::from_options(&[], &[CopyLegacyOption::Csv(vec![])]).unwrap()
    }

    #[test]
    fn text_format_escapes_as_postgres_does() {
        let line = text().line([Some(&b"a\tb\\c\nd"[..]), None, Some(b"")]);
        assert_eq!(line, b"a\\tb\\\\c\\nd\t\\N\t\n");
    }

    #[test]
    fn csv_quotes_what_needs_quoting_and_tells_empty_from_null() {
        let line = csv().line([
            Some(&b"plain"[..]),
            Some(b"a,b"),
            Some(b"say \"hi\""),
            Some(b""),
            None,
        ]);
        assert_eq!(line, b"plain,\"a,b\",\"say \"\"hi\"\"\",\"\",\n");
    }

    #[test]
    fn header_needs_csv() {
        assert!(CopyFormat::from_options(&[CopyOption::Header(true)], &[]).is_err());
        let f = CopyFormat::from_options(
            &[
                CopyOption::Format(datafusion::sql::sqlparser::ast::Ident::new("csv")),
                CopyOption::Header(true),
            ],
            &[],
        )
        .unwrap();
        assert!(f.header && f.csv);
    }

    #[test]
    fn data_row_fields_are_read_back() {
        let mut data = vec![];
        data.extend_from_slice(&3i32.to_be_bytes());
        data.extend_from_slice(b"abc");
        data.extend_from_slice(&(-1i32).to_be_bytes());
        data.extend_from_slice(&0i32.to_be_bytes());
        assert_eq!(
            data_row_fields(&data),
            [Some(&b"abc"[..]), None, Some(&b""[..])]
        );
    }
}
