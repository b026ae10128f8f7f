//! The Postgres wire protocol front door (simple and extended query protocols).
//!
//! Database `sluice`; users are the superuser `sluice` and the roles `CREATE USER` makes.
//! With `SLUICE_PASSWORD` set every login is a SCRAM-SHA-256 exchange (nothing else is
//! offered: no cleartext, no MD5), checked against the user's stored verifier, its state
//! kept per connection (see [`crate::scram`]); without it the user name is trusted (the
//! listener is then on loopback only). TLS (`SSLRequest`) when the server has a certificate
//! ([`crate::tls`]). Every error reaches the client as a Postgres error with a SQLSTATE; a statement's
//! failure never affects other connections, and a panic while serving one connection ends
//! only that connection (each runs in its own task).

use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;

use arrow::datatypes::{DataType, SchemaRef};
use arrow::record_batch::RecordBatch;
use arrow_pg::datatypes::df::deserialize_parameters_with_server_types;
use arrow_pg::datatypes::{arrow_schema_to_pg_fields, encode_recordbatch, into_pg_type};
use async_trait::async_trait;
use datafusion::common::ParamValues;
use datafusion::physical_plan::SendableRecordBatchStream;
use futures::{Sink, StreamExt, stream};
use pgwire::api::auth::{DefaultServerParameterProvider, StartupHandler};
use pgwire::api::cancel::CancelHandler;
use pgwire::api::portal::{Format, Portal};
use pgwire::api::query::{ExtendedQueryHandler, SimpleQueryHandler};
use pgwire::api::results::{CopyResponse, FieldInfo, QueryResponse, Response, Tag};
use pgwire::api::stmt::QueryParser;
use pgwire::api::store::PortalStore;
use pgwire::api::{
    ClientInfo, ClientPortalStore, METADATA_DATABASE, METADATA_USER, PgWireConnectionState,
    PgWireServerHandlers, PidSecretKeyGenerator, RandomPidSecretKeyGenerator, Type,
};
use pgwire::error::{ErrorInfo, PgWireError, PgWireResult};
use pgwire::messages::cancel::CancelRequest;
use pgwire::messages::copy::CopyData;
use pgwire::messages::data::DataRow;
use pgwire::messages::startup::Authentication;
use pgwire::messages::{PgWireBackendMessage, PgWireFrontendMessage};
use tokio::net::{TcpListener, TcpStream};

use crate::access::Login;
use crate::connections::Limit;
use crate::copy::CopyFormat;
use crate::error::ServerError;
use crate::instance::{Described, Outcome};
use crate::node::Node;
use crate::scram::ScramError;
use crate::session::{Session, Sessions};

/// The only database name accepted (and the superuser's name).
pub const USER: &str = "sluice";

/// The SASL mechanism offered: the only one.
const SCRAM_SHA_256: &str = "SCRAM-SHA-256";

/// A login under way on one connection: the startup packet came, the SCRAM exchange has not
/// finished.
#[derive(Debug)]
struct PendingLogin {
    user: String,
    verifier: Option<crate::scram::Verifier>,
    /// The user exists with a password.
    real: bool,
    /// Why even the right password does not let this user in.
    refusal: Option<String>,
    /// After the client's first message.
    exchange: Option<crate::scram::Exchange>,
}

/// A prepared statement: its text, the parameter types the client declared in `Parse`
/// (`None`: left to the server), and what the plan says it takes and returns.
#[derive(Debug, Clone)]
pub struct Prepared {
    sql: String,
    declared: Vec<Option<Type>>,
    described: Described,
}

impl Prepared {
    /// The wire type of each parameter: the declared one, else the one the plan infers,
    /// else `text` (the value is then taken as a string, as Postgres does with `unknown`).
    fn parameter_types(&self) -> PgWireResult<Vec<Type>> {
        let n = self.declared.len().max(self.described.parameters.len());
        (0..n)
            .map(|i| match self.declared.get(i).cloned().flatten() {
                Some(t) if t != Type::UNKNOWN => Ok(t),
                _ => match self.described.parameters.get(i).cloned().flatten() {
                    Some(dt) => into_pg_type(&dt),
                    None => Ok(Type::TEXT),
                },
            })
            .collect()
    }
}

/// Serves one Sluice server (writer or standby) over the Postgres protocol.
#[derive(Debug, Clone)]
pub struct PgHandler {
    sluice: Node,
    /// The open sessions, for `CancelRequest`s.
    sessions: Arc<Sessions>,
    /// The `statement_timeout` of sessions that set none (zero: none).
    statement_timeout: Duration,
    /// Set once this connection's startup completed (one handler per connection).
    started: Option<Arc<std::sync::atomic::AtomicBool>>,
    /// Where this connection's session is left at startup, for the task that notices the
    /// client hanging up (one handler per connection).
    session_slot: Option<Arc<std::sync::OnceLock<std::sync::Weak<Session>>>>,
    /// This connection's login (one handler per connection: logins never mix).
    login: Arc<std::sync::Mutex<Option<PendingLogin>>>,
    /// Backend ids and cancel keys (shared by every connection).
    keys: Arc<RandomPidSecretKeyGenerator>,
}

impl PgHandler {
    /// A handler for `node`; statements stop after `statement_timeout` unless a session
    /// sets its own (zero: no limit).
    pub fn new(node: Node, statement_timeout: Duration) -> Self {
        Self {
            sluice: node,
            sessions: Arc::default(),
            statement_timeout,
            started: None,
            session_slot: None,
            login: Arc::default(),
            keys: Arc::default(),
        }
    }

    /// The session of `client` (made at startup).
    fn session<C: ClientInfo>(client: &C) -> Arc<Session> {
        let stored = client
            .session_extensions()
            .get_or_insert_with(|| Arc::new(Session::default()));
        Arc::clone(&stored)
    }

    /// Runs `sql` in `client`'s session, its ad-hoc queries under its `statement_timeout`
    /// and cancellation (see [`crate::session`]).
    async fn run<C: ClientInfo>(
        &self,
        client: &C,
        sql: &str,
        params: Option<ParamValues>,
    ) -> Vec<crate::Result<Outcome>> {
        let session = Self::session(client);
        session.begin(self.statement_timeout);
        self.sluice.execute(sql, &session, params).await
    }
}

/// Accepts connections on `listener` until the process ends: at most `limit` at once
/// (the next get `53300 too many clients`), each closed unless its startup completes within
/// `startup_timeout`.
pub async fn serve(
    listener: TcpListener,
    sluice: Node,
    statement_timeout: Duration,
    limit: Limit,
    startup_timeout: Duration,
    tls: Option<tokio_rustls::TlsAcceptor>,
) {
    let base = PgHandler::new(sluice, statement_timeout);
    loop {
        match listener.accept().await {
            Ok((mut socket, peer)) => {
                let Some(admitted) = limit.admit() else {
                    tracing::warn!(%peer, "pg: too many connections; refused");
                    tokio::spawn(async move {
                        let _ = tokio::time::timeout(
                            Duration::from_secs(2),
                            crate::connections::refuse_pg(&mut socket),
                        )
                        .await;
                    });
                    continue;
                };
                let started = Arc::new(std::sync::atomic::AtomicBool::new(false));
                let slot: Arc<std::sync::OnceLock<std::sync::Weak<Session>>> = Arc::default();
                let mut handler = base.clone();
                handler.started = Some(Arc::clone(&started));
                handler.session_slot = Some(Arc::clone(&slot));
                handler.login = Arc::default();
                let handlers = Arc::new(Handlers(Arc::new(handler)));
                let (socket, peer_end) = match watchable(socket) {
                    Ok(pair) => pair,
                    Err(e) => {
                        tracing::warn!(%peer, error = %e, "pg: cannot set the connection up");
                        continue;
                    }
                };
                let tls = tls.clone();
                tokio::spawn(async move {
                    let connection = pgwire::tokio::process_socket(socket, tls, handlers);
                    // Ends with the connection (and with it the second handle on the socket).
                    let hangup = watch_for_hangup(peer_end, slot);
                    let startup_deadline = async {
                        tokio::time::sleep(startup_timeout).await;
                        if started.load(std::sync::atomic::Ordering::Relaxed) {
                            std::future::pending::<()>().await;
                        }
                    };
                    tokio::select! {
                        () = hangup => unreachable!("waits for the connection to end"),
                        r = connection => if let Err(e) = r {
                            tracing::debug!(%peer, error = %e, "pg connection closed with an error");
                        },
                        () = startup_deadline => {
                            admitted.timed_out();
                            tracing::debug!(%peer, "pg: startup not finished in time; closed");
                        }
                    }
                    drop(admitted);
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "pg accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

/// `socket`, and a second handle on it with which [`watch_for_hangup`] sees the client go.
fn watchable(socket: TcpStream) -> std::io::Result<(TcpStream, TcpStream)> {
    let std = socket.into_std()?;
    let second = std.try_clone()?;
    Ok((TcpStream::from_std(std)?, TcpStream::from_std(second)?))
}

/// Notices the client hanging up (its end closed, no CancelRequest sent) and stops the
/// statement its session runs: pgwire reads the socket only between statements, so a query
/// whose client is gone would otherwise run on to its end. Peeks, never reads; pending
/// forever once the client is gone (the connection ends it).
async fn watch_for_hangup(
    peer: TcpStream,
    session: Arc<std::sync::OnceLock<std::sync::Weak<Session>>>,
) {
    let mut byte = [0u8; 1];
    loop {
        match peer.peek(&mut byte).await {
            Ok(0) | Err(_) => break,
            // The client sent more (pgwire reads it in turn): look again in a moment.
            Ok(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    if let Some(s) = session.get().and_then(std::sync::Weak::upgrade) {
        tracing::debug!("pg: the client hung up; its statement is stopped");
        s.cancel();
    }
    std::future::pending::<()>().await;
}

struct Handlers(Arc<PgHandler>);

impl PgWireServerHandlers for Handlers {
    fn simple_query_handler(&self) -> Arc<impl SimpleQueryHandler> {
        Arc::clone(&self.0)
    }

    fn extended_query_handler(&self) -> Arc<impl ExtendedQueryHandler> {
        Arc::clone(&self.0)
    }

    fn startup_handler(&self) -> Arc<impl StartupHandler> {
        Arc::clone(&self.0)
    }

    fn cancel_handler(&self) -> Arc<impl CancelHandler> {
        Arc::clone(&self.0)
    }
}

#[async_trait]
impl CancelHandler for PgHandler {
    async fn on_cancel_request(&self, request: CancelRequest) {
        self.sessions.cancel(request.pid, &request.secret_key);
    }
}

fn pg_error(e: &ServerError) -> ErrorInfo {
    let mut info = ErrorInfo::new("ERROR".into(), e.sqlstate().into(), e.to_string());
    info.position = e.position().map(|p| p.to_string());
    info
}

/// A query's error while its rows were streaming: Sluice's own (a stopped statement)
/// keeps its SQLSTATE.
fn query_error(e: datafusion::error::DataFusionError) -> ErrorInfo {
    if let datafusion::error::DataFusionError::External(inner) = &e
        && let Some(own) = inner.downcast_ref::<ServerError>()
    {
        return pg_error(own);
    }
    pg_error(&ServerError::Query(e))
}

fn user_error(code: &str, severity: &str, message: String) -> PgWireError {
    PgWireError::UserError(Box::new(ErrorInfo::new(
        severity.into(),
        code.into(),
        message,
    )))
}

fn rows_response(
    schema: &SchemaRef,
    batches: Vec<RecordBatch>,
    format: &Format,
) -> PgWireResult<Response> {
    let fields: Arc<Vec<FieldInfo>> = Arc::new(arrow_schema_to_pg_fields(schema, format, None)?);
    let mut rows = Vec::new();
    for b in batches {
        rows.extend(encode_recordbatch(Arc::clone(&fields), b));
    }
    Ok(Response::Query(QueryResponse::new(
        fields,
        stream::iter(rows),
    )))
}

/// Encodes a query's batches as they arrive; an error mid-way ends the result with a
/// Postgres error.
fn stream_response(
    schema: &SchemaRef,
    batches: SendableRecordBatchStream,
    format: &Format,
) -> PgWireResult<Response> {
    let fields: Arc<Vec<FieldInfo>> = Arc::new(arrow_schema_to_pg_fields(schema, format, None)?);
    let encode_fields = Arc::clone(&fields);
    let rows = batches.flat_map(move |batch| {
        let rows: Vec<PgWireResult<DataRow>> = match batch {
            Ok(b) => encode_recordbatch(Arc::clone(&encode_fields), b).collect(),
            Err(e) => vec![Err(PgWireError::UserError(Box::new(query_error(e))))],
        };
        stream::iter(rows)
    });
    Ok(Response::Query(QueryResponse::new(fields, rows)))
}

/// `COPY … TO STDOUT`: one `CopyData` per line (the header, then each row), the values as
/// query results encode them in text, escaped for the COPY format.
fn copy_response(
    schema: &SchemaRef,
    batches: SendableRecordBatchStream,
    copy: CopyFormat,
) -> PgWireResult<Response> {
    let fields: Arc<Vec<FieldInfo>> = Arc::new(arrow_schema_to_pg_fields(
        schema,
        &Format::UnifiedText,
        None,
    )?);
    let columns = fields.len();
    let header = copy.header.then(|| {
        let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
        Ok(CopyData::new(
            copy.line(names.iter().map(|n| Some(n.as_bytes()))).into(),
        ))
    });
    let rows = batches.flat_map(move |batch| {
        let lines: Vec<PgWireResult<CopyData>> = match batch {
            Ok(b) => encode_recordbatch(Arc::clone(&fields), b)
                .map(|row| {
                    let row = row?;
                    let values = crate::copy::data_row_fields(&row.data);
                    Ok(CopyData::new(copy.line(values).into()))
                })
                .collect(),
            Err(e) => vec![Err(PgWireError::UserError(Box::new(query_error(e))))],
        };
        stream::iter(lines)
    });
    let data = stream::iter(header).chain(rows);
    Ok(Response::CopyOut(CopyResponse::new(0, columns, data)))
}

fn to_response(r: crate::Result<Outcome>, format: &Format) -> PgWireResult<Response> {
    match r {
        Ok(Outcome::Command(tag)) => Ok(Response::Execution(Tag::new(&tag))),
        Ok(Outcome::Rows { schema, batches }) => rows_response(&schema, batches, format),
        Ok(Outcome::Stream { schema, stream }) => stream_response(&schema, stream, format),
        Ok(Outcome::CopyOut {
            schema,
            stream,
            format,
        }) => copy_response(&schema, stream, format),
        Err(e) => Ok(Response::Error(Box::new(pg_error(&e)))),
    }
}

fn login_error(code: &str, message: String) -> PgWireError {
    user_error(code, "FATAL", message)
}

impl PgHandler {
    fn pending(&self) -> std::sync::MutexGuard<'_, Option<PendingLogin>> {
        self.login.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The client is in as `user`: its session, cancel key, and the messages that end the
    /// startup (`AuthenticationOk`, parameters, `BackendKeyData`, `ReadyForQuery`).
    async fn logged_in<C>(&self, client: &mut C, user: &str) -> PgWireResult<()>
    where
        C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let session = Self::session(client);
        let superuser = self.sluice.access().is_superuser(user);
        session.log_in(user, superuser);
        let (pid, key) = self.keys.generate(client);
        client.set_pid_and_secret_key(pid, key.clone());
        // The key a CancelRequest names the session by (sent as BackendKeyData).
        self.sessions.register(pid, key, &session);
        if let Some(slot) = &self.session_slot {
            let _ = slot.set(Arc::downgrade(&session));
        }
        if let Some(started) = &self.started {
            started.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        let mut parameters = DefaultServerParameterProvider::default();
        // The version `SHOW server_version` and `version()` give (not "16.6-pgwire-…").
        if let Some((_, version)) = crate::session::SERVER_SETTINGS
            .iter()
            .find(|(n, _)| *n == "server_version")
        {
            parameters.server_version = (*version).into();
        }
        parameters.is_superuser = superuser;
        pgwire::api::auth::finish_authentication(client, &parameters).await
    }
}

#[async_trait]
impl StartupHandler for PgHandler {
    async fn on_startup<C>(
        &self,
        client: &mut C,
        message: PgWireFrontendMessage,
    ) -> PgWireResult<()>
    where
        C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        match message {
            PgWireFrontendMessage::Startup(ref startup) => {
                pgwire::api::auth::protocol_negotiation(client, startup).await?;
                pgwire::api::auth::save_startup_parameters_to_metadata(client, startup);
                let user = client
                    .metadata()
                    .get(METADATA_USER)
                    .cloned()
                    .unwrap_or_default();
                let db = client
                    .metadata()
                    .get(METADATA_DATABASE)
                    .cloned()
                    .unwrap_or_else(|| user.clone());
                if db != USER {
                    return Err(login_error(
                        "3D000",
                        format!(
                            "database \"{db}\" does not exist (connect to database \"{USER}\")"
                        ),
                    ));
                }
                // A standby learns of users the writer made since it last looked.
                self.sluice.refresh_access().await;
                match self.sluice.access().login(&user) {
                    Login::Trusted => self.logged_in(client, &user).await?,
                    Login::Refused(why) => return Err(login_error("28000", why)),
                    Login::Scram {
                        verifier,
                        real,
                        refusal,
                    } => {
                        *self.pending() = Some(PendingLogin {
                            user,
                            verifier: Some(verifier),
                            real,
                            refusal,
                            exchange: None,
                        });
                        client.set_state(PgWireConnectionState::AuthenticationInProgress);
                        futures::SinkExt::send(
                            client,
                            PgWireBackendMessage::Authentication(Authentication::SASL(vec![
                                SCRAM_SHA_256.to_string(),
                            ])),
                        )
                        .await?;
                    }
                }
            }
            PgWireFrontendMessage::PasswordMessageFamily(msg) => {
                let Some(mut pending) = self.pending().take() else {
                    return Err(login_error("08P01", "unexpected password message".into()));
                };
                let failed = |user: &str| {
                    login_error(
                        "28P01",
                        format!("password authentication failed for user \"{user}\""),
                    )
                };
                match pending.exchange.take() {
                    None => {
                        // Only SASL was offered: anything else (a cleartext password) fails.
                        let Ok(initial) = msg.into_sasl_initial_response() else {
                            return Err(failed(&pending.user));
                        };
                        if initial.auth_method != SCRAM_SHA_256 {
                            return Err(login_error(
                                "28000",
                                format!(
                                    "SASL mechanism {} is not supported (use {SCRAM_SHA_256})",
                                    initial.auth_method
                                ),
                            ));
                        }
                        let verifier = pending.verifier.take().expect("set at startup");
                        let (exchange, server_first) = initial
                            .data
                            .as_deref()
                            .ok_or_else(|| "no client-first message".to_string())
                            .and_then(|data| {
                                crate::scram::Exchange::start(data, verifier)
                                    .map_err(|e| e.to_string())
                            })
                            .map_err(|e| {
                                login_error("08P01", format!("malformed SCRAM message: {e}"))
                            })?;
                        pending.exchange = Some(exchange);
                        *self.pending() = Some(pending);
                        futures::SinkExt::send(
                            client,
                            PgWireBackendMessage::Authentication(Authentication::SASLContinue(
                                server_first.into_bytes().into(),
                            )),
                        )
                        .await?;
                    }
                    Some(exchange) => {
                        let Ok(response) = msg.into_sasl_response() else {
                            return Err(failed(&pending.user));
                        };
                        match exchange.finish(&response.data) {
                            Ok(server_final) if pending.real => {
                                futures::SinkExt::send(
                                    client,
                                    PgWireBackendMessage::Authentication(
                                        Authentication::SASLFinal(server_final.into_bytes().into()),
                                    ),
                                )
                                .await?;
                                if let Some(why) = pending.refusal {
                                    return Err(login_error("28000", why));
                                }
                                self.logged_in(client, &pending.user).await?;
                            }
                            Ok(_) | Err(ScramError::WrongPassword) => {
                                tracing::info!(user = %pending.user, "pg: password authentication failed");
                                return Err(failed(&pending.user));
                            }
                            Err(ScramError::Protocol(why)) => {
                                tracing::info!(user = %pending.user, "pg: malformed SCRAM message: {why}");
                                return Err(login_error(
                                    "08P01",
                                    format!("malformed SCRAM message: {why}"),
                                ));
                            }
                        }
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }
}

/// Sends the notices the statement left in `client`'s session, before its result.
async fn send_notices<C>(client: &mut C) -> PgWireResult<()>
where
    C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send,
    PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
{
    for message in PgHandler::session(client).take_notices() {
        let info = ErrorInfo::new("NOTICE".into(), "00000".into(), message);
        futures::SinkExt::feed(
            client,
            PgWireBackendMessage::NoticeResponse(pgwire::messages::response::NoticeResponse::from(
                info,
            )),
        )
        .await?;
    }
    Ok(())
}

#[async_trait]
impl SimpleQueryHandler for PgHandler {
    async fn do_query<C>(&self, client: &mut C, query: &str) -> PgWireResult<Vec<Response>>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let results = self.run(client, query, None).await;
        send_notices(client).await?;
        results
            .into_iter()
            .map(|r| to_response(r, &Format::UnifiedText))
            .collect()
    }
}

#[async_trait]
impl QueryParser for PgHandler {
    type Statement = Prepared;

    async fn parse_sql<C>(
        &self,
        client: &C,
        sql: &str,
        types: &[Option<Type>],
    ) -> PgWireResult<Option<Prepared>>
    where
        C: ClientInfo + Unpin + Send + Sync,
    {
        let described = self
            .sluice
            .describe(sql, &Self::session(client))
            .await
            .map_err(|e| PgWireError::UserError(Box::new(pg_error(&e))))?;
        Ok(Some(Prepared {
            sql: sql.to_string(),
            declared: types.to_vec(),
            described,
        }))
    }

    fn get_parameter_types(&self, stmt: &Prepared) -> PgWireResult<Vec<Type>> {
        stmt.parameter_types()
    }

    fn get_result_schema(
        &self,
        stmt: &Prepared,
        format: Option<&Format>,
    ) -> PgWireResult<Vec<FieldInfo>> {
        match &stmt.described.schema {
            Some(s) => arrow_schema_to_pg_fields(s, format.unwrap_or(&Format::UnifiedText), None),
            None => Ok(vec![]),
        }
    }
}

#[async_trait]
impl ExtendedQueryHandler for PgHandler {
    type Statement = Prepared;
    type QueryParser = PgHandler;

    fn query_parser(&self) -> Arc<Self::QueryParser> {
        Arc::new(self.clone())
    }

    async fn do_query<C>(
        &self,
        client: &mut C,
        portal: &Portal<Prepared>,
        _max_rows: usize,
    ) -> PgWireResult<Response>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore<Statement = Self::Statement>,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let prepared = &portal.statement.statement;
        let params = if portal.parameter_len() > 0 {
            // Decoded (text or binary) as the types the statement was described with.
            let wire = prepared.parameter_types()?;
            let wire: Vec<Option<&Type>> = wire.iter().map(Some).collect();
            let inferred: Vec<Option<&DataType>> = prepared
                .described
                .parameters
                .iter()
                .map(Option::as_ref)
                .collect();
            Some(deserialize_parameters_with_server_types(
                portal, &inferred, &wire,
            )?)
        } else {
            None
        };
        let mut results = self.run(client, &prepared.sql, params).await;
        send_notices(client).await?;
        match results.len() {
            0 => Ok(Response::EmptyQuery),
            1 => to_response(results.remove(0), &portal.result_column_format),
            _ => Err(user_error(
                "42601",
                "ERROR",
                "cannot insert multiple commands into a prepared statement".into(),
            )),
        }
    }
}
