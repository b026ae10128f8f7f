//! The parser: DataFusion's `DFParser` plus Sluice's own statements.
//!
//! ```sql
//! CREATE SOURCE [IF NOT EXISTS] name (
//!     column type [NOT NULL | NULL], …
//!     [, WATERMARK FOR column AS column - INTERVAL '5 seconds']
//! ) WITH (connector = '…', …);
//! CREATE STREAM [IF NOT EXISTS] name [WITH (…)] AS SELECT …;
//! EXPLAIN CREATE STREAM name AS SELECT …;      -- the pipeline, without creating it
//! CREATE SINK [IF NOT EXISTS] name FROM source_or_stream WITH (connector = '…', …);
//! DROP SOURCE | STREAM | SINK [IF EXISTS] name [, …] [CASCADE | RESTRICT];
//! SHOW SOURCES;  SHOW STREAMS;  SHOW SINKS;  SHOW STATUS;  DESCRIBE name;
//! SHOW CREATE TABLE stream FOR ATHENA;         -- the stream's Athena DDL
//! ```
//! Anything else is parsed by DataFusion and runs ad hoc.
//!
//! Unquoted identifiers are folded to lower case, as in Postgres and DataFusion.

use std::fmt;

use datafusion::sql::parser::{DFParser, DFParserBuilder, ParserInput, Statement as DFStatement};
use datafusion::sql::sqlparser::ast::{ColumnDef, Expr, Ident, ObjectName, Query, Value};
use datafusion::sql::sqlparser::dialect::PostgreSqlDialect;
use datafusion::sql::sqlparser::keywords::Keyword;
use datafusion::sql::sqlparser::tokenizer::{Token, Tokenizer};

use crate::error::{Result, SqlError};

/// The kinds of named object Sluice manages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ObjectKind {
    /// `CREATE SOURCE`.
    Source,
    /// `CREATE STREAM`.
    Stream,
    /// `CREATE SINK`.
    Sink,
}

impl fmt::Display for ObjectKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ObjectKind::Source => "source",
            ObjectKind::Stream => "stream",
            ObjectKind::Sink => "sink",
        })
    }
}

/// A parsed `CREATE SOURCE`.
#[derive(Debug, Clone, PartialEq)]
pub struct CreateSource {
    /// The source's name (case-folded).
    pub name: String,
    /// `IF NOT EXISTS` was given.
    pub if_not_exists: bool,
    /// The declared columns.
    pub columns: Vec<ColumnDef>,
    /// `WATERMARK FOR column AS expr`: the column (case-folded) and the expression.
    pub watermark: Option<(String, Expr)>,
    /// `PRIMARY KEY (columns)` (case-folded): each row is the new version of its key.
    pub primary_key: Vec<String>,
    /// `WITH (…)` options, keys lower-cased, values as text.
    pub options: Vec<(String, String)>,
}

/// A parsed `CREATE STREAM`.
#[derive(Debug, Clone, PartialEq)]
pub struct CreateStream {
    /// The stream's name (case-folded).
    pub name: String,
    /// `IF NOT EXISTS` was given.
    pub if_not_exists: bool,
    /// `WITH (…)` options.
    pub options: Vec<(String, String)>,
    /// The continuous query.
    pub query: Box<Query>,
}

/// A parsed `CREATE SINK`.
#[derive(Debug, Clone, PartialEq)]
pub struct CreateSink {
    /// The sink's name (case-folded).
    pub name: String,
    /// `IF NOT EXISTS` was given.
    pub if_not_exists: bool,
    /// The source or stream whose rows it delivers (case-folded).
    pub from: String,
    /// `WHERE predicate`: only the rows it holds for are delivered.
    pub filter: Option<Expr>,
    /// `WITH (…)` options.
    pub options: Vec<(String, String)>,
}

/// One statement, as Sluice executes it.
#[derive(Debug, Clone, PartialEq)]
pub enum SluiceStatement {
    /// `CREATE SOURCE …`.
    CreateSource(Box<CreateSource>),
    /// `CREATE STREAM …`.
    CreateStream(Box<CreateStream>),
    /// `CREATE SINK …`.
    CreateSink(Box<CreateSink>),
    /// `EXPLAIN CREATE STREAM …`: show the pipeline without creating it.
    ExplainStream(Box<CreateStream>),
    /// `DROP SOURCE|STREAM …`.
    Drop {
        /// What is dropped.
        kind: ObjectKind,
        /// The names (case-folded).
        names: Vec<String>,
        /// `IF EXISTS` was given.
        if_exists: bool,
        /// `CASCADE` was given: drop the streams that read these too.
        cascade: bool,
        /// `WITH (…)` options (`drop_table` for streams), keys lower-cased.
        options: Vec<(String, String)>,
    },
    /// `SHOW SOURCES` / `SHOW STREAMS`.
    Show(ObjectKind),
    /// `DESCRIBE name`.
    Describe(String),
    /// `SHOW CREATE TABLE name FOR ATHENA`: the Athena DDL of a stream.
    ShowAthenaDdl(String),
    /// `SHOW STATUS`: the server's role in its lake (writer or standby).
    ShowStatus,
    /// Users, roles, privileges, policies, tokens, secrets (see [`crate::access`]).
    Access(Box<crate::access::AccessStatement>),
    /// Any other statement: DataFusion's to run.
    Other(Box<DFStatement>),
}

/// Parses `sql` into statements (separated by `;`).
pub fn parse_sql(sql: &str) -> Result<Vec<SluiceStatement>> {
    let dialect = PostgreSqlDialect {};
    let tokens = Tokenizer::new(&dialect, sql)
        .tokenize_with_location()
        .map_err(|e| syntax(sql, e))?;
    crate::limits::check_complexity(&tokens)?;
    let tokens = crate::window::rewrite_flink_form(tokens);
    let (tokens, mut system_times) = crate::temporal::strip_system_time(tokens);
    let mut p = DFParserBuilder::new(ParserInput::Tokens(tokens))
        .with_dialect(&dialect)
        .build()
        .map_err(|e| syntax(sql, e))?;
    let mut out = Vec::new();
    let mut expect_delimiter = false;
    loop {
        while p.parser.consume_token(&Token::SemiColon) {
            expect_delimiter = false;
        }
        if p.parser.peek_token().token == Token::EOF {
            break;
        }
        if expect_delimiter {
            let t = p.parser.peek_token();
            return Err(syntax(
                sql,
                p.parser.expected::<()>("end of statement", t).unwrap_err(),
            ));
        }
        out.push(parse_statement(&mut p).map_err(|e| syntax(sql, e))?);
        expect_delimiter = true;
    }
    for stmt in &mut out {
        match stmt {
            SluiceStatement::CreateStream(c) | SluiceStatement::ExplainStream(c) => {
                crate::temporal::attach(&mut c.query, &mut system_times)
            }
            SluiceStatement::Other(s) => {
                if let DFStatement::Statement(s) = s.as_mut() {
                    crate::temporal::attach(s.as_mut(), &mut system_times)
                }
            }
            _ => {}
        }
    }
    if !system_times.is_empty() {
        return Err(SqlError::Syntax {
            message: "FOR SYSTEM_TIME AS OF must follow a table in FROM or JOIN (`JOIN customers FOR SYSTEM_TIME AS OF o.ts AS c`)".into(),
            position: None,
        });
    }
    Ok(out)
}

/// Any error while parsing; turned into [`SqlError::Syntax`] with a position.
pub(crate) type PResult<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

fn parse_statement(p: &mut DFParser<'_>) -> PResult<SluiceStatement> {
    if crate::access::starts(p) {
        return Ok(SluiceStatement::Access(Box::new(crate::access::parse(p)?)));
    }
    if peek_word(p, 0, "CREATE") {
        if peek_word(p, 1, "SOURCE") {
            p.parser.next_token();
            p.parser.next_token();
            return Ok(SluiceStatement::CreateSource(Box::new(
                parse_create_source(p)?,
            )));
        }
        if peek_word(p, 1, "STREAM") {
            p.parser.next_token();
            p.parser.next_token();
            return Ok(SluiceStatement::CreateStream(Box::new(
                parse_create_stream(p)?,
            )));
        }
        if peek_word(p, 1, "SINK") {
            p.parser.next_token();
            p.parser.next_token();
            let if_not_exists =
                p.parser
                    .parse_keywords(&[Keyword::IF, Keyword::NOT, Keyword::EXISTS]);
            let name = object_name(&p.parser.parse_object_name(false)?)?;
            p.parser.expect_keyword(Keyword::FROM)?;
            let from = object_name(&p.parser.parse_object_name(false)?)?;
            let filter = if p.parser.parse_keyword(Keyword::WHERE) {
                Some(p.parser.parse_expr()?)
            } else {
                None
            };
            let options = parse_with_options(p)?;
            return Ok(SluiceStatement::CreateSink(Box::new(CreateSink {
                name,
                if_not_exists,
                from,
                filter,
                options,
            })));
        }
    }
    if peek_word(p, 0, "EXPLAIN") && peek_word(p, 1, "CREATE") && peek_word(p, 2, "STREAM") {
        for _ in 0..3 {
            p.parser.next_token();
        }
        return Ok(SluiceStatement::ExplainStream(Box::new(
            parse_create_stream(p)?,
        )));
    }
    if peek_word(p, 0, "DROP")
        && let Some(kind) = kind_at(p, 1, false)
    {
        p.parser.next_token();
        p.parser.next_token();
        let if_exists = p.parser.parse_keywords(&[Keyword::IF, Keyword::EXISTS]);
        let names = p
            .parser
            .parse_comma_separated(|p| p.parse_object_name(false))?
            .iter()
            .map(object_name)
            .collect::<PResult<Vec<_>>>()?;
        let cascade = matches!(
            p.parser
                .parse_one_of_keywords(&[Keyword::CASCADE, Keyword::RESTRICT]),
            Some(Keyword::CASCADE)
        );
        let options = parse_with_options(p)?;
        return Ok(SluiceStatement::Drop {
            kind,
            names,
            if_exists,
            cascade,
            options,
        });
    }
    if peek_word(p, 0, "SHOW")
        && let Some(kind) = kind_at(p, 1, true)
    {
        p.parser.next_token();
        p.parser.next_token();
        return Ok(SluiceStatement::Show(kind));
    }
    if peek_word(p, 0, "SHOW") && peek_word(p, 1, "STATUS") {
        p.parser.next_token();
        p.parser.next_token();
        return Ok(SluiceStatement::ShowStatus);
    }
    if peek_word(p, 0, "SHOW") && peek_word(p, 1, "CREATE") && peek_word(p, 2, "TABLE") {
        let mut i = 3;
        while !matches!(
            p.parser.peek_nth_token(i).token,
            Token::EOF | Token::SemiColon
        ) {
            i += 1;
        }
        if i >= 6 && peek_word(p, i - 2, "FOR") && peek_word(p, i - 1, "ATHENA") {
            for _ in 0..3 {
                p.parser.next_token();
            }
            let name = object_name(&p.parser.parse_object_name(false)?)?;
            p.parser.expect_keyword(Keyword::FOR)?;
            p.parser.next_token(); // ATHENA
            return Ok(SluiceStatement::ShowAthenaDdl(name));
        }
    }
    if peek_word(p, 0, "DESCRIBE") || peek_word(p, 0, "DESC") {
        p.parser.next_token();
        let name = p.parser.parse_object_name(false)?;
        return Ok(SluiceStatement::Describe(object_name(&name)?));
    }
    let mut stmt = p.parse_statement()?;
    if let DFStatement::Statement(s) = &mut stmt {
        crate::window::rewrite_table_args(s.as_mut());
    }
    Ok(SluiceStatement::Other(Box::new(stmt)))
}

fn parse_create_source(p: &mut DFParser<'_>) -> PResult<CreateSource> {
    let if_not_exists = p
        .parser
        .parse_keywords(&[Keyword::IF, Keyword::NOT, Keyword::EXISTS]);
    let name = object_name(&p.parser.parse_object_name(false)?)?;
    p.parser.expect_token(&Token::LParen)?;
    let mut columns = Vec::new();
    let mut watermark = None;
    let mut primary_key: Vec<String> = vec![];
    loop {
        if peek_word(p, 0, "PRIMARY") && peek_word(p, 1, "KEY") {
            p.parser.next_token();
            p.parser.next_token();
            p.parser.expect_token(&Token::LParen)?;
            let cols = p.parser.parse_comma_separated(|p| p.parse_identifier())?;
            p.parser.expect_token(&Token::RParen)?;
            if !primary_key.is_empty() {
                return Err("a source can declare only one PRIMARY KEY".into());
            }
            primary_key = cols.iter().map(ident).collect();
        } else if peek_word(p, 0, "WATERMARK") {
            p.parser.next_token();
            p.parser.expect_keyword(Keyword::FOR)?;
            let col = ident(&p.parser.parse_identifier()?);
            p.parser.expect_keyword(Keyword::AS)?;
            let expr = p.parser.parse_expr()?;
            if watermark.replace((col, expr)).is_some() {
                return Err("a source can declare only one WATERMARK".into());
            }
        } else {
            columns.push(p.parser.parse_column_def()?);
        }
        if p.parser.consume_token(&Token::Comma) {
            continue;
        }
        p.parser.expect_token(&Token::RParen)?;
        break;
    }
    // `column type PRIMARY KEY` too.
    for c in &mut columns {
        let before = c.options.len();
        c.options.retain(|o| {
            !matches!(
                o.option,
                datafusion::sql::sqlparser::ast::ColumnOption::PrimaryKey(_)
            )
        });
        if c.options.len() != before {
            if !primary_key.is_empty() {
                return Err("a source can declare only one PRIMARY KEY".into());
            }
            primary_key = vec![ident(&c.name)];
        }
    }
    let options = parse_with_options(p)?;
    Ok(CreateSource {
        name,
        if_not_exists,
        columns,
        watermark,
        primary_key,
        options,
    })
}

fn parse_create_stream(p: &mut DFParser<'_>) -> PResult<CreateStream> {
    let if_not_exists = p
        .parser
        .parse_keywords(&[Keyword::IF, Keyword::NOT, Keyword::EXISTS]);
    let name = object_name(&p.parser.parse_object_name(false)?)?;
    let options = parse_with_options(p)?;
    p.parser.expect_keyword(Keyword::AS)?;
    let mut query = p.parser.parse_query()?;
    crate::window::rewrite_table_args(&mut query);
    Ok(CreateStream {
        name,
        if_not_exists,
        options,
        query,
    })
}

/// `[WITH (key = value, …)]`; keys may be dotted (`fields.url.length`) or quoted.
fn parse_with_options(p: &mut DFParser<'_>) -> PResult<Vec<(String, String)>> {
    if !p.parser.parse_keyword(Keyword::WITH) {
        return Ok(vec![]);
    }
    p.parser.expect_token(&Token::LParen)?;
    let mut options: Vec<(String, String)> = Vec::new();
    loop {
        let key = p.parse_option_key()?.to_ascii_lowercase();
        p.parser.expect_token(&Token::Eq)?;
        // `key = SECRET name`: the value of a secret, looked up when the object starts.
        if peek_word(p, 0, "SECRET") && matches!(p.parser.peek_nth_token(1).token, Token::Word(_)) {
            p.parser.next_token();
            let secret = ident(&p.parser.parse_identifier()?);
            if options.iter().any(|(k, _)| *k == key) {
                return Err(format!("option `{key}` is given twice").into());
            }
            options.push((key, format!("{}{secret}", crate::access::SECRET_REFERENCE)));
            if p.parser.consume_token(&Token::Comma) {
                continue;
            }
            p.parser.expect_token(&Token::RParen)?;
            return Ok(options);
        }
        let value = match p.parse_option_value()? {
            Value::SingleQuotedString(s)
            | Value::DoubleQuotedString(s)
            | Value::EscapedStringLiteral(s) => s,
            Value::Number(n, _) => n,
            other => other.to_string(),
        };
        if value.starts_with(crate::access::SECRET_REFERENCE) {
            return Err(
                format!("option `{key}`: the value starts with a reserved character").into(),
            );
        }
        if options.iter().any(|(k, _)| *k == key) {
            return Err(format!("option `{key}` is given twice").into());
        }
        options.push((key, value));
        if p.parser.consume_token(&Token::Comma) {
            continue;
        }
        p.parser.expect_token(&Token::RParen)?;
        return Ok(options);
    }
}

/// The kind named by the `n`-th next word: `SOURCE`/`STREAM` (or `SOURCES`/`STREAMS`).
fn kind_at(p: &DFParser<'_>, n: usize, plural: bool) -> Option<ObjectKind> {
    let (source, stream, sink) = if plural {
        ("SOURCES", "STREAMS", "SINKS")
    } else {
        ("SOURCE", "STREAM", "SINK")
    };
    if peek_word(p, n, source) {
        Some(ObjectKind::Source)
    } else if peek_word(p, n, stream) {
        Some(ObjectKind::Stream)
    } else if peek_word(p, n, sink) {
        Some(ObjectKind::Sink)
    } else {
        None
    }
}

pub(crate) fn peek_word(p: &DFParser<'_>, n: usize, word: &str) -> bool {
    matches!(&p.parser.peek_nth_token(n).token, Token::Word(w) if w.quote_style.is_none() && w.value.eq_ignore_ascii_case(word))
}

/// The case-folded name of an identifier.
pub fn ident(i: &Ident) -> String {
    if i.quote_style.is_some() {
        i.value.clone()
    } else {
        i.value.to_lowercase()
    }
}

pub(crate) fn object_name(n: &ObjectName) -> PResult<String> {
    match n.0.as_slice() {
        [part] => Ok(part
            .as_ident()
            .map(ident)
            .ok_or_else(|| format!("`{n}` is not a valid name"))?),
        _ => {
            Err(format!("`{n}`: schema-qualified names are not supported; use a plain name").into())
        }
    }
}

/// Turns a parser error into [`SqlError::Syntax`], computing the 1-based character position
/// from the `Line: L, Column: C` the parser reports.
fn syntax(sql: &str, e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> SqlError {
    let e = e.into();
    let mut message = e.to_string();
    for prefix in ["SQL error: ParserError(\"", "sql parser error: "] {
        if let Some(rest) = message.strip_prefix(prefix) {
            message = rest.trim_end_matches("\")").to_string();
        }
    }
    let position = parse_line_col(&message).and_then(|(l, c)| char_position(sql, l, c));
    if let Some(i) = message.find(" at Line: ") {
        message.truncate(i);
    }
    SqlError::Syntax { message, position }
}

fn parse_line_col(m: &str) -> Option<(usize, usize)> {
    let rest = &m[m.find("Line: ")? + 6..];
    let (line, rest) = rest.split_once(", Column: ")?;
    let col: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
    Some((line.trim().parse().ok()?, col.parse().ok()?))
}

fn char_position(sql: &str, line: usize, col: usize) -> Option<usize> {
    if line == 0 {
        return None;
    }
    let before: usize = sql
        .split_inclusive('\n')
        .take(line - 1)
        .map(|l| l.chars().count())
        .sum();
    Some(before + col)
}

impl fmt::Display for CreateSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CREATE SOURCE {} (", quote(&self.name))?;
        let mut parts: Vec<String> = self.columns.iter().map(|c| c.to_string()).collect();
        if !self.primary_key.is_empty() {
            let cols: Vec<String> = self.primary_key.iter().map(|c| quote(c)).collect();
            parts.push(format!("PRIMARY KEY ({})", cols.join(", ")));
        }
        if let Some((col, expr)) = &self.watermark {
            parts.push(format!("WATERMARK FOR {} AS {expr}", quote(col)));
        }
        write!(f, "{})", parts.join(", "))?;
        write_options(f, &self.options)
    }
}

impl fmt::Display for CreateStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CREATE STREAM {}", quote(&self.name))?;
        write_options(f, &self.options)?;
        write!(f, " AS {}", self.query)
    }
}

impl fmt::Display for CreateSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "CREATE SINK {} FROM {}",
            quote(&self.name),
            quote(&self.from)
        )?;
        if let Some(filter) = &self.filter {
            write!(f, " WHERE {filter}")?;
        }
        write_options(f, &self.options)
    }
}

fn write_options(f: &mut fmt::Formatter<'_>, options: &[(String, String)]) -> fmt::Result {
    if options.is_empty() {
        return Ok(());
    }
    let o: Vec<String> = options
        .iter()
        .map(|(k, v)| match crate::access::secret_name(v) {
            Some(secret) => format!("'{}' = SECRET {}", k.replace('\'', "''"), quote(secret)),
            None => format!("'{}' = '{}'", k.replace('\'', "''"), v.replace('\'', "''")),
        })
        .collect();
    write!(f, " WITH ({})", o.join(", "))
}

/// Quotes an identifier when it would not survive case folding.
pub fn quote(name: &str) -> String {
    let plain = name
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && !name.starts_with(|c: char| c.is_ascii_digit());
    if plain {
        name.to_string()
    } else {
        format!("\"{}\"", name.replace('"', "\"\""))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_source_round_trips_through_display() {
        let sql = "CREATE SOURCE Clicks (user_id BIGINT NOT NULL, url TEXT, ts TIMESTAMP NOT NULL, \
                   WATERMARK FOR ts AS ts - INTERVAL '2 seconds') \
                   WITH (connector = 'datagen', rows_per_second = 50000, fields.url.length = '5')";
        let stmts = parse_sql(sql).unwrap();
        let SluiceStatement::CreateSource(s) = &stmts[0] else {
            panic!("{stmts:?}")
        };
        assert_eq!(s.name, "clicks");
        assert_eq!(s.columns.len(), 3);
        assert_eq!(s.watermark.as_ref().unwrap().0, "ts");
        assert_eq!(
            s.options,
            vec![
                ("connector".into(), "datagen".into()),
                ("rows_per_second".into(), "50000".into()),
                ("fields.url.length".into(), "5".into())
            ]
        );
        let again = parse_sql(&s.to_string()).unwrap();
        assert_eq!(again, stmts);
    }

    #[test]
    fn stream_drop_show_describe_and_passthrough() {
        let stmts = parse_sql(
            "CREATE STREAM s WITH (rollover_interval = '1 second') AS SELECT lower(url) AS u FROM clicks WHERE url IS NOT NULL;\
             DROP STREAM IF EXISTS s, t CASCADE WITH (drop_table = 'true'); SHOW SOURCES; show streams; DESCRIBE \"S\"; SELECT 1",
        )
        .unwrap();
        assert_eq!(stmts.len(), 6);
        let SluiceStatement::CreateStream(c) = &stmts[0] else {
            panic!()
        };
        assert_eq!(parse_sql(&c.to_string()).unwrap()[0], stmts[0]);
        assert_eq!(
            stmts[1],
            SluiceStatement::Drop {
                kind: ObjectKind::Stream,
                names: vec!["s".into(), "t".into()],
                if_exists: true,
                cascade: true,
                options: vec![("drop_table".into(), "true".into())],
            }
        );
        assert_eq!(stmts[2], SluiceStatement::Show(ObjectKind::Source));
        assert_eq!(stmts[3], SluiceStatement::Show(ObjectKind::Stream));
        assert_eq!(stmts[4], SluiceStatement::Describe("S".into()));
        assert!(matches!(stmts[5], SluiceStatement::Other(_)));
    }

    #[test]
    fn syntax_errors_carry_a_position() {
        let err =
            parse_sql("CREATE SOURCE s (a BIGINT NOT NULL\n  b TEXT) WITH (connector='http')")
                .unwrap_err();
        assert_eq!(err.sqlstate(), "42601");
        // `b` is the 4th character of line 2: 35 characters (with the newline) + 3.
        assert_eq!(err.position(), Some(38), "{err}");
        assert_eq!(err.to_string(), "Expected: ), found: b");
    }
}
