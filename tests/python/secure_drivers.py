"""psycopg 3 and asyncpg logging in to Sluice over TLS with SCRAM-SHA-256.

argv: host port ca_file user password other_user other_password

Each driver verifies the server's certificate against the test's CA (psycopg:
sslmode=verify-full; asyncpg: an SSL context with the CA and hostname checking), logs in as
both users, reads `orders_all` (each user sees the rows its row policy allows), and is
refused with SQLSTATE 28P01 for a wrong password. Exits non-zero, naming the check, on the
first difference.
"""

import asyncio
import ssl
import sys

import asyncpg
import psycopg

HOST, PORT, CA = sys.argv[1], int(sys.argv[2]), sys.argv[3]
USERS = {sys.argv[4]: sys.argv[5], sys.argv[6]: sys.argv[7]}


def check(name, got, want):
    if got != want:
        sys.exit(f"{name}: got {got!r}, want {want!r}")
    print(f"ok {name}")


def psycopg_sessions():
    for user, password in USERS.items():
        dsn = (
            f"host={HOST} port={PORT} dbname=sluice user={user} password={password} "
            f"sslmode=verify-full sslrootcert={CA}"
        )
        with psycopg.connect(dsn, autocommit=True) as conn:
            check(f"psycopg {user} ssl", conn.pgconn.ssl_in_use, True)
            rows = conn.execute(
                "SELECT DISTINCT customer FROM orders_all ORDER BY 1"
            ).fetchall()
            check(f"psycopg {user} sees its rows", rows, [(user,)])
    try:
        psycopg.connect(
            f"host={HOST} port={PORT} dbname=sluice user={user} password=wrong "
            f"sslmode=verify-full sslrootcert={CA}"
        )
        sys.exit("psycopg: a wrong password logged in")
    except psycopg.OperationalError as e:
        check("psycopg wrong password", "password authentication failed" in str(e), True)


async def asyncpg_sessions():
    context = ssl.create_default_context(cafile=CA)
    context.check_hostname = True
    for user, password in USERS.items():
        conn = await asyncpg.connect(
            host=HOST, port=PORT, user=user, password=password, database="sluice", ssl=context
        )
        try:
            rows = await conn.fetch(
                "SELECT DISTINCT customer FROM orders_all WHERE amount > $1 ORDER BY 1", 0
            )
            check(f"asyncpg {user} sees its rows", [r[0] for r in rows], [user])
        finally:
            await conn.close()
    try:
        await asyncpg.connect(
            host=HOST, port=PORT, user=user, password="wrong", database="sluice", ssl=context
        )
        sys.exit("asyncpg: a wrong password logged in")
    except asyncpg.InvalidPasswordError as e:
        check("asyncpg wrong password", e.sqlstate, "28P01")


psycopg_sessions()
asyncio.run(asyncpg_sessions())
print("ok all")
