// A pgJDBC session against a running Sluice (args: host port), as DBeaver, Metabase and every
// JVM tool open one: DatabaseMetaData.getTables/getColumns, a PreparedStatement with a
// parameter (compared with the same query's inline answer), and setFetchSize streaming.
// The server holds stream `clicks_all` (500 rows); see tests/tests/pg_clients.rs.
import java.sql.*;
import java.util.*;

public class JdbcSession {
    static void check(String name, Object got, Object want) {
        if (!Objects.equals(got, want)) {
            System.err.println(name + ": got " + got + ", want " + want);
            System.exit(1);
        }
        System.out.println("ok " + name);
    }

    public static void main(String[] args) throws Exception {
        String url = "jdbc:postgresql://" + args[0] + ":" + args[1] + "/sluice";
        try (Connection c = DriverManager.getConnection(url, "sluice", "")) {
            DatabaseMetaData md = c.getMetaData();
            List<String> tables = new ArrayList<>();
            try (ResultSet rs = md.getTables(null, "public", "%", new String[] {"TABLE"})) {
                while (rs.next()) tables.add(rs.getString("TABLE_NAME"));
            }
            Collections.sort(tables);
            check("getTables", tables, List.of("clicks", "clicks_all"));
            List<String> columns = new ArrayList<>();
            try (ResultSet rs = md.getColumns(null, "public", "clicks_all", "%")) {
                while (rs.next()) columns.add(rs.getString("COLUMN_NAME") + ":" + rs.getString("TYPE_NAME"));
            }
            check("getColumns", columns, List.of("user_id:int8", "url:text", "ts:timestamptz", "dt:text", "hour:text"));
            long inline;
            try (Statement s = c.createStatement(); ResultSet rs = s.executeQuery("SELECT count(*) FROM clicks_all WHERE user_id > 4")) {
                rs.next();
                inline = rs.getLong(1);
            }
            try (PreparedStatement ps = c.prepareStatement("SELECT count(*) FROM clicks_all WHERE user_id > ?")) {
                ps.setLong(1, 4);
                try (ResultSet rs = ps.executeQuery()) {
                    rs.next();
                    check("PreparedStatement with a parameter", rs.getLong(1), inline);
                }
            }
            // setFetchSize streams in portions (needs autocommit off, as in Postgres).
            c.setAutoCommit(false);
            try (PreparedStatement ps = c.prepareStatement("SELECT user_id FROM clicks_all ORDER BY ts, url")) {
                ps.setFetchSize(50);
                int n = 0;
                try (ResultSet rs = ps.executeQuery()) {
                    while (rs.next()) n++;
                }
                check("setFetchSize 50 over 500 rows", n, 500);
            }
            c.commit();
        }
    }
}
