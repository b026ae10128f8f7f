//! One client connection's session: its settings, and stopping its running statement.
//!
//! Settings a session `SET`s apply to it alone (Postgres's rule): `statement_timeout`, and
//! DataFusion's `datafusion.*` options, which are applied to a copy of the shared query
//! context for each of the session's queries. An ad-hoc query stops — with SQLSTATE 57014,
//! as in Postgres — when its `statement_timeout` passes or a `CancelRequest` for the
//! connection arrives, while it is being planned or while its rows are being sent; the
//! query's work on the query runtime stops with it (see [`crate::query_runtime`]). Sluice's
//! own statements (DDL) are not cut short: they are not transactional, and stopping one half
//! way could leave a stream running that the catalog does not list.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use datafusion::error::DataFusionError;
use datafusion::physical_plan::SendableRecordBatchStream;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::error::ServerError;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The settings a Postgres server reports and clients ask for (`SHOW`, `current_setting`),
/// with Sluice's values: a Postgres 16 server's behaviour where Sluice has one.
pub const SERVER_SETTINGS: &[(&str, &str)] = &[
    ("server_version", "16.6"),
    ("server_version_num", "160006"),
    ("server_encoding", "UTF8"),
    ("client_encoding", "UTF8"),
    ("datestyle", "ISO, MDY"),
    ("intervalstyle", "postgres"),
    ("timezone", "UTC"),
    ("integer_datetimes", "on"),
    ("standard_conforming_strings", "on"),
    ("search_path", "public"),
    ("application_name", ""),
    ("transaction_isolation", "read committed"),
    ("default_transaction_isolation", "read committed"),
    ("default_transaction_read_only", "off"),
    ("transaction_read_only", "off"),
    ("max_identifier_length", "63"),
    ("is_superuser", "on"),
    ("lc_collate", "C"),
    ("lc_ctype", "C"),
    ("extra_float_digits", "1"),
];

/// A client's session.
#[derive(Debug, Default)]
pub struct Session {
    /// `SET statement_timeout`; `None`: the server's default.
    statement_timeout: Mutex<Option<Duration>>,
    /// `SET datafusion.…` options, by name.
    options: Mutex<BTreeMap<String, String>>,
    /// Other `SET`s (what drivers send: `application_name`, `search_path`, …), by
    /// lower-case name: `SHOW` and `current_setting()` give them back.
    settings: Mutex<BTreeMap<String, String>>,
    /// The limits of the statement running now (none outside a client's statement).
    current: Mutex<Option<Guard>>,
    /// Notices for the client, sent before the statement's result.
    notices: Mutex<Vec<String>>,
    /// The user who logged in, and whether it is a superuser (unset: the superuser, for
    /// the server's own statements).
    user: std::sync::OnceLock<(String, bool)>,
}

/// Why a statement stopped early.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// Its `statement_timeout` passed.
    Timeout,
    /// A `CancelRequest` came for it.
    Cancelled,
}

impl Stopped {
    /// Postgres's message for it.
    pub fn message(self) -> &'static str {
        match self {
            Stopped::Timeout => "canceling statement due to statement timeout",
            Stopped::Cancelled => "canceling statement due to user request",
        }
    }
}

impl Session {
    /// Sets the user once, at login (a second call changes nothing); `superuser` is what
    /// `SHOW is_superuser` says.
    pub fn log_in(&self, user: &str, superuser: bool) {
        let _ = self.user.set((user.to_string(), superuser));
    }

    /// The session's user.
    pub fn user(&self) -> &str {
        self.user
            .get()
            .map_or(crate::access::SUPERUSER, |(u, _)| u.as_str())
    }

    /// The session's `statement_timeout`, if it set one.
    pub fn statement_timeout(&self) -> Option<Duration> {
        *lock(&self.statement_timeout)
    }

    /// Sets `statement_timeout` (zero: none).
    pub fn set_statement_timeout(&self, timeout: Duration) {
        *lock(&self.statement_timeout) = Some(timeout);
    }

    /// The `datafusion.*` options the session set.
    pub fn options(&self) -> BTreeMap<String, String> {
        lock(&self.options).clone()
    }

    /// Records a `datafusion.*` option (already checked).
    pub fn set_option(&self, name: String, value: String) {
        lock(&self.options).insert(name, value);
    }

    /// Notes a notice for the client (`NOTICE`, SQLSTATE 00000).
    pub fn notice(&self, message: String) {
        lock(&self.notices).push(message);
    }

    /// The notices noted since the last call.
    pub fn take_notices(&self) -> Vec<String> {
        std::mem::take(&mut *lock(&self.notices))
    }

    /// Records a `SET` of a Postgres setting Sluice takes without acting on it.
    pub fn set_setting(&self, name: String, value: String) {
        lock(&self.settings).insert(name, value);
    }

    /// The value of setting `name` (any case) in this session, as `SHOW` gives it:
    /// what the session set, else the server's value; `None` for names Sluice does not
    /// know.
    pub fn setting(&self, name: &str) -> Option<String> {
        let name = name.to_ascii_lowercase();
        match name.as_str() {
            "session_authorization" => return Some(self.user().to_string()),
            "is_superuser" => {
                let superuser = self.user.get().is_none_or(|(_, s)| *s);
                return Some(if superuser { "on" } else { "off" }.into());
            }
            _ => {}
        }
        if name == "statement_timeout" {
            return Some(match self.statement_timeout() {
                Some(t) if !t.is_zero() => format!("{}ms", t.as_millis()),
                _ => "0".into(),
            });
        }
        if let Some(v) = lock(&self.settings)
            .get(&name)
            .or(lock(&self.options).get(&name))
        {
            return Some(v.clone());
        }
        SERVER_SETTINGS
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.to_string())
    }

    /// Starts a client's statement: its limits are the session's `statement_timeout` (or
    /// `default_timeout`) and a token a `CancelRequest` cancels.
    pub fn begin(&self, default_timeout: Duration) -> Guard {
        let timeout = self.statement_timeout().unwrap_or(default_timeout);
        let guard = Guard::new(timeout, CancellationToken::new());
        *lock(&self.current) = Some(guard.clone());
        guard
    }

    /// The limits of the statement running now, if a client started one.
    pub fn guard(&self) -> Option<Guard> {
        lock(&self.current).clone()
    }

    /// Stops the running statement, if any.
    pub fn cancel(&self) {
        if let Some(g) = lock(&self.current).as_ref() {
            g.cancel.cancel();
        }
    }
}

/// The limits one statement runs under: a deadline and a cancel token.
#[derive(Debug, Clone)]
pub struct Guard {
    deadline: Option<tokio::time::Instant>,
    cancel: CancellationToken,
}

impl Guard {
    /// A guard for a statement starting now with `timeout` (zero: none).
    pub fn new(timeout: Duration, cancel: CancellationToken) -> Self {
        Self {
            deadline: (!timeout.is_zero()).then(|| tokio::time::Instant::now() + timeout),
            cancel,
        }
    }

    /// Resolves when the statement must stop, with why.
    pub async fn stopped(&self) -> Stopped {
        let deadline = async {
            match self.deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = self.cancel.cancelled() => Stopped::Cancelled,
            _ = deadline => Stopped::Timeout,
        }
    }

    /// Runs `work` unless the statement must stop first.
    pub async fn run<T>(&self, work: impl Future<Output = crate::Result<T>>) -> crate::Result<T> {
        tokio::select! {
            r = work => r,
            why = self.stopped() => Err(ServerError::Canceled(why.message().into())),
        }
    }

    /// `rows`, ended with an error when the statement must stop (dropping `rows` stops
    /// the query).
    pub fn rows(&self, rows: SendableRecordBatchStream) -> SendableRecordBatchStream {
        let schema = rows.schema();
        let guard = self.clone();
        // Made once and polled on: a timer dropped between polls would never fire.
        let mut stop = Box::pin(async move { guard.stopped().await });
        let mut rows = Some(rows);
        let guarded = futures::stream::poll_fn(move |cx| {
            let Some(inner) = rows.as_mut() else {
                return std::task::Poll::Ready(None);
            };
            if let std::task::Poll::Ready(why) = stop.as_mut().poll(cx) {
                rows = None;
                return std::task::Poll::Ready(Some(Err(DataFusionError::External(Box::new(
                    ServerError::Canceled(why.message().into()),
                )))));
            }
            inner.poll_next_unpin(cx)
        });
        Box::pin(RecordBatchStreamAdapter::new(schema, guarded))
    }
}

/// The sessions a `CancelRequest` may name, by process id and secret key.
///
/// Not pgwire's `ConnectionManager`: its cancel signal races only the handler's `do_query`,
/// and a query's rows stream after `do_query` has returned (see [`Guard::rows`]), so a cancel
/// during the rows would reach no one. This registry cancels the session's current
/// [`Guard`], which covers both.
#[derive(Debug, Default)]
pub struct Sessions {
    open: Mutex<Vec<(i32, pgwire::messages::startup::SecretKey, Weak<Session>)>>,
}

impl Sessions {
    /// Registers `session` under `(pid, key)`; forgets closed sessions.
    pub fn register(
        &self,
        pid: i32,
        key: pgwire::messages::startup::SecretKey,
        session: &Arc<Session>,
    ) {
        let mut open = lock(&self.open);
        open.retain(|(_, _, s)| s.strong_count() > 0);
        open.push((pid, key, Arc::downgrade(session)));
    }

    /// Cancels the running statement of the session `(pid, key)` names, if it is open.
    pub fn cancel(&self, pid: i32, key: &pgwire::messages::startup::SecretKey) {
        let found = lock(&self.open)
            .iter()
            .find(|(p, k, _)| *p == pid && k.eq_value(key))
            .and_then(|(_, _, s)| s.upgrade());
        if let Some(session) = found {
            session.cancel();
        }
    }
}
