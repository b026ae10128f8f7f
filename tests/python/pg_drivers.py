"""Scripted sessions of Postgres drivers against a running Sluice (argv: host port).

The server holds stream `clicks_all` (user_id BIGINT, url TEXT, ts TIMESTAMP): 500 rows,
user_id 1..20 as datagen with seed 1 makes them. Each check compares what the driver returns
with the same query's answer with its values written inline (the simple query protocol),
so a parameter that is bound wrongly cannot pass. Exits non-zero, naming the check, on the
first difference.
"""

import asyncio
import datetime
import sys

import asyncpg
import psycopg
import sqlalchemy

HOST, PORT = sys.argv[1], int(sys.argv[2])
DSN = f"host={HOST} port={PORT} user=sluice dbname=sluice"


def check(name, got, want):
    if got != want:
        sys.exit(f"{name}: got {got!r}, want {want!r}")
    print(f"ok {name}")


def inline(sql):
    """The rows of `sql` over the simple query protocol (no parameters)."""
    with psycopg.connect(DSN, autocommit=True) as conn:
        return [tuple(r) for r in psycopg.ClientCursor(conn).execute(sql).fetchall()]


def psycopg_session():
    with psycopg.connect(DSN) as conn:
        # What the server reports at startup, as SHOW and version() say.
        check("psycopg server_version", conn.info.parameter_status("server_version"), "16.6")
        check("psycopg server_version number", conn.info.server_version, 160006)
        cur = conn.cursor()
        cur.execute("SELECT count(*) FROM clicks_all WHERE user_id > %s", (10,))
        check("psycopg int parameter", cur.fetchone(),
              inline("SELECT count(*) FROM clicks_all WHERE user_id > 10")[0])
        cur.execute(
            "SELECT count(*) FROM clicks_all WHERE url <> %s AND user_id BETWEEN %s AND %s",
            ("x", 3, 7))
        check("psycopg text and int parameters", cur.fetchone(),
              inline("SELECT count(*) FROM clicks_all WHERE url <> 'x' AND user_id BETWEEN 3 AND 7")[0])
        cur.execute("SELECT %s::bigint + 1, %s", (41, "it's"))
        check("psycopg parameters in the select list", cur.fetchone(), (42, "it's"))
        # Prepared on the server after repeated use (prepare=True forces it now).
        for uid in (2, 9):
            cur.execute("SELECT url FROM clicks_all WHERE user_id = %s ORDER BY ts, url",
                        (uid,), prepare=True)
            check(f"psycopg prepared statement, user {uid}", [r[0] for r in cur.fetchall()],
                  [r[0] for r in inline(f"SELECT url FROM clicks_all WHERE user_id = {uid} ORDER BY ts, url")])
        with conn.cursor(binary=True) as bc:
            bc.execute("SELECT user_id, url FROM clicks_all WHERE user_id = %s ORDER BY ts, url",
                       (3,))
            check("psycopg binary results", bc.fetchall(),
                  inline("SELECT user_id, url FROM clicks_all WHERE user_id = 3 ORDER BY ts, url"))
        # A timestamp bound as a parameter (text with psycopg's type, or binary).
        since = datetime.datetime(2000, 1, 1)
        cur.execute("SELECT count(*) FROM clicks_all WHERE ts > %s", (since,))
        check("psycopg timestamp parameter", cur.fetchone(), (500,))
        # A bad value is an error, and the session goes on.
        try:
            cur.execute("SELECT count(*) FROM clicks_all WHERE user_id > %s::bigint", ("ten",))
            sys.exit("psycopg: a non-number for a bigint parameter was accepted")
        except psycopg.Error as e:
            check("psycopg bad parameter's SQLSTATE (invalid_text_representation)",
                  e.sqlstate, "22P02")
        conn.rollback()
        cur.execute("SELECT 1")
        check("psycopg session after an error", cur.fetchone(), (1,))
        # COPY TO STDOUT through psycopg's copy API.
        with cur.copy("COPY (SELECT user_id, url FROM clicks_all WHERE user_id = 5 ORDER BY ts, url) TO STDOUT") as copy:
            copied = [tuple(r) for r in copy.rows()]
        check("psycopg COPY TO STDOUT", copied,
              [(str(u), url) for u, url in inline("SELECT user_id, url FROM clicks_all WHERE user_id = 5 ORDER BY ts, url")])


async def asyncpg_session():
    c = await asyncpg.connect(host=HOST, port=PORT, user="sluice", database="sluice")
    try:
        v = c.get_server_version()  # 16.6 reads as major 16, micro 6
        check("asyncpg server version", (v.major, v.micro), (16, 6))
        check("asyncpg fetchval", await c.fetchval(
            "SELECT count(*) FROM clicks_all WHERE user_id > $1", 10),
            inline("SELECT count(*) FROM clicks_all WHERE user_id > 10")[0][0])
        st = await c.prepare(
            "SELECT user_id, url FROM clicks_all WHERE user_id = $1 ORDER BY ts, url LIMIT $2")
        check("asyncpg parameter types", [t.name for t in st.get_parameters()],
              ["int8", "int8"])
        rows = await st.fetch(7, 3)
        check("asyncpg prepared statement", [tuple(r) for r in rows],
              inline("SELECT user_id, url FROM clicks_all WHERE user_id = 7 ORDER BY ts, url LIMIT 3"))
        check("asyncpg timestamp parameter", await c.fetchval(
            "SELECT count(*) FROM clicks_all WHERE ts > $1", datetime.datetime(2000, 1, 1)), 500)
        # Rows fetched a few at a time (Execute with a row limit, portal suspension).
        async with c.transaction():
            seen = [r["user_id"] async for r in c.cursor(
                "SELECT user_id FROM clicks_all WHERE user_id <= $1 ORDER BY ts, url", 4, prefetch=7)]
        check("asyncpg cursor in batches of 7", seen,
              [r[0] for r in inline("SELECT user_id FROM clicks_all WHERE user_id <= 4 ORDER BY ts, url")])
    finally:
        await c.close()


def sqlalchemy_session():
    """What Superset does: the inspector lists tables and columns, then a query runs with a
    bound parameter."""
    engine = sqlalchemy.create_engine(f"postgresql+psycopg://sluice@{HOST}:{PORT}/sluice")
    inspector = sqlalchemy.inspect(engine)
    check("sqlalchemy tables", sorted(inspector.get_table_names()), ["clicks", "clicks_all"])
    check("sqlalchemy views of schema sluice", sorted(inspector.get_view_names(schema="sluice")),
          ["sinks", "sources", "streams"])
    check("sqlalchemy columns",
          [(c["name"], str(c["type"]), c["nullable"]) for c in inspector.get_columns("clicks_all")],
          [("user_id", "BIGINT", False), ("url", "TEXT", True), ("ts", "TIMESTAMP", False),
           ("dt", "TEXT", False), ("hour", "TEXT", False)])
    with engine.connect() as conn:
        got = conn.execute(sqlalchemy.text("SELECT count(*) FROM clicks_all WHERE user_id > :u"),
                           {"u": 3}).scalar()
    check("sqlalchemy bound parameter", got,
          inline("SELECT count(*) FROM clicks_all WHERE user_id > 3")[0][0])
    engine.dispose()


psycopg_session()
asyncio.run(asyncpg_session())
sqlalchemy_session()
