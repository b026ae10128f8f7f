//! Limits on what statements may hold: the names of new objects ([`check_name`]), and how
//! complex a statement may be ([`check_complexity`]).
//!
//! ## Names
//!
//! A source's, stream's or sink's name becomes a folder of the lake (`processed/<name>/`,
//! `raw/<name>/`…), an Athena table name and a key of the catalog, so one rule holds for all
//! of them, checked before anything is started or written: 1 to 63 bytes (Postgres's
//! identifier length) of ASCII letters, digits, `_`, `$` and `-`, starting with a letter or
//! `_`. Such a name needs no encoding in an object-store path or a URL, so the lake's writers
//! and readers cannot disagree on where its files are. (Names are case-folded as usual:
//! unquoted `Orders` is `orders`.)
//!
//! ## Complexity
//!
//! A bound on the nesting of a statement's expressions, checked on the tokens before
//! anything builds a tree.
//!
//! Parsing `1 + 1 + … + 1` is a loop, but the expression it builds is a chain as deep as it
//! has terms, and everything after the parser walks such trees recursively: DataFusion's
//! planner, optimizer and evaluator, and the derived `Clone`, `Drop` and `PartialEq` of the
//! trees (which no stack guard covers). A few thousand terms overflow a thread's stack and
//! abort the process. Postgres answers the same statement with SQLSTATE 54001 ("stack depth
//! limit exceeded"); Sluice does so before the tree exists.
//!
//! The bound: within one pair of brackets, the tokens between two commas form a segment; a
//! segment's weight is its number of tokens plus the heaviest bracketed group in it (plus
//! one for the brackets). Every node of an expression tree spans at least one token of its
//! own, and list items (separated by commas) are siblings, so a statement's expression
//! depth never exceeds its heaviest segment. The bound overestimates (`a = 1 AND b = 2`
//! weighs 7 for a depth of 3), which only matters near the limit, and it is linear in the
//! statement's length, with no recursion.
//!
//! Nested brackets themselves are bounded by the parser's recursion limit; the threads that
//! plan and run statements have stacks sized for [`MAX_EXPRESSION_WEIGHT`] (see the server).

use datafusion::sql::sqlparser::tokenizer::{Token, TokenWithSpan};

use crate::error::{Result, SqlError};

/// The longest name, in bytes (Postgres's `NAMEDATALEN - 1`).
pub const MAX_NAME_BYTES: usize = 63;

/// Checks the name of a new `kind` object against the rule in the module docs.
pub fn check_name(kind: crate::ObjectKind, name: &str) -> Result<()> {
    let bad = |why: &str| {
        Err(SqlError::InvalidName(format!(
            "invalid {kind} name \"{}\": {why}",
            name.escape_debug()
        )))
    };
    if name.is_empty() {
        return bad("a name cannot be empty");
    }
    if name.len() > MAX_NAME_BYTES {
        return bad(&format!(
            "{} bytes long, at most {MAX_NAME_BYTES} are allowed",
            name.len()
        ));
    }
    let first = name.chars().next().expect("not empty");
    if !(first.is_ascii_alphabetic() || first == '_') {
        return bad("a name starts with a letter or `_`");
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '$' | '-')))
    {
        return bad(&format!(
            "{:?} is not allowed: names hold ASCII letters, digits, `_`, `$` and `-` (they name folders of the lake)",
            c
        ));
    }
    Ok(())
}

/// The heaviest segment a statement may have: about 5 000 terms of `a + b + …`, 2 500 of
/// `x = 1 OR x = 2 OR …`. (A long `IN (…)` list is not a chain: its items are siblings.)
pub const MAX_EXPRESSION_WEIGHT: usize = 10_000;

/// Checks `tokens` (one or more statements) against [`MAX_EXPRESSION_WEIGHT`].
pub fn check_complexity(tokens: &[TokenWithSpan]) -> Result<()> {
    let weight = heaviest_segment(tokens.iter().map(|t| &t.token));
    if weight > MAX_EXPRESSION_WEIGHT {
        return Err(SqlError::TooComplex(format!(
            "statement too complex: one of its expressions is {weight} tokens long without a \
             comma or bracket, at most {MAX_EXPRESSION_WEIGHT} are allowed (long AND/OR or \
             `+`/`||` chains nest that deep); use IN (…) for lists of values, or group the \
             terms in parentheses"
        )));
    }
    Ok(())
}

/// The weight of the heaviest segment (see the module docs).
fn heaviest_segment<'a>(tokens: impl Iterator<Item = &'a Token>) -> usize {
    /// One open bracket level: the current segment's tokens, its heaviest group, and the
    /// heaviest segment closed so far at this level.
    #[derive(Default)]
    struct Level {
        tokens: usize,
        group: usize,
        heaviest: usize,
    }
    impl Level {
        fn close_segment(&mut self) {
            self.heaviest = self.heaviest.max(self.tokens + self.group);
            self.tokens = 0;
            self.group = 0;
        }
    }
    let mut levels = vec![Level::default()];
    let mut heaviest = 0;
    for token in tokens {
        match token {
            Token::Whitespace(_) => {}
            Token::Comma | Token::SemiColon => levels.last_mut().expect("a level").close_segment(),
            Token::LParen | Token::LBracket | Token::LBrace => levels.push(Level::default()),
            Token::RParen | Token::RBracket | Token::RBrace if levels.len() > 1 => {
                let mut inner = levels.pop().expect("a nested level");
                inner.close_segment();
                let outer = levels.last_mut().expect("a level");
                outer.group = outer.group.max(inner.heaviest + 1);
                // The brackets count as tokens of the enclosing segment.
                outer.tokens += 2;
            }
            _ => levels.last_mut().expect("a level").tokens += 1,
        }
    }
    // Unclosed brackets (the parser reports them): their weight counts all the same.
    while let Some(mut level) = levels.pop() {
        level.close_segment();
        heaviest = heaviest.max(level.heaviest);
        if let Some(outer) = levels.last_mut() {
            outer.group = outer.group.max(level.heaviest + 1);
        }
    }
    heaviest
}

#[cfg(test)]
mod tests {
    use datafusion::sql::sqlparser::dialect::PostgreSqlDialect;
    use datafusion::sql::sqlparser::tokenizer::Tokenizer;

    use super::*;

    fn weight(sql: &str) -> usize {
        let tokens = Tokenizer::new(&PostgreSqlDialect {}, sql)
            .tokenize_with_location()
            .unwrap();
        heaviest_segment(tokens.iter().map(|t| &t.token))
    }

    #[test]
    fn names_follow_one_rule() {
        use crate::ObjectKind::Stream;
        for good in ["orders", "_x", "a$b", "clicks-v2", "A1", &"a".repeat(63)] {
            check_name(Stream, good).unwrap();
        }
        for bad in [
            "",
            "../../etc",
            "/etc",
            "a/b",
            "a\nb",
            "a\tb",
            "a%2Fb",
            ".",
            "..",
            "订单",
            "1abc",
            "a b",
            "a.b",
            &"a".repeat(64),
        ] {
            let err = check_name(Stream, bad).unwrap_err();
            assert_eq!(err.sqlstate(), "42602", "{bad:?}: {err}");
            assert!(err.to_string().starts_with("invalid stream name"), "{err}");
        }
    }

    #[test]
    fn a_chain_weighs_its_length_and_list_items_do_not_add_up() {
        assert_eq!(weight("SELECT 1 + 1 + 1"), 6);
        // Items of a list are siblings: the heaviest counts, not their sum.
        assert_eq!(weight("SELECT a, b + c, d"), 3);
        assert_eq!(weight("SELECT x IN (1, 2, 3, 4, 5, 6, 7, 8, 9)"), 5 + 2);
        // A group adds its own weight (plus one) to the segment it is in.
        assert_eq!(weight("SELECT (1 + 1 + 1) * 2"), 1 + 2 + 2 + (5 + 1));
        // h(1): 1; g(…): 3 + 2; f(…): 3 + 6; SELECT f(…): 4 + 10.
        assert_eq!(weight("SELECT f(g(h(1)))"), 14);
    }

    #[test]
    fn the_weight_bounds_the_depth_of_what_the_parser_builds() {
        // A chain of n terms is n - 1 deep, and weighs more.
        for n in [2usize, 10, 100] {
            let sql = format!("SELECT 1{}", " + 1".repeat(n - 1));
            assert!(weight(&sql) >= n - 1);
            let sql = format!("SELECT * FROM t WHERE x = 0{}", " OR x = 1".repeat(n - 1));
            assert!(weight(&sql) >= n - 1);
        }
    }

    #[test]
    fn long_chains_are_refused_before_parsing_with_sqlstate_54001() {
        for sql in [
            format!("SELECT 1{}", " + 1".repeat(6_000)),
            format!("SELECT 'a'{}", " || 'a'".repeat(6_000)),
            format!("SELECT * FROM t WHERE x = 0{}", " OR x = 1".repeat(4_000)),
            // Unclosed: still weighed.
            format!("SELECT (1{}", " + 1".repeat(6_000)),
        ] {
            let err = crate::parse_sql(&sql).unwrap_err();
            assert_eq!(err.sqlstate(), "54001", "{err}");
            assert!(
                err.to_string().starts_with("statement too complex"),
                "{err}"
            );
        }
        // Long lists are fine.
        let list = (0..20_000).map(|i| i.to_string()).collect::<Vec<_>>();
        crate::parse_sql(&format!("SELECT x IN ({}) FROM t", list.join(", "))).unwrap();
        crate::parse_sql(&format!("SELECT 1{}", " + 1".repeat(4_000))).unwrap();
    }
}
