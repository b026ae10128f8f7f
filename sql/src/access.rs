//! The access-control statements: users and roles, privileges, row policies, tokens and
//! secrets — Postgres's syntax where Postgres has one.
//!
//! ```sql
//! CREATE USER name [WITH] [PASSWORD 'p' | PASSWORD NULL] [LOGIN | NOLOGIN] [SUPERUSER | NOSUPERUSER];
//! CREATE ROLE name [WITH] …;                   -- as CREATE USER, but NOLOGIN unless told
//! ALTER USER | ROLE name [WITH] option …;
//! DROP USER | ROLE [IF EXISTS] name [, …];
//! GRANT role [, …] TO name [, …];             REVOKE role [, …] FROM name [, …];
//! GRANT { SELECT | INSERT | ALL [PRIVILEGES] } [, …] ON [TABLE | SOURCE | STREAM] object [, …] TO name [, …];
//! GRANT CREATE ON { DATABASE sluice | SCHEMA public } TO name [, …];
//! REVOKE … FROM name [, …];
//! CREATE POLICY name ON stream [AS PERMISSIVE] [FOR SELECT | FOR ALL] [TO name [, …]] USING (predicate);
//! DROP POLICY [IF EXISTS] name ON stream;
//! CREATE TOKEN name FOR USER name;            DROP TOKEN [IF EXISTS] name;
//! CREATE SECRET name AS 'value';              DROP SECRET [IF EXISTS] name;
//! ```
//!
//! `PUBLIC` as a grantee is every user. A secret is used in a `WITH (…)` option as
//! `key = SECRET name` (see [`SECRET_REFERENCE`]).

use std::collections::BTreeMap;
use std::fmt;
use std::ops::ControlFlow;

use datafusion::sql::parser::DFParser;
use datafusion::sql::sqlparser::ast::{
    Expr, ObjectName, Query, SetExpr, TableFactor, Visit, VisitMut, Visitor, VisitorMut,
};
use datafusion::sql::sqlparser::keywords::Keyword;
use datafusion::sql::sqlparser::tokenizer::Token;

use crate::parser::{PResult, ident, object_name, peek_word};

/// How a `WITH (…)` option's value that names a secret (`key = SECRET name`) is held among
/// the options: this prefix, then the secret's name. No literal value may start with it.
pub const SECRET_REFERENCE: &str = "\u{1}secret:";

/// The secret named by an option's value, if it names one.
pub fn secret_name(value: &str) -> Option<&str> {
    value.strip_prefix(SECRET_REFERENCE)
}

/// The plain name of a relation `name` refers to in the `public` schema (`t`,
/// `public.t`, `sluice.public.t`); none for another schema's (`pg_catalog.pg_class`).
pub fn public_name(name: &ObjectName) -> Option<String> {
    let parts: Vec<String> = name
        .0
        .iter()
        .map(|p| p.as_ident().map(ident))
        .collect::<Option<Vec<_>>>()?;
    match parts.as_slice() {
        [t] => Some(t.clone()),
        [schema, t] if schema == "public" => Some(t.clone()),
        [catalog, schema, t] if catalog == "sluice" && schema == "public" => Some(t.clone()),
        _ => None,
    }
}

/// The `public` relations `node` reads (its `FROM` and `JOIN` tables, in subqueries and
/// window functions too), by plain name; table functions are not relations.
pub fn relations_read<V: Visit>(node: &V) -> Vec<String> {
    struct Collect(Vec<String>);
    impl Visitor for Collect {
        type Break = ();
        fn pre_visit_table_factor(&mut self, factor: &TableFactor) -> ControlFlow<()> {
            if let TableFactor::Table {
                name, args: None, ..
            } = factor
                && let Some(n) = public_name(name)
                && !self.0.contains(&n)
            {
                self.0.push(n);
            }
            ControlFlow::Continue(())
        }
    }
    let mut c = Collect(vec![]);
    let _ = node.visit(&mut c);
    c.0
}

/// Puts a row filter on relations `node` reads: each `FROM t [AS a]` whose `t` has a
/// filter becomes `FROM (SELECT * FROM t WHERE filter) AS a` (alias `t` when it had none),
/// wherever it is — joins, subqueries, the relation argument of a window function. Returns
/// how many it rewrote (none if one could not be rewritten: refuse the statement).
pub fn restrict<V: VisitMut>(node: &mut V, filters: &BTreeMap<String, Expr>) -> Option<usize> {
    struct Rewrite<'a> {
        filters: &'a BTreeMap<String, Expr>,
        done: usize,
        failed: bool,
    }
    impl VisitorMut for Rewrite<'_> {
        type Break = ();
        // After the factor's children: the subquery put in its place is not visited again.
        fn post_visit_table_factor(&mut self, factor: &mut TableFactor) -> ControlFlow<()> {
            if let TableFactor::Table {
                name,
                alias,
                args: None,
                ..
            } = factor
                && let Some(plain) = public_name(name)
                && let Some(filter) = self.filters.get(&plain)
            {
                let alias = match alias {
                    Some(a) => a.to_string(),
                    None => crate::parser::quote(&plain),
                };
                let sql = format!("SELECT * FROM (SELECT * FROM {name} WHERE {filter}) AS {alias}");
                let Some(derived) = parse_query(&sql).and_then(|q| match *q.body {
                    SetExpr::Select(s) => s.from.into_iter().next().map(|t| t.relation),
                    _ => None,
                }) else {
                    // Cannot happen for a filter that parsed; refuse rather than not filter.
                    self.failed = true;
                    return ControlFlow::Break(());
                };
                *factor = derived;
                self.done += 1;
            }
            ControlFlow::Continue(())
        }
    }
    let mut r = Rewrite {
        filters,
        done: 0,
        failed: false,
    };
    let _ = node.visit(&mut r);
    if r.failed { None } else { Some(r.done) }
}

fn parse_query(sql: &str) -> Option<Query> {
    use datafusion::sql::sqlparser::dialect::PostgreSqlDialect;
    use datafusion::sql::sqlparser::parser::Parser;
    Parser::new(&PostgreSqlDialect {})
        .try_with_sql(sql)
        .and_then(|mut p| p.parse_query())
        .ok()
        .map(|q| *q)
}

/// One access-control statement.
#[derive(Clone, PartialEq)]
pub enum AccessStatement {
    /// `CREATE USER` / `CREATE ROLE`.
    CreateRole {
        /// The new role's name.
        name: String,
        /// `CREATE USER` (may log in unless `NOLOGIN`) rather than `CREATE ROLE`.
        user: bool,
        /// `IF NOT EXISTS` was given.
        if_not_exists: bool,
        /// Its options.
        options: RoleOptions,
    },
    /// `ALTER USER` / `ALTER ROLE`.
    AlterRole {
        /// The role.
        name: String,
        /// What changes.
        options: RoleOptions,
    },
    /// `DROP USER` / `DROP ROLE`.
    DropRole {
        /// The roles.
        names: Vec<String>,
        /// `IF EXISTS` was given.
        if_exists: bool,
    },
    /// `GRANT role TO member` (`grant`) or `REVOKE role FROM member`.
    Membership {
        /// `GRANT` rather than `REVOKE`.
        grant: bool,
        /// The roles granted.
        roles: Vec<String>,
        /// Who gets (or loses) them.
        members: Vec<String>,
    },
    /// `GRANT privilege ON object TO grantee` (`grant`) or `REVOKE … FROM …`.
    Privileges {
        /// `GRANT` rather than `REVOKE`.
        grant: bool,
        /// The privileges.
        privileges: Vec<Privilege>,
        /// What they are on.
        target: GrantTarget,
        /// Who gets (or loses) them (`public`: everyone).
        grantees: Vec<String>,
    },
    /// `CREATE POLICY`.
    CreatePolicy {
        /// The policy's name (unique per relation).
        name: String,
        /// The relation it filters.
        on: String,
        /// Whom it applies to (empty: `PUBLIC`).
        to: Vec<String>,
        /// The rows they see.
        using: Box<Expr>,
    },
    /// `DROP POLICY`.
    DropPolicy {
        /// The policy.
        name: String,
        /// Its relation.
        on: String,
        /// `IF EXISTS` was given.
        if_exists: bool,
    },
    /// `CREATE TOKEN name FOR USER user`.
    CreateToken {
        /// The token's name.
        name: String,
        /// Whom it authenticates as.
        user: String,
    },
    /// `DROP TOKEN`.
    DropToken {
        /// The token's name.
        name: String,
        /// `IF EXISTS` was given.
        if_exists: bool,
    },
    /// `CREATE SECRET name AS 'value'`.
    CreateSecret {
        /// The secret's name.
        name: String,
        /// Its value.
        value: String,
    },
    /// `DROP SECRET`.
    DropSecret {
        /// The secret's name.
        name: String,
        /// `IF EXISTS` was given.
        if_exists: bool,
    },
}

/// Never shows a password or a secret's value.
impl fmt::Debug for AccessStatement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.tag())
    }
}

impl AccessStatement {
    /// The command tag Postgres answers with (`CREATE ROLE`, `GRANT`, …).
    pub fn tag(&self) -> String {
        match self {
            AccessStatement::CreateRole { .. } => "CREATE ROLE",
            AccessStatement::AlterRole { .. } => "ALTER ROLE",
            AccessStatement::DropRole { .. } => "DROP ROLE",
            AccessStatement::Membership { grant: true, .. }
            | AccessStatement::Privileges { grant: true, .. } => "GRANT",
            AccessStatement::Membership { .. } | AccessStatement::Privileges { .. } => "REVOKE",
            AccessStatement::CreatePolicy { .. } => "CREATE POLICY",
            AccessStatement::DropPolicy { .. } => "DROP POLICY",
            AccessStatement::CreateToken { .. } => "CREATE TOKEN",
            AccessStatement::DropToken { .. } => "DROP TOKEN",
            AccessStatement::CreateSecret { .. } => "CREATE SECRET",
            AccessStatement::DropSecret { .. } => "DROP SECRET",
        }
        .to_string()
    }
}

/// The options of `CREATE/ALTER USER|ROLE` (`None`: not given).
#[derive(Clone, Default, PartialEq)]
pub struct RoleOptions {
    /// `PASSWORD 'p'` (`Some(Some)`) or `PASSWORD NULL` (`Some(None)`).
    pub password: Option<Option<String>>,
    /// `LOGIN` / `NOLOGIN`.
    pub login: Option<bool>,
    /// `SUPERUSER` / `NOSUPERUSER`.
    pub superuser: Option<bool>,
}

/// A privilege on an object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Privilege {
    /// Query a stream ad hoc; create streams and sinks that read a source or stream.
    Select,
    /// Send events to an `http` source.
    Insert,
    /// Create sources, streams and sinks (on the database).
    Create,
}

impl fmt::Display for Privilege {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Privilege::Select => "SELECT",
            Privilege::Insert => "INSERT",
            Privilege::Create => "CREATE",
        })
    }
}

/// What privileges are granted on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GrantTarget {
    /// Sources or streams, by name.
    Objects(Vec<String>),
    /// The database (`CREATE`).
    Database,
}

/// Whether the next words start an access-control statement.
pub(crate) fn starts(p: &DFParser<'_>) -> bool {
    let word = |n, w| peek_word(p, n, w);
    let role_word = |n| word(n, "USER") || word(n, "ROLE");
    (word(0, "CREATE")
        && (role_word(1) || word(1, "POLICY") || word(1, "TOKEN") || word(1, "SECRET")))
        || (word(0, "ALTER") && role_word(1))
        || (word(0, "DROP")
            && (role_word(1) || word(1, "POLICY") || word(1, "TOKEN") || word(1, "SECRET")))
        || word(0, "GRANT")
        || word(0, "REVOKE")
}

/// Parses the access-control statement [`starts`] saw.
pub(crate) fn parse(p: &mut DFParser<'_>) -> PResult<AccessStatement> {
    let verb = next_word(p)?;
    match verb.as_str() {
        "CREATE" => {
            let what = next_word(p)?;
            match what.as_str() {
                "USER" | "ROLE" => {
                    let if_not_exists =
                        p.parser
                            .parse_keywords(&[Keyword::IF, Keyword::NOT, Keyword::EXISTS]);
                    let name = name(p)?;
                    let options = role_options(p)?;
                    Ok(AccessStatement::CreateRole {
                        name,
                        user: what == "USER",
                        if_not_exists,
                        options,
                    })
                }
                "POLICY" => {
                    let name = name(p)?;
                    p.parser.expect_keyword(Keyword::ON)?;
                    let on = object_name(&p.parser.parse_object_name(false)?)?;
                    if p.parser.parse_keyword(Keyword::AS) {
                        if !peek_word(p, 0, "PERMISSIVE") {
                            return Err(
                                "only PERMISSIVE policies are supported (a user sees the rows any of its policies allow)"
                                    .into(),
                            );
                        }
                        p.parser.next_token();
                    }
                    if p.parser.parse_keyword(Keyword::FOR) {
                        let command = next_word(p)?;
                        if command != "SELECT" && command != "ALL" {
                            return Err(format!(
                                "policies filter what users read: FOR SELECT (or FOR ALL), not FOR {command}"
                            )
                            .into());
                        }
                    }
                    let to = if p.parser.parse_keyword(Keyword::TO) {
                        names(p)?
                    } else {
                        vec![]
                    };
                    p.parser.expect_keyword(Keyword::USING)?;
                    p.parser.expect_token(&Token::LParen)?;
                    let using = Box::new(p.parser.parse_expr()?);
                    p.parser.expect_token(&Token::RParen)?;
                    Ok(AccessStatement::CreatePolicy {
                        name,
                        on,
                        to,
                        using,
                    })
                }
                "TOKEN" => {
                    let name = name(p)?;
                    p.parser.expect_keyword(Keyword::FOR)?;
                    p.parser.expect_keyword(Keyword::USER)?;
                    let user = name_or_keyword(p)?;
                    Ok(AccessStatement::CreateToken { name, user })
                }
                "SECRET" => {
                    let name = name(p)?;
                    p.parser.expect_keyword(Keyword::AS)?;
                    let value = p.parser.parse_literal_string()?;
                    Ok(AccessStatement::CreateSecret { name, value })
                }
                _ => unreachable!("`starts` saw CREATE {what}"),
            }
        }
        "ALTER" => {
            next_word(p)?; // USER | ROLE
            let name = name_or_keyword(p)?;
            let options = role_options(p)?;
            if options == RoleOptions::default() {
                return Err("ALTER USER needs an option: PASSWORD, LOGIN, NOLOGIN, SUPERUSER or NOSUPERUSER".into());
            }
            Ok(AccessStatement::AlterRole { name, options })
        }
        "DROP" => {
            let what = next_word(p)?;
            let if_exists = p.parser.parse_keywords(&[Keyword::IF, Keyword::EXISTS]);
            match what.as_str() {
                "USER" | "ROLE" => Ok(AccessStatement::DropRole {
                    names: names(p)?,
                    if_exists,
                }),
                "POLICY" => {
                    let name = name(p)?;
                    p.parser.expect_keyword(Keyword::ON)?;
                    let on = object_name(&p.parser.parse_object_name(false)?)?;
                    Ok(AccessStatement::DropPolicy {
                        name,
                        on,
                        if_exists,
                    })
                }
                "TOKEN" => Ok(AccessStatement::DropToken {
                    name: name(p)?,
                    if_exists,
                }),
                "SECRET" => Ok(AccessStatement::DropSecret {
                    name: name(p)?,
                    if_exists,
                }),
                _ => unreachable!("`starts` saw DROP {what}"),
            }
        }
        "GRANT" | "REVOKE" => {
            let grant = verb == "GRANT";
            let preposition = if grant { Keyword::TO } else { Keyword::FROM };
            // Privileges are keywords; role names are not: `GRANT select ON …` vs `GRANT analysts TO …`.
            if let Some(privileges) = privileges(p)? {
                p.parser.expect_keyword(Keyword::ON)?;
                let target = if p.parser.parse_keyword(Keyword::DATABASE) {
                    let db = name(p)?;
                    if db != "sluice" {
                        return Err(format!(
                            "database `{db}` does not exist (Sluice's database is `sluice`)"
                        )
                        .into());
                    }
                    GrantTarget::Database
                } else if p.parser.parse_keyword(Keyword::SCHEMA) {
                    let schema = name(p)?;
                    if schema != "public" {
                        return Err(format!(
                            "schema `{schema}` does not exist (sources and streams are in `public`)"
                        )
                        .into());
                    }
                    GrantTarget::Database
                } else {
                    if p.parser.parse_keywords(&[Keyword::ALL, Keyword::TABLES]) {
                        return Err(
                            "GRANT … ON ALL TABLES is not supported; name the sources and streams"
                                .into(),
                        );
                    }
                    if !p.parser.parse_keyword(Keyword::TABLE)
                        && (peek_word(p, 0, "SOURCE") || peek_word(p, 0, "STREAM"))
                    {
                        p.parser.next_token();
                    }
                    let objects = p
                        .parser
                        .parse_comma_separated(|p| p.parse_object_name(false))?
                        .iter()
                        .map(object_name)
                        .collect::<PResult<Vec<_>>>()?;
                    GrantTarget::Objects(objects)
                };
                match (&target, privileges.contains(&Privilege::Create)) {
                    (GrantTarget::Database, false) => {
                        return Err("on the database, only CREATE can be granted".into());
                    }
                    (GrantTarget::Objects(_), true) if privileges.len() == 1 => {
                        return Err(
                            "CREATE is granted on the database: GRANT CREATE ON DATABASE sluice TO …"
                                .into(),
                        );
                    }
                    _ => {}
                }
                let privileges = match target {
                    // `ALL` on objects: what objects have.
                    GrantTarget::Objects(_) => privileges
                        .into_iter()
                        .filter(|p| *p != Privilege::Create)
                        .collect(),
                    GrantTarget::Database => vec![Privilege::Create],
                };
                p.parser.expect_keyword(preposition)?;
                let grantees = names(p)?;
                Ok(AccessStatement::Privileges {
                    grant,
                    privileges,
                    target,
                    grantees,
                })
            } else {
                let roles = names(p)?;
                p.parser.expect_keyword(preposition)?;
                let members = names(p)?;
                Ok(AccessStatement::Membership {
                    grant,
                    roles,
                    members,
                })
            }
        }
        _ => unreachable!("`starts` saw {verb}"),
    }
}

/// `SELECT, INSERT`, `ALL [PRIVILEGES]`, `CREATE`: the privileges, if the next words are.
fn privileges(p: &mut DFParser<'_>) -> PResult<Option<Vec<Privilege>>> {
    // A role named like a privilege would need quotes, as in Postgres.
    let is_privilege = |p: &DFParser<'_>| {
        [
            "SELECT", "INSERT", "CREATE", "ALL", "UPDATE", "DELETE", "USAGE",
        ]
        .iter()
        .any(|w| peek_word(p, 0, w))
    };
    if !is_privilege(p) {
        return Ok(None);
    }
    let mut out = vec![];
    loop {
        let word = next_word(p)?;
        match word.as_str() {
            "SELECT" => out.push(Privilege::Select),
            "INSERT" => out.push(Privilege::Insert),
            "CREATE" => out.push(Privilege::Create),
            "ALL" => {
                let _ = p.parser.parse_keyword(Keyword::PRIVILEGES);
                out.extend([Privilege::Select, Privilege::Insert, Privilege::Create]);
            }
            other => {
                return Err(format!(
                    "privilege {other} is not supported: Sluice grants SELECT, INSERT and CREATE"
                )
                .into());
            }
        }
        if !p.parser.consume_token(&Token::Comma) {
            break;
        }
    }
    out.sort();
    out.dedup();
    Ok(Some(out))
}

fn role_options(p: &mut DFParser<'_>) -> PResult<RoleOptions> {
    let _ = p.parser.parse_keyword(Keyword::WITH);
    let mut options = RoleOptions::default();
    let twice = |what: &str| -> Box<dyn std::error::Error + Send + Sync> {
        format!("{what} is given twice").into()
    };
    loop {
        let word = match &p.parser.peek_token().token {
            Token::Word(w) if w.quote_style.is_none() => w.value.to_ascii_uppercase(),
            _ => break,
        };
        match word.as_str() {
            "PASSWORD" => {
                p.parser.next_token();
                let value = if p.parser.parse_keyword(Keyword::NULL) {
                    None
                } else {
                    let v = p.parser.parse_literal_string()?;
                    if v.is_empty() {
                        return Err(
                            "an empty password is not allowed (PASSWORD NULL removes one)".into(),
                        );
                    }
                    Some(v)
                };
                if options.password.replace(value).is_some() {
                    return Err(twice("PASSWORD"));
                }
            }
            "LOGIN" | "NOLOGIN" => {
                p.parser.next_token();
                if options.login.replace(word == "LOGIN").is_some() {
                    return Err(twice("LOGIN"));
                }
            }
            "SUPERUSER" | "NOSUPERUSER" => {
                p.parser.next_token();
                if options.superuser.replace(word == "SUPERUSER").is_some() {
                    return Err(twice("SUPERUSER"));
                }
            }
            "ENCRYPTED" => {
                // `ENCRYPTED PASSWORD '…'`: every password is stored as a SCRAM verifier.
                p.parser.next_token();
            }
            "CREATEDB" | "CREATEROLE" | "INHERIT" | "NOINHERIT" | "REPLICATION" | "BYPASSRLS"
            | "CONNECTION" | "VALID" | "IN" | "ROLE" | "ADMIN" => {
                return Err(format!(
                    "role option {word} is not supported: Sluice takes PASSWORD, LOGIN, NOLOGIN, SUPERUSER and NOSUPERUSER"
                )
                .into());
            }
            _ => break,
        }
    }
    Ok(options)
}

fn next_word(p: &mut DFParser<'_>) -> PResult<String> {
    match p.parser.next_token().token {
        Token::Word(w) => Ok(w.value.to_ascii_uppercase()),
        other => Err(format!("expected a keyword, found {other}").into()),
    }
}

/// A role, policy, token or secret name (case-folded unless quoted).
fn name(p: &mut DFParser<'_>) -> PResult<String> {
    Ok(ident(&p.parser.parse_identifier()?))
}

/// A name that may be spelled like a keyword (`ALTER USER sluice`, `… TO public`).
fn name_or_keyword(p: &mut DFParser<'_>) -> PResult<String> {
    match p.parser.next_token().token {
        Token::Word(w) if w.quote_style.is_some() => Ok(w.value),
        Token::Word(w) => Ok(w.value.to_lowercase()),
        other => Err(format!("expected a name, found {other}").into()),
    }
}

fn names(p: &mut DFParser<'_>) -> PResult<Vec<String>> {
    let mut out = vec![name_or_keyword(p)?];
    while p.parser.consume_token(&Token::Comma) {
        out.push(name_or_keyword(p)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use crate::{SluiceStatement, parse_sql};

    use super::*;

    fn one(sql: &str) -> AccessStatement {
        match parse_sql(sql).unwrap().pop() {
            Some(SluiceStatement::Access(a)) => *a,
            other => panic!("{sql}: {other:?}"),
        }
    }

    #[test]
    fn users_roles_and_memberships() {
        let AccessStatement::CreateRole {
            name,
            user,
            options,
            ..
        } = one("CREATE USER Alice WITH PASSWORD 'se''cret' LOGIN")
        else {
            panic!()
        };
        assert_eq!((name.as_str(), user), ("alice", true));
        assert_eq!(options.password, Some(Some("se'cret".into())));
        assert_eq!(options.login, Some(true));
        assert!(matches!(
            one("CREATE ROLE analysts"),
            AccessStatement::CreateRole { user: false, .. }
        ));
        assert!(matches!(
            one("ALTER USER sluice PASSWORD NULL"),
            AccessStatement::AlterRole {
                options: RoleOptions {
                    password: Some(None),
                    ..
                },
                ..
            }
        ));
        assert_eq!(
            one("GRANT analysts TO alice, bob"),
            AccessStatement::Membership {
                grant: true,
                roles: vec!["analysts".into()],
                members: vec!["alice".into(), "bob".into()]
            }
        );
        assert!(matches!(
            one("DROP USER IF EXISTS alice, bob"),
            AccessStatement::DropRole {
                if_exists: true,
                ..
            }
        ));
        // Never shows the password.
        assert!(!format!("{:?}", one("CREATE USER a PASSWORD 'hunter2'")).contains("hunter2"));
        assert!(parse_sql("CREATE USER a WITH CREATEDB").is_err());
        assert!(parse_sql("CREATE USER a PASSWORD ''").is_err());
    }

    #[test]
    fn privileges_policies_tokens_secrets() {
        assert_eq!(
            one("GRANT SELECT, INSERT ON orders, clicks TO alice"),
            AccessStatement::Privileges {
                grant: true,
                privileges: vec![Privilege::Select, Privilege::Insert],
                target: GrantTarget::Objects(vec!["orders".into(), "clicks".into()]),
                grantees: vec!["alice".into()]
            }
        );
        assert_eq!(
            one("REVOKE ALL PRIVILEGES ON TABLE orders FROM PUBLIC"),
            AccessStatement::Privileges {
                grant: false,
                privileges: vec![Privilege::Select, Privilege::Insert],
                target: GrantTarget::Objects(vec!["orders".into()]),
                grantees: vec!["public".into()]
            }
        );
        assert!(matches!(
            one("GRANT CREATE ON DATABASE sluice TO alice"),
            AccessStatement::Privileges {
                target: GrantTarget::Database,
                ..
            }
        ));
        assert!(matches!(
            one("GRANT SELECT ON STREAM orders TO alice"),
            AccessStatement::Privileges { .. }
        ));
        assert!(parse_sql("GRANT UPDATE ON orders TO alice").is_err());
        assert!(parse_sql("GRANT SELECT ON DATABASE sluice TO alice").is_err());
        let AccessStatement::CreatePolicy {
            name,
            on,
            to,
            using,
        } = one("CREATE POLICY acme_only ON orders FOR SELECT TO acme USING (customer = 'acme')")
        else {
            panic!()
        };
        assert_eq!((name.as_str(), on.as_str()), ("acme_only", "orders"));
        assert_eq!(to, vec!["acme".to_string()]);
        assert_eq!(using.to_string(), "customer = 'acme'");
        assert!(parse_sql("CREATE POLICY p ON t FOR INSERT USING (true)").is_err());
        assert!(matches!(
            one("DROP POLICY IF EXISTS acme_only ON orders"),
            AccessStatement::DropPolicy {
                if_exists: true,
                ..
            }
        ));
        assert_eq!(
            one("CREATE TOKEN ingest FOR USER acme"),
            AccessStatement::CreateToken {
                name: "ingest".into(),
                user: "acme".into()
            }
        );
        assert!(!format!("{:?}", one("CREATE SECRET kafka_pw AS 'p4ss'")).contains("p4ss"));
        assert!(matches!(
            one("DROP SECRET kafka_pw"),
            AccessStatement::DropSecret {
                if_exists: false,
                ..
            }
        ));
    }

    #[test]
    fn secret_references_and_sink_filters_round_trip() {
        let sql = "CREATE SINK out FROM orders WHERE customer = 'acme' \
                   WITH (connector = 'kafka', 'properties.sasl.password' = SECRET kafka_pw)";
        let stmts = parse_sql(sql).unwrap();
        let SluiceStatement::CreateSink(c) = &stmts[0] else {
            panic!("{stmts:?}")
        };
        assert_eq!(c.filter.as_ref().unwrap().to_string(), "customer = 'acme'");
        assert_eq!(secret_name(&c.options[1].1), Some("kafka_pw"));
        let shown = c.to_string();
        assert!(shown.contains("= SECRET kafka_pw"), "{shown}");
        assert_eq!(parse_sql(&shown).unwrap(), stmts);
        // A literal cannot pass for a reference.
        assert!(parse_sql("CREATE SINK o FROM s WITH (a = E'\\x01secret:x')").is_err());
    }

    #[test]
    fn filters_go_wherever_a_relation_is_read() {
        let mut stmts = parse_sql(
            "SELECT o.id FROM orders o JOIN public.clicks ON true \
             WHERE o.id IN (SELECT id FROM sluice.public.orders) AND EXISTS (SELECT 1 FROM pg_catalog.pg_class)",
        )
        .unwrap();
        let Some(SluiceStatement::Other(stmt)) = stmts.pop() else {
            panic!()
        };
        let datafusion::sql::parser::Statement::Statement(mut s) = *stmt else {
            panic!()
        };
        assert_eq!(relations_read(&s), vec!["orders", "clicks"]);
        let mut filters = BTreeMap::new();
        let expr = datafusion::sql::sqlparser::parser::Parser::new(
            &datafusion::sql::sqlparser::dialect::PostgreSqlDialect {},
        )
        .try_with_sql("customer = 'acme'")
        .unwrap()
        .parse_expr()
        .unwrap();
        filters.insert("orders".to_string(), expr);
        assert_eq!(restrict(&mut s, &filters), Some(2));
        assert_eq!(
            s.to_string(),
            "SELECT o.id FROM (SELECT * FROM orders WHERE customer = 'acme') AS o JOIN public.clicks ON true \
             WHERE o.id IN (SELECT id FROM (SELECT * FROM sluice.public.orders WHERE customer = 'acme') AS orders) \
             AND EXISTS (SELECT 1 FROM pg_catalog.pg_class)"
        );
        // Window functions read their relation through a subquery: filtered there too.
        let Some(SluiceStatement::CreateStream(mut c)) = parse_sql(
            "CREATE STREAM s AS SELECT window_start, count(*) FROM TUMBLE(orders, ts, INTERVAL '1' MINUTE) GROUP BY 1",
        )
        .unwrap()
        .pop() else {
            panic!()
        };
        assert_eq!(restrict(&mut c.query, &filters), Some(1));
        assert!(
            c.query.to_string().contains(
                "TUMBLE((SELECT * FROM (SELECT * FROM orders WHERE customer = 'acme') AS orders)"
            ),
            "{}",
            c.query
        );
    }
}
