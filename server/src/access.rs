//! Who may log in and what each user may do: roles, privileges, owners, row policies,
//! tokens and secrets — Postgres's model (see `docs/security.md`).
//!
//! - The superuser `sluice` always exists; its password is `SLUICE_PASSWORD`, held in
//!   memory only. Other roles are made with `CREATE USER|ROLE` and stored, with their
//!   passwords as SCRAM verifiers, in the lake's catalog.
//! - Without `SLUICE_PASSWORD` the server trusts the user name a client gives (Postgres's
//!   `trust`; the server then listens on loopback only); privileges still apply.
//! - A privilege is held by a role, by a role it is a member of (transitively), or by
//!   `PUBLIC`. Superusers hold every privilege, owners every privilege on what they own.
//! - A row policy on a relation applies to the roles it names: a user with policies on a
//!   relation sees only the rows one of them allows, in ad-hoc queries and in every stream
//!   and sink the user creates from it. A user with no policy on it sees all its rows
//!   (given `SELECT`).
//! - Tokens are stored as SHA-256 hashes, secrets sealed with AES-256-GCM under a key
//!   derived from `SLUICE_SECRET_KEY`; neither is ever shown again.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Mutex, RwLock};

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use aws_lc_rs::{constant_time, digest};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD as B64, URL_SAFE_NO_PAD as B64URL};
use datafusion::sql::sqlparser::ast::Expr;
use datafusion::sql::sqlparser::dialect::PostgreSqlDialect;
use datafusion::sql::sqlparser::parser::Parser;
use serde::{Deserialize, Serialize};
use sluice_sql::access::{AccessStatement, GrantTarget, Privilege, RoleOptions, secret_name};

use crate::error::{Result, ServerError};
use crate::scram::{Verifier, random_bytes};

/// The superuser, who always exists.
pub const SUPERUSER: &str = "sluice";

/// The pseudo-role every role is a member of.
pub const PUBLIC: &str = "public";

/// Tokens start with this (so that scanners and logs can recognise one).
pub const TOKEN_PREFIX: &str = "sluice_";

/// A stored role.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RoleEntry {
    /// May log in.
    pub login: bool,
    /// Holds every privilege.
    #[serde(default)]
    pub superuser: bool,
    /// The SCRAM verifier of its password ([`Verifier::encode`]); none: cannot log in with
    /// a password.
    #[serde(default)]
    pub password: Option<String>,
    /// The roles it is a member of.
    #[serde(default)]
    pub member_of: BTreeSet<String>,
}

/// A privilege granted.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct GrantEntry {
    /// Who holds it (a role or `public`).
    pub grantee: String,
    /// `SELECT`, `INSERT` or `CREATE`.
    pub privilege: String,
    /// The source or stream (none: the database).
    pub object: Option<String>,
}

/// A row policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PolicyEntry {
    /// Its name (unique per relation).
    pub name: String,
    /// The relation it filters.
    pub on: String,
    /// The roles it applies to (empty: `PUBLIC`).
    pub to: Vec<String>,
    /// The predicate, as SQL.
    pub using: String,
}

/// A bearer token.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenEntry {
    /// Whom it authenticates as.
    pub user: String,
    /// SHA-256 of the token, base64.
    pub hash: String,
}

/// A sealed secret.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SecretEntry {
    /// Who created it (and may use it).
    pub owner: String,
    /// The AES-GCM nonce, base64.
    pub nonce: String,
    /// The sealed value and its tag, base64.
    pub sealed: String,
}

/// Everything access control stores in the catalog.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AccessState {
    /// Roles by name (not the superuser `sluice`).
    #[serde(default)]
    pub roles: BTreeMap<String, RoleEntry>,
    /// Privileges granted.
    #[serde(default)]
    pub grants: BTreeSet<GrantEntry>,
    /// The owner of each source, stream and sink (absent: `sluice`).
    #[serde(default)]
    pub owners: BTreeMap<String, String>,
    /// Row policies.
    #[serde(default)]
    pub policies: Vec<PolicyEntry>,
    /// Tokens by name.
    #[serde(default)]
    pub tokens: BTreeMap<String, TokenEntry>,
    /// Secrets by name.
    #[serde(default)]
    pub secrets: BTreeMap<String, SecretEntry>,
}

impl AccessState {
    /// Nothing stored (what catalogs from before access control hold).
    pub fn is_empty(&self) -> bool {
        *self == AccessState::default()
    }
}

/// How a user logs in.
#[derive(Debug)]
pub enum Login {
    /// No password asked (no `SLUICE_PASSWORD`): the user exists and may log in.
    Trusted,
    /// A SCRAM exchange with this verifier; if it succeeds and `refusal` is set, the login
    /// is still refused with it (SQLSTATE 28000), as Postgres refuses a `NOLOGIN` role.
    Scram {
        /// The verifier (a mock one for a user that does not exist).
        verifier: Verifier,
        /// Whether the user exists with a password (else the proof cannot be right).
        real: bool,
        /// Why a right password still does not let the user in.
        refusal: Option<String>,
    },
    /// Refused before any exchange (trust mode: no such user, or `NOLOGIN`): SQLSTATE 28000.
    Refused(String),
}

/// The rows `CREATE TOKEN` returns: the token, shown this once.
#[derive(Debug)]
pub struct NewToken {
    /// The token's name.
    pub name: String,
    /// The token.
    pub token: String,
}

/// Access control of one server.
pub struct AccessControl {
    state: RwLock<AccessState>,
    /// The superuser's verifier (`SLUICE_PASSWORD`); none: logins are trusted.
    superuser: Option<Verifier>,
    /// Seals secrets (`SLUICE_SECRET_KEY`).
    secret_key: Option<LessSafeKey>,
    /// Salts of mock verifiers (this process's).
    mock_secret: Vec<u8>,
    /// HTTP Basic logins verified lately: SHA-256 of `user:password` → user. A verifier
    /// costs 4096 PBKDF2 rounds, too much for every ingest request. Cleared on any change.
    basic_cache: Mutex<HashMap<[u8; 32], String>>,
}

impl std::fmt::Debug for AccessControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessControl")
            .field("password_required", &self.superuser.is_some())
            .field("secrets", &self.secret_key.is_some())
            .finish()
    }
}

impl Default for AccessControl {
    fn default() -> Self {
        Self::new(None, None)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn sha256(data: &[u8]) -> [u8; 32] {
    digest::digest(&digest::SHA256, data)
        .as_ref()
        .try_into()
        .expect("SHA-256 is 32 bytes")
}

fn denied(message: String) -> ServerError {
    ServerError::PermissionDenied(message)
}

/// Parses a stored policy predicate.
pub fn parse_predicate(sql: &str) -> Result<Expr> {
    Parser::new(&PostgreSqlDialect {})
        .try_with_sql(sql)
        .and_then(|mut p| p.parse_expr())
        .map_err(|e| ServerError::Internal(format!("stored policy `{sql}` does not parse: {e}")))
}

impl AccessControl {
    /// Access control with the superuser's `password` (none: trust) and the key that seals
    /// secrets (none: no secrets).
    pub fn new(password: Option<&str>, secret_key: Option<&str>) -> Self {
        let secret_key = secret_key.map(|k| {
            let key = sha256(k.as_bytes());
            LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &key).expect("a 32-byte key"))
        });
        Self {
            state: RwLock::default(),
            superuser: password.map(Verifier::new),
            secret_key,
            mock_secret: random_bytes(32),
            basic_cache: Mutex::default(),
        }
    }

    /// Whether logins need a password.
    pub fn requires_password(&self) -> bool {
        self.superuser.is_some()
    }

    /// What is stored now (a copy).
    pub fn state(&self) -> AccessState {
        self.state.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Replaces what is stored (loaded from the catalog, or changed and persisted).
    pub fn replace(&self, state: AccessState) {
        *self.state.write().unwrap_or_else(|e| e.into_inner()) = state;
        lock(&self.basic_cache).clear();
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, AccessState> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    /// How `user` logs in.
    pub fn login(&self, user: &str) -> Login {
        let state = self.read();
        let role = state.roles.get(user);
        let refusal = match (user, role) {
            (SUPERUSER, _) => None,
            (_, None) => Some(format!("role \"{user}\" does not exist")),
            (_, Some(r)) if !r.login => Some(format!("role \"{user}\" is not permitted to log in")),
            _ => None,
        };
        let Some(superuser) = &self.superuser else {
            return match refusal {
                Some(why) => Login::Refused(why),
                None => Login::Trusted,
            };
        };
        let stored = if user == SUPERUSER {
            Some(superuser.clone())
        } else {
            role.and_then(|r| r.password.as_deref())
                .and_then(Verifier::parse)
        };
        match stored {
            Some(verifier) => Login::Scram {
                verifier,
                real: true,
                refusal,
            },
            None => Login::Scram {
                verifier: Verifier::mock(user, &self.mock_secret),
                real: false,
                refusal,
            },
        }
    }

    /// Whether `user` is a superuser.
    pub fn is_superuser(&self, user: &str) -> bool {
        user == SUPERUSER || self.read().roles.get(user).is_some_and(|r| r.superuser)
    }

    /// `user`, every role it is a member of (transitively), and `public`.
    pub fn roles_of(&self, user: &str) -> BTreeSet<String> {
        roles_of(&self.read(), user)
    }

    /// The owner of object `name`.
    pub fn owner(&self, name: &str) -> String {
        self.read()
            .owners
            .get(name)
            .cloned()
            .unwrap_or_else(|| SUPERUSER.to_string())
    }

    /// Whether `user` holds `privilege` on `object` (none: the database).
    pub fn has(&self, user: &str, privilege: Privilege, object: Option<&str>) -> bool {
        if self.is_superuser(user) {
            return true;
        }
        let state = self.read();
        let roles = roles_of(&state, user);
        if let Some(o) = object
            && roles.contains(state.owners.get(o).map_or(SUPERUSER, String::as_str))
        {
            return true;
        }
        let privilege = privilege.to_string();
        state.grants.iter().any(|g| {
            g.privilege == privilege && g.object.as_deref() == object && roles.contains(&g.grantee)
        })
    }

    /// An error unless `user` holds `privilege` on `object` (`kind` names it in the message).
    pub fn require(
        &self,
        user: &str,
        privilege: Privilege,
        object: Option<(&str, &str)>,
    ) -> Result<()> {
        if self.has(user, privilege, object.map(|(_, name)| name)) {
            return Ok(());
        }
        Err(denied(match (privilege, object) {
            (Privilege::Create, _) => format!(
                "permission denied to create: user \"{user}\" needs CREATE (GRANT CREATE ON DATABASE sluice TO {user})"
            ),
            (p, Some((kind, name))) => format!(
                "permission denied for {kind} {name}: user \"{user}\" needs {p} (GRANT {p} ON {name} TO {user})"
            ),
            (p, None) => format!("permission denied: user \"{user}\" needs {p}"),
        }))
    }

    /// An error unless `user` owns `name` (or is a superuser): to drop it, grant on it, or
    /// put policies on it.
    pub fn require_owner(&self, user: &str, kind: &str, name: &str) -> Result<()> {
        if self.is_superuser(user) || self.roles_of(user).contains(&self.owner(name)) {
            return Ok(());
        }
        Err(denied(format!("must be owner of {kind} {name}")))
    }

    /// The rows of `relation` that `user` may see: the predicate of its policies (joined by
    /// `OR`), or none when no policy applies (all rows).
    pub fn row_filter(&self, user: &str, relation: &str) -> Result<Option<Expr>> {
        if self.is_superuser(user) {
            return Ok(None);
        }
        let state = self.read();
        let roles = roles_of(&state, user);
        if roles.contains(state.owners.get(relation).map_or(SUPERUSER, String::as_str)) {
            return Ok(None);
        }
        let mut filter: Option<Expr> = None;
        for p in state.policies.iter().filter(|p| p.on == relation) {
            if !p.to.is_empty() && !p.to.iter().any(|r| roles.contains(r)) {
                continue;
            }
            let e = parse_predicate(&p.using)?;
            let nested = |e: Expr| Expr::Nested(Box::new(e));
            filter = Some(match filter {
                None => nested(e),
                Some(f) => Expr::BinaryOp {
                    left: Box::new(f),
                    op: datafusion::sql::sqlparser::ast::BinaryOperator::Or,
                    right: Box::new(nested(e)),
                },
            });
        }
        Ok(filter)
    }

    /// Records that `user` owns new object `name`.
    pub fn owned(state: &mut AccessState, name: &str, user: &str) {
        if user == SUPERUSER {
            state.owners.remove(name);
        } else {
            state.owners.insert(name.to_string(), user.to_string());
        }
    }

    /// Forgets what refers to dropped object `name`: its owner, grants and policies.
    pub fn dropped(state: &mut AccessState, name: &str) {
        state.owners.remove(name);
        state.grants.retain(|g| g.object.as_deref() != Some(name));
        state.policies.retain(|p| p.on != name);
    }

    /// The user a bearer token authenticates, if it is a live token.
    pub fn token_user(&self, token: &str) -> Option<String> {
        let hash = B64.encode(sha256(token.as_bytes()));
        let state = self.read();
        let found = state.tokens.values().find(|t| {
            constant_time::verify_slices_are_equal(t.hash.as_bytes(), hash.as_bytes()).is_ok()
        })?;
        self.may_log_in(&state, &found.user)
            .then(|| found.user.clone())
    }

    fn may_log_in(&self, state: &AccessState, user: &str) -> bool {
        user == SUPERUSER || state.roles.get(user).is_some_and(|r| r.login)
    }

    /// The user HTTP Basic credentials authenticate, if they are right. Without
    /// `SLUICE_PASSWORD`, any existing user that may log in (trust).
    pub fn basic_user(&self, user: &str, password: &str) -> Option<String> {
        let key = sha256(format!("{user}:{password}").as_bytes());
        if let Some(u) = lock(&self.basic_cache).get(&key) {
            return Some(u.clone());
        }
        let ok = match self.login(user) {
            Login::Trusted => true,
            Login::Scram {
                verifier,
                real: true,
                refusal: None,
            } => verifier.matches(password),
            _ => false,
        };
        if !ok {
            return None;
        }
        let mut cache = lock(&self.basic_cache);
        if cache.len() > 10_000 {
            cache.clear();
        }
        cache.insert(key, user.to_string());
        Some(user.to_string())
    }

    /// The options with every `SECRET name` replaced by the secret's value.
    pub fn reveal_options(&self, options: &[(String, String)]) -> Result<Vec<(String, String)>> {
        options
            .iter()
            .map(|(k, v)| match secret_name(v) {
                Some(name) => Ok((k.clone(), self.reveal(name)?)),
                None => Ok((k.clone(), v.clone())),
            })
            .collect()
    }

    /// `e`, with the value of every secret `options` name replaced by `SECRET name` (an
    /// error about a connector's options may quote a value).
    pub fn redact(&self, options: &[(String, String)], e: ServerError) -> ServerError {
        let message = e.to_string();
        let mut redacted = message.clone();
        for name in options.iter().filter_map(|(_, v)| secret_name(v)) {
            if let Ok(value) = self.reveal(name)
                && !value.is_empty()
            {
                redacted = redacted.replace(&value, &format!("SECRET {name}"));
            }
        }
        if redacted == message {
            return e;
        }
        ServerError::Sql(sluice_sql::SqlError::InvalidOption(redacted))
    }

    /// An error unless `user` may use every secret `options` name (its owner or a
    /// superuser), and each exists.
    pub fn check_secrets(&self, user: &str, options: &[(String, String)]) -> Result<()> {
        let state = self.read();
        for name in options.iter().filter_map(|(_, v)| secret_name(v)) {
            let Some(s) = state.secrets.get(name) else {
                return Err(ServerError::UndefinedRole(format!(
                    "secret `{name}` does not exist"
                )));
            };
            if s.owner != user && !self.is_superuser(user) {
                return Err(denied(format!("permission denied for secret {name}")));
            }
        }
        Ok(())
    }

    fn reveal(&self, name: &str) -> Result<String> {
        let entry =
            self.read().secrets.get(name).cloned().ok_or_else(|| {
                ServerError::UndefinedRole(format!("secret `{name}` does not exist"))
            })?;
        let key = self.secret_key.as_ref().ok_or_else(|| {
            ServerError::External(format!(
                "secret `{name}` cannot be opened: SLUICE_SECRET_KEY is not set"
            ))
        })?;
        let nonce: [u8; NONCE_LEN] = B64
            .decode(&entry.nonce)
            .ok()
            .and_then(|n| n.try_into().ok())
            .ok_or_else(|| ServerError::Internal(format!("secret `{name}`: bad nonce")))?;
        let mut sealed = B64
            .decode(&entry.sealed)
            .map_err(|_| ServerError::Internal(format!("secret `{name}`: bad value")))?;
        let plain = key
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(name.as_bytes()),
                &mut sealed,
            )
            .map_err(|_| {
                ServerError::External(format!(
                    "secret `{name}` cannot be opened: SLUICE_SECRET_KEY is not the key it was sealed with"
                ))
            })?;
        String::from_utf8(plain.to_vec())
            .map_err(|_| ServerError::Internal(format!("secret `{name}` is not UTF-8")))
    }

    fn seal(&self, name: &str, value: &str, owner: &str) -> Result<SecretEntry> {
        let key = self.secret_key.as_ref().ok_or_else(|| {
            ServerError::External(
                "secrets need a key to seal them: start the server with SLUICE_SECRET_KEY (e.g. `openssl rand -base64 32`)".into(),
            )
        })?;
        let nonce: [u8; NONCE_LEN] = random_bytes(NONCE_LEN).try_into().expect("nonce length");
        let mut sealed = value.as_bytes().to_vec();
        key.seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(name.as_bytes()),
            &mut sealed,
        )
        .map_err(|_| ServerError::Internal("cannot seal a secret".into()))?;
        Ok(SecretEntry {
            owner: owner.to_string(),
            nonce: B64.encode(nonce),
            sealed: B64.encode(sealed),
        })
    }

    /// Runs an access-control statement of `user` against a copy of the state: the new
    /// state (to persist, then [`Self::replace`]), and the token `CREATE TOKEN` made.
    /// `object_kind` tells whether a name is a source or stream (and which).
    pub fn apply(
        &self,
        user: &str,
        stmt: &AccessStatement,
        object_kind: &dyn Fn(&str) -> Option<&'static str>,
    ) -> Result<(AccessState, Option<NewToken>)> {
        let mut state = self.state();
        let superuser = self.is_superuser(user);
        let only_superusers = |what: &str| -> Result<()> {
            if superuser {
                Ok(())
            } else {
                Err(denied(format!(
                    "permission denied to {what}: only superusers may"
                )))
            }
        };
        let role_exists = |state: &AccessState, name: &str| -> Result<()> {
            if name == SUPERUSER || state.roles.contains_key(name) {
                Ok(())
            } else {
                Err(ServerError::UndefinedRole(format!(
                    "role \"{name}\" does not exist"
                )))
            }
        };
        let mut token = None;
        match stmt {
            AccessStatement::CreateRole {
                name,
                user: is_user,
                if_not_exists,
                options,
            } => {
                only_superusers("create roles")?;
                if name == SUPERUSER || name == PUBLIC || name.starts_with("pg_") {
                    return Err(ServerError::DuplicateRole(format!(
                        "role name \"{name}\" is reserved"
                    )));
                }
                if state.roles.contains_key(name) {
                    if *if_not_exists {
                        return Ok((state, None));
                    }
                    return Err(ServerError::DuplicateRole(format!(
                        "role \"{name}\" already exists"
                    )));
                }
                let mut role = RoleEntry {
                    login: *is_user,
                    ..RoleEntry::default()
                };
                set_options(&mut role, options);
                state.roles.insert(name.clone(), role);
            }
            AccessStatement::AlterRole { name, options } => {
                if name == SUPERUSER {
                    return Err(denied(
                        "the superuser `sluice` is configured by the server (SLUICE_PASSWORD), not altered".into(),
                    ));
                }
                // Users may change their own password; anything else is a superuser's.
                let own_password =
                    name == user && options.login.is_none() && options.superuser.is_none();
                if !own_password {
                    only_superusers("alter roles")?;
                }
                role_exists(&state, name)?;
                let role = state.roles.get_mut(name).expect("exists");
                set_options(role, options);
            }
            AccessStatement::DropRole { names, if_exists } => {
                only_superusers("drop roles")?;
                for name in names {
                    if name == SUPERUSER || name == user {
                        return Err(denied(format!("role \"{name}\" cannot be dropped")));
                    }
                    if !state.roles.contains_key(name) {
                        if *if_exists {
                            continue;
                        }
                        return Err(ServerError::UndefinedRole(format!(
                            "role \"{name}\" does not exist"
                        )));
                    }
                    if let Some((object, _)) = state.owners.iter().find(|(_, o)| *o == name) {
                        return Err(ServerError::Sql(sluice_sql::SqlError::DependentObjects(
                            format!(
                                "role \"{name}\" cannot be dropped because it owns `{object}` (drop it first)"
                            ),
                        )));
                    }
                    state.roles.remove(name);
                    state.grants.retain(|g| g.grantee != *name);
                    state.tokens.retain(|_, t| t.user != *name);
                    for r in state.roles.values_mut() {
                        r.member_of.remove(name);
                    }
                    for p in &mut state.policies {
                        p.to.retain(|r| r != name);
                    }
                }
            }
            AccessStatement::Membership {
                grant,
                roles,
                members,
            } => {
                only_superusers("grant roles")?;
                for r in roles.iter().chain(members) {
                    role_exists(&state, r)?;
                }
                for m in members {
                    if m == SUPERUSER {
                        continue;
                    }
                    for r in roles {
                        if *grant {
                            if roles_of(&state, r).contains(m) {
                                return Err(ServerError::Sql(sluice_sql::SqlError::Invalid(
                                    format!("granting role \"{r}\" to \"{m}\" would make a cycle"),
                                )));
                            }
                            state
                                .roles
                                .get_mut(m)
                                .expect("exists")
                                .member_of
                                .insert(r.clone());
                        } else {
                            state.roles.get_mut(m).expect("exists").member_of.remove(r);
                        }
                    }
                }
            }
            AccessStatement::Privileges {
                grant,
                privileges,
                target,
                grantees,
            } => {
                for g in grantees {
                    if g != PUBLIC {
                        role_exists(&state, g)?;
                    }
                }
                let objects: Vec<Option<String>> = match target {
                    GrantTarget::Database => {
                        only_superusers("grant CREATE")?;
                        vec![None]
                    }
                    GrantTarget::Objects(names) => {
                        let mut out = vec![];
                        for n in names {
                            let Some(kind) = object_kind(n) else {
                                return Err(sluice_sql::SqlError::UndefinedObject(format!(
                                    "relation `{n}` does not exist"
                                ))
                                .into());
                            };
                            if privileges.contains(&Privilege::Insert) && kind != "source" {
                                return Err(sluice_sql::SqlError::Invalid(format!(
                                    "INSERT is granted on sources (HTTP ingest); `{n}` is a {kind}"
                                ))
                                .into());
                            }
                            self.require_owner(user, kind, n)?;
                            out.push(Some(n.clone()));
                        }
                        out
                    }
                };
                for object in objects {
                    for p in privileges {
                        for g in grantees {
                            let entry = GrantEntry {
                                grantee: g.clone(),
                                privilege: p.to_string(),
                                object: object.clone(),
                            };
                            if *grant {
                                state.grants.insert(entry);
                            } else {
                                state.grants.remove(&entry);
                            }
                        }
                    }
                }
            }
            AccessStatement::CreatePolicy {
                name,
                on,
                to,
                using,
            } => {
                match object_kind(on) {
                    Some("stream") => {}
                    Some(kind) => {
                        return Err(sluice_sql::SqlError::Invalid(format!(
                            "policies filter streams; `{on}` is a {kind} (its rows are read through streams: put the policy on one)"
                        ))
                        .into());
                    }
                    None => {
                        return Err(sluice_sql::SqlError::UndefinedObject(format!(
                            "stream `{on}` does not exist"
                        ))
                        .into());
                    }
                }
                self.require_owner(user, "stream", on)?;
                for r in to {
                    if r != PUBLIC {
                        role_exists(&state, r)?;
                    }
                }
                if state
                    .policies
                    .iter()
                    .any(|p| p.on == *on && p.name == *name)
                {
                    return Err(ServerError::DuplicateRole(format!(
                        "policy \"{name}\" for stream \"{on}\" already exists"
                    )));
                }
                state.policies.push(PolicyEntry {
                    name: name.clone(),
                    on: on.clone(),
                    to: if to.iter().any(|r| r == PUBLIC) {
                        vec![]
                    } else {
                        to.clone()
                    },
                    using: using.to_string(),
                });
            }
            AccessStatement::DropPolicy {
                name,
                on,
                if_exists,
            } => {
                let before = state.policies.len();
                if state
                    .policies
                    .iter()
                    .any(|p| p.on == *on && p.name == *name)
                {
                    self.require_owner(user, "stream", on)?;
                }
                state.policies.retain(|p| !(p.on == *on && p.name == *name));
                if state.policies.len() == before && !if_exists {
                    return Err(ServerError::UndefinedRole(format!(
                        "policy \"{name}\" for stream \"{on}\" does not exist"
                    )));
                }
            }
            AccessStatement::CreateToken { name, user: owner } => {
                if owner != user && !superuser {
                    return Err(denied(format!(
                        "permission denied to create a token for \"{owner}\": users make their own"
                    )));
                }
                role_exists(&state, owner)?;
                if state.tokens.contains_key(name) {
                    return Err(ServerError::DuplicateRole(format!(
                        "token \"{name}\" already exists"
                    )));
                }
                let secret = format!("{TOKEN_PREFIX}{}", B64URL.encode(random_bytes(32)));
                state.tokens.insert(
                    name.clone(),
                    TokenEntry {
                        user: owner.clone(),
                        hash: B64.encode(sha256(secret.as_bytes())),
                    },
                );
                token = Some(NewToken {
                    name: name.clone(),
                    token: secret,
                });
            }
            AccessStatement::DropToken { name, if_exists } => match state.tokens.get(name) {
                Some(t) if t.user == user || superuser => {
                    state.tokens.remove(name);
                }
                Some(_) => return Err(denied(format!("must be owner of token {name}"))),
                None if *if_exists => {}
                None => {
                    return Err(ServerError::UndefinedRole(format!(
                        "token \"{name}\" does not exist"
                    )));
                }
            },
            AccessStatement::CreateSecret { name, value } => {
                if !self.has(user, Privilege::Create, None) {
                    return Err(denied(format!(
                        "permission denied to create secret {name}: user \"{user}\" needs CREATE"
                    )));
                }
                if state.secrets.contains_key(name) {
                    return Err(ServerError::DuplicateRole(format!(
                        "secret \"{name}\" already exists"
                    )));
                }
                let sealed = self.seal(name, value, user)?;
                state.secrets.insert(name.clone(), sealed);
            }
            AccessStatement::DropSecret { name, if_exists } => match state.secrets.get(name) {
                Some(s) if s.owner == user || superuser => {
                    state.secrets.remove(name);
                }
                Some(_) => return Err(denied(format!("must be owner of secret {name}"))),
                None if *if_exists => {}
                None => {
                    return Err(ServerError::UndefinedRole(format!(
                        "secret \"{name}\" does not exist"
                    )));
                }
            },
        }
        Ok((state, token))
    }
}

fn set_options(role: &mut RoleEntry, options: &RoleOptions) {
    if let Some(p) = &options.password {
        role.password = p.as_deref().map(|p| Verifier::new(p).encode());
    }
    if let Some(l) = options.login {
        role.login = l;
    }
    if let Some(s) = options.superuser {
        role.superuser = s;
    }
}

fn roles_of(state: &AccessState, user: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::from([user.to_string(), PUBLIC.to_string()]);
    let mut todo = vec![user.to_string()];
    while let Some(r) = todo.pop() {
        if let Some(entry) = state.roles.get(&r) {
            for m in &entry.member_of {
                if out.insert(m.clone()) {
                    todo.push(m.clone());
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_sql::{SluiceStatement, parse_sql};

    fn run(ac: &AccessControl, user: &str, sql: &str) -> Result<Option<NewToken>> {
        let Some(SluiceStatement::Access(stmt)) = parse_sql(sql).unwrap().pop() else {
            panic!("{sql}")
        };
        let kind = |n: &str| match n {
            "orders" => Some("stream"),
            "events" => Some("source"),
            _ => None,
        };
        let (state, token) = ac.apply(user, &stmt, &kind)?;
        ac.replace(state);
        Ok(token)
    }

    #[test]
    fn grants_through_roles_owners_and_policies() {
        let ac = AccessControl::new(Some("root"), Some("key"));
        run(&ac, SUPERUSER, "CREATE USER alice PASSWORD 'pw-alice-1'").unwrap();
        run(&ac, SUPERUSER, "CREATE ROLE analysts").unwrap();
        assert!(!ac.has("alice", Privilege::Select, Some("orders")));
        run(&ac, SUPERUSER, "GRANT SELECT ON orders TO analysts").unwrap();
        run(&ac, SUPERUSER, "GRANT analysts TO alice").unwrap();
        assert!(ac.has("alice", Privilege::Select, Some("orders")));
        assert!(!ac.has("alice", Privilege::Insert, Some("orders")));
        let err = run(&ac, "alice", "CREATE USER mallory").unwrap_err();
        assert_eq!(err.sqlstate(), "42501");
        assert_eq!(
            run(&ac, SUPERUSER, "GRANT INSERT ON orders TO alice")
                .unwrap_err()
                .sqlstate(),
            "42000"
        );
        run(&ac, SUPERUSER, "REVOKE analysts FROM alice").unwrap();
        assert!(!ac.has("alice", Privilege::Select, Some("orders")));
        // Policies: one for alice, one for PUBLIC; the superuser sees everything.
        run(
            &ac,
            SUPERUSER,
            "CREATE POLICY a ON orders TO alice USING (customer = 'a')",
        )
        .unwrap();
        run(
            &ac,
            SUPERUSER,
            "CREATE POLICY p ON orders USING (amount < 10)",
        )
        .unwrap();
        let f = ac.row_filter("alice", "orders").unwrap().unwrap();
        assert_eq!(f.to_string(), "(customer = 'a') OR (amount < 10)");
        assert!(ac.row_filter(SUPERUSER, "orders").unwrap().is_none());
        assert_eq!(
            run(&ac, SUPERUSER, "CREATE POLICY x ON events USING (true)")
                .unwrap_err()
                .sqlstate(),
            "42000"
        );
        // Passwords are verifiers; logins go through SCRAM.
        assert!(!format!("{:?}", ac.state()).contains("pw-alice-1"));
        assert!(matches!(
            ac.login("alice"),
            Login::Scram {
                real: true,
                refusal: None,
                ..
            }
        ));
        assert!(matches!(
            ac.login("analysts"),
            Login::Scram {
                refusal: Some(_),
                ..
            }
        ));
        assert!(matches!(
            ac.login("ghost"),
            Login::Scram { real: false, .. }
        ));
        assert_eq!(
            ac.basic_user("alice", "pw-alice-1").as_deref(),
            Some("alice")
        );
        assert_eq!(ac.basic_user("alice", "b"), None);
    }

    #[test]
    fn tokens_and_secrets_are_never_stored_in_the_clear() {
        let ac = AccessControl::new(Some("root"), Some("key"));
        run(&ac, SUPERUSER, "CREATE USER acme PASSWORD 'x'").unwrap();
        let token = run(&ac, "acme", "CREATE TOKEN t1 FOR USER acme")
            .unwrap()
            .unwrap();
        assert!(token.token.starts_with(TOKEN_PREFIX));
        assert_eq!(ac.token_user(&token.token).as_deref(), Some("acme"));
        assert_eq!(ac.token_user("sluice_nope"), None);
        let stored = serde_json::to_string(&ac.state()).unwrap();
        assert!(!stored.contains(&token.token));
        run(&ac, SUPERUSER, "CREATE SECRET pw AS 'hunter2'").unwrap();
        let stored = serde_json::to_string(&ac.state()).unwrap();
        assert!(!stored.contains("hunter2"));
        let opts = vec![(
            "k".to_string(),
            format!("{}pw", sluice_sql::access::SECRET_REFERENCE),
        )];
        assert_eq!(ac.reveal_options(&opts).unwrap()[0].1, "hunter2");
        assert_eq!(
            ac.check_secrets("acme", &opts).unwrap_err().sqlstate(),
            "42501"
        );
        // Another key cannot open it.
        let other = AccessControl::new(None, Some("other key"));
        other.replace(ac.state());
        assert!(other.reveal_options(&opts).is_err());
        run(&ac, "acme", "DROP TOKEN t1").unwrap();
        assert_eq!(ac.token_user(&token.token), None);
    }
}
