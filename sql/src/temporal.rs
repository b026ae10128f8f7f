//! `FOR SYSTEM_TIME AS OF`: Flink's temporal-join syntax in a Postgres dialect.
//!
//! sqlparser takes `FOR SYSTEM_TIME AS OF <expr>` only in some dialects, so the tokens are
//! taken out before parsing (`customers FOR SYSTEM_TIME AS OF o.ts AS c`, or after the
//! alias) and the clause is put back on the parsed relation as its
//! [`TableVersion::ForSystemTimeAsOf`] — which prints it again, so a stream's stored SQL
//! keeps it. The planner takes it off once more ([`take_versions`]) and plans a temporal
//! join of that relation.

use std::ops::ControlFlow;

use datafusion::sql::sqlparser::ast::{
    Expr, Query, TableFactor, TableVersion, VisitMut, VisitorMut,
};
use datafusion::sql::sqlparser::dialect::PostgreSqlDialect;
use datafusion::sql::sqlparser::parser::Parser;
use datafusion::sql::sqlparser::tokenizer::{Span, Token, TokenWithSpan};

use crate::parser::ident;

/// One `FOR SYSTEM_TIME AS OF` taken out of the tokens: the span of the token before it
/// (the relation's name or alias) and the expression's text.
#[derive(Debug, Clone)]
pub struct SystemTime {
    before: Span,
    expr: String,
}

/// Takes every `FOR SYSTEM_TIME AS OF <expr>` out of `tokens`; `<expr>` is a column
/// (`o.ts`) or a call (`PROCTIME()`).
pub fn strip_system_time(mut tokens: Vec<TokenWithSpan>) -> (Vec<TokenWithSpan>, Vec<SystemTime>) {
    let is_word = |t: &Token, w: &str| matches!(t, Token::Word(word) if word.quote_style.is_none() && word.value.eq_ignore_ascii_case(w));
    let mut found = vec![];
    loop {
        let sig: Vec<usize> = (0..tokens.len())
            .filter(|&k| !matches!(tokens[k].token, Token::Whitespace(_)))
            .collect();
        let Some(at) = sig.windows(4).position(|w| {
            is_word(&tokens[w[0]].token, "FOR")
                && is_word(&tokens[w[1]].token, "SYSTEM_TIME")
                && is_word(&tokens[w[2]].token, "AS")
                && is_word(&tokens[w[3]].token, "OF")
        }) else {
            return (tokens, found);
        };
        if at == 0 {
            return (tokens, found); // nothing before it: the parser says what is wrong
        }
        let before = tokens[sig[at - 1]].span;
        // The expression: a word, `.word`s, and a call's parentheses.
        let mut end = at + 4;
        let mut text = String::new();
        if !matches!(
            tokens
                .get(*sig.get(end).unwrap_or(&usize::MAX))
                .map(|t| &t.token),
            Some(Token::Word(_))
        ) {
            return (tokens, found);
        }
        while let Some(&k) = sig.get(end) {
            match &tokens[k].token {
                Token::Word(_) if text.is_empty() || text.ends_with('.') => {
                    text.push_str(&tokens[k].token.to_string());
                    end += 1;
                }
                Token::Period if !text.is_empty() && !text.ends_with('.') => {
                    text.push('.');
                    end += 1;
                }
                Token::LParen if !text.ends_with(')') => {
                    let mut depth = 0;
                    while let Some(&k) = sig.get(end) {
                        text.push_str(&tokens[k].token.to_string());
                        end += 1;
                        match tokens[k].token {
                            Token::LParen => depth += 1,
                            Token::RParen => {
                                depth -= 1;
                                if depth == 0 {
                                    break;
                                }
                            }
                            _ => {}
                        }
                    }
                    break;
                }
                _ => break,
            }
        }
        let (first, last) = (sig[at], sig[end - 1]);
        tokens.drain(first..=last);
        found.push(SystemTime { before, expr: text });
    }
}

/// Puts each clause taken out back on the relation it followed (by the name's or alias's
/// position). Returns the clauses that found no relation (for an error).
pub fn attach<V: VisitMut>(node: &mut V, clauses: &mut Vec<SystemTime>) {
    struct Attach<'a>(&'a mut Vec<SystemTime>);
    impl VisitorMut for Attach<'_> {
        type Break = ();
        fn pre_visit_table_factor(&mut self, factor: &mut TableFactor) -> ControlFlow<()> {
            if let TableFactor::Table {
                name,
                alias,
                version,
                ..
            } = factor
            {
                let spans = [
                    name.0.last().and_then(|p| p.as_ident()).map(|i| i.span),
                    alias.as_ref().map(|a| a.name.span),
                ];
                if let Some(n) = self.0.iter().position(|c| spans.contains(&Some(c.before))) {
                    let clause = self.0.remove(n);
                    let expr = Parser::new(&PostgreSqlDialect {})
                        .try_with_sql(&clause.expr)
                        .and_then(|mut p| p.parse_expr());
                    if let Ok(expr) = expr {
                        *version = Some(TableVersion::ForSystemTimeAsOf(expr));
                    }
                }
            }
            ControlFlow::Continue(())
        }
    }
    let _ = node.visit(&mut Attach(clauses));
}

/// A relation read `FOR SYSTEM_TIME AS OF`.
#[derive(Debug, Clone, PartialEq)]
pub struct Temporal {
    /// How the query names it: its alias, else its name (case-folded).
    pub relation: String,
    /// The time of the other side's row it is read at; `None`: `PROCTIME()` (its latest
    /// version when the row arrives).
    pub as_of: Option<Expr>,
}

/// Takes the `FOR SYSTEM_TIME AS OF` clauses off `query`'s relations (DataFusion plans the
/// join without them).
pub fn take_versions(query: &mut Query) -> Vec<Temporal> {
    struct Take(Vec<Temporal>);
    impl VisitorMut for Take {
        type Break = ();
        fn pre_visit_table_factor(&mut self, factor: &mut TableFactor) -> ControlFlow<()> {
            if let TableFactor::Table {
                name,
                alias,
                version,
                ..
            } = factor
                && let Some(TableVersion::ForSystemTimeAsOf(e)) = version.take()
            {
                let relation = match alias {
                    Some(a) => ident(&a.name),
                    None => name
                        .0
                        .last()
                        .and_then(|p| p.as_ident())
                        .map(ident)
                        .unwrap_or_default(),
                };
                let proctime = matches!(&e, Expr::Function(f) if f.name.to_string().eq_ignore_ascii_case("proctime"));
                self.0.push(Temporal {
                    relation,
                    as_of: (!proctime).then_some(e),
                });
            }
            ControlFlow::Continue(())
        }
    }
    let mut t = Take(vec![]);
    let _ = query.visit(&mut t);
    t.0
}

#[cfg(test)]
mod tests {
    use crate::{SluiceStatement, parse_sql};

    use super::*;

    #[test]
    fn the_clause_round_trips_and_is_taken_off_for_planning() {
        for sql in [
            "CREATE STREAM e AS SELECT o.id, c.tier FROM orders o \
             JOIN customers FOR SYSTEM_TIME AS OF o.ts AS c ON o.cid = c.cid",
            "CREATE STREAM e AS SELECT o.id, c.tier FROM orders o \
             LEFT JOIN customers c FOR SYSTEM_TIME AS OF PROCTIME() ON o.cid = c.cid",
        ] {
            let stmts = parse_sql(sql).unwrap();
            let SluiceStatement::CreateStream(c) = &stmts[0] else {
                panic!()
            };
            let shown = c.to_string();
            assert!(shown.contains("FOR SYSTEM_TIME AS OF"), "{shown}");
            assert_eq!(parse_sql(&shown).unwrap(), stmts, "{shown}");
            let mut q = c.query.clone();
            let taken = take_versions(&mut q);
            assert_eq!(taken.len(), 1);
            assert_eq!(taken[0].relation, "c");
            assert_eq!(taken[0].as_of.is_none(), sql.contains("PROCTIME"));
            assert!(!q.to_string().contains("SYSTEM_TIME"));
        }
        assert!(parse_sql("SELECT 1 FOR SYSTEM_TIME AS OF x").is_err());
    }
}
